// CPU passes of the GEMM-first label-wise attention over score blocks (fp32, fp64, bf16): the
// reduction and the elementwise pass between the vendor GEMMs (see
// marn_fast/ops/label_attention_gemm.py, whose PyTorch twins compute the same).
//
// A block holds Lc labels of D documents of T tokens: s, p [Lc, D·T] (row l: S = q_l·Oᵀ and
// P = w_l·Oᵀ of the D documents one after the other, tokens contiguous), lengths [D] int64 in [1, T].
// Over the valid tokens t < lengths[d] of each (label, document) row segment:
//   stats:  m = max_t s, Σe = Σ_t exp(s − m), z = Σ_t exp(s − m)·p / Σe, lse = m + log Σe
//           → z, lse [D, Lc]; with keep, in place s ← a = exp(s − lse), p ← a·(p − z).
//   grads:  in place s ← dP = g·exp(s − lse), p ← dS = dP·(p − z), g = dz [D, Lc].
// Padded tokens are skipped by stats (left as they are without keep) and written as 0 otherwise.
// Arithmetic is fp32 (fp64 for fp64 blocks); bf16 blocks are widened on load and rounded to
// nearest even on store. Rows are token-contiguous, so the reductions run in kLanes independent
// lanes (a fixed order, whatever the thread count) that the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#pragma GCC optimize("no-trapping-math")

#include "fast_math.h"

namespace marn_fast {
namespace {

constexpr int64_t kLanes = 16;

// Storage type → arithmetic type, widening load and narrowing store (bf16 is held as uint16_t).
template <typename S>
struct Elem {
  using Acc = S;
  static S load(S v) { return v; }
  static S store(S v) { return v; }
};
template <>
struct Elem<uint16_t> {
  using Acc = float;
  __attribute__((always_inline)) static float load(uint16_t v) { return bf16_to_float(v); }
  __attribute__((always_inline)) static uint16_t store(float v) { return float_to_bf16(v); }
};

template <typename S, typename A = typename Elem<S>::Acc>
__attribute__((always_inline)) inline A row_max(const S* __restrict__ s, int64_t len) {
  A lane[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) lane[j] = -std::numeric_limits<A>::infinity();
  int64_t t = 0;
  for (; t + kLanes <= len; t += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const A v = Elem<S>::load(s[t + j]);
      lane[j] = v > lane[j] ? v : lane[j];
    }
  }
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < kLanes; ++j) m = lane[j] > m ? lane[j] : m;
  for (; t < len; ++t) {
    const A v = Elem<S>::load(s[t]);
    m = v > m ? v : m;
  }
  return m;
}

// Σ exp(s − m) and Σ exp(s − m)·p over the row segment.
template <typename S, typename A = typename Elem<S>::Acc>
__attribute__((always_inline)) inline void row_sums(const S* __restrict__ s, const S* __restrict__ p, int64_t len,
                                                    A m, A& total, A& weighted) {
  A sum_lane[kLanes], acc_lane[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) sum_lane[j] = acc_lane[j] = A(0);
  int64_t t = 0;
  for (; t + kLanes <= len; t += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const A e = exp_(Elem<S>::load(s[t + j]) - m);
      sum_lane[j] += e;
      acc_lane[j] += e * Elem<S>::load(p[t + j]);
    }
  }
  A sum = A(0), acc = A(0);
  for (int64_t j = 0; j < kLanes; ++j) {
    sum += sum_lane[j];
    acc += acc_lane[j];
  }
  for (; t < len; ++t) {
    const A e = exp_(Elem<S>::load(s[t]) - m);
    sum += e;
    acc += e * Elem<S>::load(p[t]);
  }
  total = sum;
  weighted = acc;
}

// s ← scale·exp(s − shift), p ← s_new·(p − z) on t < len; both 0 on len ≤ t < tokens.
template <typename S, typename A = typename Elem<S>::Acc>
__attribute__((always_inline)) inline void row_transform(S* __restrict__ s, S* __restrict__ p, int64_t len,
                                                         int64_t tokens, A shift, A scale, A z) {
  for (int64_t t = 0; t < len; ++t) {
    const A a = scale * exp_(Elem<S>::load(s[t]) - shift);
    s[t] = Elem<S>::store(a);
    p[t] = Elem<S>::store(a * (Elem<S>::load(p[t]) - z));
  }
  for (int64_t t = len; t < tokens; ++t) s[t] = p[t] = Elem<S>::store(A(0));
}

