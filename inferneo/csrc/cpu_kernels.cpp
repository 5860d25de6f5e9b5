// Native CPU kernels: paged KV store and decode attention, RMSNorm with residual, rotary embedding, SiLU-and-mul,
// and a float32 / bfloat16 linear layer over weights packed in column panels.
//
// Paged attention reads one query token per row straight from the paged KV cache (layout below): a decoding
// request's new token, or one token of a prompt (each prompt token is its own row over the prompt's first tokens).
// Work is split over (row, kv head) pairs; each pair walks its row's tokens once, keeping a running max
// and sum (online softmax) for every query head of its group. Scores and accumulators are float32 whatever the
// cache dtype. The AVX-512 versions are used when the compiler targets it, else the AVX2 + FMA + F16C ones (8
// lanes) when it targets those; portable loops otherwise. ``vector_isa()`` says which a build has.
//
// FP8 caches (float8 e4m3 with one float32 scale per KV head for keys and one for values): the store divides by the
// scale, saturates to +-448 and rounds to nearest even (c10's conversion, PyTorch's own); attention converts each
// element to float as it reads it, folds the key scale into the query's scale and applies the value scale to the
// output, so no de-quantized copy of the cache is made.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "aligned_buffer.h"
#include "vector_math.h"

// AVX2 + FMA + F16C (8 lanes): the vector paths on x86 CPUs without AVX-512 (most small cloud VMs, many AMD and
// Intel desktops). A build that targets AVX-512 uses the 16-lane paths instead.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
#define INFERNEO_AVX2 1
#endif

#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
#include <immintrin.h>
#include <omp.h>
#endif

namespace {

// Storage types: float, c10::Half, and bfloat16 handled as raw uint16_t bits so that conversions are plain
// shifts the compiler vectorizes (round to nearest even on the way down; NaN payloads are not preserved).
inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
// FP8 e4m3: each byte's float value from a 256-entry table (exact: built once, at load, from c10's conversion;
// several times faster than converting element by element in the attention loops).
const std::array<float, 256> kFp8E4m3Values = [] {
  std::array<float, 256> table{};
  for (int i = 0; i < 256; ++i) {
    table[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
  }
  return table;
}();
inline float to_f(c10::Float8_e4m3fn v) { return kFp8E4m3Values[v.x]; }
inline float to_f(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
template <typename T>
inline T from_f(float v);
template <>
inline float from_f<float>(float v) { return v; }
template <>
inline c10::Half from_f<c10::Half>(float v) { return static_cast<c10::Half>(v); }
template <>
inline uint16_t from_f<uint16_t>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Calls fn with the storage type for a tensor's dtype (bfloat16 -> uint16_t).
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(uint16_t{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

// Calls fn with the storage types of the activations (``dtype``) and of the KV cache (``cache_dtype``): the same
// type, or c10::Float8_e4m3fn for an FP8 cache.
template <typename Fn>
void dispatch_storage_and_cache(at::ScalarType dtype, at::ScalarType cache_dtype, const char* name, Fn&& fn) {
  dispatch_storage(dtype, name, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (cache_dtype == at::kFloat8_e4m3fn) {
      fn(tag, c10::Float8_e4m3fn{});
    } else {
      TORCH_CHECK(cache_dtype == dtype, name, ": the KV cache (", cache_dtype, ") must be FP8 e4m3 or ", dtype);
      fn(tag, scalar_t{});
    }
  });
}

// One element as the cache stores it: unchanged, or for FP8 e4m3(clamp(x / scale, -448, 448)).
template <typename cache_t, typename scalar_t>
inline cache_t to_cache(scalar_t x, float scale) {
  if constexpr (std::is_same_v<cache_t, c10::Float8_e4m3fn>) {
    return c10::Float8_e4m3fn(std::min(std::max(to_f(x) / scale, -448.f), 448.f));
  } else {
    return x;
  }
}

// ---- paged KV cache: layout, store, decode attention -----------------------------------------------------
//
// One layer's cache is [2, num_kv_heads, num_blocks, block_size * head_dim]. A value block is token-major
// ([block_size][head_dim], one row per token); a key block is dimension-major ([head_dim][block_size]), so that
// one vector load reads the same dimension of 16 consecutive tokens and q.k for 16 tokens is a run of
// broadcast-multiply-adds with no horizontal reductions.

// Token t's key and value of kv head h into their slot (a negative slot: nothing).
template <typename scalar_t, typename cache_t>
inline void store_token_head(const scalar_t* k, const scalar_t* v, int64_t k_stride, int64_t v_stride, cache_t* cache,
                             const int64_t* slots, int64_t t, int64_t h, int64_t num_kv_heads, int64_t head_dim,
                             int64_t num_blocks, int64_t block_size, const float* k_scale, const float* v_scale) {
  const int64_t slot = slots[t];
  if (slot < 0) return;
  const int64_t block_elems = block_size * head_dim;
  const int64_t half = num_kv_heads * num_blocks * block_elems;
  const int64_t block = slot / block_size, offset = slot % block_size;
  const int64_t base = (h * num_blocks + block) * block_elems;
  const scalar_t* kr = k + t * k_stride + h * head_dim;
  const scalar_t* vr = v + t * v_stride + h * head_dim;
  cache_t* kd = cache + base + offset;
  cache_t* vd = cache + half + base + offset * head_dim;
  if constexpr (std::is_same_v<cache_t, scalar_t>) {
    for (int64_t d = 0; d < head_dim; ++d) kd[d * block_size] = kr[d];
    std::memcpy(vd, vr, head_dim * sizeof(scalar_t));
  } else {
    const float ks = k_scale[h], vs = v_scale[h];
    for (int64_t d = 0; d < head_dim; ++d) kd[d * block_size] = to_cache<cache_t>(kr[d], ks);
    for (int64_t d = 0; d < head_dim; ++d) vd[d] = to_cache<cache_t>(vr[d], vs);
  }
}

// Writes the new tokens' keys and values into their slots. k and v are [tokens, kv_heads, head_dim] views with a
// unit inner stride and any token stride (slices of the fused qkv projection). Negative slots are skipped. An FP8
// cache takes k_scale / v_scale ([kv_heads] float32; unread otherwise).
template <typename scalar_t, typename cache_t>
void store_kv_kernel(const scalar_t* k, const scalar_t* v, int64_t k_stride, int64_t v_stride, cache_t* cache,
                     const int64_t* slots, int64_t tokens, int64_t num_kv_heads, int64_t head_dim, int64_t num_blocks,
                     int64_t block_size, const float* k_scale, const float* v_scale) {
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        store_token_head(k, v, k_stride, v_stride, cache, slots, t, h, num_kv_heads, head_dim, num_blocks, block_size,
                         k_scale, v_scale);
      }
    }
  });
}

// The new token of each decode row, for decode_vector to store before the row attends (store_kv_and_decode):
// row b's key and value at k + b * k_stride, v + b * v_stride ([kv_heads][head_dim] each), its slot slots[b].
template <typename scalar_t>
struct NewTokens {
  const scalar_t* k;
  const scalar_t* v;
  int64_t k_stride, v_stride;
  const int64_t* slots;
};

struct DecodeShape {
  int64_t batch, num_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks, q_stride;
  float scale;
  // Per-layer attention options: a query of length ``len`` sees tokens [len - window, len) only (0: all of them);
  // scores become softcap * tanh(score / softcap) (0: unchanged); sinks[h] (float32, nullptr: none) is one more
  // logit of query head h in the softmax denominator, with no value.
  int64_t window;
  float softcap;
  const float* sinks;
  // FP8 caches: per-KV-head float32 scales of the stored keys and values (nullptr: a cache in the query dtype).
  const float* k_scale;
  const float* v_scale;

  int64_t first_token(int64_t len) const { return window > 0 && len > window ? len - window : 0; }
  // The query's scale for KV head kvh (the key scale folded in) and the output's (the value scale).
  float query_scale(int64_t kvh) const { return k_scale ? scale * k_scale[kvh] : scale; }
  float output_scale(int64_t kvh) const { return v_scale ? v_scale[kvh] : 1.f; }
};

// The per-thread running state of one (request, kv head) item, for all query heads of the kv head's group:
// scaled queries, running max and sum of the online softmax, and the output accumulators.
struct GroupState {
  inferneo_buffers::LineVector<float> q, acc, row_max, row_sum;
  int64_t group, head_dim;

  GroupState(int64_t group, int64_t head_dim)
      : q(group * head_dim), acc(group * head_dim), row_max(group), row_sum(group), group(group), head_dim(head_dim) {}

  // Start an item: ``qp`` points at the group's first query head (its heads are contiguous).
  template <typename scalar_t>
  void begin(const scalar_t* qp, float scale) {
    for (int64_t i = 0; i < group * head_dim; ++i) q[i] = to_f(qp[i]) * scale;
    std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(row_sum.begin(), row_sum.end(), 0.f);
    std::fill(acc.begin(), acc.end(), 0.f);
  }

  // Finish an item: the normalized outputs of the group's heads, written contiguously from ``op``. ``sinks``
  // (nullptr: none) are the group's sink logits: each adds exp(sink - max) to its head's denominator.
  // ``out_scale`` multiplies every output (an FP8 cache's value scale).
  template <typename scalar_t>
  void finish(scalar_t* op, const float* sinks = nullptr, float out_scale = 1.f) const {
    for (int64_t g = 0; g < group; ++g) {
      const float sum = sinks ? row_sum[g] + std::exp(sinks[g] - row_max[g]) : row_sum[g];
      const float inv = sum > 0.f ? out_scale / sum : 0.f;
      for (int64_t d = 0; d < head_dim; ++d) op[g * head_dim + d] = from_f<scalar_t>(acc[g * head_dim + d] * inv);
    }
  }
};

