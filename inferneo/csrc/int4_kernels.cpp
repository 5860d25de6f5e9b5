// 4-bit weight-only linear layer on the CPU: y[M, N] = x[M, K] @ W.T with W de-quantized in registers.
//
// Weights are in Inferneo's canonical int4 layout (inferneo/quantization/int4_layouts.py): packed int32 [N/8, K],
// word (p, k) holding the 4-bit codes of rows 8p..8p+7 of column k (code j in bits 4j..4j+3); scales float32
// [K/g, N] and zero points uint8 [K/g, N] per group of g consecutive input columns: W[n, k] = (q - z) * s.
//
// The AVX2 path walks the output in blocks of 16 columns (two 8-row panels; a last panel of 8 alone). For each
// block and each group of rows of x (up to 4), it steps along k: one broadcast word per panel is shifted by
// (0, 4, ..., 28), masked, offset by the group's zero points (integer subtraction), converted and multiplied by
// the group's scales: eight float32 weights, exactly the reference (q - z) * s, which every row of the group
// multiplies into its accumulators. Work is split over column blocks with at::parallel_for. Large batches
// (rows >= kBufferedRows) de-quantize each block's panel once into a per-thread float32 buffer and sweep it with a
// 6 x 16 register tile, so the de-quantization is not repeated for every four rows.
//
// The path is chosen at run time from the CPU's features (__builtin_cpu_supports): AVX2 + FMA, else portable
// scalar loops. float32 and bfloat16 activations (bfloat16 widened to float32 once; the result rounded back).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define INFERNEO_X86 1
#endif

// Fully unroll the loops over a tile's rows and panels, so that its accumulators live in registers.
#define INFERNEO_UNROLL _Pragma("GCC unroll 8")

namespace {

constexpr int64_t kBufferedRows = 16;

struct Problem {
  const float* x;  // [M, K]
  const int32_t* packed;  // [N/8, K]
  const float* scales;  // [K/g, N]
  const uint8_t* zeros;  // [K/g, N]
  float* y;  // [M, N]
  int64_t M, N, K, group;
};

// ---- portable path ----

void scalar_columns(const Problem& p, int64_t n_begin, int64_t n_end) {
  std::vector<float> w(p.K);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int32_t* words = p.packed + (n / 8) * p.K;
    const int shift = 4 * static_cast<int>(n % 8);
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t g = (k / p.group) * p.N + n;
      const int q = (words[k] >> shift) & 15;
      w[k] = static_cast<float>(q - static_cast<int>(p.zeros[g])) * p.scales[g];
    }
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xr = p.x + m * p.K;
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k) acc += xr[k] * w[k];
      p.y[m * p.N + n] = acc;
    }
  }
}

#ifdef INFERNEO_X86

// Eight de-quantized weights: rows 8p..8p+7 of column k, from one packed word.
__attribute__((target("avx2,fma"))) inline __m256 dequant8(int32_t word, __m256i zeros, __m256 scales) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(15));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, zeros)), scales);
}

__attribute__((target("avx2,fma"))) inline __m256i load_zeros8(const uint8_t* z) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z)));
}

// A tile's accumulators: MR rows x NP panels of eight columns.
template <int MR, int NP>
__attribute__((target("avx2,fma"))) inline void zero_tile(__m256 (&acc)[MR][NP]) {
  INFERNEO_UNROLL for (int r = 0; r < MR; ++r)
    INFERNEO_UNROLL for (int j = 0; j < NP; ++j) acc[r][j] = _mm256_setzero_ps();
}

// acc[r] += x[r, k] * w for each row r of the tile (x rows K apart).
template <int MR, int NP>
__attribute__((target("avx2,fma"))) inline void fma_rows(__m256 (&acc)[MR][NP], const __m256 (&w)[NP],
                                                         const float* x, int64_t K, int64_t k) {
  INFERNEO_UNROLL for (int r = 0; r < MR; ++r) {
    const __m256 a = _mm256_broadcast_ss(x + r * K + k);
    INFERNEO_UNROLL for (int j = 0; j < NP; ++j) acc[r][j] = _mm256_fmadd_ps(a, w[j], acc[r][j]);
  }
}

template <int MR, int NP>
__attribute__((target("avx2,fma"))) inline void store_tile(const __m256 (&acc)[MR][NP], const Problem& p,
                                                           int64_t m0, int64_t n0) {
  INFERNEO_UNROLL for (int r = 0; r < MR; ++r)
    INFERNEO_UNROLL for (int j = 0; j < NP; ++j) _mm256_storeu_ps(p.y + (m0 + r) * p.N + n0 + 8 * j, acc[r][j]);
}

// Rows [m0, m0 + MR) x columns [n0, n0 + 8 * NP): de-quantize in registers along k.
template <int MR, int NP>
__attribute__((target("avx2,fma"))) void register_tile(const Problem& p, int64_t m0, int64_t n0) {
  __m256 acc[MR][NP];
  zero_tile<MR, NP>(acc);
  const int32_t* words = p.packed + (n0 / 8) * p.K;
  const float* x = p.x + m0 * p.K;
  for (int64_t g0 = 0; g0 < p.K; g0 += p.group) {
    const int64_t gi = (g0 / p.group) * p.N + n0;
    __m256i z[NP];
    __m256 s[NP];
    INFERNEO_UNROLL for (int j = 0; j < NP; ++j) {
      z[j] = load_zeros8(p.zeros + gi + 8 * j);
      s[j] = _mm256_loadu_ps(p.scales + gi + 8 * j);
    }
    for (int64_t k = g0; k < g0 + p.group; ++k) {
      __m256 w[NP];
      INFERNEO_UNROLL for (int j = 0; j < NP; ++j) w[j] = dequant8(words[j * p.K + k], z[j], s[j]);
      fma_rows<MR, NP>(acc, w, x, p.K, k);
    }
  }
  store_tile<MR, NP>(acc, p, m0, n0);
}

