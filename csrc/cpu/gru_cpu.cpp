// CPU kernels of the persistent BiGRU recurrence (the ops bigru_persistent_forward/_backward; math,
// shapes and the host side in marn_fast/ops/bigru_persistent.py, whose _recurrence_forward /
// _recurrence_backward are the step-by-step oracle these kernels are tested against).
//
// The two directions run in parallel (at::parallel_for over directions: one thread each, so each
// keeps its W_hh — 1.08 MB at h = 300 — in its own core's L2). Per step and direction:
//   forward:  G_h = h_{s−1}·W_hhᵀ (at::mm_out into a preallocated [B, 3h] buffer, against a
//             transposed copy of W_hh [h, 3h]: the layout the vendor GEMM is fastest on with few rows),
//             then one vectorised pass over the active documents: the gates, h_s, and its row of H;
//   backward: dh = dG_h,{s+1}·W_hh (at::mm_out), then one pass: dG_x,s, dG_h,s and the carry g·z.
// The documents are processed in order of decreasing length, so the active ones (s < lengths[b])
// are always the first rows of the state buffers and each GEMM covers exactly them. Rows s ≥
// lengths[b] of the outputs are zero. fp32 (the model's path) and fp64 (computed in fp64) inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

// The gate loops use selects, not branches, so that they vectorise (see fast_math.h).
#pragma GCC optimize("no-trapping-math")

#include "fast_math.h"

// The gate passes also get an AVX-512 clone: on the Sapphire Rapids CPU it makes them ~1.3× faster
// than the AVX2 one (16 lanes; they are bound by exp and division).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MARN_FAST_GRU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MARN_FAST_GRU_CLONES
#endif

