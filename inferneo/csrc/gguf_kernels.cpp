// GGUF block formats on CPU: de-quantize ggml blocks and multiply activations by them without a full-width copy.
//
// Formats (ggml type id): Q4_0 (2), Q4_1 (3), Q8_0 (8), Q4_K (12), Q5_K (13), Q6_K (14); the block layouts are
// described in inferneo/quantization/gguf_blocks.py. De-quantization does the reference's float32 operations in
// the reference's order (the file is built with -ffp-contract=off), so its values equal gguf.quants.dequantize.
//
// gguf_linear(x [M, K] float32 or bfloat16, blocks uint8 [N, row_bytes]) -> float32 [M, N]:
//  - up to `inreg_max_rows` rows (Q4_0, Q4_1, Q8_0: decode steps of a few requests; by default 12 with AVX2
//    panels, where it stopped winning on a Zen 3, 8 / 5 with the AVX-512 float32 / bfloat16 panels, measured on a
//    Zen 5): each 32-weight block is de-quantized into registers and multiplied straight into up to 8 activation
//    rows at a time;
//  - from `panel_min_rows` rows (by default the row after those): at::parallel_for over groups of weight rows, each
//    de-quantized once and transposed into a panel that a register-blocked kernel multiplies into every activation
//    row: on AVX-512 CPUs groups of 48 rows in [K][48] panels (16-lane FMAs; with bfloat16 activations and
//    AVX512_BF16, bfloat16 pairs and dot products), else groups of 16 rows in [K][16] panels with a 6 x 16 AVX2
//    kernel (on a Zen 3, one thread, the default model's step: 1.07-1.13x the two paths below at 16 rows, 1.2x at
//    64-256, 1.37x at 1,024); `isa` forces one ("avx2", "avx512", "avx512_bf16"; "" = the best the CPU has);
//  - up to `fused_max_rows` rows (K-quants below `panel_min_rows`, or `panel_min_rows` raised): groups of 16
//    weight rows; each 512-wide K chunk of a group is de-quantized once into a buffer and multiplied into every
//    activation row by register-blocked 4 x 3 panels of 8-wide FMAs (AVX2);
//  - more rows, or no AVX2: tiles of weight rows are de-quantized (in parallel) and multiplied with at::mm.
// The AVX2 and AVX-512 paths are chosen at run time from the CPU's features (their functions carry their own
// target attributes); portable loops otherwise.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "aligned_buffer.h"
#include "gguf_wide_panels.h"

namespace {

using inferneo_buffers::AlignedBuffer;
using inferneo_buffers::zeroed;
#ifdef GGUF_X86
using namespace gguf_wide;
#endif

constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;

struct Format {
  int block;  // weights per block
  int bytes;  // bytes per block
};

Format format_of(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: TORCH_CHECK(false, "GGUF kernels: ggml type ", qtype, " is not supported (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)");
  }
}

inline uint16_t read_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// IEEE half -> float (exact).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      exp = 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        --exp;
      }
      bits = sign | ((exp + 112) << 23) | ((mant & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_at(const uint8_t* p) { return half_to_float(read_u16(p)); }

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K block (12 packed bytes).
inline void k_scale_min(int j, const uint8_t* s, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ---- portable de-quantization of one block -------------------------------------------------------------------

void deq_q4_0(const uint8_t* b, float* out) {
  const float d = f16_at(b);
  for (int j = 0; j < 16; ++j) {
    out[j] = d * static_cast<float>((b[2 + j] & 15) - 8);
    out[j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
  }
}

void deq_q4_1(const uint8_t* b, float* out) {
  const float d = f16_at(b), m = f16_at(b + 2);
  for (int j = 0; j < 16; ++j) {
    out[j] = d * static_cast<float>(b[4 + j] & 15) + m;
    out[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
  }
}

void deq_q8_0(const uint8_t* b, float* out) {
  const float d = f16_at(b);
  for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

template <bool kFifthBit>
void deq_k(const uint8_t* b, float* out) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + (kFifthBit ? 48 : 16);
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    k_scale_min(j, scales, sc, mn);
    const float scale = d * static_cast<float>(sc), min = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int i = 0; i < 32; ++i) {
      int v = (q[i] >> shift) & 15;
      if (kFifthBit) v |= ((qh[i] >> j) & 1) << 4;
      out[32 * j + i] = scale * static_cast<float>(v) - min;
    }
  }
}

void deq_q6_k(const uint8_t* b, float* out) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, r = e % 128;
    const int low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
    const int high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
    out[e] = (d * static_cast<float>(sc[e / 16])) * static_cast<float>((low | (high << 4)) - 32);
  }
}

using DequantFn = void (*)(const uint8_t*, float*);

DequantFn portable_dequant(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return deq_q4_0;
    case kQ4_1: return deq_q4_1;
    case kQ8_0: return deq_q8_0;
    case kQ4_K: return deq_k<false>;
    case kQ5_K: return deq_k<true>;
    default: return deq_q6_k;
  }
}

// ---- AVX2 de-quantization of one block -----------------------------------------------------------------------
#ifdef GGUF_X86

GGUF_AVX2 inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
GGUF_AVX2 inline __m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// A block's half-precision scale, converted by F16C (exact, as half_to_float): the software conversion's dozen
// dependent integer operations per scale were a fifth of the panel building time on a Zen 5.
GGUF_AVX2 inline __m256 f16_splat(const uint8_t* p) {
  return _mm256_set1_ps(_cvtsh_ss(read_u16(p)));
}

// 16 unsigned bytes -> out[0..15] = scale * v - min (two roundings, as the reference)
GGUF_AVX2 inline void store16_affine(__m128i v, __m256 scale, __m256 min, float* out) {
  _mm256_storeu_ps(out, _mm256_sub_ps(_mm256_mul_ps(scale, u8x8(v)), min));
  _mm256_storeu_ps(out + 8, _mm256_sub_ps(_mm256_mul_ps(scale, u8x8(_mm_srli_si128(v, 8))), min));
}

// One block of Q4_0 / Q4_1 / Q8_0 as four registers of 8 weights (k = 0..7, 8..15, 16..23, 24..31), each value
// computed as the reference computes it (two roundings where it has two).
GGUF_AVX2 inline void q4_0_values(const uint8_t* b, __m256 v[4]) {
  const __m256 d = f16_splat(b), eight = _mm256_set1_ps(8.0f);
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
  const __m128i halves[2] = {_mm_and_si128(raw, mask), _mm_and_si128(_mm_srli_epi16(raw, 4), mask)};
  for (int h = 0; h < 2; ++h) {
    v[2 * h] = _mm256_mul_ps(d, _mm256_sub_ps(u8x8(halves[h]), eight));
    v[2 * h + 1] = _mm256_mul_ps(d, _mm256_sub_ps(u8x8(_mm_srli_si128(halves[h], 8)), eight));
  }
}

GGUF_AVX2 inline void q4_1_values(const uint8_t* b, __m256 v[4]) {
  const __m256 d = f16_splat(b), m = f16_splat(b + 2);
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
  const __m128i halves[2] = {_mm_and_si128(raw, mask), _mm_and_si128(_mm_srli_epi16(raw, 4), mask)};
  for (int h = 0; h < 2; ++h) {
    v[2 * h] = _mm256_add_ps(_mm256_mul_ps(d, u8x8(halves[h])), m);
    v[2 * h + 1] = _mm256_add_ps(_mm256_mul_ps(d, u8x8(_mm_srli_si128(halves[h], 8))), m);
  }
}

GGUF_AVX2 inline void q8_0_values(const uint8_t* b, __m256 v[4]) {
  const __m256 d = f16_splat(b);
  for (int i = 0; i < 2; ++i) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * i));
    v[2 * i] = _mm256_mul_ps(i8x8(raw), d);
    v[2 * i + 1] = _mm256_mul_ps(i8x8(_mm_srli_si128(raw, 8)), d);
  }
}

template <void (*kValues)(const uint8_t*, __m256*)>
GGUF_AVX2 void deq_values_avx2(const uint8_t* b, float* out) {
  __m256 v[4];
  kValues(b, v);
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + 8 * i, v[i]);
}

