// Persistent BiGRU recurrence: the CUDA kernels of marn_fast/ops/bigru_persistent.py, whose
// _recurrence_forward / _recurrence_backward are their step-exact CPU twins (same slicing, same
// masking, same per-step arithmetic; see that module for the math and the host side).
//
// One cooperative launch per pass runs both directions: blocks [0, K) the forward direction, [K, 2K)
// the reverse one (already in processing order: step s of document b). Block k owns hidden units
// [k·U, (k+1)·U) (the last block may own fewer: nu = h − k·U): forward keeps the three gate rows of
// W_hh for them on chip ([3U, h]: in registers where each warp can hold one row, else in shared
// memory), backward the columns ([3h, U] in shared memory), for the whole sequence. Each step reads
// the full previous state (forward: h_{s−1}; backward: dG_h of step s+1) from global memory (L2:
// __ldcg, never a stale L1 line), computes its units and writes them. The two directions exchange
// nothing, so each has its own barrier per step: a counter in global memory, on an L2 line of its
// own, bounded in time (csrc/persistent_barrier.h): a block that waits longer than the launch's
// timeout marks the launch failed and every block leaves; the host then raises an error naming the
// cause, and the context stays usable (no trap). The cooperative launch guarantees that all 2K
// blocks are resident, so the bound only ever fires on a fault. Step s+1's per-unit inputs are
// copied to shared memory asynchronously before the barrier, off the critical path. One block per
// SM (each asks for more than half an SM's shared memory). fp32 state, accumulation and inputs
// (the host computes G_x and G_h in fp32, from bf16/fp16 GEMMs under autocast).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda/atomic>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../persistent_barrier.h"

namespace marn_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Per-unit inputs of one backward step: dout, hprev, gx (r, z, n), gh (r, z, n).
constexpr int kBackwardInputs = 8;
// Forward, register path: each warp holds one row of W_hh's slice, lane l its columns l + 32·k,
// k < kRegisterColumns (h ≤ 384). Taken when the block's 3·U rows fit one per warp.
constexpr int kRegisterColumns = 12;
// The launch's sync words (int32): each direction's barrier counter and the status words
// (persistent_barrier.h), each group on its own 128-byte L2 line.
constexpr int kLineWords = 32;
constexpr int kStatusOffset = 2 * kLineWords;
constexpr int kSyncWords = 3 * kLineWords;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// The device side of bounded_barrier_wait: device-scope atomics on the launch's sync words.
struct GridBarrier {
  unsigned int* counter;  // this direction's
  int* status;            // kStatusWords
  __device__ void arrive() {
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device>(*counter).fetch_add(1u, cuda::memory_order_release);
  }
  __device__ unsigned int arrived() const {
    return cuda::atomic_ref<unsigned int, cuda::thread_scope_device>(*counter).load(cuda::memory_order_relaxed);
  }
  __device__ bool failed() const {
    return cuda::atomic_ref<int, cuda::thread_scope_device>(status[kStatusCode]).load(cuda::memory_order_relaxed) != 0;
  }
  __device__ void acquire() const { cuda::atomic_thread_fence(cuda::memory_order_acquire, cuda::thread_scope_device); }
  __device__ uint64_t now_ns() const {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
  }
  __device__ bool claim(int code) {
    int expected = 0;
    return cuda::atomic_ref<int, cuda::thread_scope_device>(status[kStatusCode])
        .compare_exchange_strong(expected, code, cuda::memory_order_relaxed);
  }
  __device__ void record(int word, int value) {
    cuda::atomic_ref<int, cuda::thread_scope_device>(status[word]).store(value, cuda::memory_order_relaxed);
  }
};

// Barrier of one direction's blocks for the whole block: the leading __syncthreads orders every
// thread's writes before thread 0's release; thread 0 waits (bounded); its acquire plus the
// trailing __syncthreads order the other blocks' writes before every thread's next read (the
// pattern of cooperative_groups' grid.sync, per direction). Returns false in every thread of the
// block when the launch has failed: the caller then leaves the kernel.
__device__ __forceinline__ bool direction_barrier(GridBarrier& bar, unsigned int target, uint64_t timeout_ns, int dir,
                                                  int step, int* leave) {
  __syncthreads();
  if (threadIdx.x == 0) *leave = !bounded_barrier_wait(bar, target, timeout_ns, dir, step, blockIdx.x);
  __syncthreads();
  return !*leave;
}

