// CUDA kernels of the hash-grid encoding: one thread per (point, level), the arithmetic shared with
// the CPU through hashgrid.h. Per-point sums over levels and scatters into the table use atomicAdd
// (so results are deterministic only up to the order of float additions). The table scatters are
// bound by the atomics' throughput; on Hopper (compute capability 9.x) float rows go two or four
// values per atomic.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "hashgrid.h"

namespace hashgrid {

namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t count) { return static_cast<int>((count + kThreads - 1) / kThreads); }

__device__ __forceinline__ int64_t table_of(const int64_t* table_index, int64_t n, int64_t default_table) {
  return table_index != nullptr ? table_index[n] : default_table;
}

// Thread -> (flat index i = n * n_levels + l, point n, level l); false for threads past the end.
__device__ __forceinline__ bool point_level(int64_t n_points, const Levels& levels, int64_t& i, int64_t& n, int& l) {
  i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_points * levels.n_levels) return false;
  n = i / levels.n_levels;
  l = static_cast<int>(i % levels.n_levels);
  return true;
}

// row[f] += coefficient * g[f] for f < F, atomically per value (vector atomics where available).
template <typename scalar_t>
__device__ __forceinline__ void scatter_row(scalar_t* row, scalar_t coefficient, const scalar_t* g, int F) {
  int f = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same<scalar_t, float>::value) {
    if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
      for (; f + 4 <= F; f += 4) {
        atomicAdd(reinterpret_cast<float4*>(row + f), make_float4(coefficient * g[f], coefficient * g[f + 1],
                                                                  coefficient * g[f + 2], coefficient * g[f + 3]));
      }
    }
    if ((reinterpret_cast<uintptr_t>(row + f) & 7) == 0) {
      for (; f + 2 <= F; f += 2) {
        atomicAdd(reinterpret_cast<float2*>(row + f), make_float2(coefficient * g[f], coefficient * g[f + 1]));
      }
    }
  }
#endif
  for (; f < F; ++f) atomicAdd(row + f, coefficient * g[f]);
}

template <typename scalar_t, int D>
__global__ void forward_kernel(int64_t n_points, const scalar_t* __restrict__ x, const scalar_t* __restrict__ table,
                               const int64_t* __restrict__ table_index, int64_t default_table, Levels levels,
                               scalar_t* __restrict__ out) {
  int64_t i, n;
  int l;
  if (!point_level(n_points, levels, i, n, l)) return;
  Cell<scalar_t, D> cell(x + n * D, l, levels, table_of(table_index, n, default_table));
  encode<scalar_t, D>(cell, table, levels.n_features, out + i * levels.n_features);
}

template <typename scalar_t, int D>
__global__ void backward_kernel(int64_t n_points, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ table, const int64_t* __restrict__ table_index,
                                int64_t default_table, Levels levels, scalar_t* __restrict__ grad_x,
                                scalar_t* __restrict__ grad_table) {
  int64_t i, n;
  int l;
  if (!point_level(n_points, levels, i, n, l)) return;
  const int F = levels.n_features;
  Cell<scalar_t, D> cell(x + n * D, l, levels, table_of(table_index, n, default_table));
  const scalar_t* g = grad_out + i * F;
  if (grad_x != nullptr) {
    scalar_t local[D] = {};
    points_backward<scalar_t, D>(cell, table, F, g, local);
    for (int j = 0; j < D; ++j) atomicAdd(grad_x + n * D + j, local[j]);
  }
  if (grad_table != nullptr) {
    for (int c = 0; c < Cell<scalar_t, D>::kCorners; ++c) {
      scatter_row(grad_table + cell.row[c] * F, cell.weight(c), g, F);
    }
  }
}

