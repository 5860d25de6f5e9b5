// GGUF Q4_0 / Q4_1 / Q8_0 weights repacked once at load into a column-interleaved layout, and their products.
//
// In a ggml file each weight row (one output column of the product) is a run of 32-weight blocks along K, so a
// kernel that wants 16 output columns side by side in a 16-lane register has to transpose the blocks at every
// call (gguf_kernels.cpp does, in registers: on a Zen 5 that cost about as much as the products at 16-64 rows).
// The "wide16" layout (inferneo/quantization/gguf_wide.py writes and reads it) stores the same bytes transposed:
// the weight rows in groups of 16 (the last group padded with zero scales and codes), and for each group and
// 32-weight block one tile
//
//   Q4_1: [16 half scales d][16 half minimums m][256 code bytes]   (320 bytes = 16 ggml blocks)
//   Q4_0: [16 half scales d][256 code bytes]                      (288 bytes)
//   Q8_0: [16 half scales d][512 code bytes]                      (544 bytes)
//
// where, for the 4-bit formats, code byte 16 p + c holds column c's codes of k = 2p (low nibble) and k = 2p + 1
// (high nibble): one 16-byte load, a zero extension, a mask and a shift give the codes of two k for 16 columns; for
// Q8_0, byte 32 p + c holds column c's signed code of k = 2p and byte 32 p + 16 + c that of k = 2p + 1. The values
// are computed as the reference computes them (Q4_1: d * q + m, Q4_0: d * (q - 8), Q8_0: d * q; the file is built
// with -ffp-contract=off), so the float32 weights equal gguf.quants.dequantize's.
//
// gguf_packed_linear(x [M, K] float32 or bfloat16, packed uint8 [groups, K / 32, tile]) -> float32 [M, N]:
//  - up to `inreg_max_rows` rows: each group's tiles are turned into values in registers and multiplied straight
//    into up to 8 activation rows (float32 products; bfloat16 rows are widened exactly), k even and odd in two
//    accumulators per row;
//  - more rows: groups of three (48 columns) are de-quantized once per call into the [K][48] float32 or
//    [K/2][48] bfloat16-pair panels of gguf_wide_panels.h (bfloat16 with bfloat16 activations on AVX512_BF16 CPUs:
//    the weights rounded to nearest even, as a bfloat16 model holds them) and multiplied into every row.
// AVX-512 only (AVX512F/BW/VL/DQ): the layout is chosen at load only on such CPUs.
//
// gguf_packed_linear_int8 / gguf_packed_linear_i16: activations held as int8 or 16-bit integers per 32-weight block
// and multiplied by the codes as integers, on AVX512_VNNI or, where the CPU has AMX-INT8, on the tiles (the same
// integer sums, so the same bits).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "aligned_buffer.h"
#include "gguf_amx.h"
#include "gguf_wide_panels.h"
#include "vector_math.h"

namespace {

constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;
constexpr int64_t kGroupCols = 16;

int64_t tile_bytes(int64_t qtype) { return qtype == kQ8_0 ? 544 : qtype == kQ4_1 ? 320 : 288; }

#ifdef GGUF_X86
using namespace gguf_wide;
using inferneo_buffers::AlignedBuffer;
using inferneo_buffers::uninitialized;

// A group's tiles are read in order; the next tiles are prefetched this far ahead.
constexpr int64_t kPrefetchTiles = 2;

// The values of k = 2p (lo) and k = 2p + 1 (hi) of a tile's 16 columns (kFmt: kQ4_0, kQ4_1 or kQ8_0).
template <int kFmt>
GGUF_AVX512 inline void pair_values(const uint8_t* codes, int64_t p, __m512 d, __m512 m, __m512& lo, __m512& hi) {
  if constexpr (kFmt == kQ8_0) {  // 16 signed bytes of k = 2p, then 16 of k = 2p + 1: d * q
    const __m128i q_lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * p));
    const __m128i q_hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * p + 16));
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q_lo)));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q_hi)));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * p)));
    const __m512i q_lo = _mm512_and_si512(v, _mm512_set1_epi32(15)), q_hi = _mm512_srli_epi32(v, 4);
    if constexpr (kFmt == kQ4_1) {
      // one FMA is the reference's multiply and add: d (a half, 11 significant bits) times q (0..15, 4 bits) is
      // exact in float32, so only the addition rounds, in both
      lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(q_lo), m);
      hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(q_hi), m);
    } else {
      const __m512i eight = _mm512_set1_epi32(8);
      lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(q_lo, eight)));
      hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(q_hi, eight)));
    }
  }
}

// Prefetch the tile kPrefetchTiles after `t`, every line of its 288, 320 or 544 bytes (every other line, leaving the
// rest to the adjacent-line prefetcher, measured slower than none on a Xeon with AMX; every line, faster there for
// the in-register path, 5.4 against 6.8 ms at one row and 7.4 against 8.3 at four a step of the default model's GGUF
// layers, and for the panel build, 7.9-8.9 against 9.4-11.2 ms at 16-64 rows).
GGUF_AVX512 inline void prefetch_tile_ahead(const uint8_t* t, int64_t tile) {
  const char* ahead = reinterpret_cast<const char*>(t + kPrefetchTiles * tile);
  for (int64_t at = 0; at < tile; at += 64) _mm_prefetch(ahead + at, _MM_HINT_T0);
}

GGUF_AVX512 inline __m512 half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// A tile's scales (and Q4_1's minimums) and where its codes start.
template <int kFmt>
GGUF_AVX512 inline const uint8_t* tile_scales(const uint8_t* tile, __m512& d, __m512& m) {
  d = half16(tile);
  m = kFmt == kQ4_1 ? half16(tile + 32) : _mm512_setzero_ps();
  return tile + (kFmt == kQ4_1 ? 64 : 32);
}

// ---- few rows: values in registers -----------------------------------------------------------------------------

// Rows [0, MR) of float32 x times one group (16 columns): y[r][0 .. cols) (float32, or bfloat16 words).
template <int kFmt, int MR, typename OutT>
GGUF_AVX512 void inreg_group(const uint8_t* group, int64_t nb, int64_t tile, const float* x, int64_t ldx, OutT* y,
                             int64_t ldy, int64_t cols) {
  __m512 even[MR], odd[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* t = group + b * tile;
    prefetch_tile_ahead(t, tile);
    __m512 d, m;
    const uint8_t* codes = tile_scales<kFmt>(t, d, m);
    const float* xb = x + 32 * b;
#pragma GCC unroll 4
    for (int64_t p = 0; p < 16; ++p) {
      __m512 lo, hi;
      pair_values<kFmt>(codes, p, d, m, lo, hi);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        even[r] = _mm512_fmadd_ps(_mm512_set1_ps(xb[r * ldx + 2 * p]), lo, even[r]);
        odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(xb[r * ldx + 2 * p + 1]), hi, odd[r]);
      }
    }
  }
  const __mmask16 mask = lanes_mask(cols);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) store16(y + r * ldy, mask, _mm512_add_ps(even[r], odd[r]));
}

template <int kFmt, typename OutT>
GGUF_AVX512 void inreg_group_rows(int64_t rows, const uint8_t* group, int64_t nb, int64_t tile, const float* x,
                                  int64_t ldx, OutT* y, int64_t ldy, int64_t cols) {
  by_block_rows(rows, [&](auto mr) { inreg_group<kFmt, decltype(mr)::value>(group, nb, tile, x, ldx, y, ldy, cols); });
}

// ---- more rows: panels built once per call -----------------------------------------------------------------------

// How a panel stores one k-pair of 16 columns: float32 [K][48] (two lines) or bfloat16 pairs [K/2][48] (one line,
// lane c: w[2p][c] low, w[2p + 1][c] high, each rounded to nearest even).
struct Float32Panel {
  static constexpr int64_t kWordsPerBlock = 32 * kWideCols;  // 32 lines of 48 floats
  GGUF_AVX512 static inline void store(uint32_t* line, int64_t p, __m512 lo, __m512 hi) {
    float* dst = reinterpret_cast<float*>(line);
    _mm512_storeu_ps(dst + 2 * p * kWideCols, lo);
    _mm512_storeu_ps(dst + (2 * p + 1) * kWideCols, hi);
  }
};

struct Bfloat16Panel {
  static constexpr int64_t kWordsPerBlock = 16 * kWideCols;  // 16 lines of 48 pairs
  GGUF_AVX512BF16 static inline void store(uint32_t* line, int64_t p, __m512 lo, __m512 hi) {
    // word 2c <- word c (k even), word 2c + 1 <- word 16 + c (k odd) of the two-register conversion
    alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                         8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // words 0-15: k even, 16-31: k odd
    _mm512_storeu_si512(line + p * kWideCols, _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), halves));
  }
};

