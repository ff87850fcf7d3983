// Persistent BiGRU recurrence: the CUDA kernels of marn_fast/ops/bigru_persistent.py, whose
// _recurrence_forward / _recurrence_backward are their step-exact CPU twins (same slicing, same
// masking, same per-step arithmetic; see that module for the math and the host side).
//
// One cooperative launch per pass runs both directions: blocks [0, K) the forward direction, [K, 2K)
// the reverse one (already in processing order: step s of document b). Block k owns hidden units
// [k·U, (k+1)·U): forward keeps the three gate rows of W_hh for them on chip ([3U, h]), backward the
// columns ([3h, U]), for the whole sequence. Each step reads the full previous state (forward: h_{s−1};
// backward: dG_h of step s+1) from global memory (L2: __ldcg, never a stale L1 line), computes its
// units and writes them. The two directions exchange nothing, so each has its own barrier per step
// (a counter in global memory; the cooperative launch guarantees that all 2K blocks are resident).
// Step s+1's per-unit inputs are copied to shared memory asynchronously before the barrier, off the
// critical path. One block per SM (each asks for more than half an SM's shared memory). fp32 state
// and accumulation; inputs are fp32 (the host upcasts bf16/fp16).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda/atomic>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace marn_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Per-unit inputs of one backward step: dout, hprev, gx (r, z, n), gh (r, z, n).
constexpr int kBackwardInputs = 8;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Barrier of one direction's blocks. `counter` only grows: every block adds 1 per barrier, so the
// i-th barrier (i = 1, 2, ...) is passed once it reaches target = i·blocks_per_dir (no reset, no
// sense flag). The leading __syncthreads orders the block's writes before thread 0's release; thread
// 0's acquire plus the trailing __syncthreads order the other blocks' writes before every thread's
// next read (the pattern of cooperative_groups' grid.sync, per direction).
__device__ __forceinline__ void direction_barrier(unsigned int* counter, unsigned int target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> count(*counter);
    count.fetch_add(1u, cuda::memory_order_release);
    while (count.load(cuda::memory_order_acquire) < target) {
    }
  }
  __syncthreads();
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
// counters [2]: zero, one per direction.
__global__ void __launch_bounds__(kThreads, 1) gru_forward_kernel(
    const float* __restrict__ gx, const int64_t* __restrict__ lengths, const float* __restrict__ w_hh,
    const float* __restrict__ b_hh, float* __restrict__ hproc, float* __restrict__ hbuf,
    unsigned int* __restrict__ counters, int B, int T, int H, int units, int blocks_per_dir, int steps) {
  extern __shared__ __align__(16) float smem[];
  const int dir = blockIdx.x / blocks_per_dir;
  const int u0 = (blockIdx.x % blocks_per_dir) * units;
  const int nu = min(H, u0 + units) - u0;  // ≥ 1: blocks_per_dir = ⌈H / units⌉
  const int rows = 3 * nu;
  const bool vec = H % 4 == 0;     // 16-byte rows of hbuf and of hp
  float* w = smem;                 // [rows, H]: row r is gate r / nu of unit u0 + r % nu
  float* hp = w + 3 * units * H;   // [B, H]: h_{s−1}
  float* gh = hp + B * H;          // [B, rows]: h_{s−1}·W_hhᵀ for this block's rows
  float* gxs = gh + B * 3 * units;  // [2 parities][B, 3, units]: step s's gx for this block's units
  const float* W = w_hh + (int64_t)dir * 3 * H * H;
  const float* bias = b_hh + (int64_t)dir * 3 * H;
  for (int i = threadIdx.x; i < rows * H; i += kThreads) {
    const int r = i / H;
    w[i] = W[(int64_t)((r / nu) * H + u0 + r % nu) * H + i % H];
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
  unsigned int* counter = counters + dir;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (steps > 0) prefetch(0);
  for (int s = 0; s < steps; ++s) {
    if (s == 0) {
      for (int i = threadIdx.x; i < B * H; i += kThreads) hp[i] = 0.f;
    } else {
      copy_from_l2(hp, hbuf + (int64_t)(dir * 2 + (s + 1) % 2) * B * H, B * H, vec, threadIdx.x, kThreads);
    }
    __pipeline_wait_prior(0);  // this thread's part of step s's gx
    __syncthreads();
    for (int p = warp; p < B * rows; p += kWarps) {
      const int b = p / rows, r = p % rows;
      float acc = 0.f;
      for (int c = lane; c < H; c += 32) acc += hp[b * H + c] * w[r * H + c];
      acc = warp_sum(acc);
      if (lane == 0) gh[p] = acc;
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
      direction_barrier(counter, static_cast<unsigned int>(s + 1) * blocks_per_dir);
    }
  }
}

// dout, hprev [2, B, T, h]; gx, gh [2, B, T, 3h] (gh = h_{s−1}·W_hhᵀ + b_hh); lengths; w_hh [2, 3h, h]
// → dgx, dgh [2, B, T, 3h] (zero-filled by the caller; written at s < lengths[b]). dgh also carries
// dG_h of step s+1 between a direction's blocks. counters [2]: zero, one per direction.
__global__ void __launch_bounds__(kThreads, 1) gru_backward_kernel(
    const float* __restrict__ dout, const float* __restrict__ hprev, const float* __restrict__ gx,
    const float* __restrict__ gh, const int64_t* __restrict__ lengths, const float* __restrict__ w_hh,
    float* __restrict__ dgx, float* __restrict__ dgh, unsigned int* __restrict__ counters, int B, int T, int H,
    int units, int blocks_per_dir, int steps) {
  extern __shared__ __align__(16) float smem[];
  const int dir = blockIdx.x / blocks_per_dir;
  const int u0 = (blockIdx.x % blocks_per_dir) * units;
  const int nu = min(H, u0 + units) - u0;  // ≥ 1
  const int H3 = 3 * H;
  const bool vec = H % 4 == 0;     // 16-byte rows of dgh and of dg
  float* wc = smem;                // [3h, units]: column u0 + j of W_hh
  float* dg = wc + H3 * units;     // [B, 3h]: dG_h of step s + 1
  float* carry = dg + B * H3;      // [B, units]: g·z of step s + 1
  float* dh = carry + B * units;   // [B, units]: dh of step s (from s + 1)
  float* pf = dh + B * units;      // [2 parities][B, kBackwardInputs, units]: step s's per-unit inputs
  const float* W = w_hh + (int64_t)dir * H3 * H;
  for (int i = threadIdx.x; i < H3 * nu; i += kThreads) wc[(i / nu) * units + i % nu] = W[(int64_t)(i / nu) * H + u0 + i % nu];
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
  unsigned int* counter = counters + dir;
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
      for (int r = lane; r < H3; r += 32) acc += dg[b * H3 + r] * wc[r * units + j];
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
      direction_barrier(counter, static_cast<unsigned int>(steps - s) * blocks_per_dir);
    }
  }
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// Shared memory of each kernel in bytes for `units` units per block (the layouts above).
// marn_fast/ops/bigru_persistent.py (launch_plan) mirrors these two formulas.
size_t forward_smem(int64_t B, int64_t H, int64_t units) {
  return sizeof(float) * (3 * units * H + B * H + 3 * B * units + 2 * 3 * B * units);
}
size_t backward_smem(int64_t B, int64_t H, int64_t units) {
  return sizeof(float) * (3 * H * units + 3 * B * H + 2 * B * units + 2 * kBackwardInputs * B * units);
}

