// Fused SSD similarity of the fit's training step (CPU): both maps of every pair at their random
// voxels, the other image sampled at the mapped points, the weighted SSD of each direction and, in
// the same call, its gradient with respect to every parameter. It computes what fit.py's
// similarity term computes with SSD (neuralfield_reg/losses/similarity.py, coords.sample_batch):
//
//   field t = 2p (phi_AB of pair p) maps B's voxels into A and samples moving[p];
//   field t = 2p + 1 (phi_BA) maps A's voxels into B and samples fixed[p];
//   y_n = M_t x_n + o_t + u_t(x_n), r_n = I(y_n) - target_n,
//   ssd_t = sum_n w_n r_n^2 / sum_n w_n,   similarity_p = ssd_2p + ssd_2p+1,
//
// with w_n = 1 where y_n lies in the unit cube (all points when fewer than 16 do), times the
// optional mask (all points when the mask leaves none). Sampling is linear with border padding and
// voxel centres at i / (n - 1), as torch's grid_sample with align_corners=True: outside the image,
// and exactly on its last voxel, the clamped coordinate has zero derivative.
#include "fused.h"

namespace hashgrid {

using namespace fused;

namespace {

// Points that must land inside the other image before the outside ones are left out (fit.py).
constexpr int64_t kMinInside = 16;

// The image (sizes per axis) at unit coordinates y, and d value / d y.
template <typename scalar_t, int D>
scalar_t sample_border(const scalar_t* image, const int64_t* size, const scalar_t* y, scalar_t* gradient) {
  int64_t lower[D], stride[D];
  scalar_t frac[D], chain[D];
  int64_t step = 1;
  for (int k = D - 1; k >= 0; --k) {
    stride[k] = step;
    step *= size[k];
  }
  for (int k = 0; k < D; ++k) {
    const scalar_t last = static_cast<scalar_t>(size[k] - 1);
    scalar_t v = y[k] * last;
    chain[k] = last;
    if (!(v > 0)) {
      v = 0;
      chain[k] = 0;
    } else if (v >= last) {
      v = last;
      chain[k] = 0;
    }
    const scalar_t floor_v = std::floor(v);
    lower[k] = static_cast<int64_t>(floor_v);
    frac[k] = v - floor_v;
  }
  scalar_t value = 0;
  for (int j = 0; j < D; ++j) gradient[j] = 0;
  for (int c = 0; c < (1 << D); ++c) {
    int64_t index = 0;
    bool inside = true;
    scalar_t factor[D], dfactor[D];
    for (int k = 0; k < D; ++k) {
      const bool upper = (c >> k) & 1;
      const int64_t i = lower[k] + (upper ? 1 : 0);
      inside = inside && i < size[k];         // the upper neighbour of the last voxel (weight 0)
      index += i * stride[k];
      factor[k] = upper ? frac[k] : scalar_t(1) - frac[k];
      dfactor[k] = upper ? scalar_t(1) : scalar_t(-1);
    }
    if (!inside) continue;
    const scalar_t intensity = image[index];
    scalar_t weight = 1;
    for (int k = 0; k < D; ++k) weight *= factor[k];
    value += weight * intensity;
    for (int j = 0; j < D; ++j) {
      scalar_t partial = dfactor[j];
      for (int k = 0; k < D; ++k) {
        if (k != j) partial *= factor[k];
      }
      gradient[j] += partial * intensity;
    }
  }
  for (int j = 0; j < D; ++j) gradient[j] *= chain[j];
  return value;
}

}  // namespace

// points (T, N, D) with T = 2B fields (field 2p: B's voxels for phi_AB, 2p + 1: A's voxels for
// phi_BA), targets (T, N) the target image's values there, masks (T, N) 0/1 or empty; moving
// (B, *shape_A), fixed (B, *shape_B); matrices (T, D, D), offsets (T, D) the affine parts.
// Returns [similarity (B,), then, when need_grad, dtable and (dW, db) per layer].
std::vector<at::Tensor> similarity_ssd(const at::Tensor& points, const at::Tensor& targets, const at::Tensor& masks,
                                       const at::Tensor& moving, const at::Tensor& fixed, const at::Tensor& matrices,
                                       const at::Tensor& offsets, const at::Tensor& table, const at::Tensor& geometry,
                                       int64_t n_features, bool smoothstep, int64_t rows_per_table,
                                       const at::Tensor& level_weight, const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& biases, double scale, bool need_grad) {
  const Common common = check_common(table, geometry, n_features, smoothstep, rows_per_table, level_weight);
  const auto dtype = table.scalar_type();
  TORCH_CHECK(points.dim() == 3 && (points.size(2) == 2 || points.size(2) == 3) && points.is_contiguous() &&
                  points.scalar_type() == dtype && points.device().is_cpu(),
              "points: expected a contiguous CPU tensor (2B, N, 2 or 3) in the table's dtype");
  const int64_t T = points.size(0), N = points.size(1), dim = points.size(2), B = T / 2;
  TORCH_CHECK(T == common.n_fields && T % 2 == 0, "points: expected one row of points per field (2 per pair)");
  TORCH_CHECK(N > 0, "points: expected at least one point per field");
  TORCH_CHECK(targets.sizes() == at::IntArrayRef({T, N}) && targets.is_contiguous() && targets.scalar_type() == dtype,
              "targets: expected (2B, N) values in the table's dtype");
  const bool has_masks = masks.numel() > 0;
  TORCH_CHECK(!has_masks || (masks.sizes() == at::IntArrayRef({T, N}) && masks.is_contiguous() &&
                             masks.scalar_type() == dtype),
              "masks: expected (2B, N) 0/1 weights in the table's dtype, or an empty tensor");
  for (const auto* image : {&moving, &fixed}) {
    TORCH_CHECK(image->dim() == 1 + dim && image->size(0) == B && image->is_contiguous() &&
                    image->scalar_type() == dtype && image->device().is_cpu(),
                "moving and fixed: expected contiguous CPU images (B, *spatial) in the table's dtype");
  }
  check_affine_parts(matrices, offsets, T, dim, dtype);
  std::vector<at::Tensor> out;
  auto similarity = at::zeros({B}, points.options());
  out.push_back(similarity);
  dispatch_dim(table, dim, [&](auto scalar, auto dimension) {
    using scalar_t = decltype(scalar);
    constexpr int D = decltype(dimension)::value;
    const Levels& levels = common.levels;
    const int64_t P = T * N;
    const auto mlp = make_mlp<scalar_t>(weights, biases, T, levels.n_levels * n_features, D, scale);
    int64_t* field = scratch<int64_t>(0, P);
    for (int64_t i = 0; i < P; ++i) field[i] = i / N;
    scalar_t* u = scratch<scalar_t>(1, P * D);     // slot 0 is points_backward's
    scalar_t* acts = scratch<scalar_t>(2, need_grad ? P * mlp.activation_count() : 0);
    const int64_t n_records = need_grad ? P * levels.n_levels * (int64_t(1) << D) : 0;
    CornerRecord<scalar_t, 1>* records = scratch<CornerRecord<scalar_t, 1>>(0, n_records);
    const scalar_t* x = points.data_ptr<scalar_t>();
    const scalar_t* tab = table.data_ptr<scalar_t>();
    const scalar_t* lw = level_weight.data_ptr<scalar_t>();
    points_forward<scalar_t, D>(mlp, levels, x, field, P, tab, lw, u,
                                need_grad ? acts : nullptr, need_grad ? records : nullptr);

    // Sample the other image at every mapped point: residual, d image / d y, inside the cube.
    int64_t size_A[D], size_B[D];
    for (int k = 0; k < D; ++k) {
      size_A[k] = moving.size(1 + k);
      size_B[k] = fixed.size(1 + k);
    }
    const int64_t voxels_A = moving.numel() / B, voxels_B = fixed.numel() / B;
    const scalar_t* M = matrices.data_ptr<scalar_t>();
    const scalar_t* off = offsets.data_ptr<scalar_t>();
    const scalar_t* target = targets.data_ptr<scalar_t>();
    scalar_t* residual = scratch<scalar_t>(3, P);
    scalar_t* image_gradient = scratch<scalar_t>(4, P * D);
    uint8_t* inside = scratch<uint8_t>(0, P);
    at::parallel_for(0, P, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i / N, pair = t / 2;
        const scalar_t* xi = x + i * D;
        scalar_t y[D];
        bool in_cube = true;
        for (int k = 0; k < D; ++k) {
          y[k] = off[t * D + k] + u[i * D + k];
          for (int j = 0; j < D; ++j) y[k] += M[(t * D + k) * D + j] * xi[j];
          in_cube = in_cube && y[k] >= 0 && y[k] <= 1;
        }
        const bool to_A = t % 2 == 0;
        const scalar_t* image = to_A ? moving.data_ptr<scalar_t>() + pair * voxels_A
                                     : fixed.data_ptr<scalar_t>() + pair * voxels_B;
        residual[i] = sample_border<scalar_t, D>(image, to_A ? size_A : size_B, y, image_gradient + i * D) -
                      target[i];
        inside[i] = in_cube ? 1 : 0;
      }
    });

    // Weights and the SSD of each field; dL/du for the reverse mode.
    const scalar_t* mask = has_masks ? masks.data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_u = scratch<scalar_t>(5, need_grad ? P * D : 0);
    scalar_t* sim = similarity.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t first = t * N;
      int64_t count = 0;
      for (int64_t n = 0; n < N; ++n) count += inside[first + n];
      const bool all_points = count < kMinInside;
      std::vector<scalar_t> w(N);
      bool any = false;
      for (int64_t n = 0; n < N; ++n) {
        const bool kept = (all_points || inside[first + n]) && (mask == nullptr || mask[first + n] != 0);
        w[n] = kept ? scalar_t(1) : scalar_t(0);
        any = any || kept;
      }
      if (!any) std::fill(w.begin(), w.end(), scalar_t(1));     // the mask leaves none: compare all
      double total = 0, sum = 0;
      for (int64_t n = 0; n < N; ++n) {
        total += w[n];
        sum += w[n] * static_cast<double>(residual[first + n]) * residual[first + n];
      }
      sim[t / 2] += static_cast<scalar_t>(sum / total);
      if (!need_grad) continue;
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t factor = static_cast<scalar_t>(2 * w[n] * residual[first + n] / total);
        for (int k = 0; k < D; ++k) grad_u[(first + n) * D + k] = factor * image_gradient[(first + n) * D + k];
      }
    }
    if (!need_grad) return;
    auto grad_table = at::zeros_like(table);
    MlpGradients<scalar_t> gradients(at::get_num_threads(), T, mlp);
    points_backward<scalar_t, D>(mlp, levels, grad_u, acts, records,
                                 field, P, lw, grad_table.data_ptr<scalar_t>(), gradients);
    out.push_back(grad_table);
    gradients.reduce(mlp, T, table.options(), out);
  });
  return out;
}

}  // namespace hashgrid