// Portable version: one (request, kv head) pair at a time, online softmax rescaled once per block.
template <typename scalar_t, typename cache_t>
void decode_scalar(const scalar_t* __restrict q, const cache_t* __restrict cache, const int64_t* tables,
                   const int64_t* table_rows, const int64_t* seq_lens, scalar_t* out, const DecodeShape& s) {
  const int64_t group = s.num_heads / s.num_kv_heads, D = s.head_dim, bs = s.block_size;
  const int64_t block_elems = bs * D, half = s.num_kv_heads * s.num_blocks * block_elems;
  at::parallel_for(0, s.batch * s.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    GroupState st(group, D);
    inferneo_buffers::LineVector<float> scores(bs);
    inferneo_buffers::LineVector<float>&qf = st.q, &acc = st.acc, &row_max = st.row_max, &row_sum = st.row_sum;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.num_kv_heads, kvh = item % s.num_kv_heads, len = seq_lens[b];
      const int64_t* table = tables + (table_rows ? table_rows[b] : b) * s.max_blocks;
      st.begin(q + b * s.q_stride + kvh * group * D, s.query_scale(kvh));
      const int64_t first = s.first_token(len);
      for (int64_t blk = first / bs; blk * bs < len; ++blk) {
        const int64_t base = (kvh * s.num_blocks + table[blk]) * block_elems;
        const cache_t* kb = cache + base;
        const cache_t* vb = cache + half + base;
        const int64_t n = std::min(bs, len - blk * bs);
        const int64_t t0 = std::max<int64_t>(0, first - blk * bs);  // tokens before the window are skipped
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * D;
          float block_max = -std::numeric_limits<float>::infinity();
          for (int64_t t = t0; t < n; ++t) {
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_f(kb[d * bs + t]);
            if (s.softcap > 0.f) dot = s.softcap * std::tanh(dot / s.softcap);
            scores[t] = dot;
            block_max = std::max(block_max, dot);
          }
          const float new_max = std::max(row_max[g], block_max);
          const float correction = std::exp(row_max[g] - new_max);
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] *= correction;
          float sum = row_sum[g] * correction;
          for (int64_t t = t0; t < n; ++t) {
            const float p = std::exp(scores[t] - new_max);
            sum += p;
            for (int64_t d = 0; d < D; ++d) ag[d] += p * to_f(vb[t * D + d]);
          }
          row_max[g] = new_max;
          row_sum[g] = sum;
        }
      }
      st.finish(out + (b * s.num_heads + kvh * group) * D, s.sinks ? s.sinks + kvh * group : nullptr,
                s.output_scale(kvh));
    }
  });
}

#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
// Software prefetch of one 16-token chunk of the decode loops: its key rows (D rows of the [D][bs] key block from
// `kb`, `bs` tokens apart; one prefetch per cache line) and its value rows (16 x D from `vb`). The hardware
// prefetcher alone leaves the loops waiting on memory.
template <typename cache_t>
inline void prefetch_chunk(const cache_t* kb, const cache_t* vb, int64_t D, int64_t bs) {
  const int64_t row_bytes = bs * static_cast<int64_t>(sizeof(cache_t));
  const int64_t step = std::max<int64_t>(1, 64 / row_bytes);  // key rows that share a cache line: one prefetch
  const char* kp = reinterpret_cast<const char*>(kb);
  for (int64_t d = 0; d < D; d += step) _mm_prefetch(kp + d * row_bytes, _MM_HINT_T0);
  const char* vp = reinterpret_cast<const char*>(vb);
  for (int64_t off = 0; off < 16 * D * static_cast<int64_t>(sizeof(cache_t)); off += 64) _mm_prefetch(vp + off, _MM_HINT_T0);
}
#endif

#ifdef __AVX512F__
constexpr int64_t kDecodeLanes = 16;

// 16 lanes of float from storage.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// FP8 e4m3: 16 bytes widened to indices into kFp8E4m3Values, one gather.
inline __m512 load16(const c10::Float8_e4m3fn* p) {
  const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_i32gather_ps(index, kFp8E4m3Values.data(), 4);
}

using inferneo_math::exp16;  // vector_math.h

// tanh on 16 lanes as 1 - 2 / (e^2x + 1): saturates to +-1 (e^2x overflows to inf or clamps to ~0).
inline __m512 tanh16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp16(_mm512_add_ps(x, x));
  return _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
}

// Float lanes rounded to the storage type (round to nearest even for bfloat16), and stores of 16 lanes.
using inferneo_math::bf16_rounded_bits;  // vector_math.h
template <typename scalar_t>
inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same_v<scalar_t, uint16_t>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_rounded_bits(v), 16));
  } else {
    return v;
  }
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_rounded_bits(v)));
}

// ---- spans of up to 256 tokens (AVX-512) ------------------------------------------------------------------------
//
// Updating the online softmax after every 16 tokens (as the AVX2 attend_chunk below does) costs two horizontal
// reductions, a scalar exp and (when the maximum moves) a rescale of the accumulators per chunk and head, and a
// value loop over one chunk has one dependent FMA chain per head and 16 lanes of the head dimension. Keys are read
// dimension-major (a chunk's ``kb`` points at its first token in row 0 of the [D][bs] key block), values
// token-major. attend_span takes up to kSpanChunks chunks in three passes: every chunk's scores (kept in a small buffer, the running maxima in registers), then their
// exponentials against the span's maximum (one reduction and at most one rescale per span and head), then the
// values, with all heads and up to four 16-lane slices of the head dimension as independent FMA chains.
constexpr int64_t kSpanChunks = 16;
constexpr int64_t kSpanTokens = 16 * kSpanChunks;
// Chunks whose keys and values are prefetched ahead of the scores pass (2, 4, 8 and 16 measured alike on a Zen 5
// with the cache in DRAM: the loads wait on memory latency there, not on missing prefetches).
constexpr int64_t kPrefetchChunks = 2;

// One chunk of a span: its key and value rows and its valid lanes [skip, n).
template <typename cache_t>
struct SpanChunk {
  const cache_t* kb;
  const cache_t* vb;
  int64_t n, skip;
};

// Scores of one chunk for NG heads into p[j * kSpanTokens + lane] (lanes outside [skip, n): -inf), and the
// running maxima.
template <int NG, typename cache_t>
inline void chunk_scores(const float* q, const SpanChunk<cache_t>& c, int64_t D, int64_t bs, float softcap, float* p,
                         __m512* vmax) {
  __m512 s0[NG], s1[NG];
  for (int j = 0; j < NG; ++j) s0[j] = s1[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 2) {
    const __m512 k0 = load16(c.kb + d * bs), k1 = load16(c.kb + (d + 1) * bs);
    for (int j = 0; j < NG; ++j) {
      s0[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * D + d]), k0, s0[j]);
      s1[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * D + d + 1]), k1, s1[j]);
    }
  }
  const __mmask16 valid = static_cast<__mmask16>(((1u << c.n) - 1u) & ~((1u << c.skip) - 1u));
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < NG; ++j) {
    __m512 raw = _mm512_add_ps(s0[j], s1[j]);
    if (softcap > 0.f) raw = _mm512_mul_ps(_mm512_set1_ps(softcap), tanh16(_mm512_div_ps(raw, _mm512_set1_ps(softcap))));
    const __m512 scores = _mm512_mask_mov_ps(minus_inf, valid, raw);
    vmax[j] = _mm512_max_ps(vmax[j], scores);
    _mm512_storeu_ps(p + j * kSpanTokens, scores);
  }
}

// acc[j][d0 .. d0 + 16 S) += sum over the span's tokens of p[j][token] * V[token][d0 .. d0 + 16 S).
template <int NG, int S, typename cache_t>
inline void span_values(const float* p, const SpanChunk<cache_t>* chunks, int64_t count, int64_t D, int64_t d0,
                        float* acc) {
  __m512 a[NG][S];
  for (int j = 0; j < NG; ++j)
    for (int i = 0; i < S; ++i) a[j][i] = _mm512_loadu_ps(acc + j * D + d0 + 16 * i);
  for (int64_t c = 0; c < count; ++c) {
    const SpanChunk<cache_t>& ch = chunks[c];
    const float* pc = p + 16 * c;
    for (int64_t t = ch.skip; t < ch.n; ++t) {
      __m512 v[S];
      for (int i = 0; i < S; ++i) v[i] = load16(ch.vb + t * D + d0 + 16 * i);
      for (int j = 0; j < NG; ++j) {
        const __m512 pj = _mm512_set1_ps(pc[j * kSpanTokens + t]);
        for (int i = 0; i < S; ++i) a[j][i] = _mm512_fmadd_ps(pj, v[i], a[j][i]);
      }
    }
  }
  for (int j = 0; j < NG; ++j)
    for (int i = 0; i < S; ++i) _mm512_storeu_ps(acc + j * D + d0 + 16 * i, a[j][i]);
}

