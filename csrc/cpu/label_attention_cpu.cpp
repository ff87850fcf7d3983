// CPU forward of the fused label-wise attention (fp32, fp64, bf16): see
// marn_fast/ops/label_attention_chunked.py.
//
// features O [B, n, C], queries Q [L, d_k], weights W [L, C], lengths [B], keys K [B, n, d_k] or none
// (K = O, d_k = C) → z [B, L], lse [B, L]:
//   s_lt = q_l·k_t,  p_lt = w_l·o_t,  z_l = Σ_t softmax_t(s_l)_t · p_lt,  lse_l = log Σ_t exp(s_lt)
// over t < lengths[b]. One unit of parallel work is (chunk of kLabels labels, document); it walks the
// document's valid tokens in tiles of kTokens. Per tile two GEMMs K_tile·Q_cᵀ and O_tile·W_cᵀ give
// the [tokens, labels] tiles of S and P (they stay in L2), and one pass over them updates the
// online softmax of each label: column max, rescale of the running sums, then Σ e and Σ e·p with
// e = exp(s − m), vectorised across labels (rows of the tile are contiguous in the label index).
// Nothing of size n·L exists; the extra memory is one tile per thread. bf16 features: bf16 GEMMs
// write bf16 tiles (as the eager reference's bf16 scores), read widened to fp32, whose running
// statistics and outputs are fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// The tile loops below use selects, not branches, so that they vectorise (see fast_math.h).
#pragma GCC optimize("no-trapping-math")

#include "fast_math.h"

