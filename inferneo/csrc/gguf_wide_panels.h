// The AVX-512 panel products shared by the GGUF kernels (gguf_kernels.cpp: panels de-quantized from ggml blocks at
// each call; gguf_packed.cpp: panels de-quantized from weights repacked at load): activation rows, eight at a time,
// times a panel of 48 weight rows laid out for 16-lane FMAs ([K][48] float32) or for the AVX512_BF16 dot product
// ([K/2][48] pairs of bfloat16), with the target attributes and CPU checks both files use. Each function carries
// its own target attribute and is called only after the CPU check beside it, so the including file is built
// without -march.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vector_math.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GGUF_X86 1
#define GGUF_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace gguf_wide {

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

constexpr int64_t kWideCols = 48;

#define GGUF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define GGUF_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

inline bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

inline bool cpu_has_avx512_bf16() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

// The first `cols` of 16 lanes (all of them from 16 up).
inline __mmask16 lanes_mask(int64_t cols) {
  return cols >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1u);
}

// 16 lanes rounded to bfloat16 as PyTorch rounds (nearest even; NaN to the quiet NaN 0x7FC0), the 16-bit results in
// the low halves of 32-bit lanes.
GGUF_AVX512 inline __m512i bf16_stored_bits(__m512 v) {
  return _mm512_mask_mov_epi32(inferneo_math::bf16_rounded_bits(v), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7FC0));
}

// Those 16-bit words stored under `mask`: a bfloat16 layer's output written once, not as float32 and then converted.
GGUF_AVX512 inline void store16_bf16(uint16_t* y, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(y, mask, _mm512_cvtepi32_epi16(bf16_stored_bits(v)));
}

// A float32 output that holds bfloat16-rounded values (the bits of `.to(torch.bfloat16).float()` on the float32 sum):
// a bfloat16 model's logits handed to float32 sampling without a conversion pass over them.
struct RoundedFloat {
  float value;
};

GGUF_AVX512 inline void store16(float* y, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(y, mask, v); }
GGUF_AVX512 inline void store16(uint16_t* y, __mmask16 mask, __m512 v) { store16_bf16(y, mask, v); }
// The float32 value of what store16_bf16 stores for each lane.
GGUF_AVX512 inline __m512 bf16_stored_value(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_stored_bits(v), 16));
}

GGUF_AVX512 inline void store16(RoundedFloat* y, __mmask16 mask, __m512 v) {
  _mm512_mask_storeu_ps(reinterpret_cast<float*>(y), mask, bf16_stored_value(v));
}

// 48 columns' sums into y[0 .. cols): float32, or bfloat16 words (store16).
template <typename OutT>
GGUF_AVX512 inline void store_wide(const __m512 (&acc)[3], OutT* y, int64_t cols) {
  for (int j = 0; j < 3 && cols - 16 * j > 0; ++j) store16(y + 16 * j, lanes_mask(cols - 16 * j), acc[j]);
}

// Rows [0, MR) of float32 x times a [K][48] panel: y[r][0 .. cols).
template <int MR, typename OutT>
GGUF_AVX512 inline void wide_rows_f32(const float* x, int64_t ldx, const float* panel, int64_t K, OutT* y, int64_t ldy,
                               int64_t cols) {
  __m512 acc[MR][3];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_ps();
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kWideCols) {
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, w2, acc[r][2]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) store_wide(acc[r], y + r * ldy, cols);
}

// Rows [0, MR) of bfloat16 x (raw bits) times a [K/2][48] panel of bfloat16 pairs.
template <int MR, typename OutT>
GGUF_AVX512BF16 inline void wide_rows_bf16(const uint16_t* x, int64_t ldx, const uint32_t* pairs, int64_t K, OutT* y,
                                    int64_t ldy, int64_t cols) {
  __m512 acc[MR][3];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_ps();
  const uint32_t* w = pairs;
  for (int64_t s = 0; s < K / 2; ++s, w += kWideCols) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 16),
                   w2 = (__m512bh)_mm512_loadu_si512(w + 32);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * s, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, w2);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) store_wide(acc[r], y + r * ldy, cols);
}

template <typename Fn>
inline void by_block_rows(int64_t rows, Fn&& fn) {
  switch (rows) {
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 1>{}); break;
  }
}

template <typename OutT>
GGUF_AVX512 inline void wide_block_f32(int64_t rows, const float* x, int64_t ldx, const float* panel, int64_t K, OutT* y,
                                int64_t ldy, int64_t cols) {
  by_block_rows(rows, [&](auto mr) { wide_rows_f32<decltype(mr)::value>(x, ldx, panel, K, y, ldy, cols); });
}

template <typename OutT>
GGUF_AVX512BF16 inline void wide_block_bf16(int64_t rows, const uint16_t* x, int64_t ldx, const uint32_t* pairs, int64_t K,
                                     OutT* y, int64_t ldy, int64_t cols) {
  by_block_rows(rows, [&](auto mr) { wide_rows_bf16<decltype(mr)::value>(x, ldx, pairs, K, y, ldy, cols); });
}

// `count` consecutive panels (`panel_words` 32-bit words apart; the first holds output columns from `col0`) times all
// M rows of x (float32, or bfloat16 bits with kBf16), eight rows at a time, into out [M, N] (float32, or bfloat16 bits
// with OutT = uint16_t).
template <bool kBf16, typename OutT = float>
GGUF_AVX512 inline void wide_panels_times_rows(const uint32_t* panels, int64_t count, int64_t panel_words, int64_t col0,
                                               const void* x, int64_t M, int64_t K, int64_t N, OutT* out) {
  for (int64_t m = 0; m < M; m += 8) {
    const int64_t block_rows = std::min<int64_t>(8, M - m);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r0 = col0 + i * kWideCols, cols = std::min(kWideCols, N - r0);
      const uint32_t* panel = panels + i * panel_words;
      if constexpr (kBf16) {
        wide_block_bf16(block_rows, static_cast<const uint16_t*>(x) + m * K, K, panel, K, out + m * N + r0, N, cols);
      } else {
        wide_block_f32(block_rows, static_cast<const float*>(x) + m * K, K, reinterpret_cast<const float*>(panel), K,
                       out + m * N + r0, N, cols);
      }
    }
  }
}

}  // namespace gguf_wide
#endif  // x86