// `count` chunks (at most kSpanChunks) for NG query heads (NG <= 4) of one kv head; `p` holds 4 * kSpanTokens
// floats of scratch.
template <int NG, typename cache_t>
inline void attend_span(const float* q, float* acc, float* row_max, float* row_sum, float* p,
                        const SpanChunk<cache_t>* chunks, int64_t count, int64_t D, int64_t bs, float softcap) {
  __m512 vmax[NG];
  for (int j = 0; j < NG; ++j) vmax[j] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < count; ++c) {
    if (c + kPrefetchChunks < count) {
      const SpanChunk<cache_t>& ahead = chunks[c + kPrefetchChunks];
      prefetch_chunk(ahead.kb, ahead.vb, D, bs);
    }
    chunk_scores<NG>(q, chunks[c], D, bs, softcap, p + 16 * c, vmax);
  }
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < NG; ++j) {
    const float new_max = std::max(row_max[j], _mm512_reduce_max_ps(vmax[j]));
    if (new_max == -std::numeric_limits<float>::infinity()) continue;  // no visible token in this span
    const float correction = std::exp(row_max[j] - new_max);
    if (correction != 1.f) {
      const __m512 cv = _mm512_set1_ps(correction);
      float* aj = acc + j * D;
      for (int64_t i = 0; i < D; i += 16) _mm512_storeu_ps(aj + i, _mm512_mul_ps(cv, _mm512_loadu_ps(aj + i)));
    }
    const __m512 m = _mm512_set1_ps(new_max);
    __m512 vsum = _mm512_setzero_ps();
    float* pj = p + j * kSpanTokens;
    for (int64_t c = 0; c < count; ++c) {
      const __m512 scores = _mm512_loadu_ps(pj + 16 * c);
      const __mmask16 seen = _mm512_cmp_ps_mask(scores, minus_inf, _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(scores, m)));
      vsum = _mm512_add_ps(vsum, e);
      _mm512_storeu_ps(pj + 16 * c, e);
    }
    row_sum[j] = row_sum[j] * correction + _mm512_reduce_add_ps(vsum);
    row_max[j] = new_max;
  }
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) span_values<NG, 4>(p, chunks, count, D, d0, acc);
  for (; d0 + 32 <= D; d0 += 32) span_values<NG, 2>(p, chunks, count, D, d0, acc);
  for (; d0 < D; d0 += 16) span_values<NG, 1>(p, chunks, count, D, d0, acc);
}

#endif  // __AVX512F__

#ifdef INFERNEO_AVX2
constexpr int64_t kDecodeLanes = 8;

// 8 lanes of float from storage.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// FP8 e4m3: 8 bytes widened to indices into kFp8E4m3Values, one gather.
inline __m256 load8(const c10::Float8_e4m3fn* p) {
  const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_i32gather_ps(kFp8E4m3Values.data(), index, 4);
}

// exp on 8 lanes, as exp16: 2^n * e^r with |r| <= ln2/2 and the same degree-6 polynomial. Inputs are clamped to
// [-87, 88] so that 2^n is built from a normal exponent field: below -87 gives (nearly) zero, above 88 ~2.4e38
// (finite where exp16 gives inf; tanh and SiLU come out the same).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

inline __m256 tanh8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp8(_mm256_add_ps(x, x));
  return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, one)));
}

inline float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline float reduce_add8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// Float lanes rounded to the storage type (round to nearest even for bfloat16), and stores of 8 lanes.
inline __m256i bf16_rounded_bits8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}
template <typename scalar_t>
inline __m256 round_to8(__m256 v) {
  if constexpr (std::is_same_v<scalar_t, uint16_t>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_rounded_bits8(v), 16));
  } else {
    return v;
  }
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) {
  const __m256i bits = bf16_rounded_bits8(v);  // eight 16-bit values in the low halves of 32-bit lanes
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// Lanes [skip, n) of the 16-token chunk starting at lane ``first`` (0 or 8) as an all-ones mask.
inline __m256 token_mask8(int64_t first, int64_t n, int64_t skip) {
  const __m256i lane = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                        _mm256_set1_epi32(static_cast<int>(first)));
  const __m256i below_n = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
  const __m256i before_skip = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(skip)), lane);
  return _mm256_castsi256_ps(_mm256_andnot_si256(before_skip, below_n));
}

// One 16-token chunk on 8 lanes, as two halves (tokens 0-7 and 8-15), for NG query heads (NG <= 4)
// of one kv head: scores, online-softmax update of row_max/row_sum/acc, then acc += p . V (head_dim % 8 == 0);
// keys read dimension-major, values token-major.
// Tokens outside [skip, n) get probability 0 (their scores are never read: they may be garbage past the length).
template <int NG, typename cache_t>
inline void attend_chunk(const float* q, float* acc, float* row_max, float* row_sum, float* probs,
                         const cache_t* kb, const cache_t* vb, int64_t D, int64_t bs, int64_t n, int64_t skip,
                         float softcap) {
  __m256 lo[NG], hi[NG];
  for (int j = 0; j < NG; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k0 = load8(kb + d * bs), k1 = load8(kb + d * bs + 8);
    for (int j = 0; j < NG; ++j) {
      const __m256 qd = _mm256_set1_ps(q[j * D + d]);
      lo[j] = _mm256_fmadd_ps(qd, k0, lo[j]);
      hi[j] = _mm256_fmadd_ps(qd, k1, hi[j]);
    }
  }
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 valid_lo = token_mask8(0, n, skip), valid_hi = token_mask8(8, n, skip);
  for (int j = 0; j < NG; ++j) {
    __m256 raw_lo = lo[j], raw_hi = hi[j];
    if (softcap > 0.f) {
      const __m256 cap = _mm256_set1_ps(softcap), inv_cap = _mm256_set1_ps(1.f / softcap);
      raw_lo = _mm256_mul_ps(cap, tanh8(_mm256_mul_ps(raw_lo, inv_cap)));
      raw_hi = _mm256_mul_ps(cap, tanh8(_mm256_mul_ps(raw_hi, inv_cap)));
    }
    const __m256 s_lo = _mm256_blendv_ps(minus_inf, raw_lo, valid_lo);
    const __m256 s_hi = _mm256_blendv_ps(minus_inf, raw_hi, valid_hi);
    const float new_max = std::max(row_max[j], reduce_max8(_mm256_max_ps(s_lo, s_hi)));
    const float correction = std::exp(row_max[j] - new_max);
    const __m256 m = _mm256_set1_ps(new_max);
    const __m256 p_lo = _mm256_and_ps(valid_lo, exp8(_mm256_sub_ps(s_lo, m)));
    const __m256 p_hi = _mm256_and_ps(valid_hi, exp8(_mm256_sub_ps(s_hi, m)));
    row_sum[j] = row_sum[j] * correction + reduce_add8(_mm256_add_ps(p_lo, p_hi));
    row_max[j] = new_max;
    _mm256_storeu_ps(probs + j * 16, p_lo);
    _mm256_storeu_ps(probs + j * 16 + 8, p_hi);
    if (correction != 1.f) {
      const __m256 c = _mm256_set1_ps(correction);
      float* aj = acc + j * D;
      for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(aj + i, _mm256_mul_ps(c, _mm256_loadu_ps(aj + i)));
    }
  }
  for (int64_t i = 0; i < D; i += 8) {
    __m256 a[NG];
    for (int j = 0; j < NG; ++j) a[j] = _mm256_loadu_ps(acc + j * D + i);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 vv = load8(vb + t * D + i);
      for (int j = 0; j < NG; ++j) a[j] = _mm256_fmadd_ps(_mm256_set1_ps(probs[j * 16 + t]), vv, a[j]);
    }
    for (int j = 0; j < NG; ++j) _mm256_storeu_ps(acc + j * D + i, a[j]);
  }
}
#endif  // INFERNEO_AVX2

#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
// Vector version for block_size % 16 == 0 and head_dim % 16 (AVX-512) or 8 (AVX2) == 0: tokens are taken 16 at a
// time, in spans of up to 256 (attend_span) on AVX-512, one chunk at a time (attend_chunk) on AVX2.
template <typename scalar_t, typename cache_t>
void decode_vector(const scalar_t* __restrict q, const cache_t* __restrict cache, const int64_t* tables,
                   const int64_t* table_rows, const int64_t* seq_lens, scalar_t* out, const DecodeShape& s,
                   const NewTokens<scalar_t>* fresh = nullptr) {
  const int64_t group = s.num_heads / s.num_kv_heads, D = s.head_dim, bs = s.block_size;
  const int64_t block_elems = bs * D, half = s.num_kv_heads * s.num_blocks * block_elems;
  // Requests differ in length: hand (request, kv head) items out one at a time rather than in two halves.
  const int64_t num_items = s.batch * s.num_kv_heads;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)));
