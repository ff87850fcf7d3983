// CPU kernels of the fused RAM blocks (ATen only; fp32 and fp64).
//
// Block: conv1(k=3) → BN1 → tanh → conv2(k=3) → BN2 → epilogue, over channels-last x [B, n, C_in].
// Each k=3 conv is a Winograd F(4, 3) for wide channels (ram_winograd.h), else oneDNN's convolution run
// on the channels-last data as it lies (conv3_out); the
// pass after it fuses bias/BN statistics/normalise/tanh/add/multiply. The input gradient of a conv
// is the same conv with the kernel flipped and transposed; the weight gradient is three GEMMs
// dW_k = Σ_t dZ[t]^T X[t+k−1] (csrc/ram_gemm.h). Row passes run under at::parallel_for over row chunks; per-channel sums
// accumulate in fp64 per chunk and are added in chunk order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ram_common.h"
#include "../ram_gemm.h"
#include "ram_winograd.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace marn_fast {
namespace {

using namespace ram;

constexpr int64_t kChunkElems = 1 << 15;  // smallest row chunk (in elements) worth a thread

// tanh for fp32: x·P(x²)/Q(x²) on x clamped to ±9 (tanh(9) rounds to 1 in fp32), a rational fit with
// |error| < 5e-7 over the whole line; plain arithmetic, so the loops around it vectorise.
inline float tanh_fast(float x) {
  const float xc = std::min(std::max(x, -9.0f), 9.0f);
  const float u = xc * xc;
  const float p = (((((9.311976919e-10f * u + 1.403824186e-06f) * u + 2.299779003e-04f) * u + 7.985393630e-03f) * u +
                    3.140366413e-02f) * u - 1.588687004e-01f) * u + 9.999999849e-01f;
  const float q = ((((((5.360607707e-08f * u + 2.206204699e-05f) * u + 1.646091748e-03f) * u + 2.409998759e-02f) * u -
                     4.377464037e-02f) * u + 1.744645371e-01f) * u + 1.0f);
  return std::min(std::max(xc * p / q, -1.0f), 1.0f);
}
inline double tanh_fast(double x) { return std::tanh(x); }

// Runs body(r0, r1, acc) on disjoint row ranges covering [0, rows) in parallel; acc is a zeroed
// fp64 [n_acc · cols] buffer per chunk. Returns the accumulators summed over chunks.
template <typename F>
std::vector<double> for_row_chunks(int64_t rows, int64_t cols, int64_t n_acc, const F& body) {
  const int64_t by_work = std::max<int64_t>(1, rows * cols / kChunkElems);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({by_work, at::get_num_threads(), rows}));
  std::vector<double> partial(chunks * n_acc * cols, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      body(rows * c / chunks, rows * (c + 1) / chunks, partial.data() + c * n_acc * cols);
    }
  });
  std::vector<double> total(n_acc * cols, 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t j = 0; j < n_acc * cols; ++j) total[j] += partial[c * n_acc * cols + j];
  }
  return total;
}

// The k=3 conv z [B·n, C_out] of channels-last x: Winograd F(4, 3) for wide channels, else oneDNN.
at::Tensor conv3(const at::Tensor& x, const at::Tensor& w) {
  return use_winograd(w) ? conv3_winograd(x, w) : conv3_out(x, w);
}

// dx = the conv of dz with flip_transpose(w).
at::Tensor conv3_input_grad(const at::Tensor& dz, const at::Tensor& w, int64_t B, int64_t n) {
  return conv3(dz, flip_transpose(w)).view({B, n, w.size(1)});
}

// out row = epilogue(v row, other row); v holds the BN2 output.
template <typename scalar_t>
inline void apply_epilogue(int64_t epilogue, const scalar_t* v, const scalar_t* other, scalar_t* out, int64_t C) {
  switch (epilogue) {
    case kNone: for (int64_t o = 0; o < C; ++o) out[o] = v[o]; break;
    case kAdd: for (int64_t o = 0; o < C; ++o) out[o] = v[o] + other[o]; break;
    case kMul: for (int64_t o = 0; o < C; ++o) out[o] = v[o] * other[o]; break;
    default: for (int64_t o = 0; o < C; ++o) out[o] = tanh_fast(v[o] * other[o]); break;
  }
}