template <bool kFifthBit>
GGUF_AVX2 void deq_k_avx2(const uint8_t* b, float* out) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + (kFifthBit ? 48 : 16);
  const __m256i mask = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  const __m256i qh = kFifthBit ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
  for (int g = 0; g < 4; ++g) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * g));
    for (int half = 0; half < 2; ++half) {
      const int j = 2 * g + half;
      __m256i q = half ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask) : _mm256_and_si256(raw, mask);
      if (kFifthBit) q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), one), 4));
      int sc, mn;
      k_scale_min(j, scales, sc, mn);
      const __m256 scale = _mm256_set1_ps(d * static_cast<float>(sc)), min = _mm256_set1_ps(dmin * static_cast<float>(mn));
      store16_affine(_mm256_castsi256_si128(q), scale, min, out + 32 * j);
      store16_affine(_mm256_extracti128_si256(q, 1), scale, min, out + 32 * j + 16);
    }
  }
}

GGUF_AVX2 void deq_q6_k_avx2(const uint8_t* b, float* out) {
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  const __m256i mask = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
  for (int h = 0; h < 2; ++h) {
    const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h));
    const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
    const __m256i lows[4] = {_mm256_and_si256(ql0, mask), _mm256_and_si256(ql1, mask),
                             _mm256_and_si256(_mm256_srli_epi16(ql0, 4), mask),
                             _mm256_and_si256(_mm256_srli_epi16(ql1, 4), mask)};
    for (int t = 0; t < 4; ++t) {
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * t), three);
      const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lows[t], _mm256_slli_epi16(high, 4)), bias);
      const int e = 128 * h + 32 * t;  // 32 weights: two groups of 16 with their own scale
      const __m128i parts[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
      for (int p = 0; p < 2; ++p) {
        const __m256 scale = _mm256_set1_ps(d * static_cast<float>(sc[(e + 16 * p) / 16]));
        _mm256_storeu_ps(out + e + 16 * p, _mm256_mul_ps(scale, i8x8(parts[p])));
        _mm256_storeu_ps(out + e + 16 * p + 8, _mm256_mul_ps(scale, i8x8(_mm_srli_si128(parts[p], 8))));
      }
    }
  }
}

DequantFn avx2_dequant(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return deq_values_avx2<q4_0_values>;
    case kQ4_1: return deq_values_avx2<q4_1_values>;
    case kQ8_0: return deq_values_avx2<q8_0_values>;
    case kQ4_K: return deq_k_avx2<false>;
    case kQ5_K: return deq_k_avx2<true>;
    default: return deq_q6_k_avx2;
  }
}

// Register-blocked product of NR de-quantized weight rows (w, row stride ldw) and MR activation rows (x, row
// stride ldx) over kc columns: 8-wide FMAs into NR x MR accumulators, horizontal sums into out (stored, or added
// when `accumulate`: the K chunks after the first).
template <int NR, int MR>
GGUF_AVX2 void panel_avx2(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t kc, float* out,
                          int64_t ldo, bool accumulate) {
  __m256 acc[NR][MR];
  for (int n = 0; n < NR; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm256_loadu_ps(w + n * ldw + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int n = 0; n < NR; ++n) acc[n][m] = _mm256_fmadd_ps(wv[n], xv, acc[n][m]);
    }
  }
  for (int n = 0; n < NR; ++n) {
    for (int m = 0; m < MR; ++m) {
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[n][m]), _mm256_extractf128_ps(acc[n][m], 1));
      const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
      const float v = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
      float& o = out[m * ldo + n];
      o = accumulate ? o + v : v;
    }
  }
}

// All M activation rows against `rows` (<= kGroupRows) de-quantized weight rows of one K chunk.
template <int NR>
GGUF_AVX2 void panels_for_rows_avx2(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t M,
                                    int64_t kc, float* out, int64_t ldo, bool accumulate) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) panel_avx2<NR, 3>(w, ldw, x + m * ldx, ldx, kc, out + m * ldo, ldo, accumulate);
  if (M - m == 2) panel_avx2<NR, 2>(w, ldw, x + m * ldx, ldx, kc, out + m * ldo, ldo, accumulate);
  if (M - m == 1) panel_avx2<NR, 1>(w, ldw, x + m * ldx, ldx, kc, out + m * ldo, ldo, accumulate);
}

GGUF_AVX2 void group_avx2(const float* w, int64_t ldw, int64_t rows, const float* x, int64_t ldx, int64_t M,
                          int64_t kc, float* out, int64_t ldo, bool accumulate) {
  int64_t n = 0;
  for (; n + 4 <= rows; n += 4) panels_for_rows_avx2<4>(w + n * ldw, ldw, x, ldx, M, kc, out + n, ldo, accumulate);
  for (; n < rows; ++n) panels_for_rows_avx2<1>(w + n * ldw, ldw, x, ldx, M, kc, out + n, ldo, accumulate);
}

// ---- many activation rows: 16 weight rows at a time, de-quantized into a [K][16] panel -------------------------
//
// The weights' layout that a register-blocked GEMM wants (as the AVX2 panel kernel of cpu_kernels.cpp reads it):
// for each k the 16 weights of the group's rows side by side, one 64-byte line, the next k on the next line. A
// group's rows are de-quantized into a row-major buffer (the reference's values), transposed in 8 x 8 tiles into
// that panel, and every block of up to 6 activation rows multiplies it with 12 accumulators: per k two weight loads,
// six broadcasts and twelve FMAs, with no horizontal sums. Each weight is de-quantized once per call and used by
// all M rows; sums run over k in order (as the panel kernel's).
constexpr int64_t kPanelCols = 16;

// src [8 rows][ld] from column k0: 8 x 8 floats transposed into dst[(k0 + i) * kCols + c0 + r].
template <int64_t kCols = kPanelCols>
GGUF_AVX2 inline void transpose8x8_into_panel(const float* src, int64_t ld, float* dst) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * kCols, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * kCols, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * kCols, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * kCols, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * kCols, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * kCols, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * kCols, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * kCols, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// rows [16][K] (row-major, K a multiple of 8) -> panel [K][16]
GGUF_AVX2 void transpose_into_panel(const float* rows, int64_t K, float* panel) {
  for (int64_t k = 0; k < K; k += 8) {
    transpose8x8_into_panel(rows + k, K, panel + k * kPanelCols);
    transpose8x8_into_panel(rows + 8 * K + k, K, panel + k * kPanelCols + 8);
  }
}

// Rows [0, MR) of x times the panel: y[r][0 .. cols) (cols <= 16 real columns).
template <int MR>
GGUF_AVX2 void panel_rows_avx2(const float* x, int64_t ldx, const float* panel, int64_t K, float* y, int64_t ldy,
                               int64_t cols) {
  // `#pragma GCC unroll` keeps the accumulators in registers (see the panel kernel in cpu_kernels.cpp).
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* xr[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) xr[r] = x + r * ldx;
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kPanelCols) {
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(xr[r]++);
      acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    if (cols == kPanelCols) {
      _mm256_storeu_ps(y + r * ldy, acc[r][0]);
      _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    } else {
      alignas(32) float tmp[kPanelCols];
      _mm256_store_ps(tmp, acc[r][0]);
      _mm256_store_ps(tmp + 8, acc[r][1]);
      std::memcpy(y + r * ldy, tmp, cols * sizeof(float));
    }
  }
}

// Rows [0, rows) (at most 6) of x times one panel.
GGUF_AVX2 void panel_block_avx2(int64_t rows, const float* x, int64_t ldx, const float* panel, int64_t K, float* y,
                                int64_t ldy, int64_t cols) {
  switch (rows) {
    case 6: panel_rows_avx2<6>(x, ldx, panel, K, y, ldy, cols); break;
    case 5: panel_rows_avx2<5>(x, ldx, panel, K, y, ldy, cols); break;
    case 4: panel_rows_avx2<4>(x, ldx, panel, K, y, ldy, cols); break;
    case 3: panel_rows_avx2<3>(x, ldx, panel, K, y, ldy, cols); break;
    case 2: panel_rows_avx2<2>(x, ldx, panel, K, y, ldy, cols); break;
    default: panel_rows_avx2<1>(x, ldx, panel, K, y, ldy, cols); break;
  }
}

void dequant_rows(const uint8_t* blocks, int64_t row_bytes, int64_t r0, int64_t r1, Format f, DequantFn deq,
                  int64_t nblocks, float* out, int64_t ldo);

