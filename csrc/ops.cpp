// Operator schemas of marn_fast (the one place that declares them) and the Python module stub.
// Kernels live in cpu/*.cpp and cuda/*.cu, registered with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

#include <string>

#include "build_identity.h"

#ifdef MARN_FAST_PYTHON_MODULE
#include <Python.h>
extern "C" {
// `import marn_fast._C` loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(marn_fast, m) {
  // What this library was built from: the fingerprint of the csrc/ sources (setup.py and
  // CMakeLists.txt compute it at build time) and the torch version it was compiled against, e.g.
  // "src-3f9a0c1d2e4b5a69+torch-2.13.0". The measured dispatcher records it with every timing.
  m.def("build_identity() -> str", []() { return std::string(MARN_FAST_BUILD_IDENTITY); });

  // Focal loss (see marn_fast/ops/focal_loss.py): loss (reduce → 0-d scale·Σ, fp32/fp64; else per
  // element in the logits' dtype) and scale·dloss/dlogits (or [0] without compute_grad), one pass.
  m.def("focal_loss_forward(Tensor logits, Tensor targets, float alpha, float gamma, bool balanced, bool reduce, "
        "float scale, bool compute_grad) -> (Tensor, Tensor)");

  // Label-wise attention forward on CPU tensors (see marn_fast/ops/label_attention_chunked.py),
  // fp32/fp64/bf16: features [B, n, C], queries [L, d_k] and weights [L, C], lengths [B] int64 in
  // [1, n], keys [B, n, d_k] or None (the features, d_k = C), all in the features' dtype →
  // (z [B, L], lse [B, L]) fp32 (fp64 for fp64 features).
  m.def("label_attention_forward(Tensor features, Tensor queries, Tensor weights, Tensor lengths, "
        "Tensor? keys=None) -> (Tensor, Tensor)");
  // The GEMM-first path's passes over a score block (see csrc/cpu/label_attention_blocks_cpu.cpp),
  // fp32/fp64/bf16: s, p [Lc, D·T], lengths [D] → (z, lse) [D, Lc] fp32 (fp64 for fp64), with keep
  // s ← A and p ← A∘(P − z) in place; grads: s ← dP = g·A, p ← dS = dP∘(P − z) in place.
  m.def("label_attention_block_stats(Tensor(a!) s, Tensor(b!) p, Tensor lengths, bool keep) -> (Tensor, Tensor)");
  m.def("label_attention_block_grads(Tensor(a!) s, Tensor(b!) p, Tensor lengths, Tensor z, Tensor lse, "
        "Tensor grad_z) -> ()");

  // RAM output fusion: O = tanh(U ⊙ H), and its backward (dU, dH).
  m.def("mul_tanh(Tensor u, Tensor h) -> Tensor");
  m.def("mul_tanh_backward(Tensor grad, Tensor u, Tensor h) -> (Tensor, Tensor)");

  // Fused RAM block conv(k=3) → BN → tanh → conv(k=3) → BN → epilogue over channels-last
  // x [B, n, C_in] (see csrc/ram_common.h; epilogue 0 none, 1 + other, 2 ⊙ other, 3 tanh(· ⊙ other)).
  // Eval, BN folded into (w, b): returns (out, y1 = tanh(conv1(x) + b1), v2 = conv2(y1) + b2 or [0]).
  m.def("ram_block_eval(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? other, int epilogue) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (dx, dw1, db1, dw2, db2, d_other or [0] unless epilogue multiplies)
  m.def("ram_block_eval_backward(Tensor grad, Tensor x, Tensor w1, Tensor y1, Tensor w2, Tensor v2, Tensor? other, "
        "int epilogue) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Train, BN on batch statistics: returns (out, z1 = conv1(x), y1 = tanh(BN1(z1)), z2 = conv2(y1),
  // mean1, var1, mean2, var2) with biased batch variances (fp32, fp64 for fp64 inputs).
  m.def("ram_block_train(Tensor x, Tensor w1, Tensor gamma1, Tensor beta1, Tensor w2, Tensor gamma2, "
        "Tensor beta2, Tensor? other, int epilogue, float eps1, float eps2) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (dx, dw1, dgamma1, dbeta1, dw2, dgamma2, dbeta2, d_other or [0] unless epilogue multiplies)
  m.def("ram_block_train_backward(Tensor grad, Tensor x, Tensor w1, Tensor gamma1, Tensor z1, Tensor y1, "
        "Tensor mean1, Tensor var1, Tensor w2, Tensor gamma2, Tensor beta2, Tensor z2, Tensor mean2, Tensor var2, "
        "Tensor? other, int epilogue, float eps1, float eps2) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Persistent BiGRU recurrence (see marn_fast/ops/bigru_persistent.py), both directions in
  // processing order, fp32 (fp32 or fp64 on the CPU): gx [2, B, T, 3h], lengths [B], w_hh [2, 3h, h], b_hh [2, 3h], `steps`
  // = max(lengths) → the states [2, B, T, h] (zero at s ≥ lengths[b]). timeout_s bounds each wait of the CUDA
  // kernels at a grid barrier (an error naming the cause when it expires; a normal wait takes microseconds);
  // absent_block ≥ 0 makes that CUDA block leave at once (fault injection for tests; -1: none). The CPU kernels
  // wait on nothing: timeout_s is range-checked only, absent_block must be -1.
  m.def("bigru_persistent_forward(Tensor gx, Tensor lengths, Tensor w_hh, Tensor b_hh, int steps, float timeout_s=2., "
        "int absent_block=-1) -> Tensor");
  // Reverse-time pass: dout, hprev [2, B, T, h], gx, gh [2, B, T, 3h] (gh = hprev·W_hhᵀ + b_hh) → (dG_x, dG_h).
  m.def("bigru_persistent_backward(Tensor dout, Tensor hprev, Tensor gx, Tensor gh, Tensor lengths, Tensor w_hh, "
        "int steps, float timeout_s=2., int absent_block=-1) -> (Tensor, Tensor)");
  // [SMs, shared memory per block (opt-in bytes), cooperative launch 0/1] of the GPU of `like` (CUDA only), asked of
  // the device: what the host plans the persistent launches with.
  m.def("bigru_persistent_device_limits(Tensor like) -> int[]");
  // nn.BatchNorm1d's running-statistics update from the batch (mean, biased var) over `count` values.
  m.def("ram_bn_update_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
        "int count, float momentum) -> ()");
}