#pragma omp parallel num_threads(threads)
  {
    GroupState st(group, D);
#ifdef __AVX512F__
    inferneo_buffers::LineVector<float> probs(4 * kSpanTokens);
    std::vector<SpanChunk<cache_t>> chunks(kSpanChunks);
#else
    inferneo_buffers::LineVector<float> probs(4 * 16);
#endif
    inferneo_buffers::LineVector<float>&qf = st.q, &acc = st.acc, &row_max = st.row_max, &row_sum = st.row_sum;
#ifndef __AVX512F__
    // prefetch_chunk of the 16 tokens from position `pos` of a request's context
    const auto prefetch_position = [&](const int64_t* table, int64_t kvh, int64_t pos) {
      const int64_t base = (kvh * s.num_blocks + table[pos / bs]) * block_elems;
      prefetch_chunk(cache + base + pos % bs, cache + half + base + (pos % bs) * D, D, bs);
    };
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; ++item) {
      const int64_t b = item / s.num_kv_heads, kvh = item % s.num_kv_heads, len = seq_lens[b];
      const int64_t* table = tables + (table_rows ? table_rows[b] : b) * s.max_blocks;
      if (fresh != nullptr) {  // this row's own new token, into the block this item reads next (no other item does)
        store_token_head(fresh->k, fresh->v, fresh->k_stride, fresh->v_stride, const_cast<cache_t*>(cache),
                         fresh->slots, b, kvh, s.num_kv_heads, D, s.num_blocks, bs, s.k_scale, s.v_scale);
      }
      st.begin(q + b * s.q_stride + kvh * group * D, s.query_scale(kvh));
      const int64_t first = s.first_token(len), start = first / 16 * 16;  // the window's first 16-token chunk
#ifdef __AVX512F__
      // spans of up to kSpanTokens tokens (attend_span)
      for (int64_t span0 = start; span0 < len; span0 += kSpanTokens) {
        int64_t count = 0;
        for (int64_t pos = span0; pos < std::min(len, span0 + kSpanTokens); pos += 16, ++count) {
          const int64_t base = (kvh * s.num_blocks + table[pos / bs]) * block_elems, within = pos % bs;
          chunks[count] = {cache + base + within, cache + half + base + within * D, std::min<int64_t>(16, len - pos),
                           std::max<int64_t>(0, first - pos)};
        }
        for (int64_t c = 0; c < std::min(count, kPrefetchChunks); ++c) prefetch_chunk(chunks[c].kb, chunks[c].vb, D, bs);
        for (int64_t g0 = 0; g0 < group;) {
          const int64_t heads = std::min<int64_t>(4, group - g0);
          float* const hq = qf.data() + g0 * D;
          float* const hacc = acc.data() + g0 * D;
          float* const hmax = row_max.data() + g0;
          float* const hsum = row_sum.data() + g0;
          switch (heads) {
            case 4: attend_span<4>(hq, hacc, hmax, hsum, probs.data(), chunks.data(), count, D, bs, s.softcap); break;
            case 3: attend_span<3>(hq, hacc, hmax, hsum, probs.data(), chunks.data(), count, D, bs, s.softcap); break;
            case 2: attend_span<2>(hq, hacc, hmax, hsum, probs.data(), chunks.data(), count, D, bs, s.softcap); break;
            default: attend_span<1>(hq, hacc, hmax, hsum, probs.data(), chunks.data(), count, D, bs, s.softcap); break;
          }
          g0 += heads;
        }
      }
#else
      if (len > start + 16) prefetch_position(table, kvh, start + 16);
      for (int64_t pos = start; pos < len; pos += 16) {
        const int64_t blk = pos / bs, within = pos % bs;
        const int64_t base = (kvh * s.num_blocks + table[blk]) * block_elems;
        const cache_t* kb = cache + base + within;                 // column `within` of the [D][bs] key block
        const cache_t* vb = cache + half + base + within * D;       // row `within` of the [bs][D] value block
        const int64_t n = std::min<int64_t>(16, len - pos);
        const int64_t skip = std::max<int64_t>(0, first - pos);     // tokens before the window, in the first chunk
        if (pos + 32 < len) prefetch_position(table, kvh, pos + 32);  // overlap later tokens' loads with this math
        // Up to four query heads of the group share each key and value load (and its conversion to float).
        for (int64_t g0 = 0; g0 < group;) {
          const int64_t left = group - g0;
          float* const args_q = qf.data() + g0 * D;
          float* const args_acc = acc.data() + g0 * D;
          if (left >= 4) {
            attend_chunk<4>(args_q, args_acc, row_max.data() + g0, row_sum.data() + g0, probs.data(), kb, vb, D, bs, n, skip, s.softcap);
            g0 += 4;
          } else if (left == 3) {
            attend_chunk<3>(args_q, args_acc, row_max.data() + g0, row_sum.data() + g0, probs.data(), kb, vb, D, bs, n, skip, s.softcap);
            g0 += 3;
          } else if (left == 2) {
            attend_chunk<2>(args_q, args_acc, row_max.data() + g0, row_sum.data() + g0, probs.data(), kb, vb, D, bs, n, skip, s.softcap);
            g0 += 2;
          } else {
            attend_chunk<1>(args_q, args_acc, row_max.data() + g0, row_sum.data() + g0, probs.data(), kb, vb, D, bs, n, skip, s.softcap);
            g0 += 1;
          }
        }
      }
#endif
      st.finish(out + (b * s.num_heads + kvh * group) * D, s.sinks ? s.sinks + kvh * group : nullptr,
                s.output_scale(kvh));
    }
  }
}
#endif

#ifdef __AVX512F__
// ---- linear layer: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), float32 or bfloat16 ----
//
// W is packed once into panels of kPanel output columns so that one step along K is three vector loads: float32
// as [panels][K][48]; bfloat16 as [panels][K/2][48][2], pairs of consecutive k per column, which is the operand
// layout of the AVX512_BF16 dot product (two products summed into each float32 lane). Each thread owns a run of
// panels and walks them in order; for each panel it sweeps all rows of x in blocks of up to eight, holding 8 x 48
// float32 sums in registers. While it computes on one panel it prefetches the next one into L2: at decode batch
// sizes the weights stream from memory once per step, and without the prefetch that stream and the arithmetic
// take turns instead of overlapping (oneDNN runs about 1.3x slower on these shapes here). Sums run over k in
// order; bfloat16 outputs are rounded to nearest even once, at the end.
constexpr int64_t kPanel = 48;

template <typename T>
struct PanelStep;  // what one step along K reads and does, per storage type

template <>
struct PanelStep<float> {
  static constexpr int64_t k_per_step = 1;
  static __m512 weights(const float* w, int64_t step, int j) { return _mm512_loadu_ps(w + step * kPanel + 16 * j); }
  static __m512 input(const float* x, int64_t step, int64_t /*K*/) { return _mm512_set1_ps(x[step]); }
  static __m512 fma(__m512 acc, __m512 a, __m512 w) { return _mm512_fmadd_ps(a, w, acc); }
  static __m512 bias(const float* b, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, b); }
  static void store(float* y, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(y, mask, v); }
};

#ifdef __AVX512BF16__
template <>
struct PanelStep<uint16_t> {
  static constexpr int64_t k_per_step = 2;
  static __m512 weights(const uint16_t* w, int64_t step, int j) {
    return _mm512_castsi512_ps(_mm512_loadu_si512(w + step * 2 * kPanel + 32 * j));
  }
  static __m512 input(const uint16_t* x, int64_t step, int64_t K) {  // the pair (x[2s], x[2s + 1]) in every lane
    const uint32_t lo = x[2 * step], hi = 2 * step + 1 < K ? x[2 * step + 1] : 0;
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(lo | (hi << 16))));
  }
  static __m512 fma(__m512 acc, __m512 a, __m512 w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(a), (__m512bh)_mm512_castps_si512(w));
  }
  static __m512 bias(const uint16_t* b, __mmask16 mask) {
    const __m256i raw = _mm256_maskz_loadu_epi16(mask, b);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static void store(uint16_t* y, __mmask16 mask, __m512 v) {
    _mm256_mask_storeu_epi16(y, mask, _mm512_cvtepi32_epi16(bf16_rounded_bits(v)));
  }
};
#endif

template <typename T, int MR>
inline void panel_block(const T* __restrict x, int64_t ldx, const T* __restrict w, int64_t K,
                        const T* __restrict bias, T* __restrict y, int64_t ldy, int64_t cols,
                        const char*& prefetch, const char* prefetch_end, int64_t prefetch_per_step) {
  using Step = PanelStep<T>;
  __m512 acc[MR][3];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  const int64_t steps = (K + Step::k_per_step - 1) / Step::k_per_step;
  for (int64_t s = 0; s < steps; ++s) {
    const __m512 w0 = Step::weights(w, s, 0), w1 = Step::weights(w, s, 1), w2 = Step::weights(w, s, 2);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = Step::input(x + r * ldx, s, K);
      acc[r][0] = Step::fma(acc[r][0], a, w0);
      acc[r][1] = Step::fma(acc[r][1], a, w1);
      acc[r][2] = Step::fma(acc[r][2], a, w2);
    }
    for (int64_t i = 0; i < prefetch_per_step && prefetch < prefetch_end; ++i, prefetch += 64) {
      _mm_prefetch(prefetch, _MM_HINT_T1);
    }
  }
  for (int j = 0; j < 3; ++j) {
    const int64_t left = cols - 16 * j;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 b = bias ? Step::bias(bias + 16 * j, mask) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) Step::store(y + r * ldy + 16 * j, mask, _mm512_add_ps(acc[r][j], b));
  }
}

// Rows [m_begin, m_end) of y for panels [p_begin, p_end).
template <typename T>
void panel_linear_range(const T* x, int64_t ldx, const T* packed, const T* bias, T* y, int64_t N, int64_t K,
                        int64_t m_begin, int64_t m_end, int64_t p_begin, int64_t p_end) {
  constexpr int64_t kps = PanelStep<T>::k_per_step;
  const int64_t steps = (K + kps - 1) / kps;
  const int64_t panel_elems = steps * kps * kPanel;
  const int64_t panel_lines = panel_elems * static_cast<int64_t>(sizeof(T)) / 64;
  const int64_t row_blocks = (m_end - m_begin + 7) / 8;
  const int64_t per_step = std::max<int64_t>(1, (panel_lines + row_blocks * steps - 1) / (row_blocks * steps));
  for (int64_t p = p_begin; p < p_end; ++p) {
    const T* w = packed + p * panel_elems;
    const char* prefetch = p + 1 < p_end ? reinterpret_cast<const char*>(w + panel_elems) : nullptr;
    const char* prefetch_end = prefetch ? prefetch + panel_elems * static_cast<int64_t>(sizeof(T)) : nullptr;
    const int64_t col0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - col0);
    const T* b = bias ? bias + col0 : nullptr;
    for (int64_t m = m_begin; m < m_end; m += 8) {
      const T* xr = x + m * ldx;
      T* yr = y + m * N + col0;
      switch (std::min<int64_t>(8, m_end - m)) {
        case 8: panel_block<T, 8>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step); break;
        case 7: panel_block<T, 7>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step); break;
        case 6: panel_block<T, 6>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step); break;
        case 5: panel_block<T, 5>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step); break;
        case 4: panel_block<T, 4>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step); break;
        case 3: panel_block<T, 3>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step); break;
        case 2: panel_block<T, 2>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step); break;
        default: panel_block<T, 1>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step); break;
      }
    }
  }
}
#endif