// Groups [g0, g1) of 16 weight rows times all M activation rows. The groups go in chunks whose panels fit in about
// 256 KB (L2): a chunk's rows are de-quantized and transposed, then each block of 6 activation rows multiplies
// every panel of the chunk while it sits in L1, so a long prompt's rows are read from L3 once per chunk rather
// than once per 16 output columns (on a Zen 3 core the single-panel loop fell from 73 GFLOP/s at 256 rows to
// 52-55 at 1,024-2,048).
GGUF_AVX2 void panel_groups_avx2(const uint8_t* src, int64_t row_bytes, Format f, DequantFn deq, int64_t nblocks,
                                 int64_t N, int64_t K, const float* x, int64_t M, float* out, int64_t g0, int64_t g1) {
  const int64_t panel_floats = kPanelCols * K;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(8, (int64_t{256} << 10) / (panel_floats * 4)));
  const AlignedBuffer<float> rows_buf = zeroed<float>(panel_floats), panels = zeroed<float>(chunk * panel_floats);
  for (int64_t c0 = g0; c0 < g1; c0 += chunk) {
    const int64_t groups = std::min(chunk, g1 - c0);
    for (int64_t i = 0; i < groups; ++i) {
      const int64_t r0 = (c0 + i) * kPanelCols, rows = std::min(kPanelCols, N - r0);
      dequant_rows(src + r0 * row_bytes, row_bytes, 0, rows, f, deq, nblocks, rows_buf.get(), K);
      if (rows < kPanelCols) std::fill(rows_buf.get() + rows * K, rows_buf.get() + panel_floats, 0.0f);
      transpose_into_panel(rows_buf.get(), K, panels.get() + i * panel_floats);
    }
    for (int64_t m = 0; m < M; m += 6) {
      const int64_t block_rows = std::min<int64_t>(6, M - m);
      for (int64_t i = 0; i < groups; ++i) {
        const int64_t r0 = (c0 + i) * kPanelCols;
        panel_block_avx2(block_rows, x + m * K, K, panels.get() + i * panel_floats, K, out + m * N + r0, N,
                         std::min(kPanelCols, N - r0));
      }
    }
  }
}

// ---- many activation rows on AVX-512: 48 weight rows at a time, [K][48] panels ---------------------------------
//
// The same scheme as the [K][16] panels above, with 16-lane registers: a group of 48 weight rows is de-quantized
// (the reference's values), transposed into a [K][48] panel (three 64-byte lines per k), and every block of up to
// 8 activation rows multiplies it with 24 accumulators: per k three weight loads, eight broadcasts and 24 FMAs.
// With bfloat16 activations on a CPU with AVX512_BF16 the panel is rounded to bfloat16 (nearest even) and stored
// as pairs of consecutive k per column ([K/2][48][2], the operand layout of the bfloat16 dot product, as the
// panel kernel of cpu_kernels.cpp holds bfloat16 weights), so each instruction does two products per lane.
// On CPUs that execute 512-bit FMAs at full width (Zen 5, Intel server cores) this doubles the AVX2 panel's
// arithmetic rate; float32 sums run over k in order, bfloat16 ones over pairs of k in order.

// rows [48][K] (row-major, K a multiple of 8) -> panel [K][48]
GGUF_AVX2 void transpose_into_wide_panel(const float* rows, int64_t K, float* panel) {
  for (int64_t k = 0; k < K; k += 8) {
    for (int64_t c0 = 0; c0 < kWideCols; c0 += 8) {
      transpose8x8_into_panel<kWideCols>(rows + c0 * K + k, K, panel + k * kWideCols + c0);
    }
  }
}

// float32 panel [K][48] -> bfloat16 pairs [K/2][48] (lane c of step s: w[2s][c] in the low half, w[2s + 1][c] in
// the high half), each value rounded to nearest even.
GGUF_AVX512BF16 void pack_wide_panel_bf16(const float* panel, int64_t K, uint32_t* pairs) {
  for (int64_t s = 0; s < K / 2; ++s) {
    for (int j = 0; j < 3; ++j) {
      const __m512 lo = _mm512_loadu_ps(panel + 2 * s * kWideCols + 16 * j);
      const __m512 hi = _mm512_loadu_ps(panel + (2 * s + 1) * kWideCols + 16 * j);
      const __m512i lo32 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
      const __m512i hi32 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
      _mm512_storeu_si512(pairs + s * kWideCols + 16 * j, _mm512_or_si512(lo32, _mm512_slli_epi32(hi32, 16)));
    }
  }
}

// A group's panel built straight from the blocks (Q4_0, Q4_1, Q8_0: 32-weight blocks): for each block and each
// 16 of the group's rows, the 16 rows' values (as q*_values computes them) are transposed in registers and stored
// as the panel's lines, with no row-major buffer and no second pass; the bfloat16 panel takes each row's block as
// 32 bfloat16 values, which are 16 pairs of consecutive k (its layout), so one 16 x 16 transpose of 32-bit lanes
// places them. (On a Zen 5 core the buffered route's de-quantization, transposition and packing took as long as
// the products at 64 rows.)

// The builders walk 16 rows' blocks side by side: more streams than a hardware prefetcher follows, so each row's
// block this many blocks ahead is prefetched by hand.
constexpr int64_t kPrefetchBlocks = 8;

// r[i] holds row i (16 lanes of 32 bits); afterwards r[c] holds column c.
GGUF_AVX512 inline void transpose16x16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + j]: in 128-bit lane L, column 4L + j of rows 4i .. 4i + 3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    r[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// One block's 32 values of a row as two 16-lane registers (k 0-15 and 16-31).
template <void (*kValues)(const uint8_t*, __m256*)>
GGUF_AVX512 inline void block_values16(const uint8_t* b, __m512& lo, __m512& hi) {
  __m256 v[4];
  kValues(b, v);
  lo = _mm512_insertf32x8(_mm512_castps256_ps512(v[0]), v[1], 1);
  hi = _mm512_insertf32x8(_mm512_castps256_ps512(v[2]), v[3], 1);
}

template <void (*kValues)(const uint8_t*, __m256*)>
GGUF_AVX512 void direct_wide_panel_f32(const uint8_t* src, int64_t row_bytes, int64_t block_bytes, int64_t rows,
                                       int64_t nblocks, void* out) {
  float* panel = static_cast<float*>(out);
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int64_t j = 0; j < kWideCols / 16; ++j) {
      __m512i lo[16], hi[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t n = 16 * j + i;
        __m512 l = _mm512_setzero_ps(), h = _mm512_setzero_ps();
        if (n < rows) {
          const uint8_t* blk = src + n * row_bytes + b * block_bytes;
          _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBlocks * block_bytes), _MM_HINT_T0);
          block_values16<kValues>(blk, l, h);
        }
        lo[i] = _mm512_castps_si512(l);
        hi[i] = _mm512_castps_si512(h);
      }
      transpose16x16(lo);
      transpose16x16(hi);
      float* dst = panel + 32 * b * kWideCols + 16 * j;
      for (int64_t c = 0; c < 16; ++c) {
        _mm512_storeu_si512(dst + c * kWideCols, lo[c]);
        _mm512_storeu_si512(dst + (16 + c) * kWideCols, hi[c]);
      }
    }
  }
}

template <void (*kValues)(const uint8_t*, __m256*)>
GGUF_AVX512BF16 void direct_wide_panel_bf16(const uint8_t* src, int64_t row_bytes, int64_t block_bytes, int64_t rows,
                                            int64_t nblocks, void* out) {
  uint32_t* pairs = static_cast<uint32_t*>(out);
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int64_t j = 0; j < kWideCols / 16; ++j) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t n = 16 * j + i;
        if (n < rows) {
          __m512 l, h;
          const uint8_t* blk = src + n * row_bytes + b * block_bytes;
          _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBlocks * block_bytes), _MM_HINT_T0);
          block_values16<kValues>(blk, l, h);
          r[i] = (__m512i)_mm512_cvtne2ps_pbh(h, l);  // k 0-15 in the low half: lane s = (w[2s], w[2s + 1])
        } else {
          r[i] = _mm512_setzero_si512();
        }
      }
      transpose16x16(r);
      uint32_t* dst = pairs + 16 * b * kWideCols + 16 * j;
      for (int64_t c = 0; c < 16; ++c) _mm512_storeu_si512(dst + c * kWideCols, r[c]);
    }
  }
}

// The direct builder of a format's panels (null: the K-quants, built through a row-major buffer).
using WideBuilder = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, void*);

WideBuilder wide_builder(int64_t qtype, bool bf16) {
  switch (qtype) {
    case kQ4_0: return bf16 ? direct_wide_panel_bf16<q4_0_values> : direct_wide_panel_f32<q4_0_values>;
    case kQ4_1: return bf16 ? direct_wide_panel_bf16<q4_1_values> : direct_wide_panel_f32<q4_1_values>;
    case kQ8_0: return bf16 ? direct_wide_panel_bf16<q8_0_values> : direct_wide_panel_f32<q8_0_values>;
    default: return nullptr;
  }
}

