// Persistent BiGRU recurrence: the CUDA kernels of marn_fast/ops/bigru_persistent.py, whose
// _recurrence_forward / _recurrence_backward are their step-exact CPU twins (same slicing, same
// masking, same per-step arithmetic; see that module for the math and the host side).
//
// One cooperative launch per pass runs both directions: blocks [0, K) the forward direction, [K, 2K)
// the reverse one (already in processing order: step s of document b). Block k owns hidden units
// [k·U, (k+1)·U): forward keeps the three gate rows of W_hh for them on chip ([3U, h]), backward the
// columns ([3h, U]), for the whole sequence. Each step reads the full previous state (forward: h_{s−1};
// backward: dG_h of step s+1) from global memory (it stays in L2), computes its units and writes
// them; one grid-wide barrier per step. fp32 state and accumulation; inputs are fp32 (the host
// upcasts bf16/fp16).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace marn_fast {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// gx [2, B, T, 3h] (x·W_ihᵀ + b_ih), lengths [B], w_hh [2, 3h, h], b_hh [2, 3h] → hproc [2, B, T, h]
// (zero-filled by the caller; written at s < lengths[b]). hbuf [2 dirs, 2 parities, B, h].
__global__ void __launch_bounds__(kThreads) gru_forward_kernel(
    const float* __restrict__ gx, const int64_t* __restrict__ lengths, const float* __restrict__ w_hh,
    const float* __restrict__ b_hh, float* __restrict__ hproc, float* __restrict__ hbuf, int B, int T, int H,
    int units, int blocks_per_dir, int steps) {
  extern __shared__ float smem[];
  const int dir = blockIdx.x / blocks_per_dir;
  const int u0 = (blockIdx.x % blocks_per_dir) * units;
  const int nu = max(0, min(H, u0 + units) - u0);
  const int rows = 3 * nu;
  float* w = smem;                // [rows, H]: row r is gate r / nu of unit u0 + r % nu
  float* hp = w + 3 * units * H;  // [B, H]: h_{s−1}
  float* gh = hp + B * H;         // [B, rows]: h_{s−1}·W_hhᵀ for this block's rows
  const float* W = w_hh + (int64_t)dir * 3 * H * H;
  const float* bias = b_hh + (int64_t)dir * 3 * H;
  for (int i = threadIdx.x; i < rows * H; i += kThreads) {
    const int r = i / H;
    w[i] = W[(int64_t)((r / nu) * H + u0 + r % nu) * H + i % H];
  }
  cg::grid_group grid = cg::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int s = 0; s < steps; ++s) {
    const float* prev = hbuf + (int64_t)(dir * 2 + (s + 1) % 2) * B * H;
    for (int i = threadIdx.x; i < B * H; i += kThreads) hp[i] = s == 0 ? 0.f : prev[i];
    __syncthreads();
    for (int p = warp; p < B * rows; p += kWarps) {
      const int b = p / rows, r = p % rows;
      float acc = 0.f;
      for (int c = lane; c < H; c += 32) acc += hp[b * H + c] * w[r * H + c];
      acc = warp_sum(acc);
      if (lane == 0) gh[p] = acc;
    }
    __syncthreads();
    float* next = hbuf + (int64_t)(dir * 2 + s % 2) * B * H;
    for (int p = threadIdx.x; p < B * nu; p += kThreads) {
      const int b = p / nu, j = p % nu, unit = u0 + j;
      float h = hp[b * H + unit];
      if (s < lengths[b]) {
        const int64_t row = ((int64_t)dir * B + b) * T + s;
        const float* g = gx + row * 3 * H;
        const float* a = gh + b * rows;
        const float r = sigmoid(g[unit] + a[j] + bias[unit]);
        const float z = sigmoid(g[H + unit] + a[nu + j] + bias[H + unit]);
        const float c = tanhf(g[2 * H + unit] + r * (a[2 * nu + j] + bias[2 * H + unit]));
        h = (1.f - z) * c + z * h;
        hproc[row * H + unit] = h;
      }
      next[b * H + unit] = h;
    }
    grid.sync();
  }
}