struct Launch {
  int units, blocks_per_dir;
  size_t smem;
};

// One block per SM, 2·K ≤ SMs blocks for both directions (a cooperative launch needs them all
// resident for the barriers), with as few units per block as that allows: units = ⌈H / ⌊SMs/2⌋⌉.
// Each block asks for at least half an SM's shared memory plus one byte, so no two share an SM.
// marn_fast/ops/bigru_persistent.py (launch_plan) makes the same decision before launching and falls
// back to cuDNN where it fails; these checks are the backstop.
template <typename Kernel>
Launch plan(Kernel kernel, int64_t H, size_t need_of_units(int64_t, int64_t, int64_t), int64_t B, const char* op) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->cooperativeLaunch, op, ": this GPU does not support cooperative launches");
  const int64_t max_blocks_per_dir = props->multiProcessorCount / 2;
  TORCH_CHECK(max_blocks_per_dir >= 1, op, ": needs at least 2 SMs, got ", props->multiProcessorCount);
  const int64_t units = (H + max_blocks_per_dir - 1) / max_blocks_per_dir;
  const int64_t blocks_per_dir = (H + units - 1) / units;
  const size_t need = need_of_units(B, H, units);
  TORCH_CHECK(need <= props->sharedMemPerBlockOptin, op, ": needs ", need, " bytes of shared memory per block (B=",
              B, ", h=", H, ", ", units, " units per block), this GPU allows ", props->sharedMemPerBlockOptin);
  const size_t smem = std::min<size_t>(props->sharedMemPerBlockOptin,
                                       std::max<size_t>(need, props->sharedMemPerMultiprocessor / 2 + 1));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  TORCH_CHECK(per_sm >= 1 && 2 * blocks_per_dir <= per_sm * props->multiProcessorCount, op, ": ", 2 * blocks_per_dir,
              " blocks of ", kThreads, " threads with ", smem, " bytes of shared memory do not fit one cooperative ",
              "launch (", per_sm, " per SM, ", props->multiProcessorCount, " SMs)");
  return {static_cast<int>(units), static_cast<int>(blocks_per_dir), smem};
}

