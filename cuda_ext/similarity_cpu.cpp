// Fused similarity of the fit's training step (CPU): both maps of every pair at their random
// voxels, the other image sampled at the mapped points, the weighted SSD, global NCC or MI of each
// direction and, in the same call, its gradient with respect to every parameter. It computes what
// engine/objective.py's similarity term computes with SSD, NCC or MI (neuralfield_reg/losses/similarity.py,
// coords.sample_batch):
//
//   field t = 2p (phi_AB of pair p) maps B's voxels into A and samples moving[p];
//   field t = 2p + 1 (phi_BA) maps A's voxels into B and samples fixed[p];
//   y_n = M_t x_n + o_t + u_t(x_n), v_n = I(y_n), r_n = v_n - target_n,
//   ssd_t = sum_n w_n r_n^2 / sum_n w_n,
//   ncc_t = 1 - cov / sqrt(var_v var_target + eps) with weighted means, variances and covariance,
//   mi_t = -(mutual information of v and target), Parzen-window joint histogram (mi_measure),
//   similarity_p = sim_2p + sim_2p+1,
//
// with w_n = 1 where y_n lies in the unit cube (all points when fewer than 16 do), times the
// optional mask (all points when the mask leaves none). Sampling is linear with border padding and
// voxel centres at i / (n - 1), as torch's grid_sample with align_corners=True: outside the image,
// and exactly on its last voxel, the clamped coordinate has zero derivative.
//
// affine_ncc: the affine stage's correlation or SSD (neuralfield_reg/registration/affine.py) of K affine maps
// at once, with its gradient with respect to each map's matrix and offset.
#include "fused.h"

namespace hashgrid {

using namespace fused;

namespace {

// Points that must land inside the other image before the outside ones are left out (engine/objective.py, compared_points).
constexpr int64_t kMinInside = 16;

// The image (sizes per axis) at unit coordinates y, and d value / d y: nested linear
// interpolations, last axis first. Where a coordinate is clamped to the last voxel, its upper
// neighbour (weight 0) is read as the voxel itself, which changes no value or derivative.
template <typename scalar_t, int D>
scalar_t sample_border(const scalar_t* image, const int64_t* size, const scalar_t* y, scalar_t* gradient) {
  static_assert(D == 2 || D == 3, "2D or 3D images");
  int64_t base = 0, up[D];
  scalar_t f[D], chain[D];
  int64_t stride = 1;
  for (int k = D - 1; k >= 0; --k) {
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
    const int64_t lower = static_cast<int64_t>(floor_v);
    f[k] = v - floor_v;
    base += lower * stride;
    up[k] = lower + 1 < size[k] ? stride : 0;
    stride *= size[k];
  }
  const scalar_t* p = image + base;
  if constexpr (D == 2) {
    const scalar_t i00 = p[0], i01 = p[up[1]], i10 = p[up[0]], i11 = p[up[0] + up[1]];
    const scalar_t low = i00 + f[1] * (i01 - i00), high = i10 + f[1] * (i11 - i10);
    gradient[0] = chain[0] * (high - low);
    gradient[1] = chain[1] * ((i01 - i00) + f[0] * ((i11 - i10) - (i01 - i00)));
    return low + f[0] * (high - low);
  } else {
    scalar_t plane[2], d2[2], d1[2];          // per value of axis 0: lerp over axes 1 and 2
    for (int a = 0; a < 2; ++a) {
      const scalar_t* q = p + (a ? up[0] : 0);
      const scalar_t i00 = q[0], i01 = q[up[2]], i10 = q[up[1]], i11 = q[up[1] + up[2]];
      const scalar_t low = i00 + f[2] * (i01 - i00), high = i10 + f[2] * (i11 - i10);
      plane[a] = low + f[1] * (high - low);
      d1[a] = high - low;
      d2[a] = (i01 - i00) + f[1] * ((i11 - i10) - (i01 - i00));
    }
    gradient[0] = chain[0] * (plane[1] - plane[0]);
    gradient[1] = chain[1] * (d1[0] + f[0] * (d1[1] - d1[0]));
    gradient[2] = chain[2] * (d2[0] + f[0] * (d2[1] - d2[0]));
    return plane[0] + f[0] * (plane[1] - plane[0]);
  }
}

// Sums of width numbers per map over the K * P items i = k * P + p (point p of map k), in parallel:
// body(sums of map k, i, k, p) adds item i's part. Each thread sums its items in order and the
// threads' parts are added in thread order (the same result for the same thread count).
template <typename Body>
std::vector<double> per_map_sums(int64_t K, int64_t P, int64_t width, const Body& body) {
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * K * width, 0.0);
  at::parallel_for(0, K * P, 256, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + static_cast<int64_t>(at::get_thread_num()) * K * width;
    int64_t k = begin / P, p = begin % P;
    for (int64_t i = begin; i < end; ++i) {
      body(mine + k * width, i, k, p);
      if (++p == P) {
        p = 0;
        ++k;
      }
    }
  });
  std::vector<double> total(K * width, 0.0);
  for (int thread = 0; thread < threads; ++thread) {
    for (int64_t e = 0; e < K * width; ++e) total[e] += partial[thread * K * width + e];
  }
  return total;
}


