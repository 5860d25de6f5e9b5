// 16-lane float math that both native CPU extensions use (cpu_kernels.cpp, and the GGUF kernels' fused SiLU), kept
// in one place so that the two compute the same bits: exp, SiLU, and bfloat16 rounding. Each function carries its
// own AVX-512 target attribute, so an including file built without -march can call it after a CPU check, and one
// built with -march=native inlines it as its own code.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define INFERNEO_MATH_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace inferneo_math {

// exp on 16 lanes: 2^n * e^r with |r| <= ln2/2, a degree-6 polynomial for e^r (relative error ~2e-7).
// Inputs below -87 give (nearly) zero, which is all the softmax needs.
INFERNEO_MATH_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(g) = g / (1 + e^-g) on 16 lanes.
INFERNEO_MATH_AVX512 inline __m512 silu16(__m512 g) {
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// 16 lanes rounded to bfloat16 (nearest even), the 16-bit results in the low halves of 32-bit lanes.
INFERNEO_MATH_AVX512 inline __m512i bf16_rounded_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}

// 16 lanes rounded to bfloat16 and widened back to float32.
INFERNEO_MATH_AVX512 inline __m512 bf16_rounded(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_rounded_bits(v), 16));
}

}  // namespace inferneo_math
#endif  // x86