#ifdef INFERNEO_AVX2
// ---- linear layer on AVX2: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), float32 or bfloat16 weights ----
//
// W is packed in panels of 16 output columns, each contiguous along K: float32 [panels][K][16], bfloat16
// [panels][K/2][16][2] (in each 32-bit pair the low half is k = 2s and the high half k = 2s + 1, so one shift or
// one mask turns a 32-byte load into 8 columns of one k). One step along K reads one 64-byte line, the next one
// in memory, so the hardware prefetchers stream a panel; the AVX-512 kernel's 48-column panels, read 16 columns
// at a time, put 192 bytes between the lines of one sweep and ran 1.2-1.7x slower here (a Zen 3 core, one thread,
// 6-66 rows, weights larger than the caches). Activations are float32 (a bfloat16 x is widened once per call, K
// padded to even). A block of up to 6 rows x 16 columns (float32: 12 accumulators, two weight loads and six
// broadcasts per k, so the FMAs and not the loads set the pace) or 4 x 16 (bfloat16: the widening needs four more
// registers) accumulates in ymm registers; a panel is swept once per block of rows (from L1/L2 after the first),
// and the next panel is prefetched into L2 meanwhile, spread over the sweeps.
// Sums run over k in order; bfloat16 outputs are rounded to nearest even once, at the end.
constexpr int64_t kPanel = 16;

template <typename T>
constexpr int64_t panel_block_rows() { return std::is_same_v<T, float> ? 6 : 4; }

// 8 output columns (the block's accumulators plus bias) into y; ``left`` columns of them are real.
template <typename T>
inline void store_cols8(T* y, const T* bias, __m256 v, int64_t left) {
  if (left >= 8) {
    if (bias) v = _mm256_add_ps(v, load8(bias));
    store8(y, v);
    return;
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int64_t c = 0; c < left; ++c) y[c] = from_f<T>(bias ? tmp[c] + to_f(bias[c]) : tmp[c]);
}

// Rows [0, MR) of x times one panel (``cols``: how many of its 16 columns are real).
template <typename T, int MR>
inline void panel_block_avx2(const float* __restrict x, int64_t ldx, const T* __restrict w, int64_t K,
                             const T* __restrict bias, T* __restrict y, int64_t ldy, int64_t cols,
                             const char*& prefetch, const char* prefetch_end, int64_t prefetch_per_step) {
  constexpr int kChunks = kPanel / 8;
  // `#pragma GCC unroll` on every loop over the accumulators: unrolled that early, GCC keeps them in registers;
  // left to its later complete unrolling, it kept `acc` in memory and stored all of it after every step along K
  // (12 stores per 12 FMAs: the kernel ran at half of oneDNN's speed on AVX2 at 64 rows).
  __m256 acc[MR][kChunks];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < kChunks; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  const auto advance_prefetch = [&]() {
    for (int64_t i = 0; i < prefetch_per_step && prefetch < prefetch_end; ++i, prefetch += 64) {
      _mm_prefetch(prefetch, _MM_HINT_T1);
    }
  };
  if constexpr (std::is_same_v<T, float>) {
    static_assert(kChunks == 2, "the float32 block is 16 columns");
    // One pointer per activation row, advanced with k: computed as x + r * ldx inside the loop, the row offsets
    // ran out of general registers and were reloaded from the stack at every step.
    const float* xr[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) xr[r] = x + r * ldx;
    const float* wk = w;
    for (int64_t k = 0; k < K; ++k, wk += kPanel) {
      const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(xr[r]++);
        acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
      }
      // A burst of the next panel's prefetches every eight steps: a test and a loop per step cost as much as
      // the step's own loads.
      if ((k & 7) == 7) {
        for (int64_t i = 0; i < 8 * prefetch_per_step && prefetch < prefetch_end; ++i, prefetch += 64) {
          _mm_prefetch(prefetch, _MM_HINT_T1);
        }
      }
    }
  } else {
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    const int64_t steps = (K + 1) / 2;
    for (int64_t s = 0; s < steps; ++s) {
      const uint16_t* ws = w + s * 2 * kPanel;
      const __m256i raw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws));
      const __m256i raw1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + 16));
      const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(raw0, 16));
      const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(raw0, high));
      const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(raw1, 16));
      const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(raw1, high));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 xe = _mm256_broadcast_ss(x + r * ldx + 2 * s);
        const __m256 xo = _mm256_broadcast_ss(x + r * ldx + 2 * s + 1);
        acc[r][0] = _mm256_fmadd_ps(xo, o0, _mm256_fmadd_ps(xe, e0, acc[r][0]));
        acc[r][1] = _mm256_fmadd_ps(xo, o1, _mm256_fmadd_ps(xe, e1, acc[r][1]));
      }
      advance_prefetch();
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < kChunks; ++j) {
    const int64_t left = cols - 8 * j;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      if (left > 0) store_cols8<T>(y + r * ldy + 8 * j, bias ? bias + 8 * j : nullptr, acc[r][j], left);
    }
  }
}

// Rows [m_begin, m_end) of y for panels [p_begin, p_end); x is float32 (for bfloat16 weights: K padded to even).
template <typename T>
void panel_linear_range_avx2(const float* x, int64_t ldx, const T* packed, const T* bias, T* y, int64_t N,
                             int64_t K, int64_t m_begin, int64_t m_end, int64_t p_begin, int64_t p_end) {
  constexpr int64_t kps = std::is_same_v<T, float> ? 1 : 2;
  constexpr int64_t block_rows = panel_block_rows<T>();
  const int64_t steps = (K + kps - 1) / kps;
  const int64_t panel_elems = steps * kps * kPanel;
  const int64_t panel_lines = panel_elems * static_cast<int64_t>(sizeof(T)) / 64;
  const int64_t sweeps = (m_end - m_begin + block_rows - 1) / block_rows;
  const int64_t per_step = std::max<int64_t>(1, (panel_lines + sweeps * steps - 1) / (sweeps * steps));
  for (int64_t p = p_begin; p < p_end; ++p) {
    const T* w = packed + p * panel_elems;
    const char* prefetch = p + 1 < p_end ? reinterpret_cast<const char*>(w + panel_elems) : nullptr;
    const char* prefetch_end = prefetch ? prefetch + panel_elems * static_cast<int64_t>(sizeof(T)) : nullptr;
    const int64_t col0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - col0);
    const T* b = bias ? bias + col0 : nullptr;
    for (int64_t m = m_begin; m < m_end; m += block_rows) {
      const float* xr = x + m * ldx;
      T* yr = y + m * N + col0;
      const auto block = [&](auto rows) {
        panel_block_avx2<T, decltype(rows)::value>(xr, ldx, w, K, b, yr, N, cols, prefetch, prefetch_end, per_step);
      };
      switch (std::min<int64_t>(block_rows, m_end - m)) {
        case 6: if constexpr (block_rows >= 6) block(std::integral_constant<int, 6>{}); break;
        case 5: if constexpr (block_rows >= 5) block(std::integral_constant<int, 5>{}); break;
        case 4: block(std::integral_constant<int, 4>{}); break;
        case 3: block(std::integral_constant<int, 3>{}); break;
        case 2: block(std::integral_constant<int, 2>{}); break;
        default: block(std::integral_constant<int, 1>{}); break;
      }
    }
  }
}
#endif  // INFERNEO_AVX2

// out[r, i] = silu(x[r, i]) * x[r, inter + i] for x = [rows, 2 * inter] (the fused gate and up projections).
template <typename scalar_t>
void silu_and_mul_kernel(const scalar_t* __restrict x, scalar_t* __restrict out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gate = x + r * 2 * inter;
      const scalar_t* up = gate + inter;
      scalar_t* o = out + r * inter;
      int64_t i = 0;
#ifdef __AVX512F__
      if constexpr (!std::is_same_v<scalar_t, c10::Half>) {
        for (; i + 16 <= inter; i += 16) {
          const __m512 g = load16(gate + i);
          const __m512 act = round_to<scalar_t>(inferneo_math::silu16(g));
          store16(o + i, _mm512_mul_ps(act, load16(up + i)));
        }
      }
#elif defined(INFERNEO_AVX2)
      if constexpr (!std::is_same_v<scalar_t, c10::Half>) {
        for (; i + 8 <= inter; i += 8) {
          const __m256 g = load8(gate + i);
          const __m256 act = round_to8<scalar_t>(
              _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))));
          store8(o + i, _mm256_mul_ps(act, load8(up + i)));
        }
      }
#endif
      for (; i < inter; ++i) {
        const float g = to_f(gate[i]);
        // Round silu(g) to the storage type before the product, as the two-op PyTorch version does.
        const float act = to_f(from_f<scalar_t>(g / (1.f + std::exp(-g))));
        o[i] = from_f<scalar_t>(act * to_f(up[i]));
      }
    }
  });
}

// The sum of x[d]^2 over a row, in independent partial sums (AVX-512: four of 16 lanes; else eight scalars) added
// at the end. A single running float sum is one chain of `dim` dependent FMAs, which the compiler may not reorder:
// a 48-row bfloat16 norm of width 576 on one Xeon core took 13.2 us with that chain, 11.2 without.
inline float sum_of_squares(const float* x, int64_t dim) {
  int64_t d = 0;
#ifdef __AVX512F__
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; d + 64 <= dim; d += 64) {
    for (int i = 0; i < 4; ++i) {
      const __m512 v = _mm512_loadu_ps(x + d + 16 * i);
      acc[i] = _mm512_fmadd_ps(v, v, acc[i]);
    }
  }
  for (; d + 16 <= dim; d += 16) {
    const __m512 v = _mm512_loadu_ps(x + d);
    acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
  }
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#else
  float part[8] = {};
  for (; d + 8 <= dim; d += 8) {
    for (int i = 0; i < 8; ++i) part[i] += x[d + i] * x[d + i];
  }
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
#endif
  for (; d < dim; ++d) sum += x[d] * x[d];
  return sum;
}