// The measures of one field's N points: v_n = r_n + t_n (the sampled value, r the residual),
// weights w_n summing to total. Each returns the value and, when factor is not null, fills it
// with d value / d v_n. Their codes, in similarity and affine_ncc alike, are the indices of
// encoders/fused.py's MEASURES.
enum Measure : int64_t { kSsd = 0, kNcc = 1, kMi = 2 };

// ssd = sum_n w_n r_n^2 / W.
template <typename scalar_t>
double ssd_measure(const scalar_t* r, const scalar_t*, const scalar_t* w, int64_t N, double total, double* factor) {
  double sum = 0;
  for (int64_t n = 0; n < N; ++n) sum += w[n] * static_cast<double>(r[n]) * r[n];
  for (int64_t n = 0; factor != nullptr && n < N; ++n) factor[n] = 2 * w[n] * r[n] / total;
  return sum / total;
}

// ncc = 1 - cov / sqrt(var_v var_t + eps), weighted. Centred sums (a one-pass formula would
// cancel); with s = sqrt(var_v var_t + eps): d ncc / d v_n = -w_n (b_n / s - cov var_t a_n / s^3) / W,
// a and b the centred values (the means' own derivatives drop out: sum_n w_n a_n = 0).
template <typename scalar_t>
double ncc_measure(const scalar_t* r, const scalar_t* t, const scalar_t* w, int64_t N, double total, double eps,
                   double* factor) {
  double mean_v = 0, mean_t = 0;
  for (int64_t n = 0; n < N; ++n) {
    mean_v += w[n] * (static_cast<double>(r[n]) + t[n]);
    mean_t += w[n] * static_cast<double>(t[n]);
  }
  mean_v /= total;
  mean_t /= total;
  double var_v = 0, var_t = 0, cov = 0;
  for (int64_t n = 0; n < N; ++n) {
    const double a = static_cast<double>(r[n]) + t[n] - mean_v, b = static_cast<double>(t[n]) - mean_t;
    var_v += w[n] * a * a;
    var_t += w[n] * b * b;
    cov += w[n] * a * b;
  }
  var_v /= total;
  var_t /= total;
  cov /= total;
  const double root = std::sqrt(var_v * var_t + eps);
  const double along_b = 1.0 / (total * root), along_a = cov * var_t / (total * root * root * root);
  for (int64_t n = 0; factor != nullptr && n < N; ++n) {
    const double a = static_cast<double>(r[n]) + t[n] - mean_v, b = static_cast<double>(t[n]) - mean_t;
    factor[n] = -w[n] * (along_b * b - along_a * a);
  }
  return 1.0 - cov / root;
}

// The cubic B-spline's four non-zero weights (and derivatives) at position q: for the centres
// floor(q) - 1 + j, j = 0..3, with x = q - floor(q).
inline void bspline_weights(double q, int64_t* first, double* value, double* slope) {
  const double floor_q = std::floor(q), x = q - floor_q;
  *first = static_cast<int64_t>(floor_q) - 1;
  const double y = 1 - x;
  value[0] = y * y * y / 6;
  value[1] = (4 - 6 * x * x + 3 * x * x * x) / 6;
  value[2] = (4 - 6 * y * y + 3 * y * y * y) / 6;
  value[3] = x * x * x / 6;
  if (slope != nullptr) {
    slope[0] = -y * y / 2;
    slope[1] = (-12 * x + 9 * x * x) / 6;
    slope[2] = (12 * y - 9 * y * y) / 6;
    slope[3] = x * x / 2;
  }
}