// Blocks [b0, b1) of groups 3t .. 3t + 2 (those below `groups`) as one panel of `Panel`'s layout (block b0 first);
// missing groups give zero columns. Always inlined into build_panel_f32 / build_panel_bf16 below, which carry the
// target each store needs.
template <int kFmt, typename Panel>
GGUF_AVX512 __attribute__((always_inline)) inline void build_panel(const uint8_t* packed, int64_t groups, int64_t nb,
                                                                   int64_t tile, int64_t t, uint32_t* panel,
                                                                   int64_t b0, int64_t b1) {
  for (int64_t j = 0; j < 3; ++j) {
    const int64_t g = 3 * t + j;
    uint32_t* col = panel + 16 * j;
    if (g >= groups) {
      for (int64_t line = 0; line < (b1 - b0) * Panel::kWordsPerBlock / kWideCols; ++line) {
        _mm512_storeu_si512(col + line * kWideCols, _mm512_setzero_si512());
      }
      continue;
    }
    const uint8_t* src = packed + g * nb * tile;
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* t_ = src + b * tile;
      prefetch_tile_ahead(t_, tile);
      __m512 d, m;
      const uint8_t* codes = tile_scales<kFmt>(t_, d, m);
      uint32_t* dst = col + (b - b0) * Panel::kWordsPerBlock;
#pragma GCC unroll 4
      for (int64_t p = 0; p < 16; ++p) {
        __m512 lo, hi;
        pair_values<kFmt>(codes, p, d, m, lo, hi);
        Panel::store(dst, p, lo, hi);
      }
    }
  }
}

template <int kFmt>
GGUF_AVX512 void build_panel_f32(const uint8_t* packed, int64_t groups, int64_t nb, int64_t tile, int64_t t,
                                 uint32_t* panel) {
  build_panel<kFmt, Float32Panel>(packed, groups, nb, tile, t, panel, 0, nb);
}

template <int kFmt>
GGUF_AVX512BF16 void build_panel_bf16(const uint8_t* packed, int64_t groups, int64_t nb, int64_t tile, int64_t t,
                                      uint32_t* panel, int64_t b0, int64_t b1) {
  build_panel<kFmt, Bfloat16Panel>(packed, groups, nb, tile, t, panel, b0, b1);
}

// Triples [t0, t1) times all M rows, in chunks of triples whose panels fit in about 256 KB (as wide_panel_groups in
// gguf_kernels.cpp goes: a long prompt's rows are read once per chunk rather than once per 48 columns).
// With kBf16 and `amx`, the bfloat16 panels are multiplied on the AMX tiles (gguf_amx.h).
template <int kFmt, bool kBf16, typename OutT>
GGUF_AVX512 void panel_triples(const uint8_t* packed, int64_t groups, int64_t nb, int64_t tile, int64_t N,
                               const void* x, int64_t M, OutT* out, int64_t t0, int64_t t1, bool amx) {
  const int64_t K = 32 * nb, panel_words = kBf16 ? kWideCols * K / 2 : kWideCols * K;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(8, (int64_t{256} << 10) / (panel_words * 4)));
  const AlignedBuffer<uint32_t> panels = uninitialized<uint32_t>(chunk * panel_words);
  for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
    const int64_t count = std::min(chunk, t1 - c0);
    for (int64_t i = 0; i < count; ++i) {
      if constexpr (kBf16) {
        build_panel_bf16<kFmt>(packed, groups, nb, tile, c0 + i, panels.get() + i * panel_words, 0, nb);
      } else {
        build_panel_f32<kFmt>(packed, groups, nb, tile, c0 + i, panels.get() + i * panel_words);
      }
    }
    if (kBf16 && amx) {
      amx_panels_times_rows(panels.get(), count, panel_words, c0 * kWideCols, static_cast<const uint16_t*>(x), M, K,
                            N, out);
    } else {
      wide_panels_times_rows<kBf16>(panels.get(), count, panel_words, c0 * kWideCols, x, M, K, N, out);
    }
  }
}

// ---- decode-sized bfloat16 calls on the AMX tiles: panels built a few blocks of K at a time -----------------------

// Blocks of K a chunk of panel holds (3 KB each: a chunk, the activation rows of a pair of row blocks and the sums
// stay in a 48 KB L1), and the row counts that take this form (longer calls take panel_triples, which reads the
// activation rows once per chunk of panels). Against the whole-K panels on a 2-core Xeon with AMX (ms a step of the
// default model's GGUF layers): 12.2 / 13.1 at 16 rows, 14.5 / 15.7 at 32, 18.7 / 19.8 at 64, 37.7 / 35.4 at 128.
constexpr int64_t kAmxChunkBlocks = 6;
constexpr int64_t kAmxChunkedMaxRows = 64;

// Triple t times the `blocks` padded row blocks of bfloat16 x, K a few blocks at a time (each chunk of the panel built
// into `lines`), into sums[0 .. blocks); `cols` of its 48 columns exist. The 16-row tile configuration is loaded.
// Blocks [b0, b1) of triple t's groups into L2 (every line): the next chunk's tiles, requested while this one is
// built and multiplied (the per-tile prefetch two tiles ahead runs too late for the first tiles of each group's
// run of a chunk).
GGUF_AVX512 inline void prefetch_triple_blocks(const uint8_t* packed, int64_t groups, int64_t nb, int64_t tile,
                                               int64_t t, int64_t b0, int64_t b1) {
  for (int64_t j = 0; j < 3 && 3 * t + j < groups; ++j) {
    const char* from = reinterpret_cast<const char*>(packed + ((3 * t + j) * nb + b0) * tile);
    for (int64_t at = 0; at < (b1 - b0) * tile; at += 64) _mm_prefetch(from + at, _MM_HINT_T1);
  }
}

template <int kFmt>
GGUF_AMX void amx_triple_sums(const uint8_t* packed, int64_t groups, int64_t nb, int64_t tile, int64_t t,
                              const uint16_t* x, int64_t blocks, uint32_t* lines, BlockSums* sums, int64_t cols) {
  for (int64_t kc = 0; kc < nb; kc += kAmxChunkBlocks) {
    const int64_t kb = std::min(kAmxChunkBlocks, nb - kc);
    if (kc + kb < nb) {  // the next chunk of this triple, or the first of the next one
      prefetch_triple_blocks(packed, groups, nb, tile, t, kc + kb, std::min(nb, kc + kb + kAmxChunkBlocks));
    } else if (3 * (t + 1) < groups) {
      prefetch_triple_blocks(packed, groups, nb, tile, t + 1, 0, std::min(nb, kAmxChunkBlocks));
    }
    build_panel_bf16<kFmt>(packed, groups, nb, tile, t, lines, kc, kc + kb);
    amx_row_blocks_chunk(x + 32 * kc, 32 * nb, blocks, kb, lines, sums, kc == 0, cols);
  }
}

// Triples [t0, t1) times the rows of bfloat16 x, padded with zero rows to whole blocks of 16 (M real rows), into
// out [M, N], K a few blocks at a time (gguf_amx.h).
template <int kFmt, typename OutT>
GGUF_AMX void amx_chunked_triples(const uint8_t* packed, int64_t groups, int64_t nb, int64_t tile, int64_t N,
                                  const uint16_t* x, int64_t M, OutT* out, int64_t t0, int64_t t1) {
  const int64_t blocks = (M + 15) / 16;
  const AlignedBuffer<uint32_t> lines = uninitialized<uint32_t>(kAmxChunkBlocks * 16 * kWideCols);
  const AlignedBuffer<BlockSums> sums = uninitialized<BlockSums>(blocks);
  amx_configure_16_rows();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t col0 = t * kWideCols, cols = std::min(kWideCols, N - col0);
    amx_triple_sums<kFmt>(packed, groups, nb, tile, t, x, blocks, lines.get(), sums.get(), cols);
    for (int64_t i = 0; i < blocks; ++i) {
      store_tile_sums(sums[i], std::min<int64_t>(16, M - 16 * i), out + 16 * i * N + col0, N, cols);
    }
  }
  amx_release();
}