// Copies `count` floats from global src to shared dst (both 16-byte aligned when vec), through L2.
__device__ __forceinline__ void copy_from_l2(float* dst, const float* src, int count, bool vec, int first, int step) {
  if (vec) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    for (int i = first; i < count / 4; i += step) d4[i] = __ldcg(s4 + i);
  } else {
    for (int i = first; i < count; i += step) dst[i] = __ldcg(src + i);
  }
}

// gx [2, B, T, 3h] (x·W_ihᵀ + b_ih), lengths [B], w_hh [2, 3h, h], b_hh [2, 3h] → hproc [2, B, T, h]
// (zero-filled by the caller; written at s < lengths[b]). hbuf [2 dirs, 2 parities, B, h]: the state
// exchanged between a direction's blocks, double-buffered (step s reads parity (s+1)%2, writes s%2).
// sync [kSyncWords]: zero (counters and status). absent_block ≥ 0: that block leaves at once, as if
// it never became resident (fault injection for the tests of the bounded barrier).
// kRegisterWeights: W_hh's rows in registers (3·U ≤ kWarps, h ≤ 32·kRegisterColumns), else in
// shared memory.
template <bool kRegisterWeights>
__global__ void __launch_bounds__(kThreads, 1) gru_forward_kernel(
    const float* __restrict__ gx, const int64_t* __restrict__ lengths, const float* __restrict__ w_hh,
    const float* __restrict__ b_hh, float* __restrict__ hproc, float* __restrict__ hbuf, unsigned int* sync, int B,
    int T, int H, int units, int blocks_per_dir, int steps, uint64_t timeout_ns, int absent_block) {
  if (static_cast<int>(blockIdx.x) == absent_block) return;
  extern __shared__ __align__(16) float smem[];
  __shared__ int leave;
  const int dir = blockIdx.x / blocks_per_dir;
  const int u0 = (blockIdx.x % blocks_per_dir) * units;
  const int nu = min(H, u0 + units) - u0;  // ≥ 1: blocks_per_dir = ⌈H / units⌉
  const int rows = 3 * nu;
  const bool vec = H % 4 == 0;     // 16-byte rows of hbuf and of hp
  float* w = smem;                 // [rows, H] (shared-memory path): row r is gate r / nu of unit u0 + r % nu
  float* hp = w + 3 * units * H;   // [B, H]: h_{s−1}
  float* gh = hp + B * H;          // [B, rows]: h_{s−1}·W_hhᵀ for this block's rows
  float* gxs = gh + B * 3 * units;  // [2 parities][B, 3, units]: step s's gx for this block's units
  const float* W = w_hh + (int64_t)dir * 3 * H * H;
  const float* bias = b_hh + (int64_t)dir * 3 * H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Register path: warp w computes row w % rows for the documents b ≡ w / rows (mod warps_per_row).
  [[maybe_unused]] const int warps_per_row = kRegisterWeights ? kWarps / rows : 1;
  [[maybe_unused]] const int my_row = warp % rows;
  [[maybe_unused]] const bool row_warp = kRegisterWeights && warp < rows * warps_per_row;
  [[maybe_unused]] float wreg[kRegisterWeights ? kRegisterColumns : 1];
  if constexpr (kRegisterWeights) {
    const float* src = W + (int64_t)((my_row / nu) * H + u0 + my_row % nu) * H;
#pragma unroll
    for (int k = 0; k < kRegisterColumns; ++k) {
      const int c = lane + 32 * k;
      wreg[k] = row_warp && c < H ? src[c] : 0.f;
    }
  } else {
    for (int i = threadIdx.x; i < rows * H; i += kThreads) {
      const int r = i / H;
      w[i] = W[(int64_t)((r / nu) * H + u0 + r % nu) * H + i % H];
    }
  }
  // Issues the asynchronous copy of step s's gx values of this block's units into gxs[s % 2].
  auto prefetch = [&](int s) {
    float* dst = gxs + (s & 1) * B * 3 * units;
    for (int p = threadIdx.x; p < B * rows; p += kThreads) {
      const int b = p / rows, q = p % rows, gate = q / nu, j = q % nu;
      const float* src = gx + (((int64_t)dir * B + b) * T + s) * 3 * H + gate * H + u0 + j;
      __pipeline_memcpy_async(dst + (b * 3 + gate) * units + j, src, sizeof(float));
    }
    __pipeline_commit();
  };
  GridBarrier bar{sync + dir * kLineWords, reinterpret_cast<int*>(sync + kStatusOffset)};
  if (steps > 0) prefetch(0);
  for (int s = 0; s < steps; ++s) {
    if (s == 0) {
      for (int i = threadIdx.x; i < B * H; i += kThreads) hp[i] = 0.f;
    } else {
      copy_from_l2(hp, hbuf + (int64_t)(dir * 2 + (s + 1) % 2) * B * H, B * H, vec, threadIdx.x, kThreads);
    }
    __pipeline_wait_prior(0);  // this thread's part of step s's gx
    __syncthreads();
    if constexpr (kRegisterWeights) {
      if (row_warp) {
        for (int b = warp / rows; b < B; b += warps_per_row) {
          const float* hb = hp + b * H;
          float acc = 0.f;
#pragma unroll
          for (int k = 0; k < kRegisterColumns; ++k) {
            const int c = lane + 32 * k;
            if (c < H) acc += hb[c] * wreg[k];
          }
          acc = warp_sum(acc);
          if (lane == 0) gh[b * rows + my_row] = acc;
        }
      }
    } else {
      for (int p = warp; p < B * rows; p += kWarps) {
        const int b = p / rows, r = p % rows;
        float acc = 0.f;
        for (int c = lane; c < H; c += 32) acc += hp[b * H + c] * w[r * H + c];
        acc = warp_sum(acc);
        if (lane == 0) gh[p] = acc;
      }
    }
    __syncthreads();
    const float* g3 = gxs + (s & 1) * B * 3 * units;
    float* next = hbuf + (int64_t)(dir * 2 + s % 2) * B * H;
    for (int p = threadIdx.x; p < B * nu; p += kThreads) {
      const int b = p / nu, j = p % nu, unit = u0 + j;
      float h = hp[b * H + unit];
      if (s < lengths[b]) {
        const float* g = g3 + b * 3 * units + j;
        const float* a = gh + b * rows;
        const float r = sigmoid(g[0] + a[j] + bias[unit]);
        const float z = sigmoid(g[units] + a[nu + j] + bias[H + unit]);
        const float c = tanhf(g[2 * units] + r * (a[2 * nu + j] + bias[2 * H + unit]));
        h = (1.f - z) * c + z * h;
        hproc[(((int64_t)dir * B + b) * T + s) * H + unit] = h;
      }
      next[b * H + unit] = h;
    }
    if (s + 1 < steps) {
      prefetch(s + 1);  // gxs[(s+1) % 2] was last read in step s − 1, before the last barrier
      if (!direction_barrier(bar, static_cast<unsigned int>(s + 1) * blocks_per_dir, timeout_ns, dir, s, &leave)) {
        __pipeline_wait_prior(0);  // no copy into shared memory outlives the block
        return;
      }
    }
  }
}

