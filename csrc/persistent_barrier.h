// The bounded grid barrier of the persistent BiGRU kernels (csrc/cuda/gru_cuda.cu), written once for
// the GPU and for the host: the CUDA kernels instantiate it with device-scope atomics and
// %globaltimer, the C++ test (csrc/tests/test_gru.cpp) with std::atomic and std::thread, so the
// protocol the GPU runs is the one the CPU tests.
//
// Protocol. The blocks of one direction share a counter that only grows: every block adds 1 per
// barrier (a release), so the i-th barrier (i = 1, 2, ...) is passed once the counter reaches
// target = i·blocks (no reset, no sense flag). One thread per block waits (relaxed loads, then an
// acquire fence once the target is seen: the other blocks' writes before their arrivals are then
// visible). The wait is bounded: a block that has waited `timeout_ns` without seeing the target
// claims the launch's status word (the first claim wins and records where: direction, step,
// block, arrivals counted and needed) and leaves the kernel; every block checks the status word
// before the counter, at every poll, so once one block has failed every other leaves at its next
// poll — including blocks that start only after others have left (blocks that were not
// co-resident), which see the counter already at the target but the failure first. (A waiting
// block whose two loads straddle a late block's arrival may pass that one barrier — every block
// had arrived there, so its data is complete — and leaves at the next.) Every wait ends within
// timeout_ns of its start and the first to expire fails the launch, so a launch that cannot complete
// ends about one timeout after its blocks stop progressing. No block ever traps: the kernel ends, the host reads the status word
// and raises an error naming the cause, and the CUDA context stays usable.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MARN_FAST_HOST_DEVICE __host__ __device__
#else
#define MARN_FAST_HOST_DEVICE
#endif

namespace marn_fast {

// The status words of one launch (int32, zero before it): the failure code and where it happened.
enum BarrierStatusWord : int {
  kStatusCode = 0,   // 0: no failure; kBarrierTimedOut
  kStatusDirection,  // the direction whose barrier timed out
  kStatusStep,       // its step (the recurrence's step index s)
  kStatusBlock,      // the block (blockIdx.x) that gave up first
  kStatusArrived,    // arrivals it had counted at that barrier
  kStatusTarget,     // arrivals that barrier needed
  kStatusWords
};
constexpr int kBarrierTimedOut = 1;

// Waits at a barrier of one direction (see above); false when the kernel must leave.
// Barrier provides: arrive() (release add of 1), arrived() (relaxed load of the counter), failed()
// (relaxed load of the status code != 0), acquire() (acquire fence), now_ns(), claim(code) (the
// status code from 0 to code, true for the one caller that set it) and record(word, value).
template <typename Barrier>
MARN_FAST_HOST_DEVICE inline bool bounded_barrier_wait(Barrier& bar, unsigned int target, uint64_t timeout_ns,
                                                       int direction, int step, int block) {
  bar.arrive();
  const uint64_t start = bar.now_ns();
  for (;;) {
    if (bar.failed()) return false;
    const unsigned int arrived = bar.arrived();
    if (arrived >= target) break;
    if (bar.now_ns() - start > timeout_ns) {
      if (bar.claim(kBarrierTimedOut)) {
        bar.record(kStatusDirection, direction);
        bar.record(kStatusStep, step);
        bar.record(kStatusBlock, block);
        bar.record(kStatusArrived, static_cast<int>(arrived));
        bar.record(kStatusTarget, static_cast<int>(target));
      }
      return false;
    }
  }
  bar.acquire();
  return true;
}

}  // namespace marn_fast