namespace marn_fast {
namespace {

constexpr int64_t kLabels = 256;  // labels per work unit
constexpr int64_t kTokens = 256;  // tokens per GEMM tile (fp32 S and P tiles: 512 KiB, within L2)

__attribute__((always_inline)) inline float widen(float v) { return v; }
__attribute__((always_inline)) inline double widen(double v) { return v; }
__attribute__((always_inline)) inline float widen(uint16_t v) { return bf16_to_float(v); }

// Online-softmax update of `lc` labels' running max m, Σe and Σe·p from the [rows, lc] tiles s and
// p (row t: the labels' scores and values at token t), stored as S (bf16 as uint16_t), computed in A;
// mt is scratch of lc.
template <typename S, typename A>
__attribute__((always_inline)) inline void update_tile(const S* __restrict__ s, const S* __restrict__ p, int64_t rows,
                                                       int64_t lc, A* __restrict__ m, A* __restrict__ sum,
                                                       A* __restrict__ acc, A* __restrict__ mt) {
  for (int64_t l = 0; l < lc; ++l) mt[l] = m[l];
  for (int64_t t = 0; t < rows; ++t) {
    const S* st = s + t * lc;
    for (int64_t l = 0; l < lc; ++l) {
      const A v = widen(st[l]);
      mt[l] = v > mt[l] ? v : mt[l];
    }
  }
  for (int64_t l = 0; l < lc; ++l) {
    const A scale = exp_(m[l] - mt[l]);  // 0 on the first tile (m = −∞)
    sum[l] *= scale;
    acc[l] *= scale;
    m[l] = mt[l];
  }
  for (int64_t t = 0; t < rows; ++t) {
    const S *st = s + t * lc, *pt = p + t * lc;
    for (int64_t l = 0; l < lc; ++l) {
      const A e = exp_(widen(st[l]) - m[l]);
      sum[l] += e;
      acc[l] += e * widen(pt[l]);
    }
  }
}

MARN_FAST_VECTOR_CLONES void update_tile_f32(const float* s, const float* p, int64_t rows, int64_t lc, float* m,
                                             float* sum, float* acc, float* mt) {
  update_tile(s, p, rows, lc, m, sum, acc, mt);
}
MARN_FAST_VECTOR_CLONES void update_tile_bf16(const uint16_t* s, const uint16_t* p, int64_t rows, int64_t lc,
                                              float* m, float* sum, float* acc, float* mt) {
  update_tile(s, p, rows, lc, m, sum, acc, mt);
}
void update_tile_f64(const double* s, const double* p, int64_t rows, int64_t lc, double* m, double* sum,
                     double* acc, double* mt) {
  update_tile(s, p, rows, lc, m, sum, acc, mt);
}
inline void update(const float* s, const float* p, int64_t rows, int64_t lc, float* m, float* sum, float* acc,
                   float* mt) {
  update_tile_f32(s, p, rows, lc, m, sum, acc, mt);
}
inline void update(const at::BFloat16* s, const at::BFloat16* p, int64_t rows, int64_t lc, float* m, float* sum,
                   float* acc, float* mt) {
  update_tile_bf16(reinterpret_cast<const uint16_t*>(s), reinterpret_cast<const uint16_t*>(p), rows, lc, m, sum, acc,
                   mt);
}
inline void update(const double* s, const double* p, int64_t rows, int64_t lc, double* m, double* sum,
                   double* acc, double* mt) {
  update_tile_f64(s, p, rows, lc, m, sum, acc, mt);
}

// Work units [u0, u1): unit u is the labels of chunk u / B for document u % B. Label-chunk-major, so
// that a thread's contiguous range of units covers every document (the threads' shares stay equal
// whatever the documents' lengths) and consecutive units reuse the chunk's Q and W rows from cache.
// k is o when the call has no keys.
template <typename S, typename T>
void forward_units(const at::Tensor& o, const at::Tensor& k, const at::Tensor& q, const at::Tensor& w,
                   const int64_t* lengths, T* z, T* lse, int64_t u0, int64_t u1) {
  const int64_t num_labels = q.size(0), batch = o.size(0);
  const int64_t max_rows = std::min(kTokens, o.size(1)), max_lc = std::min(kLabels, num_labels);
  const bool keyed = !k.is_same(o);
  at::Tensor buf = at::empty({2 * max_rows * max_lc}, o.options());  // the S tile, then the P tile
  std::vector<T> state(4 * kLabels);  // fp32 (fp64 for fp64) whatever the tiles' dtype
  T *m = state.data(), *sum = m + kLabels, *acc = sum + kLabels, *mt = acc + kLabels;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u % batch, l0 = (u / batch) * kLabels, lc = std::min(kLabels, num_labels - l0);
    const at::Tensor q_t = q.narrow(0, l0, lc).t(), w_t = w.narrow(0, l0, lc).t();  // [d_k, lc], [C, lc]
    const at::Tensor ob = o[b], kb = keyed ? k[b] : ob;
    std::fill(m, m + lc, -std::numeric_limits<T>::infinity());
    std::fill(sum, sum + lc, T(0));
    std::fill(acc, acc + lc, T(0));
    for (int64_t t0 = 0; t0 < lengths[b]; t0 += kTokens) {
      const int64_t rows = std::min(max_rows, lengths[b] - t0);
      at::Tensor s = buf.narrow(0, 0, rows * lc).view({rows, lc}), p = buf.narrow(0, rows * lc, rows * lc).view({rows, lc});
      const at::Tensor o_tile = ob.narrow(0, t0, rows);
      at::mm_out(s, keyed ? kb.narrow(0, t0, rows) : o_tile, q_t);
      at::mm_out(p, o_tile, w_t);
      update(s.const_data_ptr<S>(), p.const_data_ptr<S>(), rows, lc, m, sum, acc, mt);
    }
    for (int64_t l = 0; l < lc; ++l) {
      z[b * num_labels + l0 + l] = acc[l] / sum[l];
      lse[b * num_labels + l0 + l] = m[l] + std::log(sum[l]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> label_attention_forward_cpu(const at::Tensor& features, const at::Tensor& queries,
                                                               const at::Tensor& weights, const at::Tensor& lengths,
                                                               const std::optional<at::Tensor>& keys) {
  const char* op = "label_attention_forward";
  TORCH_CHECK(features.dim() == 3, op, ": features must be [B, n, C], got ", features.dim(), " dimensions");
  const int64_t batch = features.size(0), n = features.size(1), c = features.size(2);
  const auto dtype = features.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op,
              ": features must be float32, float64 or bfloat16, got ", dtype);
  int64_t d_k = c;
  if (keys) {
    TORCH_CHECK(keys->dim() == 3 && keys->size(0) == batch && keys->size(1) == n && keys->size(2) >= 1, op,
                ": keys must be [B=", batch, ", n=", n, ", d_k], got ", keys->sizes());
    TORCH_CHECK(keys->scalar_type() == dtype, op, ": keys must have the features' dtype ", dtype, ", got ",
                keys->scalar_type());
    TORCH_CHECK(keys->device().is_cpu(), op, ": keys must be a CPU tensor, got ", keys->device());
    d_k = keys->size(2);
  }
  TORCH_CHECK(queries.dim() == 2 && queries.size(1) == d_k, op, ": queries must be [L, ", keys ? "d_k=" : "C=", d_k,
              "], got ", queries.sizes());
  const int64_t num_labels = queries.size(0);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == num_labels && weights.size(1) == c, op,
              ": weights must be [L=", num_labels, ", C=", c, "], got ", weights.sizes());
  TORCH_CHECK(queries.scalar_type() == features.scalar_type() && weights.scalar_type() == features.scalar_type(),
              op, ": queries and weights must have the features' dtype ", features.scalar_type(), ", got ",
              queries.scalar_type(), " and ", weights.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch && lengths.scalar_type() == at::kLong, op,
              ": lengths must be [B=", batch, "] int64, got ", lengths.sizes(), " ", lengths.scalar_type());
  for (const auto& [t, name] : {std::pair{&features, "features"}, {&queries, "queries"}, {&weights, "weights"},
                                {&lengths, "lengths"}}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  }
  const at::Tensor len = lengths.contiguous();
  const int64_t* len_ptr = len.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len_ptr[b] >= 1 && len_ptr[b] <= n, op, ": lengths must lie in [1, n=", n, "], got ", len_ptr[b],
                " for document ", b);
  }
  // Detached: the tile GEMMs write into buffers (out= products refuse inputs that require grad).
  const at::Tensor o = features.detach().contiguous(), q = queries.detach().contiguous(),
                   w = weights.detach().contiguous(), k = keys ? keys->detach().contiguous() : o;
  const int64_t units = batch * ((num_labels + kLabels - 1) / kLabels);
  at::Tensor z = at::empty({batch, num_labels}, o.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  at::Tensor lse = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "label_attention_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    acc_t* z_ptr = z.mutable_data_ptr<acc_t>();
    acc_t* lse_ptr = lse.mutable_data_ptr<acc_t>();
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      forward_units<scalar_t, acc_t>(o, k, q, w, len_ptr, z_ptr, lse_ptr, u0, u1);
    });
  });
  return {z, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CPU, m) { m.impl("label_attention_forward", &label_attention_forward_cpu); }

}  // namespace marn_fast
