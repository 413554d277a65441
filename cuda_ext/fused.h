// Building blocks of the fused CPU kernels (fused_cpu.cpp, similarity_cpu.cpp): the stacked MLPs
// of all fields, the encoding with its derivatives (jets), small vectorised matrix products, the
// MLP's forward and reverse passes, and the level-parallel table scatter.
//
// Jets. The penalty needs Jacobians of the maps. Each evaluation carries C = 1 + D channels: the
// value and its derivative along each axis (forward mode). A linear layer acts on every channel
// (the bias only on the value); a ReLU multiplies every channel by the value's mask h > 0 (ReLU's
// second derivative is zero, so the Jacobian depends on the activations only through the masks).
// Buffers are channel-major: channel c of a width-n layer is n contiguous numbers. Plain points
// are jets with C = 1.
//
// Reverse mode through the encoding jet (level weight w_l, clamp mask m_j = 1 if 0 <= x_j <= 1):
//   e[lf]    = w_l sum_c W_c row_c[f]             E_j[lf] = w_l m_j sum_c dW_c/dx_j row_c[f]
//   table    : row_c[f] += w_l (W_c adj_e[lf] + sum_j m_j dW_c/dx_j adj_E_j[lf])       (scatter)
//   point x_i: += w_l m_i sum_c (dW_c/dx_i <row_c, adj_e> + sum_j m_j d2W_c/dx_i dx_j <row_c, adj_E_j>)
// Table scatters are collected per evaluation and applied in a second pass that is parallel over
// levels (their rows never overlap), as in hashgrid_cpu.cpp, so no atomics are needed.
#pragma once

#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "hashgrid.h"