// A gate/up projection ([gate | up] columns, `inter` each, a multiple of 48) with SiLU-and-mul applied to its sums:
// out[r][c] = silu(gate[r][c]) * up[r][c] in bfloat16, for gate triples [t0, t1) (up triple t + inter / 48 beside
// each). The arithmetic is the unfused pair's: each sum rounded to bfloat16 as the projection stores it, then
// cpu_kernels.cpp's SiLU-and-mul (the same vector_math.h functions), so the bits equal the two calls'.
template <int kFmt>
GGUF_AMX void amx_chunked_silu_triples(const uint8_t* packed, int64_t groups, int64_t nb, int64_t tile, int64_t inter,
                                       const uint16_t* x, int64_t M, uint16_t* out, int64_t t0, int64_t t1) {
  const int64_t blocks = (M + 15) / 16, up_offset = inter / kWideCols;
  const AlignedBuffer<uint32_t> lines = uninitialized<uint32_t>(kAmxChunkBlocks * 16 * kWideCols);
  const AlignedBuffer<BlockSums> gate = uninitialized<BlockSums>(blocks), up = uninitialized<BlockSums>(blocks);
  amx_configure_16_rows();
  for (int64_t t = t0; t < t1; ++t) {
    amx_triple_sums<kFmt>(packed, groups, nb, tile, t, x, blocks, lines.get(), gate.get(), kWideCols);
    amx_triple_sums<kFmt>(packed, groups, nb, tile, t + up_offset, x, blocks, lines.get(), up.get(), kWideCols);
    for (int64_t i = 0; i < blocks; ++i) {
      for (int64_t r = 0; r < std::min<int64_t>(16, M - 16 * i); ++r) {
        uint16_t* o = out + (16 * i + r) * inter + t * kWideCols;
        for (int j = 0; j < 3; ++j) {
          const __m512 g = bf16_stored_value(_mm512_loadu_ps(gate[i][j][r]));
          const __m512 u = bf16_stored_value(_mm512_loadu_ps(up[i][j][r]));
          const __m512 act = inferneo_math::bf16_rounded(inferneo_math::silu16(g));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * j),
                              _mm512_cvtepi32_epi16(inferneo_math::bf16_rounded_bits(_mm512_mul_ps(act, u))));
        }
      }
    }
  }
  amx_release();
}

// ---- int8 dot products with AVX512-VNNI --------------------------------------------------------------------------
//
// The same arithmetic as gguf_kernels.cpp's int8 path (llama.cpp's Q8 activations): each activation row is
// quantized per 32-weight block (d = max|x| / 127, q = x * (127 / max|x|) rounded to nearest even, s = d * sum(q)),
// and a weight block w = d_w * q_w + m_w (Q4_0: m_w = -8 d_w) adds d_w * d_a * sum(q_w q_a) + m_w * s_a, with the
// float part in the same order (one multiply of the scales, two FMAs a block, partial sums per 16-block chunk of
// K added in order), so the results equal gguf_linear_int8's bit for bit. The integer sums run on vpdpbusd: a
// group's codes are spread once per call into one 64-byte register per 4 k (lane c: column c's codes of
// k = 4i, 4i + 2, 4i + 1, 4i + 3 as unsigned bytes, from the wide16 tile's two 16-byte code rows with one byte
// interleave, a widening and one shift), kept in an L1 buffer that every activation row reuses; each activation
// row's 4 bytes (stored in that k order) are broadcast to all 16 lanes.
#define GGUF_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

inline bool cpu_has_avx512_vnni() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
}

constexpr int64_t kVnniChunkBlocks = 16;  // as gguf_kernels.cpp's kI8ChunkBlocks: partial sums per 512 weights

// One float32 row of K = 32 * nb into int8 blocks (k order 0, 2, 1, 3 within each 4), scales d and d * sum(q).
GGUF_AVX512 void quantize_row_vnni(const float* x, int64_t nb, int8_t* q, float* d, float* s) {
  const __m128i order = _mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float am = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float id = am > 0.0f ? 127.0f / am : 0.0f;
    const __m512 idv = _mm512_set1_ps(id);
    const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    d[b] = am / 127.0f;
    s[b] = d[b] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm_shuffle_epi8(_mm512_cvtepi32_epi8(q0), order));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm_shuffle_epi8(_mm512_cvtepi32_epi8(q1), order));
  }
}

// Block b of a group for the VNNI spreads: prefetches ahead, stores its 16 scales at dv[16 b] and minimums at mv[16 b]
// (Q4_0: -8 d; Q8_0: none) and returns where its codes start.
template <int kFmt>
GGUF_AVX512 inline const uint8_t* spread_block_scales(const uint8_t* group, int64_t b, int64_t tile, float* dv,
                                                      float* mv) {
  const uint8_t* t = group + b * tile;
  prefetch_tile_ahead(t, tile);
  __m512 d, m;
  const uint8_t* codes = tile_scales<kFmt>(t, d, m);
  _mm512_storeu_ps(dv + 16 * b, d);
  if constexpr (kFmt != kQ8_0) _mm512_storeu_ps(mv + 16 * b, kFmt == kQ4_1 ? m : _mm512_mul_ps(d, _mm512_set1_ps(-8.0f)));
  return codes;
}

// A group's tiles as vpdpbusd operands: w[8 b + i] lane c = column c's codes of k = 32 b + 4 i + (0, 2, 1, 3);
// dv / mv [16 b .. 16 b + 16) the block's scales and minimums (Q4_0: -8 d).
template <int kFmt>
GGUF_AVX512 void spread_group_vnni(const uint8_t* group, int64_t nb, int64_t tile, int32_t* w, float* dv, float* mv) {
  const __m512i low_nibbles = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* codes = spread_block_scales<kFmt>(group, b, tile, dv, mv);
#pragma GCC unroll 8
    for (int64_t i = 0; i < 8; ++i) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * i));       // k = 4i, 4i + 1
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * i + 16));  // k = 4i + 2, 4i + 3
      // word c = a_c | c_c << 8; lane c = its low nibbles in bytes 0-1, high nibbles in bytes 2-3
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_set_m128i(_mm_unpackhi_epi8(a, c), _mm_unpacklo_epi8(a, c)));
      // (v | v << 12) & mask
      _mm512_storeu_si512(w + 16 * (8 * b + i), _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), low_nibbles, 0xA8));
    }
  }
}

// sum += w (unsigned bytes) . the 4 signed bytes at p broadcast to every lane, with the broadcast inside the
// instruction ({1to16}): a separate vpbroadcastd per product (what the compiler emits for the intrinsic) doubled
// the vector instructions of the inner loop.
GGUF_AVX512VNNI inline void dpbusd_bcast(__m512i& sum, __m512i w, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(sum) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)));
}

// ---- float32 activations as 16-bit integers, with AVX512_VNNI ---------------------------------------------------
//
// Each float32 activation row is held per 32-weight block as x ~ s * a with s = max|x| / 32767 and a = x / s rounded
// to nearest even (|a| <= 32767: every value within s / 2, i.e. 2^-16 of the block's largest magnitude, where int8
// activations are within 2^-8 of it). A weight block w = d * q + m (Q4_0: q in 0..15 with m = -8 d; Q8_0: m = 0)
// adds d * s * sum(q a) + m * sum(x), the block's sum of x taken in float32 from x itself, so only the products
// are rounded. The integer sums run on vpdpwssd (two 16-bit products a lane): 32 multiply-adds an instruction
// where float32 FMAs do 16, for about 5 float instructions a block and row to apply the scales. A group's codes
// become one vpdpwssd operand per k pair (lane c: column c's codes of k = 2p and 2p + 1 as 16-bit integers) once
// per call and row chunk, in an L1/L2 buffer that every activation row reuses.

// One float32 row of K = 32 * nb as 16-bit integers (natural k order), each block's scale s and sum of x. A block
// holding inf or NaN gets s = NaN, so that its outputs are NaN as the float path's would be non-finite.
GGUF_AVX512 void quantize_row_i16(const float* x, int64_t nb, int16_t* a, float* s, float* sx) {
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float am = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const bool finite = am <= std::numeric_limits<float>::max();
    const float inv = finite && am > 0.0f ? 32767.0f / am : 0.0f;
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 32 * b), _mm512_cvtsepi32_epi16(q0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 32 * b + 16), _mm512_cvtsepi32_epi16(q1));
    s[b] = finite ? am / 32767.0f : std::numeric_limits<float>::quiet_NaN();
    sx[b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
  }
}

// A group's tiles as vpdpwssd operands: w[16 b + p] lane c = column c's codes of k = 32 b + 2p (low 16 bits) and
// 32 b + 2p + 1 (high 16 bits); dv / mv [16 b .. 16 b + 16) the block's scales and minimums (Q4_0: -8 d; Q8_0:
// unused).
template <int kFmt>
GGUF_AVX512 void spread_group_i16(const uint8_t* group, int64_t nb, int64_t tile, int32_t* w, float* dv, float* mv) {
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* codes = spread_block_scales<kFmt>(group, b, tile, dv, mv);
#pragma GCC unroll 8
    for (int64_t p = 0; p < 16; ++p) {
      __m512i v;
      if constexpr (kFmt == kQ8_0) {  // 16 signed bytes of k = 2p, then 16 of k = 2p + 1
        const __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * p)));
        const __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * p + 16)));
        v = _mm512_mask_blend_epi16(0xAAAAAAAA, lo, _mm512_slli_epi32(hi, 16));
      } else {  // byte c: k = 2p in the low nibble, 2p + 1 in the high one -> (v | v << 12) & 0x000F000F
        const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * p)));
        v = _mm512_ternarylogic_epi32(u, _mm512_slli_epi32(u, 12), nibbles, 0xA8);
      }
      _mm512_storeu_si512(w + 16 * (16 * b + p), v);
    }
  }
}