namespace marn_fast {
namespace {

// σ(x) = 1 / (1 + e^(−x)) (exp_ clamps its argument, so no inf/NaN for any finite x).
__attribute__((always_inline)) inline float sigmoid_(float x) { return 1.0f / (1.0f + exp_(-x)); }
inline double sigmoid_(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// tanh for fp32 (Cephes tanhf, ≤ 2 ulp): odd minimax polynomial for |x| < 0.625, else
// ±(1 − 2/(e^(2|x|) + 1)); both computed, one selected, so that loops over it vectorise.
__attribute__((always_inline)) inline float tanh_(float x) {
  const float a = x < 0.0f ? -x : x;
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * z * p;
  const float large = 1.0f - 2.0f / (exp_(2.0f * a) + 1.0f);
  return a < 0.625f ? small : (x < 0.0f ? -large : large);
}
inline double tanh_(double x) { return std::tanh(x); }

// One forward step of one document: gx, gh [3h] (gh = h_{s−1}·W_hhᵀ, without b_hh), bias = b_hh [3h],
// hprev [h] → hnext [h] and out [h] (its row of H):
//   r = σ(gx_r + gh_r + b_r), z = σ(gx_z + gh_z + b_z), c = tanh(gx_n + r ⊙ (gh_n + b_n)),
//   h = (1 − z) ⊙ c + z ⊙ h_{s−1}.
template <typename T>
__attribute__((always_inline)) inline void forward_gates(const T* __restrict__ gx, const T* __restrict__ gh,
                                                         const T* __restrict__ bias, const T* __restrict__ hprev,
                                                         T* __restrict__ hnext, T* __restrict__ out, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid_(gx[j] + (gh[j] + bias[j]));
    const T z = sigmoid_(gx[H + j] + (gh[H + j] + bias[H + j]));
    const T c = tanh_(gx[2 * H + j] + r * (gh[2 * H + j] + bias[2 * H + j]));
    const T h = (T(1) - z) * c + z * hprev[j];
    hnext[j] = h;
    out[j] = h;
  }
}

// One backward step of one document: gx, gh [3h] (gh with b_hh), dout, hprev, dh (= dG_h,{s+1}·W_hh),
// carry (= g·z of step s + 1) [h] → dgx, dgh, dgh_copy [3h] and the new carry:
//   g = dH_s + carry + dh, da_n = g(1 − z)(1 − c²), da_z = g(h_{s−1} − c)z(1 − z),
//   da_r = da_n·gh_n·r(1 − r); dG_x = [da_r, da_z, da_n], dG_h = [da_r, da_z, da_n·r].
template <typename T>
__attribute__((always_inline)) inline void backward_gates(const T* __restrict__ gx, const T* __restrict__ gh,
                                                          const T* __restrict__ dout, const T* __restrict__ hprev,
                                                          const T* __restrict__ dh, T* __restrict__ carry,
                                                          T* __restrict__ dgx, T* __restrict__ dgh,
                                                          T* __restrict__ dgh_copy, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T g = dout[j] + (carry[j] + dh[j]);
    const T r = sigmoid_(gx[j] + gh[j]);
    const T z = sigmoid_(gx[H + j] + gh[H + j]);
    const T hn = gh[2 * H + j];
    const T c = tanh_(gx[2 * H + j] + r * hn);
    const T da_n = g * (T(1) - z) * (T(1) - c * c);
    const T da_z = g * (hprev[j] - c) * z * (T(1) - z);
    const T da_r = da_n * hn * r * (T(1) - r);
    dgx[j] = da_r, dgx[H + j] = da_z, dgx[2 * H + j] = da_n;
    dgh[j] = da_r, dgh[H + j] = da_z, dgh[2 * H + j] = da_n * r;
    dgh_copy[j] = da_r, dgh_copy[H + j] = da_z, dgh_copy[2 * H + j] = da_n * r;
    carry[j] = g * z;
  }
}

MARN_FAST_GRU_CLONES void forward_gates_f32(const float* gx, const float* gh, const float* bias, const float* hprev,
                                               float* hnext, float* out, int64_t H) {
  forward_gates(gx, gh, bias, hprev, hnext, out, H);
}
MARN_FAST_GRU_CLONES void backward_gates_f32(const float* gx, const float* gh, const float* dout,
                                                const float* hprev, const float* dh, float* carry, float* dgx,
                                                float* dgh, float* dgh_copy, int64_t H) {
  backward_gates(gx, gh, dout, hprev, dh, carry, dgx, dgh, dgh_copy, H);
}
inline void forward_step(const float* gx, const float* gh, const float* bias, const float* hprev, float* hnext,
                         float* out, int64_t H) {
  forward_gates_f32(gx, gh, bias, hprev, hnext, out, H);
}
inline void forward_step(const double* gx, const double* gh, const double* bias, const double* hprev, double* hnext,
                         double* out, int64_t H) {
  forward_gates(gx, gh, bias, hprev, hnext, out, H);
}
inline void backward_step(const float* gx, const float* gh, const float* dout, const float* hprev, const float* dh,
                          float* carry, float* dgx, float* dgh, float* dgh_copy, int64_t H) {
  backward_gates_f32(gx, gh, dout, hprev, dh, carry, dgx, dgh, dgh_copy, H);
}
inline void backward_step(const double* gx, const double* gh, const double* dout, const double* hprev,
                          const double* dh, double* carry, double* dgx, double* dgh, double* dgh_copy, int64_t H) {
  backward_gates(gx, gh, dout, hprev, dh, carry, dgx, dgh, dgh_copy, H);
}

// The documents by decreasing length (ties by index) and their lengths clipped to `steps`: at step s
// the active documents are the first active(s) of this order.
struct Order {
  std::vector<int64_t> doc, length;
  int64_t active(int64_t s) const {
    return std::lower_bound(length.begin(), length.end(), s, std::greater<int64_t>()) - length.begin();
  }
};

Order order_by_length(const at::Tensor& lengths, int64_t steps) {
  const int64_t B = lengths.size(0);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  Order o{std::vector<int64_t>(B), std::vector<int64_t>(B)};
  std::iota(o.doc.begin(), o.doc.end(), 0);
  std::stable_sort(o.doc.begin(), o.doc.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  for (int64_t i = 0; i < B; ++i) o.length[i] = std::min(len[o.doc[i]], steps);
  return o;
}

// dst [cols, rows] = srcᵀ for src [rows, cols], in cache-sized blocks (a strided copy_ of the
// transposed view is ~10× slower, and this one runs inside the direction's own thread).
template <typename T>
void transpose(const T* __restrict__ src, int64_t rows, int64_t cols, T* __restrict__ dst) {
  constexpr int64_t kBlock = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t r1 = std::min(rows, r0 + kBlock), c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
      }
    }
  }
}

// Rows [lengths[b], T) of document b in x [B, T, width] (one direction) set to zero.
template <typename T>
void zero_padding(T* x, const Order& o, int64_t T_, int64_t width) {
  for (size_t i = 0; i < o.doc.size(); ++i) {
    const int64_t rows = T_ - o.length[i];
    if (rows > 0) std::memset(x + (o.doc[i] * T_ + o.length[i]) * width, 0, sizeof(T) * rows * width);
  }
}

// Runs fn(direction) for both directions, in parallel when torch has two or more threads (each
// direction's GEMMs then run single-threaded inside its thread).
template <typename Fn>
void for_each_direction(const Fn& fn) {
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) fn(d);
  });
}

