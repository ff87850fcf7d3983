// The k=3 conv through ATen (any device), shared by the CPU and CUDA RAM kernels.
// Channels-last activations [B, n, C]; conv weights [C_out, C_in, 3]; z[t] = Σ_k W_k · x[t+k−1].
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace marn_fast {
namespace ram {

// P [B·n, 3·C_out] with P[r, k·C_out + o] = Σ_i w[o, i, k] · x[r, i]: ONE GEMM. The conv output is
// the shift-sum z[t] = P[t−1, 0:C] + P[t, C:2C] + P[t+1, 2C:3C] (terms outside the sequence dropped),
// which the kernels fuse into the pass that follows.
inline at::Tensor conv3_products(const at::Tensor& x, const at::Tensor& w) {
  const int64_t c_out = w.size(0), c_in = w.size(1);
  return at::mm(x.reshape({-1, c_in}), w.permute({2, 0, 1}).reshape({3 * c_out, c_in}).t());
}

// The k=3, pad-1 conv of channels-last x [B, n, C_in] with w [C_out, C_in, 3] → z [B·n, C_out], through
// the library's convolution (oneDNN on the CPU, cuDNN on CUDA): x is handed over as the
// [B, C_in, 1, n] view whose strides are channels-last, so neither input nor output is copied. On
// the CPU it beats conv3_products plus a shift pass by 1.5× (benchmarks/bench_ram.py); the CUDA
// kernels still use conv3_products until a GPU run has compared the two there.
inline at::Tensor conv3_out(const at::Tensor& x, const at::Tensor& w) {
  const int64_t rows = x.size(0) * x.size(1), c_out = w.size(0);
  const at::Tensor x4 = x.permute({0, 2, 1}).unsqueeze(2);
  const at::Tensor w4 = w.unsqueeze(2).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t stride[2] = {1, 1}, padding[2] = {0, 1};
  return at::conv2d(x4, w4, std::optional<at::Tensor>(), stride, padding).permute({0, 2, 3, 1}).reshape({rows, c_out});
}

// The conv whose output is the input gradient: kernel flipped along k, channels swapped.
inline at::Tensor flip_transpose(const at::Tensor& w) { return w.transpose(0, 1).flip({2}).contiguous(); }

// a·b [M, N] in fp32 for bf16/fp16 a, b [M, K], [K, N]: fp32 accumulation and ONE rounding at the
// end. cuBLAS through the mm overload with an output dtype (bf16 output would round the result, and
// with split-K may reduce the partial sums in bf16); the CPU has no such overload, so the operands are
// upcast first (their products are exact in fp32, so this is the same accumulation).
inline at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cuda()) return at::mm(a, b, at::kFloat);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

// dw [C_out, C_in, 3]: dw[o, i, k] = Σ_{b,t} dz[b, t, o] · x[b, t+k−1, i] (zero outside [0, n)): one
// GEMM for k = 1, and per sequence a GEMM on row-shifted views for k = 0, 2 (exact, no im2col copy).
// bf16/fp16 inputs: every product accumulates in fp32 (mm_fp32), across sequences too, and dw is
// rounded to the input dtype once, at the end.
inline at::Tensor conv3_weight_grad(const at::Tensor& dz, const at::Tensor& x, int64_t B, int64_t n) {
  const int64_t c_out = dz.size(-1), c_in = x.size(-1);
  const at::Tensor dz2 = dz.reshape({B * n, c_out}), x2 = x.reshape({B * n, c_in});
  const bool reduced = dz.scalar_type() == at::kBFloat16 || dz.scalar_type() == at::kHalf;
  at::Tensor dw = at::zeros({3, c_out, c_in}, dz.options().dtype(reduced ? at::kFloat : dz.scalar_type()));
  dw.select(0, 1).copy_(reduced ? mm_fp32(dz2.t(), x2) : at::mm(dz2.t(), x2));
  if (n > 1) {
    at::Tensor dw0 = dw.select(0, 0), dw2 = dw.select(0, 2);
    for (int64_t b = 0; b < B; ++b) {
      const at::Tensor dzb = dz2.narrow(0, b * n, n), xb = x2.narrow(0, b * n, n);
      if (reduced) {
        dw0.add_(mm_fp32(dzb.narrow(0, 1, n - 1).t(), xb.narrow(0, 0, n - 1)));
        dw2.add_(mm_fp32(dzb.narrow(0, 0, n - 1).t(), xb.narrow(0, 1, n - 1)));
      } else {
        dw0.addmm_(dzb.narrow(0, 1, n - 1).t(), xb.narrow(0, 0, n - 1));
        dw2.addmm_(dzb.narrow(0, 0, n - 1).t(), xb.narrow(0, 1, n - 1));
      }
    }
  }
  return dw.permute({1, 2, 0}).to(dz.scalar_type()).contiguous();
}

}  // namespace ram
}  // namespace marn_fast
