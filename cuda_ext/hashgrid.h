// Multiresolution hash-grid encoding: the per (point, level) arithmetic shared by the CPU
// (hashgrid_cpu.cpp) and CUDA (hashgrid_cuda.cu) kernels.
//
// It computes exactly the function of neuralfield_reg/encoders/torch.py (the reference), which is
// tiny-cuda-nn's HashGrid: p = x * scale_l + 1/2, cell = floor(p), t = p - cell (or smoothstep(t)),
// corner c of the cell is offset by bit k of c along axis k, its row is the dense index
// sum_k v_k R_l^k or the hash XOR_k v_k pi_k (uint32 arithmetic), modulo the level's table size,
// plus the level's row offset and the point's table offset. Output = sum_c W_c table[row_c].
//
// Derivatives, with w_k the (possibly smoothstepped) fraction and f_k = w_k or 1 - w_k by the
// corner's bit: W_c = prod_k f_k; dW_c/dx_j = f'_j prod_{k!=j} f_k; d2W_c/dx_i dx_j =
// f'_i f'_j prod_{k!=i,j} f_k (i != j) or f''_j prod_{k!=j} f_k (i == j). f' is +-w' and f'' is
// +-w'' (zero for linear interpolation).
//
// Which second-order terms each kernel supplies (the double backward receives gg_x, the gradient
// with respect to dL/dx, and optionally gg_table, the gradient with respect to dL/dtable):
//   d/d grad_out : sum_c (sum_j gg_x_j dW_c/dx_j) table[row_c] + sum_c W_c gg_table[row_c]
//   d/d table    : sum over points of (sum_j gg_x_j dW_c/dx_j) grad_out        (scatter)
//   d/d x_i      : sum_c (sum_j gg_x_j d2W_c/dx_i dx_j) <table[row_c], grad_out>
//                  + sum_c dW_c/dx_i <gg_table[row_c], grad_out>
// Third derivatives are not provided (the Python wrapper's double-backward Function raises when
// asked for them instead of returning zeros).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define HG_HD __host__ __device__ __forceinline__
#else
#define HG_HD inline
#endif

namespace hashgrid {

constexpr int kMaxLevels = 32;

// Geometry of every level, passed by value to kernels.
struct Levels {
  int n_levels;
  int n_features;
  bool smoothstep;
  int64_t rows_per_table;            // rows of one table (all levels)
  float scale[kMaxLevels];
  uint32_t resolution[kMaxLevels];
  uint32_t size[kMaxLevels];         // rows of the level
  uint32_t offset[kMaxLevels];       // first row of the level in its table
  bool hashed[kMaxLevels];
};

template <typename T>
HG_HD T floor_of(T value) {
#ifdef __CUDA_ARCH__
  return floor(value);
#else
  return std::floor(value);
#endif
}

// Everything about one point in one level: the 2^D corner rows and the per-axis weight factors.
template <typename scalar_t, int D>
struct Cell {
  static constexpr int kCorners = 1 << D;
  int64_t row[kCorners];     // absolute row in the flattened (tables * rows, features) table
  scalar_t w[D];             // weight of the upper corner along axis k
  scalar_t dw[D];            // d w_k / d x_k
  scalar_t ddw[D];           // d2 w_k / d x_k2

  Cell() = default;
  HG_HD Cell(const scalar_t* x, int level, const Levels& levels, int64_t table) {
    constexpr uint32_t primes[3] = {1u, 2654435761u, 805459861u};
    const scalar_t scale = static_cast<scalar_t>(levels.scale[level]);
    const bool hashed = levels.hashed[level];
    // Each axis adds (dense: sum) or XORs in (hashed) its lower or upper vertex's term; uint32
    // arithmetic wraps exactly as the reference's does.
    uint32_t lower_term[D], upper_term[D];
    uint32_t stride = 1;
    for (int k = 0; k < D; ++k) {
      const scalar_t p = x[k] * scale + static_cast<scalar_t>(0.5);
      const scalar_t lower = floor_of(p);
      const scalar_t t = p - lower;
      const uint32_t vertex = static_cast<uint32_t>(static_cast<int64_t>(lower));   // negative cells wrap
      const uint32_t factor = hashed ? primes[k] : stride;
      lower_term[k] = vertex * factor;
      upper_term[k] = (vertex + 1u) * factor;
      stride *= levels.resolution[level];
      if (levels.smoothstep) {
        w[k] = t * t * (static_cast<scalar_t>(3) - static_cast<scalar_t>(2) * t);
        dw[k] = static_cast<scalar_t>(6) * t * (static_cast<scalar_t>(1) - t) * scale;
        ddw[k] = (static_cast<scalar_t>(6) - static_cast<scalar_t>(12) * t) * scale * scale;
      } else {
        w[k] = t;
        dw[k] = scale;
        ddw[k] = 0;
      }
    }
    const uint32_t size = levels.size[level];
    const bool power_of_two = (size & (size - 1)) == 0;
    const int64_t base = table * levels.rows_per_table + levels.offset[level];
    for (int c = 0; c < kCorners; ++c) {
      uint32_t index = 0;
      for (int k = 0; k < D; ++k) {
        const uint32_t term = ((c >> k) & 1) ? upper_term[k] : lower_term[k];
        index = hashed ? (index ^ term) : (index + term);
      }
      // modulo the level's size: a mask for powers of two (every hashed level); an in-range
      // dense index needs no division.
      index = power_of_two ? (index & (size - 1)) : (index < size ? index : index % size);
      row[c] = base + index;
    }
  }

