// C++ test of the persistent BiGRU recurrence ops through the dispatcher (as a libtorch user calls
// them), in float64 against a step loop of ATen ops and its autograd:
//   forward: the states [2, B, T, h] (zero at s ≥ lengths[b]);
//   backward: dG_x = ∂L/∂G_x, and dG_h through what it determines, dW_hh = Σ dG_hᵀ·h_{s−1} and
//   db_hh = Σ dG_h, for L = Σ dH ⊙ H.
// And the CUDA kernels' bounded grid barrier (csrc/persistent_barrier.h), the same template on host
// threads: blocks that all run pass every barrier and see each other's writes; blocks that cannot
// all run at once (fewer worker threads than blocks), or a block that never arrives, make the
// launch fail within about one timeout with the failure recorded, and every block leaves.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <tuple>
#include <vector>

#include "../persistent_barrier.h"
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
                 .typed<T(const T&, const T&, const T&, const T&, int64_t, double, int64_t)>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::bigru_persistent_backward", "")
                 .typed<std::tuple<T, T>(const T&, const T&, const T&, const T&, const T&, const T&, int64_t, double,
                                         int64_t)>();
  const double timeout_s = 2.0;  // the CUDA kernels' barrier bound (range-checked on the CPU)
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
  const T got = fwd.call(gx.detach(), len, w_hh.detach(), b_hh.detach(), steps, timeout_s, -1);
  expect_close(got, want.detach(), 1e-12, "forward states (float64)");

  const auto grads = torch::autograd::grad({(want * dout).sum()}, {gx, w_hh, b_hh});
  const T hprev = at::constant_pad_nd(got.narrow(2, 0, Tn - 1), {0, 0, 1, 0});
  const T gh = at::baddbmm(b_hh.detach().unsqueeze(1), hprev.reshape({2, -1, H}), w_hh.detach().transpose(1, 2))
                   .reshape({2, B, Tn, 3 * H});
  auto [dgx, dgh] = bwd.call(dout, hprev, gx.detach(), gh, len, w_hh.detach(), steps, timeout_s, -1);
  expect_close(dgx, grads[0], 1e-12, "backward dG_x (float64)");
  expect_close(at::bmm(dgh.reshape({2, -1, 3 * H}).transpose(1, 2), hprev.reshape({2, -1, H})), grads[1], 1e-12,
               "backward dW_hh from dG_h (float64)");
  expect_close(dgh.sum({1, 2}), grads[2], 1e-12, "backward db_hh from dG_h (float64)");

  // float32: the same states to fp32 rounding.
  const T got32 = fwd.call(gx.detach().to(at::kFloat), len, w_hh.detach().to(at::kFloat),
                           b_hh.detach().to(at::kFloat), steps, timeout_s, -1);
  expect_close(got32.to(at::kDouble), want.detach(), 1e-5, "forward states (float32)");

  expect_throws([&] { fwd.call(gx.detach(), len, w_hh.detach().to(at::kFloat), b_hh.detach(), steps, timeout_s, -1); },
                "forward with w_hh of another dtype");
  expect_throws([&] { fwd.call(gx.detach(), len, w_hh.detach(), b_hh.detach(), Tn + 1, timeout_s, -1); },
                "forward with steps > T");
  expect_throws([&] { fwd.call(gx.detach(), len, w_hh.detach(), b_hh.detach(), steps, 0.0, -1); },
                "forward with timeout_s = 0");
  expect_throws(
      [&] { bwd.call(dout, hprev.narrow(3, 0, H - 1), gx.detach(), gh, len, w_hh.detach(), steps, timeout_s, -1); },
      "backward with hprev of the wrong shape");
  expect_throws([&] { bwd.call(dout, hprev, gx.detach(), gh, len, w_hh.detach(), steps, timeout_s, 0); },
                "backward with a block left out on the CPU");
}

// ---------------------------------------------------------------------------- the bounded barrier
// The launch's shared state on the host: one direction's counter and the status words.
struct Launch {
  std::atomic<unsigned int> counter{0};
  std::atomic<int> status[marn_fast::kStatusWords] = {};
};

// bounded_barrier_wait's Barrier on host atomics (the CUDA kernels' GridBarrier on device ones).
struct HostBarrier {
  Launch* launch;
  void arrive() { launch->counter.fetch_add(1u, std::memory_order_release); }
  unsigned int arrived() const {
    std::this_thread::yield();  // more blocks than cores here: let the others run
    return launch->counter.load(std::memory_order_relaxed);
  }
  bool failed() const { return launch->status[marn_fast::kStatusCode].load(std::memory_order_relaxed) != 0; }
  void acquire() const { std::atomic_thread_fence(std::memory_order_acquire); }
  uint64_t now_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  bool claim(int code) {
    int expected = 0;
    return launch->status[marn_fast::kStatusCode].compare_exchange_strong(expected, code, std::memory_order_relaxed);
  }
  void record(int word, int value) { launch->status[word].store(value, std::memory_order_relaxed); }
};