// dv (gradient at the BN2 output) and, for the multiplying epilogues, d_other, from the output gradient g.
template <typename scalar_t>
inline void epilogue_backward(int64_t epilogue, const scalar_t* g, const scalar_t* v, const scalar_t* other,
                              scalar_t* dv, scalar_t* d_other, int64_t C) {
  switch (epilogue) {
    case kNone:
    case kAdd: for (int64_t o = 0; o < C; ++o) dv[o] = g[o]; break;
    case kMul:
      for (int64_t o = 0; o < C; ++o) {
        dv[o] = g[o] * other[o];
        d_other[o] = g[o] * v[o];
      }
      break;
    default:
      for (int64_t o = 0; o < C; ++o) {
        const scalar_t t = tanh_fast(v[o] * other[o]);
        const scalar_t d = g[o] * (scalar_t(1) - t * t);
        dv[o] = d * other[o];
        d_other[o] = d * v[o];
      }
      break;
  }
}

template <typename scalar_t>
const scalar_t* other_ptr(const std::optional<at::Tensor>& other) {
  return other.has_value() ? other->const_data_ptr<scalar_t>() : nullptr;
}

at::Tensor to_tensor(const std::vector<double>& v, int64_t offset, int64_t count, const at::TensorOptions& opts) {
  return at::tensor(std::vector<double>(v.begin() + offset, v.begin() + offset + count), at::kDouble).to(opts);
}

// ---------------------------------------------------------------- eval: BN folded into w/b
std::tuple<at::Tensor, at::Tensor, at::Tensor> ram_block_eval_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                                  const at::Tensor& b1, const at::Tensor& w2,
                                                                  const at::Tensor& b2,
                                                                  const std::optional<at::Tensor>& other,
                                                                  int64_t epilogue) {
  const BlockDims d = check_block(x, w1, w2, {{&b1, "b1"}}, {{&b2, "b2"}}, other, epilogue,
                                  "marn_fast::ram_block_eval");
  const int64_t M = d.rows(), cm = d.c_mid, co = d.c_out, n = d.n;
  at::Tensor y1 = at::empty({d.B, n, cm}, x.options());
  at::Tensor out = at::empty({d.B, n, co}, x.options());
  const bool keep_v2 = epilogue >= kMul;
  at::Tensor v2 = keep_v2 ? at::empty({d.B, n, co}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ram_block_eval_cpu", [&] {
    {
      const at::Tensor Z = conv3(x, w1);
      const scalar_t *p = Z.const_data_ptr<scalar_t>(), *bias = b1.const_data_ptr<scalar_t>();
      scalar_t* y = y1.mutable_data_ptr<scalar_t>();
      for_row_chunks(M, cm, 0, [&](int64_t r0, int64_t r1, double*) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* zr = p + r * cm;
          scalar_t* yr = y + r * cm;
          for (int64_t o = 0; o < cm; ++o) yr[o] = tanh_fast(zr[o] + bias[o]);
        }
      });
    }
    const at::Tensor Z = conv3(y1, w2);
    const scalar_t *p = Z.const_data_ptr<scalar_t>(), *bias = b2.const_data_ptr<scalar_t>();
    const scalar_t* oth = other_ptr<scalar_t>(other);
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    scalar_t* pv = keep_v2 ? v2.mutable_data_ptr<scalar_t>() : nullptr;
    for_row_chunks(M, co, 0, [&](int64_t r0, int64_t r1, double*) {
      std::vector<scalar_t> z(co);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* zr = p + r * co;
        for (int64_t o = 0; o < co; ++o) z[o] = zr[o] + bias[o];
        if (keep_v2) std::copy(z.begin(), z.end(), pv + r * co);
        apply_epilogue(epilogue, z.data(), oth ? oth + r * co : nullptr, po + r * co, co);
      }
    });
  });
  return {out, y1, v2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ram_block_eval_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& y1, const at::Tensor& w2,
    const at::Tensor& v2, const std::optional<at::Tensor>& other, int64_t epilogue) {
  const char* op = "marn_fast::ram_block_eval_backward";
  const BlockDims d = check_eval_backward(grad, x, w1, y1, w2, v2, other, epilogue, op);
  const int64_t M = d.rows(), cm = d.c_mid, co = d.c_out, n = d.n;
  at::Tensor dv2 = at::empty({d.B, n, co}, x.options());
  at::Tensor d_other = epilogue >= kMul ? at::empty({d.B, n, co}, x.options()) : at::empty({0}, x.options());
  at::Tensor dv1 = at::empty({d.B, n, cm}, x.options());
  at::Tensor db1, db2, dw1, dw2, dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ram_block_eval_backward_cpu", [&] {
    const scalar_t *g = grad.const_data_ptr<scalar_t>(), *oth = other_ptr<scalar_t>(other);
    const scalar_t* v = epilogue >= kMul ? v2.const_data_ptr<scalar_t>() : nullptr;
    scalar_t *pdv = dv2.mutable_data_ptr<scalar_t>(), *pdo = epilogue >= kMul ? d_other.mutable_data_ptr<scalar_t>() : nullptr;
    const std::vector<double> s2 = for_row_chunks(M, co, 1, [&](int64_t r0, int64_t r1, double* acc) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * co;
        epilogue_backward(epilogue, g + off, v ? v + off : nullptr, oth ? oth + off : nullptr, pdv + off,
                          pdo ? pdo + off : nullptr, co);
        for (int64_t o = 0; o < co; ++o) acc[o] += pdv[off + o];
      }
    });
    db2 = to_tensor(s2, 0, co, x.options());
    dw2 = conv3_weight_grad(dv2, y1, d.B, n);
    const at::Tensor Z = conv3(dv2, flip_transpose(w2));
    const scalar_t *p = Z.const_data_ptr<scalar_t>(), *y = y1.const_data_ptr<scalar_t>();
    scalar_t* pdv1 = dv1.mutable_data_ptr<scalar_t>();
    const std::vector<double> s1 = for_row_chunks(M, cm, 1, [&](int64_t r0, int64_t r1, double* acc) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* dr = pdv1 + r * cm;
        const scalar_t* yr = y + r * cm;
        const scalar_t* zr = p + r * cm;
        for (int64_t o = 0; o < cm; ++o) {
          dr[o] = zr[o] * (scalar_t(1) - yr[o] * yr[o]);
          acc[o] += dr[o];
        }
      }
    });
    db1 = to_tensor(s1, 0, cm, x.options());
  });
  dw1 = conv3_weight_grad(dv1, x, d.B, n);
  dx = conv3_input_grad(dv1, w1, d.B, n);
  return {dx, dw1, db1, dw2, db2, d_other};
}

