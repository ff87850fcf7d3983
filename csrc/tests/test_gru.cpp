// C++ test of the persistent BiGRU recurrence ops through the dispatcher (as a libtorch user calls
// them), in float64 against a step loop of ATen ops and its autograd:
//   forward: the states [2, B, T, h] (zero at s ≥ lengths[b]);
//   backward: dG_x = ∂L/∂G_x, and dG_h through what it determines, dW_hh = Σ dG_hᵀ·h_{s−1} and
//   db_hh = Σ dG_h, for L = Σ dH ⊙ H.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <tuple>
#include <vector>

#include "expect.h"

namespace {

using namespace marn_fast_test;

using T = at::Tensor;

// The recurrence with ATen ops: gx [2, B, T, 3h], w_hh [2, 3h, h], b_hh [2, 3h] → [2, B, T, h].
T reference_forward(const T& gx, const std::vector<int64_t>& lengths, const T& w_hh, const T& b_hh, int64_t steps) {
  const int64_t B = gx.size(1), H = w_hh.size(2);
  std::vector<T> directions;
  for (int64_t d = 0; d < 2; ++d) {
    T h = at::zeros({B, H}, gx.options());
    std::vector<T> states;
    for (int64_t s = 0; s < gx.size(2); ++s) {
      if (s >= steps) {
        states.push_back(at::zeros({B, H}, gx.options()));
        continue;
      }
      const T gh = at::addmm(b_hh[d], h, w_hh[d].t());
      const T g = gx[d].select(1, s);
      const T r = at::sigmoid(g.narrow(1, 0, H) + gh.narrow(1, 0, H));
      const T z = at::sigmoid(g.narrow(1, H, H) + gh.narrow(1, H, H));
      const T c = at::tanh(g.narrow(1, 2 * H, H) + r * gh.narrow(1, 2 * H, H));
      h = (1 - z) * c + z * h;
      std::vector<double> active(B);
      for (int64_t b = 0; b < B; ++b) active[b] = s < lengths[b] ? 1.0 : 0.0;
      states.push_back(h * at::tensor(active, gx.options()).unsqueeze(1));
    }
    directions.push_back(at::stack(states, 1));
  }
  return at::stack(directions);
}

void test_recurrence() {
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::bigru_persistent_forward", "")
                 .typed<T(const T&, const T&, const T&, const T&, int64_t)>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::bigru_persistent_backward", "")
                 .typed<std::tuple<T, T>(const T&, const T&, const T&, const T&, const T&, const T&, int64_t)>();
  at::manual_seed(3);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 3, Tn = 7, H = 5, steps = 7;
  const std::vector<int64_t> lengths{7, 1, 4};
  const T len = at::tensor(lengths, at::TensorOptions().dtype(at::kLong));
  const T gx = at::randn({2, B, Tn, 3 * H}, f64).set_requires_grad(true);
  const T w_hh = (at::randn({2, 3 * H, H}, f64) * 0.5).set_requires_grad(true);
  const T b_hh = at::randn({2, 3 * H}, f64).set_requires_grad(true);
  const T dout = at::randn({2, B, Tn, H}, f64);

  const T want = reference_forward(gx, lengths, w_hh, b_hh, steps);
  const T got = fwd.call(gx.detach(), len, w_hh.detach(), b_hh.detach(), steps);
  expect_close(got, want.detach(), 1e-12, "forward states (float64)");

  const auto grads = torch::autograd::grad({(want * dout).sum()}, {gx, w_hh, b_hh});
  const T hprev = at::constant_pad_nd(got.narrow(2, 0, Tn - 1), {0, 0, 1, 0});
  const T gh = at::baddbmm(b_hh.detach().unsqueeze(1), hprev.reshape({2, -1, H}), w_hh.detach().transpose(1, 2))
                   .reshape({2, B, Tn, 3 * H});
  auto [dgx, dgh] = bwd.call(dout, hprev, gx.detach(), gh, len, w_hh.detach(), steps);
  expect_close(dgx, grads[0], 1e-12, "backward dG_x (float64)");
  expect_close(at::bmm(dgh.reshape({2, -1, 3 * H}).transpose(1, 2), hprev.reshape({2, -1, H})), grads[1], 1e-12,
               "backward dW_hh from dG_h (float64)");
  expect_close(dgh.sum({1, 2}), grads[2], 1e-12, "backward db_hh from dG_h (float64)");

  // float32: the same states to fp32 rounding.
  const T got32 = fwd.call(gx.detach().to(at::kFloat), len, w_hh.detach().to(at::kFloat),
                           b_hh.detach().to(at::kFloat), steps);
  expect_close(got32.to(at::kDouble), want.detach(), 1e-5, "forward states (float32)");

  expect_throws([&] { fwd.call(gx.detach(), len, w_hh.detach().to(at::kFloat), b_hh.detach(), steps); },
                "forward with w_hh of another dtype");
  expect_throws([&] { fwd.call(gx.detach(), len, w_hh.detach(), b_hh.detach(), Tn + 1); },
                "forward with steps > T");
  expect_throws([&] { bwd.call(dout, hprev.narrow(3, 0, H - 1), gx.detach(), gh, len, w_hh.detach(), steps); },
                "backward with hprev of the wrong shape");
}

}  // namespace

int main() {
  test_recurrence();
  return report();
}