  HG_HD scalar_t factor(int c, int k) const { return ((c >> k) & 1) ? w[k] : static_cast<scalar_t>(1) - w[k]; }
  HG_HD scalar_t dfactor(int c, int k) const { return ((c >> k) & 1) ? dw[k] : -dw[k]; }
  HG_HD scalar_t ddfactor(int c, int k) const { return ((c >> k) & 1) ? ddw[k] : -ddw[k]; }

  // W_c
  HG_HD scalar_t weight(int c) const {
    scalar_t value = 1;
    for (int k = 0; k < D; ++k) value *= factor(c, k);
    return value;
  }

  // dW_c / dx_j for every j
  HG_HD void weight_gradient(int c, scalar_t out[D]) const {
    for (int j = 0; j < D; ++j) {
      scalar_t value = dfactor(c, j);
      for (int k = 0; k < D; ++k) {
        if (k != j) value *= factor(c, k);
      }
      out[j] = value;
    }
  }

  // d2W_c / dx_i dx_j for every i, j
  HG_HD void weight_hessian(int c, scalar_t out[D][D]) const {
    for (int i = 0; i < D; ++i) {
      for (int j = 0; j < D; ++j) {
        scalar_t value = (i == j) ? ddfactor(c, j) : dfactor(c, i) * dfactor(c, j);
        for (int k = 0; k < D; ++k) {
          if (k != i && k != j) value *= factor(c, k);
        }
        out[i][j] = value;
      }
    }
  }
};

// ---- per (point, level) kernels; `n_features` features per row, F <= 8 ----------------------

// out[f] = sum_c W_c table[row_c, f]
template <typename scalar_t, int D>
HG_HD void encode(const Cell<scalar_t, D>& cell, const scalar_t* table, int n_features, scalar_t* out) {
  for (int f = 0; f < n_features; ++f) out[f] = 0;
  for (int c = 0; c < Cell<scalar_t, D>::kCorners; ++c) {
    const scalar_t weight = cell.weight(c);
    const scalar_t* row = table + cell.row[c] * n_features;
    for (int f = 0; f < n_features; ++f) out[f] += weight * row[f];
  }
}

// grad_x[j] += sum_c dW_c/dx_j <table[row_c], grad_out>
template <typename scalar_t, int D>
HG_HD void points_backward(const Cell<scalar_t, D>& cell, const scalar_t* table, int n_features,
                           const scalar_t* grad_out, scalar_t* grad_x) {
  for (int c = 0; c < Cell<scalar_t, D>::kCorners; ++c) {
    const scalar_t* row = table + cell.row[c] * n_features;
    scalar_t dot = 0;
    for (int f = 0; f < n_features; ++f) dot += row[f] * grad_out[f];
    scalar_t gradient[D];
    cell.weight_gradient(c, gradient);
    for (int j = 0; j < D; ++j) grad_x[j] += gradient[j] * dot;
  }
}

// The per-point part of the double backward: d grad_out (this level's F slots) and d x.
template <typename scalar_t, int D>
HG_HD void points_double_backward(const Cell<scalar_t, D>& cell, const scalar_t* table, const scalar_t* gg_table,
                                  int n_features, const scalar_t* grad_out, const scalar_t* gg_x,
                                  scalar_t* d_grad_out, scalar_t* d_x) {
  for (int c = 0; c < Cell<scalar_t, D>::kCorners; ++c) {
    const scalar_t* row = table + cell.row[c] * n_features;
    scalar_t gradient[D];
    cell.weight_gradient(c, gradient);
    scalar_t directional = 0;                          // sum_j gg_x_j dW_c/dx_j
    if (gg_x != nullptr) {
      for (int j = 0; j < D; ++j) directional += gg_x[j] * gradient[j];
    }
    scalar_t dot = 0;                                  // <table[row_c], grad_out>
    for (int f = 0; f < n_features; ++f) dot += row[f] * grad_out[f];
    if (d_grad_out != nullptr) {
      for (int f = 0; f < n_features; ++f) d_grad_out[f] += directional * row[f];
    }
    if (d_x != nullptr && gg_x != nullptr) {
      scalar_t hessian[D][D];
      cell.weight_hessian(c, hessian);
      for (int i = 0; i < D; ++i) {
        scalar_t sum = 0;
        for (int j = 0; j < D; ++j) sum += hessian[i][j] * gg_x[j];
        d_x[i] += sum * dot;
      }
    }
    if (gg_table != nullptr) {
      const scalar_t* gg_row = gg_table + cell.row[c] * n_features;
      const scalar_t weight = cell.weight(c);
      scalar_t gg_dot = 0;
      for (int f = 0; f < n_features; ++f) gg_dot += gg_row[f] * grad_out[f];
      if (d_grad_out != nullptr) {
        for (int f = 0; f < n_features; ++f) d_grad_out[f] += weight * gg_row[f];
      }
      if (d_x != nullptr) {
        for (int i = 0; i < D; ++i) d_x[i] += gradient[i] * gg_dot;
      }
    }
  }
}

}  // namespace hashgrid
