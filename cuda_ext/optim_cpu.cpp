// Adam's update of a list of tensors in one pass over each (CPU): neuralfield_reg/_optim.py's Adam
// runs five tensor operations per parameter (lerp, mul, addcmul, sqrt, addcdiv), each a pass over
// the whole hash table; here every element is read and written once. Per element, in the
// parameter's dtype:
//   m <- m + (1 - beta1) (g - m)
//   v <- beta2 v + (1 - beta2) g^2
//   p <- p - (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// with t the parameter's own step count (after this step), as torch.optim.Adam with its defaults
// (no weight decay, amsgrad or maximize). With AVX (the kernels are built with -march=native),
// 8 floats or 4 doubles at a time; the scalar loop does the rest.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace hashgrid {

namespace {

// The per-step numbers of an Adam update, in the parameter's dtype.
template <typename scalar_t>
struct AdamNumbers {
  scalar_t keep1, b2, keep2, step_size, root2, e;
};

// Entries i .. end - 1, one at a time (with skip_zero, those with a zero gradient are left alone).
template <typename scalar_t>
inline void adam_scalar(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, int64_t i, int64_t end,
                        const AdamNumbers<scalar_t>& a, bool skip_zero) {
  for (; i < end; ++i) {
    const scalar_t gi = g[i];
    if (skip_zero && gi == 0) continue;
    const scalar_t mi = m[i] + a.keep1 * (gi - m[i]);
    const scalar_t vi = a.b2 * v[i] + a.keep2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= a.step_size * (mi / (std::sqrt(vi) / a.root2 + a.e));
  }
}

#if defined(__AVX__)
// AVX registers of 8 floats (suffix ps) or 4 doubles (pd), with the operations the update needs.
template <typename scalar_t>
struct Avx;

#define NFREG_AVX_OPERATIONS(T, REG, S, LANES)                                                     \
  template <>                                                                                     \
  struct Avx<T> {                                                                                 \
    using reg = REG;                                                                              \
    static constexpr int kLanes = LANES;                                                          \
    static reg load(const T* x) { return _mm256_loadu_##S(x); }                                   \
    static void store(T* x, reg r) { _mm256_storeu_##S(x, r); }                                   \
    static reg splat(T a) { return _mm256_set1_##S(a); }                                          \
    static reg add(reg a, reg b) { return _mm256_add_##S(a, b); }                                 \
    static reg sub(reg a, reg b) { return _mm256_sub_##S(a, b); }                                 \
    static reg mul(reg a, reg b) { return _mm256_mul_##S(a, b); }                                 \
    static reg div(reg a, reg b) { return _mm256_div_##S(a, b); }                                 \
    static reg sqrt(reg a) { return _mm256_sqrt_##S(a); }                                         \
    static reg is_zero(reg a) { return _mm256_cmp_##S(a, _mm256_setzero_##S(), _CMP_EQ_OQ); }     \
    static int bits(reg mask) { return _mm256_movemask_##S(mask); }                               \
    static reg pick(reg where_clear, reg where_set, reg mask) { return _mm256_blendv_##S(where_clear, where_set, mask); } \
  };
NFREG_AVX_OPERATIONS(float, __m256, ps, 8)
NFREG_AVX_OPERATIONS(double, __m256d, pd, 4)
#undef NFREG_AVX_OPERATIONS

// The same update a register of entries at a time: the scalar loop's square root and division
// one entry at a time, and its branch on each gradient (a hash table's untouched rows are
// scattered, so that branch was mispredicted often), took most of a fit's Adam step. A register
// whose gradients are all zero is skipped with skip_zero; in the others, entries with a zero
// gradient keep their values.
template <typename scalar_t>
inline int64_t adam_vector(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, int64_t i, int64_t end,
                           const AdamNumbers<scalar_t>& a, bool skip_zero) {
  using S = Avx<scalar_t>;
  constexpr int all = (1 << S::kLanes) - 1;
  const auto keep1 = S::splat(a.keep1), b2 = S::splat(a.b2), keep2 = S::splat(a.keep2);
  const auto step_size = S::splat(a.step_size), root2 = S::splat(a.root2), e = S::splat(a.e);
  for (; i + S::kLanes <= end; i += S::kLanes) {
    const auto gi = S::load(g + i);
    const auto zero = S::is_zero(gi);
    if (skip_zero && S::bits(zero) == all) continue;
    const auto m0 = S::load(m + i), v0 = S::load(v + i), p0 = S::load(p + i);
    auto mi = S::add(m0, S::mul(keep1, S::sub(gi, m0)));
    auto vi = S::add(S::mul(b2, v0), S::mul(S::mul(keep2, gi), gi));
    auto pi = S::sub(p0, S::mul(step_size, S::div(mi, S::add(S::div(S::sqrt(vi), root2), e))));
    if (skip_zero) {
      mi = S::pick(mi, m0, zero);
      vi = S::pick(vi, v0, zero);
      pi = S::pick(pi, p0, zero);
    }
    S::store(m + i, mi);
    S::store(v + i, vi);
    S::store(p + i, pi);
  }
  return i;
}
#endif

template <typename scalar_t>
void adam_tensor(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, int64_t n, double learning_rate,
                 double beta1, double beta2, double eps, int64_t step, bool skip_zero) {
  AdamNumbers<scalar_t> a;
  a.keep1 = static_cast<scalar_t>(1 - beta1);
  a.b2 = static_cast<scalar_t>(beta2);
  a.keep2 = static_cast<scalar_t>(1 - beta2);
  a.step_size = static_cast<scalar_t>(learning_rate / (1 - std::pow(beta1, static_cast<double>(step))));
  a.root2 = static_cast<scalar_t>(std::sqrt(1 - std::pow(beta2, static_cast<double>(step))));
  a.e = static_cast<scalar_t>(eps);
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#if defined(__AVX__)
    i = adam_vector<scalar_t>(p, g, m, v, i, end, a, skip_zero);
#endif
    adam_scalar<scalar_t>(p, g, m, v, i, end, a, skip_zero);
  });
}

}  // namespace

// One Adam step of params[i] from grads[i] with moments firsts[i], seconds[i] (updated in place)
// at step steps[i] (1 on the first step). All tensors of one i: contiguous, CPU, same dtype
// (float32 or float64) and numel.
void adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& firsts, const std::vector<at::Tensor>& seconds,
               const std::vector<int64_t>& steps, double learning_rate, double beta1, double beta2, double eps,
               bool skip_zero) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && firsts.size() == count && seconds.size() == count && steps.size() == count,
              "adam_step: expected as many gradients, moments and step counts as parameters");
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    for (const at::Tensor* t : {&p, &grads[i], &firsts[i], &seconds[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == p.scalar_type() &&
                      t->numel() == p.numel(),
                  "adam_step: parameter ", i, ": expected contiguous CPU tensors of one dtype and size");
    }
    TORCH_CHECK(steps[i] >= 1, "adam_step: step counts start at 1");
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "adam_step", [&] {
      adam_tensor<scalar_t>(p.data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(), firsts[i].data_ptr<scalar_t>(),
                            seconds[i].data_ptr<scalar_t>(), p.numel(), learning_rate, beta1, beta2, eps, steps[i],
                            skip_zero);
    });
  }
}

}  // namespace hashgrid