// mi = -(sum p_ab log p_ab - sum p_a log p_a - sum p_b log p_b), losses/similarity.py's mi: the
// joint histogram p_ab of (v, t) clamped to [0, 1], each at q = value (bins - 1) on centres
// -2 .. bins + 1 (index + 2), cubic B-spline windows, weighted by w_n / W. With p_a = sum_b p_ab
// (t does not move), d mi / d v_n = -(w_n (bins - 1) / W) sum_ab slope_a(q_n) window_b(s_n)
// (log p_ab - log p_a), where 0 <= v_n <= 1 (the clamp passes the gradient there, as torch's).
// Both passes over the points are parallel (inside another parallel loop they run serially in
// the calling thread): the histogram as per-thread partial histograms added in thread order (the
// same result for the same thread count), the gradient point by point.
template <typename scalar_t>
double mi_measure(const scalar_t* r, const scalar_t* t, const scalar_t* w, int64_t N, double total, int64_t bins,
                  double* factor) {
  constexpr int64_t kMiGrain = 2048;
  const int64_t K = bins + 4;
  const double last = static_cast<double>(bins - 1);
  auto position = [&](double value) { return std::min(std::max(value, 0.0), 1.0) * last + 2; };
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * K * K, 0.0);
  at::parallel_for(0, N, kMiGrain, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + static_cast<int64_t>(at::get_thread_num()) * K * K;
    for (int64_t n = begin; n < end; ++n) {
      if (w[n] == 0) continue;
      int64_t first_a, first_b;
      double wa[4], wb[4];
      bspline_weights(position(static_cast<double>(r[n]) + t[n]), &first_a, wa, nullptr);
      bspline_weights(position(t[n]), &first_b, wb, nullptr);
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) mine[(first_a + i) * K + first_b + j] += w[n] * wa[i] * wb[j];
      }
    }
  });
  std::vector<double> joint(K * K, 0.0);
  for (int thread = 0; thread < threads; ++thread) {
    for (int64_t e = 0; e < K * K; ++e) joint[e] += partial[thread * K * K + e];
  }
  std::vector<double> p_a(K, 0.0), p_b(K, 0.0), log_joint(K * K, 0.0);
  double mi = 0;
  for (int64_t a = 0; a < K; ++a) {
    for (int64_t b = 0; b < K; ++b) {
      const double p = joint[a * K + b] / total;
      p_a[a] += p;
      p_b[b] += p;
      if (p > 0) {
        log_joint[a * K + b] = std::log(p);
        mi += p * log_joint[a * K + b];
      }
    }
  }
  std::vector<double> log_a(K, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    if (p_a[k] > 0) log_a[k] = std::log(p_a[k]);
    mi -= p_a[k] * log_a[k];
    if (p_b[k] > 0) mi -= p_b[k] * std::log(p_b[k]);
  }
  if (factor == nullptr) return -mi;
  at::parallel_for(0, N, kMiGrain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const double v = static_cast<double>(r[n]) + t[n];
      factor[n] = 0;
      if (w[n] == 0 || v < 0 || v > 1) continue;
      int64_t first_a, first_b;
      double wa[4], slope[4], wb[4];
      bspline_weights(position(v), &first_a, wa, slope);
      bspline_weights(position(t[n]), &first_b, wb, nullptr);
      double sum = 0;
      for (int i = 0; i < 4; ++i) {
        const int64_t a = first_a + i;
        double inner = 0;
        for (int j = 0; j < 4; ++j) {
          const int64_t b = first_b + j;
          if (wb[j] > 0 && joint[a * K + b] > 0) inner += wb[j] * (log_joint[a * K + b] - log_a[a]);
        }
        sum += slope[i] * inner;
      }
      factor[n] = -w[n] * last / total * sum;
    }
  });
  return -mi;
}

}  // namespace

