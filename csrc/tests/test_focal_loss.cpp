// C++ test of the focal-loss CPU kernel through the dispatcher (as a libtorch user calls it), against a
// float64 ATen transcription of the official form and of the paper's eq. 16 with autograd gradients.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <tuple>

#include "expect.h"

namespace {

using namespace marn_fast_test;

// |got − want| ≤ rtol·|want| + atol_frac·max|want| everywhere.
void expect_close_relative(const at::Tensor& got, const at::Tensor& want, double rtol, double atol_frac,
                           const char* what) {
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  const bool same_shape = g.sizes() == w.sizes();
  const double atol = atol_frac * w.abs().max().item<double>();
  const double excess = same_shape ? ((g - w).abs() - (w.abs() * rtol + atol)).max().item<double>() : 1.0;
  if (!(excess <= 0)) std::printf("  (%s: tolerance exceeded by %g)\n", what, excess);
  expect(excess <= 0, what);
}

using Op = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, double, bool, bool, double,
                                              bool);

// Per-element loss in float64, straight from the formulas (autograd supplies the reference gradient).
at::Tensor reference_loss(const at::Tensor& x, const at::Tensor& y, double alpha, double gamma, bool balanced) {
  const at::Tensor log_p = -at::softplus(-x), log_1mp = -at::softplus(x);
  if (balanced) {
    return -y * alpha * at::pow(1 - at::sigmoid(x), gamma) * log_p -
           (1 - y) * (1 - alpha) * at::pow(at::sigmoid(x), gamma) * log_1mp;
  }
  const at::Tensor bce = -(y * log_p + (1 - y) * log_1mp);
  return alpha * at::pow(-at::expm1(-bce), gamma) * bce;
}

void test_matches_reference(const c10::TypedOperatorHandle<Op>& op) {
  at::manual_seed(0);
  const int64_t b = 3, l = 2049 + 1000;  // more than one kernel block, odd L
  const at::Tensor x32 = (at::rand({b, l}, at::kFloat) * 2 - 1) * 10;
  const at::Tensor y = at::rand({b, l}, at::kFloat) < 0.05;
  const double alpha = 0.25;
  for (const double gamma : {0.0, 0.5, 1.0, 2.0, 5.0}) {
    for (const bool balanced : {false, true}) {
      const at::Tensor xd = x32.to(at::kDouble).requires_grad_();
      const at::Tensor want = reference_loss(xd, y.to(at::kDouble), alpha, gamma, balanced);
      want.sum().backward();
      const at::Tensor want_grad = xd.grad();
      const at::Tensor want_d = want.detach();
      for (const auto& targets : {y.to(at::kFloat), y, y.to(at::kByte)}) {
        auto [loss, grad] = op.call(x32, targets, alpha, gamma, balanced, false, 1.0, true);
        expect_close_relative(loss, want_d, 1e-4, 1e-6, "per-element loss (fp32 logits)");
        expect_close_relative(grad, want_grad, 1e-4, 1e-6, "gradient (fp32 logits)");
        auto [mean, mean_grad] = op.call(x32, targets, alpha, gamma, balanced, true, 1.0 / x32.numel(), true);
        expect_close_relative(mean, want_d.mean(), 1e-5, 0, "mean loss (fp32 logits)");
        expect_close_relative(mean_grad, want_grad / x32.numel(), 1e-4, 1e-6, "mean gradient (fp32 logits)");
      }
      auto [loss64, grad64] = op.call(x32.to(at::kDouble), y, alpha, gamma, balanced, true, 1.0, true);
      expect_close_relative(loss64, want_d.sum(), 1e-10, 0, "sum loss (fp64 logits)");
      expect_close_relative(grad64, want_grad, 1e-9, 1e-12, "gradient (fp64 logits)");
    }
  }
}

void test_extreme_logits_and_determinism(const c10::TypedOperatorHandle<Op>& op) {
  const at::Tensor x = at::tensor({-200.0f, -100.0f, -20.0f, -1e-3f, 0.0f, 1e-3f, 20.0f, 100.0f, 200.0f}).repeat({2, 1});
  const at::Tensor y = at::stack({at::zeros({9}), at::ones({9})});
  for (const double gamma : {0.0, 0.5, 2.0}) {
    for (const bool balanced : {false, true}) {
      auto [loss, grad] = op.call(x, y, 0.25, gamma, balanced, false, 1.0, true);
      expect(loss.isfinite().all().item<bool>() && grad.isfinite().all().item<bool>(),
             "finite loss and gradient at ±200 logits");
      const at::Tensor xd = x.to(at::kDouble).requires_grad_();
      const at::Tensor want = reference_loss(xd, y.to(at::kDouble), 0.25, gamma, balanced);
      expect_close_relative(loss, want.detach(), 1e-4, 1e-6, "loss at extreme logits");
    }
  }
  at::manual_seed(1);
  const at::Tensor xs = at::randn({7, 5000}) * 4;
  const at::Tensor ys = at::rand({7, 5000}) < 0.01;
  auto first = op.call(xs, ys, 0.999, 2.0, false, true, 1.0, true);
  auto second = op.call(xs, ys, 0.999, 2.0, false, true, 1.0, true);
  expect(at::equal(std::get<0>(first), std::get<0>(second)) && at::equal(std::get<1>(first), std::get<1>(second)),
         "two calls give identical results");
  bool raised = false;
  try {
    op.call(xs, ys.narrow(1, 0, 10), 0.999, 2.0, false, true, 1.0, true);
  } catch (const c10::Error&) {
    raised = true;
  }
  expect(raised, "mismatched target shape is rejected");
}

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::focal_loss_forward", "").typed<Op>();
  test_matches_reference(op);
  test_extreme_logits_and_determinism(op);
  return report();
}