// sum += w . the k pair at p (two 16-bit integers) broadcast to every lane, the broadcast inside the instruction (as
// dpbusd_bcast does).
GGUF_AVX512VNNI inline void dpwssd_bcast(__m512i& sum, __m512i w, const int16_t* p) {
  asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(sum) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)));
}

// The integer dot products of the two VNNI paths, per activation type: int8 rows on vpdpbusd (four byte products a
// lane, the weight codes unsigned), 16-bit rows on vpdpwssd (two). A 32-weight block is kOperands spread operands,
// each against 4 bytes of the activation row.
template <typename T>
struct VnniDot;
template <>
struct VnniDot<int8_t> {
  static constexpr int64_t kOperands = 8;
  GGUF_AVX512VNNI __attribute__((always_inline)) static void add(__m512i& sum, __m512i w, const int8_t* p) {
    dpbusd_bcast(sum, w, p);
  }
};
template <>
struct VnniDot<int16_t> {
  static constexpr int64_t kOperands = 16;
  GGUF_AVX512VNNI __attribute__((always_inline)) static void add(__m512i& sum, __m512i w, const int16_t* p) {
    dpwssd_bcast(sum, w, p);
  }
};

// One row's integer sums of a block (16 columns) added to its float32 sum: acc += float(sum) * (d * da) (+ m * sa
// for the formats with an m term, Q4_0 / Q4_1), the order both integer paths keep (and gguf_linear_int8's).
template <int kFmt>
GGUF_AVX512 __attribute__((always_inline)) inline __m512 add_scaled_block(__m512 acc, __m512i sum, __m512 d, __m512 m,
                                                                          float da, float sa) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_set1_ps(da)), acc);
  if constexpr (kFmt != kQ8_0) acc = _mm512_fmadd_ps(m, _mm512_set1_ps(sa), acc);
  return acc;
}

// A row's chunk of sums to y: stored after the first chunk, added to what is there after that.
GGUF_AVX512 __attribute__((always_inline)) inline void store_chunk_sums(float* yr, __mmask16 mask, __m512 acc,
                                                                        bool first) {
  _mm512_mask_storeu_ps(yr, mask, first ? acc : _mm512_add_ps(_mm512_maskz_loadu_ps(mask, yr), acc));
}

// Rows [0, MR) of the integer activations (q: row stride K; da (scales), sa (the m term's factor): row stride nb)
// times one spread group. Each row's integer sum runs in two chains (even and odd operands, added exactly before the
// conversion): with one chain a row, eight rows keep too few dot products in flight for their latency. On the int8
// path a chunk's float sum goes to y when the chunk ends (stored after the first, added after that), as
// gguf_linear_int8 adds its chunks, so that the results equal that kernel's bit for bit; the int16 path stores once
// at the end (its chunk stores measured 5-8% slower at 64-256 rows). Q8_0 blocks have no m term. Kept out of line:
// inlined into its caller's lambda, it measured 8-10% slower at 64-256 rows.
template <int kFmt, int MR, typename T>
GGUF_AVX512VNNI __attribute__((noinline)) void vnni_group(const int32_t* w, const float* dv, const float* mv, int64_t nb, const T* q, int64_t K,
                                const float* da, const float* sa, float* y, int64_t ldy, int64_t cols) {
  constexpr int64_t kOps = VnniDot<T>::kOperands, kPer = 32 / kOps;  // activations an operand covers
  const __mmask16 mask = lanes_mask(cols);
  __m512 acc[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  bool first = true;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i even[MR], odd[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) even[r] = odd[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int64_t i = 0; i < kOps; i += 2) {
      const __m512i w0 = _mm512_loadu_si512(w + 16 * (kOps * b + i)),
                    w1 = _mm512_loadu_si512(w + 16 * (kOps * b + i + 1));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        VnniDot<T>::add(even[r], w0, q + r * K + 32 * b + kPer * i);
        VnniDot<T>::add(odd[r], w1, q + r * K + 32 * b + kPer * (i + 1));
      }
    }
    const __m512 d = _mm512_loadu_ps(dv + 16 * b);
    const __m512 m = kFmt == kQ8_0 ? _mm512_setzero_ps() : _mm512_loadu_ps(mv + 16 * b);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i sum = _mm512_add_epi32(even[r], odd[r]);
      acc[r] = add_scaled_block<kFmt>(acc[r], sum, d, m, da[r * nb + b], sa[r * nb + b]);
    }
    if ((std::is_same_v<T, int8_t> && (b + 1) % kVnniChunkBlocks == 0) || b + 1 == nb) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        store_chunk_sums(y + r * ldy, mask, acc[r], first);
        acc[r] = _mm512_setzero_ps();
      }
      first = false;
    }
  }
}

// Activation rows as the VNNI paths hold them: integers (row stride K), each block's scale and the factor of its
// weights' m term (int8: d * sum(q), as llama.cpp; int16: the float32 sum of x).
template <typename T>
struct IntegerRows {
  AlignedBuffer<T> values;
  AlignedBuffer<float> scales, m_factors;
};

// `padded_rows` (>= M) rows are allocated; those past M hold zeros (the AMX tiles read whole blocks of 16 rows).
template <typename T>
IntegerRows<T> integer_rows(const at::Tensor& x_in, int64_t nb, int64_t padded_rows = 0) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = 32 * nb, P = std::max(M, padded_rows);
  IntegerRows<T> rows{uninitialized<T>(P * K), uninitialized<float>(P * nb), uninitialized<float>(P * nb)};
  if (P > M) {
    std::memset(rows.values.get() + M * K, 0, (P - M) * K * sizeof(T));
    std::memset(rows.scales.get() + M * nb, 0, (P - M) * nb * sizeof(float));
    std::memset(rows.m_factors.get() + M * nb, 0, (P - M) * nb * sizeof(float));
  }
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (std::is_same_v<T, int8_t>) {
        quantize_row_vnni(xp + r * K, nb, rows.values.get() + r * K, rows.scales.get() + r * nb,
                          rows.m_factors.get() + r * nb);
      } else {
        quantize_row_i16(xp + r * K, nb, rows.values.get() + r * K, rows.scales.get() + r * nb,
                         rows.m_factors.get() + r * nb);
      }
    }
  });
  return rows;
}

// ---- the integer products on the AMX tiles (AMX-INT8) ------------------------------------------------------------
//
// A group's VNNI spread (4 k of its 16 columns in one 64-byte line, spread_group_vnni) is exactly the row layout of
// an AMX "B" tile: a 32-weight block is 8 such lines, one B tile of 8 rows, and sixteen activation rows of that block
// (32 bytes each, in the spread's k order 0, 2, 1, 3) the A tile it multiplies into 16 x 16 int32 sums: one tile
// product a block where vnni_group issues 8 (int8 rows) or 16 (16-bit rows) vpdp instructions per row. A block's sums
// must meet its own scales, so the C tile is stored after each block and its rows are converted and scaled by
// vnni_group's vector code in vnni_group's order: the outputs equal the VNNI kernels' bit for bit. 16-bit activations
// (|a| <= 32767) are held as two byte planes, a = 256 hi + lo with hi = a >> 8 (signed) and lo = a & 255 (unsigned):
// two tile products a block (signed or unsigned bytes times unsigned Q4 codes, or times signed Q8_0 codes), and
// 256 C_hi + C_lo is the exact integer sum vpdpwssd gives.

// Tiles, in two sets so that block b + 1's operands load while block b's products run: 0 / 3 the activation bytes
// (int8 rows, or the high plane), 1 / 4 the low plane (16 rows of 32 bytes each), 2 / 5 the block's weights (8 rows
// of 64 bytes); 6 and 7 the sums of the activation tile and of the low plane (16 rows of 16 int32).
struct IntegerTileConfig : PaletteOneConfig {
  IntegerTileConfig() {
    for (int set = 0; set < 2; ++set) {
      colsb[3 * set] = colsb[3 * set + 1] = 32;
      rows[3 * set] = rows[3 * set + 1] = 16;
      colsb[3 * set + 2] = 64;
      rows[3 * set + 2] = 8;
    }
    colsb[6] = colsb[7] = 64;
    rows[6] = rows[7] = 16;
  }
};