// dout, hprev [2, B, T, h]; gx, gh [2, B, T, 3h] (gh = h_{s−1}·W_hhᵀ + b_hh); lengths; w_hh [2, 3h, h]
// → dgx, dgh [2, B, T, 3h] (zero-filled by the caller; written at s < lengths[b]). dgh also carries
// dG_h of step s+1 between a direction's blocks. sync, absent_block: as in the forward kernel.
__global__ void __launch_bounds__(kThreads, 1) gru_backward_kernel(
    const float* __restrict__ dout, const float* __restrict__ hprev, const float* __restrict__ gx,
    const float* __restrict__ gh, const int64_t* __restrict__ lengths, const float* __restrict__ w_hh,
    float* __restrict__ dgx, float* __restrict__ dgh, unsigned int* sync, int B, int T, int H, int units,
    int blocks_per_dir, int steps, uint64_t timeout_ns, int absent_block) {
  if (static_cast<int>(blockIdx.x) == absent_block) return;
  extern __shared__ __align__(16) float smem[];
  __shared__ int leave;
  const int dir = blockIdx.x / blocks_per_dir;
  const int u0 = (blockIdx.x % blocks_per_dir) * units;
  const int nu = min(H, u0 + units) - u0;  // ≥ 1
  const int H3 = 3 * H;
  const int ws = units | 1;        // wc's row stride: odd, so a warp's 32 rows hit 32 banks
  const bool vec = H % 4 == 0;     // 16-byte rows of dgh and of dg
  float* wc = smem;                // [3h, ws]: column u0 + j of W_hh at wc[r·ws + j]
  float* dg = wc + H3 * ws;        // [B, 3h]: dG_h of step s + 1
  float* carry = dg + B * H3;      // [B, units]: g·z of step s + 1
  float* dh = carry + B * units;   // [B, units]: dh of step s (from s + 1)
  float* pf = dh + B * units;      // [2 parities][B, kBackwardInputs, units]: step s's per-unit inputs
  const float* W = w_hh + (int64_t)dir * H3 * H;
  for (int i = threadIdx.x; i < H3 * nu; i += kThreads) wc[(i / nu) * ws + i % nu] = W[(int64_t)(i / nu) * H + u0 + i % nu];
  for (int i = threadIdx.x; i < B * units; i += kThreads) carry[i] = 0.f;
  // Issues the asynchronous copy of step s's per-unit inputs of this block's units into pf[s % 2].
  auto prefetch = [&](int s) {
    float* dst = pf + (s & 1) * B * kBackwardInputs * units;
    for (int p = threadIdx.x; p < B * kBackwardInputs * nu; p += kThreads) {
      const int b = p / (kBackwardInputs * nu), q = p % (kBackwardInputs * nu), k = q / nu, j = q % nu;
      const int64_t row = ((int64_t)dir * B + b) * T + s;
      const float* src = k == 0 ? dout + row * H : k == 1 ? hprev + row * H
                       : k < 5  ? gx + row * H3 + (k - 2) * H : gh + row * H3 + (k - 5) * H;
      __pipeline_memcpy_async(dst + (b * kBackwardInputs + k) * units + j, src + u0 + j, sizeof(float));
    }
    __pipeline_commit();
  };
  GridBarrier bar{sync + dir * kLineWords, reinterpret_cast<int*>(sync + kStatusOffset)};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (steps > 0) prefetch(steps - 1);
  for (int s = steps - 1; s >= 0; --s) {
    if (s + 1 == steps) {
      for (int i = threadIdx.x; i < B * H3; i += kThreads) dg[i] = 0.f;
    } else {
      // 2-D: one warp per document row, lanes along the row's 3h values (float4 when h % 4 == 0).
      for (int b = warp; b < B; b += kWarps) {
        copy_from_l2(dg + b * H3, dgh + (((int64_t)dir * B + b) * T + s + 1) * H3, H3, vec, lane, 32);
      }
    }
    __pipeline_wait_prior(0);  // this thread's part of step s's inputs
    __syncthreads();
    for (int p = warp; p < B * nu; p += kWarps) {
      const int b = p / nu, j = p % nu;
      float acc = 0.f;
      for (int r = lane; r < H3; r += 32) acc += dg[b * H3 + r] * wc[r * ws + j];
      acc = warp_sum(acc);
      if (lane == 0) dh[b * units + j] = acc + carry[b * units + j];
    }
    __syncthreads();
    const float* in = pf + (s & 1) * B * kBackwardInputs * units;
    for (int p = threadIdx.x; p < B * nu; p += kThreads) {
      const int b = p / nu, j = p % nu, unit = u0 + j;
      float next_carry = 0.f;
      if (s < lengths[b]) {
        const float* v = in + b * kBackwardInputs * units + j;  // v[k·units]: input k of this unit
        const int64_t row = ((int64_t)dir * B + b) * T + s;
        const float g = v[0] + dh[b * units + j];
        const float r = sigmoid(v[2 * units] + v[5 * units]);
        const float z = sigmoid(v[3 * units] + v[6 * units]);
        const float hn = v[7 * units];
        const float c = tanhf(v[4 * units] + r * hn);
        const float da_n = g * (1.f - z) * (1.f - c * c);
        const float da_z = g * (v[units] - c) * z * (1.f - z);
        const float da_r = da_n * hn * r * (1.f - r);
        float* ox = dgx + row * H3;
        float* oh = dgh + row * H3;
        ox[unit] = da_r, ox[H + unit] = da_z, ox[2 * H + unit] = da_n;
        oh[unit] = da_r, oh[H + unit] = da_z, oh[2 * H + unit] = da_n * r;
        next_carry = g * z;
      }
      carry[b * units + j] = next_carry;
    }
    if (s > 0) {
      prefetch(s - 1);  // pf[(s−1) % 2] was last read in step s + 1, before the last barrier
      if (!direction_barrier(bar, static_cast<unsigned int>(steps - s) * blocks_per_dir, timeout_ns, dir, s,
                             &leave)) {
        __pipeline_wait_prior(0);  // no copy into shared memory outlives the block
        return;
      }
    }
  }
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// Shared memory of each kernel in bytes for `units` units per block (the layouts above; the
// forward's register path leaves w unused). marn_fast/ops/bigru_persistent.py (launch_plan) mirrors
// these two formulas and the register path's condition.
size_t forward_smem(int64_t B, int64_t H, int64_t units) {
  return sizeof(float) * (3 * units * H + B * H + 3 * B * units + 2 * 3 * B * units);
}
size_t backward_smem(int64_t B, int64_t H, int64_t units) {
  return sizeof(float) * (3 * H * (units | 1) + 3 * B * H + 2 * B * units + 2 * kBackwardInputs * B * units);
}
bool register_weights(int64_t H, int64_t units) { return 3 * units <= kWarps && H <= 32 * kRegisterColumns; }

// What a launch needs of the device, asked of it (cudaDeviceGetAttribute).
struct DeviceLimits {
  int sms, smem_optin, smem_per_sm;
  bool cooperative;
};

DeviceLimits device_limits(int device) {
  int sms = 0, optin = 0, per_sm = 0, cooperative = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  return {sms, optin, per_sm, cooperative != 0};
}

struct Launch {
  int units, blocks_per_dir;
  size_t smem;
};

// One block per SM, 2·K ≤ SMs blocks for both directions (a cooperative launch needs them all
// resident for the barriers), with as few units per block as that allows: units = ⌈H / ⌊SMs/2⌋⌉.
// Each block asks for at least half an SM's shared memory plus one byte, so no two share an SM.
// marn_fast/ops/bigru_persistent.py (launch_plan, device_limits) makes the same decision before
// launching and falls back to cuDNN where it fails; these checks are the backstop.
Launch plan(int64_t H, int64_t B, int64_t steps, size_t need_of_units(int64_t, int64_t, int64_t),
            const DeviceLimits& d, const char* op) {
  TORCH_CHECK(d.cooperative, op, ": this GPU does not support cooperative launches (cudaDevAttrCooperativeLaunch = 0)");
  const int64_t max_blocks_per_dir = d.sms / 2;
  TORCH_CHECK(max_blocks_per_dir >= 1, op, ": needs at least 2 SMs, got ", d.sms);
  const int64_t units = (H + max_blocks_per_dir - 1) / max_blocks_per_dir;
  const int64_t blocks_per_dir = (H + units - 1) / units;
  const size_t need = need_of_units(B, H, units);
  TORCH_CHECK(need <= static_cast<size_t>(d.smem_optin), op, ": needs ", need, " bytes of shared memory per block (B=",
              B, ", h=", H, ", ", units, " units per block), this GPU allows ", d.smem_optin);
  // The barrier counters reach steps·K (int32 status words record it).
  TORCH_CHECK(steps * blocks_per_dir <= INT32_MAX, op, ": ", steps, " steps of ", blocks_per_dir,
              " blocks overflow the barrier counters");
  const size_t smem = std::min<size_t>(d.smem_optin, std::max<size_t>(need, d.smem_per_sm / 2 + 1));
  return {static_cast<int>(units), static_cast<int>(blocks_per_dir), smem};
}

// Both directions' blocks (2·K) in one cooperative launch on the current stream. A launch error
// (e.g. cudaErrorCooperativeLaunchTooLarge) raises and is cleared: it does not poison the context.
template <typename Kernel>
void launch(Kernel kernel, const Launch& l, const DeviceLimits& d, void** args, const char* op) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, l.smem));
  TORCH_CHECK(per_sm >= 1 && 2 * l.blocks_per_dir <= per_sm * d.sms, op, ": ", 2 * l.blocks_per_dir, " blocks of ",
              kThreads, " threads with ", l.smem, " bytes of shared memory do not fit one cooperative launch (", per_sm,
              " per SM, ", d.sms, " SMs)");
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(2 * l.blocks_per_dir),
                                             dim3(kThreads), args, l.smem, at::cuda::getCurrentCUDAStream()));
}