// Both directions' blocks (2·K) in one cooperative launch on the current stream.
template <typename Kernel>
void launch(Kernel kernel, const Launch& l, void** args) {
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(2 * l.blocks_per_dir),
                                             dim3(kThreads), args, l.smem, at::cuda::getCurrentCUDAStream()));
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
                                         const at::Tensor& b_hh, int64_t steps) {
  const char* op = "marn_fast::bigru_persistent_forward";
  TORCH_CHECK(gx.dim() == 4 && gx.size(0) == 2 && gx.size(3) % 3 == 0, op, ": gx must be [2, B, T, 3h], got ",
              gx.sizes());
  const int64_t B = gx.size(1), T = gx.size(2), H = gx.size(3) / 3;
  check_f32(gx, "gx", gx.sizes(), gx, op);
  check_common(lengths, w_hh, B, T, H, steps, gx, op);
  check_f32(b_hh, "b_hh", {2, 3 * H}, gx, op);
  const c10::cuda::CUDAGuard guard(gx.device());
  at::Tensor hproc = at::zeros({2, B, T, H}, gx.options());
  if (B == 0 || steps == 0) return hproc;
  at::Tensor hbuf = at::empty({2, 2, B, H}, gx.options());
  at::Tensor counters = at::zeros({2}, gx.options().dtype(at::kInt));
  const Launch l = plan(gru_forward_kernel, H, forward_smem, B, op);
  const float* a_gx = gx.const_data_ptr<float>();
  const int64_t* a_len = lengths.const_data_ptr<int64_t>();
  const float* a_w = w_hh.const_data_ptr<float>();
  const float* a_b = b_hh.const_data_ptr<float>();
  float* a_h = hproc.mutable_data_ptr<float>();
  float* a_buf = hbuf.mutable_data_ptr<float>();
  auto* a_cnt = reinterpret_cast<unsigned int*>(counters.mutable_data_ptr<int>());
  int b = B, t = T, h = H, units = l.units, bpd = l.blocks_per_dir, st = steps;
  void* args[] = {&a_gx, &a_len, &a_w, &a_b, &a_h, &a_buf, &a_cnt, &b, &t, &h, &units, &bpd, &st};
  launch(gru_forward_kernel, l, args);
  return hproc;
}

std::tuple<at::Tensor, at::Tensor> bigru_persistent_backward_cuda(const at::Tensor& dout, const at::Tensor& hprev,
                                                                  const at::Tensor& gx, const at::Tensor& gh,
                                                                  const at::Tensor& lengths, const at::Tensor& w_hh,
                                                                  int64_t steps) {
  const char* op = "marn_fast::bigru_persistent_backward";
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == 2, op, ": dout must be [2, B, T, h], got ", dout.sizes());
  const int64_t B = dout.size(1), T = dout.size(2), H = dout.size(3);
  check_f32(dout, "dout", {2, B, T, H}, dout, op);
  check_f32(hprev, "hprev", {2, B, T, H}, dout, op);
  check_f32(gx, "gx", {2, B, T, 3 * H}, dout, op);
  check_f32(gh, "gh", {2, B, T, 3 * H}, dout, op);
  check_common(lengths, w_hh, B, T, H, steps, dout, op);
  const c10::cuda::CUDAGuard guard(dout.device());
  at::Tensor dgx = at::zeros({2, B, T, 3 * H}, dout.options());
  at::Tensor dgh = at::zeros({2, B, T, 3 * H}, dout.options());
  if (B == 0 || steps == 0) return {dgx, dgh};
  at::Tensor counters = at::zeros({2}, dout.options().dtype(at::kInt));
  const Launch l = plan(gru_backward_kernel, H, backward_smem, B, op);
  const float* a_dout = dout.const_data_ptr<float>();
  const float* a_hprev = hprev.const_data_ptr<float>();
  const float* a_gx = gx.const_data_ptr<float>();
  const float* a_gh = gh.const_data_ptr<float>();
  const int64_t* a_len = lengths.const_data_ptr<int64_t>();
  const float* a_w = w_hh.const_data_ptr<float>();
  float* a_dgx = dgx.mutable_data_ptr<float>();
  float* a_dgh = dgh.mutable_data_ptr<float>();
  auto* a_cnt = reinterpret_cast<unsigned int*>(counters.mutable_data_ptr<int>());
  int b = B, t = T, h = H, units = l.units, bpd = l.blocks_per_dir, st = steps;
  void* args[] = {&a_dout, &a_hprev, &a_gx, &a_gh, &a_len, &a_w, &a_dgx, &a_dgh, &a_cnt, &b, &t, &h, &units, &bpd, &st};
  launch(gru_backward_kernel, l, args);
  return {dgx, dgh};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CUDA, m) {
  m.impl("bigru_persistent_forward", &bigru_persistent_forward_cuda);
  m.impl("bigru_persistent_backward", &bigru_persistent_backward_cuda);
}

}  // namespace marn_fast