// One row of float32 values `x` over its root mean square into `out`: `weight * round(x / rms)` as the model's
// RMSNorm computes it, or with `offset` Gemma's `round(x / rms * (1 + weight))` in float32.
template <typename scalar_t>
inline void rms_normalize(const float* x, const scalar_t* weight, scalar_t* out, int64_t dim, float eps, bool offset) {
  const float sum = sum_of_squares(x, dim);
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
  if (offset) {
    for (int64_t d = 0; d < dim; ++d) out[d] = from_f<scalar_t>(x[d] * inv * (1.f + to_f(weight[d])));
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      const scalar_t normed = from_f<scalar_t>(x[d] * inv);
      out[d] = from_f<scalar_t>(to_f(weight[d]) * to_f(normed));
    }
  }
}

// out = weight * (x * rsqrt(mean(x^2) + eps)), computed in float32 per row (rms_normalize); with residual:
// x += residual first and the sum is written back to residual (the layer's running hidden state). `offset`:
// Gemma's norm, x * rsqrt(...) * (1 + weight) all in float32, rounded once.
template <typename scalar_t>
void rms_norm_kernel(const scalar_t* __restrict x, scalar_t* __restrict residual, const scalar_t* __restrict weight,
                     scalar_t* __restrict out, int64_t rows,
                     int64_t dim, float eps, bool offset) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(dim);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * dim;
      if (residual != nullptr) {
        scalar_t* rr = residual + r * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const scalar_t added = from_f<scalar_t>(to_f(xr[d]) + to_f(rr[d]));
          rr[d] = added;
          buf[d] = to_f(added);
        }
      } else {
        for (int64_t d = 0; d < dim; ++d) buf[d] = to_f(xr[d]);
      }
      rms_normalize(buf.data(), weight, out + r * dim, dim, eps, offset);
    }
  });
}

// One head of `2 * half` values rotated in place (rotate-half layout) by the position's cos / sin rows.
template <typename scalar_t>
inline void rotate_head(scalar_t* v, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_f(v[i]);
    const float x2 = to_f(v[i + half]);
    v[i] = from_f<scalar_t>(x1 * c[i] - x2 * s[i]);
    v[i + half] = from_f<scalar_t>(x2 * c[i] + x1 * s[i]);
  }
}

// Rotary embedding (rotate-half layout), in place on the first num_heads heads of each row of x.
template <typename scalar_t>
void rotary_kernel(scalar_t* x, const int64_t* positions, const float* cos_cache, const float* sin_cache,
                   int64_t tokens, int64_t row_stride, int64_t num_heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos_cache + positions[t] * half;
      const float* s = sin_cache + positions[t] * half;
      for (int64_t h = 0; h < num_heads; ++h) rotate_head(x + t * row_stride + h * head_dim, c, s, half);
    }
  });
}

// Per-head RMSNorm, in place, of the first num_q + num_kv heads of each row of x (query heads with q_weight, key
// heads with k_weight), each then rotated as rotary_kernel rotates it: Qwen3's and Gemma 3's q/k norms and rotary
// embedding in one pass over the fused q/k/v projection output. The norm is rms_normalize's (the model's RMSNorm,
// or with `offset` Gemma's); the rotation reads the rounded normalized values.
template <typename scalar_t>
void qk_norm_rotary_kernel(scalar_t* x, const int64_t* positions, const float* cos_cache, const float* sin_cache,
                           const scalar_t* q_weight, const scalar_t* k_weight, int64_t tokens, int64_t row_stride,
                           int64_t num_q, int64_t num_kv, int64_t head_dim, float eps, bool offset) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> head(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos_cache + positions[t] * half;
      const float* s = sin_cache + positions[t] * half;
      for (int64_t h = 0; h < num_q + num_kv; ++h) {
        scalar_t* v = x + t * row_stride + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) head[d] = to_f(v[d]);
        rms_normalize(head.data(), h < num_q ? q_weight : k_weight, v, head_dim, eps, offset);
        rotate_head(v, c, s, half);
      }
    }
  });
}

}  // namespace

// The float32 [kv_heads] scales of an FP8 cache (checked), or undefined tensors for a cache in the model dtype.
std::pair<torch::Tensor, torch::Tensor> cache_scales(const torch::Tensor& kv_cache, int64_t num_kv_heads,
                                                     const c10::optional<torch::Tensor>& k_scale,
                                                     const c10::optional<torch::Tensor>& v_scale, const char* name) {
  if (kv_cache.scalar_type() != at::kFloat8_e4m3fn) return {};
  TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), name, ": an FP8 KV cache needs k_scale and v_scale");
  auto ks = k_scale->contiguous(), vs = v_scale->contiguous();
  TORCH_CHECK(ks.scalar_type() == torch::kFloat && vs.scalar_type() == torch::kFloat && ks.numel() == num_kv_heads &&
                  vs.numel() == num_kv_heads,
              name, ": k_scale and v_scale must be float32, one per KV head");
  return {ks, vs};
}

// The checks of the new tokens' keys, values and slots that store_kv and store_kv_and_decode make (`what` names the
// caller in each message); returns the slots, contiguous. Every slot must lie inside the cache (negative: skipped).
torch::Tensor checked_slots(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& kv_cache,
                            const torch::Tensor& slot_mapping, const char* what) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes(), what, ": k and v must be [tokens, heads, dim]");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              what, ": k and v rows must be contiguous per token");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() && kv_cache.size(0) == 2, what, ": bad cache");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong, what, ": int64 slots");
  TORCH_CHECK(k.size(1) == kv_cache.size(1) && kv_cache.size(3) % k.size(2) == 0, what, ": shape mismatch");
  TORCH_CHECK(slot_mapping.numel() >= k.size(0), what, ": ", slot_mapping.numel(), " slots for ", k.size(0), " tokens");
  torch::Tensor slots = slot_mapping.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t cache_slots = kv_cache.size(2) * (kv_cache.size(3) / k.size(2));
  for (int64_t i = 0; i < k.size(0); ++i) {
    TORCH_CHECK(sp[i] < cache_slots, what, ": slot ", sp[i], " is outside the cache's ", cache_slots);
  }
  return slots;
}

void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache, torch::Tensor slot_mapping,
              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale) {
  const torch::Tensor slots = checked_slots(k, v, kv_cache, slot_mapping, "store_kv");
  const int64_t head_dim = k.size(2), num_kv_heads = kv_cache.size(1), num_blocks = kv_cache.size(2);
  const auto [ks, vs] = cache_scales(kv_cache, num_kv_heads, k_scale, v_scale, "store_kv");
  dispatch_storage_and_cache(k.scalar_type(), kv_cache.scalar_type(), "store_kv", [&](auto tag, auto cache_tag) {
    using scalar_t = decltype(tag);
    using cache_t = decltype(cache_tag);
    store_kv_kernel<scalar_t, cache_t>(
        static_cast<const scalar_t*>(k.data_ptr()), static_cast<const scalar_t*>(v.data_ptr()), k.stride(0),
        v.stride(0), static_cast<cache_t*>(kv_cache.data_ptr()), slots.data_ptr<int64_t>(), k.size(0), num_kv_heads,
        head_dim, num_blocks, kv_cache.size(3) / head_dim, ks.defined() ? ks.data_ptr<float>() : nullptr,
        vs.defined() ? vs.data_ptr<float>() : nullptr);
  });
}