// ---------------------------------------------------------------- train: BN with batch statistics
// Per-channel (mean, biased var) of the conv output z [B, n, C] (two passes, fp64 sums).
template <typename scalar_t>
std::pair<std::vector<double>, std::vector<double>> channel_stats(const at::Tensor& z) {
  const int64_t M = z.size(0) * z.size(1), C = z.size(2);
  const scalar_t* pz = z.const_data_ptr<scalar_t>();
  std::vector<double> mean = for_row_chunks(M, C, 1, [&](int64_t r0, int64_t r1, double* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = pz + r * C;
      for (int64_t o = 0; o < C; ++o) acc[o] += zr[o];
    }
  });
  for (double& m : mean) m /= static_cast<double>(M);
  std::vector<double> var = for_row_chunks(M, C, 1, [&](int64_t r0, int64_t r1, double* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = pz + r * C;
      for (int64_t o = 0; o < C; ++o) {
        const double c = static_cast<double>(zr[o]) - mean[o];
        acc[o] += c * c;
      }
    }
  });
  for (double& v : var) v /= static_cast<double>(M);
  return {mean, var};
}

// Per-channel affine of the normalisation y = z·a + c, a = γ/sqrt(var+eps), c = β − mean·a.
template <typename scalar_t>
void bn_affine(const std::vector<double>& mean, const std::vector<double>& var, const at::Tensor& gamma,
               const at::Tensor& beta, double eps, std::vector<scalar_t>& a, std::vector<scalar_t>& c) {
  const int64_t C = static_cast<int64_t>(mean.size());
  const scalar_t *g = gamma.const_data_ptr<scalar_t>(), *b = beta.const_data_ptr<scalar_t>();
  a.resize(C);
  c.resize(C);
  for (int64_t o = 0; o < C; ++o) {
    const double s = static_cast<double>(g[o]) / std::sqrt(var[o] + eps);
    a[o] = static_cast<scalar_t>(s);
    c[o] = static_cast<scalar_t>(static_cast<double>(b[o]) - mean[o] * s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ram_block_train_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& gamma1, const at::Tensor& beta1,
                    const at::Tensor& w2, const at::Tensor& gamma2, const at::Tensor& beta2,
                    const std::optional<at::Tensor>& other, int64_t epilogue, double eps1, double eps2) {
  const char* op = "marn_fast::ram_block_train";
  const BlockDims d = check_train(x, w1, gamma1, beta1, w2, gamma2, beta2, other, epilogue, op);
  const int64_t M = d.rows(), cm = d.c_mid, co = d.c_out, n = d.n;
  const auto stats_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor z1 = conv3(x, w1).view({d.B, n, cm}), y1 = at::empty_like(z1);
  at::Tensor z2, out = at::empty({d.B, n, co}, x.options());
  at::Tensor mean1, var1, mean2, var2;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ram_block_train_cpu", [&] {
    std::vector<scalar_t> a, c;
    {
      const auto [m, v] = channel_stats<scalar_t>(z1);
      mean1 = to_tensor(m, 0, cm, stats_opts);
      var1 = to_tensor(v, 0, cm, stats_opts);
      bn_affine<scalar_t>(m, v, gamma1, beta1, eps1, a, c);
    }
    const scalar_t* pz1 = z1.const_data_ptr<scalar_t>();
    scalar_t* py1 = y1.mutable_data_ptr<scalar_t>();
    for_row_chunks(M, cm, 0, [&](int64_t r0, int64_t r1, double*) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* zr = pz1 + r * cm;
        scalar_t* yr = py1 + r * cm;
        for (int64_t o = 0; o < cm; ++o) yr[o] = tanh_fast(zr[o] * a[o] + c[o]);
      }
    });
    {
      z2 = conv3(y1, w2).view({d.B, n, co});
      const auto [m, v] = channel_stats<scalar_t>(z2);
      mean2 = to_tensor(m, 0, co, stats_opts);
      var2 = to_tensor(v, 0, co, stats_opts);
      bn_affine<scalar_t>(m, v, gamma2, beta2, eps2, a, c);
    }
    const scalar_t *pz2 = z2.const_data_ptr<scalar_t>(), *oth = other_ptr<scalar_t>(other);
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    for_row_chunks(M, co, 0, [&](int64_t r0, int64_t r1, double*) {
      std::vector<scalar_t> v(co);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* zr = pz2 + r * co;
        for (int64_t o = 0; o < co; ++o) v[o] = zr[o] * a[o] + c[o];
        apply_epilogue(epilogue, v.data(), oth ? oth + r * co : nullptr, po + r * co, co);
      }
    });
  });
  return {out, z1, y1, z2, mean1, var1, mean2, var2};
}

