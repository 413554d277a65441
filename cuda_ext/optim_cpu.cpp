// Adam's update of a list of tensors in one pass over each (CPU): neuralfield_reg/_optim.py's Adam
// runs five tensor operations per parameter (lerp, mul, addcmul, sqrt, addcdiv), each a pass over
// the whole hash table; here every element is read and written once. Per element, in the
// parameter's dtype:
//   m <- m + (1 - beta1) (g - m)
//   v <- beta2 v + (1 - beta2) g^2
//   p <- p - (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// with t the parameter's own step count (after this step), as torch.optim.Adam with its defaults
// (no weight decay, amsgrad or maximize).
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace hashgrid {

namespace {

template <typename scalar_t>
void adam_tensor(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, int64_t n, double learning_rate,
                 double beta1, double beta2, double eps, int64_t step, bool skip_zero) {
  const scalar_t keep1 = static_cast<scalar_t>(1 - beta1), b2 = static_cast<scalar_t>(beta2);
  const scalar_t keep2 = static_cast<scalar_t>(1 - beta2);
  const scalar_t step_size = static_cast<scalar_t>(learning_rate / (1 - std::pow(beta1, static_cast<double>(step))));
  const scalar_t root2 = static_cast<scalar_t>(std::sqrt(1 - std::pow(beta2, static_cast<double>(step))));
  const scalar_t e = static_cast<scalar_t>(eps);
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t gi = g[i];
      if (skip_zero && gi == 0) continue;
      const scalar_t mi = m[i] + keep1 * (gi - m[i]);
      const scalar_t vi = b2 * v[i] + keep2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] -= step_size * (mi / (std::sqrt(vi) / root2 + e));
    }
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