// points (T, N, D) with T = 2B fields (field 2p: B's voxels for phi_AB, 2p + 1: A's voxels for
// phi_BA), targets (T, N) the target image's values there, masks (T, N) 0/1 or empty; moving
// (B, *shape_A), fixed (B, *shape_B); matrices (T, D, D), offsets (T, D) the affine parts.
// measure: 0 SSD, 1 global NCC (with eps, as losses/similarity.py's ncc), 2 mutual information
// (bins intensity bins, as losses/similarity.py's mi).
// Returns [similarity (B,), then, when need_grad, dtable and (dW, db) per layer].
std::vector<at::Tensor> similarity(const at::Tensor& points, const at::Tensor& targets, const at::Tensor& masks,
                                   const at::Tensor& moving, const at::Tensor& fixed, const at::Tensor& matrices,
                                   const at::Tensor& offsets, const at::Tensor& table, const at::Tensor& geometry,
                                   int64_t n_features, bool smoothstep, int64_t rows_per_table,
                                   const at::Tensor& level_weight, const std::vector<at::Tensor>& weights,
                                   const std::vector<at::Tensor>& biases, double scale, bool need_grad,
                                   int64_t measure, double eps, int64_t bins) {
  const Common common = check_common(table, geometry, n_features, smoothstep, rows_per_table, level_weight);
  const auto dtype = table.scalar_type();
  TORCH_CHECK(points.dim() == 3 && (points.size(2) == 2 || points.size(2) == 3) && points.is_contiguous() &&
                  points.scalar_type() == dtype && points.device().is_cpu(),
              "points: expected a contiguous CPU tensor (2B, N, 2 or 3) in the table's dtype");
  const int64_t T = points.size(0), N = points.size(1), dim = points.size(2), B = T / 2;
  TORCH_CHECK(T == common.n_fields && T % 2 == 0, "points: expected one row of points per field (2 per pair)");
  TORCH_CHECK(N > 0, "points: expected at least one point per field");
  TORCH_CHECK(measure == kSsd || measure == kNcc || (measure == kMi && bins >= 4),
              "measure: expected 0 (SSD), 1 (NCC) or 2 (MI, with bins >= 4)");
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
    const scalar_t* moving_data = moving.data_ptr<scalar_t>();
    const scalar_t* fixed_data = fixed.data_ptr<scalar_t>();
    at::parallel_for(0, P, kGrain, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {                          // one run of points of field t at a time
        const int64_t t = i / N, pair = t / 2, run_end = std::min(end, (t + 1) * N);
        const bool to_A = t % 2 == 0;
        const scalar_t* image = to_A ? moving_data + pair * voxels_A : fixed_data + pair * voxels_B;
        const int64_t* size = to_A ? size_A : size_B;
        scalar_t Mt[D * D], ot[D];
        for (int e = 0; e < D * D; ++e) Mt[e] = M[t * D * D + e];
        for (int k = 0; k < D; ++k) ot[k] = off[t * D + k];
        for (; i < run_end; ++i) {
          const scalar_t* xi = x + i * D;
          scalar_t y[D];
          bool in_cube = true;
          for (int k = 0; k < D; ++k) {
            y[k] = ot[k] + u[i * D + k];
            for (int j = 0; j < D; ++j) y[k] += Mt[k * D + j] * xi[j];
            in_cube = in_cube && y[k] >= 0 && y[k] <= 1;
          }
          residual[i] = sample_border<scalar_t, D>(image, size, y, image_gradient + i * D) - target[i];
          inside[i] = in_cube ? 1 : 0;
        }
      }
    });

    // Weights and the measure of each field, the fields in parallel (each one's measure is a serial
    // sum: a 2 mm brain's MI histogram took a thread 0.2 ms per field); dL/du for the reverse mode.
    const scalar_t* mask = has_masks ? masks.data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_u = scratch<scalar_t>(5, need_grad ? P * D : 0);
    std::vector<double> values(T, 0.0);
    at::parallel_for(0, T, 1, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t t = t_begin; t < t_end; ++t) {
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
        double total = 0;
        for (int64_t n = 0; n < N; ++n) total += w[n];
        // the field's value and d sim / d v_n per point (into factor), v_n = r_n + target_n
        std::vector<double> factor(need_grad ? N : 0);
        const scalar_t* r = residual + first;
        const scalar_t* tn = target + first;
        values[t] = measure == kSsd ? ssd_measure(r, tn, w.data(), N, total, need_grad ? factor.data() : nullptr)
                    : measure == kNcc ? ncc_measure(r, tn, w.data(), N, total, eps,
                                                    need_grad ? factor.data() : nullptr)
                                      : mi_measure(r, tn, w.data(), N, total, bins,
                                                   need_grad ? factor.data() : nullptr);
        for (int64_t n = 0; n < N && need_grad; ++n) {
          const scalar_t f = static_cast<scalar_t>(factor[n]);
          for (int k = 0; k < D; ++k) grad_u[(first + n) * D + k] = f * image_gradient[(first + n) * D + k];
        }
      }
    });
    scalar_t* sim = similarity.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) sim[t / 2] += static_cast<scalar_t>(values[t]);   // in field order
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