// A Q8_0 group's tiles as signed-byte B-tile rows in the spread's order: w[8 b + i] lane c = column c's codes of
// k = 32 b + 4 i + (0, 2, 1, 3); dv [16 b ..) the block's scales (spread_group_vnni's layout for the signed codes).
GGUF_AVX512 void spread_group_q8_0_bytes(const uint8_t* group, int64_t nb, int64_t tile, int32_t* w, float* dv,
                                         float* mv) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* codes = spread_block_scales<kQ8_0>(group, b, tile, dv, mv);
#pragma GCC unroll 8
    for (int64_t i = 0; i < 8; ++i) {  // byte 32 p + c: k = 2p; 32 p + 16 + c: k = 2p + 1 (p = 2i, 2i + 1)
      const uint8_t* at = codes + 64 * i;
      const __m128i k0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
      const __m128i k1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 16));
      const __m128i k2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 32));
      const __m128i k3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 48));
      const __m128i even_lo = _mm_unpacklo_epi8(k0, k2), even_hi = _mm_unpackhi_epi8(k0, k2);  // k0 k2 of each column
      const __m128i odd_lo = _mm_unpacklo_epi8(k1, k3), odd_hi = _mm_unpackhi_epi8(k1, k3);    // k1 k3
      __m128i* line = reinterpret_cast<__m128i*>(w + 16 * (8 * b + i));
      _mm_storeu_si128(line, _mm_unpacklo_epi16(even_lo, odd_lo));      // columns 0-3: k0 k2 k1 k3 each
      _mm_storeu_si128(line + 1, _mm_unpackhi_epi16(even_lo, odd_lo));  // 4-7
      _mm_storeu_si128(line + 2, _mm_unpacklo_epi16(even_hi, odd_hi));  // 8-11
      _mm_storeu_si128(line + 3, _mm_unpackhi_epi16(even_hi, odd_hi));  // 12-15
    }
  }
}

// `n` 16-bit activations (natural k order, n a multiple of 32) as the two byte planes of the tiles, each in the
// spread's k order (0, 2, 1, 3 within each 4).
GGUF_AVX512 void split_byte_planes(const int16_t* a, int64_t n, int8_t* hi, uint8_t* lo) {
  const __m256i order = _mm256_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15,
                                         0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
  const __m512i low_byte = _mm512_set1_epi16(0x00FF);
  for (int64_t i = 0; i < n; i += 32) {
    const __m512i v = _mm512_loadu_si512(a + i);
    const __m256i h = _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8));
    const __m256i l = _mm512_cvtepi16_epi8(_mm512_and_si512(v, low_byte));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + i), _mm256_shuffle_epi8(h, order));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i), _mm256_shuffle_epi8(l, order));
  }
}

// Block b's operands (its weights at wb, its activation bytes at hi / lo) into tile set kSet. (The tile numbers of
// the tile instructions must be literals.)
template <bool kPlanes, int kSet>
GGUF_AMX_INT8 __attribute__((always_inline)) inline void load_block_operands(const int32_t* wb, const int8_t* hi,
                                                                             const uint8_t* lo, int64_t K) {
  if constexpr (kSet == 0) {
    _tile_loadd(2, wb, 64);
    _tile_loadd(0, hi, K);
    if constexpr (kPlanes) _tile_loadd(1, lo, K);
  } else {
    _tile_loadd(5, wb, 64);
    _tile_loadd(3, hi, K);
    if constexpr (kPlanes) _tile_loadd(4, lo, K);
  }
}

// The products of tile set kSet into the sums tiles 6 (and 7): signed activation bytes (int8 rows, the high plane)
// times the codes, unsigned ones (the low plane) times the codes; the Q4 codes are unsigned, Q8_0's signed.
template <int kFmt, bool kPlanes, int kSet>
GGUF_AMX_INT8 __attribute__((always_inline)) inline void block_tile_products() {
  _tile_zero(6);
  if constexpr (kPlanes) _tile_zero(7);
  if constexpr (kSet == 0) {
    if constexpr (kFmt == kQ8_0) _tile_dpbssd(6, 0, 2); else _tile_dpbsud(6, 0, 2);
    if constexpr (kPlanes) {
      if constexpr (kFmt == kQ8_0) _tile_dpbusd(7, 1, 2); else _tile_dpbuud(7, 1, 2);
    }
  } else {
    if constexpr (kFmt == kQ8_0) _tile_dpbssd(6, 3, 5); else _tile_dpbsud(6, 3, 5);
    if constexpr (kPlanes) {
      if constexpr (kFmt == kQ8_0) _tile_dpbusd(7, 4, 5); else _tile_dpbuud(7, 4, 5);
    }
  }
}

// Block b's stored sums (sums[0], and the low plane's sums[1]) scaled into acc as vnni_group adds a block, for rows
// [0, rows); on the int8 path each chunk of kVnniChunkBlocks blocks then goes to y (stored after the first chunk,
// added after that: `first`), on the 16-bit path the whole sum after the last block.
template <int kFmt, bool kPlanes>
GGUF_AMX_INT8 __attribute__((always_inline)) inline void scale_block_sums(
    const int32_t (*sums)[16][16], int64_t b, int64_t nb, const float* dv, const float* mv, const float* da,
    const float* sa, int64_t rows, __m512 (&acc)[16], bool& first, float* y, int64_t ldy, __mmask16 mask) {
  const __m512 d = _mm512_loadu_ps(dv + 16 * b);
  const __m512 m = kFmt == kQ8_0 ? _mm512_setzero_ps() : _mm512_loadu_ps(mv + 16 * b);
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    if (r >= rows) break;
    __m512i sum = _mm512_load_si512(sums[0][r]);
    if constexpr (kPlanes) sum = _mm512_add_epi32(_mm512_slli_epi32(sum, 8), _mm512_load_si512(sums[1][r]));
    acc[r] = add_scaled_block<kFmt>(acc[r], sum, d, m, da[r * nb + b], sa[r * nb + b]);
  }
  if ((!kPlanes && (b + 1) % kVnniChunkBlocks == 0) || b + 1 == nb) {
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      if (r >= rows) break;
      store_chunk_sums(y + r * ldy, mask, acc[r], first);
      acc[r] = _mm512_setzero_ps();
    }
    first = false;
  }
}

// Sixteen activation rows (the int8 rows, or the high plane at `hi` and the low one at `lo`; row stride K bytes;
// rows past `rows` are zeros) times one spread group, with IntegerTileConfig loaded: y[r][0 .. cols) for r < rows.
// A software pipeline over the blocks: block b's sums are stored, block b + 1's operands loaded and its products
// issued, and only then block b - 1's sums (stored an iteration earlier: a vector load of a tile store's bytes
// right after it waits for the store) scaled, while the tiles work on block b + 1.
template <int kFmt, bool kPlanes>
GGUF_AMX_INT8 __attribute__((noinline)) void amx_integer_group(const int32_t* w, const float* dv, const float* mv,
                                                               int64_t nb, const int8_t* hi, const uint8_t* lo,
                                                               int64_t K, const float* da, const float* sa,
                                                               int64_t rows, float* y, int64_t ldy, int64_t cols) {
  alignas(64) int32_t sums[2][2][16][16];  // [block parity][activation tile, low plane][row][column]
  const __mmask16 mask = lanes_mask(cols);
  __m512 acc[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  bool first = true;
  load_block_operands<kPlanes, 0>(w, hi, lo, K);
  block_tile_products<kFmt, kPlanes, 0>();
  for (int64_t b = 0; b < nb; ++b) {
    int32_t (*stored)[16][16] = sums[b % 2];
    _tile_stored(6, stored[0], 64);
    if constexpr (kPlanes) _tile_stored(7, stored[1], 64);
    if (const int64_t n = b + 1; n < nb) {
      if (n % 2 == 0) {
        load_block_operands<kPlanes, 0>(w + 16 * 8 * n, hi + 32 * n, lo + 32 * n, K);
        block_tile_products<kFmt, kPlanes, 0>();
      } else {
        load_block_operands<kPlanes, 1>(w + 16 * 8 * n, hi + 32 * n, lo + 32 * n, K);
        block_tile_products<kFmt, kPlanes, 1>();
      }
    }
    if (b > 0) {
      scale_block_sums<kFmt, kPlanes>(sums[(b - 1) % 2], b - 1, nb, dv, mv, da, sa, rows, acc, first, y, ldy, mask);
    }
  }
  scale_block_sums<kFmt, kPlanes>(sums[(nb - 1) % 2], nb - 1, nb, dv, mv, da, sa, rows, acc, first, y, ldy, mask);
}

GGUF_AMX_INT8 inline void amx_integer_configure() { load_tile_config(IntegerTileConfig()); }

GGUF_AMX_INT8 inline void amx_integer_release() { _tile_release(); }

// ---- the whole weight de-quantized, for a dense matmul --------------------------------------------------------

// How a de-quantized [K, N] matrix stores 16 columns of one k: float32, or bfloat16 rounded to nearest even (as the
// bfloat16 panels hold the weights).
struct Float32Rows {
  GGUF_AVX512 static inline void store(void* wt, int64_t at, __mmask16 mask, __m512 v) {
    _mm512_mask_storeu_ps(static_cast<float*>(wt) + at, mask, v);
  }
};

struct Bfloat16Rows {
  GGUF_AVX512BF16 static inline void store(void* wt, int64_t at, __mmask16 mask, __m512 v) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(wt) + at, mask, (__m256i)_mm512_cvtneps_pbh(v));
  }
};