struct Block {
  int64_t labels, docs, tokens, row_stride;
  const int64_t* lengths;
};

template <typename S, typename A = typename Elem<S>::Acc>
__attribute__((always_inline)) inline void stats_units(S* s, S* p, const Block& blk, bool keep, A* z, A* lse,
                                                       int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t l = u / blk.docs, d = u % blk.docs, len = blk.lengths[d];
    S* sr = s + l * blk.row_stride + d * blk.tokens;
    S* pr = p + l * blk.row_stride + d * blk.tokens;
    const A m = row_max(sr, len);
    A total, weighted;
    row_sums(sr, pr, len, m, total, weighted);
    const A zv = weighted / total, lv = m + log_(total);
    z[d * blk.labels + l] = zv;
    lse[d * blk.labels + l] = lv;
    if (keep) row_transform(sr, pr, len, blk.tokens, lv, A(1), zv);
  }
}

template <typename S, typename A = typename Elem<S>::Acc>
__attribute__((always_inline)) inline void grads_units(S* s, S* p, const Block& blk, const A* z, const A* lse,
                                                       const A* g, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t l = u / blk.docs, d = u % blk.docs, i = d * blk.labels + l;
    row_transform(s + l * blk.row_stride + d * blk.tokens, p + l * blk.row_stride + d * blk.tokens, blk.lengths[d],
                  blk.tokens, lse[i], g[i], z[i]);
  }
}

// The loops above, compiled once per storage type; the fp32 and bf16 ones with an AVX2 clone.
MARN_FAST_VECTOR_CLONES void stats_f32(float* s, float* p, const Block& blk, bool keep, float* z, float* lse,
                                       int64_t u0, int64_t u1) {
  stats_units(s, p, blk, keep, z, lse, u0, u1);
}
MARN_FAST_VECTOR_CLONES void stats_bf16(uint16_t* s, uint16_t* p, const Block& blk, bool keep, float* z, float* lse,
                                        int64_t u0, int64_t u1) {
  stats_units(s, p, blk, keep, z, lse, u0, u1);
}
void stats_f64(double* s, double* p, const Block& blk, bool keep, double* z, double* lse, int64_t u0, int64_t u1) {
  stats_units(s, p, blk, keep, z, lse, u0, u1);
}
MARN_FAST_VECTOR_CLONES void grads_f32(float* s, float* p, const Block& blk, const float* z, const float* lse,
                                       const float* g, int64_t u0, int64_t u1) {
  grads_units(s, p, blk, z, lse, g, u0, u1);
}
MARN_FAST_VECTOR_CLONES void grads_bf16(uint16_t* s, uint16_t* p, const Block& blk, const float* z,
                                        const float* lse, const float* g, int64_t u0, int64_t u1) {
  grads_units(s, p, blk, z, lse, g, u0, u1);
}
void grads_f64(double* s, double* p, const Block& blk, const double* z, const double* lse, const double* g,
               int64_t u0, int64_t u1) {
  grads_units(s, p, blk, z, lse, g, u0, u1);
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks s, p and lengths and returns the block's geometry (lengths must stay alive meanwhile).
Block check_block(const char* op, const at::Tensor& s, const at::Tensor& p, const at::Tensor& lengths) {
  TORCH_CHECK(s.dim() == 2, op, ": s must be [Lc, D·T], got ", s.dim(), " dimensions");
  TORCH_CHECK(p.sizes() == s.sizes() && p.strides() == s.strides() && p.scalar_type() == s.scalar_type(), op,
              ": p must have s's shape, strides and dtype, got ", p.sizes(), " ", p.scalar_type(), " and ", s.sizes(),
              " ", s.scalar_type());
  const auto t = s.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16, op,
              ": s and p must be float32, float64 or bfloat16, got ", t);
  TORCH_CHECK(s.stride(1) == 1 || s.size(1) <= 1, op, ": s and p must have contiguous rows, got strides ", s.strides());
  TORCH_CHECK(s.device().is_cpu() && p.device().is_cpu() && lengths.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong && lengths.is_contiguous() &&
                  lengths.size(0) >= 1 && s.size(1) % lengths.size(0) == 0,
              op, ": lengths must be a contiguous [D] int64 with D dividing s.size(1)=", s.size(1), ", got ",
              lengths.sizes(), " ", lengths.scalar_type());
  Block blk{s.size(0), lengths.size(0), s.size(1) / lengths.size(0), s.size(0) > 1 ? s.stride(0) : s.size(1),
            lengths.const_data_ptr<int64_t>()};
  for (int64_t d = 0; d < blk.docs; ++d) {
    TORCH_CHECK(blk.lengths[d] >= 1 && blk.lengths[d] <= blk.tokens, op, ": lengths must lie in [1, T=", blk.tokens,
                "], got ", blk.lengths[d], " for document ", d);
  }
  return blk;
}