// The launch's status words, read once it has finished (this waits for it): an error naming the
// cause when a barrier timed out (csrc/persistent_barrier.h). The kernel itself never traps, so
// the context stays usable after the error.
void check_status(const at::Tensor& sync, const Launch& l, double timeout_s, const char* op) {
  const at::Tensor status = sync.narrow(0, kStatusOffset, kStatusWords).to(at::kCPU);
  const int* s = status.const_data_ptr<int>();
  TORCH_CHECK(s[kStatusCode] == 0, op, ": the grid barrier timed out after ", timeout_s, " s (direction ",
              s[kStatusDirection], ", step ", s[kStatusStep], ": block ", s[kStatusBlock], " counted ",
              s[kStatusArrived], " of the ", s[kStatusTarget], " arrivals it waited for, ", l.blocks_per_dir,
              " blocks per direction). The kernel's blocks were not all running at once (not co-resident: another "
              "kernel, process or an MPS / green-context SM limit held SMs) or one of them stalled. Every block left "
              "the kernel and its result is discarded; the CUDA context remains usable (impl='packed' runs cuDNN).");
}

// Sync words of one launch (zero: counters and status) and the barrier timeout in ns.
at::Tensor sync_words(const at::Tensor& ref) { return at::zeros({kSyncWords}, ref.options().dtype(at::kInt)); }