namespace hashgrid {

Levels make_levels(const at::Tensor& geometry, int64_t n_features, bool smoothstep, int64_t rows_per_table);

namespace fused {

constexpr int64_t kGrain = 64;

// Scratch buffers reused from call to call by the calling thread (they only grow). Allocating
// megabytes afresh on every call cost page faults, which the threads of the next parallel loop then
// took in turn (10-20 % of the similarity kernel on 2 cores). `slot` tells apart the buffers of one
// type that are alive at the same time; contents are left from earlier calls (write before read).
template <typename T>
T* scratch(int slot, int64_t n) {
  static thread_local std::array<std::vector<T>, 8> buffers;
  std::vector<T>& buffer = buffers.at(slot);
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// The stacked MLPs of all fields: layer k of field t has weight (in_k, out_k) and bias (out_k).
template <typename scalar_t>
struct Mlp {
  int n_layers = 0;
  std::vector<int64_t> width;                 // width[0] = L * F, width[n_layers] = D
  std::vector<const scalar_t*> weight, bias;
  std::vector<int64_t> weight_offset, bias_offset;   // offsets of layer k in one field's gradient
  int64_t weight_count = 0, bias_count = 0;         // numbers per field
  scalar_t scale = 1;

  // Every field's layers as (out_k, in_k), at the same offsets as the weights' gradient: the
  // reverse mode and narrow layers (matvec_narrow) read these.
  std::vector<scalar_t> transposed;

  const scalar_t* W(int k, int64_t t) const { return weight[k] + t * width[k] * width[k + 1]; }
  const scalar_t* WT(int k, int64_t t) const { return transposed.data() + t * weight_count + weight_offset[k]; }
  const scalar_t* b(int k, int64_t t) const { return bias[k] + t * width[k + 1]; }
  int64_t max_width() const { return *std::max_element(width.begin(), width.end()); }
  int64_t activation_count() const {          // sum of the widths of every layer's input
    int64_t total = 0;
    for (int k = 0; k < n_layers; ++k) total += width[k];
    return total;
  }
};

template <typename scalar_t>
Mlp<scalar_t> make_mlp(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                       int64_t n_fields, int64_t n_inputs, int64_t dim, double scale) {
  TORCH_CHECK(!weights.empty() && weights.size() == biases.size() && weights.size() <= 64,
              "weights and biases: one of each per layer, at most 64 layers");
  Mlp<scalar_t> mlp;
  mlp.n_layers = static_cast<int>(weights.size());
  mlp.width.push_back(n_inputs);
  mlp.scale = static_cast<scalar_t>(scale);
  for (size_t k = 0; k < weights.size(); ++k) {
    const auto& w = weights[k];
    const auto& b = biases[k];
    TORCH_CHECK(w.dim() == 3 && w.size(0) == n_fields && w.size(1) == mlp.width.back() && w.is_contiguous() &&
                    w.device().is_cpu(),
                "weights[", k, "]: expected a contiguous CPU tensor (fields, ", mlp.width.back(), ", out)");
    TORCH_CHECK(b.dim() == 2 && b.size(0) == n_fields && b.size(1) == w.size(2) && b.is_contiguous(),
                "biases[", k, "]: expected a contiguous tensor (fields, out)");
    TORCH_CHECK(w.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value &&
                    b.scalar_type() == w.scalar_type(),
                "weights and biases: expected the points' dtype");
    mlp.weight_offset.push_back(mlp.weight_count);
    mlp.bias_offset.push_back(mlp.bias_count);
    mlp.weight_count += w.size(1) * w.size(2);
    mlp.bias_count += w.size(2);
    mlp.width.push_back(w.size(2));
    mlp.weight.push_back(w.data_ptr<scalar_t>());
    mlp.bias.push_back(b.data_ptr<scalar_t>());
  }
  TORCH_CHECK(mlp.width.back() == dim, "weights: the last layer must output one number per axis");
  mlp.transposed.resize(n_fields * mlp.weight_count);
  for (int k = 0; k < mlp.n_layers; ++k) {
    const int64_t n_in = mlp.width[k], n_out = mlp.width[k + 1];
    for (int64_t t = 0; t < n_fields; ++t) {
      const scalar_t* src = mlp.W(k, t);
      scalar_t* dst = mlp.transposed.data() + t * mlp.weight_count + mlp.weight_offset[k];
      for (int64_t i = 0; i < n_in; ++i) {
        for (int64_t o = 0; o < n_out; ++o) dst[o * n_in + i] = src[i * n_out + o];
      }
    }
  }
  return mlp;
}

// Per-thread gradient accumulators of the MLP weights and biases of every field.
template <typename scalar_t>
struct MlpGradients {
  std::vector<std::vector<scalar_t>> weight, bias;   // [thread] -> (fields, per-field count)

  MlpGradients(int threads, int64_t n_fields, const Mlp<scalar_t>& mlp)
      : weight(threads, std::vector<scalar_t>(n_fields * mlp.weight_count, 0)),
        bias(threads, std::vector<scalar_t>(n_fields * mlp.bias_count, 0)) {}

  // Sums the threads' parts into tensors shaped like the parameters.
  void reduce(const Mlp<scalar_t>& mlp, int64_t n_fields, const at::TensorOptions& options,
              std::vector<at::Tensor>& out) const {
    for (int k = 0; k < mlp.n_layers; ++k) {
      at::Tensor gw = at::zeros({n_fields, mlp.width[k], mlp.width[k + 1]}, options);
      at::Tensor gb = at::zeros({n_fields, mlp.width[k + 1]}, options);
      add_layer(mlp, n_fields, k, gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>());
      out.push_back(gw);
      out.push_back(gb);
    }
  }

  // Adds the threads' parts to targets: dW, db of every layer in turn (checked by the caller).
  void add_to(const Mlp<scalar_t>& mlp, int64_t n_fields, const at::Tensor* targets) const {
    for (int k = 0; k < mlp.n_layers; ++k) {
      add_layer(mlp, n_fields, k, targets[2 * k].data_ptr<scalar_t>(), targets[2 * k + 1].data_ptr<scalar_t>());
    }
  }

 private:
  // pw (fields, in_k, out_k) and pb (fields, out_k) += the threads' parts of layer k.
  void add_layer(const Mlp<scalar_t>& mlp, int64_t n_fields, int k, scalar_t* pw, scalar_t* pb) const {
    const int64_t nw = mlp.width[k] * mlp.width[k + 1], nb = mlp.width[k + 1];
    for (const auto& part : weight) {
      for (int64_t t = 0; t < n_fields; ++t) {
        const scalar_t* src = part.data() + t * mlp.weight_count + mlp.weight_offset[k];
        for (int64_t i = 0; i < nw; ++i) pw[t * nw + i] += src[i];
      }
    }
    for (const auto& part : bias) {
      for (int64_t t = 0; t < n_fields; ++t) {
        const scalar_t* src = part.data() + t * mlp.bias_count + mlp.bias_offset[k];
        for (int64_t i = 0; i < nb; ++i) pb[t * nb + i] += src[i];
      }
    }
  }
};

// A point's clamped position and clamp mask.
template <typename scalar_t, int D>
struct Clamped {
  scalar_t x[D];
  scalar_t mask[D];
  Clamped() = default;
  explicit Clamped(const scalar_t* point) {
    for (int k = 0; k < D; ++k) {
      const scalar_t v = point[k];
      mask[k] = (v >= 0 && v <= 1) ? scalar_t(1) : scalar_t(0);
      x[k] = v < 0 ? scalar_t(0) : (v > 1 ? scalar_t(1) : v);
    }
  }
};

// One corner of one level of an evaluation, kept for the table scatter: its row and the
// coefficient of each of the C jet channels (w_l W_c, then w_l m_j dW_c/dx_j).
template <typename scalar_t, int C>
struct CornerRecord {
  int32_t row;                 // < 2^31 (checked by check_common)
  scalar_t coefficient[C];
};

// cells (L entries): the cell of point p in every active level of field t's table, each corner's
// row prefetched. Finding a block's cells before encoding it (encode_jet) lets the table reads of
// the block overlap: in 3D the tables (megabytes) live in the L3 cache or memory, not in L2.
template <typename scalar_t, int D>
void find_cells(const Clamped<scalar_t, D>& p, int64_t t, const Levels& levels, const scalar_t* table,
                const scalar_t* level_weight, Cell<scalar_t, D>* cells) {
  for (int l = 0; l < levels.n_levels; ++l) {
    if (level_weight[l] == 0) continue;
    cells[l] = Cell<scalar_t, D>(p.x, l, levels, t);
    for (int c = 0; c < Cell<scalar_t, D>::kCorners; ++c) {
      __builtin_prefetch(table + cells[l].row[c] * levels.n_features);
    }
  }
}

// out[ch * LF + f] = sum over the K corners c of coefficient[c][ch] * row_c[f], with F features per
// row (kF: F known at compile time, or 0), as scatter_level does: every sum is formed in registers
// before it is stored.
template <typename scalar_t, int K, int C, int kF>
inline void weighted_rows(const scalar_t (&coefficient)[K][C], const int64_t* rows, const scalar_t* table, int F,
                          int LF, scalar_t* out) {
  const int n = kF > 0 ? kF : F;
  scalar_t sum[C][kF > 0 ? kF : 8] = {};       // F <= 8 (make_levels checks)
  for (int c = 0; c < K; ++c) {
    const scalar_t* row = table + rows[c] * n;
    for (int ch = 0; ch < C; ++ch) {
      for (int f = 0; f < n; ++f) sum[ch][f] += coefficient[c][ch] * row[f];
    }
  }
  for (int ch = 0; ch < C; ++ch) {
    for (int f = 0; f < n; ++f) out[ch * LF + f] = sum[ch][f];
  }
}

// jet (C x L*F, channel-major, zeroed here): the encoding of point p, whose cells find_cells found,
// and, for C = 1 + D, its derivatives. records (optional): every corner's row and coefficients for
// scatter_records, level l's 2^D corners at records + l * level_stride (records are kept
// level-major).
template <typename scalar_t, int D, int C>
void encode_jet(const Clamped<scalar_t, D>& p, const Cell<scalar_t, D>* cells, const Levels& levels,
                const scalar_t* table, const scalar_t* level_weight, scalar_t* jet, CornerRecord<scalar_t, C>* records,
                int64_t level_stride) {
  constexpr int K = Cell<scalar_t, D>::kCorners;
  const int F = levels.n_features, LF = levels.n_levels * F;
  std::fill(jet, jet + C * LF, scalar_t(0));
  for (int l = 0; l < levels.n_levels; ++l) {
    const scalar_t lw = level_weight[l];
    if (lw == 0) continue;                     // scatter_records skips these levels too
    const Cell<scalar_t, D>& cell = cells[l];
    // coefficient[c][ch]: w_l W_c, then w_l m_j dW_c/dx_j.
    scalar_t coefficient[K][C];
    for (int c = 0; c < K; ++c) {
      coefficient[c][0] = lw * cell.weight(c);
      if (C > 1) {
        scalar_t gradient[D];
        cell.weight_gradient(c, gradient);
        for (int j = 0; j < D && 1 + j < C; ++j) coefficient[c][1 + j] = lw * p.mask[j] * gradient[j];
      }
    }
    scalar_t* out = jet + l * F;
    if (F == 2) {                              // 2D's: the feature loops unrolled
      weighted_rows<scalar_t, K, C, 2>(coefficient, cell.row, table, F, LF, out);
    } else if (F == 4) {                       // the 3D preset's
      weighted_rows<scalar_t, K, C, 4>(coefficient, cell.row, table, F, LF, out);
    } else {
      weighted_rows<scalar_t, K, C, 0>(coefficient, cell.row, table, F, LF, out);
    }
    if (records != nullptr) {
      for (int c = 0; c < K; ++c) {
        CornerRecord<scalar_t, C>& record = records[l * level_stride + c];
        record.row = static_cast<int32_t>(cell.row[c]);
        for (int ch = 0; ch < C; ++ch) record.coefficient[ch] = coefficient[c][ch];
      }
    }
  }
}

// point_grad[i] += d/dx_i of <adj, jet(x)> (through the encoding only; see the header comment),
// with the point's cells (find_cells).
template <typename scalar_t, int D>
void encode_jet_point_grad(const Clamped<scalar_t, D>& p, const Cell<scalar_t, D>* cells, const Levels& levels,
                           const scalar_t* table, const scalar_t* level_weight, int C, const scalar_t* adj,
                           scalar_t* point_grad) {
  const int F = levels.n_features, LF = levels.n_levels * F;
  scalar_t sums[D] = {};                     // in registers (point_grad might alias the inputs)
  for (int l = 0; l < levels.n_levels; ++l) {
    const scalar_t lw = level_weight[l];
    if (lw == 0) continue;
    const Cell<scalar_t, D>& cell = cells[l];
    for (int c = 0; c < Cell<scalar_t, D>::kCorners; ++c) {
      const scalar_t* row = table + cell.row[c] * F;
      scalar_t dots[1 + D];
      for (int ch = 0; ch < C; ++ch) {
        const scalar_t* a = adj + ch * LF + l * F;
        scalar_t dot = 0;
        if (F == 2) {
          dot = row[0] * a[0] + row[1] * a[1];
        } else {
          for (int f = 0; f < F; ++f) dot += row[f] * a[f];
        }
        dots[ch] = dot;
      }
      scalar_t gradient[D];
      cell.weight_gradient(c, gradient);
      scalar_t hessian[D][D];
      if (C > 1) cell.weight_hessian(c, hessian);
      for (int i = 0; i < D; ++i) {
        scalar_t sum = gradient[i] * dots[0];
        if (C > 1) {
          for (int j = 0; j < D; ++j) sum += p.mask[j] * hessian[i][j] * dots[1 + j];
        }
        sums[i] += lw * p.mask[i] * sum;
      }
    }
  }
  for (int i = 0; i < D; ++i) point_grad[i] += sums[i];
}

// 32-byte vectors of GCC/Clang's vector extension (AVX on x86, two NEON registers on ARM).
template <typename scalar_t>
struct Simd {
  typedef scalar_t type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / static_cast<int>(sizeof(scalar_t));
  static type load(const scalar_t* p) {
    type v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(scalar_t* p, type v) { std::memcpy(p, &v, sizeof v); }
  // a in every lane (a - 0 is a for every a, -0 included, so this is one broadcast; `type{} + a`
  // is not: +0 + -0 is +0, and the compiler kept an extra scalar add per splat).
  static type splat(scalar_t a) { return a - type{}; }
};

// out[c][o] += sum_i in[c][i] W[i, o] for C vectors at once, W row-major (n_in, n_out): each row
// of W is loaded once for all C vectors, and blocks of outputs are summed in registers.
template <typename scalar_t, int C>
inline void matvec_multi(scalar_t* const* in, int64_t n_in, const scalar_t* __restrict__ W, int64_t n_out,
                         scalar_t* const* out) {
  using S = Simd<scalar_t>;
  using vec = typename S::type;
  constexpr int V = S::kLanes;
  const scalar_t* source[C];
  for (int c = 0; c < C; ++c) source[c] = in[c];
  int64_t o0 = 0;
  // Two output vectors per pass when their 2 C accumulators, two weight vectors and a broadcast
  // fit in the 16 vector registers of AVX2 (more spilled them to the stack: C = 8 ran 2x slower).
  constexpr bool kTwoBlocks = 2 * C + 3 <= 16;
  for (; kTwoBlocks && o0 + 2 * V <= n_out; o0 += 2 * V) {
    vec acc0[C], acc1[C];
    for (int c = 0; c < C; ++c) {
      acc0[c] = S::load(out[c] + o0);
      acc1[c] = S::load(out[c] + o0 + V);
    }
    for (int64_t i = 0; i < n_in; ++i) {
      const vec w0 = S::load(W + i * n_out + o0), w1 = S::load(W + i * n_out + o0 + V);
      for (int c = 0; c < C; ++c) {
        const vec a = S::splat(source[c][i]);
        acc0[c] += a * w0;
        acc1[c] += a * w1;
      }
    }
    for (int c = 0; c < C; ++c) {
      S::store(out[c] + o0, acc0[c]);
      S::store(out[c] + o0 + V, acc1[c]);
    }
  }
  for (; o0 + V <= n_out; o0 += V) {
    vec acc[C];
    for (int c = 0; c < C; ++c) acc[c] = S::load(out[c] + o0);
    for (int64_t i = 0; i < n_in; ++i) {
      const vec w = S::load(W + i * n_out + o0);
      for (int c = 0; c < C; ++c) acc[c] += S::splat(source[c][i]) * w;
    }
    for (int c = 0; c < C; ++c) S::store(out[c] + o0, acc[c]);
  }
  for (; o0 < n_out; ++o0) {
    for (int c = 0; c < C; ++c) {
      scalar_t acc = out[c][o0];
      for (int64_t i = 0; i < n_in; ++i) acc += source[c][i] * W[i * n_out + o0];
      out[c][o0] = acc;
    }
  }
}

// values[i] = 0 where mask[i] <= 0, else unchanged (a ReLU's mask; values may be mask itself).
template <typename scalar_t>
inline void relu_mask(scalar_t* values, const scalar_t* mask, int64_t n) {
  using S = Simd<scalar_t>;
  using vec = typename S::type;
  constexpr int V = S::kLanes;
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const vec m = S::load(mask + i);
    const vec v = S::load(values + i);
    S::store(values + i, m > 0 ? v : vec{});
  }
  for (; i < n; ++i) values[i] = mask[i] > 0 ? values[i] : scalar_t(0);
}

// out[c][o] += <in[c], WT[o]> for C vectors at once, WT row-major (n_out, n_in): for layers
// narrower than a vector (the last layer's D outputs), where matvec_multi would fall back to
// scalar chains.
template <typename scalar_t, int C>
inline void matvec_narrow(scalar_t* const* in, int64_t n_in, const scalar_t* __restrict__ WT, int64_t n_out,
                          scalar_t* const* out) {
  using S = Simd<scalar_t>;
  using vec = typename S::type;
  constexpr int V = S::kLanes;
  for (int64_t o = 0; o < n_out; ++o) {
    const scalar_t* w = WT + o * n_in;
    vec acc[C];
    for (int c = 0; c < C; ++c) acc[c] = vec{};
    int64_t i = 0;
    for (; i + V <= n_in; i += V) {
      const vec wv = S::load(w + i);
      for (int c = 0; c < C; ++c) acc[c] += S::load(in[c] + i) * wv;
    }
    for (int c = 0; c < C; ++c) {
      scalar_t sum = 0;
      for (int lane = 0; lane < V; ++lane) sum += acc[c][lane];
      for (int64_t j = i; j < n_in; ++j) sum += in[c][j] * w[j];
      out[c][o] += sum;
    }
  }
}

// gW[i, o] += sum_{c >= kFirst} in[c][i] adj[c][o]: one layer's weight gradient (n_in x n_out,
// row-major) for C vectors. Each block of V outputs keeps the C adjoint vectors in registers while
// it runs down the rows (two partial sums per row shorten the FMA chain). With skip_zero_rows, rows
// with in[0][i] == 0 are skipped (a jet's ReLU zeroes every channel there). kFirst is a template
// argument so that the loop over channels unrolls (with a run-time start it stayed a loop that
// reloaded each channel's pointer: 12 instructions per multiply-add, the MLP backward's hot spot).
template <typename scalar_t, int C, int kFirst>
inline void weight_gradient_from(scalar_t* const* in, scalar_t* const* adj, int64_t n_in, int64_t n_out,
                                 bool skip_zero_rows, scalar_t* __restrict__ gW) {
  using S = Simd<scalar_t>;
  using vec = typename S::type;
  constexpr int V = S::kLanes;
  const scalar_t* source[C];
  for (int c = 0; c < C; ++c) source[c] = in[c];
  int64_t o = 0;
  for (; o + V <= n_out; o += V) {
    vec a[C];
    for (int c = kFirst; c < C; ++c) a[c] = S::load(adj[c] + o);
    for (int64_t i = 0; i < n_in; ++i) {
      if (skip_zero_rows && source[0][i] == 0) continue;
      vec sum0 = S::load(gW + i * n_out + o), sum1 = vec{};
      for (int c = kFirst; c < C; ++c) {
        if ((c - kFirst) % 2 == 0) {
          sum0 += S::splat(source[c][i]) * a[c];
        } else {
          sum1 += S::splat(source[c][i]) * a[c];
        }
      }
      S::store(gW + i * n_out + o, sum0 + sum1);
    }
  }
  for (; o < n_out; ++o) {
    for (int64_t i = 0; i < n_in; ++i) {
      scalar_t sum = 0;
      for (int c = kFirst; c < C; ++c) sum += source[c][i] * adj[c][o];
      gW[i * n_out + o] += sum;
    }
  }
}

// weight_gradient_from for the first channel with a nonzero adjoint: 0, or 1 (a jet whose value
// channel has none; mlp_backward's callers pass nothing else).
template <typename scalar_t, int C>
inline void weight_gradient(scalar_t* const* in, int first_channel, scalar_t* const* adj, int64_t n_in,
                            int64_t n_out, bool skip_zero_rows, scalar_t* gW) {
  if (first_channel == 0) {
    weight_gradient_from<scalar_t, C, 0>(in, adj, n_in, n_out, skip_zero_rows, gW);
  } else if constexpr (C > 1) {
    weight_gradient_from<scalar_t, C, 1>(in, adj, n_in, n_out, skip_zero_rows, gW);
  }                                            // (one vector from channel 1: nothing to add)
}

// C vectors through the MLP together: at[k][c] is vector c's input of layer k, at[n_layers][c] its
// output (D numbers). Two kinds: a jet (kJet: channel 0 the value, the others its derivatives;
// the bias applies to the value and every channel takes the value's ReLU mask), or C independent
// points of one field (each with its own bias and mask).
template <typename scalar_t, int C>
struct Vectors {
  scalar_t* at[65][C];
};

// A jet's buffer acts (channel-major per layer: layer k holds C x width[k]) and its output (C x D).
template <typename scalar_t, int C>
Vectors<scalar_t, C> jet_vectors(const Mlp<scalar_t>& mlp, scalar_t* acts, scalar_t* out) {
  Vectors<scalar_t, C> v;
  int64_t offset = 0;
  for (int k = 0; k < mlp.n_layers; ++k) {
    for (int c = 0; c < C; ++c) v.at[k][c] = acts + offset + c * mlp.width[k];
    offset += C * mlp.width[k];
  }
  for (int c = 0; c < C; ++c) v.at[mlp.n_layers][c] = out + c * mlp.width[mlp.n_layers];
  return v;
}

// Points n .. n + C - 1 with A numbers of layer inputs each (acts) and D outputs each (out; may be
// null for the backward pass, which reads only the inputs).
template <typename scalar_t, int C>
Vectors<scalar_t, C> point_vectors(const Mlp<scalar_t>& mlp, scalar_t* acts, int64_t A, scalar_t* out) {
  Vectors<scalar_t, C> v;
  int64_t offset = 0;
  for (int k = 0; k < mlp.n_layers; ++k) {
    for (int c = 0; c < C; ++c) v.at[k][c] = acts + c * A + offset;
    offset += mlp.width[k];
  }
  for (int c = 0; c < C; ++c) v.at[mlp.n_layers][c] = out == nullptr ? nullptr : out + c * mlp.width[mlp.n_layers];
  return v;
}

// Forward pass; the layer-0 inputs (encodings) are already in place.
template <typename scalar_t, int C, bool kJet>
void mlp_forward(const Mlp<scalar_t>& mlp, int64_t t, const Vectors<scalar_t, C>& v) {
  for (int k = 0; k < mlp.n_layers; ++k) {
    const int64_t n_out = mlp.width[k + 1];
    const bool last = k == mlp.n_layers - 1;
    const scalar_t* b = mlp.b(k, t);
    scalar_t* const* next = v.at[k + 1];
    for (int c = 0; c < C; ++c) {
      if (kJet && c > 0) {
        std::fill(next[c], next[c] + n_out, scalar_t(0));
      } else {
        std::copy(b, b + n_out, next[c]);
      }
    }
    if (n_out < Simd<scalar_t>::kLanes) {
      matvec_narrow<scalar_t, C>(v.at[k], mlp.width[k], mlp.WT(k, t), n_out, next);
    } else {
      matvec_multi<scalar_t, C>(v.at[k], mlp.width[k], mlp.W(k, t), n_out, next);
    }
    if (last) {
      for (int c = 0; c < C; ++c) {
        for (int64_t o = 0; o < n_out; ++o) next[c][o] *= mlp.scale;
      }
    } else if (kJet) {
      for (int c = C - 1; c >= 0; --c) relu_mask(next[c], next[0], n_out);   // channel 0 (the mask) last
    } else {
      for (int c = 0; c < C; ++c) relu_mask(next[c], next[c], n_out);
    }
  }
}

// Reverse mode through mlp_forward: adj_out[c] (D numbers each, overwritten) is dL/d(output of
// vector c); accumulates the weight and bias gradients of field t and writes dL/d(layer-0 input)
// to adj_in[c]. A jet's channels below first_channel have zero adjoint (their dW terms are
// skipped; zero stays zero through the rest). work: 2 C max_width numbers.
template <typename scalar_t, int C, bool kJet>
void mlp_backward(const Mlp<scalar_t>& mlp, int64_t t, int first_channel, const Vectors<scalar_t, C>& v,
                  scalar_t* const* adj_out, scalar_t* work, scalar_t* grad_weight, scalar_t* grad_bias,
                  scalar_t* const* adj_in) {
  const int64_t max_width = mlp.max_width();
  scalar_t* adj[C];
  scalar_t* spare[C];
  scalar_t* spare2[C];
  for (int c = 0; c < C; ++c) {
    adj[c] = adj_out[c];
    spare[c] = work + c * max_width;
    spare2[c] = work + (C + c) * max_width;
  }
  for (int k = mlp.n_layers - 1; k >= 0; --k) {
    const int64_t n_in = mlp.width[k], n_out = mlp.width[k + 1];
    scalar_t* const* in = v.at[k];
    if (k == mlp.n_layers - 1) {
      for (int c = first_channel; c < C; ++c) {
        for (int64_t o = 0; o < n_out; ++o) adj[c][o] *= mlp.scale;
      }
    }
    scalar_t* __restrict__ gW = grad_weight + t * mlp.weight_count + mlp.weight_offset[k];
    scalar_t* __restrict__ gb = grad_bias + t * mlp.bias_count + mlp.bias_offset[k];
    // The bias acts on values only: every point of a block, a jet's channel 0.
    const int bias_channels = kJet ? (first_channel == 0 ? 1 : 0) : C;
    for (int c = 0; c < bias_channels; ++c) {
      for (int64_t o = 0; o < n_out; ++o) gb[o] += adj[c][o];
    }
    // dW[i, o] += sum_c in[c][i] adj[c][o]; a jet's ReLU zeroes all channels of an input
    // together, so those rows are skipped.
    weight_gradient<scalar_t, C>(in, first_channel, adj, n_in, n_out, kJet && k > 0, gW);
    // dL/d(input of layer k) = W adj, masked by the ReLU that produced that input.
    scalar_t* dst[C];
    for (int c = 0; c < C; ++c) {
      dst[c] = k == 0 ? adj_in[c] : spare[c];
      std::fill(dst[c], dst[c] + n_in, scalar_t(0));
    }
    matvec_multi<scalar_t, C>(adj, n_out, mlp.WT(k, t), n_in, dst);
    if (k > 0) {
      for (int c = 0; c < C; ++c) relu_mask(dst[c], in[kJet ? 0 : c], n_in);
      for (int c = 0; c < C; ++c) {
        adj[c] = spare[c];
        std::swap(spare[c], spare2[c]);
      }
    }
  }
}

// scatter_level prefetches the rows of evaluation r + kScatterAhead while it adds evaluation r's: in 3D
// the gradient table (megabytes) is mostly out of cache and each evaluation's rows lie far apart.
constexpr int64_t kScatterAhead = 4;

// One level of scatter_records: grad_table[row] += sum over channels of coefficient * adj for its
// R evaluations' corners, with F features per row (kF: F known at compile time, or 0).
template <typename scalar_t, int D, int C, int kF>
inline void scatter_level(const CornerRecord<scalar_t, C>* records, int64_t R, const scalar_t* adj, int F,
                          scalar_t* grad_table) {
  constexpr int K = Cell<scalar_t, D>::kCorners;
  const int n = kF > 0 ? kF : F;
  for (int64_t r = 0; r < R; ++r) {
    const CornerRecord<scalar_t, C>* corners = records + r * K;
    if (r + kScatterAhead < R) {
      for (int c = 0; c < K; ++c) {
        __builtin_prefetch(grad_table + static_cast<int64_t>(corners[kScatterAhead * K + c].row) * n, 1);
      }
    }
    const scalar_t* a = adj + r * C * n;
    for (int c = 0; c < K; ++c) {
      // Every feature's sum is formed before the row is written (a store between them made the
      // compiler reload the record and adjoint: the general loop ran 3x slower with F = 2).
      scalar_t sum[8] = {};                    // F <= 8 (make_levels checks)
      for (int ch = 0; ch < C; ++ch) {
        for (int f = 0; f < n; ++f) sum[f] += corners[c].coefficient[ch] * a[ch * n + f];
      }
      scalar_t* row = grad_table + static_cast<int64_t>(corners[c].row) * n;
      for (int f = 0; f < n; ++f) row[f] += sum[f];
    }
  }
}

// grad_table[row] += sum over channels of coefficient * adj for R evaluations, all level-major:
// records (L x R x 2^D) and adjoints adj (L x R x C x F, dL/d(jet) of each level's F features).
// Parallel over levels, whose rows never overlap, so no atomics are needed; each level reads its
// records and adjoints contiguously.
template <typename scalar_t, int D, int C>
void scatter_records(const CornerRecord<scalar_t, C>* records, int64_t R, const scalar_t* adj, const Levels& levels,
                     const scalar_t* level_weight, scalar_t* grad_table) {
  constexpr int K = Cell<scalar_t, D>::kCorners;
  const int F = levels.n_features;
  // Only the active levels are shared out, so that early in the coarse-to-fine ramp (two levels
  // on) both threads still get one.
  std::vector<int64_t> active;
  for (int64_t l = 0; l < levels.n_levels; ++l) {
    if (level_weight[l] != 0) active.push_back(l);
  }
  at::parallel_for(0, static_cast<int64_t>(active.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = active[i];
      const CornerRecord<scalar_t, C>* level_records = records + l * R * K;
      const scalar_t* level_adj = adj + l * R * C * F;
      if (F == 2) {                            // the 2D presets': the feature loops unrolled
        scatter_level<scalar_t, D, C, 2>(level_records, R, level_adj, F, grad_table);
      } else if (F == 4) {                     // the 3D preset's
        scatter_level<scalar_t, D, C, 4>(level_records, R, level_adj, F, grad_table);
      } else {
        scatter_level<scalar_t, D, C, 0>(level_records, R, level_adj, F, grad_table);
      }
    }
  });
}

// Copies one evaluation's jet adjoint (channel-major, C x L*F) into the level-major adjoints of
// R evaluations (L x R x C x F) at evaluation r.
template <typename scalar_t, int C>
inline void to_level_major(const scalar_t* adj, int64_t r, int64_t R, int L, int F, scalar_t* out) {
  for (int l = 0; l < L; ++l) {
    scalar_t* dst = out + (l * R + r) * C * F;
    for (int ch = 0; ch < C; ++ch) {
      for (int f = 0; f < F; ++f) dst[ch * F + f] = adj[ch * L * F + l * F + f];
    }
  }
}

// Points per block of the fields' MLP (points of one field evaluated together).
constexpr int kPointBlock = 8;

// How many points from n on go in one block: kPointBlock when they all use field t[n], else 1.
inline int64_t block_of_one_field(const int64_t* t, int64_t n, int64_t end) {
  if (n + kPointBlock > end) return 1;
  for (int c = 1; c < kPointBlock; ++c) {
    if (t[n + c] != t[n]) return 1;
  }
  return kPointBlock;
}

// Pointers to the C channels of a channel-major buffer with `stride` numbers per channel.
template <typename scalar_t, int C>
std::array<scalar_t*, C> channels(scalar_t* buffer, int64_t stride) {
  std::array<scalar_t*, C> out;
  for (int c = 0; c < C; ++c) out[c] = buffer + c * stride;
  return out;
}

struct Common {
  Levels levels;
  int64_t n_fields;
};

inline Common check_common(const at::Tensor& table, const at::Tensor& geometry, int64_t n_features, bool smoothstep,
                           int64_t rows_per_table, const at::Tensor& level_weight) {
  Common common{make_levels(geometry, n_features, smoothstep, rows_per_table), 0};
  TORCH_CHECK(table.device().is_cpu() && table.is_contiguous() && table.dim() == 2 && table.size(1) == n_features,
              "table: expected a contiguous CPU tensor (rows, n_features)");
  TORCH_CHECK(table.size(0) % rows_per_table == 0, "table: rows must be a multiple of rows_per_table");
  TORCH_CHECK(level_weight.dim() == 1 && level_weight.size(0) == common.levels.n_levels &&
                  level_weight.scalar_type() == table.scalar_type() && level_weight.is_contiguous(),
              "level_weight: expected (n_levels,) in the table's dtype");
  common.n_fields = table.size(0) / rows_per_table;
  TORCH_CHECK(table.size(0) < (int64_t(1) << 31), "table: the fused kernels index at most 2^31 rows");
  return common;
}

template <typename Function>
void dispatch_dim(const at::Tensor& table, int64_t dim, Function&& function) {
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "fused", [&] {
    if (dim == 2) {
      function(scalar_t(0), std::integral_constant<int, 2>());
    } else {
      function(scalar_t(0), std::integral_constant<int, 3>());
    }
  });
}

// matrices (T, D, D) and offsets (T, D): the fixed affine parts of T fields, in the table's dtype.
inline void check_affine_parts(const at::Tensor& matrices, const at::Tensor& offsets, int64_t T, int64_t dim,
                               at::ScalarType dtype) {
  TORCH_CHECK(matrices.sizes() == at::IntArrayRef({T, dim, dim}) && matrices.is_contiguous() &&
                  matrices.scalar_type() == dtype,
              "matrices: expected (2B, D, D) in the table's dtype");
  TORCH_CHECK(offsets.sizes() == at::IntArrayRef({T, dim}) && offsets.is_contiguous() && offsets.scalar_type() == dtype,
              "offsets: expected (2B, D) in the table's dtype");
}

inline void check_points(const at::Tensor& points, const at::Tensor& field, const at::Tensor& table, int64_t n_fields) {
  TORCH_CHECK(points.dim() == 2 && (points.size(1) == 2 || points.size(1) == 3) && points.is_contiguous() &&
                  points.device().is_cpu() && points.scalar_type() == table.scalar_type(),
              "points: expected a contiguous CPU tensor (N, 2 or 3) in the table's dtype");
  TORCH_CHECK(field.dim() == 1 && field.size(0) == points.size(0) && field.scalar_type() == at::kLong &&
                  field.is_contiguous(),
              "field: expected one int64 field index per point");
  if (field.numel() > 0) {
    const auto range = at::aminmax(field);
    TORCH_CHECK(std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < n_fields,
                "field: indices must lie in [0, ", n_fields, ")");
  }
}

// ---- plain points (C = 1), each evaluated by its own field ---------------------------------

// Bytes of the corner records of N plain points (level-major: L x N x 2^D records).
template <typename scalar_t, int D>
int64_t record_bytes(int64_t N, const Levels& levels) {
  return N * levels.n_levels * (int64_t(1) << D) * static_cast<int64_t>(sizeof(CornerRecord<scalar_t, 1>));
}

template <typename scalar_t, int D>
CornerRecord<scalar_t, 1>* records_of(const at::Tensor& bytes) {
  return reinterpret_cast<CornerRecord<scalar_t, 1>*>(bytes.data_ptr<uint8_t>());
}

// u (N x D): the displacement of point n (x, N x D) by field t[n]. With acts_all (N x A, A the
// MLP's activation_count) and records (record_bytes), every point's layer inputs and corners are
// kept for points_backward; both null: nothing is kept.
template <typename scalar_t, int D>
void points_forward(const Mlp<scalar_t>& mlp, const Levels& levels, const scalar_t* x, const int64_t* t, int64_t N,
                    const scalar_t* table, const scalar_t* level_weight, scalar_t* u, scalar_t* acts_all,
                    CornerRecord<scalar_t, 1>* records) {
  constexpr int64_t K = int64_t(1) << D;
  const int64_t A = mlp.activation_count();
  const bool save = acts_all != nullptr;
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> block_acts(save ? 0 : kPointBlock * A);
    std::vector<Cell<scalar_t, D>> cells(kPointBlock * levels.n_levels);
    std::array<Clamped<scalar_t, D>, kPointBlock> clamped;
    for (int64_t n = begin; n < end;) {
      const int64_t count = block_of_one_field(t, n, end);
      scalar_t* acts = save ? acts_all + n * A : block_acts.data();
      for (int64_t c = 0; c < count; ++c) {       // the whole block's cells first (see find_cells)
        clamped[c] = Clamped<scalar_t, D>(x + (n + c) * D);
        find_cells<scalar_t, D>(clamped[c], t[n], levels, table, level_weight, cells.data() + c * levels.n_levels);
      }
      for (int64_t c = 0; c < count; ++c) {
        encode_jet<scalar_t, D, 1>(clamped[c], cells.data() + c * levels.n_levels, levels, table, level_weight,
                                   acts + c * A, save ? records + (n + c) * K : nullptr, N * K);
      }
      if (count == kPointBlock) {
        mlp_forward<scalar_t, kPointBlock, false>(mlp, t[n], point_vectors<scalar_t, kPointBlock>(mlp, acts, A,
                                                                                                  u + n * D));
      } else {
        mlp_forward<scalar_t, 1, false>(mlp, t[n], point_vectors<scalar_t, 1>(mlp, acts, A, u + n * D));
      }
      n += count;
    }
  });
}