void check_stat(const char* op, const char* name, const at::Tensor& x, const Block& blk, at::ScalarType acc) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == blk.docs && x.size(1) == blk.labels && x.is_contiguous() &&
                  x.scalar_type() == acc && x.device().is_cpu(),
              op, ": ", name, " must be a contiguous CPU [D=", blk.docs, ", Lc=", blk.labels, "] ", acc, ", got ",
              x.sizes(), " ", x.scalar_type());
}

// Units of ≥ ~16k elements per task (rows are short next to the thread start-up cost).
int64_t grain(const Block& blk) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, blk.tokens)); }

std::tuple<at::Tensor, at::Tensor> block_stats_cpu(at::Tensor s, at::Tensor p, const at::Tensor& lengths, bool keep) {
  const char* op = "label_attention_block_stats";
  const Block blk = check_block(op, s, p, lengths);
  const auto acc = accumulation_type(s.scalar_type());
  at::Tensor z = at::empty({blk.docs, blk.labels}, s.options().dtype(acc));
  at::Tensor lse = at::empty_like(z);
  const int64_t units = blk.labels * blk.docs;
  at::parallel_for(0, units, grain(blk), [&](int64_t u0, int64_t u1) {
    switch (s.scalar_type()) {
      case at::kFloat:
        stats_f32(s.mutable_data_ptr<float>(), p.mutable_data_ptr<float>(), blk, keep, z.mutable_data_ptr<float>(),
                  lse.mutable_data_ptr<float>(), u0, u1);
        break;
      case at::kDouble:
        stats_f64(s.mutable_data_ptr<double>(), p.mutable_data_ptr<double>(), blk, keep,
                  z.mutable_data_ptr<double>(), lse.mutable_data_ptr<double>(), u0, u1);
        break;
      default:
        stats_bf16(reinterpret_cast<uint16_t*>(s.mutable_data_ptr<at::BFloat16>()),
                   reinterpret_cast<uint16_t*>(p.mutable_data_ptr<at::BFloat16>()), blk, keep,
                   z.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), u0, u1);
    }
  });
  return {z, lse};
}

void block_grads_cpu(at::Tensor s, at::Tensor p, const at::Tensor& lengths, const at::Tensor& z, const at::Tensor& lse,
                     const at::Tensor& grad_z) {
  const char* op = "label_attention_block_grads";
  const Block blk = check_block(op, s, p, lengths);
  const auto acc = accumulation_type(s.scalar_type());
  check_stat(op, "z", z, blk, acc);
  check_stat(op, "lse", lse, blk, acc);
  check_stat(op, "grad_z", grad_z, blk, acc);
  const int64_t units = blk.labels * blk.docs;
  at::parallel_for(0, units, grain(blk), [&](int64_t u0, int64_t u1) {
    switch (s.scalar_type()) {
      case at::kFloat:
        grads_f32(s.mutable_data_ptr<float>(), p.mutable_data_ptr<float>(), blk, z.const_data_ptr<float>(),
                  lse.const_data_ptr<float>(), grad_z.const_data_ptr<float>(), u0, u1);
        break;
      case at::kDouble:
        grads_f64(s.mutable_data_ptr<double>(), p.mutable_data_ptr<double>(), blk, z.const_data_ptr<double>(),
                  lse.const_data_ptr<double>(), grad_z.const_data_ptr<double>(), u0, u1);
        break;
      default:
        grads_bf16(reinterpret_cast<uint16_t*>(s.mutable_data_ptr<at::BFloat16>()),
                   reinterpret_cast<uint16_t*>(p.mutable_data_ptr<at::BFloat16>()), blk, z.const_data_ptr<float>(),
                   lse.const_data_ptr<float>(), grad_z.const_data_ptr<float>(), u0, u1);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CPU, m) {
  m.impl("label_attention_block_stats", &block_stats_cpu);
  m.impl("label_attention_block_grads", &block_grads_cpu);
}

}  // namespace marn_fast