uint64_t timeout_ns(double timeout_s, int64_t absent_block, const char* op) {
  TORCH_CHECK(timeout_s > 0 && timeout_s <= 3600, op, ": timeout_s must lie in (0, 3600], got ", timeout_s);
  TORCH_CHECK(absent_block >= -1, op, ": absent_block must be -1 (none) or a block index, got ", absent_block);
  return static_cast<uint64_t>(timeout_s * 1e9);
}

void check_common(const at::Tensor& lengths, const at::Tensor& w_hh, int64_t B, int64_t T, int64_t H, int64_t steps,
                  const at::Tensor& ref, const char* op) {
  TORCH_CHECK(lengths.device() == ref.device() && lengths.scalar_type() == at::kLong && lengths.dim() == 1 &&
                  lengths.size(0) == B && lengths.is_contiguous(),
              op, ": lengths must be a contiguous int64 [B=", B, "] tensor on ", ref.device(), ", got ",
              lengths.scalar_type(), " ", lengths.sizes(), " on ", lengths.device());
  check_f32(w_hh, "w_hh", {2, 3 * H, H}, ref, op);
  TORCH_CHECK(steps >= 0 && steps <= T, op, ": steps must lie in [0, T=", T, "], got ", steps);
}

at::Tensor bigru_persistent_forward_cuda(const at::Tensor& gx, const at::Tensor& lengths, const at::Tensor& w_hh,
                                         const at::Tensor& b_hh, int64_t steps, double timeout_s,
                                         int64_t absent_block) {
  const char* op = "marn_fast::bigru_persistent_forward";
  TORCH_CHECK(gx.dim() == 4 && gx.size(0) == 2 && gx.size(3) % 3 == 0, op, ": gx must be [2, B, T, 3h], got ",
              gx.sizes());
  const int64_t B = gx.size(1), T = gx.size(2), H = gx.size(3) / 3;
  check_f32(gx, "gx", gx.sizes(), gx, op);
  check_common(lengths, w_hh, B, T, H, steps, gx, op);
  check_f32(b_hh, "b_hh", {2, 3 * H}, gx, op);
  const uint64_t wait_ns = timeout_ns(timeout_s, absent_block, op);
  const c10::cuda::CUDAGuard guard(gx.device());
  at::Tensor hproc = at::zeros({2, B, T, H}, gx.options());
  if (B == 0 || steps == 0) return hproc;
  at::Tensor hbuf = at::empty({2, 2, B, H}, gx.options());
  at::Tensor sync = sync_words(gx);
  const DeviceLimits d = device_limits(gx.get_device());
  const Launch l = plan(H, B, steps, forward_smem, d, op);
  auto* kernel = register_weights(H, l.units) ? gru_forward_kernel<true> : gru_forward_kernel<false>;
  const float* a_gx = gx.const_data_ptr<float>();
  const int64_t* a_len = lengths.const_data_ptr<int64_t>();
  const float* a_w = w_hh.const_data_ptr<float>();
  const float* a_b = b_hh.const_data_ptr<float>();
  float* a_h = hproc.mutable_data_ptr<float>();
  float* a_buf = hbuf.mutable_data_ptr<float>();
  auto* a_sync = reinterpret_cast<unsigned int*>(sync.mutable_data_ptr<int>());
  int b = B, t = T, h = H, units = l.units, bpd = l.blocks_per_dir, st = steps, absent = absent_block;
  uint64_t wait = wait_ns;
  void* args[] = {&a_gx, &a_len, &a_w, &a_b, &a_h, &a_buf, &a_sync, &b, &t, &h, &units, &bpd, &st, &wait, &absent};
  launch(kernel, l, d, args, op);
  check_status(sync, l, timeout_s, op);
  return hproc;
}