// Groups [g0, g1) of the tiles into wt [K, N] (row k: every column's weight of k): pair_values' 16 columns of k = 2p
// and 2p + 1 are one contiguous store each. The last group's padding columns are not written. Always inlined into
// dequantize_kn_f32 / dequantize_kn_bf16 below, which carry the target each store needs (as build_panel is).
template <int kFmt, typename Rows>
GGUF_AVX512 __attribute__((always_inline)) inline void dequantize_groups_kn(const uint8_t* packed, int64_t nb,
                                                                            int64_t tile, int64_t N, int64_t g0,
                                                                            int64_t g1, void* wt) {
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t col0 = g * kGroupCols, cols = std::min(kGroupCols, N - col0);
    const __mmask16 mask = lanes_mask(cols);
    for (int64_t b = 0; b < nb; ++b) {
      __m512 d, m;
      const uint8_t* codes = tile_scales<kFmt>(packed + (g * nb + b) * tile, d, m);
      for (int64_t p = 0; p < 16; ++p) {
        __m512 lo, hi;
        pair_values<kFmt>(codes, p, d, m, lo, hi);
        const int64_t k = 32 * b + 2 * p;
        Rows::store(wt, k * N + col0, mask, lo);
        Rows::store(wt, (k + 1) * N + col0, mask, hi);
      }
    }
  }
}

template <int kFmt>
GGUF_AVX512 void dequantize_kn_f32(const uint8_t* packed, int64_t nb, int64_t tile, int64_t N, int64_t g0, int64_t g1,
                                   void* wt) {
  dequantize_groups_kn<kFmt, Float32Rows>(packed, nb, tile, N, g0, g1, wt);
}

template <int kFmt>
GGUF_AVX512BF16 void dequantize_kn_bf16(const uint8_t* packed, int64_t nb, int64_t tile, int64_t N, int64_t g0,
                                        int64_t g1, void* wt) {
  dequantize_groups_kn<kFmt, Bfloat16Rows>(packed, nb, tile, N, g0, g1, wt);
}
#endif  // GGUF_X86

// fn(std::integral_constant<int, qtype>{}): the kernels' kFmt for a checked wide16 type.
template <typename Fn>
void with_format(int64_t qtype, Fn&& fn) {
  if (qtype == kQ4_1) {
    fn(std::integral_constant<int, kQ4_1>{});
  } else if (qtype == kQ8_0) {
    fn(std::integral_constant<int, kQ8_0>{});
  } else {
    fn(std::integral_constant<int, kQ4_0>{});
  }
}

// The contiguous rows of x, with zero rows added up to a whole block of 16 where M is not one (the chunked AMX form:
// one tile configuration for every block).
at::Tensor rows_in_blocks_of_16(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  if (M % 16 == 0) return x;
  at::Tensor padded = at::zeros({(M + 15) / 16 * 16, x.size(1)}, x.options());
  padded.narrow(0, 0, M).copy_(x);
  return padded;
}

#ifdef GGUF_X86
// run(op) with op the output's elements as the kernels store them: bfloat16 words (bf16_out), float32 holding
// bfloat16-rounded values (rounded_float_out), or float32.
template <typename Run>
void with_output(at::Tensor& out, bool bf16_out, bool rounded_float_out, Run&& run) {
  if (bf16_out) {
    run(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  } else if (rounded_float_out) {
    run(reinterpret_cast<RoundedFloat*>(out.data_ptr<float>()));
  } else {
    run(out.data_ptr<float>());
  }
}
#endif

// Where the in-register path hands over to the panels when the caller does not say (inreg_max_rows < 0): the row
// count up to which it measured faster on the default model's Q4_1 layers (two threads, Zen 5; 30 layers' weights
// cycled, ms a step). Measured again on 2026-12-04 late evening, after both paths stored bfloat16 outputs themselves
// and the in-register path widened bfloat16 rows itself: float32 19.45 against 20.58 at 34 rows, 20.21 against
// 20.47 at 36; bfloat16 7.02 against 6.97 at 10 rows, 7.28 against 6.91 at 11, 7.64 against 6.87 at 12 (before:
// 12 and 28).
// With the AMX tiles (a 2-core Xeon with AMX-BF16, 2026-12-05, benchmarks/cpu_gguf_paths.py, ms a step): in-register
// 11.56 against the tile panels' 13.24 at 8 rows, 17.14 against 13.15 at 12 (the panels cost about 12 ms to build
// at any row count there, the tiles' products little).
int64_t default_inreg_max_rows(bool bf16_panels, bool amx) { return amx ? 9 : bf16_panels ? 10 : 34; }

// The checks both entry points make of their arguments (what names the caller in each message).
void check_packed_arguments(const char* what, const at::Tensor& x, const at::Tensor& packed, int64_t qtype,
                            int64_t out_features) {
  TORCH_CHECK(qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0, what, ": ggml type ", qtype,
              " has no wide16 layout (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8)");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 3 &&
                  packed.is_contiguous() && packed.size(2) == tile_bytes(qtype),
              what, ": packed must be a contiguous CPU uint8 [groups, K / 32, ", tile_bytes(qtype), "] tensor");
  const int64_t groups = packed.size(0), K = 32 * packed.size(1);
  TORCH_CHECK(out_features > (groups - 1) * kGroupCols && out_features <= groups * kGroupCols, what, ": ", groups,
              " groups of 16 columns do not hold ", out_features, " output features");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K, what, ": x must be a CPU [rows, ", K,
              "] tensor");
}

}  // namespace

bool gguf_packed_available() {
#ifdef GGUF_X86
  return cpu_has_avx512();
#else
  return false;
#endif
}

