// The products of the fused step (fused_step.cpp): weights packed in column blocks, rows taken in tiles that
// read each block once for all their rows, and the split of (tiles x blocks) between the threads.
#pragma once

#include <ATen/Parallel.h>

#include "fast_math.h"

#include <cstdint>
#include <utility>
#include <vector>

namespace charlm_fused {

using charlm_math::madd;

#ifdef __AVX512F__
constexpr int64_t BLOCK = 128;  // outputs of one block: 8 zmm registers of sums for one row
#else
constexpr int64_t BLOCK = 64;  // 8 ymm (AVX2) or 16 xmm registers
#endif
constexpr int64_t MAX_TILE = 6;  // rows of a tile (6, 4, 2 or 1)
// A tile's sums kept in registers at once: 6 or 4 rows of BLOCK / 4 columns (12 or 8 vector registers, of 16
// on AVX2, of 32 with AVX-512), 2 rows of BLOCK / 2, one row of BLOCK: 8 registers.
constexpr int64_t tile_columns(int rows) { return rows >= 4 ? BLOCK / 4 : BLOCK / rows; }


// The operands of one product: out[row][r] = init[row][r] + sum_j x[row][j] W[r, j] + sum_j h[row][j] U[r, j]
// for r < m, over one block of the packed W (and U); a missing init is zero, a missing matrix adds nothing.
struct Operands {
  const float* w = nullptr;  // packed (blocks, k, BLOCK)
  int64_t k = 0;
  const float* u = nullptr;
  int64_t k2 = 0;
  int64_t m = 0;
};

// One block of a product for a tile of RT rows: the tile's sums of BLOCK / RT columns at a time stay in
// registers while the block's weights stream past once for all the rows.
template <int RT>
void product_tile(int64_t b, const Operands& op, const float* const* init, const float* const* x,
                  const float* const* h, float* const* out) {
  constexpr int64_t CB = tile_columns(RT);
  const int64_t base = b * BLOCK, width = std::min<int64_t>(BLOCK, op.m - base);
  for (int64_t c0 = 0; c0 < width; c0 += CB) {
    float acc[RT][CB];
    for (int r = 0; r < RT; ++r)
      for (int64_t c = 0; c < CB; ++c) acc[r][c] = init[r] != nullptr && c0 + c < width ? init[r][base + c0 + c] : 0.0f;
    // (the loops fully unrolled, so that the sums stay in registers: GCC keeps a 2-D array in memory else)
    for (int part = 0; part < 2; ++part) {
      const float* p = part == 0 ? op.w : op.u;
      if (p == nullptr) continue;
      const int64_t k = part == 0 ? op.k : op.k2;
      const float* const* v = part == 0 ? x : h;
      p += b * k * BLOCK + c0;
      for (int64_t j = 0; j < k; ++j, p += BLOCK) {
        float w[CB];
#pragma GCC unroll 128
        for (int64_t c = 0; c < CB; ++c) w[c] = p[c];
#pragma GCC unroll 6
        for (int r = 0; r < RT; ++r) {
          const float vj = v[r][j];
#pragma GCC unroll 128
          for (int64_t c = 0; c < CB; ++c) acc[r][c] = madd(w[c], vj, acc[r][c]);
        }
      }
    }
    const int64_t n = std::min<int64_t>(CB, width - c0);
    for (int r = 0; r < RT; ++r)
      for (int64_t c = 0; c < n; ++c) out[r][base + c0 + c] = acc[r][c];
  }
}

// The rows cut into tiles of 6, 4, 2 and 1 rows: (first row, rows).
inline std::vector<std::pair<int64_t, int>> row_tiles(int64_t n) {
  std::vector<std::pair<int64_t, int>> tiles;
  int64_t row = 0;
  for (int size : {6, 4, 2, 1})
    for (; n - row >= size; row += size) tiles.emplace_back(row, size);
  return tiles;
}

// One block of a product for the tile at ``first`` (``rows`` rows); each row's operands from the callables.
template <typename Init, typename X, typename H, typename Out>
void product_block(int64_t b, const Operands& op, int64_t first, int rows, const Init& init, const X& x,
                   const H& h, const Out& out) {
  const float* init_p[MAX_TILE];
  const float* x_p[MAX_TILE];
  const float* h_p[MAX_TILE];
  float* out_p[MAX_TILE];
  for (int r = 0; r < rows; ++r) {
    init_p[r] = init(first + r);
    x_p[r] = x(first + r);
    h_p[r] = h(first + r);
    out_p[r] = out(first + r);
  }
  switch (rows) {
    case 6: product_tile<6>(b, op, init_p, x_p, h_p, out_p); break;
    case 4: product_tile<4>(b, op, init_p, x_p, h_p, out_p); break;
    case 2: product_tile<2>(b, op, init_p, x_p, h_p, out_p); break;
    default: product_tile<1>(b, op, init_p, x_p, h_p, out_p); break;
  }
}

// (tiles x blocks) work items split between the threads of the enclosing parallel region (a barrier after);
// run by a lone thread outside one.
template <typename Fn> inline void each_item(int64_t items, const Fn& fn) {
#pragma omp for schedule(static)
  for (int64_t t = 0; t < items; ++t) fn(t);
}

}  // namespace charlm_fused