template <int NP>
__attribute__((target("avx2,fma"))) void register_columns(const Problem& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) register_tile<4, NP>(p, m, n0);
  switch (p.M - m) {
    case 3: register_tile<3, NP>(p, m, n0); break;
    case 2: register_tile<2, NP>(p, m, n0); break;
    case 1: register_tile<1, NP>(p, m, n0); break;
    default: break;
  }
}

// Rows [m0, m0 + MR) x the 16 (NP = 2) or 8 columns at n0, from a de-quantized panel buf [K][8 * NP].
template <int MR, int NP>
__attribute__((target("avx2,fma"))) void buffered_tile(const Problem& p, const float* buf, int64_t m0, int64_t n0) {
  __m256 acc[MR][NP];
  zero_tile<MR, NP>(acc);
  const float* x = p.x + m0 * p.K;
  for (int64_t k = 0; k < p.K; ++k) {
    __m256 w[NP];
    INFERNEO_UNROLL for (int j = 0; j < NP; ++j) w[j] = _mm256_loadu_ps(buf + k * 8 * NP + 8 * j);
    fma_rows<MR, NP>(acc, w, x, p.K, k);
  }
  store_tile<MR, NP>(acc, p, m0, n0);
}

template <int NP>
__attribute__((target("avx2,fma"))) void buffered_columns(const Problem& p, float* buf, int64_t n0) {
  const int32_t* words = p.packed + (n0 / 8) * p.K;
  for (int64_t g0 = 0; g0 < p.K; g0 += p.group) {
    const int64_t gi = (g0 / p.group) * p.N + n0;
    INFERNEO_UNROLL for (int j = 0; j < NP; ++j) {
      const __m256i z = load_zeros8(p.zeros + gi + 8 * j);
      const __m256 s = _mm256_loadu_ps(p.scales + gi + 8 * j);
      for (int64_t k = g0; k < g0 + p.group; ++k) _mm256_storeu_ps(buf + k * 8 * NP + 8 * j,
                                                                    dequant8(words[j * p.K + k], z, s));
    }
  }
  int64_t m = 0;
  for (; m + 6 <= p.M; m += 6) buffered_tile<6, NP>(p, buf, m, n0);
  switch (p.M - m) {
    case 5: buffered_tile<5, NP>(p, buf, m, n0); break;
    case 4: buffered_tile<4, NP>(p, buf, m, n0); break;
    case 3: buffered_tile<3, NP>(p, buf, m, n0); break;
    case 2: buffered_tile<2, NP>(p, buf, m, n0); break;
    case 1: buffered_tile<1, NP>(p, buf, m, n0); break;
    default: break;
  }
}

// Column blocks [b_begin, b_end) of 16 columns (the last may hold 8).
__attribute__((target("avx2,fma"))) void avx2_blocks(const Problem& p, int64_t b_begin, int64_t b_end) {
  const bool buffered = p.M >= kBufferedRows;
  std::vector<float> buf(buffered ? p.K * 16 : 0);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t n0 = b * 16;
    const bool pair = n0 + 16 <= p.N;
    if (buffered) {
      pair ? buffered_columns<2>(p, buf.data(), n0) : buffered_columns<1>(p, buf.data(), n0);
    } else {
      pair ? register_columns<2>(p, n0) : register_columns<1>(p, n0);
    }
  }
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#else

bool cpu_has_avx2() { return false; }

#endif

std::string best_isa() { return cpu_has_avx2() ? "avx2" : "scalar"; }

// y = x @ W.T for canonical int4 weights; isa: "auto" (the best this CPU runs), "avx2" or "scalar".
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& zeros, int64_t group, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2, "int4_linear: x must be [M, K]");
  TORCH_CHECK(packed.scalar_type() == torch::kInt32 && packed.dim() == 2 && packed.is_contiguous(),
              "int4_linear: packed must be a contiguous int32 [N/8, K] tensor");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous(), "int4_linear: float32 scales");
  TORCH_CHECK(zeros.scalar_type() == torch::kUInt8 && zeros.is_contiguous(), "int4_linear: uint8 zeros");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 8;
  TORCH_CHECK(packed.size(1) == K, "int4_linear: x has ", K, " columns, the weight ", packed.size(1));
  TORCH_CHECK(group > 0 && K % group == 0, "int4_linear: group size ", group, " does not divide ", K);
  TORCH_CHECK(scales.size(0) == K / group && scales.size(1) == N && zeros.sizes() == scales.sizes(),
              "int4_linear: scales/zeros must be [K/g, N]");
  const std::string path = isa == "auto" ? best_isa() : isa;
  TORCH_CHECK(path == "scalar" || (path == "avx2" && cpu_has_avx2()), "int4_linear: isa ", isa,
              " is not available on this CPU (", best_isa(), ")");
  const auto xf = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const Problem p{xf.data_ptr<float>(), packed.data_ptr<int32_t>(), scales.data_ptr<float>(),
                  zeros.data_ptr<uint8_t>(), y.data_ptr<float>(), M, N, K, group};
  if (M > 0) {
#ifdef INFERNEO_X86
    if (path == "avx2") {
      at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) { avx2_blocks(p, b0, b1); });
      return y.to(x.scalar_type());
    }
#endif
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) { scalar_columns(p, n0, n1); });
  }
  return y.to(x.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "y = x @ W.T for canonical int4 weights (see int4_kernels.cpp)",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("group"), pybind11::arg("isa") = "auto");
  m.def("best_isa", &best_isa, "the fastest path this CPU runs: avx2 or scalar");
}