void check_input(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must be ", ref.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_common(const at::Tensor& lengths, const at::Tensor& w_hh, const at::Tensor& ref, int64_t B, int64_t T,
                  int64_t H, int64_t steps, const char* op) {
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 tensors, got ", ref.scalar_type());
  TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == at::kLong && lengths.dim() == 1 &&
                  lengths.size(0) == B,
              op, ": lengths must be an int64 [B=", B, "] CPU tensor, got ", lengths.scalar_type(), " ",
              lengths.sizes());
  TORCH_CHECK(lengths.numel() == 0 || lengths.min().item<int64_t>() >= 0, op, ": lengths must be >= 0");
  check_input(w_hh, "w_hh", {2, 3 * H, H}, ref, op);
  TORCH_CHECK(steps >= 0 && steps <= T, op, ": steps must lie in [0, T=", T, "], got ", steps);
}

// The CUDA kernels' barrier arguments (see csrc/ops.cpp): the same range for timeout_s; nothing here
// waits, and there is no block to leave out.
void check_barrier_args(double timeout_s, int64_t absent_block, const char* op) {
  TORCH_CHECK(timeout_s > 0 && timeout_s <= 3600, op, ": timeout_s must lie in (0, 3600], got ", timeout_s);
  TORCH_CHECK(absent_block == -1, op, ": absent_block (fault injection of the CUDA kernels) must be -1 on the CPU, got ",
              absent_block);
}

template <typename T>
void forward_impl(const at::Tensor& gx, const Order& o, const at::Tensor& w_hh, const at::Tensor& b_hh,
                  at::Tensor& hproc, int64_t steps) {
  const int64_t B = gx.size(1), T_ = gx.size(2), H = w_hh.size(2);
  const at::Tensor w_hh_t = at::empty({2, H, 3 * H}, gx.options());  // W_hhᵀ per direction
  const at::Tensor state = at::zeros({2, 2, B, H}, gx.options());   // [direction, parity, B, h]
  const at::Tensor gh = at::zeros({2, B, 3 * H}, gx.options());     // G_h of the step; 0 at s = 0
  for_each_direction([&](int64_t d) {
    const T* g = gx.const_data_ptr<T>() + d * B * T_ * 3 * H;
    const T* bias = b_hh.const_data_ptr<T>() + d * 3 * H;
    T* out = hproc.mutable_data_ptr<T>() + d * B * T_ * H;
    const at::Tensor w = w_hh_t.select(0, d), gh_d = gh.select(0, d);
    transpose(w_hh.const_data_ptr<T>() + d * 3 * H * H, 3 * H, H, w.mutable_data_ptr<T>());
    std::vector<at::Tensor> gh_rows, h_rows[2];  // views of the first `rows` documents
    for (int64_t rows = 0; rows <= B; ++rows) {
      gh_rows.push_back(gh_d.narrow(0, 0, rows));
      for (int p = 0; p < 2; ++p) h_rows[p].push_back(state.select(0, d).select(0, p).narrow(0, 0, rows));
    }
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t active = o.active(s);
      if (active == 0) break;
      const at::Tensor& hprev = h_rows[(s + 1) % 2][active];
      if (s > 0) at::mm_out(gh_rows[active], hprev, w);
      const T* gh_p = gh_d.const_data_ptr<T>();
      const T* hp = hprev.const_data_ptr<T>();
      T* hn = h_rows[s % 2][active].mutable_data_ptr<T>();
      for (int64_t i = 0; i < active; ++i) {
        const int64_t row = o.doc[i] * T_ + s;
        forward_step(g + row * 3 * H, gh_p + i * 3 * H, bias, hp + i * H, hn + i * H, out + row * H, H);
      }
    }
    zero_padding(out, o, T_, H);
  });
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& hprev, const at::Tensor& gx, const at::Tensor& gh,
                   const Order& o, const at::Tensor& w_hh, at::Tensor& dgx, at::Tensor& dgh, int64_t steps) {
  const int64_t B = dout.size(1), T_ = dout.size(2), H = dout.size(3);
  const at::Tensor next = at::empty({2, 2, B, 3 * H}, dout.options());  // dG_h of steps s + 1 and s
  const at::Tensor dh = at::zeros({2, B, H}, dout.options());
  const at::Tensor carry = at::zeros({2, B, H}, dout.options());
  for_each_direction([&](int64_t d) {
    const int64_t off3 = d * B * T_ * 3 * H, off1 = d * B * T_ * H;
    const T *x3 = gx.const_data_ptr<T>() + off3, *h3 = gh.const_data_ptr<T>() + off3;
    const T *dy = dout.const_data_ptr<T>() + off1, *hp = hprev.const_data_ptr<T>() + off1;
    T *ox = dgx.mutable_data_ptr<T>() + off3, *oh = dgh.mutable_data_ptr<T>() + off3;
    const at::Tensor w = w_hh.select(0, d), dh_d = dh.select(0, d);
    T* dh_p = dh_d.mutable_data_ptr<T>();
    T* carry_p = carry.select(0, d).mutable_data_ptr<T>();
    std::vector<at::Tensor> dh_rows, next_rows[2];
    for (int64_t rows = 0; rows <= B; ++rows) {
      dh_rows.push_back(dh_d.narrow(0, 0, rows));
      for (int p = 0; p < 2; ++p) next_rows[p].push_back(next.select(0, d).select(0, p).narrow(0, 0, rows));
    }
    int64_t active_next = 0;  // documents active at step s + 1
    for (int64_t s = steps - 1; s >= 0; --s) {
      const int64_t active = o.active(s);
      if (active_next > 0) at::mm_out(dh_rows[active_next], next_rows[(s + 1) % 2][active_next], w);
      // Documents whose last step is s: no dG_h from step s + 1 (and their carry is still 0).
      std::memset(dh_p + active_next * H, 0, sizeof(T) * (active - active_next) * H);
      T* dg_copy = next_rows[s % 2][active].mutable_data_ptr<T>();
      for (int64_t i = 0; i < active; ++i) {
        const int64_t row = o.doc[i] * T_ + s;
        backward_step(x3 + row * 3 * H, h3 + row * 3 * H, dy + row * H, hp + row * H, dh_p + i * H, carry_p + i * H,
                      ox + row * 3 * H, oh + row * 3 * H, dg_copy + i * 3 * H, H);
      }
      active_next = active;
    }
    zero_padding(ox, o, T_, 3 * H);
    zero_padding(oh, o, T_, 3 * H);
  });
}