// dout, hprev [2, B, T, h]; gx, gh [2, B, T, 3h] (gh = h_{s−1}·W_hhᵀ + b_hh); lengths; w_hh [2, 3h, h]
// → dgx, dgh [2, B, T, 3h] (zero-filled by the caller; written at s < lengths[b]).
__global__ void __launch_bounds__(kThreads) gru_backward_kernel(
    const float* __restrict__ dout, const float* __restrict__ hprev, const float* __restrict__ gx,
    const float* __restrict__ gh, const int64_t* __restrict__ lengths, const float* __restrict__ w_hh,
    float* __restrict__ dgx, float* __restrict__ dgh, int B, int T, int H, int units, int blocks_per_dir,
    int steps) {
  extern __shared__ float smem[];
  const int dir = blockIdx.x / blocks_per_dir;
  const int u0 = (blockIdx.x % blocks_per_dir) * units;
  const int nu = max(0, min(H, u0 + units) - u0);
  const int H3 = 3 * H;
  float* wc = smem;                // [3h, units]: column u0 + j of W_hh
  float* dg = wc + H3 * units;     // [B, 3h]: dG_h of step s + 1
  float* carry = dg + B * H3;      // [B, units]: g·z of step s + 1
  float* dh = carry + B * units;   // [B, units]: dh of step s (from s + 1)
  const float* W = w_hh + (int64_t)dir * H3 * H;
  for (int i = threadIdx.x; i < H3 * nu; i += kThreads) wc[(i / nu) * units + i % nu] = W[(int64_t)(i / nu) * H + u0 + i % nu];
  for (int i = threadIdx.x; i < B * units; i += kThreads) carry[i] = 0.f;
  cg::grid_group grid = cg::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int s = steps - 1; s >= 0; --s) {
    for (int i = threadIdx.x; i < B * H3; i += kThreads) {
      const int b = i / H3;
      dg[i] = s + 1 < steps ? dgh[(((int64_t)dir * B + b) * T + s + 1) * H3 + i % H3] : 0.f;
    }
    __syncthreads();
    for (int p = warp; p < B * nu; p += kWarps) {
      const int b = p / nu, j = p % nu;
      float acc = 0.f;
      for (int r = lane; r < H3; r += 32) acc += dg[b * H3 + r] * wc[r * units + j];
      acc = warp_sum(acc);
      if (lane == 0) dh[b * units + j] = acc + carry[b * units + j];
    }
    __syncthreads();
    for (int p = threadIdx.x; p < B * nu; p += kThreads) {
      const int b = p / nu, j = p % nu, unit = u0 + j;
      float next_carry = 0.f;
      if (s < lengths[b]) {
        const int64_t row = ((int64_t)dir * B + b) * T + s;
        const float* x3 = gx + row * H3;
        const float* h3 = gh + row * H3;
        const float g = dout[row * H + unit] + dh[b * units + j];
        const float r = sigmoid(x3[unit] + h3[unit]);
        const float z = sigmoid(x3[H + unit] + h3[H + unit]);
        const float hn = h3[2 * H + unit];
        const float c = tanhf(x3[2 * H + unit] + r * hn);
        const float da_n = g * (1.f - z) * (1.f - c * c);
        const float da_z = g * (hprev[row * H + unit] - c) * z * (1.f - z);
        const float da_r = da_n * hn * r * (1.f - r);
        float* ox = dgx + row * H3;
        float* oh = dgh + row * H3;
        ox[unit] = da_r, ox[H + unit] = da_z, ox[2 * H + unit] = da_n;
        oh[unit] = da_r, oh[H + unit] = da_z, oh[2 * H + unit] = da_n * r;
        next_carry = g * z;
      }
      carry[b * units + j] = next_carry;
    }
    grid.sync();
  }
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

struct Launch {
  int units, blocks_per_dir;
  size_t smem;
};

// Units per block: as few as fit all 2·K blocks on the GPU at once (a cooperative launch needs them
// co-resident); smem(units) gives the kernel's dynamic shared memory.
template <typename Kernel, typename Smem>
Launch plan(Kernel kernel, int H, Smem smem_of, const char* op) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->cooperativeLaunch, op, ": this GPU does not support cooperative launches");
  for (int units = std::max(1, (2 * H + props->multiProcessorCount - 1) / props->multiProcessorCount); units <= H;
       ++units) {
    const size_t smem = smem_of(units);
    if (smem > props->sharedMemPerBlockOptin) continue;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    const int blocks_per_dir = (H + units - 1) / units;
    if (per_sm > 0 && 2 * blocks_per_dir <= per_sm * props->multiProcessorCount) return {units, blocks_per_dir, smem};
  }
  TORCH_CHECK(false, op, ": hidden size ", H, " does not fit one cooperative launch on this GPU");
  return {};
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
              op, ": lengths must be a contiguous int64 [B] tensor on ", ref.device());
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
  const Launch l = plan(gru_forward_kernel, static_cast<int>(H), [&](int u) {
    return sizeof(float) * (3 * u * H + B * H + B * 3 * u);
  }, op);
  const float* a_gx = gx.const_data_ptr<float>();
  const int64_t* a_len = lengths.const_data_ptr<int64_t>();
  const float* a_w = w_hh.const_data_ptr<float>();
  const float* a_b = b_hh.const_data_ptr<float>();
  float* a_h = hproc.mutable_data_ptr<float>();
  float* a_buf = hbuf.mutable_data_ptr<float>();
  int b = B, t = T, h = H, units = l.units, bpd = l.blocks_per_dir, st = steps;
  void* args[] = {&a_gx, &a_len, &a_w, &a_b, &a_h, &a_buf, &b, &t, &h, &units, &bpd, &st};
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
  const Launch l = plan(gru_backward_kernel, static_cast<int>(H), [&](int u) {
    return sizeof(float) * (3 * H * u + B * 3 * H + 2 * B * u);
  }, op);
  const float* a_dout = dout.const_data_ptr<float>();
  const float* a_hprev = hprev.const_data_ptr<float>();
  const float* a_gx = gx.const_data_ptr<float>();
  const float* a_gh = gh.const_data_ptr<float>();
  const int64_t* a_len = lengths.const_data_ptr<int64_t>();
  const float* a_w = w_hh.const_data_ptr<float>();
  float* a_dgx = dgx.mutable_data_ptr<float>();
  float* a_dgh = dgh.mutable_data_ptr<float>();
  int b = B, t = T, h = H, units = l.units, bpd = l.blocks_per_dir, st = steps;
  void* args[] = {&a_dout, &a_hprev, &a_gx, &a_gh, &a_len, &a_w, &a_dgx, &a_dgh, &b, &t, &h, &units, &bpd, &st};
  launch(gru_backward_kernel, l, args);
  return {dgx, dgh};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CUDA, m) {
  m.impl("bigru_persistent_forward", &bigru_persistent_forward_cuda);
  m.impl("bigru_persistent_backward", &bigru_persistent_backward_cuda);
}

}  // namespace marn_fast