template <typename scalar_t, int D>
__global__ void double_backward_kernel(int64_t n_points, const scalar_t* __restrict__ gg_x,
                                       const scalar_t* __restrict__ gg_table, const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ x, const scalar_t* __restrict__ table,
                                       const int64_t* __restrict__ table_index, int64_t default_table, Levels levels,
                                       scalar_t* __restrict__ d_grad_out, scalar_t* __restrict__ d_x,
                                       scalar_t* __restrict__ d_table) {
  int64_t i, n;
  int l;
  if (!point_level(n_points, levels, i, n, l)) return;
  const int F = levels.n_features;
  Cell<scalar_t, D> cell(x + n * D, l, levels, table_of(table_index, n, default_table));
  const scalar_t* g = grad_out + i * F;
  const scalar_t* gx = gg_x == nullptr ? nullptr : gg_x + n * D;
  if (d_grad_out != nullptr || d_x != nullptr) {
    scalar_t local_x[D] = {};
    points_double_backward<scalar_t, D>(cell, table, gg_table, F, g, gx,
                                        d_grad_out == nullptr ? nullptr : d_grad_out + i * F,
                                        d_x == nullptr ? nullptr : local_x);
    if (d_x != nullptr) {
      for (int j = 0; j < D; ++j) atomicAdd(d_x + n * D + j, local_x[j]);
    }
  }
  if (d_table != nullptr && gx != nullptr) {
    for (int c = 0; c < Cell<scalar_t, D>::kCorners; ++c) {
      scalar_t gradient[D];
      cell.weight_gradient(c, gradient);
      scalar_t coefficient = 0;
      for (int j = 0; j < D; ++j) coefficient += gx[j] * gradient[j];
      scatter_row(d_table + cell.row[c] * F, coefficient, g, F);
    }
  }
}

template <typename scalar_t>
scalar_t* pointer_or_null(at::Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
const scalar_t* const_pointer_or_null(const at::Tensor& tensor) {
  return tensor.numel() > 0 ? tensor.data_ptr<scalar_t>() : nullptr;
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& points, const at::Tensor& table, const at::Tensor& table_index,
                        int64_t default_table, const Levels& levels) {
  const c10::cuda::CUDAGuard guard(points.device());
  const int64_t N = points.size(0);
  auto out = at::empty({N, levels.n_levels * levels.n_features}, points.options());
  if (N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(points, [&](auto scalar, auto dim) {
    using scalar_t = decltype(scalar);
    forward_kernel<scalar_t, decltype(dim)::value><<<blocks_for(N * levels.n_levels), kThreads, 0, stream>>>(
        N, points.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), index_pointer(table_index), default_table, levels,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& points, const at::Tensor& table,
                                      const at::Tensor& table_index, int64_t default_table, const Levels& levels,
                                      bool need_points, bool need_table) {
  const c10::cuda::CUDAGuard guard(points.device());
  const int64_t N = points.size(0);
  at::Tensor grad_points = need_points ? at::zeros_like(points) : at::Tensor();
  at::Tensor grad_table = need_table ? at::zeros_like(table) : at::Tensor();
  if (N == 0 || (!need_points && !need_table)) return {grad_points, grad_table};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(points, [&](auto scalar, auto dim) {
    using scalar_t = decltype(scalar);
    backward_kernel<scalar_t, decltype(dim)::value><<<blocks_for(N * levels.n_levels), kThreads, 0, stream>>>(
        N, grad_out.data_ptr<scalar_t>(), points.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
        index_pointer(table_index), default_table, levels, pointer_or_null<scalar_t>(grad_points),
        pointer_or_null<scalar_t>(grad_table));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_points, grad_table};
}

std::vector<at::Tensor> double_backward_cuda(const at::Tensor& gg_points, const at::Tensor& gg_table,
                                             const at::Tensor& grad_out, const at::Tensor& points,
                                             const at::Tensor& table, const at::Tensor& table_index,
                                             int64_t default_table, const Levels& levels, bool need_grad_out,
                                             bool need_points, bool need_table) {
  const c10::cuda::CUDAGuard guard(points.device());
  const int64_t N = points.size(0);
  at::Tensor d_grad_out = need_grad_out ? at::zeros_like(grad_out) : at::Tensor();
  at::Tensor d_points = need_points ? at::zeros_like(points) : at::Tensor();
  at::Tensor d_table = need_table ? at::zeros_like(table) : at::Tensor();
  if (N == 0 || (gg_points.numel() == 0 && gg_table.numel() == 0)) return {d_grad_out, d_points, d_table};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(points, [&](auto scalar, auto dim) {
    using scalar_t = decltype(scalar);
    double_backward_kernel<scalar_t, decltype(dim)::value><<<blocks_for(N * levels.n_levels), kThreads, 0, stream>>>(
        N, const_pointer_or_null<scalar_t>(gg_points), const_pointer_or_null<scalar_t>(gg_table),
        grad_out.data_ptr<scalar_t>(), points.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
        index_pointer(table_index), default_table, levels, pointer_or_null<scalar_t>(d_grad_out),
        pointer_or_null<scalar_t>(d_points), pointer_or_null<scalar_t>(d_table));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {d_grad_out, d_points, d_table};
}

}  // namespace hashgrid
