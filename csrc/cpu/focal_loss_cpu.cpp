// CPU kernel of the focal loss (ATen only; fp32 and fp64 logits; float/bool/uint8 targets read as
// stored): the loss (per element, or a deterministic sum) and the scaled analytic gradient in one
// pass over logits and targets. The math is the Triton kernel's (marn_fast/kernels/focal_loss.py),
// in log space, per element with x the logit, y ∈ [0, 1] the target, e = exp(−|x|):
//   sp(x) = max(x, 0) + log1p(e) = −log(1 − p),  sp(−x) = −log p,  p = σ(x)
//   official (balanced=false): b = y·sp(−x) + (1−y)·sp(x),  p_t = exp(−b),  q = 1 − p_t,
//       loss = α·q^γ·b,   dloss/dx = α·(p − y)·q^γ·(1 + γ·p_t·b/q)      (b/q → 1 as q → 0)
//   eq. 16 (balanced=true): w₊ = α·y·(1−p)^γ, w₋ = (1−α)(1−y)·p^γ (powers as exp(−γ·sp)),
//       loss = w₊·sp(−x) + w₋·sp(x),  dloss/dx = w₋·(γ·(1−p)·sp(x) + p) − w₊·(γ·p·sp(−x) + (1−p))
// Finite for any finite x and γ ≥ 0. fp32 logits with γ = 2 take the powers as products (σ², q²).
// Hard targets (bool/uint8, or a block of float targets that are all 0 or 1) take p_t and q = 1 − p_t
// directly as σ(±x) (exact), skipping exp(−b) and the Kahan log of the soft-target path.
// fp32 logits use the branch-free exp/log below so the element
// loop vectorises (a clone for AVX2 is picked at load time on x86-64); fp64 uses std::exp/std::log.
//
// Determinism: the flattened input is cut into fixed blocks of kBlock elements (independent of the
// thread count); each block's loss is summed in fp64 in a fixed lane order, and the block partials
// are summed in block order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

// Without this, GCC keeps the selects of the element loop as branches (a compare or a division
// may raise an FP exception) and does not vectorise it. It changes no result, only whether FP
// exception flags are modelled; it applies to this file's code below (the element loop avoids
// std::min/max/abs, which were compiled above it without the flag).
#pragma GCC optimize("no-trapping-math")

#include "fast_math.h"