// The affine stage's cost terms for K affine maps y = M_k x + o_k (matrices (K, D, D), offsets
// (K, D), unit coordinates): image (*spatial, float64) sampled at y of the points x (P, D),
// w_p = image(M_k x_p + o_k), against target (P,), as losses/similarity.py computes them:
//   measure 0 (kSsd): mean((w - t)^2);
//   measure 1 (kNcc): the correlation cov / sqrt(var_w var_t + eps), cov = mean((w - mean w) t),
//                     var = mean of squares; target must be centred (sum 0);
//   measure 2 (kMi):  -MI of w and t with bins intensity bins (mi_measure; t in [0, 1], not centred).
// Returns [value (K,), d value / d M_k, d value / d o_k]. Sums are in double, per thread in a
// fixed order.
std::vector<at::Tensor> affine_ncc(const at::Tensor& image, const at::Tensor& points, const at::Tensor& target,
                                   const at::Tensor& matrices, const at::Tensor& offsets, double eps, int64_t measure,
                                   int64_t bins) {
  TORCH_CHECK(points.dim() == 2 && (points.size(1) == 2 || points.size(1) == 3) && points.is_contiguous() &&
                  points.scalar_type() == at::kDouble && points.device().is_cpu() && points.size(0) > 0,
              "points: expected a contiguous float64 CPU tensor (P > 0, 2 or 3)");
  const int64_t P = points.size(0), dim = points.size(1);
  TORCH_CHECK(image.dim() == dim && image.is_contiguous() && image.scalar_type() == at::kDouble &&
                  image.device().is_cpu() && image.numel() > 0,
              "image: expected a contiguous float64 CPU image with one axis per point coordinate");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == P && target.is_contiguous() &&
                  target.scalar_type() == at::kDouble,
              "target: expected (P,) float64 values, one per point");
  TORCH_CHECK(matrices.dim() == 3 && matrices.size(0) > 0, "matrices: expected (K, D, D)");
  TORCH_CHECK(measure == kSsd || measure == kNcc || (measure == kMi && bins >= 4),
              "measure: expected 0 (SSD), 1 (NCC) or 2 (MI, with bins >= 4)");
  const int64_t K = matrices.size(0);
  const bool ssd = measure == kSsd;
  check_affine_parts(matrices, offsets, K, dim, at::kDouble);
  auto corr = at::empty({K}, matrices.options());
  auto grad_matrices = at::empty_like(matrices);
  auto grad_offsets = at::empty_like(offsets);
  dispatch_dim(image, dim, [&](auto, auto dimension) {
    constexpr int D = decltype(dimension)::value;
    int64_t size[D];
    for (int k = 0; k < D; ++k) size[k] = image.size(k);
    const double* img = image.data_ptr<double>();
    const double* x = points.data_ptr<double>();
    const double* t = target.data_ptr<double>();
    const double* M = matrices.data_ptr<double>();
    const double* off = offsets.data_ptr<double>();
    double* warped = scratch<double>(0, K * P);
    double* gradient = scratch<double>(1, K * P * D);
    // Sample every map's points (and sum w for NCC's means).
    const std::vector<double> sums = per_map_sums(K, P, 1, [&](double* sum, int64_t i, int64_t k, int64_t p) {
      double y[D];
      for (int a = 0; a < D; ++a) {
        y[a] = off[k * D + a];
        for (int b = 0; b < D; ++b) y[a] += M[(k * D + a) * D + b] * x[p * D + b];
      }
      warped[i] = sample_border<double, D>(img, size, y, gradient + i * D);
      sum[0] += warped[i];
    });
    std::vector<double> mean(K), a(K), b(K);
    for (int64_t k = 0; k < K; ++k) mean[k] = sums[k] / P;
    double* c = corr.data_ptr<double>();
    double* slope = scratch<double>(2, measure == kMi ? K * P : 0);
    if (measure == kMi) {          // -MI per map, d / d w_p into slope (mi_measure, unit weights)
      const std::vector<double> ones(P, 1.0);
      auto maps = [&](int64_t begin, int64_t end) {
        std::vector<double> residual(P);
        for (int64_t k = begin; k < end; ++k) {
          for (int64_t p = 0; p < P; ++p) residual[p] = warped[k * P + p] - t[p];
          c[k] = mi_measure(residual.data(), t, ones.data(), P, static_cast<double>(P), bins, slope + k * P);
        }
      };
      if (K >= at::get_num_threads()) {
        at::parallel_for(0, K, 1, maps);     // the search's candidates: a map per thread
      } else {
        maps(0, K);                          // the refinement's one map: mi_measure's threads
      }
    } else if (ssd) {                     // d ssd / d w_p = 2 (w_p - t_p) / P
      const std::vector<double> squares = per_map_sums(K, P, 1, [&](double* sum, int64_t i, int64_t, int64_t p) {
        sum[0] += (warped[i] - t[p]) * (warped[i] - t[p]);
      });
      for (int64_t k = 0; k < K; ++k) c[k] = squares[k] / P;
    } else {
      // Centred sums (a one-pass formula would cancel): sum (w - mean)^2 and sum (w - mean) t.
      // d corr / d w_p = t_p / (P s) - cov var_t (w_p - mean) / (P s^3), s = sqrt(var_w var_t + eps)
      // (t sums to 0, so the mean's own derivative drops out).
      const std::vector<double> moments = per_map_sums(K, P, 2, [&](double* sum, int64_t i, int64_t k, int64_t p) {
        const double centred = warped[i] - mean[k];
        sum[0] += centred * centred;
        sum[1] += centred * t[p];
      });
      double var_t = 0;
      for (int64_t p = 0; p < P; ++p) var_t += t[p] * t[p];
      var_t /= P;
      for (int64_t k = 0; k < K; ++k) {
        const double cov = moments[2 * k + 1] / P, var_w = moments[2 * k] / P;
        const double root = std::sqrt(var_w * var_t + eps);
        c[k] = cov / root;
        a[k] = 1.0 / (P * root);
        b[k] = cov * var_t / (P * root * root * root);
      }
    }
    // The gradient: sum_p d value / d w_p * d w_p / d (M_k, o_k).
    constexpr int G = D * D + D;
    const std::vector<double> gradients = per_map_sums(K, P, G, [&](double* g, int64_t i, int64_t k, int64_t p) {
      const double dw = measure == kMi ? slope[i]
                        : ssd ? 2.0 * (warped[i] - t[p]) / P : a[k] * t[p] - b[k] * (warped[i] - mean[k]);
      for (int r = 0; r < D; ++r) {
        const double dy = dw * gradient[i * D + r];
        for (int col = 0; col < D; ++col) g[r * D + col] += dy * x[p * D + col];
        g[D * D + r] += dy;
      }
    });
    double* gM = grad_matrices.data_ptr<double>();
    double* go = grad_offsets.data_ptr<double>();
    for (int64_t k = 0; k < K; ++k) {
      for (int e = 0; e < D * D; ++e) gM[k * D * D + e] = gradients[k * G + e];
      for (int r = 0; r < D; ++r) go[k * D + r] = gradients[k * G + D * D + r];
    }
  });
  return {corr, grad_matrices, grad_offsets};
}

}  // namespace hashgrid
