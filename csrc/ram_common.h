// Shared by the CPU and CUDA kernels of the fused RAM blocks (ATen only): the epilogue codes and the
// argument checks (TORCH_CHECK naming the argument).
//
// Layout: activations are channels-last [B, n, C] contiguous (H's own layout, so H^T needs no copy);
// conv weights are in Conv1d form [C_out, C_in, 3] (a ConvTranspose1d weight enters as
// weight_t.transpose(0, 1).flip(2)); per-channel vectors are [C] contiguous.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace marn_fast {
namespace ram {

// What follows the block's last BatchNorm (v): out = v | v + other | v ⊙ other | tanh(v ⊙ other).
// Mirrored by marn_fast/ops/ram.py (EPILOGUE_*).
enum Epilogue : int64_t { kNone = 0, kAdd = 1, kMul = 2, kMulTanh = 3 };

inline void check_activation(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be [B, n, C] (channels last), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous [B, n, C], got shape ", t.sizes(),
              " with strides ", t.strides());
}

// t must be a contiguous tensor of `shape` and `dtype` on ref's device.
inline void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                         const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on x's device ", ref.device(), ", got ",
              t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// A k=3 conv weight [c_out, c_in, 3]; c_out < 0 accepts any output channel count. Returns c_out.
inline int64_t check_weight(const at::Tensor& w, const char* name, int64_t c_out, int64_t c_in, const at::Tensor& x,
                            const char* op) {
  TORCH_CHECK(w.defined() && w.dim() == 3, op, ": ", name, " must be a conv weight [C_out, C_in, 3], got shape ",
              w.defined() ? w.sizes() : at::IntArrayRef{});
  TORCH_CHECK(w.size(2) == 3, op, ": ", name, " must have kernel size 3, got ", w.size(2), " (shape ", w.sizes(),
              ")");
  TORCH_CHECK(w.size(1) == c_in, op, ": ", name, " must have ", c_in, " input channels, got ", w.size(1),
              " (shape ", w.sizes(), ")");
  TORCH_CHECK(c_out < 0 || w.size(0) == c_out, op, ": ", name, " must have ", c_out, " output channels, got ",
              w.size(0), " (shape ", w.sizes(), ")");
  check_tensor(w, name, w.sizes(), x.scalar_type(), x, op);
  return w.size(0);
}

// dtype of BatchNorm statistics: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t check_epilogue(int64_t epilogue, const std::optional<at::Tensor>& other, const at::Tensor& x,
                              at::IntArrayRef out_shape, const char* op) {
  TORCH_CHECK(epilogue >= kNone && epilogue <= kMulTanh, op, ": epilogue must be 0 (none), 1 (add), 2 (mul) or ",
              "3 (mul_tanh), got ", epilogue);
  if (epilogue == kNone) {
    TORCH_CHECK(!other.has_value(), op, ": other must be None when epilogue is 0 (none)");
  } else {
    TORCH_CHECK(other.has_value(), op, ": other is required for epilogue ", epilogue);
    check_tensor(*other, "other", out_shape, x.scalar_type(), x, op);
  }
  return epilogue;
}


struct BlockDims {
  int64_t B, n, c_in, c_mid, c_out;
  int64_t rows() const { return B * n; }
};

// Forward checks shared by ram_block_eval (p1, p2 = folded biases) and ram_block_train (p1, p2 = BN γ;
// q1, q2 = BN β). Every per-channel vector has x's dtype.
inline BlockDims check_block(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                             std::initializer_list<std::pair<const at::Tensor*, const char*>> mid_vectors,
                             std::initializer_list<std::pair<const at::Tensor*, const char*>> out_vectors,
                             const std::optional<at::Tensor>& other, int64_t epilogue, const char* op) {
  check_activation(x, "x", op);
  BlockDims d{x.size(0), x.size(1), x.size(2), 0, 0};
  d.c_mid = check_weight(w1, "w1", -1, d.c_in, x, op);
  d.c_out = check_weight(w2, "w2", -1, d.c_mid, x, op);
  for (const auto& [t, name] : mid_vectors) check_tensor(*t, name, {d.c_mid}, x.scalar_type(), x, op);
  for (const auto& [t, name] : out_vectors) check_tensor(*t, name, {d.c_out}, x.scalar_type(), x, op);
  check_epilogue(epilogue, other, x, {d.B, d.n, d.c_out}, op);
  return d;
}

inline void check_stats(const at::Tensor& mean, const char* mean_name, const at::Tensor& var, const char* var_name,
                        int64_t c, const at::Tensor& x, const char* op) {
  check_tensor(mean, mean_name, {c}, stats_dtype(x.scalar_type()), x, op);
  check_tensor(var, var_name, {c}, stats_dtype(x.scalar_type()), x, op);
}

// The checks of each op's arguments, the same on every device; each returns the block's dimensions.
inline BlockDims check_eval_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1,
                                     const at::Tensor& y1, const at::Tensor& w2, const at::Tensor& v2,
                                     const std::optional<at::Tensor>& other, int64_t epilogue, const char* op) {
  const BlockDims d = check_block(x, w1, w2, {}, {}, other, epilogue, op);
  check_tensor(grad, "grad", {d.B, d.n, d.c_out}, x.scalar_type(), x, op);
  check_tensor(y1, "y1", {d.B, d.n, d.c_mid}, x.scalar_type(), x, op);
  if (epilogue >= kMul) check_tensor(v2, "v2", {d.B, d.n, d.c_out}, x.scalar_type(), x, op);
  return d;
}

inline void check_train_rows(int64_t rows, const char* op) {
  TORCH_CHECK(rows > 1, op, ": BatchNorm needs more than 1 value per channel when training, got B·n = ", rows);
}

inline BlockDims check_train(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& gamma1,
                             const at::Tensor& beta1, const at::Tensor& w2, const at::Tensor& gamma2,
                             const at::Tensor& beta2, const std::optional<at::Tensor>& other, int64_t epilogue,
                             const char* op) {
  const BlockDims d = check_block(x, w1, w2, {{&gamma1, "gamma1"}, {&beta1, "beta1"}},
                                  {{&gamma2, "gamma2"}, {&beta2, "beta2"}}, other, epilogue, op);
  check_train_rows(d.rows(), op);
  return d;
}

inline BlockDims check_train_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1,
                                      const at::Tensor& gamma1, const at::Tensor& z1, const at::Tensor& y1,
                                      const at::Tensor& mean1, const at::Tensor& var1, const at::Tensor& w2,
                                      const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& z2,
                                      const at::Tensor& mean2, const at::Tensor& var2,
                                      const std::optional<at::Tensor>& other, int64_t epilogue, const char* op) {
  const BlockDims d = check_block(x, w1, w2, {{&gamma1, "gamma1"}}, {{&gamma2, "gamma2"}, {&beta2, "beta2"}},
                                  other, epilogue, op);
  check_train_rows(d.rows(), op);
  check_tensor(grad, "grad", {d.B, d.n, d.c_out}, x.scalar_type(), x, op);
  check_tensor(z1, "z1", {d.B, d.n, d.c_mid}, x.scalar_type(), x, op);
  check_tensor(y1, "y1", {d.B, d.n, d.c_mid}, x.scalar_type(), x, op);
  check_tensor(z2, "z2", {d.B, d.n, d.c_out}, x.scalar_type(), x, op);
  check_stats(mean1, "mean1", var1, "var1", d.c_mid, x, op);
  check_stats(mean2, "mean2", var2, "var2", d.c_out, x, op);
  return d;
}

}  // namespace ram
}  // namespace marn_fast