// Groups [g0, g1) of 48 weight rows times all M activation rows (float32 x, or bfloat16 x with kBf16), in chunks
// of groups whose panels fit in about 256 KB, as panel_groups_avx2 goes.
template <bool kBf16>
GGUF_AVX512 void wide_panel_groups(const uint8_t* src, int64_t row_bytes, Format f, DequantFn deq, WideBuilder direct,
                                   int64_t nblocks, int64_t N, int64_t K, const void* x, int64_t M, float* out,
                                   int64_t g0, int64_t g1) {
  const int64_t panel_floats = kWideCols * K;
  // a bfloat16 panel holds K / 2 pairs per column: half the floats' bytes
  const int64_t panel_words = kBf16 ? panel_floats / 2 : panel_floats;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(8, (int64_t{256} << 10) / (panel_words * 4)));
  const AlignedBuffer<float> rows_buf = zeroed<float>(direct ? 0 : panel_floats),
                             staging = zeroed<float>(kBf16 && !direct ? panel_floats : 0);
  const AlignedBuffer<uint32_t> panels = zeroed<uint32_t>(chunk * panel_words);
  for (int64_t c0 = g0; c0 < g1; c0 += chunk) {
    const int64_t groups = std::min(chunk, g1 - c0);
    for (int64_t i = 0; i < groups; ++i) {
      const int64_t r0 = (c0 + i) * kWideCols, rows = std::min(kWideCols, N - r0);
      uint32_t* panel = panels.get() + i * panel_words;
      if (direct) {
        direct(src + r0 * row_bytes, row_bytes, f.bytes, rows, nblocks, panel);
        continue;
      }
      dequant_rows(src + r0 * row_bytes, row_bytes, 0, rows, f, deq, nblocks, rows_buf.get(), K);
      if (rows < kWideCols) std::fill(rows_buf.get() + rows * K, rows_buf.get() + panel_floats, 0.0f);
      if constexpr (kBf16) {
        transpose_into_wide_panel(rows_buf.get(), K, staging.get());
        pack_wide_panel_bf16(staging.get(), K, panel);
      } else {
        transpose_into_wide_panel(rows_buf.get(), K, reinterpret_cast<float*>(panel));
      }
    }
    wide_panels_times_rows<kBf16>(panels.get(), groups, panel_words, c0 * kWideCols, x, M, K, N, out);
  }
}

// ---- few activation rows: weights de-quantized in registers (Q4_0, Q4_1, Q8_0) ---------------------------------
//
// At a handful of rows the buffered path above spends more on writing each de-quantized block to memory and
// reading it back than on the products. Here a block goes into four registers (the reference's values) and is
// multiplied straight into MR activation rows; with few rows each row keeps several accumulators (kChains), so that
// the four FMAs of a block into one row do not wait on each other (with 8 rows, the other rows' FMAs fill that
// latency). Sums run over k in order within each chain; the chains and lanes are added at the end.
template <void (*kValues)(const uint8_t*, __m256*), int MR>
GGUF_AVX2 void inreg_rows_avx2(const uint8_t* blocks, int64_t row_bytes, int64_t block_bytes, int64_t n0,
                               int64_t n1, int64_t nblocks, const float* x, int64_t ldx, float* out, int64_t ldo) {
  constexpr int kChains = MR <= 2 ? 4 : (MR <= 4 ? 2 : 1);
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MR][kChains];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < kChains; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    const uint8_t* row = blocks + n * row_bytes;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      __m256 v[4];
      kValues(row + blk * block_bytes, v);
      const float* xb = x + 32 * blk;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          acc[r][i % kChains] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xb + r * ldx + 8 * i), acc[r][i % kChains]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m256 sum = acc[r][0];
#pragma GCC unroll 4
      for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, acc[r][c]);
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      out[r * ldo + n] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
  }
}

// Weight rows [n0, n1) against all M activation rows, up to 8 at a time.
template <void (*kValues)(const uint8_t*, __m256*)>
GGUF_AVX2 void inreg_linear_avx2(const uint8_t* blocks, int64_t row_bytes, int64_t block_bytes, int64_t n0,
                                 int64_t n1, int64_t nblocks, const float* x, int64_t ldx, int64_t M, float* out,
                                 int64_t ldo) {
  for (int64_t m = 0; m < M; m += 8) {
    const float* xm = x + m * ldx;
    float* om = out + m * ldo;
    switch (std::min<int64_t>(8, M - m)) {
      case 8: inreg_rows_avx2<kValues, 8>(blocks, row_bytes, block_bytes, n0, n1, nblocks, xm, ldx, om, ldo); break;
      case 7: inreg_rows_avx2<kValues, 7>(blocks, row_bytes, block_bytes, n0, n1, nblocks, xm, ldx, om, ldo); break;
      case 6: inreg_rows_avx2<kValues, 6>(blocks, row_bytes, block_bytes, n0, n1, nblocks, xm, ldx, om, ldo); break;
      case 5: inreg_rows_avx2<kValues, 5>(blocks, row_bytes, block_bytes, n0, n1, nblocks, xm, ldx, om, ldo); break;
      case 4: inreg_rows_avx2<kValues, 4>(blocks, row_bytes, block_bytes, n0, n1, nblocks, xm, ldx, om, ldo); break;
      case 3: inreg_rows_avx2<kValues, 3>(blocks, row_bytes, block_bytes, n0, n1, nblocks, xm, ldx, om, ldo); break;
      case 2: inreg_rows_avx2<kValues, 2>(blocks, row_bytes, block_bytes, n0, n1, nblocks, xm, ldx, om, ldo); break;
      default: inreg_rows_avx2<kValues, 1>(blocks, row_bytes, block_bytes, n0, n1, nblocks, xm, ldx, om, ldo); break;
    }
  }
}

using InregFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                         float*, int64_t);

// The in-register kernel for a format, or null where it has none (the K-quants).
InregFn inreg_fn(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return inreg_linear_avx2<q4_0_values>;
    case kQ4_1: return inreg_linear_avx2<q4_1_values>;
    case kQ8_0: return inreg_linear_avx2<q8_0_values>;
    default: return nullptr;
  }
}
#endif  // GGUF_X86

bool use_avx2() {
#ifdef GGUF_X86
  return cpu_has_avx2();
#else
  return false;
#endif
}

bool cpu_has_avx512_kernels() {
#ifdef GGUF_X86
  return cpu_has_avx512();
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16_kernels() {
#ifdef GGUF_X86
  return cpu_has_avx512_bf16();
#else
  return false;
#endif
}

enum class PanelIsa { kNone, kAvx2, kAvx512, kAvx512Bf16 };

DequantFn dequant_fn(int64_t qtype) {
  format_of(qtype);  // checks the type
#ifdef GGUF_X86
  if (use_avx2()) return avx2_dequant(qtype);
#endif
  return portable_dequant(qtype);
}

void dot_rows_portable(const uint8_t* row, int64_t nblocks, Format f, DequantFn deq, const float* x, int64_t ldx,
                       int64_t rows, float* out, int64_t ldo, float* buf) {
  for (int64_t m = 0; m < rows; ++m) out[m * ldo] = 0.0f;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    deq(row + blk * f.bytes, buf);
    for (int64_t m = 0; m < rows; ++m) {
      const float* xb = x + m * ldx + blk * f.block;
      float s = 0.0f;
      for (int i = 0; i < f.block; ++i) s += buf[i] * xb[i];
      out[m * ldo] += s;
    }
  }
}

void check_blocks(const at::Tensor& blocks, Format f, int64_t in_features) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
                  blocks.is_contiguous(),
              "GGUF kernels: blocks must be a contiguous CPU uint8 [rows, row_bytes] tensor");
  TORCH_CHECK(in_features % f.block == 0 && blocks.size(1) == in_features / f.block * f.bytes,
              "GGUF kernels: rows of ", blocks.size(1), " bytes do not hold ", in_features, " weights");
}

// De-quantize rows [r0, r1) of `blocks` into out (row stride ldo).
void dequant_rows(const uint8_t* blocks, int64_t row_bytes, int64_t r0, int64_t r1, Format f, DequantFn deq,
                  int64_t nblocks, float* out, int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t blk = 0; blk < nblocks; ++blk) deq(blocks + r * row_bytes + blk * f.bytes, out + r * ldo + blk * f.block);
}


