// C++ test of csrc/ram_gemm.h's conv3_weight_grad on bf16 inputs (the RAM's CUDA path runs it in
// bf16; the CPU tensors here take the same code with the CPU's mm): every product accumulates in
// fp32 across all sequences and each weight gradient is rounded to bf16 once, so it lies within
// half a bf16 unit in the last place (plus fp32 summation noise) of the exact value. Rounding each
// sequence's partial product to bf16 before summing (the defect of issue 22) misses that by several
// units on the entries where the sequences' partial sums cancel.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>

#include "../ram_gemm.h"
#include "expect.h"

namespace {

using namespace marn_fast_test;

// The exact weight gradient in float64 from the same (bf16) values: dw[o, i, k] = Σ_{b,t} dz[b,t,o]·x[b,t+k−1,i].
at::Tensor exact_weight_grad(const at::Tensor& dz, const at::Tensor& x) {
  const int64_t n = dz.size(1);
  const at::Tensor dz64 = dz.to(at::kDouble), x64 = x.to(at::kDouble);
  at::Tensor dw = at::zeros({dz.size(2), x.size(2), 3}, dz64.options());
  dw.select(2, 1).copy_(at::einsum("bto,bti->oi", {dz64, x64}));
  dw.select(2, 0).copy_(at::einsum("bto,bti->oi", {dz64.narrow(1, 1, n - 1), x64.narrow(1, 0, n - 1)}));
  dw.select(2, 2).copy_(at::einsum("bto,bti->oi", {dz64.narrow(1, 0, n - 1), x64.narrow(1, 1, n - 1)}));
  return dw;
}

// max over entries of |got − exact| in units of bf16's spacing at |exact| (2^(⌊log2 |exact|⌋ − 7)).
double max_error_in_bf16_ulps(const at::Tensor& got, const at::Tensor& exact) {
  const at::Tensor ulp = at::exp2(at::floor(at::log2(exact.abs().clamp_min(1e-30))) - 7);
  return ((got.to(at::kDouble) - exact).abs() / ulp).max().item<double>();
}

}  // namespace

int main() {
  at::manual_seed(0);
  // Many sequences, so that per-sequence rounding would add up; odd sizes.
  for (const auto& [B, n, c_out, c_in] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{48, 37, 5, 7},
                                           {64, 129, 3, 6}}) {
    const at::Tensor dz = at::randn({B, n, c_out}).to(at::kBFloat16);
    const at::Tensor x = at::randn({B, n, c_in}).to(at::kBFloat16);
    const at::Tensor dw = marn_fast::ram::conv3_weight_grad(dz, x, B, n);
    const double ulps = max_error_in_bf16_ulps(dw, exact_weight_grad(dz, x));
    const bool ok = dw.scalar_type() == at::kBFloat16 && ulps <= 0.55;
    std::printf("conv3_weight_grad bf16 B=%lld n=%lld: max error %.3f bf16 ulps (bound 0.55)\n",
                static_cast<long long>(B), static_cast<long long>(n), ulps);
    expect(ok, "conv3_weight_grad in bf16 within 0.55 bf16 ulps of the exact value");
  }
  return report();
}