namespace marn_fast {
namespace {

constexpr int64_t kBlock = 2048;  // elements per block: one partial sum, one unit of parallel work
constexpr int kLanes = 8;         // fp64 accumulators per block sum (a fixed summation order)

// Loss and scale·gradient of element i. loss_out/grad_out point at the outputs or at scratch; T is
// the math type (fp32, fp64), Y the targets' stored type. Every arm of every select is computed
// unconditionally (no control flow: the loop around it vectorises).
// SQUARE: γ = 2 (the official code's and the paper's value), powers taken as products: (1 − p)² = σ(−x)²,
// p² = σ(x)², q² (two fewer exp/log per element).
// HARD: every target of the block is exactly 0 or 1 (bool/uint8, or float blocks checked so), so
// p_t = y ? p : 1 − p and q = 1 − p_t = y ? 1 − p : p are exact: no exp(−b) and no Kahan log.
template <typename T, typename Y, bool BALANCED, bool SQUARE, bool HARD>
__attribute__((always_inline)) inline void focal_element(const T* __restrict__ x, const Y* __restrict__ y,
                                                         T* __restrict__ loss_out, T* __restrict__ grad_out,
                                                         int64_t i, T alpha, T gamma, T scale, T gamma0) {
  const T one = 1, zero = 0, half = 0.5;
  const T xv = x[i];
  const T yv = static_cast<T>(y[i]);
  const T e = exp_(xv < zero ? xv : -xv);  // exp(−|x|)
  const T u = one + e;  // log1p(e) for e ∈ [0, 1]: log(u)·e/(u − 1)
  const T d = u - one;
  const T l1_general = log_(u) * (e / (d == zero ? one : d));
  const T l1 = d == zero ? e : l1_general;
  const T sp_pos = (xv > zero ? xv : zero) + l1;   // softplus(x)  = −log(1 − p)
  const T sp_neg = (xv < zero ? -xv : zero) + l1;  // softplus(−x) = −log p
  const T inv = one / (one + e);
  const T e_inv = e * inv;
  const T p = xv >= zero ? inv : e_inv;   // σ(x)
  const T pm = xv >= zero ? e_inv : inv;  // σ(−x) = 1 − p
  T loss, grad;
  if constexpr (BALANCED) {
    const T pow_pm = SQUARE ? pm * pm : exp_(-gamma * sp_pos);  // (1 − p)^γ
    const T pow_p = SQUARE ? p * p : exp_(-gamma * sp_neg);     // p^γ
    const T w_pos = alpha * yv * pow_pm;                        // α·y·(1 − p)^γ
    const T w_neg = (one - alpha) * (one - yv) * pow_p;         // (1 − α)(1 − y)·p^γ
    loss = w_pos * sp_neg + w_neg * sp_pos;
    grad = w_neg * (gamma * pm * sp_pos + p) - w_pos * (gamma * p * sp_neg + pm);
  } else {
    const T bce = yv * sp_neg + (one - yv) * sp_pos;
    T pt, q;
    if constexpr (HARD) {
      pt = yv > half ? p : pm;
      q = yv > half ? pm : p;
    } else {
      pt = exp_(-bce);
      // q = 1 − p_t: 1 − p_t where exact enough (p_t ≤ ½), else Kahan's (1 − p_t)·b/(−log p_t).
      const T d2 = one - pt;
      const T pt_below_one = pt < one ? pt : half;
      const T pt_near = pt_below_one > half ? pt_below_one : half;  // p_t ∈ (½, 1), else ½
      const T log_near = -log_(pt_near);
      const T neg_log = pt_near == half ? one : log_near;
      const T kahan = d2 * (bce / neg_log);
      const T q_near = d2 == zero ? bce : kahan;
      q = pt > half ? q_near : d2;
    }
    const bool q_pos = q > zero;
    const T q_safe = q_pos ? q : one;
    const T q_pow = SQUARE ? q_safe * q_safe : exp_(gamma * log_(q_safe));
    const T q_gamma = q_pos ? q_pow : gamma0;
    loss = alpha * q_gamma * bce;
    const T b_over_q = bce / q_safe;
    const T ratio = q_pos ? b_over_q : one;  // b/q ∈ [1, b + 1]
    const T s = (one - yv) * p - yv * pm;  // σ(x) − y without cancellation for hard y
    grad = alpha * s * q_gamma * (one + gamma * pt * ratio);
  }
  loss_out[i] = loss;
  grad_out[i] = grad * scale;
}

// Elements [0, n) of one block. With fp32 targets the loop also stores one byte per element
// (sign of x) to `pace`, scratch that nobody reads: a byte-wide access makes GCC's vectoriser take
// 32 elements per iteration (four interleaved 8-lane chains, as it does for byte targets), which
// runs the fp32-target loop ~1.8× faster (measured) than 8 elements per iteration.
template <typename T, typename Y, bool BALANCED, bool SQUARE, bool HARD>
__attribute__((always_inline)) inline void focal_block(const T* __restrict__ x, const Y* __restrict__ y,
                                                       T* __restrict__ loss_out, T* __restrict__ grad_out,
                                                       uint8_t* __restrict__ pace, int64_t n, T alpha, T gamma,
                                                       T scale) {
  const T gamma0 = gamma == T(0) ? T(1) : T(0);  // 0^γ: 1 for γ = 0, else 0
  for (int64_t i = 0; i < n; ++i) {
    focal_element<T, Y, BALANCED, SQUARE, HARD>(x, y, loss_out, grad_out, i, alpha, gamma, scale, gamma0);
    if constexpr (std::is_same_v<T, float> && std::is_same_v<Y, float>) pace[i] = x[i] >= T(0);
  }
}

// One block's element loop, compiled once per instantiation (with clones; the loop vectorises when
// the instantiation is a function of its own, not when inlined into the block loop below).
#define MARN_FAST_FOCAL_BLOCK(NAME, T, Y, BALANCED, SQUARE, HARD)                                                 \
  MARN_FAST_VECTOR_CLONES void NAME(const T* x, const Y* y, T* loss, T* grad, uint8_t* pace, int64_t n,   \
                                    T alpha, T gamma, T scale) {                                           \
    focal_block<T, Y, BALANCED, SQUARE, HARD>(x, y, loss, grad, pace, n, alpha, gamma, scale);             \
  }
// fp32: the official form has a HARD twin (byte targets always, float blocks when all 0/1); the
// balanced form needs no p_t, so one version serves both. fp64 (reference/gradcheck) is general.
MARN_FAST_FOCAL_BLOCK(block_f32_f32, float, float, false, false, false)
MARN_FAST_FOCAL_BLOCK(block_f32_f32_hard, float, float, false, false, true)
MARN_FAST_FOCAL_BLOCK(block_f32_f32_balanced, float, float, true, false, false)
MARN_FAST_FOCAL_BLOCK(block_f32_u8_hard, float, uint8_t, false, false, true)
MARN_FAST_FOCAL_BLOCK(block_f32_u8_balanced, float, uint8_t, true, false, false)
MARN_FAST_FOCAL_BLOCK(block_f32_f32_sq, float, float, false, true, false)
MARN_FAST_FOCAL_BLOCK(block_f32_f32_hard_sq, float, float, false, true, true)
MARN_FAST_FOCAL_BLOCK(block_f32_f32_balanced_sq, float, float, true, true, false)
MARN_FAST_FOCAL_BLOCK(block_f32_u8_hard_sq, float, uint8_t, false, true, true)
MARN_FAST_FOCAL_BLOCK(block_f32_u8_balanced_sq, float, uint8_t, true, true, false)
MARN_FAST_FOCAL_BLOCK(block_f64_f64, double, double, false, false, false)
MARN_FAST_FOCAL_BLOCK(block_f64_f64_balanced, double, double, true, false, false)
MARN_FAST_FOCAL_BLOCK(block_f64_u8, double, uint8_t, false, false, false)
MARN_FAST_FOCAL_BLOCK(block_f64_u8_balanced, double, uint8_t, true, false, false)
#undef MARN_FAST_FOCAL_BLOCK

template <typename T>
double block_sum(const T* __restrict__ v, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(v[i + k]);
  }
  for (int k = 0; i < n; ++i, ++k) acc[k] += static_cast<double>(v[i]);
  double s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

struct FocalArgs {
  const void* x;
  const void* y;
  void* loss;        // [numel] in T, or null when reducing
  void* grad;        // [numel] in T, or null without the gradient
  double* partial;   // [num_blocks] when reducing
  int64_t numel;
  double alpha, gamma, scale;
};

// Whether every target of the block is exactly 0 or 1 (a branch-free reduction).
MARN_FAST_VECTOR_CLONES bool all_hard(const float* __restrict__ y, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (y[i] != 0.0f) & (y[i] != 1.0f);
  return bad == 0;
}

// hard: the block function to use instead of `block` when a float block's targets are all 0/1.
template <typename T, typename Y, typename BlockFn>
void run_blocks(const FocalArgs& a, int64_t b0, int64_t b1, BlockFn block, BlockFn hard = nullptr) {
  std::vector<T> scratch(2 * kBlock);
  std::vector<uint8_t> pace(kBlock);
  const T* x = static_cast<const T*>(a.x);
  const Y* y = static_cast<const Y*>(a.y);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * kBlock;
    const int64_t n = std::min(kBlock, a.numel - i0);
    T* loss = a.loss ? static_cast<T*>(a.loss) + i0 : scratch.data();
    T* grad = a.grad ? static_cast<T*>(a.grad) + i0 : scratch.data() + kBlock;
    BlockFn fn = block;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<Y, float>) {
      if (hard != nullptr && all_hard(y + i0, n)) fn = hard;
    }
    fn(x + i0, y + i0, loss, grad, pace.data(), n, static_cast<T>(a.alpha), static_cast<T>(a.gamma), static_cast<T>(a.scale));
    if (a.partial) a.partial[b] = block_sum(loss, n);
  }
}