// ---- int8 dot products (Q4_0, Q4_1, Q8_0 weights x int8 activations) -------------------------------------------
//
// The activations are quantized per 32-weight block as llama.cpp's Q8 does: d = max|x| / 127, q = round(x / d)
// (nearest, ties to even; |q| <= 127), s = d * sum(q). Then for a weight block w = d_w * q_w + m_w:
//   dot = d_w * d_a * sum(q_w * q_a) + m_w * s_a
// with Q4_0 as q_w in 0..15 and m_w = -8 * d_w, Q8_0 as signed q_w and no min term. The integer sums are exact;
// the float part is one multiply of the scales and one or two FMAs per block.
//
// Weights are repacked per call, for a group of kI8Rows = 8 weight rows and a chunk of K, so that 32-bit lane j
// of a register belongs to weight row j ("interleaved"): Q4 chunks hold, per block, 8 registers of 4 unsigned
// bytes x 8 rows (elements 4k..4k+3 in register k); Q8_0 chunks hold, per block, 16 registers of 2 int16 x 8
// rows. One activation row then multiplies a register against its 4 (2) activation values broadcast to all
// lanes: vpmaddubsw (u8 x s8 -> int16 pairs; the 8 registers of a Q4 block add up in int16 without overflow:
// 8 * 2 * 15 * 127 < 32767) and one vpmaddwd with ones per block, or vpmaddwd on int16 for Q8_0, giving one int32
// lane per weight row, so the scales apply as 8-wide vectors. Each packed chunk is used by every activation row
// (4 rows at a time in registers). A VNNI path (vpdpbusd: u8 x s8 -> int32 in one instruction) would add its own
// q4_panel / q8_panel beside the AVX2 ones and be picked in int8_linear_avx2's dispatch.
#ifdef GGUF_X86
constexpr int64_t kI8Rows = 8;           // weight rows per group: one int32 / float lane each
constexpr int64_t kI8ChunkBlocks = 16;   // 32-weight blocks per packed K chunk (512 weights)
constexpr int64_t kI8MaxRows = 4;        // activation rows per register panel

struct QuantizedRows {
  const int8_t* q8 = nullptr;    // [M, K] int8 (Q4 formats)
  const int16_t* q16 = nullptr;  // [M, K] int16 (Q8_0)
  const float* d = nullptr;      // [M, nb] block scales
  const float* s = nullptr;      // [M, nb] d * sum(q)
  int64_t ld = 0, nb = 0;        // row strides of q and of d / s
};

// Quantize one row of K = 32 * nb floats (AVX2).
GGUF_AVX2 void quantize_row_avx2(const float* x, int64_t nb, int8_t* q8, int16_t* q16, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 32 * b;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float am = _mm_cvtss_f32(m4);
    const float db = am / 127.0f, id = am > 0.0f ? 127.0f / am : 0.0f;
    const __m256 idv = _mm256_set1_ps(id);
    __m256i qi[4];
    for (int i = 0; i < 4; ++i)
      qi[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    d[b] = db;
    s[b] = db * static_cast<float>(_mm_cvtsi128_si32(s4));
    const __m256i w01 = _mm256_packs_epi32(qi[0], qi[1]), w23 = _mm256_packs_epi32(qi[2], qi[3]);
    if (q16 != nullptr) {  // packs_epi32 interleaves the 128-bit lanes: put the quarters back in order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + 32 * b), _mm256_permute4x64_epi64(w01, 0xD8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + 32 * b + 16), _mm256_permute4x64_epi64(w23, 0xD8));
    }
    if (q8 != nullptr) {
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q8 + 32 * b), bytes);
    }
  }
}

// Transpose 8 x 8 32-bit lanes: out[k] lane j = in[j] lane k.
GGUF_AVX2 inline void transpose8x32(const __m256i in[8], __m256i* out) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(in[2 * i], in[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(in[2 * i], in[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, rows 4-7
    const __m256i* tt = t + 4 * h;
    u[4 * h + 0] = _mm256_unpacklo_epi64(tt[0], tt[2]);
    u[4 * h + 1] = _mm256_unpackhi_epi64(tt[0], tt[2]);
    u[4 * h + 2] = _mm256_unpacklo_epi64(tt[1], tt[3]);
    u[4 * h + 3] = _mm256_unpackhi_epi64(tt[1], tt[3]);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_si256(out + k, _mm256_permute2x128_si256(u[k], u[4 + k], 0x20));
    _mm256_storeu_si256(out + 4 + k, _mm256_permute2x128_si256(u[k], u[4 + k], 0x31));
  }
}

// Pack blocks [b0, b0 + nb) of weight rows [0, rows) (rows <= 8; missing rows are zeros) of a Q4_0 / Q4_1 / Q8_0
// matrix: packed registers, and the rows' scales dw / mins mw as [nb][8] floats.
GGUF_AVX2 void pack_group_avx2(const uint8_t* src, int64_t row_bytes, int64_t rows, int64_t qtype, int64_t b0,
                               int64_t nb, __m256i* packed, float* dw, float* mw) {
  const Format f = format_of(qtype);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v[8], v2[8];
    for (int64_t j = 0; j < kI8Rows; ++j) {
      if (j >= rows) {
        v[j] = v2[j] = _mm256_setzero_si256();
        dw[8 * b + j] = mw[8 * b + j] = 0.0f;
        continue;
      }
      const uint8_t* blk = src + j * row_bytes + (b0 + b) * f.bytes;
      const float d = f16_at(blk);
      dw[8 * b + j] = d;
      if (qtype == kQ8_0) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        v[j] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw));
        v2[j] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
        mw[8 * b + j] = 0.0f;
      } else {
        const int off = qtype == kQ4_1 ? 4 : 2;
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + off));
        v[j] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
        mw[8 * b + j] = qtype == kQ4_1 ? f16_at(blk + 2) : -8.0f * d;
      }
    }
    if (qtype == kQ8_0) {
      transpose8x32(v, packed + 16 * b);
      transpose8x32(v2, packed + 16 * b + 8);
    } else {
      transpose8x32(v, packed + 8 * b);
    }
  }
}

GGUF_AVX2 inline __m256i bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// MR activation rows (from row m0) x one packed Q4 chunk of nb blocks (activation blocks a0 ...): acc[i] lane j +=
// the chunk's dot of activation row m0 + i with weight row j.
template <int MR>
GGUF_AVX2 void q4_panel(const __m256i* packed, const float* dw, const float* mw, const QuantizedRows& a, int64_t m0,
                        int64_t a0, int64_t nb, __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i s[MR];
    for (int i = 0; i < MR; ++i) s[i] = _mm256_setzero_si256();
    const int8_t* qa = a.q8 + m0 * a.ld + 32 * (a0 + b);
    for (int k = 0; k < 8; ++k) {
      const __m256i w = _mm256_loadu_si256(packed + 8 * b + k);
      for (int i = 0; i < MR; ++i) s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(w, bcast32(qa + i * a.ld + 4 * k)));
    }
    const __m256 dv = _mm256_loadu_ps(dw + 8 * b), mv = _mm256_loadu_ps(mw + 8 * b);
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (m0 + i) * a.nb + a0 + b;
      const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[i], ones));
      acc[i] = _mm256_fmadd_ps(sum, _mm256_mul_ps(dv, _mm256_set1_ps(a.d[at])), acc[i]);
      acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(a.s[at]), acc[i]);
    }
  }
}

template <int MR>
GGUF_AVX2 void q8_panel(const __m256i* packed, const float* dw, const QuantizedRows& a, int64_t m0, int64_t a0,
                        int64_t nb, __m256* acc) {
  for (int64_t b = 0; b < nb; ++b) {
    __m256i s[MR];
    for (int i = 0; i < MR; ++i) s[i] = _mm256_setzero_si256();
    const int16_t* qa = a.q16 + m0 * a.ld + 32 * (a0 + b);
    for (int k = 0; k < 16; ++k) {
      const __m256i w = _mm256_loadu_si256(packed + 16 * b + k);
      for (int i = 0; i < MR; ++i) s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(w, bcast32(qa + i * a.ld + 2 * k)));
    }
    const __m256 dv = _mm256_loadu_ps(dw + 8 * b);
    for (int i = 0; i < MR; ++i) {
      const __m256 scale = _mm256_mul_ps(dv, _mm256_set1_ps(a.d[(m0 + i) * a.nb + a0 + b]));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i]), scale, acc[i]);
    }
  }
}

