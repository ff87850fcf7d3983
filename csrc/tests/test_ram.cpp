// C++ test of the fused RAM block ops through the dispatcher (as a libtorch user calls them), against
// ATen's conv1d / batch_norm / tanh and their autograd, in float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <tuple>

#include "expect.h"

namespace {

using namespace marn_fast_test;

using Opt = std::optional<at::Tensor>;
using T = at::Tensor;

// [B, n, C] ↔ [B, C, n]
T cl(const T& t) { return t.transpose(1, 2); }

T leaf(const T& t) { return t.detach().clone().set_requires_grad(true); }

constexpr double kTol = 1e-10;

void test_eval_block() {
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::ram_block_eval", "")
                 .typed<std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const T&, const Opt&, int64_t)>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::ram_block_eval_backward", "")
                 .typed<std::tuple<T, T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                     const Opt&, int64_t)>();
  at::manual_seed(1);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const T x = at::randn({2, 9, 4}, f64), w1 = at::randn({3, 4, 3}, f64), b1 = at::randn({3}, f64);
  const T w2 = at::randn({5, 3, 3}, f64), b2 = at::randn({5}, f64), other = at::randn({2, 9, 5}, f64);
  const T g = at::randn({2, 9, 5}, f64);
  auto [out, y1, v2] = fwd.call(x, w1, b1, w2, b2, other, 3);
  // Reference with autograd: tanh(conv2(tanh(conv1(x) + b1)) + b2) ⊙ other).
  T rx = leaf(x), rw1 = leaf(w1), rb1 = leaf(b1), rw2 = leaf(w2), rb2 = leaf(b2), ro = leaf(other);
  const T ry1 = at::tanh(at::conv1d(cl(rx), rw1, rb1, 1, 1));
  const T rout = cl(at::tanh(at::conv1d(ry1, rw2, rb2, 1, 1) * cl(ro)));
  expect_close(out, rout.detach(), kTol, "eval forward");
  expect_close(y1, cl(ry1).detach(), kTol, "eval y1");
  (rout * g).sum().backward();
  auto [dx, dw1, db1, dw2, db2, dother] = bwd.call(g, x, w1, y1, w2, v2, other, 3);
  expect_close(dx, rx.grad(), kTol, "eval dx");
  expect_close(dw1, rw1.grad(), kTol, "eval dw1");
  expect_close(db1, rb1.grad(), kTol, "eval db1");
  expect_close(dw2, rw2.grad(), kTol, "eval dw2");
  expect_close(db2, rb2.grad(), kTol, "eval db2");
  expect_close(dother, ro.grad(), kTol, "eval dother");

  expect_throws([&] { fwd.call(x, at::randn({3, 4, 5}, f64), b1, w2, b2, other, 3); }, "kernel size 5");
  expect_throws([&] { fwd.call(x, w1, b1, at::randn({5, 4, 3}, f64), b2, other, 3); }, "w2 channel mismatch");
  expect_throws([&] { fwd.call(cl(cl(x).contiguous()), w1, b1, w2, b2, other, 3); }, "non-contiguous x");
  expect_throws([&] { fwd.call(x, w1.to(at::kFloat), b1, w2, b2, other, 3); }, "dtype mismatch");
  expect_throws([&] { fwd.call(x, w1, b1, w2, b2, std::nullopt, 3); }, "missing other");
}

void test_train_block() {
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::ram_block_train", "")
                 .typed<std::tuple<T, T, T, T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                           const T&, const Opt&, int64_t, double, double)>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::ram_block_train_backward", "")
                 .typed<std::tuple<T, T, T, T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                           const T&, const T&, const T&, const T&, const T&, const T&,
                                                           const T&, const T&, const Opt&, int64_t, double, double)>();
  auto update = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::ram_bn_update_stats", "")
                    .typed<void(T&, T&, const T&, const T&, int64_t, double)>();
  at::manual_seed(2);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 3, n = 7;
  const T x = at::randn({B, n, 4}, f64), w1 = at::randn({6, 4, 3}, f64), w2 = at::randn({6, 6, 3}, f64);
  const T g1 = at::rand({6}, f64) + 0.5, be1 = at::randn({6}, f64), g2 = at::rand({6}, f64) + 0.5;
  const T be2 = at::randn({6}, f64), other = at::randn({B, n, 6}, f64), g = at::randn({B, n, 6}, f64);
  const double eps1 = 1e-5, eps2 = 1e-3;
  auto [out, z1, y1, z2, m1, v1, m2, v2] = fwd.call(x, w1, g1, be1, w2, g2, be2, other, 1, eps1, eps2);
  T rx = leaf(x), rw1 = leaf(w1), rg1 = leaf(g1), rb1 = leaf(be1), rw2 = leaf(w2), rg2 = leaf(g2), rb2 = leaf(be2);
  T ro = leaf(other);
  T rm1 = at::zeros({6}, f64), rv1 = at::ones({6}, f64);
  const T rz1 = at::conv1d(cl(rx), rw1, {}, 1, 1);
  const T ry1 = at::tanh(at::batch_norm(rz1, rg1, rb1, rm1, rv1, true, 0.1, eps1, false));
  const T rz2 = at::conv1d(ry1, rw2, {}, 1, 1);
  const T rout = cl(at::batch_norm(rz2, rg2, rb2, {}, {}, true, 0.1, eps2, false)) + ro;
  expect_close(out, rout.detach(), kTol, "train forward");
  expect_close(m1, rz1.detach().mean({0, 2}), kTol, "train mean1");
  expect_close(v1, rz1.detach().var({0, 2}, /*unbiased=*/false), kTol, "train var1");
  T um = at::zeros({6}, f64), uv = at::ones({6}, f64);
  update.call(um, uv, m1, v1, B * n, 0.1);
  expect_close(um, rm1, kTol, "running_mean update");
  expect_close(uv, rv1, kTol, "running_var update (unbiased)");
  (rout * g).sum().backward();
  auto [dx, dw1, dg1, db1, dw2, dg2, db2, dother] =
      bwd.call(g, x, w1, g1, z1, y1, m1, v1, w2, g2, be2, z2, m2, v2, other, 1, eps1, eps2);
  expect_close(dx, rx.grad(), kTol, "train dx");
  expect_close(dw1, rw1.grad(), kTol, "train dw1");
  expect_close(dg1, rg1.grad(), kTol, "train dgamma1");
  expect_close(db1, rb1.grad(), kTol, "train dbeta1");
  expect_close(dw2, rw2.grad(), kTol, "train dw2");
  expect_close(dg2, rg2.grad(), kTol, "train dgamma2");
  expect_close(db2, rb2.grad(), kTol, "train dbeta2");
  expect(dother.numel() == 0, "d_other is empty for the add epilogue");

  expect_throws([&] { fwd.call(x.narrow(0, 0, 1).narrow(1, 0, 1).contiguous(), w1, g1, be1, w2, g2, be2,
                               std::nullopt, 0, eps1, eps2); }, "train with one value per channel");
  expect_throws([&] { fwd.call(x, w1, at::randn({5}, f64), be1, w2, g2, be2, other, 1, eps1, eps2); },
                "gamma1 wrong size");
}

}  // namespace

int main() {
  test_eval_block();
  test_train_block();
  return report();
}
