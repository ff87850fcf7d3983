// CUDA kernels of the fused RAM blocks (ATen headers only): fp32, fp64, bf16 and fp16, with fp32
// accumulation and fp32 BatchNorm statistics for the 16-bit types.
//
// Same algorithm as csrc/cpu/ram_cpu.cpp: each k=3 conv is one cuBLAS GEMM (at::mm) into the products
// P [B·n, 3·C] whose shift-sum is fused into the next pass. Every pass is one launch of rows_kernel
// with a functor: 32 channels (coalesced) × 8 row lanes per block, a slab of rows per block, and up to
// two per-channel sums reduced in shared memory and added with atomicAdd.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ram_common.h"
#include "../ram_gemm.h"

#include <algorithm>
#include <tuple>

namespace marn_fast {
namespace {

using namespace ram;

constexpr int kLanes = 32;    // channels per block (threadIdx.x)
constexpr int kRowLanes = 8;  // rows in flight per block (threadIdx.y)

template <typename scalar_t>
using acc_type = at::acc_type<scalar_t, /*is_cuda=*/true>;

// Conv output of row r, channel o from its products P [rows, 3C] (sequence position t = r mod n).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t shift_sum(const scalar_t* P, int64_t r, int64_t o, int64_t n, int64_t C) {
  const int64_t t = r % n;
  acc_t z = static_cast<acc_t>(P[r * 3 * C + C + o]);
  if (t > 0) z += static_cast<acc_t>(P[(r - 1) * 3 * C + o]);
  if (t + 1 < n) z += static_cast<acc_t>(P[(r + 1) * 3 * C + 2 * C + o]);
  return z;
}

template <typename acc_t>
__device__ __forceinline__ acc_t epilogue_fwd(int64_t epilogue, acc_t v, acc_t other) {
  switch (epilogue) {
    case kNone: return v;
    case kAdd: return v + other;
    case kMul: return v * other;
    default: return tanh(v * other);
  }
}

// dv (gradient at the BN2 output) from the output gradient g; *d_other for the multiplying epilogues.
template <typename acc_t>
__device__ __forceinline__ acc_t epilogue_bwd(int64_t epilogue, acc_t g, acc_t v, acc_t other, acc_t* d_other) {
  if (epilogue == kMul) {
    *d_other = g * v;
    return g * other;
  }
  if (epilogue == kMulTanh) {
    const acc_t t = tanh(v * other);
    const acc_t d = g * (acc_t(1) - t * t);
    *d_other = d * v;
    return d * other;
  }
  return g;
}

// op(r, o, acc) for every (row, channel) of [M, C]; NACC per-channel sums of acc added into sums[k·C + o].
template <typename acc_t, int NACC, typename Op>
__global__ void rows_kernel(Op op, int64_t M, int64_t C, int64_t rows_per_block, acc_t* __restrict__ sums) {
  const int64_t o = blockIdx.x * (int64_t)kLanes + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_block;
  const int64_t r1 = min(M, r0 + rows_per_block);
  acc_t acc[NACC > 0 ? NACC : 1];
  for (int k = 0; k < (NACC > 0 ? NACC : 1); ++k) acc[k] = acc_t(0);
  if (o < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) op(r, o, acc);
  }
  if constexpr (NACC > 0) {
    __shared__ acc_t shared[NACC][kRowLanes][kLanes + 1];
    for (int k = 0; k < NACC; ++k) shared[k][threadIdx.y][threadIdx.x] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0 && o < C) {
      for (int k = 0; k < NACC; ++k) {
        acc_t s = 0;
        for (int y = 0; y < kRowLanes; ++y) s += shared[k][y][threadIdx.x];
        atomicAdd(&sums[k * C + o], s);
      }
    }
  }
}