// Reverse mode of points_forward from dL/du (grad_u, N x D) and its kept acts_all and records:
// adds dL/dtable to grad_table and dL/dW, dL/db to gradients.
template <typename scalar_t, int D>
void points_backward(const Mlp<scalar_t>& mlp, const Levels& levels, const scalar_t* grad_u, const scalar_t* acts_all,
                     const CornerRecord<scalar_t, 1>* records, const int64_t* t, int64_t N,
                     const scalar_t* level_weight, scalar_t* grad_table, MlpGradients<scalar_t>& gradients) {
  const int64_t LF = levels.n_levels * levels.n_features, A = mlp.activation_count();
  scalar_t* adj_encoding = scratch<scalar_t>(0, N * LF);    // level-major, see scatter_records
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    const int thread = at::get_thread_num();
    scalar_t adj_out[kPointBlock * D];
    std::vector<scalar_t> work(2 * kPointBlock * mlp.max_width()), block_adj(kPointBlock * LF);
    scalar_t* grad_w = gradients.weight[thread].data();
    scalar_t* grad_b = gradients.bias[thread].data();
    for (int64_t n = begin; n < end;) {
      const int64_t count = block_of_one_field(t, n, end);
      std::copy(grad_u + n * D, grad_u + (n + count) * D, adj_out);
      scalar_t* acts = const_cast<scalar_t*>(acts_all) + n * A;
      scalar_t* adj_in[kPointBlock];
      scalar_t* adj_outs[kPointBlock];
      for (int64_t c = 0; c < count; ++c) {
        adj_in[c] = block_adj.data() + c * LF;
        adj_outs[c] = adj_out + c * D;
      }
      if (count == kPointBlock) {
        mlp_backward<scalar_t, kPointBlock, false>(mlp, t[n], 0,
                                                   point_vectors<scalar_t, kPointBlock>(mlp, acts, A, nullptr),
                                                   adj_outs, work.data(), grad_w, grad_b, adj_in);
      } else {
        mlp_backward<scalar_t, 1, false>(mlp, t[n], 0, point_vectors<scalar_t, 1>(mlp, acts, A, nullptr),
                                         adj_outs, work.data(), grad_w, grad_b, adj_in);
      }
      for (int64_t c = 0; c < count; ++c) {
        to_level_major<scalar_t, 1>(adj_in[c], n + c, N, levels.n_levels, levels.n_features, adj_encoding);
      }
      n += count;
    }
  });
  scatter_records<scalar_t, D, 1>(records, N, adj_encoding, levels, level_weight, grad_table);
}

}  // namespace fused
}  // namespace hashgrid