at::Tensor bigru_persistent_forward_cpu(const at::Tensor& gx_in, const at::Tensor& lengths, const at::Tensor& w_hh_in,
                                        const at::Tensor& b_hh_in, int64_t steps, double timeout_s,
                                        int64_t absent_block) {
  const char* op = "marn_fast::bigru_persistent_forward";
  TORCH_CHECK(gx_in.dim() == 4 && gx_in.size(0) == 2 && gx_in.size(3) % 3 == 0, op,
              ": gx must be [2, B, T, 3h], got ", gx_in.sizes());
  const int64_t B = gx_in.size(1), T = gx_in.size(2), H = gx_in.size(3) / 3;
  check_common(lengths, w_hh_in, gx_in, B, T, H, steps, op);
  check_input(b_hh_in, "b_hh", {2, 3 * H}, gx_in, op);
  check_barrier_args(timeout_s, absent_block, op);
  const at::Tensor gx = gx_in.contiguous(), b_hh = b_hh_in.contiguous(), w_hh = w_hh_in.contiguous();
  at::Tensor hproc = at::empty({2, B, T, H}, gx.options());
  const Order o = order_by_length(lengths.contiguous(), steps);
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "bigru_persistent_forward_cpu", [&] {
    forward_impl<scalar_t>(gx, o, w_hh, b_hh, hproc, steps);
  });
  return hproc;
}

std::tuple<at::Tensor, at::Tensor> bigru_persistent_backward_cpu(const at::Tensor& dout_in, const at::Tensor& hprev_in,
                                                                 const at::Tensor& gx_in, const at::Tensor& gh_in,
                                                                 const at::Tensor& lengths, const at::Tensor& w_hh_in,
                                                                 int64_t steps, double timeout_s,
                                                                 int64_t absent_block) {
  const char* op = "marn_fast::bigru_persistent_backward";
  TORCH_CHECK(dout_in.dim() == 4 && dout_in.size(0) == 2, op, ": dout must be [2, B, T, h], got ", dout_in.sizes());
  const int64_t B = dout_in.size(1), T = dout_in.size(2), H = dout_in.size(3);
  check_common(lengths, w_hh_in, dout_in, B, T, H, steps, op);
  check_input(hprev_in, "hprev", {2, B, T, H}, dout_in, op);
  check_input(gx_in, "gx", {2, B, T, 3 * H}, dout_in, op);
  check_input(gh_in, "gh", {2, B, T, 3 * H}, dout_in, op);
  check_barrier_args(timeout_s, absent_block, op);
  const at::Tensor dout = dout_in.contiguous(), hprev = hprev_in.contiguous(), gx = gx_in.contiguous();
  const at::Tensor gh = gh_in.contiguous(), w_hh = w_hh_in.contiguous();
  at::Tensor dgx = at::empty({2, B, T, 3 * H}, dout.options());
  at::Tensor dgh = at::empty({2, B, T, 3 * H}, dout.options());
  const Order o = order_by_length(lengths.contiguous(), steps);
  AT_DISPATCH_FLOATING_TYPES(dout.scalar_type(), "bigru_persistent_backward_cpu", [&] {
    backward_impl<scalar_t>(dout, hprev, gx, gh, o, w_hh, dgx, dgh, steps);
  });
  return {dgx, dgh};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CPU, m) {
  m.impl("bigru_persistent_forward", &bigru_persistent_forward_cpu);
  m.impl("bigru_persistent_backward", &bigru_persistent_backward_cpu);
}

}  // namespace marn_fast
