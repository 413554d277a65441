// Fused CPU kernels for the fit's training step: hash-grid encoding + ReLU MLP in one pass per
// point, with hand-written reverse mode, so that a step is a few native calls instead of hundreds
// of small autograd operations (building blocks, jets and the reverse-mode formulas: fused.h).
//
//   fields_forward       u = scale * MLP_t(lw * enc_t(clamp(x)))   for every point (field t each)
//   fields_backward      dL/dtable, dL/dW, dL/db from dL/du and the forward's saved activations
//                        (no dL/dx: the points are data)
//   fields_jacobian      du/dx of every point's field (forward-mode jets; no gradient)
//   gradient_icon        the penalty 0.5 * sum_dir mean_n ||S (J_f(g(x)) J_g(x) - I) S^-1||_F^2 of
//                        every pair, the diffusion 0.5 * sum_dir mean_n ||S_out (J_g(x) - M_g) S_in^-1||_F^2
//                        of its inner maps at the same points and, in the same pass, the gradient
//                        of a weighted sum of the two with respect to all parameters (see
//                        neuralfield_reg/losses/inverse_consistency.py)
#include "fused.h"

namespace hashgrid {

using namespace fused;

// Returns [u (N, D), saved layer inputs, saved corner records]; the last two are empty unless
// save, and fields_backward takes them instead of recomputing the forward pass.
std::vector<at::Tensor> fields_forward(const at::Tensor& points, const at::Tensor& field, const at::Tensor& table,
                                       const at::Tensor& geometry, int64_t n_features, bool smoothstep,
                                       int64_t rows_per_table, const at::Tensor& level_weight,
                                       const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                                       double scale, bool save) {
  const Common common = check_common(table, geometry, n_features, smoothstep, rows_per_table, level_weight);
  check_points(points, field, table, common.n_fields);
  const int64_t N = points.size(0), dim = points.size(1);
  auto out = at::empty({N, dim}, points.options());
  at::Tensor saved, saved_corners;
  dispatch_dim(table, dim, [&](auto scalar, auto dimension) {
    using scalar_t = decltype(scalar);
    constexpr int D = decltype(dimension)::value;
    const auto mlp = make_mlp<scalar_t>(weights, biases, common.n_fields, common.levels.n_levels * n_features, D,
                                        scale);
    saved = at::empty({save ? N : 0, mlp.activation_count()}, points.options());
    saved_corners = at::empty({save ? record_bytes<scalar_t, D>(N, common.levels) : 0},
                              points.options().dtype(at::kByte));
    points_forward<scalar_t, D>(mlp, common.levels, points.data_ptr<scalar_t>(), field.data_ptr<int64_t>(), N,
                                table.data_ptr<scalar_t>(), level_weight.data_ptr<scalar_t>(),
                                out.data_ptr<scalar_t>(), save ? saved.data_ptr<scalar_t>() : nullptr,
                                save ? records_of<scalar_t, D>(saved_corners) : nullptr);
  });
  return {out, saved, saved_corners};
}

// dL/dtable, then (dL/dW, dL/db) per layer, from dL/du and fields_forward's saved tensors.
std::vector<at::Tensor> fields_backward(const at::Tensor& grad_out, const at::Tensor& saved,
                                        const at::Tensor& saved_corners, const at::Tensor& points,
                                        const at::Tensor& field, const at::Tensor& table, const at::Tensor& geometry,
                                        int64_t n_features, bool smoothstep, int64_t rows_per_table,
                                        const at::Tensor& level_weight, const std::vector<at::Tensor>& weights,
                                        const std::vector<at::Tensor>& biases, double scale) {
  const Common common = check_common(table, geometry, n_features, smoothstep, rows_per_table, level_weight);
  check_points(points, field, table, common.n_fields);
  TORCH_CHECK(grad_out.sizes() == points.sizes() && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == points.scalar_type(),
              "grad_out: expected the points' shape");
  const int64_t N = points.size(0), dim = points.size(1);
  std::vector<at::Tensor> out;
  auto grad_table = at::zeros_like(table);
  out.push_back(grad_table);
  dispatch_dim(table, dim, [&](auto scalar, auto dimension) {
    using scalar_t = decltype(scalar);
    constexpr int D = decltype(dimension)::value;
    const auto mlp = make_mlp<scalar_t>(weights, biases, common.n_fields, common.levels.n_levels * n_features, D,
                                        scale);
    const int64_t bytes = record_bytes<scalar_t, D>(N, common.levels);
    TORCH_CHECK(saved.dim() == 2 && saved.size(0) == N && saved.size(1) == mlp.activation_count() &&
                    saved.is_contiguous() && saved_corners.numel() == bytes,
                "saved: expected fields_forward's saved tensors");
    MlpGradients<scalar_t> gradients(at::get_num_threads(), common.n_fields, mlp);
    points_backward<scalar_t, D>(mlp, common.levels, grad_out.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>(),
                                 records_of<scalar_t, D>(saved_corners), field.data_ptr<int64_t>(), N,
                                 level_weight.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>(), gradients);
    gradients.reduce(mlp, common.n_fields, table.options(), out);
  });
  return out;
}

// J (N, D, D): J[n][k][j] = d u_k / d x_j of field t[n] at point n, through the clamp (zero along
// an axis where the point lies outside [0, 1]), as autograd differentiates the fields.
at::Tensor fields_jacobian(const at::Tensor& points, const at::Tensor& field, const at::Tensor& table,
                           const at::Tensor& geometry, int64_t n_features, bool smoothstep, int64_t rows_per_table,
                           const at::Tensor& level_weight, const std::vector<at::Tensor>& weights,
                           const std::vector<at::Tensor>& biases, double scale) {
  const Common common = check_common(table, geometry, n_features, smoothstep, rows_per_table, level_weight);
  check_points(points, field, table, common.n_fields);
  const int64_t N = points.size(0), dim = points.size(1);
  auto out = at::empty({N, dim, dim}, points.options());
  dispatch_dim(table, dim, [&](auto scalar, auto dimension) {
    using scalar_t = decltype(scalar);
    constexpr int D = decltype(dimension)::value;
    constexpr int C = 1 + D;
    const auto mlp = make_mlp<scalar_t>(weights, biases, common.n_fields, common.levels.n_levels * n_features, D,
                                        scale);
    const scalar_t* x = points.data_ptr<scalar_t>();
    const int64_t* t = field.data_ptr<int64_t>();
    const scalar_t* tab = table.data_ptr<scalar_t>();
    const scalar_t* lw = level_weight.data_ptr<scalar_t>();
    scalar_t* J = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acts(C * mlp.activation_count());
      scalar_t jet[C * D];
      Cell<scalar_t, D> cells[kMaxLevels];
      for (int64_t n = begin; n < end; ++n) {
        const Clamped<scalar_t, D> p(x + n * D);
        find_cells<scalar_t, D>(p, t[n], common.levels, tab, lw, cells);
        encode_jet<scalar_t, D, C>(p, cells, common.levels, tab, lw, acts.data(), nullptr, 0);
        mlp_forward<scalar_t, C, true>(mlp, t[n], jet_vectors<scalar_t, C>(mlp, acts.data(), jet));
        for (int k = 0; k < D; ++k) {
          for (int j = 0; j < D; ++j) J[(n * D + k) * D + j] = jet[(1 + j) * D + k];
        }
      }
    });
  });
  return out;
}