// Launches rows_kernel over [M, C]; returns the sums [NACC, C] (acc dtype), or an empty tensor.
template <typename acc_t, int NACC, typename Op>
at::Tensor launch_rows(const Op& op, int64_t M, int64_t C, const at::Tensor& like) {
  at::Tensor sums = at::zeros({NACC, C}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (M == 0 || C == 0) return sums;
  const int64_t grid_x = (C + kLanes - 1) / kLanes;
  const int64_t target_blocks = 8 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid_y = std::max<int64_t>(1, std::min<int64_t>({(M + 63) / 64, target_blocks / grid_x + 1, 65535}));
  const int64_t rows_per_block = (M + grid_y - 1) / grid_y;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>((M + rows_per_block - 1) / rows_per_block));
  rows_kernel<acc_t, NACC><<<grid, dim3(kLanes, kRowLanes), 0, at::cuda::getCurrentCUDAStream()>>>(
      op, M, C, rows_per_block, NACC > 0 ? sums.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sums;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// ------------------------------------------------------------------ functors (one per pass)
template <typename scalar_t, typename acc_t>
struct ShiftStore {  // out = conv output (the input gradient of a conv)
  const scalar_t* P; scalar_t* out; int64_t n, C;
  __device__ void operator()(int64_t r, int64_t o, acc_t*) const {
    out[r * C + o] = static_cast<scalar_t>(shift_sum<acc_t>(P, r, o, n, C));
  }
};

template <typename scalar_t, typename acc_t>
struct ShiftBiasTanh {  // y = tanh(conv + b)
  const scalar_t* P; const acc_t* b; scalar_t* y; int64_t n, C;
  __device__ void operator()(int64_t r, int64_t o, acc_t*) const {
    y[r * C + o] = static_cast<scalar_t>(tanh(shift_sum<acc_t>(P, r, o, n, C) + b[o]));
  }
};

template <typename scalar_t, typename acc_t>
struct ShiftBiasEpilogue {  // v = conv + b (kept when v_out), out = epilogue(v, other)
  const scalar_t* P; const acc_t* b; const scalar_t* other; scalar_t* v_out; scalar_t* out; int64_t n, C, epilogue;
  __device__ void operator()(int64_t r, int64_t o, acc_t*) const {
    const int64_t i = r * C + o;
    const acc_t v = shift_sum<acc_t>(P, r, o, n, C) + b[o];
    if (v_out) v_out[i] = static_cast<scalar_t>(v);
    out[i] = static_cast<scalar_t>(epilogue_fwd<acc_t>(epilogue, v, other ? static_cast<acc_t>(other[i]) : acc_t(0)));
  }
};

template <typename scalar_t, typename acc_t>
struct ShiftStoreSum {  // z = conv, Σz
  const scalar_t* P; scalar_t* z; int64_t n, C;
  __device__ void operator()(int64_t r, int64_t o, acc_t* acc) const {
    const acc_t v = shift_sum<acc_t>(P, r, o, n, C);
    z[r * C + o] = static_cast<scalar_t>(v);
    acc[0] += v;
  }
};

template <typename scalar_t, typename acc_t>
struct CenteredSquares {  // Σ(z − mean)²
  const scalar_t* z; const acc_t* mean; int64_t C;
  __device__ void operator()(int64_t r, int64_t o, acc_t* acc) const {
    const acc_t c = static_cast<acc_t>(z[r * C + o]) - mean[o];
    acc[0] += c * c;
  }
};

template <typename scalar_t, typename acc_t>
struct NormTanh {  // y = tanh(z·a + c)
  const scalar_t* z; const acc_t* a; const acc_t* c; scalar_t* y; int64_t C;
  __device__ void operator()(int64_t r, int64_t o, acc_t*) const {
    const int64_t i = r * C + o;
    y[i] = static_cast<scalar_t>(tanh(static_cast<acc_t>(z[i]) * a[o] + c[o]));
  }
};

template <typename scalar_t, typename acc_t>
struct NormEpilogue {  // out = epilogue(z·a + c, other)
  const scalar_t* z; const acc_t* a; const acc_t* c; const scalar_t* other; scalar_t* out; int64_t C, epilogue;
  __device__ void operator()(int64_t r, int64_t o, acc_t*) const {
    const int64_t i = r * C + o;
    const acc_t v = static_cast<acc_t>(z[i]) * a[o] + c[o];
    out[i] = static_cast<scalar_t>(epilogue_fwd<acc_t>(epilogue, v, other ? static_cast<acc_t>(other[i]) : acc_t(0)));
  }
};

// Eval backward at the block output: dv = epilogue'(g), d_other; Σdv. v = the stored conv2 + b2.
template <typename scalar_t, typename acc_t>
struct EvalOutputBackward {
  const scalar_t* g; const scalar_t* v; const scalar_t* other; scalar_t* dv; scalar_t* d_other; int64_t C, epilogue;
  __device__ void operator()(int64_t r, int64_t o, acc_t* acc) const {
    const int64_t i = r * C + o;
    acc_t dother = 0;
    const acc_t d = epilogue_bwd<acc_t>(epilogue, static_cast<acc_t>(g[i]), v ? static_cast<acc_t>(v[i]) : acc_t(0),
                                        other ? static_cast<acc_t>(other[i]) : acc_t(0), &dother);
    dv[i] = static_cast<scalar_t>(d);
    if (d_other) d_other[i] = static_cast<scalar_t>(dother);
    acc[0] += d;
  }
};

// Train backward at the block output: v = γ·x̂ + β recomputed from z2; dv; Σdv, Σdv·x̂.
template <typename scalar_t, typename acc_t>
struct TrainOutputBackward {
  const scalar_t* g; const scalar_t* z; const acc_t* mean; const acc_t* invstd; const acc_t* gamma; const acc_t* beta;
  const scalar_t* other; scalar_t* dv; scalar_t* d_other; int64_t C, epilogue;
  __device__ void operator()(int64_t r, int64_t o, acc_t* acc) const {
    const int64_t i = r * C + o;
    const acc_t xh = (static_cast<acc_t>(z[i]) - mean[o]) * invstd[o];
    acc_t dother = 0;
    const acc_t d = epilogue_bwd<acc_t>(epilogue, static_cast<acc_t>(g[i]), gamma[o] * xh + beta[o],
                                        other ? static_cast<acc_t>(other[i]) : acc_t(0), &dother);
    dv[i] = static_cast<scalar_t>(d);
    if (d_other) d_other[i] = static_cast<scalar_t>(dother);
    acc[0] += d;
    acc[1] += d * xh;
  }
};

// Through the first tanh: dv = conv_input_grad · (1 − y²); Σdv, and with NACC = 2 also Σdv·x̂.
template <typename scalar_t, typename acc_t, int NACC>
struct TanhBackward {
  const scalar_t* P; const scalar_t* y; const scalar_t* z; const acc_t* mean; const acc_t* invstd; scalar_t* dv;
  int64_t n, C;
  __device__ void operator()(int64_t r, int64_t o, acc_t* acc) const {
    const int64_t i = r * C + o;
    const acc_t yy = static_cast<acc_t>(y[i]);
    const acc_t d = shift_sum<acc_t>(P, r, o, n, C) * (acc_t(1) - yy * yy);
    dv[i] = static_cast<scalar_t>(d);
    acc[0] += d;
    if constexpr (NACC == 2) acc[1] += d * (static_cast<acc_t>(z[i]) - mean[o]) * invstd[o];
  }
};

// In place dv → dz = k·(dv − mean(dv) − x̂·mean(dv·x̂)), k = γ·invstd.
template <typename scalar_t, typename acc_t>
struct BatchNormBackward {
  scalar_t* d; const scalar_t* z; const acc_t* mean; const acc_t* invstd; const acc_t* k; const acc_t* m_dv;
  const acc_t* m_dvx; int64_t C;
  __device__ void operator()(int64_t r, int64_t o, acc_t*) const {
    const int64_t i = r * C + o;
    const acc_t xh = (static_cast<acc_t>(z[i]) - mean[o]) * invstd[o];
    d[i] = static_cast<scalar_t>(k[o] * (static_cast<acc_t>(d[i]) - m_dv[o] - xh * m_dvx[o]));
  }
};

// ------------------------------------------------------------------ shared pieces
template <typename scalar_t>
at::Tensor conv3_input_grad(const at::Tensor& dz, const at::Tensor& w, int64_t B, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  const int64_t c_in = w.size(1);
  at::Tensor dx = at::empty({B, n, c_in}, dz.options());
  const at::Tensor P = conv3_products(dz, flip_transpose(w));
  launch_rows<acc_t, 0>(ShiftStore<scalar_t, acc_t>{P.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n,
                                                    c_in}, B * n, c_in, dz);
  return dx;
}

// z = conv(P) into `z`; returns (mean, biased var) in the acc dtype (two passes).
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> conv_out_and_stats(const at::Tensor& P, at::Tensor& z, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = z.size(2), M = z.numel() / C;
  at::Tensor mean = launch_rows<acc_t, 1>(
      ShiftStoreSum<scalar_t, acc_t>{P.const_data_ptr<scalar_t>(), z.mutable_data_ptr<scalar_t>(), n, C}, M, C, z)[0];
  mean.div_(static_cast<double>(M));
  at::Tensor var = launch_rows<acc_t, 1>(
      CenteredSquares<scalar_t, acc_t>{z.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), C}, M, C, z)[0];
  var.div_(static_cast<double>(M));
  return {mean, var};
}

// ------------------------------------------------------------------ eval
std::tuple<at::Tensor, at::Tensor, at::Tensor> ram_block_eval_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                                   const at::Tensor& b1, const at::Tensor& w2,
                                                                   const at::Tensor& b2,
                                                                   const std::optional<at::Tensor>& other,
                                                                   int64_t epilogue) {
  const BlockDims d = check_block(x, w1, w2, {{&b1, "b1"}}, {{&b2, "b2"}}, other, epilogue,
                                  "marn_fast::ram_block_eval");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = d.rows(), n = d.n;
  at::Tensor y1 = at::empty({d.B, n, d.c_mid}, x.options());
  at::Tensor out = at::empty({d.B, n, d.c_out}, x.options());
  const bool keep_v2 = epilogue >= kMul;
  at::Tensor v2 = keep_v2 ? at::empty({d.B, n, d.c_out}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ram_block_eval_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    {
      const at::Tensor P = conv3_products(x, w1), bias = as_acc<acc_t>(b1);
      launch_rows<acc_t, 0>(ShiftBiasTanh<scalar_t, acc_t>{P.const_data_ptr<scalar_t>(), bias.const_data_ptr<acc_t>(),
                                                           y1.mutable_data_ptr<scalar_t>(), n, d.c_mid},
                            M, d.c_mid, x);
    }
    const at::Tensor P = conv3_products(y1, w2), bias = as_acc<acc_t>(b2);
    launch_rows<acc_t, 0>(
        ShiftBiasEpilogue<scalar_t, acc_t>{P.const_data_ptr<scalar_t>(), bias.const_data_ptr<acc_t>(),
                                           ptr_or_null<scalar_t>(other),
                                           keep_v2 ? v2.mutable_data_ptr<scalar_t>() : nullptr,
                                           out.mutable_data_ptr<scalar_t>(), n, d.c_out, epilogue},
        M, d.c_out, x);
  });
  return {out, y1, v2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ram_block_eval_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& y1, const at::Tensor& w2,
    const at::Tensor& v2, const std::optional<at::Tensor>& other, int64_t epilogue) {
  const char* op = "marn_fast::ram_block_eval_backward";
  const BlockDims d = check_eval_backward(grad, x, w1, y1, w2, v2, other, epilogue, op);
  const int64_t M = d.rows(), n = d.n;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dv2 = at::empty({d.B, n, d.c_out}, x.options()), dv1 = at::empty({d.B, n, d.c_mid}, x.options());
  at::Tensor d_other = epilogue >= kMul ? at::empty({d.B, n, d.c_out}, x.options()) : at::empty({0}, x.options());
  at::Tensor db1, db2, dw1, dw2, dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ram_block_eval_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    db2 = launch_rows<acc_t, 1>(
        EvalOutputBackward<scalar_t, acc_t>{grad.const_data_ptr<scalar_t>(),
                                            epilogue >= kMul ? v2.const_data_ptr<scalar_t>() : nullptr,
                                            ptr_or_null<scalar_t>(other), dv2.mutable_data_ptr<scalar_t>(),
                                            epilogue >= kMul ? d_other.mutable_data_ptr<scalar_t>() : nullptr,
                                            d.c_out, epilogue},
        M, d.c_out, x)[0].to(x.scalar_type());
    dw2 = conv3_weight_grad(dv2, y1, d.B, n);
    const at::Tensor P = conv3_products(dv2, flip_transpose(w2));
    db1 = launch_rows<acc_t, 1>(TanhBackward<scalar_t, acc_t, 1>{P.const_data_ptr<scalar_t>(), y1.const_data_ptr<scalar_t>(),
                                                              nullptr, nullptr, nullptr, dv1.mutable_data_ptr<scalar_t>(),
                                                              n, d.c_mid},
                                M, d.c_mid, x)[0].to(x.scalar_type());
    dw1 = conv3_weight_grad(dv1, x, d.B, n);
    dx = conv3_input_grad<scalar_t>(dv1, w1, d.B, n);
  });
  return {dx, dw1, db1, dw2, db2, d_other};
}