struct Outcome {
  int passed_all = 0, left = 0, stale_reads = 0, barriers_passed = 0;
  double seconds = 0;
  std::vector<int> block_barriers;      // barriers each block passed
  std::vector<double> block_seconds;    // how long each block ran
  Launch launch;
};

// `blocks` blocks of one direction run `steps` steps on `workers` threads (each thread runs blocks
// to their end, one after another: fewer workers than blocks means blocks that are not co-resident).
// Per step every block writes its slot of the step's row (plain stores), waits at the barrier, then
// reads the whole row: a value other than the step's means the barrier let it through too early
// or without ordering the other blocks' writes. absent ≥ 0: that block leaves at once.
void run_blocks(Outcome& out, int blocks, int steps, int workers, int absent, uint64_t timeout_ns) {
  std::vector<int> rows(static_cast<size_t>(steps) * blocks, -1);
  std::atomic<int> next_block{0}, passed{0}, left{0}, stale{0}, barriers{0};
  out.block_barriers.assign(blocks, 0);
  out.block_seconds.assign(blocks, 0.0);
  const auto start = std::chrono::steady_clock::now();
  auto worker = [&] {
    for (int block = next_block++; block < blocks; block = next_block++) {
      if (block == absent) continue;
      const auto block_start = std::chrono::steady_clock::now();
      HostBarrier bar{&out.launch};
      bool ok = true;
      for (int s = 0; s < steps && ok; ++s) {
        rows[static_cast<size_t>(s) * blocks + block] = s;
        ok = marn_fast::bounded_barrier_wait(bar, static_cast<unsigned int>(s + 1) * blocks, timeout_ns, 0, s, block);
        out.block_barriers[block] += ok;
        for (int b = 0; ok && b < blocks; ++b) stale += rows[static_cast<size_t>(s) * blocks + b] != s;
      }
      out.block_seconds[block] = std::chrono::duration<double>(std::chrono::steady_clock::now() - block_start).count();
      barriers += out.block_barriers[block];
      ++(ok ? passed : left);
    }
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out.passed_all = passed, out.left = left, out.stale_reads = stale, out.barriers_passed = barriers;
}

void test_bounded_barrier() {
  using marn_fast::kStatusArrived, marn_fast::kStatusBlock, marn_fast::kStatusCode, marn_fast::kStatusStep,
      marn_fast::kStatusTarget;
  const int blocks = 8, steps = 50;
  const uint64_t timeout_ns = 200'000'000;  // 0.2 s
  {
    Outcome all;  // every block runs at once: all pass every barrier, seeing every write
    run_blocks(all, blocks, steps, blocks, -1, 20'000'000'000ull);
    expect(all.passed_all == blocks && all.left == 0 && all.stale_reads == 0 && all.barriers_passed == steps * blocks,
           "co-resident blocks pass every barrier");
    expect(all.launch.counter.load() == static_cast<unsigned int>(steps * blocks) &&
               all.launch.status[kStatusCode].load() == 0,
           "co-resident blocks: the counter holds steps·blocks arrivals, no failure");
  }
  {
    Outcome crowded;  // one worker short: the last block starts only after others have left
    run_blocks(crowded, blocks, steps, blocks - 1, -1, timeout_ns);
    const auto* st = crowded.launch.status;
    expect(crowded.left == blocks && crowded.passed_all == 0, "not co-resident: every block leaves");
    // The late block (the last, started by a worker whose block has left) finds the counter at its
    // target (the first wave arrived before giving up) but the failure first: it passes no barrier
    // and leaves at its first poll. (A first-wave block may still pass one barrier when the late
    // block's arrival lands between its two loads: harmless, every block had arrived there.)
    expect(crowded.block_barriers[blocks - 1] == 0 && crowded.block_seconds[blocks - 1] < 0.5 * timeout_ns * 1e-9,
           "not co-resident: the late block passes no barrier and leaves at once");
    expect(st[kStatusCode].load() == marn_fast::kBarrierTimedOut && st[kStatusStep].load() == 0 &&
               st[kStatusArrived].load() == blocks - 1 && st[kStatusTarget].load() == blocks &&
               st[kStatusBlock].load() < blocks - 1,
           "not co-resident: the failure names step 0, blocks − 1 of blocks arrivals, a first-wave block");
    expect(crowded.seconds < 3 * timeout_ns * 1e-9, "not co-resident: all gone within about one timeout");
  }
  {
    Outcome absent;  // a block that never arrives (the CUDA ops' absent_block)
    run_blocks(absent, blocks, steps, blocks, 3, timeout_ns);
    expect(absent.left == blocks - 1 && absent.barriers_passed == 0 && absent.launch.status[kStatusArrived].load() == blocks - 1 &&
               absent.launch.status[kStatusStep].load() == 0 && absent.seconds < 3 * timeout_ns * 1e-9,
           "absent block: the others leave after one timeout, the failure recorded");
  }
}

}  // namespace

int main() {
  test_recurrence();
  test_bounded_barrier();
  return report();
}
