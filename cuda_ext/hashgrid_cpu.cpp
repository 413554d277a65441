// CPU kernels of the hash-grid encoding (CUDA kernels in hashgrid_cuda.cu when built with
// WITH_CUDA; the Python bindings of every kernel in bindings.cpp). Each direction of the autograd
// graph is one function:
//   forward          features = enc(x; table)
//   backward         dL/dtable (scatter) and dL/dx
//   double_backward  given gg_x (and optionally gg_table): d/d grad_out, d/d table, d/d x
// Per-point outputs are computed in parallel over points; scatters into the table are computed in
// parallel over levels, whose rows never overlap, so no atomics are needed on the CPU.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <vector>

#include "dispatch.h"
#include "hashgrid.h"

namespace hashgrid {

Levels make_levels(const at::Tensor& geometry, int64_t n_features, bool smoothstep, int64_t rows_per_table) {
  TORCH_CHECK(geometry.dim() == 2 && geometry.size(1) == 5, "geometry: expected (n_levels, 5)");
  TORCH_CHECK(geometry.size(0) >= 1 && geometry.size(0) <= kMaxLevels, "geometry: 1 to 32 levels");
  TORCH_CHECK(n_features >= 1 && n_features <= 8, "n_features: expected 1 to 8");
  const auto g = geometry.to(at::kCPU, at::kDouble).contiguous();
  const double* data = g.data_ptr<double>();
  Levels levels{};
  levels.n_levels = static_cast<int>(g.size(0));
  levels.n_features = static_cast<int>(n_features);
  levels.smoothstep = smoothstep;
  levels.rows_per_table = rows_per_table;
  for (int l = 0; l < levels.n_levels; ++l) {
    levels.scale[l] = static_cast<float>(data[l * 5 + 0]);
    levels.resolution[l] = static_cast<uint32_t>(data[l * 5 + 1]);
    levels.size[l] = static_cast<uint32_t>(data[l * 5 + 2]);
    levels.offset[l] = static_cast<uint32_t>(data[l * 5 + 3]);
    levels.hashed[l] = data[l * 5 + 4] != 0.0;
  }
  return levels;
}

void check_inputs(const at::Tensor& points, const at::Tensor& table, const at::Tensor& table_index,
                  const Levels& levels) {
  TORCH_CHECK(points.dim() == 2 && (points.size(1) == 2 || points.size(1) == 3), "points: expected (N, 2) or (N, 3)");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == levels.n_features, "table: expected (rows, n_features)");
  TORCH_CHECK(table.size(0) % levels.rows_per_table == 0, "table: rows must be a multiple of rows_per_table");
  TORCH_CHECK(points.scalar_type() == table.scalar_type(), "points and table: expected the same dtype");
  TORCH_CHECK(points.device() == table.device(), "points and table: expected the same device");
  TORCH_CHECK(points.is_contiguous() && table.is_contiguous(), "points and table: expected contiguous tensors");
  if (table_index.numel() > 0) {
    TORCH_CHECK(table_index.scalar_type() == at::kLong && table_index.numel() == points.size(0) &&
                table_index.is_contiguous() && table_index.device() == points.device(),
                "table_index: expected a contiguous int64 tensor with one entry per point");
  }
}

namespace {

constexpr int64_t kGrain = 256;

inline int64_t table_of(const int64_t* table_index, int64_t n, int64_t default_table) {
  return table_index != nullptr ? table_index[n] : default_table;
}

// Calls body(n, l, cell) for every point n and level l, in parallel over points.
template <typename scalar_t, int D, typename Body>
void for_each_cell(const at::Tensor& points, const int64_t* table_index, int64_t default_table,
                   const Levels& levels, Body&& body) {
  const scalar_t* x = points.data_ptr<scalar_t>();
  at::parallel_for(0, points.size(0), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t table = table_of(table_index, n, default_table);
      for (int l = 0; l < levels.n_levels; ++l) body(n, l, Cell<scalar_t, D>(x + n * D, l, levels, table));
    }
  });
}

template <typename scalar_t, int D>
void forward_cpu(const at::Tensor& points, const at::Tensor& table, const int64_t* table_index,
                 int64_t default_table, const Levels& levels, at::Tensor& out) {
  const scalar_t* t = table.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int F = levels.n_features, L = levels.n_levels;
  for_each_cell<scalar_t, D>(points, table_index, default_table, levels,
                             [&](int64_t n, int l, const Cell<scalar_t, D>& cell) {
                               encode<scalar_t, D>(cell, t, F, o + (n * L + l) * F);
                             });
}