// ------------------------------------------------------------------ train
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ram_block_train_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& gamma1, const at::Tensor& beta1,
                     const at::Tensor& w2, const at::Tensor& gamma2, const at::Tensor& beta2,
                     const std::optional<at::Tensor>& other, int64_t epilogue, double eps1, double eps2) {
  const char* op = "marn_fast::ram_block_train";
  const BlockDims d = check_train(x, w1, gamma1, beta1, w2, gamma2, beta2, other, epilogue, op);
  const int64_t M = d.rows(), n = d.n;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor z1 = at::empty({d.B, n, d.c_mid}, x.options()), y1 = at::empty_like(z1);
  at::Tensor z2 = at::empty({d.B, n, d.c_out}, x.options()), out = at::empty_like(z2);
  at::Tensor mean1, var1, mean2, var2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ram_block_train_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    std::tie(mean1, var1) = conv_out_and_stats<scalar_t>(conv3_products(x, w1), z1, n);
    at::Tensor a = as_acc<acc_t>(gamma1) * (var1 + eps1).rsqrt();
    at::Tensor c = as_acc<acc_t>(beta1) - mean1 * a;
    launch_rows<acc_t, 0>(NormTanh<scalar_t, acc_t>{z1.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(),
                                                    c.const_data_ptr<acc_t>(), y1.mutable_data_ptr<scalar_t>(),
                                                    d.c_mid},
                          M, d.c_mid, x);
    std::tie(mean2, var2) = conv_out_and_stats<scalar_t>(conv3_products(y1, w2), z2, n);
    a = as_acc<acc_t>(gamma2) * (var2 + eps2).rsqrt();
    c = as_acc<acc_t>(beta2) - mean2 * a;
    launch_rows<acc_t, 0>(NormEpilogue<scalar_t, acc_t>{z2.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(),
                                                        c.const_data_ptr<acc_t>(), ptr_or_null<scalar_t>(other),
                                                        out.mutable_data_ptr<scalar_t>(), d.c_out, epilogue},
                          M, d.c_out, x);
  });
  return {out, z1, y1, z2, mean1, var1, mean2, var2};
}

