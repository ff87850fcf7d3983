// The RAM's k=3, pad-1 conv on the CPU as a 1-D Winograd F(4, 3) (Lavin & Gray 2016): half the
// multiply-adds of the direct conv (6 products per 4 outputs instead of 12), so it beats oneDNN's
// direct convolution where the GEMMs dominate (wide channels; benchmarks/bench_ram.py).
//
// Channels-last x [B, n, C_in], w [C_out, C_in, 3] → z [B·n, C_out], z[t] = Σ_k W_k·x[t+k−1]
// (zero outside [0, n)). Per sequence the outputs are cut into tiles of 4; tile τ reads the six
// inputs d_j = x[4τ−1+j] (j = 0..5) and
//   U_i = Σ_j Bᵀ[i][j]·d_j (input transform),   V_i = Σ_k G[i][k]·W_k (filter transform),
//   M_i = U_i·V_i (six GEMMs [tiles, C_in] × [C_in, C_out]),   z[4τ+r] = Σ_i Aᵀ[r][i]·M_i.
// The transforms are exact in fp64 and round like a few extra additions in fp32 (the F(4, 3)
// points 0, ±1, ±2 keep the constants small); tests hold it to the fp32 tolerance of the direct conv.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace marn_fast {
namespace ram {

constexpr int64_t kWinogradTile = 4;    // outputs per tile; inputs per tile: 6
constexpr int64_t kWinogradChunk = 128;  // tiles per unit of parallel work, with its own U and M buffers
// Winograd pays off once the GEMMs outweigh the transforms: C_in·C_out at least this (measured per
// RAM block on 2 cores: 1.0–1.07× oneDNN at 64 × 64 channels, 1.1–1.36× from 128 × 128 to 600 × 600).
constexpr int64_t kWinogradMinChannelProduct = 64 * 64;

inline bool use_winograd(const at::Tensor& w) { return w.size(0) * w.size(1) >= kWinogradMinChannelProduct; }

// V [6, C_in, C_out] = G·W with W_k = w[:, :, k]ᵀ.
inline at::Tensor winograd_filter(const at::Tensor& w) {
  static const double g[6][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                 {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};
  const at::Tensor G = at::from_blob(const_cast<double*>(&g[0][0]), {6, 3}, at::kDouble).to(w.options());
  const int64_t c_out = w.size(0), c_in = w.size(1);
  return at::mm(G, w.permute({2, 1, 0}).reshape({3, c_in * c_out})).view({6, c_in, c_out});
}

// Tiles [r0, r1) of x → u [6, r1 − r0, C_in] (plane stride (r1 − r0)·C_in).
template <typename T>
void winograd_input(const T* __restrict__ x, T* __restrict__ u, const T* __restrict__ zeros, int64_t n, int64_t c,
                    int64_t tiles_per_seq, int64_t r0, int64_t r1) {
  const int64_t plane = (r1 - r0) * c;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / tiles_per_seq, t0 = (r % tiles_per_seq) * kWinogradTile - 1;
    const T* d[6];
    for (int j = 0; j < 6; ++j) {
      const int64_t t = t0 + j;
      d[j] = (t >= 0 && t < n) ? x + (b * n + t) * c : zeros;
    }
    const T *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3], *d4 = d[4], *d5 = d[5];
    T* out = u + (r - r0) * c;
    for (int64_t i = 0; i < c; ++i) {
      out[i] = T(4) * d0[i] - T(5) * d2[i] + d4[i];
      out[plane + i] = -T(4) * (d1[i] + d2[i]) + d3[i] + d4[i];
      out[2 * plane + i] = T(4) * (d1[i] - d2[i]) - d3[i] + d4[i];
      out[3 * plane + i] = T(2) * (d3[i] - d1[i]) - d2[i] + d4[i];
      out[4 * plane + i] = T(2) * (d1[i] - d3[i]) - d2[i] + d4[i];
      out[5 * plane + i] = T(4) * d1[i] - T(5) * d3[i] + d5[i];
    }
  }
}

// m [6, r1 − r0, C_out] of tiles [r0, r1) → their rows of z (a last, partial tile writes only
// the rows inside its sequence; spill takes the rest).
template <typename T>
void winograd_output(const T* __restrict__ m, T* __restrict__ z, T* __restrict__ spill, int64_t n, int64_t c,
                     int64_t tiles_per_seq, int64_t r0, int64_t r1) {
  const int64_t plane = (r1 - r0) * c;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / tiles_per_seq, t0 = (r % tiles_per_seq) * kWinogradTile;
    const int64_t rows = std::min(kWinogradTile, n - t0);
    const T* mr = m + (r - r0) * c;
    T* y0 = z + (b * n + t0) * c;
    T* y1 = rows > 1 ? y0 + c : spill;
    T* y2 = rows > 2 ? y0 + 2 * c : spill + c;
    T* y3 = rows > 3 ? y0 + 3 * c : spill + 2 * c;
    for (int64_t o = 0; o < c; ++o) {
      const T s12 = mr[plane + o] + mr[2 * plane + o], d12 = mr[plane + o] - mr[2 * plane + o];
      const T s34 = mr[3 * plane + o] + mr[4 * plane + o], d34 = mr[3 * plane + o] - mr[4 * plane + o];
      y0[o] = mr[o] + s12 + s34;
      y1[o] = d12 + T(2) * d34;
      y2[o] = s12 + T(4) * s34;
      y3[o] = d12 + T(8) * d34 + mr[5 * plane + o];
    }
  }
}

// z [B·n, C_out] (fp32/fp64 CPU tensors). Chunks of kWinogradChunk tiles run in parallel, each
// transform → six GEMMs → inverse transform on buffers of its own, so U and M stay in cache.
inline at::Tensor conv3_winograd(const at::Tensor& x, const at::Tensor& w) {
  const int64_t B = x.size(0), n = x.size(1), c_in = w.size(1), c_out = w.size(0);
  const int64_t tiles_per_seq = (n + kWinogradTile - 1) / kWinogradTile, tiles = B * tiles_per_seq;
  const at::Tensor xc = x.contiguous(), v = winograd_filter(w);
  at::Tensor z = at::empty({B * n, c_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3_winograd", [&] {
    const std::vector<scalar_t> zeros(c_in, scalar_t(0));
    const scalar_t* px = xc.const_data_ptr<scalar_t>();
    scalar_t* pz = z.mutable_data_ptr<scalar_t>();
    const int64_t chunks = (tiles + kWinogradChunk - 1) / kWinogradChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      at::Tensor u = at::empty({6, kWinogradChunk, c_in}, x.options());
      at::Tensor m = at::empty({6, kWinogradChunk, c_out}, x.options());
      std::vector<scalar_t> spill(3 * c_out);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * kWinogradChunk, r1 = std::min(tiles, r0 + kWinogradChunk), rows = r1 - r0;
        at::Tensor uk = u.view({-1}).narrow(0, 0, 6 * rows * c_in).view({6, rows, c_in});
        at::Tensor mk = m.view({-1}).narrow(0, 0, 6 * rows * c_out).view({6, rows, c_out});
        winograd_input(px, uk.mutable_data_ptr<scalar_t>(), zeros.data(), n, c_in, tiles_per_seq, r0, r1);
        at::bmm_out(mk, uk, v);
        winograd_output(mk.const_data_ptr<scalar_t>(), pz, spill.data(), n, c_out, tiles_per_seq, r0, r1);
      }
    });
  });
  return z;
}

}  // namespace ram
}  // namespace marn_fast