// In place: dv (gradient at the BN output, over z [M, C]) → dz, the gradient at the BN input:
// dz = γ·invstd·(dv − Σdv/M − x̂·Σ(dv·x̂)/M), x̂ = (z − mean)·invstd, with s_dv = Σdv, s_dvx = Σdv·x̂.
template <typename scalar_t>
void bn_backward_inplace(at::Tensor& dv, const at::Tensor& z, const std::vector<double>& mean,
                         const std::vector<double>& invstd, const at::Tensor& gamma, const std::vector<double>& s_dv,
                         const std::vector<double>& s_dvx) {
  const int64_t C = z.size(2), M = z.numel() / C;
  const scalar_t* g = gamma.const_data_ptr<scalar_t>();
  std::vector<scalar_t> mu(C), is(C), k(C), m_dv(C), m_dvx(C);
  for (int64_t o = 0; o < C; ++o) {
    mu[o] = static_cast<scalar_t>(mean[o]);
    is[o] = static_cast<scalar_t>(invstd[o]);
    k[o] = static_cast<scalar_t>(static_cast<double>(g[o]) * invstd[o]);
    m_dv[o] = static_cast<scalar_t>(s_dv[o] / M);
    m_dvx[o] = static_cast<scalar_t>(s_dvx[o] / M);
  }
  const scalar_t* pz = z.const_data_ptr<scalar_t>();
  scalar_t* pd = dv.mutable_data_ptr<scalar_t>();
  for_row_chunks(M, C, 0, [&](int64_t r0, int64_t r1, double*) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = pz + r * C;
      scalar_t* dr = pd + r * C;
      for (int64_t o = 0; o < C; ++o) {
        const scalar_t xh = (zr[o] - mu[o]) * is[o];
        dr[o] = k[o] * (dr[o] - m_dv[o] - xh * m_dvx[o]);
      }
    }
  });
}

