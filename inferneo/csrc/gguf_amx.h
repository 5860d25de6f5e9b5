// AMX-BF16 tile products for the bfloat16 pair panels of gguf_wide_panels.h: activation rows, sixteen at a time,
// times a panel of 48 weight columns ([K/2][48] pairs of bfloat16, lane c of line p: w[2p][c] low, w[2p + 1][c] high).
//
// That panel line is exactly the row of an AMX "B" tile: tdpbf16ps multiplies a 16 x 32 bfloat16 tile of activation
// rows (A, read straight from x with its row stride) by a 16 x 16-pair tile of weights (B: 16 panel lines, 64 bytes
// of one 16-column group, read with the panel's 192-byte line stride) into 16 x 16 float32 sums (C). One 32-weight
// block of K is one tile product, so a GGUF block is one step of the loop; a 48-column panel is three C tiles.
// On a Sapphire Rapids core a tile product is 16 x 16 x 32 multiply-adds in about 16 cycles, 16 times what
// AVX512_BF16's vdpbf16ps does in the same time there: with the panels built as before (the weights de-quantized
// once per call), the products stop being the ceiling of a bfloat16 step.
//
// Linux hands a process the tile registers only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); the CPU
// check below makes that request once and reports AMX absent when it is refused. Each thread loads its tile
// configuration before its products and releases the tiles after them.
#pragma once

#include "gguf_wide_panels.h"

#ifdef GGUF_X86
#include <sys/syscall.h>
#include <unistd.h>

namespace gguf_wide {

#define GGUF_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

#define GGUF_AMX_INT8 \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

// ldtilecfg on a 64-byte configuration. GCC's _tile_loadconfig names only a pointer's worth of its operand as read, so
// the compiler may drop the rest of a configuration's stores as dead (it did for a constructor it could see through:
// ldtilecfg then faulted on the stack's leftovers); the empty asm names all 64 bytes.
template <typename Config>
__attribute__((target("amx-tile"))) inline void load_tile_config(const Config& config) {
  static_assert(sizeof(Config) == 64, "a palette-1 tile configuration is 64 bytes");
  asm volatile("" : : "m"(config));
  _tile_loadconfig(&config);
}

// The CPU has the tile registers and this process may use them (asked once).
inline bool amx_tiles_permitted() {
  static const bool permitted = [] {
    if (!__builtin_cpu_supports("amx-tile")) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

// The CPU multiplies bfloat16 tiles and this process may use them.
inline bool cpu_has_amx_bf16() {
  static const bool has = cpu_has_avx512_bf16() && __builtin_cpu_supports("amx-bf16") && amx_tiles_permitted();
  return has;
}

// The CPU multiplies int8 tiles (and has the AVX-512 VNNI code around them) and this process may use them.
inline bool cpu_has_amx_int8() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("amx-int8") && amx_tiles_permitted();
  return has;
}

// The 64-byte operand of ldtilecfg (palette 1), every tile unused until a configuration gives it rows and bytes.
struct alignas(64) PaletteOneConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes a row, per tile
  uint8_t rows[16] = {};    // rows, per tile
};

// The bfloat16 products' configuration: eight tiles of 64-byte rows, tiles 0-3 of `rows` rows and 4-7 of 16.
// A block of 16 rows uses tiles 0-2 for the sums C, 3 for the activations A and 4-6 for the weights B (any row
// count); a pair of blocks (32 rows, all tiles of 16 rows) tiles 0-3 for C, 4-5 for A and 6-7 for B.
struct TileConfig : PaletteOneConfig {
  explicit TileConfig(int activation_rows) {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = static_cast<uint8_t>(t < 4 ? activation_rows : 16);
    }
  }
};

// Sums of `rows` rows and `cols` columns (three 16 x 16 tiles' worth, row r of tile j at sums[j][r]) into y.
template <typename OutT>
GGUF_AMX inline void store_tile_sums(const float (*sums)[16][16], int64_t rows, OutT* y, int64_t ldy, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int j = 0; j < 3 && cols - 16 * j > 0; ++j) {
      store16(y + r * ldy + 16 * j, lanes_mask(cols - 16 * j), _mm512_loadu_ps(sums[j][r]));
    }
  }
}