// fp32 with γ = 2 takes the SQUARE instantiations; fp64 (a reference/gradcheck dtype) always the general one.
void focal_blocks(bool fp64, bool bytes, bool balanced, const FocalArgs& a, int64_t b0, int64_t b1) {
  if (!fp64 && a.gamma == 2.0) {
    if (bytes) run_blocks<float, uint8_t>(a, b0, b1, balanced ? block_f32_u8_balanced_sq : block_f32_u8_hard_sq);
    else if (balanced) run_blocks<float, float>(a, b0, b1, block_f32_f32_balanced_sq);
    else run_blocks<float, float>(a, b0, b1, block_f32_f32_sq, block_f32_f32_hard_sq);
  } else if (!fp64) {
    if (bytes) run_blocks<float, uint8_t>(a, b0, b1, balanced ? block_f32_u8_balanced : block_f32_u8_hard);
    else if (balanced) run_blocks<float, float>(a, b0, b1, block_f32_f32_balanced);
    else run_blocks<float, float>(a, b0, b1, block_f32_f32, block_f32_f32_hard);
  } else {
    if (bytes) run_blocks<double, uint8_t>(a, b0, b1, balanced ? block_f64_u8_balanced : block_f64_u8);
    else run_blocks<double, double>(a, b0, b1, balanced ? block_f64_f64_balanced : block_f64_f64);
  }
}