at::Tensor gguf_packed_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype, int64_t out_features,
                              int64_t inreg_max_rows, const std::string& isa, bool bf16_out, bool rounded_float_out) {
  check_packed_arguments("GGUF packed kernels", x_in, packed, qtype, out_features);
  const int64_t groups = packed.size(0), nb = packed.size(1), K = 32 * nb, tile = packed.size(2), N = out_features;
  TORCH_CHECK(gguf_packed_available(), "GGUF packed kernels: the wide16 layout needs AVX512F/BW/VL/DQ, which this "
              "CPU lacks");
  const bool bf16_x = x_in.scalar_type() == at::kBFloat16;
  bool bf16_panels = bf16_x && cpu_has_avx512_bf16(), amx = bf16_panels && cpu_has_amx_bf16(), chunked_amx = true;
  if (isa == "avx512") {
    bf16_panels = amx = false;
  } else if (isa == "avx512_bf16" || isa == "amx_bf16" || isa == "amx_bf16_whole") {
    const bool tiles = isa != "avx512_bf16";
    chunked_amx = isa != "amx_bf16_whole";
    TORCH_CHECK(tiles ? cpu_has_amx_bf16() : cpu_has_avx512_bf16(), "GGUF packed kernels: isa='", isa, "' needs ",
                tiles ? "AMX-BF16 (and the kernel's permission to use the tiles)" : "AVX512_BF16",
                ", which this CPU lacks");
    TORCH_CHECK(bf16_x, "GGUF packed kernels: isa='", isa, "' multiplies bfloat16 activations; x is not bfloat16");
    amx = tiles;
  } else {
    TORCH_CHECK(isa.empty(), "GGUF packed kernels: unknown isa '", isa,
                "' (choose '', 'avx512', 'avx512_bf16', 'amx_bf16' or 'amx_bf16_whole')");
  }
  TORCH_CHECK(!bf16_out || bf16_x, "GGUF packed kernels: bf16_out=True takes bfloat16 activations; x is ",
              x_in.scalar_type());
  TORCH_CHECK(!rounded_float_out || (bf16_x && !bf16_out), "GGUF packed kernels: rounded_float_out=True takes "
              "bfloat16 activations and float32 output (not bf16_out); x is ", x_in.scalar_type());
  if (inreg_max_rows < 0) inreg_max_rows = default_inreg_max_rows(bf16_panels, amx);
  const int64_t M = x_in.size(0);
  // bf16_out: every output rounded to bfloat16 where it is stored (as `.to(torch.bfloat16)` would round the float32
  // result), on both paths.
  at::Tensor out = at::empty({M, N}, bf16_out ? at::kBFloat16 : at::kFloat);
  if (M == 0) return out;
  const uint8_t* src = packed.data_ptr<uint8_t>();
#ifdef GGUF_X86
  if (M > inreg_max_rows && amx && chunked_amx && M <= kAmxChunkedMaxRows) {  // decode sizes on the AMX tiles
    const at::Tensor x = rows_in_blocks_of_16(x_in);
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    with_output(out, bf16_out, rounded_float_out, [&](auto* op) {
      at::parallel_for(0, (groups + 2) / 3, 1, [&](int64_t t0, int64_t t1) {
        with_format(qtype, [&](auto fmt) {
          amx_chunked_triples<decltype(fmt)::value>(src, groups, nb, tile, N, xp, M, op, t0, t1);
        });
      });
    });
    return out;
  }
  if (M > inreg_max_rows) {  // the panels
    // bfloat16 pair panels take the bfloat16 rows as they are; float32 panels take float32 rows
    const at::Tensor x = bf16_panels ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
    const void* xp = x.data_ptr();
    with_output(out, bf16_out, rounded_float_out, [&](auto* op) {
      at::parallel_for(0, (groups + 2) / 3, 1, [&](int64_t t0, int64_t t1) {
        with_format(qtype, [&](auto min) {
          if (bf16_panels) {
            panel_triples<decltype(min)::value, true>(src, groups, nb, tile, N, xp, M, op, t0, t1, amx);
          } else {
            panel_triples<decltype(min)::value, false>(src, groups, nb, tile, N, xp, M, op, t0, t1, false);
          }
        });
      });
    });
    return out;
  }
  // A few rows: bfloat16 rows are widened here (exactly: a shift) rather than through a PyTorch conversion, whose
  // dispatch cost about as much as a small layer's products at one row.
  const at::Tensor x_c = bf16_x || x_in.scalar_type() == at::kFloat ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  AlignedBuffer<float> widened;
  const float* xp = nullptr;
  if (bf16_x) {
    widened = uninitialized<float>(M * K);
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(x_c.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < M * K; ++i) {
      const uint32_t bits = static_cast<uint32_t>(xb[i]) << 16;
      std::memcpy(&widened[i], &bits, sizeof(float));
    }
    xp = widened.get();
  } else {  // float32 rows as they are (float16 ones converted above)
    xp = x_c.data_ptr<float>();
  }
  const auto run_inreg = [&](auto* op) {
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const uint8_t* group = src + g * nb * tile;
        const int64_t cols = std::min(kGroupCols, N - g * kGroupCols);
        for (int64_t m = 0; m < M; m += 8) {
          const int64_t rows = std::min<int64_t>(8, M - m);
          with_format(qtype, [&](auto min) {
            inreg_group_rows<decltype(min)::value>(rows, group, nb, tile, xp + m * K, K, op + m * N + g * kGroupCols,
                                                   N, cols);
          });
        }
      }
    });
  };
  with_output(out, bf16_out, rounded_float_out, run_inreg);
#endif
  return out;
}

bool gguf_packed_amx_available() {
#ifdef GGUF_X86
  return cpu_has_amx_bf16();
#else
  return false;
#endif
}

std::vector<int64_t> gguf_packed_silu_rows() {
  // the row counts gguf_packed_linear_silu takes: above the in-register hand-over, up to the chunked form's limit
#ifdef GGUF_X86
  return {default_inreg_max_rows(true, true) + 1, kAmxChunkedMaxRows};
#else
  return {1, 0};  // none
#endif
}

at::Tensor gguf_packed_linear_silu(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype,
                                   int64_t out_features) {
  check_packed_arguments("GGUF packed gate/up kernel", x_in, packed, qtype, out_features);
  const int64_t groups = packed.size(0), nb = packed.size(1), tile = packed.size(2), M = x_in.size(0);
  const int64_t inter = out_features / 2;
  TORCH_CHECK(out_features % 96 == 0, "GGUF packed gate/up kernel: the gate and up halves must be multiples of 48 "
              "columns; got ", out_features, " output features");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, "GGUF packed gate/up kernel: x must be bfloat16");
  TORCH_CHECK(gguf_packed_amx_available(), "GGUF packed gate/up kernel: needs AMX-BF16, which this CPU lacks");
  const std::vector<int64_t> range = gguf_packed_silu_rows();
  TORCH_CHECK(M >= range[0] && M <= range[1], "GGUF packed gate/up kernel: takes ", range[0], " to ", range[1],
              " rows; got ", M);
  at::Tensor out = at::empty({M, inter}, at::kBFloat16);
#ifdef GGUF_X86
  const at::Tensor x = rows_in_blocks_of_16(x_in);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, inter / kWideCols, 1, [&](int64_t t0, int64_t t1) {
    with_format(qtype, [&](auto fmt) {
      amx_chunked_silu_triples<decltype(fmt)::value>(src, groups, nb, tile, inter, xp, M, op, t0, t1);
    });
  });
#endif
  return out;
}

bool gguf_packed_int8_available() {
#ifdef GGUF_X86
  return cpu_has_avx512_vnni();
#else
  return false;
#endif
}

#ifdef GGUF_X86
namespace {

// The body of both integer entry points: x as T rows (integer_rows), each thread's groups spread into a buffer that
// every activation row of a chunk of `chunk_rows` reuses (spread_group_vnni for int8 rows and for 16-bit ones on the
// tiles, spread_group_i16 for 16-bit ones on vpdpwssd, spread_group_q8_0_bytes for Q8_0 on the tiles), then
// vnni_group eight rows at a time or, with `amx`, amx_integer_group sixteen at a time (16-bit rows split into their
// byte planes first), into out [M, N] float32. Q8_0 comes here only with 16-bit rows (the int8 entry refuses it).
template <typename T>
void integer_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype, int64_t chunk_rows, bool amx,
                    at::Tensor& out) {
  const int64_t groups = packed.size(0), nb = packed.size(1), K = 32 * nb, tile = packed.size(2), M = out.size(0),
                N = out.size(1), padded = amx ? (M + 15) / 16 * 16 : M;
  const IntegerRows<T> rows = integer_rows<T>(x_in, nb, padded);
  const T* q = rows.values.get();
  const float *da = rows.scales.get(), *sa = rows.m_factors.get();
  // the tiles' byte operands: int8 rows as they are, 16-bit rows as two planes
  constexpr bool kPlanes = std::is_same_v<T, int16_t>;
  AlignedBuffer<int8_t> high;
  AlignedBuffer<uint8_t> low;
  const int8_t* a_hi = reinterpret_cast<const int8_t*>(q);
  if (amx && kPlanes) {
    high = uninitialized<int8_t>(padded * K);
    low = uninitialized<uint8_t>(padded * K);
    at::parallel_for(0, padded, 16, [&](int64_t r0, int64_t r1) {
      split_byte_planes(reinterpret_cast<const int16_t*>(q) + r0 * K, (r1 - r0) * K, high.get() + r0 * K,
                        low.get() + r0 * K);
    });
    a_hi = high.get();
  }
  const uint8_t* a_lo = low.get();
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    constexpr int64_t kSpreadWords = 16 * VnniDot<T>::kOperands;  // int32 words a block's spread takes, at most
    const AlignedBuffer<int32_t> w = uninitialized<int32_t>(kSpreadWords * nb);
    const AlignedBuffer<float> dv = uninitialized<float>(16 * nb), mv = uninitialized<float>(16 * nb);
    if (amx) amx_integer_configure();
    with_format(qtype, [&](auto fmt) {
      constexpr int kFmt = decltype(fmt)::value;
      if constexpr (std::is_same_v<T, int8_t> && kFmt == kQ8_0) {
        return;  // refused by gguf_packed_linear_int8
      } else {
        for (int64_t r0 = 0; r0 < M; r0 += chunk_rows) {
          const int64_t r1 = std::min(M, r0 + chunk_rows);
          for (int64_t g = g0; g < g1; ++g) {
            const uint8_t* group = src + g * nb * tile;
            const int64_t cols = std::min(kGroupCols, N - g * kGroupCols);
            float* y = op + g * kGroupCols;
            if (amx || std::is_same_v<T, int8_t>) {  // byte lines: vpdpbusd operands and B-tile rows alike
              if constexpr (kFmt == kQ8_0) {
                spread_group_q8_0_bytes(group, nb, tile, w.get(), dv.get(), mv.get());
              } else {
                spread_group_vnni<kFmt>(group, nb, tile, w.get(), dv.get(), mv.get());
              }
            } else {
              spread_group_i16<kFmt>(group, nb, tile, w.get(), dv.get(), mv.get());
            }
            if (amx) {
              for (int64_t m = r0; m < r1; m += 16) {
                amx_integer_group<kFmt, kPlanes>(w.get(), dv.get(), mv.get(), nb, a_hi + m * K, a_lo + m * K, K,
                                                 da + m * nb, sa + m * nb, std::min<int64_t>(16, r1 - m), y + m * N,
                                                 N, cols);
              }
              continue;
            }
            for (int64_t m = r0; m < r1; m += 8) {
              by_block_rows(std::min<int64_t>(8, r1 - m), [&](auto mr) {
                vnni_group<kFmt, decltype(mr)::value>(w.get(), dv.get(), mv.get(), nb, q + m * K, K, da + m * nb,
                                                      sa + m * nb, y + m * N, N, cols);
              });
            }
          }
        }
      }
    });
    if (amx) amx_integer_release();
  });
}