// ---- the tile products: row blocks times a chunk of a panel's blocks of K, the sums kept between chunks -----------
//
// A chunk is `kb` blocks of K of one 48-column panel (3 KB a block). The whole-K form below is one chunk holding all
// of K. At a decode step's row counts that whole-K panel costs a round trip through L2 (built, then read back once
// per row block), so the chunked form (gguf_packed.cpp) builds a few blocks of K at a time into an L1 buffer,
// multiplies every row block by them, and keeps each row block's 16 x 48 sums in a small float32 buffer between the
// chunks (loaded into the C tiles before a chunk, stored after it); its activation rows are read from a copy padded
// to whole blocks of 16, so one tile configuration (tiles of 16 rows) serves every call.

// Sums of a 16-row block, per 16-column group.
using BlockSums = float[3][16][16];

// One block of rows (16, or the configured rows; at x, row stride K, from the chunk's first block) times `kb` blocks
// of a chunk's panel (lines: 16 kb lines of 48 pairs); the sums start at zero (`first`) or from `sums`, and end in
// `sums`.
GGUF_AMX inline void amx_block_chunk(const uint16_t* x, int64_t K, int64_t kb, const uint32_t* lines, BlockSums& sums,
                                     bool first) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
  } else {
    _tile_loadd(0, sums[0], 64);
    _tile_loadd(1, sums[1], 64);
    _tile_loadd(2, sums[2], 64);
  }
  const int64_t x_stride = 2 * K, panel_stride = 4 * kWideCols;
  for (int64_t b = 0; b < kb; ++b) {
    const uint32_t* l = lines + 16 * b * kWideCols;
    _tile_loadd(3, x + 32 * b, x_stride);
    _tile_loadd(4, l, panel_stride);
    _tile_loadd(5, l + 16, panel_stride);
    _tile_loadd(6, l + 32, panel_stride);
    _tile_dpbf16ps(0, 3, 4);
    _tile_dpbf16ps(1, 3, 5);
    _tile_dpbf16ps(2, 3, 6);
  }
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  _tile_stored(2, sums[2], 64);
}

// Two 16-row blocks (rows at x and x + 16 K): columns 0-31 as 2 x 2 tiles, then (with `third`) 32-47 as 2 x 1.
GGUF_AMX inline void amx_pair_chunk(const uint16_t* x, int64_t K, int64_t kb, const uint32_t* lines, BlockSums& upper,
                                    BlockSums& lower, bool first, bool third) {
  const int64_t x_stride = 2 * K, panel_stride = 4 * kWideCols;
  const uint16_t* x_low = x + 16 * K;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, upper[0], 64);
    _tile_loadd(1, upper[1], 64);
    _tile_loadd(2, lower[0], 64);
    _tile_loadd(3, lower[1], 64);
  }
  for (int64_t b = 0; b < kb; ++b) {
    const uint32_t* l = lines + 16 * b * kWideCols;
    _tile_loadd(4, x + 32 * b, x_stride);
    _tile_loadd(5, x_low + 32 * b, x_stride);
    _tile_loadd(6, l, panel_stride);
    _tile_loadd(7, l + 16, panel_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, upper[0], 64);
  _tile_stored(1, upper[1], 64);
  _tile_stored(2, lower[0], 64);
  _tile_stored(3, lower[1], 64);
  if (!third) return;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
  } else {
    _tile_loadd(0, upper[2], 64);
    _tile_loadd(1, lower[2], 64);
  }
  for (int64_t b = 0; b < kb; ++b) {
    _tile_loadd(4, x + 32 * b, x_stride);
    _tile_loadd(5, x_low + 32 * b, x_stride);
    _tile_loadd(6, lines + 16 * b * kWideCols + 32, panel_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
  }
  _tile_stored(0, upper[2], 64);
  _tile_stored(1, lower[2], 64);
}

// Every padded row block (`blocks` of 16 rows at x, row stride K, from the chunk's first block of K) times one
// chunk of `kb` blocks of a 48-column panel whose last `cols` columns beyond 32 exist (cols > 32: the third group).
GGUF_AMX inline void amx_row_blocks_chunk(const uint16_t* x, int64_t K, int64_t blocks, int64_t kb,
                                          const uint32_t* lines, BlockSums* sums, bool first, int64_t cols) {
  int64_t i = 0;
  for (; i + 2 <= blocks; i += 2) {
    amx_pair_chunk(x + 16 * i * K, K, kb, lines, sums[i], sums[i + 1], first, cols > 32);
  }
  if (i < blocks) amx_block_chunk(x + 16 * i * K, K, kb, lines, sums[i], first);
}