std::vector<double> read_stats(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

std::vector<double> invstd_of(const std::vector<double>& var, double eps) {
  std::vector<double> r(var.size());
  for (size_t i = 0; i < var.size(); ++i) r[i] = 1.0 / std::sqrt(var[i] + eps);
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ram_block_train_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1,
                             const at::Tensor& gamma1, const at::Tensor& z1, const at::Tensor& y1,
                             const at::Tensor& mean1, const at::Tensor& var1, const at::Tensor& w2,
                             const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& z2,
                             const at::Tensor& mean2, const at::Tensor& var2,
                             const std::optional<at::Tensor>& other, int64_t epilogue, double eps1, double eps2) {
  const char* op = "marn_fast::ram_block_train_backward";
  const BlockDims d = check_train_backward(grad, x, w1, gamma1, z1, y1, mean1, var1, w2, gamma2, beta2, z2, mean2,
                                          var2, other, epilogue, op);
  const int64_t M = d.rows(), cm = d.c_mid, co = d.c_out, n = d.n;
  at::Tensor dz2 = at::empty({d.B, n, co}, x.options()), dz1 = at::empty({d.B, n, cm}, x.options());
  at::Tensor d_other = epilogue >= kMul ? at::empty({d.B, n, co}, x.options()) : at::empty({0}, x.options());
  at::Tensor dgamma1, dbeta1, dgamma2, dbeta2, dw2;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ram_block_train_backward_cpu", [&] {
    // BN2 + epilogue: dv into dz2, then dz2 in place.
    const std::vector<double> m2 = read_stats(mean2), is2 = invstd_of(read_stats(var2), eps2);
    std::vector<scalar_t> mu(co), is(co);
    for (int64_t o = 0; o < co; ++o) {
      mu[o] = static_cast<scalar_t>(m2[o]);
      is[o] = static_cast<scalar_t>(is2[o]);
    }
    const scalar_t *g = grad.const_data_ptr<scalar_t>(), *pz2 = z2.const_data_ptr<scalar_t>();
    const scalar_t *ga = gamma2.const_data_ptr<scalar_t>(), *be = beta2.const_data_ptr<scalar_t>();
    const scalar_t* oth = other_ptr<scalar_t>(other);
    scalar_t *pd = dz2.mutable_data_ptr<scalar_t>(), *pdo = epilogue >= kMul ? d_other.mutable_data_ptr<scalar_t>() : nullptr;
    const std::vector<double> s2 = for_row_chunks(M, co, 2, [&](int64_t r0, int64_t r1, double* acc) {
      std::vector<scalar_t> xh(co), v(co);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * co;
        for (int64_t o = 0; o < co; ++o) {
          xh[o] = (pz2[off + o] - mu[o]) * is[o];
          v[o] = ga[o] * xh[o] + be[o];
        }
        epilogue_backward(epilogue, g + off, v.data(), oth ? oth + off : nullptr, pd + off, pdo ? pdo + off : nullptr,
                          co);
        for (int64_t o = 0; o < co; ++o) {
          acc[o] += pd[off + o];
          acc[co + o] += static_cast<double>(pd[off + o]) * xh[o];
        }
      }
    });
    const std::vector<double> s2_dv(s2.begin(), s2.begin() + co), s2_dvx(s2.begin() + co, s2.end());
    dbeta2 = to_tensor(s2, 0, co, x.options());
    dgamma2 = to_tensor(s2, co, co, x.options());
    bn_backward_inplace<scalar_t>(dz2, z2, m2, is2, gamma2, s2_dv, s2_dvx);
    dw2 = conv3_weight_grad(dz2, y1, d.B, n);

    // conv2 input grad fused with tanh' and BN1's reductions: dv1 into dz1, then dz1 in place.
    const std::vector<double> m1 = read_stats(mean1), is1 = invstd_of(read_stats(var1), eps1);
    std::vector<scalar_t> mu1(cm), iv1(cm);
    for (int64_t o = 0; o < cm; ++o) {
      mu1[o] = static_cast<scalar_t>(m1[o]);
      iv1[o] = static_cast<scalar_t>(is1[o]);
    }
    const at::Tensor Z = conv3(dz2, flip_transpose(w2));
    const scalar_t *p = Z.const_data_ptr<scalar_t>(), *py = y1.const_data_ptr<scalar_t>(),
                   *pz1 = z1.const_data_ptr<scalar_t>();
    scalar_t* pd1 = dz1.mutable_data_ptr<scalar_t>();
    const std::vector<double> s1 = for_row_chunks(M, cm, 2, [&](int64_t r0, int64_t r1, double* acc) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * cm;
        scalar_t* dr = pd1 + off;
        const scalar_t* zr = p + off;
        for (int64_t o = 0; o < cm; ++o) {
          dr[o] = zr[o] * (scalar_t(1) - py[off + o] * py[off + o]);
          const scalar_t xh = (pz1[off + o] - mu1[o]) * iv1[o];
          acc[o] += dr[o];
          acc[cm + o] += static_cast<double>(dr[o]) * xh;
        }
      }
    });
    const std::vector<double> s1_dv(s1.begin(), s1.begin() + cm), s1_dvx(s1.begin() + cm, s1.end());
    dbeta1 = to_tensor(s1, 0, cm, x.options());
    dgamma1 = to_tensor(s1, cm, cm, x.options());
    bn_backward_inplace<scalar_t>(dz1, z1, m1, is1, gamma1, s1_dv, s1_dvx);
  });
  at::Tensor dw1 = conv3_weight_grad(dz1, x, d.B, n);
  at::Tensor dx = conv3_input_grad(dz1, w1, d.B, n);
  return {dx, dw1, dgamma1, dbeta1, dw2, dgamma2, dbeta2, d_other};
}