// points (B, N, D): the penalty's sample points of each pair. scales (2, D): the physical extent per
// axis of A's domain (direction A: x in A, r = phi_AB(phi_BA(x)) - x) and of B's domain.
// matrices (2B, D, D) and offsets (2B, D): the fixed affine parts; field 2p is phi_AB of pair p and
// 2p + 1 is phi_BA. Returns [penalty (B,), diffusion (B,), then, when need_grad, dtable and (dW, db)
// per layer], the gradients of the sum over pairs of gradient_scale * penalty + diffusion_scale *
// diffusion. The diffusion measures the displacements' Jacobians (J_g - M_g) of both maps (the inner
// maps of the two directions) in physical units: output extent over input extent. With accumulate
// ([dtable, then dW, db per layer], shaped like the table and the parameters), the gradients are
// added to those tensors instead and only the two values are returned.
std::vector<at::Tensor> gradient_icon(const at::Tensor& points, const at::Tensor& scales, const at::Tensor& matrices,
                                      const at::Tensor& offsets, const at::Tensor& table, const at::Tensor& geometry,
                                      int64_t n_features, bool smoothstep, int64_t rows_per_table,
                                      const at::Tensor& level_weight, const std::vector<at::Tensor>& weights,
                                      const std::vector<at::Tensor>& biases, double scale, bool need_grad,
                                      double gradient_scale, double diffusion_scale,
                                      const std::vector<at::Tensor>& accumulate) {
  const Common common = check_common(table, geometry, n_features, smoothstep, rows_per_table, level_weight);
  TORCH_CHECK(points.dim() == 3 && (points.size(2) == 2 || points.size(2) == 3) && points.is_contiguous() &&
                  points.scalar_type() == table.scalar_type() && points.device().is_cpu(),
              "points: expected a contiguous CPU tensor (B, N, 2 or 3) in the table's dtype");
  const int64_t B = points.size(0), N = points.size(1), dim = points.size(2);
  TORCH_CHECK(common.n_fields == 2 * B, "table: expected two fields (phi_AB, phi_BA) per pair of points");
  TORCH_CHECK(N > 0, "points: expected at least one point per pair");
  TORCH_CHECK(scales.sizes() == at::IntArrayRef({2, dim}) && scales.scalar_type() == table.scalar_type() &&
                  scales.is_contiguous(),
              "scales: expected (2, D) extents in the table's dtype");
  check_affine_parts(matrices, offsets, 2 * B, dim, table.scalar_type());
  if (!accumulate.empty()) {
    TORCH_CHECK(accumulate.size() == 1 + 2 * weights.size(), "accumulate: expected dtable, then dW and db per layer");
    for (size_t i = 0; i < accumulate.size(); ++i) {
      const at::Tensor& like = i == 0 ? table : (i % 2 == 1 ? weights[i / 2] : biases[i / 2 - 1]);
      TORCH_CHECK(accumulate[i].numel() == like.numel() && accumulate[i].is_contiguous() &&
                      accumulate[i].scalar_type() == like.scalar_type() && accumulate[i].device().is_cpu(),
                  "accumulate[", i, "]: expected a contiguous CPU tensor with as many numbers as its parameter");
    }
  }
  std::vector<at::Tensor> out;
  auto penalty = at::zeros({B}, points.options());
  auto diffusion = at::zeros({B}, points.options());
  out.push_back(penalty);
  out.push_back(diffusion);
  dispatch_dim(table, dim, [&](auto scalar, auto dimension) {
    using scalar_t = decltype(scalar);
    constexpr int D = decltype(dimension)::value;
    constexpr int C = 1 + D;
    const Levels& levels = common.levels;
    const int64_t LF = levels.n_levels * levels.n_features;
    const auto mlp = make_mlp<scalar_t>(weights, biases, common.n_fields, LF, D, scale);
    const scalar_t* x = points.data_ptr<scalar_t>();
    const scalar_t* tab = table.data_ptr<scalar_t>();
    const scalar_t* lw = level_weight.data_ptr<scalar_t>();
    const scalar_t* M = matrices.data_ptr<scalar_t>();
    const scalar_t* off = offsets.data_ptr<scalar_t>();
    const scalar_t* S = scales.data_ptr<scalar_t>();
    const int threads = at::get_num_threads();
    const int64_t items = B * 2 * N;          // (pair, direction, point)
    MlpGradients<scalar_t> gradients(need_grad ? threads : 0, common.n_fields, mlp);
    // Evaluation 2i is item i's inner map at x, 2i + 1 its outer map at y = inner(x).
    using Record = CornerRecord<scalar_t, C>;
    const int64_t L = levels.n_levels, K = int64_t(1) << D;
    Record* records = scratch<Record>(0, need_grad ? 2 * items * L * K : 0);
    scalar_t* adj_encoding = scratch<scalar_t>(6, need_grad ? 2 * items * C * LF : 0);
    scalar_t* item_loss = scratch<scalar_t>(7, 2 * items);   // penalty, then diffusion, per item
    const scalar_t weight = scalar_t(0.5) / static_cast<scalar_t>(N);
    const scalar_t gradient_weight = weight * static_cast<scalar_t>(gradient_scale);
    const scalar_t diffusion_weight = weight * static_cast<scalar_t>(diffusion_scale);
    at::parallel_for(0, items, kGrain, [&](int64_t begin, int64_t end) {
      const int thread = at::get_thread_num();
      std::vector<scalar_t> acts_inner(C * mlp.activation_count()), acts_outer(C * mlp.activation_count());
      std::vector<scalar_t> work(2 * C * mlp.max_width()), adj_scratch(2 * C * LF);
      scalar_t jet_inner[C * D], jet_outer[C * D], adj[C * D];
      Cell<scalar_t, D> cells_inner[kMaxLevels], cells_outer[kMaxLevels];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t pair = item / (2 * N), direction = (item / N) % 2, n = item % N;
        const int64_t inner = 2 * pair + (direction == 0 ? 1 : 0), outer = 2 * pair + direction;
        const scalar_t* point = x + (pair * N + n) * D;
        const scalar_t* s = S + direction * D;               // the inner map's input domain
        const scalar_t* s_out = S + (1 - direction) * D;     // and its output's
        // Inner map g at x: J_g = M_g + dU, y = M_g x + o_g + u.
        const Clamped<scalar_t, D> x_clamped(point);
        find_cells<scalar_t, D>(x_clamped, inner, levels, tab, lw, cells_inner);
        encode_jet<scalar_t, D, C>(x_clamped, cells_inner, levels, tab, lw, acts_inner.data(),
                                   need_grad ? records + 2 * item * K : nullptr, 2 * items * K);
        const auto vectors_inner = jet_vectors<scalar_t, C>(mlp, acts_inner.data(), jet_inner);
        mlp_forward<scalar_t, C, true>(mlp, inner, vectors_inner);
        scalar_t Jg[D][D], Jf[D][D], y[D];
        const scalar_t* Mg = M + inner * D * D;
        const scalar_t* Mf = M + outer * D * D;
        for (int k = 0; k < D; ++k) {
          y[k] = off[inner * D + k] + jet_inner[k];
          for (int j = 0; j < D; ++j) {
            y[k] += Mg[k * D + j] * point[j];
            Jg[k][j] = Mg[k * D + j] + jet_inner[(1 + j) * D + k];
          }
        }
        // Outer map f at y.
        const Clamped<scalar_t, D> y_clamped(y);
        find_cells<scalar_t, D>(y_clamped, outer, levels, tab, lw, cells_outer);
        encode_jet<scalar_t, D, C>(y_clamped, cells_outer, levels, tab, lw, acts_outer.data(),
                                   need_grad ? records + (2 * item + 1) * K : nullptr, 2 * items * K);
        const auto vectors_outer = jet_vectors<scalar_t, C>(mlp, acts_outer.data(), jet_outer);
        mlp_forward<scalar_t, C, true>(mlp, outer, vectors_outer);
        for (int k = 0; k < D; ++k) {
          for (int j = 0; j < D; ++j) Jf[k][j] = Mf[k * D + j] + jet_outer[(1 + j) * D + k];
        }
        // R = Jf Jg - I in physical units: R_kj s_k / s_j.
        scalar_t G[D][D];
        scalar_t loss = 0;
        for (int k = 0; k < D; ++k) {
          for (int j = 0; j < D; ++j) {
            scalar_t r = k == j ? scalar_t(-1) : scalar_t(0);
            for (int m = 0; m < D; ++m) r += Jf[k][m] * Jg[m][j];
            const scalar_t ratio = s[k] / s[j];
            loss += r * r * ratio * ratio;
            G[k][j] = gradient_weight * 2 * r * ratio * ratio;   // dL/dR
          }
        }
        // Diffusion of the inner map: (J_g - M_g)_kj s_out_k / s_j, and its dL/dJg.
        scalar_t H[D][D];
        scalar_t smoothness = 0;
        for (int k = 0; k < D; ++k) {
          for (int j = 0; j < D; ++j) {
            const scalar_t du = jet_inner[(1 + j) * D + k];
            const scalar_t ratio = s_out[k] / s[j];
            smoothness += du * du * ratio * ratio;
            H[k][j] = diffusion_weight * 2 * du * ratio * ratio;
          }
        }
        item_loss[item] = loss;
        item_loss[items + item] = smoothness;
        if (!need_grad) continue;
        scalar_t* grad_w = gradients.weight[thread].data();
        scalar_t* grad_b = gradients.bias[thread].data();
        // Outer: dL/dJf = G Jg^T, on the derivative channels only.
        for (int k = 0; k < D; ++k) {
          adj[k] = 0;
          for (int j = 0; j < D; ++j) {
            scalar_t sum = 0;
            for (int m = 0; m < D; ++m) sum += G[k][m] * Jg[j][m];
            adj[(1 + j) * D + k] = sum;
          }
        }
        scalar_t* adj_outer = adj_scratch.data();
        mlp_backward<scalar_t, C, true>(mlp, outer, 1, vectors_outer, channels<scalar_t, C>(adj, D).data(),
                                        work.data(), grad_w, grad_b, channels<scalar_t, C>(adj_outer, LF).data());
        scalar_t y_grad[D] = {};
        encode_jet_point_grad<scalar_t, D>(y_clamped, cells_outer, levels, tab, lw, C, adj_outer, y_grad);
        // Inner: dL/dJg = Jf^T G on the derivative channels, dL/dy on the value channel.
        for (int k = 0; k < D; ++k) {
          adj[k] = y_grad[k];
          for (int j = 0; j < D; ++j) {
            scalar_t sum = 0;
            for (int m = 0; m < D; ++m) sum += Jf[m][k] * G[m][j];
            adj[(1 + j) * D + k] = sum + H[k][j];
          }
        }
        mlp_backward<scalar_t, C, true>(mlp, inner, 0, vectors_inner, channels<scalar_t, C>(adj, D).data(),
                                        work.data(), grad_w, grad_b,
                                        channels<scalar_t, C>(adj_scratch.data() + C * LF, LF).data());
        to_level_major<scalar_t, C>(adj_scratch.data() + C * LF, 2 * item, 2 * items, levels.n_levels,
                                    levels.n_features, adj_encoding);
        to_level_major<scalar_t, C>(adj_outer, 2 * item + 1, 2 * items, levels.n_levels, levels.n_features,
                                    adj_encoding);
      }
    });
    scalar_t* pen = penalty.data_ptr<scalar_t>();
    scalar_t* dif = diffusion.data_ptr<scalar_t>();
    for (int64_t item = 0; item < items; ++item) {
      pen[item / (2 * N)] += weight * item_loss[item];
      dif[item / (2 * N)] += weight * item_loss[items + item];
    }
    if (need_grad) {
      auto grad_table = accumulate.empty() ? at::zeros_like(table) : accumulate[0];
      scatter_records<scalar_t, D, C>(records, 2 * items, adj_encoding, levels, lw,
                                      grad_table.data_ptr<scalar_t>());
      if (accumulate.empty()) {
        out.push_back(grad_table);
        gradients.reduce(mlp, common.n_fields, table.options(), out);
      } else {
        gradients.add_to(mlp, common.n_fields, accumulate.data() + 1);
      }
    }
  });
  return out;
}

}  // namespace hashgrid