// One panel of MR activation rows against a packed chunk, adding into out[m0 + i, 0 .. rows) (stored when first).
template <int MR>
GGUF_AVX2 void int8_panel(bool q8, const __m256i* packed, const float* dw, const float* mw, const QuantizedRows& a,
                          int64_t m0, int64_t a0, int64_t nb, float* out, int64_t ldo, int64_t rows, bool first) {
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  if (q8) {
    q8_panel<MR>(packed, dw, a, m0, a0, nb, acc);
  } else {
    q4_panel<MR>(packed, dw, mw, a, m0, a0, nb, acc);
  }
  for (int i = 0; i < MR; ++i) {
    float* o = out + (m0 + i) * ldo;
    if (rows == kI8Rows) {
      _mm256_storeu_ps(o, first ? acc[i] : _mm256_add_ps(_mm256_loadu_ps(o), acc[i]));
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[i]);
      for (int64_t j = 0; j < rows; ++j) o[j] = first ? tmp[j] : o[j] + tmp[j];
    }
  }
}

// Q8_0 at a few activation rows: no repacking (its int16 transposes cost more than a few rows' products). Each
// weight row's block is read once as bytes and multiplied into up to kI8MaxRows activation rows with the sign
// trick (vpmaddubsw of |w| and sign(a, w)), one float FMA per block and row pair, horizontal sums at the end.
// a.q8 holds the activations here (int8, not int16).
template <int MR>
GGUF_AVX2 void q8_direct_rows(const uint8_t* row, int64_t nb, const QuantizedRows& a, int64_t m0, float* out,
                              int64_t ldo) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + 34 * b;
    const float dw = _cvtsh_ss(read_u16(blk));
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    const __m256i wabs = _mm256_sign_epi8(w, w);  // |w| as unsigned bytes (|-128| = 128)
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q8 + (m0 + i) * a.ld + 32 * b));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w)), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a.d[(m0 + i) * a.nb + b]), acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
    const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
    out[(m0 + i) * ldo] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
}

GGUF_AVX2 void q8_direct_avx2(const uint8_t* src, int64_t row_bytes, int64_t N, const QuantizedRows& a, int64_t M,
                              float* out) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = src + n * row_bytes;
      int64_t m = 0;
      for (; m + kI8MaxRows <= M; m += kI8MaxRows) q8_direct_rows<kI8MaxRows>(row, a.nb, a, m, out + n, N);
      switch (M - m) {
        case 3: q8_direct_rows<3>(row, a.nb, a, m, out + n, N); break;
        case 2: q8_direct_rows<2>(row, a.nb, a, m, out + n, N); break;
        case 1: q8_direct_rows<1>(row, a.nb, a, m, out + n, N); break;
        default: break;
      }
    }
  });
}

GGUF_AVX2 void int8_linear_avx2(const uint8_t* src, int64_t row_bytes, int64_t N, int64_t qtype,
                                const QuantizedRows& a, int64_t M, float* out) {
  const bool q8 = qtype == kQ8_0;
  const int64_t regs_per_block = q8 ? 16 : 8, groups = (N + kI8Rows - 1) / kI8Rows;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<__m256i> packed(kI8ChunkBlocks * regs_per_block);
    alignas(32) float dw[kI8ChunkBlocks * kI8Rows], mw[kI8ChunkBlocks * kI8Rows];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * kI8Rows, rows = std::min(kI8Rows, N - r0);
      for (int64_t b0 = 0; b0 < a.nb; b0 += kI8ChunkBlocks) {
        const int64_t nb = std::min(kI8ChunkBlocks, a.nb - b0);
        pack_group_avx2(src + r0 * row_bytes, row_bytes, rows, qtype, b0, nb, packed.data(), dw, mw);
        int64_t m = 0;
        for (; m + kI8MaxRows <= M; m += kI8MaxRows)
          int8_panel<kI8MaxRows>(q8, packed.data(), dw, mw, a, m, b0, nb, out + r0, N, rows, b0 == 0);
        switch (M - m) {
          case 3: int8_panel<3>(q8, packed.data(), dw, mw, a, m, b0, nb, out + r0, N, rows, b0 == 0); break;
          case 2: int8_panel<2>(q8, packed.data(), dw, mw, a, m, b0, nb, out + r0, N, rows, b0 == 0); break;
          case 1: int8_panel<1>(q8, packed.data(), dw, mw, a, m, b0, nb, out + r0, N, rows, b0 == 0); break;
          default: break;
        }
      }
    }
  });
}
#endif  // GGUF_X86

// Portable activation quantization (the same arithmetic as quantize_row_avx2: x * (127 / amax), rounded to
// nearest even).
void quantize_row_portable(const float* x, int64_t nb, int8_t* q8, int16_t* q16, float* d, float* s) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 32 * b;
    float am = 0.0f;
    for (int i = 0; i < 32; ++i) am = std::max(am, std::fabs(xb[i]));
    const float id = am > 0.0f ? 127.0f / am : 0.0f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int q = static_cast<int>(std::nearbyint(xb[i] * id));
      sum += q;
      if (q8 != nullptr) q8[32 * b + i] = static_cast<int8_t>(q);
      if (q16 != nullptr) q16[32 * b + i] = static_cast<int16_t>(q);
    }
    d[b] = am / 127.0f;
    s[b] = d[b] * static_cast<float>(sum);
  }
}

}  // namespace

// How many distinct threads an at::parallel_for over `tasks` tasks runs on here (a check that the module was
// built with OpenMP: at::parallel_for is a template compiled into this module, serial without -fopenmp).
int64_t parallel_threads(int64_t tasks) {
  TORCH_CHECK(tasks >= 0, "parallel_threads: tasks must be >= 0, got ", tasks);
  std::vector<std::thread::id> ids(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      ids[t] = std::this_thread::get_id();
      volatile double spin = 0;  // long enough that one thread cannot take every task before the others start
      for (int i = 0; i < 200000; ++i) spin = spin + i;
    }
  });
  std::sort(ids.begin(), ids.end());
  return std::unique(ids.begin(), ids.end()) - ids.begin();
}

at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t qtype, int64_t in_features) {
  const Format f = format_of(qtype);
  check_blocks(blocks, f, in_features);
  const int64_t rows = blocks.size(0), nblocks = in_features / f.block, row_bytes = blocks.size(1);
  at::Tensor out = at::empty({rows, in_features}, at::kFloat);
  const DequantFn deq = dequant_fn(qtype);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { dequant_rows(src, row_bytes, r0, r1, f, deq, nblocks, dst, in_features); });
  return out;
}

// The instruction set of the panel path (from panel_min_rows rows): `isa` as asked ("" = the best this CPU has
// for x's dtype), checked against the CPU.
static PanelIsa panel_isa_for(const std::string& isa, bool bf16_x) {
  if (isa.empty()) {
    if (bf16_x && cpu_has_avx512_bf16_kernels()) return PanelIsa::kAvx512Bf16;
    if (cpu_has_avx512_kernels()) return PanelIsa::kAvx512;
    return use_avx2() ? PanelIsa::kAvx2 : PanelIsa::kNone;
  }
  if (isa == "avx2") {
    TORCH_CHECK(use_avx2(), "GGUF kernels: isa='avx2' needs AVX2, FMA and F16C, which this CPU lacks");
    return PanelIsa::kAvx2;
  }
  if (isa == "avx512") {
    TORCH_CHECK(cpu_has_avx512_kernels(), "GGUF kernels: isa='avx512' needs AVX512F/BW/VL/DQ, which this CPU lacks");
    return PanelIsa::kAvx512;
  }
  if (isa == "avx512_bf16") {
    TORCH_CHECK(cpu_has_avx512_bf16_kernels(), "GGUF kernels: isa='avx512_bf16' needs AVX512_BF16, which this CPU lacks");
    TORCH_CHECK(bf16_x, "GGUF kernels: isa='avx512_bf16' multiplies bfloat16 activations; x is not bfloat16");
    return PanelIsa::kAvx512Bf16;
  }
  TORCH_CHECK(false, "GGUF kernels: unknown isa '", isa, "' (choose '', 'avx2', 'avx512' or 'avx512_bf16')");
}