// q: [batch, heads, head_dim] with contiguous heads (any batch stride); out: the same shape, contiguous.
// Query i attends to the first seq_lens[i] tokens of the blocks in row table_rows[i] of block_tables (row i when
// table_rows is None). Prompt tokens use this too: token j of a prompt is a query over its first j + 1 tokens,
// and all of a prompt's tokens share one table row.
// sliding_window (0: none), logit_softcap (0: none) and sinks (float32 [heads], optional) as in DecodeShape.
void paged_decode_attention_impl(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                                 torch::Tensor seq_lens, double scale, torch::Tensor out,
                                 c10::optional<torch::Tensor> table_rows, int64_t sliding_window,
                                 double logit_softcap, c10::optional<torch::Tensor> sinks,
                                 c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                 const torch::Tensor* new_k, const torch::Tensor* new_v, const int64_t* new_slots) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "decode: q must be [batch, heads, dim]");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "decode: out");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() && kv_cache.size(0) == 2, "decode: bad cache");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && seq_lens.scalar_type() == torch::kLong, "int64 indices");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  TORCH_CHECK(lens.numel() == q.size(0), "decode: one sequence length per query");
  torch::Tensor rows;
  if (table_rows.has_value()) {
    rows = table_rows->contiguous();
    TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.numel() == q.size(0), "decode: one int64 table row per query");
  } else {
    TORCH_CHECK(tables.size(0) >= q.size(0), "decode: one block-table row per query");
  }
  const int64_t* rows_ptr = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(sliding_window >= 0 && logit_softcap >= 0., "decode: sliding_window and logit_softcap must be >= 0");
  torch::Tensor sink_logits;
  if (sinks.has_value()) {
    sink_logits = sinks->contiguous();
    TORCH_CHECK(sink_logits.scalar_type() == torch::kFloat && sink_logits.numel() == q.size(1),
                "decode: sinks must be float32, one per query head");
  }
  const auto [ks, vs] = cache_scales(kv_cache, kv_cache.size(1), k_scale, v_scale, "decode");
  DecodeShape shape{q.size(0), q.size(1), kv_cache.size(1), q.size(2), kv_cache.size(2),
                    kv_cache.size(3) / q.size(2), tables.size(1), q.stride(0), static_cast<float>(scale),
                    sliding_window, static_cast<float>(logit_softcap),
                    sink_logits.defined() ? sink_logits.data_ptr<float>() : nullptr,
                    ks.defined() ? ks.data_ptr<float>() : nullptr, vs.defined() ? vs.data_ptr<float>() : nullptr};
  TORCH_CHECK(shape.num_heads % shape.num_kv_heads == 0 && kv_cache.size(3) % shape.head_dim == 0, "shape mismatch");
  // Every query must stay inside its table row and the row inside the table: a wrong index reads foreign memory.
  const int64_t* lens_ptr = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < shape.batch; ++i) {
    TORCH_CHECK(lens_ptr[i] >= 0 && lens_ptr[i] <= shape.max_blocks * shape.block_size,
                "decode: query ", i, " has length ", lens_ptr[i], ", its table row holds ",
                shape.max_blocks * shape.block_size, " tokens");
    TORCH_CHECK(!rows_ptr || (rows_ptr[i] >= 0 && rows_ptr[i] < tables.size(0)),
                "decode: query ", i, " names table row ", rows_ptr ? rows_ptr[i] : i, " of ", tables.size(0));
  }
  dispatch_storage_and_cache(q.scalar_type(), kv_cache.scalar_type(), "paged_decode_attention",
                             [&](auto tag, auto cache_tag) {
    using scalar_t = decltype(tag);
    using cache_t = decltype(cache_tag);
    const auto* qp = static_cast<const scalar_t*>(q.data_ptr());
    const auto* cp = static_cast<const cache_t*>(kv_cache.data_ptr());
    auto* op = static_cast<scalar_t*>(out.data_ptr());
#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
    if (shape.block_size % 16 == 0 && shape.head_dim % kDecodeLanes == 0) {
      if (new_k != nullptr) {
        const NewTokens<scalar_t> fresh{static_cast<const scalar_t*>(new_k->data_ptr()),
                                        static_cast<const scalar_t*>(new_v->data_ptr()), new_k->stride(0),
                                        new_v->stride(0), new_slots};
        decode_vector<scalar_t, cache_t>(qp, cp, tables.data_ptr<int64_t>(), rows_ptr, lens.data_ptr<int64_t>(), op,
                                         shape, &fresh);
        return;
      }
      decode_vector<scalar_t, cache_t>(qp, cp, tables.data_ptr<int64_t>(), rows_ptr, lens.data_ptr<int64_t>(), op,
                                       shape);
      return;
    }
#endif
    TORCH_CHECK(new_k == nullptr, "decode: new tokens are stored by the vector kernel only");
    decode_scalar<scalar_t, cache_t>(qp, cp, tables.data_ptr<int64_t>(), rows_ptr, lens.data_ptr<int64_t>(), op,
                                     shape);
  });
}

void paged_decode_attention(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                            torch::Tensor seq_lens, double scale, torch::Tensor out,
                            c10::optional<torch::Tensor> table_rows, int64_t sliding_window, double logit_softcap,
                            c10::optional<torch::Tensor> sinks, c10::optional<torch::Tensor> k_scale,
                            c10::optional<torch::Tensor> v_scale) {
  paged_decode_attention_impl(q, kv_cache, block_tables, seq_lens, scale, out, table_rows, sliding_window,
                              logit_softcap, sinks, k_scale, v_scale, nullptr, nullptr, nullptr);
}

// A step of decode rows only (row b: one new token of sequence b, query q[b], key k[b] and value v[b], slot
// slot_mapping[b]): store_kv and paged_decode_attention in one pass, each (row, kv head) item writing its new key
// and value just before it reads the row's blocks, so the key rows' cache lines (dimension-major: one line per two
// dimensions of a 16-token block) are fetched once, by the item that needs them, instead of once by a separate
// store and again by the attention. Plain attention (no window, soft-capping, sinks) on a cache in q's dtype;
// the results and the cache equal the two calls'.
void store_kv_and_decode(torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache, torch::Tensor slot_mapping,
                         torch::Tensor q, torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                         torch::Tensor out) {
  TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type() && k.scalar_type() == q.scalar_type() &&
                  v.scalar_type() == q.scalar_type(),
              "store_kv_and_decode: k, v and the cache must be in q's dtype");
  const torch::Tensor slots = checked_slots(k, v, kv_cache, slot_mapping, "store_kv_and_decode");
  TORCH_CHECK(k.size(0) == q.size(0) && slot_mapping.numel() == q.size(0) && k.size(2) == q.size(2),
              "store_kv_and_decode: one new token, key, value and slot per query row");
#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
  const bool vector_path = (kv_cache.size(3) / q.size(2)) % 16 == 0 && q.size(2) % kDecodeLanes == 0;
#else
  const bool vector_path = false;
#endif
  if (!vector_path) {  // the scalar kernel: the two calls
    store_kv(k, v, kv_cache, slots, c10::nullopt, c10::nullopt);
    paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, out, c10::nullopt, 0, 0.0, c10::nullopt,
                           c10::nullopt, c10::nullopt);
    return;
  }
  paged_decode_attention_impl(q, kv_cache, block_tables, seq_lens, scale, out, c10::nullopt, 0, 0.0, c10::nullopt,
                              c10::nullopt, c10::nullopt, &k, &v, slots.data_ptr<int64_t>());
}

torch::Tensor silu_and_mul(torch::Tensor x) {
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 2 == 0, "silu_and_mul: contiguous input with an even last dim");
  const int64_t inter = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = inter;
  auto out = torch::empty(sizes, x.options());
  dispatch_storage(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using scalar_t = decltype(tag);
    silu_and_mul_kernel<scalar_t>(static_cast<const scalar_t*>(x.data_ptr()), static_cast<scalar_t*>(out.data_ptr()),
                                  x.numel() / x.size(-1), inter);
  });
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps,
                       bool weight_offset) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.scalar_type() == weight.scalar_type(), "rms_norm inputs");
  auto out = torch::empty_like(x);
  const int64_t dim = x.size(-1);
  const int64_t rows = x.numel() / dim;
  dispatch_storage(x.scalar_type(), "rms_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* res = nullptr;
    if (residual.has_value()) {
      TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes(), "residual must match x");
      res = static_cast<scalar_t*>(residual->data_ptr());
    }
    rms_norm_kernel<scalar_t>(static_cast<const scalar_t*>(x.data_ptr()), res,
                              static_cast<const scalar_t*>(weight.data_ptr()), static_cast<scalar_t*>(out.data_ptr()),
                              rows, dim, static_cast<float>(eps), weight_offset);
  });
  return out;
}

void rotary_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_cache, torch::Tensor sin_cache,
                    int64_t num_heads, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rotary: x must be [tokens, width] with unit inner stride");
  TORCH_CHECK(cos_cache.scalar_type() == torch::kFloat && cos_cache.is_contiguous() && sin_cache.is_contiguous(),
              "rotary: float32 contiguous tables");
  auto pos = positions.contiguous();
  dispatch_storage(x.scalar_type(), "rotary", [&](auto tag) {
    using scalar_t = decltype(tag);
    rotary_kernel<scalar_t>(static_cast<scalar_t*>(x.data_ptr()), pos.data_ptr<int64_t>(), cos_cache.data_ptr<float>(),
                            sin_cache.data_ptr<float>(), x.size(0), x.stride(0), num_heads, head_dim);
  });
}

void qk_norm_rotary_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_cache,
                            torch::Tensor sin_cache, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                            torch::Tensor q_weight, torch::Tensor k_weight, double eps, bool weight_offset) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) >= (num_q_heads + num_kv_heads) * head_dim,
              "qk_norm_rotary: x must be [tokens, width] with unit inner stride, holding the query and key heads");
  TORCH_CHECK(cos_cache.scalar_type() == torch::kFloat && cos_cache.is_contiguous() && sin_cache.is_contiguous(),
              "qk_norm_rotary: float32 contiguous tables");
  TORCH_CHECK(q_weight.scalar_type() == x.scalar_type() && k_weight.scalar_type() == x.scalar_type() &&
                  q_weight.numel() == head_dim && k_weight.numel() == head_dim,
              "qk_norm_rotary: q_weight and k_weight must be [head_dim] in x's dtype");
  auto pos = positions.contiguous();
  auto qw = q_weight.contiguous(), kw = k_weight.contiguous();
  dispatch_storage(x.scalar_type(), "qk_norm_rotary", [&](auto tag) {
    using scalar_t = decltype(tag);
    qk_norm_rotary_kernel<scalar_t>(static_cast<scalar_t*>(x.data_ptr()), pos.data_ptr<int64_t>(),
                                    cos_cache.data_ptr<float>(), sin_cache.data_ptr<float>(),
                                    static_cast<const scalar_t*>(qw.data_ptr()),
                                    static_cast<const scalar_t*>(kw.data_ptr()), x.size(0), x.stride(0), num_q_heads,
                                    num_kv_heads, head_dim, static_cast<float>(eps), weight_offset);
  });
}

bool panel_linear_available() {
#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
  return true;
#else
  return false;
#endif
}

bool panel_linear_bf16_available() {
#if (defined(__AVX512F__) && defined(__AVX512BF16__)) || defined(INFERNEO_AVX2)
  return true;
#else
  return false;
#endif
}

// Output columns per packed panel of panel_linear in this build: 48 with AVX-512, 16 with AVX2 (the layouts are
// described above each kernel); the Python side packs to it.
int64_t panel_width() {
#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
  return kPanel;
#else
  return 48;
#endif
}