std::tuple<at::Tensor, at::Tensor> bigru_persistent_backward_cuda(const at::Tensor& dout, const at::Tensor& hprev,
                                                                  const at::Tensor& gx, const at::Tensor& gh,
                                                                  const at::Tensor& lengths, const at::Tensor& w_hh,
                                                                  int64_t steps, double timeout_s,
                                                                  int64_t absent_block) {
  const char* op = "marn_fast::bigru_persistent_backward";
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == 2, op, ": dout must be [2, B, T, h], got ", dout.sizes());
  const int64_t B = dout.size(1), T = dout.size(2), H = dout.size(3);
  check_f32(dout, "dout", {2, B, T, H}, dout, op);
  check_f32(hprev, "hprev", {2, B, T, H}, dout, op);
  check_f32(gx, "gx", {2, B, T, 3 * H}, dout, op);
  check_f32(gh, "gh", {2, B, T, 3 * H}, dout, op);
  check_common(lengths, w_hh, B, T, H, steps, dout, op);
  const uint64_t wait_ns = timeout_ns(timeout_s, absent_block, op);
  const c10::cuda::CUDAGuard guard(dout.device());
  at::Tensor dgx = at::zeros({2, B, T, 3 * H}, dout.options());
  at::Tensor dgh = at::zeros({2, B, T, 3 * H}, dout.options());
  if (B == 0 || steps == 0) return {dgx, dgh};
  at::Tensor sync = sync_words(dout);
  const DeviceLimits d = device_limits(dout.get_device());
  const Launch l = plan(H, B, steps, backward_smem, d, op);
  const float* a_dout = dout.const_data_ptr<float>();
  const float* a_hprev = hprev.const_data_ptr<float>();
  const float* a_gx = gx.const_data_ptr<float>();
  const float* a_gh = gh.const_data_ptr<float>();
  const int64_t* a_len = lengths.const_data_ptr<int64_t>();
  const float* a_w = w_hh.const_data_ptr<float>();
  float* a_dgx = dgx.mutable_data_ptr<float>();
  float* a_dgh = dgh.mutable_data_ptr<float>();
  auto* a_sync = reinterpret_cast<unsigned int*>(sync.mutable_data_ptr<int>());
  int b = B, t = T, h = H, units = l.units, bpd = l.blocks_per_dir, st = steps, absent = absent_block;
  uint64_t wait = wait_ns;
  void* args[] = {&a_dout, &a_hprev, &a_gx, &a_gh, &a_len, &a_w, &a_dgx, &a_dgh, &a_sync,
                  &b,      &t,       &h,    &units, &bpd,  &st,  &wait, &absent};
  launch(gru_backward_kernel, l, d, args, op);
  check_status(sync, l, timeout_s, op);
  return {dgx, dgh};
}

// [SMs, shared memory per block (opt-in, bytes), cooperative launch (0/1)] of `like`'s GPU: what
// marn_fast/ops/bigru_persistent.py (device_limits) plans the launches with.
std::vector<int64_t> bigru_persistent_device_limits_cuda(const at::Tensor& like) {
  const DeviceLimits d = device_limits(like.get_device());
  return {d.sms, d.smem_optin, d.cooperative ? 1 : 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CUDA, m) {
  m.impl("bigru_persistent_forward", &bigru_persistent_forward_cuda);
  m.impl("bigru_persistent_backward", &bigru_persistent_backward_cuda);
  m.impl("bigru_persistent_device_limits", &bigru_persistent_device_limits_cuda);
}

}  // namespace marn_fast