// Where the in-register path hands over to the panels (a negative inreg_max_rows), per panel ISA: the row count
// up to which the in-register path measured faster on the default model's step (benchmarks/cpu_gguf_paths.py, two
// threads): 12 with the AVX2 [K][16] panels (Zen 3), 8 with the AVX-512 float32 panels and 5 with the AVX512_BF16
// ones (Zen 5: 13.5 against 14.7 ms at 8 rows, 17.8 against 15.7 at 10; 10.7 against 10.3 at 6 rows).
static int64_t default_inreg_max_rows(PanelIsa isa) {
  switch (isa) {
    case PanelIsa::kAvx512: return 8;
    case PanelIsa::kAvx512Bf16: return 5;
    default: return 12;
  }
}

at::Tensor gguf_linear(const at::Tensor& x_in, const at::Tensor& blocks, int64_t qtype, int64_t in_features,
                       int64_t fused_max_rows, int64_t tile_rows, int64_t inreg_max_rows, int64_t panel_min_rows,
                       const std::string& isa, bool direct) {
  const Format f = format_of(qtype);
  check_blocks(blocks, f, in_features);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) == in_features,
              "GGUF kernels: x must be a CPU [rows, ", in_features, "] tensor");
  const PanelIsa panel_isa = panel_isa_for(isa, x_in.scalar_type() == at::kBFloat16);
  if (inreg_max_rows < 0) inreg_max_rows = default_inreg_max_rows(panel_isa);
  if (panel_min_rows < 0) panel_min_rows = inreg_max_rows + 1;
  const int64_t M = x_in.size(0), N = blocks.size(0), nblocks = in_features / f.block, row_bytes = blocks.size(1);
  at::Tensor out = at::empty({M, N}, at::kFloat);
  if (M == 0 || N == 0) return out;
  const DequantFn deq = dequant_fn(qtype);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
#ifdef GGUF_X86
  // the in-register path runs up to inreg_max_rows rows for the formats it has (both branches below ask this)
  const InregFn inreg = use_avx2() && M <= inreg_max_rows ? inreg_fn(qtype) : nullptr;
  if (panel_isa == PanelIsa::kAvx512Bf16 && !inreg && M >= panel_min_rows) {
    // bfloat16 activations as they are: groups of 48 weight rows in [K/2][48] bfloat16 pair panels
    const at::Tensor xb = x_in.contiguous();
    const void* xbp = xb.data_ptr<at::BFloat16>();
    at::parallel_for(0, (N + kWideCols - 1) / kWideCols, 1, [&](int64_t g0, int64_t g1) {
      wide_panel_groups<true>(src, row_bytes, f, deq, direct ? wide_builder(qtype, true) : nullptr, nblocks, N,
                              in_features, xbp, M, op, g0, g1);
    });
    return out;
  }
#endif
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  const bool avx2 = use_avx2();
#ifdef GGUF_X86
  if (inreg) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      inreg(src, row_bytes, f.bytes, n0, n1, nblocks, xp, in_features, M, op, N);
    });
    return out;
  }
  if (panel_isa != PanelIsa::kAvx2 && panel_isa != PanelIsa::kNone && M >= panel_min_rows) {
    // Groups of 48 weight rows, de-quantized and transposed into [K][48] panels, times all M rows.
    at::parallel_for(0, (N + kWideCols - 1) / kWideCols, 1, [&](int64_t g0, int64_t g1) {
      wide_panel_groups<false>(src, row_bytes, f, deq, direct ? wide_builder(qtype, false) : nullptr, nblocks, N,
                               in_features, xp, M, op, g0, g1);
    });
    return out;
  }
  if (avx2 && M >= panel_min_rows) {
    // Groups of 16 weight rows, de-quantized and transposed into [K][16] panels, times all M rows.
    at::parallel_for(0, (N + kPanelCols - 1) / kPanelCols, 1, [&](int64_t g0, int64_t g1) {
      panel_groups_avx2(src, row_bytes, f, deq, nblocks, N, in_features, xp, M, op, g0, g1);
    });
    return out;
  }
#endif
  if (M > fused_max_rows) {
    // prefill: de-quantize a tile of weight rows, multiply it with a GEMM
    // tile_rows <= 0: tiles of about 2 MB of float32 weights
    const int64_t wanted = tile_rows > 0 ? tile_rows : (int64_t{1} << 19) / in_features;
    const int64_t tile = std::max<int64_t>(16, std::min(N, wanted));
    at::Tensor w = at::empty({tile, in_features}, at::kFloat);
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t nt = std::min(tile, N - n0);
      float* dst = w.data_ptr<float>();
      at::parallel_for(0, nt, 8, [&](int64_t r0, int64_t r1) {
        dequant_rows(src + n0 * row_bytes, row_bytes, r0, r1, f, deq, nblocks, dst, in_features);
      });
      out.narrow(1, n0, nt).copy_(at::mm(x, w.narrow(0, 0, nt).t()));
    }
    return out;
  }
  if (!avx2) {
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
      alignas(32) float buf[256];
      for (int64_t n = n0; n < n1; ++n) dot_rows_portable(src + n * row_bytes, nblocks, f, deq, xp, in_features, M, op + n, N, buf);
    });
    return out;
  }
#ifdef GGUF_X86
  // Groups of kGroupRows weight rows per task; each K chunk of a group is de-quantized once into a buffer and
  // multiplied into every activation row by the register-blocked panels (weights de-quantized once per call,
  // activations read once per group).
  constexpr int64_t kGroupRows = 16;
  const int64_t chunk_blocks = std::max<int64_t>(1, 512 / f.block), kc_max = chunk_blocks * f.block;
  at::parallel_for(0, (N + kGroupRows - 1) / kGroupRows, 1, [&](int64_t g0, int64_t g1) {
    const AlignedBuffer<float> wbuf = zeroed<float>(kGroupRows * kc_max);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * kGroupRows, rows = std::min(kGroupRows, N - r0);
      for (int64_t b0 = 0; b0 < nblocks; b0 += chunk_blocks) {
        const int64_t nb = std::min(chunk_blocks, nblocks - b0), kc = nb * f.block;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t b = 0; b < nb; ++b)
            deq(src + (r0 + r) * row_bytes + (b0 + b) * f.bytes, wbuf.get() + r * kc_max + b * f.block);
        group_avx2(wbuf.get(), kc_max, rows, xp + b0 * f.block, in_features, M, kc, op + r0, N, b0 > 0);
      }
    }
  });
#endif
  return out;
}


namespace {

bool int8_supported(int64_t qtype) { return qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0; }

// Quantize x [M, K] (K a multiple of 32) per 32-weight block into q8 / q16 (either may be null), d and s [M, K / 32].
void quantize_rows(const at::Tensor& x, int8_t* q8, int16_t* q16, float* d, float* s) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / 32;
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* r8 = q8 ? q8 + m * K : nullptr;
      int16_t* r16 = q16 ? q16 + m * K : nullptr;
#ifdef GGUF_X86
      if (use_avx2()) {
        quantize_row_avx2(xp + m * K, nb, r8, r16, d + m * nb, s + m * nb);
        continue;
      }
#endif
      quantize_row_portable(xp + m * K, nb, r8, r16, d + m * nb, s + m * nb);
    }
  });
}

}  // namespace

std::vector<at::Tensor> gguf_quantize_activations(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) % 32 == 0,
              "GGUF kernels: x must be a CPU [rows, 32 * blocks] tensor");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), nb = x.size(1) / 32;
  at::Tensor q = at::empty({M, x.size(1)}, at::kChar), d = at::empty({M, nb}, at::kFloat), s = at::empty({M, nb}, at::kFloat);
  quantize_rows(x, q.data_ptr<int8_t>(), nullptr, d.data_ptr<float>(), s.data_ptr<float>());
  return {q, d, s};
}

at::Tensor gguf_linear_int8(const at::Tensor& x_in, const at::Tensor& blocks, int64_t qtype, int64_t in_features,
                            int64_t q8_direct_max_rows) {
  const Format f = format_of(qtype);
  TORCH_CHECK(int8_supported(qtype), "GGUF kernels: the int8 path takes Q4_0, Q4_1 and Q8_0, not type ", qtype);
  TORCH_CHECK(use_avx2(), "GGUF kernels: the int8 path needs AVX2 (gguf_isa() says which path runs)");
  check_blocks(blocks, f, in_features);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) == in_features,
              "GGUF kernels: x must be a CPU [rows, ", in_features, "] tensor");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = blocks.size(0), nb = in_features / 32;
  at::Tensor out = at::empty({M, N}, at::kFloat);
  if (M == 0 || N == 0) return out;