// The instruction set the vector kernels of this build use: "avx512_bf16", "avx512", "avx2" or "portable".
std::string vector_isa() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(INFERNEO_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
// Runs range(m0, m1, p0, p1) (rows [m0, m1) of the output for panels [p0, p1)) on the OpenMP threads.
template <typename Range>
void run_panel_linear(int64_t M, int64_t N, Range range) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int threads = std::max(1, at::get_num_threads());
  // Split panels between threads when there are enough of them (each thread streams its own weights); otherwise
  // split rows (a narrow layer over a long prompt).
  const bool by_panel = panels >= threads || M < 16 * threads;
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), T_ = omp_get_num_threads();
    if (by_panel) {
      range(0, M, panels * t / T_, panels * (t + 1) / T_);
    } else {
      const int64_t blocks = (M + 7) / 8;
      range(std::min(M, 8 * (blocks * t / T_)), std::min(M, 8 * (blocks * (t + 1) / T_)), 0, panels);
    }
  }
}
#endif

// x: [M, K] with unit inner stride, float32 or bfloat16; packed: the weight packed by the Python side
// (float32 [panels, K, W]; bfloat16 [panels, ceil(K/2), W, 2], W = panel_width()); bias: [N] of x's dtype, or
// None.
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, int64_t N,
                           c10::optional<torch::Tensor> out) {
#if defined(__AVX512F__) || defined(INFERNEO_AVX2)
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && (x.scalar_type() == torch::kFloat || bf16),
              "panel_linear: x [M, K], float32 or bfloat16, unit inner stride");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type() && packed.is_contiguous(), "panel_linear: packed weight dtype");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t kps = bf16 ? 2 : 1;
  TORCH_CHECK(packed.numel() == packed.size(0) * ((K + kps - 1) / kps) * kps * kPanel &&
              packed.size(0) * kPanel >= N, "panel_linear: packed weight shape");
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == x.scalar_type(), "bias");
  }
  torch::Tensor y;
  if (out.has_value()) {
    y = *out;
    TORCH_CHECK(y.is_contiguous() && y.dim() == 2 && y.size(0) == M && y.size(1) == N &&
                y.scalar_type() == x.scalar_type(), "panel_linear: out must be a contiguous [M, N] tensor of x's dtype");
  } else {
    y = torch::empty({M, N}, x.options());
  }
  if (M == 0) return y;
  if (bf16) {
    using T = uint16_t;
    const auto* wp = static_cast<const T*>(packed.data_ptr());
    const T* bp = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
    auto* yp = static_cast<T*>(y.data_ptr());
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    const auto* xp = static_cast<const T*>(x.data_ptr());
    const int64_t ldx = x.stride(0);
    run_panel_linear(M, N, [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
      panel_linear_range<T>(xp, ldx, wp, bp, yp, N, K, m0, m1, p0, p1);
    });
#elif defined(INFERNEO_AVX2)
    // the activations widened to float32 once, K padded to even (the pair layout's last pair)
    torch::Tensor xf = K % 2 ? torch::zeros({M, K + 1}, x.options().dtype(torch::kFloat)) : torch::Tensor();
    if (K % 2) {
      xf.narrow(1, 0, K).copy_(x);
    } else {
      xf = x.to(torch::kFloat).contiguous();
    }
    const float* xp = xf.data_ptr<float>();
    const int64_t ldx = xf.stride(0);
    run_panel_linear(M, N, [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
      panel_linear_range_avx2<T>(xp, ldx, wp, bp, yp, N, K, m0, m1, p0, p1);
    });
#else
    TORCH_CHECK(false, "panel_linear in bfloat16 needs a build with AVX512_BF16 (or an AVX2 build)");
#endif
  } else {
    const float* xp = x.data_ptr<float>();
    const float* wp = packed.data_ptr<float>();
    const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    const int64_t ldx = x.stride(0);
    run_panel_linear(M, N, [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
#ifdef __AVX512F__
      panel_linear_range<float>(xp, ldx, wp, bp, yp, N, K, m0, m1, p0, p1);
#else
      panel_linear_range_avx2<float>(xp, ldx, wp, bp, yp, N, K, m0, m1, p0, p1);
#endif
    });
  }
  return y;
#else
  TORCH_CHECK(false, "panel_linear needs a build with AVX-512 or AVX2");
  return x;
#endif
}

// The first index of a row's largest value, as torch.argmax picks it: ties go to the lowest index and a NaN counts
// as larger than every number (the row's first NaN wins). One pass finds the maximum (NaN kept out of it) and
// whether the row holds a NaN, a second the first index holding the maximum (or the first NaN).
#ifdef __AVX512F__
// The first min(n, 16) of 16 lanes.
inline __mmask16 lanes_mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

int64_t row_argmax(const float* row, int64_t V) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = minus_inf, m1 = minus_inf, m2 = minus_inf, m3 = minus_inf;
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 64 <= V; i += 64) {  // four accumulators: max_ps's latency, not its throughput, would bound one
    const __m512 a = _mm512_loadu_ps(row + i), b = _mm512_loadu_ps(row + i + 16), c = _mm512_loadu_ps(row + i + 32),
                 d = _mm512_loadu_ps(row + i + 48);
    m0 = _mm512_max_ps(a, m0);  // a NaN in the first operand yields the second: the maximum never turns NaN
    m1 = _mm512_max_ps(b, m1);
    m2 = _mm512_max_ps(c, m2);
    m3 = _mm512_max_ps(d, m3);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(c, d, _CMP_UNORD_Q);
  }
  for (; i < V; i += 16) {
    const __mmask16 valid = lanes_mask16(V - i);
    const __m512 a = _mm512_mask_loadu_ps(minus_inf, valid, row + i);
    m0 = _mm512_max_ps(a, m0);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  }
  const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3))));
  for (int64_t j = 0; j < V; j += 16) {
    const __m512 a = _mm512_maskz_loadu_ps(lanes_mask16(V - j), row + j);
    const __mmask16 hit = (nan ? _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(a, best, _CMP_EQ_OQ)) &
                          lanes_mask16(V - j);
    if (hit) return j + __builtin_ctz(hit);
  }
  return 0;  // not reached: the maximum (or the NaN) is in the row
}
#else
int64_t row_argmax(const float* row, int64_t V) {
  float best = row[0];
  int64_t index = 0;
  if (best != best) return 0;
  for (int64_t i = 1; i < V; ++i) {
    const float v = row[i];
    if (v != v) return i;
    if (v > best) {
      best = v;
      index = i;
    }
  }
  return index;
}
#endif

// Row-wise argmax of float32 [rows, V] (unit inner stride) -> int64 [rows] (row_argmax), rows shared between the
// threads. torch's reduction keeps an index beside every lane and took 0.6 ms on a [48, 49152] batch of logits on
// two Zen 5 cores, about a fifth of it in every greedy decode step of a small model.
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "argmax_rows: x must be a CPU float32 [rows, V] tensor with unit inner stride");
  const int64_t rows = x.size(0), V = x.size(1), ld = x.stride(0);
  TORCH_CHECK(V > 0, "argmax_rows: rows of zero length have no argmax");
  torch::Tensor out = torch::empty({rows}, torch::kLong);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = row_argmax(xp + r * ld, V);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("store_kv", &store_kv, "Write new keys and values into their paged-cache slots (FP8: quantized)",
        py::arg("k"), py::arg("v"), py::arg("kv_cache"), py::arg("slot_mapping"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none());
  m.def("paged_decode_attention", &paged_decode_attention, "Paged attention of one query per row (CPU), into out",
        py::arg("q"), py::arg("kv_cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"),
        py::arg("out"), py::arg("table_rows") = py::none(), py::arg("sliding_window") = 0,
        py::arg("logit_softcap") = 0.0, py::arg("sinks") = py::none(), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none());
  m.def("store_kv_and_decode", &store_kv_and_decode,
        "store_kv and paged_decode_attention for a step of decode rows only, each row's new key and value stored "
        "by the item that reads its blocks",
        py::arg("k"), py::arg("v"), py::arg("kv_cache"), py::arg("slot_mapping"), py::arg("q"),
        py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"), py::arg("out"));
  m.def("silu_and_mul", &silu_and_mul, "SiLU of the first half times the second half");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally adding the residual in place first (weight_offset: Gemma's "
        "x / rms * (1 + weight) in float32)", py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"),
        py::arg("weight_offset") = false);
  m.def("rotary_inplace", &rotary_inplace, "Rotary embedding in place on the leading heads of each row");
  m.def("qk_norm_rotary_inplace", &qk_norm_rotary_inplace,
        "Per-head RMSNorm of the query and key heads of each row (Gemma's offset weight with weight_offset), then "
        "the rotary embedding, in place",
        py::arg("x"), py::arg("positions"), py::arg("cos_cache"), py::arg("sin_cache"), py::arg("num_q_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("q_weight"), py::arg("k_weight"), py::arg("eps"),
        py::arg("weight_offset") = false);
  m.def("panel_linear_available", &panel_linear_available, "Whether panel_linear was built (AVX-512 or AVX2)");
  m.def("panel_width", &panel_width, "Output columns per packed panel of panel_linear (48 AVX-512, 16 AVX2)");
  m.def("vector_isa", &vector_isa, "The vector instruction set of this build: avx512_bf16, avx512, avx2 or portable");
  m.def("panel_linear_bf16_available", &panel_linear_bf16_available, "Whether panel_linear takes bfloat16 here");
  m.def("panel_linear", &panel_linear,
        "x @ W^T (+ bias), float32 or bfloat16, W packed in panels of panel_width() columns",
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("N"), py::arg("out") = py::none());
  m.def("argmax_rows", &argmax_rows, "The first index of each row's maximum (torch.argmax(dim=-1)'s choice, NaN "
        "first), float32 [rows, V]", py::arg("x"));
}