// (loss, scale·dloss/dlogits or [0]). loss: reduce → 0-d scale·Σ loss in fp32 (fp64 for fp64 logits),
// else the per-element loss in the logits' dtype. fp16/bf16 logits compute in fp32.
std::tuple<at::Tensor, at::Tensor> focal_loss_forward_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                          double alpha, double gamma, bool balanced, bool reduce,
                                                          double scale, bool compute_grad) {
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(),
              "focal_loss_forward: logits and targets must be CPU tensors, got ", logits.device(), " and ",
              targets.device());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "focal_loss_forward: logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.sizes() == targets.sizes(), "focal_loss_forward: targets must have the logits' shape ",
              logits.sizes(), ", got ", targets.sizes());
  const auto st = targets.scalar_type();
  TORCH_CHECK(at::isFloatingType(st) || st == at::kBool || st == at::kByte,
              "focal_loss_forward: targets must be float, bool or uint8, got ", st);
  TORCH_CHECK(gamma >= 0 && alpha >= 0 && alpha <= 1, "focal_loss_forward: expected alpha in [0, 1] and gamma >= 0, got ",
              alpha, " and ", gamma);
  const bool fp64 = logits.scalar_type() == at::kDouble;
  const auto math = fp64 ? at::kDouble : at::kFloat;
  const at::Tensor x = logits.to(math).contiguous();
  const bool bytes = st == at::kBool || st == at::kByte;
  at::Tensor y = bytes ? targets.contiguous() : targets.to(math).contiguous();
  if (st == at::kBool) y = y.view(at::kByte);
  const int64_t numel = x.numel();
  const int64_t blocks = (numel + kBlock - 1) / kBlock;

  at::Tensor loss_el = reduce ? at::Tensor() : at::empty_like(x);
  at::Tensor grad = compute_grad ? at::empty_like(x) : at::Tensor();
  std::vector<double> partial(reduce ? blocks : 0);
  FocalArgs args{x.const_data_ptr(), y.const_data_ptr(), reduce ? nullptr : loss_el.mutable_data_ptr(),
                 compute_grad ? grad.mutable_data_ptr() : nullptr, reduce ? partial.data() : nullptr,
                 numel, alpha, gamma, scale};
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) { focal_blocks(fp64, bytes, balanced, args, b0, b1); });

  at::Tensor loss;
  if (reduce) {
    double total = 0;
    for (const double s : partial) total += s;  // block order: deterministic
    loss = at::scalar_tensor(total * scale, x.options());
  } else {
    loss = loss_el.to(logits.scalar_type());
  }
  return {loss, compute_grad ? grad.to(logits.scalar_type()) : at::empty({0}, logits.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CPU, m) { m.impl("focal_loss_forward", &focal_loss_forward_cpu); }

}  // namespace marn_fast