// nn.BatchNorm1d's running-statistics update (device-agnostic ATen ops, registered for every backend):
// running_mean ← (1−m)·running_mean + m·mean, running_var ← (1−m)·running_var + m·var·count/(count−1).
void ram_bn_update_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                         const at::Tensor& var, int64_t count, double momentum) {
  const char* op = "marn_fast::ram_bn_update_stats";
  TORCH_CHECK(count > 1, op, ": count must be > 1, got ", count);
  TORCH_CHECK(running_mean.dim() == 1 && running_var.sizes() == running_mean.sizes() &&
                  mean.sizes() == running_mean.sizes() && var.sizes() == running_mean.sizes(),
              op, ": running_mean, running_var, mean and var must be [C] of one size, got ", running_mean.sizes(),
              ", ", running_var.sizes(), ", ", mean.sizes(), ", ", var.sizes());
  TORCH_CHECK(running_mean.device() == mean.device() && running_var.device() == mean.device() &&
                  var.device() == mean.device(),
              op, ": running_mean, running_var, mean and var must be on one device");
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const at::ScalarType acc = stats_dtype(running_mean.scalar_type());
  running_mean.copy_(running_mean.to(acc) * (1.0 - momentum) + mean.to(acc) * momentum);
  running_var.copy_(running_var.to(acc) * (1.0 - momentum) + var.to(acc) * (momentum * unbias));
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CPU, m) {
  m.impl("ram_block_eval", &ram_block_eval_cpu);
  m.impl("ram_block_eval_backward", &ram_block_eval_backward_cpu);
  m.impl("ram_block_train", &ram_block_train_cpu);
  m.impl("ram_block_train_backward", &ram_block_train_backward_cpu);
}

TORCH_LIBRARY_IMPL(marn_fast, CompositeExplicitAutograd, m) {
  m.impl("ram_bn_update_stats", &ram_bn_update_stats);
}

}  // namespace marn_fast