template <typename scalar_t, int D>
void points_backward_cpu(const at::Tensor& grad_out, const at::Tensor& points, const at::Tensor& table,
                         const int64_t* table_index, int64_t default_table, const Levels& levels,
                         at::Tensor& grad_points) {
  const scalar_t* t = table.data_ptr<scalar_t>();
  const scalar_t* g = grad_out.data_ptr<scalar_t>();
  scalar_t* gx = grad_points.data_ptr<scalar_t>();
  const int F = levels.n_features, L = levels.n_levels;
  for_each_cell<scalar_t, D>(points, table_index, default_table, levels,
                             [&](int64_t n, int l, const Cell<scalar_t, D>& cell) {
                               points_backward<scalar_t, D>(cell, t, F, g + (n * L + l) * F, gx + n * D);
                             });
}

// grad_table[row_c] += coefficient_c * grad_out, coefficient_c = W_c, or sum_j gg_x_j dW_c/dx_j
// when gg_x is given (the table term of the double backward). Parallel over levels.
template <typename scalar_t, int D>
void table_scatter_cpu(const at::Tensor& grad_out, const at::Tensor& points, const scalar_t* gg_x,
                       const int64_t* table_index, int64_t default_table, const Levels& levels,
                       at::Tensor& grad_table) {
  const scalar_t* x = points.data_ptr<scalar_t>();
  const scalar_t* g = grad_out.data_ptr<scalar_t>();
  scalar_t* gt = grad_table.data_ptr<scalar_t>();
  const int F = levels.n_features, L = levels.n_levels;
  const int64_t N = points.size(0);
  at::parallel_for(0, L, 1, [&](int64_t level_begin, int64_t level_end) {
    for (int64_t l = level_begin; l < level_end; ++l) {
      for (int64_t n = 0; n < N; ++n) {
        Cell<scalar_t, D> cell(x + n * D, static_cast<int>(l), levels, table_of(table_index, n, default_table));
        const scalar_t* gn = g + (n * L + l) * F;
        for (int c = 0; c < Cell<scalar_t, D>::kCorners; ++c) {
          scalar_t coefficient;
          if (gg_x == nullptr) {
            coefficient = cell.weight(c);
          } else {
            scalar_t gradient[D];
            cell.weight_gradient(c, gradient);
            coefficient = 0;
            for (int j = 0; j < D; ++j) coefficient += gg_x[n * D + j] * gradient[j];
          }
          scalar_t* row = gt + cell.row[c] * F;
          for (int f = 0; f < F; ++f) row[f] += coefficient * gn[f];
        }
      }
    }
  });
}

template <typename scalar_t, int D>
void points_double_backward_cpu(const at::Tensor& grad_out, const at::Tensor& points, const at::Tensor& table,
                                const scalar_t* gg_table, const scalar_t* gg_x, const int64_t* table_index,
                                int64_t default_table, const Levels& levels, scalar_t* d_grad_out, scalar_t* d_x) {
  const scalar_t* t = table.data_ptr<scalar_t>();
  const scalar_t* g = grad_out.data_ptr<scalar_t>();
  const int F = levels.n_features, L = levels.n_levels;
  for_each_cell<scalar_t, D>(points, table_index, default_table, levels,
                             [&](int64_t n, int l, const Cell<scalar_t, D>& cell) {
                               const int64_t slot = (n * L + l) * F;
                               points_double_backward<scalar_t, D>(
                                   cell, t, gg_table, F, g + slot, gg_x == nullptr ? nullptr : gg_x + n * D,
                                   d_grad_out == nullptr ? nullptr : d_grad_out + slot,
                                   d_x == nullptr ? nullptr : d_x + n * D);
                             });
}

}  // namespace

#ifdef WITH_CUDA
at::Tensor forward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const Levels&);
std::vector<at::Tensor> backward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, const Levels&, bool, bool);
std::vector<at::Tensor> double_backward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, int64_t, const Levels&, bool, bool,
                                             bool);
#endif