// In place dv → dz from the sums [2, C] = (Σdv, Σdv·x̂); returns (dγ, dβ) in `dtype`.
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> batch_norm_backward(at::Tensor& dv, const at::Tensor& z, const at::Tensor& mean,
                                                      const at::Tensor& invstd, const at::Tensor& gamma,
                                                      const at::Tensor& sums) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = z.size(2), M = z.numel() / C;
  const at::Tensor k = as_acc<acc_t>(gamma) * invstd;
  const at::Tensor m_dv = sums[0] / static_cast<double>(M), m_dvx = sums[1] / static_cast<double>(M);
  launch_rows<acc_t, 0>(BatchNormBackward<scalar_t, acc_t>{dv.mutable_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                                           mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                                           k.const_data_ptr<acc_t>(), m_dv.const_data_ptr<acc_t>(),
                                                           m_dvx.const_data_ptr<acc_t>(), C},
                        M, C, z);
  return {sums[1].to(z.scalar_type()), sums[0].to(z.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ram_block_train_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1,
                              const at::Tensor& gamma1, const at::Tensor& z1, const at::Tensor& y1,
                              const at::Tensor& mean1, const at::Tensor& var1, const at::Tensor& w2,
                              const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& z2,
                              const at::Tensor& mean2, const at::Tensor& var2,
                              const std::optional<at::Tensor>& other, int64_t epilogue, double eps1, double eps2) {
  const char* op = "marn_fast::ram_block_train_backward";
  const BlockDims d = check_train_backward(grad, x, w1, gamma1, z1, y1, mean1, var1, w2, gamma2, beta2, z2, mean2,
                                          var2, other, epilogue, op);
  const int64_t M = d.rows(), n = d.n;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dz2 = at::empty({d.B, n, d.c_out}, x.options()), dz1 = at::empty({d.B, n, d.c_mid}, x.options());
  at::Tensor d_other = epilogue >= kMul ? at::empty({d.B, n, d.c_out}, x.options()) : at::empty({0}, x.options());
  at::Tensor dgamma1, dbeta1, dgamma2, dbeta2, dw1, dw2, dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ram_block_train_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor is2 = (var2 + eps2).rsqrt(), ga2 = as_acc<acc_t>(gamma2), be2 = as_acc<acc_t>(beta2);
    const at::Tensor s2 = launch_rows<acc_t, 2>(
        TrainOutputBackward<scalar_t, acc_t>{grad.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(),
                                             mean2.const_data_ptr<acc_t>(), is2.const_data_ptr<acc_t>(),
                                             ga2.const_data_ptr<acc_t>(), be2.const_data_ptr<acc_t>(),
                                             ptr_or_null<scalar_t>(other), dz2.mutable_data_ptr<scalar_t>(),
                                             epilogue >= kMul ? d_other.mutable_data_ptr<scalar_t>() : nullptr,
                                             d.c_out, epilogue},
        M, d.c_out, x);
    std::tie(dgamma2, dbeta2) = batch_norm_backward<scalar_t>(dz2, z2, mean2, is2, gamma2, s2);
    dw2 = conv3_weight_grad(dz2, y1, d.B, n);
    const at::Tensor is1 = (var1 + eps1).rsqrt();
    const at::Tensor P = conv3_products(dz2, flip_transpose(w2));
    const at::Tensor s1 = launch_rows<acc_t, 2>(
        TanhBackward<scalar_t, acc_t, 2>{P.const_data_ptr<scalar_t>(), y1.const_data_ptr<scalar_t>(),
                                      z1.const_data_ptr<scalar_t>(), mean1.const_data_ptr<acc_t>(),
                                      is1.const_data_ptr<acc_t>(), dz1.mutable_data_ptr<scalar_t>(), n, d.c_mid},
        M, d.c_mid, x);
    std::tie(dgamma1, dbeta1) = batch_norm_backward<scalar_t>(dz1, z1, mean1, is1, gamma1, s1);
    dw1 = conv3_weight_grad(dz1, x, d.B, n);
    dx = conv3_input_grad<scalar_t>(dz1, w1, d.B, n);
  });
  return {dx, dw1, dgamma1, dbeta1, dw2, dgamma2, dbeta2, d_other};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CUDA, m) {
  m.impl("ram_block_eval", &ram_block_eval_cuda);
  m.impl("ram_block_eval_backward", &ram_block_eval_backward_cuda);
  m.impl("ram_block_train", &ram_block_train_cuda);
  m.impl("ram_block_train_backward", &ram_block_train_backward_cuda);
}

}  // namespace marn_fast