#ifdef GGUF_X86
  // Q8_0 up to q8_direct_rows activation rows: the direct byte path (int8 activations); more: the repacked int16 one
  const bool direct = qtype == kQ8_0 && M <= q8_direct_max_rows;
  const bool q8 = qtype == kQ8_0 && !direct;
  at::Tensor q = at::empty({M, in_features}, q8 ? at::kShort : at::kChar);
  at::Tensor d = at::empty({M, nb}, at::kFloat), s = at::empty({M, nb}, at::kFloat);
  quantize_rows(x, q8 ? nullptr : q.data_ptr<int8_t>(), q8 ? q.data_ptr<int16_t>() : nullptr, d.data_ptr<float>(),
                s.data_ptr<float>());
  QuantizedRows a;
  if (q8) {
    a.q16 = q.data_ptr<int16_t>();
  } else {
    a.q8 = q.data_ptr<int8_t>();
  }
  a.d = d.data_ptr<float>();
  a.s = s.data_ptr<float>();
  a.ld = in_features;
  a.nb = nb;
  if (direct) {
    q8_direct_avx2(blocks.data_ptr<uint8_t>(), blocks.size(1), N, a, M, out.data_ptr<float>());
  } else {
    int8_linear_avx2(blocks.data_ptr<uint8_t>(), blocks.size(1), N, qtype, a, M, out.data_ptr<float>());
  }
#endif
  return out;
}

std::string gguf_isa() {
  if (cpu_has_avx512_bf16_kernels()) return "avx512_bf16";
  if (cpu_has_avx512_kernels()) return "avx512";
  return use_avx2() ? "avx2" : "portable";
}

// gguf_packed.cpp: Q4_0 / Q4_1 weights in the wide16 layout written at load (inferneo/quantization/gguf_wide.py)
bool gguf_packed_available();
bool gguf_packed_int8_available();
bool gguf_packed_amx_available();
std::vector<int64_t> gguf_packed_silu_rows();
at::Tensor gguf_packed_linear_silu(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype,
                                   int64_t out_features);
at::Tensor gguf_packed_dequantize_kn(const at::Tensor& packed, int64_t qtype, int64_t out_features,
                                     at::ScalarType dtype);
at::Tensor gguf_packed_linear_int8(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype,
                                   int64_t out_features, const std::string& isa);
at::Tensor gguf_packed_rows_q8_0(const at::Tensor& packed, const at::Tensor& ids, int64_t num_rows);
at::Tensor gguf_packed_linear_i16(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype,
                                  int64_t out_features, const std::string& isa);
bool gguf_packed_amx_int8_available();
at::Tensor gguf_packed_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype, int64_t out_features,
                              int64_t inreg_max_rows, const std::string& isa, bool bf16_out, bool rounded_float_out);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_linear", &gguf_linear, "x [M, K] @ W.T for W in ggml blocks (float32 out)", py::arg("x"),
        py::arg("blocks"), py::arg("qtype"), py::arg("in_features"), py::arg("fused_max_rows") = 48,
        py::arg("tile_rows") = 0, py::arg("inreg_max_rows") = -1, py::arg("panel_min_rows") = -1, py::arg("isa") = "",
        py::arg("direct") = true);
  m.def("parallel_threads", &parallel_threads, "Distinct threads an at::parallel_for over `tasks` tasks uses",
        py::arg("tasks"));
  m.def("gguf_dequantize", &gguf_dequantize, "ggml blocks [N, row_bytes] -> float32 [N, K]", py::arg("blocks"),
        py::arg("qtype"), py::arg("in_features"));
  m.def("gguf_linear_int8", &gguf_linear_int8,
        "x [M, K] @ W.T for Q4_0 / Q4_1 / Q8_0 blocks with x quantized to int8 per 32-weight block (AVX2)",
        py::arg("x"), py::arg("blocks"), py::arg("qtype"), py::arg("in_features"),
        py::arg("q8_direct_max_rows") = 16);
  m.def("gguf_quantize_activations", &gguf_quantize_activations,
        "x [M, K] -> (q int8 [M, K], d [M, K/32], d * sum(q) [M, K/32]): the int8 path's activation blocks",
        py::arg("x"));
  m.def("gguf_packed_available", &gguf_packed_available,
        "whether this CPU runs gguf_packed_linear (AVX512F/BW/VL/DQ)");
  m.def("gguf_packed_linear", &gguf_packed_linear,
        "x [M, K] @ W.T for Q4_0 / Q4_1 weights in the wide16 layout [groups, K / 32, tile] (float32 out; with "
        "bf16_out, bfloat16 x gives the same values rounded to bfloat16; with rounded_float_out, those rounded values "
        "as float32)",
        py::arg("x"), py::arg("packed"), py::arg("qtype"), py::arg("out_features"), py::arg("inreg_max_rows") = -1,
        py::arg("isa") = "", py::arg("bf16_out") = false, py::arg("rounded_float_out") = false);
  m.def("gguf_packed_amx_available", &gguf_packed_amx_available,
        "whether gguf_packed_linear multiplies bfloat16 panels on the AMX tiles here (AMX-BF16, and the kernel let "
        "this process use them)");
  m.def("gguf_packed_silu_rows", &gguf_packed_silu_rows,
        "[fewest, most] rows gguf_packed_linear_silu takes (AMX CPUs: the chunked tile form's range)");
  m.def("gguf_packed_linear_silu", &gguf_packed_linear_silu,
        "silu(gate) * up of a [gate | up] wide16 projection of bfloat16 x, in bfloat16 [M, out_features / 2]: the "
        "bits of gguf_packed_linear(bf16_out=True) followed by the SiLU-and-mul kernel, in one pass (AMX-BF16)",
        py::arg("x"), py::arg("packed"), py::arg("qtype"), py::arg("out_features"));
  m.def("gguf_packed_int8_available", &gguf_packed_int8_available,
        "whether this CPU runs gguf_packed_linear_int8 (AVX512F/BW/VL/DQ and AVX512_VNNI)");
  m.def("gguf_packed_linear_int8", &gguf_packed_linear_int8,
        "x [M, K] @ W.T for Q4_0 / Q4_1 weights in the wide16 layout, x quantized to int8 per 32-weight block "
        "(AVX512_VNNI, or the AMX-INT8 tiles where the CPU has them: isa '' the best here, 'vnni' or 'amx_int8'; "
        "'' takes the tiles from 9 rows; the same results as gguf_linear_int8 on the file's blocks on either)",
        py::arg("x"), py::arg("packed"), py::arg("qtype"), py::arg("out_features"), py::arg("isa") = "");
  m.def("gguf_packed_linear_i16", &gguf_packed_linear_i16,
        "x [M, K] @ W.T for Q4_0 / Q4_1 / Q8_0 weights in the wide16 layout, float32 x held as 16-bit integers per "
        "32-weight block (AVX512_VNNI, or the AMX-INT8 tiles where the CPU has them: isa '' the best here, 'vnni' or "
        "'amx_int8'; '' takes the tiles from 9 rows; the same bits on either; each product within 2^-16 of its block's largest |x| of the float32 "
        "one)",
        py::arg("x"), py::arg("packed"), py::arg("qtype"), py::arg("out_features"), py::arg("isa") = "");
  m.def("gguf_packed_amx_int8_available", &gguf_packed_amx_int8_available,
        "whether gguf_packed_linear_int8 / gguf_packed_linear_i16 multiply on the AMX-INT8 tiles here (AMX-INT8, and "
        "the kernel let this process use the tiles)");
  m.def("gguf_packed_dequantize_kn", &gguf_packed_dequantize_kn,
        "wide16 tiles -> the weight transposed, [K, N] float32 or bfloat16 (for x @ W.T as x @ wt)",
        py::arg("packed"), py::arg("qtype"), py::arg("out_features"), py::arg("dtype"));
  m.def("gguf_packed_rows_q8_0", &gguf_packed_rows_q8_0,
        "rows `ids` of Q8_0 weights in the wide16 layout, de-quantized to float32 [len(ids), K] (an embedding lookup "
        "on the tiles a tied LM head multiplies; the values gguf_blocks computes from the file's blocks)",
        py::arg("packed"), py::arg("ids"), py::arg("num_rows"));
  m.def("gguf_isa", &gguf_isa,
        "the best instruction set the kernels have for this CPU: avx512_bf16, avx512, avx2 or portable (the in-register "
        "and int8 paths run AVX2 code on every AVX2 CPU; the panel path runs the named one)");
}