// The fewest rows the integer entry points put on the tiles by default: a tile holds 16 rows, and fewer pay for the
// padding. On a 2-core Xeon with AMX (2026-12-05, benchmarks/cpu_gguf_paths.py, ms a step of the default model's GGUF
// layers, two threads), 16-bit rows on VNNI / on the tiles: 5.39 / 7.68 at 1 row, 8.92 / 9.28 at 8, 10.13 / 9.58 at
// 9, 13.69 / 11.64 at 16, 42.43 / 35.94 at 64, 597.8 / 502.5 at 1,024; int8 rows 4.84 / 6.17 at 1, 7.78 / 7.88 at
// 8, 9.14 / 8.92 at 9, 27.77 / 23.62 at 64.
constexpr int64_t kAmxIntegerMinRows = 9;

// Whether an integer entry point's `isa` ('' the best this CPU has for M rows, 'vnni' or 'amx_int8') runs on the
// tiles.
bool integer_products_on_tiles(const char* what, const std::string& isa, int64_t M) {
  if (isa == "amx_int8") {
    TORCH_CHECK(cpu_has_amx_int8(), what, ": isa='amx_int8' needs AMX-INT8 (and the kernel's permission to use the "
                "tiles), which this CPU lacks");
    return true;
  }
  TORCH_CHECK(isa.empty() || isa == "vnni", what, ": unknown isa '", isa, "' (choose '', 'vnni' or 'amx_int8')");
  return isa.empty() && M >= kAmxIntegerMinRows && cpu_has_amx_int8();
}

}  // namespace
#endif

at::Tensor gguf_packed_linear_int8(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype,
                                   int64_t out_features, const std::string& isa) {
  check_packed_arguments("GGUF packed int8 kernel", x_in, packed, qtype, out_features);
  TORCH_CHECK(qtype != kQ8_0, "GGUF packed int8 kernel: Q4_0 and Q4_1 only (Q8_0 = 8 runs gguf_packed_linear)");
  TORCH_CHECK(gguf_packed_int8_available(), "GGUF packed int8 kernel: needs AVX512F/BW/VL/DQ and AVX512_VNNI, which "
              "this CPU lacks");
  const int64_t M = x_in.size(0);
  at::Tensor out = at::empty({M, out_features}, at::kFloat);
#ifdef GGUF_X86
  const bool amx = integer_products_on_tiles("GGUF packed int8 kernel", isa, M);
  if (M == 0) return out;
  integer_linear<int8_t>(x_in, packed, qtype, M, amx, out);  // every row in one chunk: each group spread once a call
#endif
  return out;
}

at::Tensor gguf_packed_linear_i16(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype,
                                  int64_t out_features, const std::string& isa) {
  check_packed_arguments("GGUF packed int16 kernel", x_in, packed, qtype, out_features);
  TORCH_CHECK(gguf_packed_int8_available(), "GGUF packed int16 kernel: needs AVX512F/BW/VL/DQ and AVX512_VNNI, which "
              "this CPU lacks");
  const int64_t M = x_in.size(0);
  at::Tensor out = at::empty({M, out_features}, at::kFloat);
#ifdef GGUF_X86
  const bool amx = integer_products_on_tiles("GGUF packed int16 kernel", isa, M);
  if (M == 0) return out;
  // Rows in chunks whose 16-bit activations stay in a 1 MiB L2 (about 256 KB of them); each chunk spreads the
  // group's codes again (a few instructions a weight, against 16 products a row). Whole blocks of 16 on the tiles.
  const int64_t K = 32 * packed.size(1), rows_per_chunk = (int64_t{256} << 10) / (2 * K);
  const int64_t chunk_rows = amx ? std::max<int64_t>(16, rows_per_chunk / 16 * 16)
                                 : std::max<int64_t>(8, rows_per_chunk / 8 * 8);
  integer_linear<int16_t>(x_in, packed, qtype, chunk_rows, amx, out);
#endif
  return out;
}

bool gguf_packed_amx_int8_available() {
#ifdef GGUF_X86
  return cpu_has_amx_int8();
#else
  return false;
#endif
}

at::Tensor gguf_packed_dequantize_kn(const at::Tensor& packed, int64_t qtype, int64_t out_features,
                                     at::ScalarType dtype) {
  check_packed_arguments("GGUF packed de-quantization", at::empty({0, 32 * packed.size(1)}), packed, qtype,
                         out_features);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "GGUF packed de-quantization: float32 or bfloat16 out");
  TORCH_CHECK(gguf_packed_available(), "GGUF packed de-quantization: the wide16 layout needs AVX512F/BW/VL/DQ, which "
              "this CPU lacks");
  const bool bf16 = dtype == at::kBFloat16;
  TORCH_CHECK(!bf16 || cpu_has_avx512_bf16(), "GGUF packed de-quantization: bfloat16 output needs AVX512_BF16, which "
              "this CPU lacks");
  const int64_t groups = packed.size(0), nb = packed.size(1), tile = packed.size(2), N = out_features;
  at::Tensor wt = at::empty({32 * nb, N}, dtype);
#ifdef GGUF_X86
  const uint8_t* src = packed.data_ptr<uint8_t>();
  void* dst = wt.data_ptr();
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    with_format(qtype, [&](auto fmt) {
      constexpr int kFmt = decltype(fmt)::value;
      bf16 ? dequantize_kn_bf16<kFmt>(src, nb, tile, N, g0, g1, dst) : dequantize_kn_f32<kFmt>(src, nb, tile, N, g0, g1, dst);
    });
  });
#endif
  return wt;
}

at::Tensor gguf_packed_rows_q8_0(const at::Tensor& packed, const at::Tensor& ids, int64_t num_rows) {
  check_packed_arguments("GGUF packed row lookup", at::empty({0, 32 * packed.size(1)}), packed, kQ8_0, num_rows);
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 1,
              "GGUF packed row lookup: ids must be a 1-D CPU int64 tensor");
  const at::Tensor idc = ids.contiguous();
  const int64_t count = idc.numel(), nb = packed.size(1), K = 32 * nb, tile_size = packed.size(2);
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < count; ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < num_rows, "GGUF packed row lookup: id ", id[t], " is out of range for ",
                num_rows, " rows");
  }
  at::Tensor out = at::empty({count, K}, at::kFloat);
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  // Row c of group g: its block b's scale is the half at bytes 2c, 2c + 1 of tile (g, b), the code of k = 2p + h
  // the signed byte at 32 + 32p + 16h + c (the layout above); the value is the float32 product q * d, as
  // gguf_blocks._q8_0 computes it from the file's block.
  at::parallel_for(0, count, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = id[t] / kGroupCols, c = id[t] % kGroupCols;
      float* row = dst + t * K;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tile = src + (g * nb + b) * tile_size;
        uint16_t half_bits;
        std::memcpy(&half_bits, tile + 2 * c, sizeof(half_bits));
        const float d = static_cast<float>(c10::Half(half_bits, c10::Half::from_bits()));
        for (int64_t k = 0; k < 32; ++k) {
          const int8_t q = static_cast<int8_t>(tile[32 + 32 * (k / 2) + 16 * (k % 2) + c]);
          row[32 * b + k] = static_cast<float>(q) * d;
        }
      }
    }
  });
  return out;
}