// ---- whole-K panels: one chunk holding all of K ---------------------------------------------------------------

// Rows [m, m + rows) of bfloat16 x (raw bits, row stride K) times one [K/2][48] panel, with the tile configuration
// for `rows` loaded: y[r][0 .. cols) (float32, or bfloat16 words).
template <typename OutT>
GGUF_AMX inline void amx_rows_times_panel(const uint16_t* x, int64_t K, int64_t rows, const uint32_t* panel, OutT* y,
                                          int64_t ldy, int64_t cols) {
  alignas(64) BlockSums sums;
  amx_block_chunk(x, K, K / 32, panel, sums, true);
  store_tile_sums(sums, rows, y, ldy, cols);
}

// Rows [m, m + 32) of x times one [K/2][48] panel, with the 16-row configuration loaded: columns 0-31 as 2 x 2
// tiles, then columns 32-47 as 2 x 1, so that each weight tile read from the panel (in L2) serves two row blocks
// (the 16-row form reads every weight tile once a row block: at 64 rows its loads, not its products, set the pace).
template <typename OutT>
GGUF_AMX inline void amx_row_pair_times_panel(const uint16_t* x, int64_t K, const uint32_t* panel, OutT* y,
                                              int64_t ldy, int64_t cols) {
  alignas(64) BlockSums upper, lower;
  amx_pair_chunk(x, K, K / 32, panel, upper, lower, true, cols > 32);
  store_tile_sums(upper, 16, y, ldy, cols);
  store_tile_sums(lower, 16, y + 16 * ldy, ldy, cols);
}

// Rows [m_begin, m_end) of x, `rows` at a time (m_end - m_begin a multiple of it), times `count` panels; blocks of
// 16 rows go in pairs where two are left.
template <typename OutT>
GGUF_AMX void amx_row_blocks(const uint32_t* panels, int64_t count, int64_t panel_words, int64_t col0,
                             const uint16_t* x, int64_t m_begin, int64_t m_end, int64_t rows, int64_t K, int64_t N,
                             OutT* out) {
  load_tile_config(TileConfig(static_cast<int>(rows)));
  for (int64_t m = m_begin; m < m_end;) {
    const bool pair = rows == 16 && m + 32 <= m_end;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r0 = col0 + i * kWideCols, cols = std::min(kWideCols, N - r0);
      if (pair) {
        amx_row_pair_times_panel(x + m * K, K, panels + i * panel_words, out + m * N + r0, N, cols);
      } else {
        amx_rows_times_panel(x + m * K, K, rows, panels + i * panel_words, out + m * N + r0, N, cols);
      }
    }
    m += pair ? 32 : rows;
  }
}

// `count` consecutive panels (`panel_words` 32-bit words apart; the first holds output columns from `col0`) times all
// M rows of bfloat16 x, sixteen rows at a time on the AMX tiles (the last block with the rows left), into out [M, N]
// (float32, or bfloat16 bits with OutT = uint16_t): the tile form of wide_panels_times_rows<true>.
template <typename OutT>
GGUF_AMX void amx_panels_times_rows(const uint32_t* panels, int64_t count, int64_t panel_words, int64_t col0,
                                    const uint16_t* x, int64_t M, int64_t K, int64_t N, OutT* out) {
  const int64_t full = M / 16 * 16;
  if (full > 0) amx_row_blocks(panels, count, panel_words, col0, x, 0, full, 16, K, N, out);
  if (M > full) amx_row_blocks(panels, count, panel_words, col0, x, full, M, M - full, K, N, out);
  _tile_release();
}

// Loads the 16-row tile configuration (every tile 16 rows of 64 bytes) for the chunked form.
GGUF_AMX inline void amx_configure_16_rows() {
  load_tile_config(TileConfig(16));
}

GGUF_AMX inline void amx_release() { _tile_release(); }

}  // namespace gguf_wide
#endif  // x86
