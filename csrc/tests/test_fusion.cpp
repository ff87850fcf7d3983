// C++ test of the RAM elementwise fusion ops through the dispatcher (as a libtorch user calls them).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <tuple>

#include "expect.h"

namespace {

using namespace marn_fast_test;

void test_mul_tanh() {
  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("marn_fast::mul_tanh", "")
                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("marn_fast::mul_tanh_backward", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  at::manual_seed(0);
  // An odd shape, values past tanh's linear range, and a non-contiguous input.
  const at::Tensor u = at::randn({3, 7, 1001}, at::kDouble) * 3;
  const at::Tensor h = at::randn({3, 1001, 7}, at::kDouble).transpose(1, 2);
  const at::Tensor g = at::randn({3, 7, 1001}, at::kDouble);
  expect_close(fwd.call(u, h), at::tanh(u * h), 1e-12, "mul_tanh forward (float64)");
  const at::Tensor t = at::tanh(u * h);
  auto [du, dh] = bwd.call(g, u, h);
  expect_close(du, g * (1 - t * t) * h, 1e-12, "mul_tanh backward dU (float64)");
  expect_close(dh, g * (1 - t * t) * u, 1e-12, "mul_tanh backward dH (float64)");
  const at::Tensor uf = u.to(at::kFloat), hf = h.to(at::kFloat);
  expect_close(fwd.call(uf, hf), at::tanh(uf * hf), 1e-6, "mul_tanh forward (float32)");
  expect_throws([&] { fwd.call(u, h.narrow(2, 0, 5)); }, "mul_tanh rejects mismatched shapes");
}

}  // namespace

int main() {
  test_mul_tanh();
  return report();
}