at::Tensor forward(const at::Tensor& points, const at::Tensor& table, const at::Tensor& table_index,
                   int64_t default_table, const at::Tensor& geometry, int64_t n_features, bool smoothstep,
                   int64_t rows_per_table) {
  const Levels levels = make_levels(geometry, n_features, smoothstep, rows_per_table);
  check_inputs(points, table, table_index, levels);
  if (points.is_cuda()) {
#ifdef WITH_CUDA
    return forward_cuda(points, table, table_index, default_table, levels);
#else
    TORCH_CHECK(false, "hashgrid: this build has no CUDA kernels");
#endif
  }
  auto out = at::empty({points.size(0), levels.n_levels * levels.n_features}, points.options());
  dispatch(points, [&](auto scalar, auto dim) {
    using scalar_t = decltype(scalar);
    forward_cpu<scalar_t, decltype(dim)::value>(points, table, index_pointer(table_index), default_table, levels, out);
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& points, const at::Tensor& table,
                                 const at::Tensor& table_index, int64_t default_table, const at::Tensor& geometry,
                                 int64_t n_features, bool smoothstep, int64_t rows_per_table, bool need_points,
                                 bool need_table) {
  const Levels levels = make_levels(geometry, n_features, smoothstep, rows_per_table);
  check_inputs(points, table, table_index, levels);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.size(0) == points.size(0), "grad_out: expected (N, L * F)");
  if (points.is_cuda()) {
#ifdef WITH_CUDA
    return backward_cuda(grad_out, points, table, table_index, default_table, levels, need_points, need_table);
#else
    TORCH_CHECK(false, "hashgrid: this build has no CUDA kernels");
#endif
  }
  at::Tensor grad_points, grad_table;
  dispatch(points, [&](auto scalar, auto dim) {
    using scalar_t = decltype(scalar);
    constexpr int D = decltype(dim)::value;
    if (need_points) {
      grad_points = at::zeros_like(points);
      points_backward_cpu<scalar_t, D>(grad_out, points, table, index_pointer(table_index), default_table, levels,
                                       grad_points);
    }
    if (need_table) {
      grad_table = at::zeros_like(table);
      table_scatter_cpu<scalar_t, D>(grad_out, points, nullptr, index_pointer(table_index), default_table, levels,
                                     grad_table);
    }
  });
  return {grad_points, grad_table};
}

std::vector<at::Tensor> double_backward(const at::Tensor& gg_points, const at::Tensor& gg_table,
                                        const at::Tensor& grad_out, const at::Tensor& points, const at::Tensor& table,
                                        const at::Tensor& table_index, int64_t default_table,
                                        const at::Tensor& geometry, int64_t n_features, bool smoothstep,
                                        int64_t rows_per_table, bool need_grad_out, bool need_points,
                                        bool need_table) {
  // gg_points / gg_table may be empty (numel 0): that incoming gradient is zero.
  const Levels levels = make_levels(geometry, n_features, smoothstep, rows_per_table);
  check_inputs(points, table, table_index, levels);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.size(0) == points.size(0), "grad_out: expected (N, L * F)");
  TORCH_CHECK(gg_points.numel() == 0 || (gg_points.sizes() == points.sizes() && gg_points.is_contiguous()),
              "gg_points: expected the points' shape");
  TORCH_CHECK(gg_table.numel() == 0 || (gg_table.sizes() == table.sizes() && gg_table.is_contiguous()),
              "gg_table: expected the table's shape");
  if (points.is_cuda()) {
#ifdef WITH_CUDA
    return double_backward_cuda(gg_points, gg_table, grad_out, points, table, table_index, default_table, levels,
                                need_grad_out, need_points, need_table);
#else
    TORCH_CHECK(false, "hashgrid: this build has no CUDA kernels");
#endif
  }
  at::Tensor d_grad_out, d_points, d_table;
  dispatch(points, [&](auto scalar, auto dim) {
    using scalar_t = decltype(scalar);
    constexpr int D = decltype(dim)::value;
    const scalar_t* gg_x = gg_points.numel() > 0 ? gg_points.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gg_t = gg_table.numel() > 0 ? gg_table.data_ptr<scalar_t>() : nullptr;
    if (need_grad_out) d_grad_out = at::zeros_like(grad_out);
    if (need_points) d_points = at::zeros_like(points);
    if ((need_grad_out || need_points) && (gg_x != nullptr || gg_t != nullptr)) {
      points_double_backward_cpu<scalar_t, D>(
          grad_out, points, table, gg_t, gg_x, index_pointer(table_index), default_table, levels,
          need_grad_out ? d_grad_out.data_ptr<scalar_t>() : nullptr,
          need_points ? d_points.data_ptr<scalar_t>() : nullptr);
    }
    if (need_table) {
      d_table = at::zeros_like(table);
      if (gg_x != nullptr) {
        table_scatter_cpu<scalar_t, D>(grad_out, points, gg_x, index_pointer(table_index), default_table, levels,
                                       d_table);
      }
    }
  });
  return {d_grad_out, d_points, d_table};
}

}  // namespace hashgrid
