// Native CPU kernels: paged decode attention, RMSNorm with residual, and rotary embedding.
//
// Paged decode attention: one query token per request, read straight from the paged KV cache.
//
// Cache layout (one half, keys or values): [num_kv_heads, num_blocks, block_size, head_dim], the layout of the
// torch reference backend. Work is split over (request, kv head) pairs; each pair walks its request's blocks once,
// keeping a running max and sum (online softmax, rescaled once per block) for every query head of its group.
// Scores and accumulators are float32 whatever the cache dtype.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Storage types: float, c10::Half, and bfloat16 handled as raw uint16_t bits so that conversions are plain
// shifts the compiler vectorizes (round to nearest even on the way down; NaN payloads are not preserved).
inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
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

template <typename scalar_t>
void decode_kernel(const scalar_t* __restrict q, const scalar_t* __restrict k_cache, const scalar_t* __restrict v_cache, const int64_t* tables,
                   const int64_t* seq_lens, scalar_t* out, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                   int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), scores(group * block_size);
    std::vector<float> row_max(group), row_sum(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads;
      const int64_t kvh = item % num_kv_heads;
      const int64_t len = seq_lens[b];
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* qp = q + (b * num_heads + kvh * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = to_f(qp[d]) * scale;
        row_max[g] = -std::numeric_limits<float>::infinity();
        row_sum[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t num_used = (len + block_size - 1) / block_size;
      for (int64_t blk = 0; blk < num_used; ++blk) {
        const int64_t block_id = tables[b * max_blocks + blk];
        const int64_t base = ((kvh * num_blocks + block_id) * block_size) * head_dim;
        const int64_t n = std::min(block_size, len - blk * block_size);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float block_max = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < n; ++t) {
            const scalar_t* kp = k_cache + base + t * head_dim;
            float s = 0.f;
            for (int64_t d = 0; d < head_dim; ++d) s += qg[d] * to_f(kp[d]);
            scores[g * block_size + t] = s;
            block_max = std::max(block_max, s);
          }
          const float new_max = std::max(row_max[g], block_max);
          const float correction = std::exp(row_max[g] - new_max);
          float* ag = acc.data() + g * head_dim;
          if (correction != 1.f) {
            for (int64_t d = 0; d < head_dim; ++d) ag[d] *= correction;
          }
          float sum = row_sum[g] * correction;
          for (int64_t t = 0; t < n; ++t) {
            const float p = std::exp(scores[g * block_size + t] - new_max);
            sum += p;
            const scalar_t* vp = v_cache + base + t * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * to_f(vp[d]);
          }
          row_max[g] = new_max;
          row_sum[g] = sum;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* op = out + (b * num_heads + kvh * group + g) * head_dim;
        const float inv = row_sum[g] > 0.f ? 1.f / row_sum[g] : 0.f;
        for (int64_t d = 0; d < head_dim; ++d) op[d] = from_f<scalar_t>(acc[g * head_dim + d] * inv);
      }
    }
  });
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && seq_lens.scalar_type() == torch::kLong, "int64 indices");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(0), num_blocks = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "shape mismatch");
  dispatch_storage(q.scalar_type(), "paged_decode_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    decode_kernel<scalar_t>(static_cast<const scalar_t*>(q.data_ptr()), static_cast<const scalar_t*>(k_cache.data_ptr()),
                            static_cast<const scalar_t*>(v_cache.data_ptr()), tables.data_ptr<int64_t>(),
                            lens.data_ptr<int64_t>(), static_cast<scalar_t*>(out.data_ptr()), batch, num_heads,
                            num_kv_heads, head_dim, num_blocks, block_size, tables.size(1), static_cast<float>(scale));
  });
  return out;
}

namespace {

// out = weight * (x * rsqrt(mean(x^2) + eps)), computed in float32 per row; with residual: x += residual first
// and the sum is written back to residual (the layer's running hidden state).
template <typename scalar_t>
void rms_norm_kernel(const scalar_t* __restrict x, scalar_t* __restrict residual, const scalar_t* __restrict weight,
                     scalar_t* __restrict out, int64_t rows,
                     int64_t dim, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(dim);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * dim;
      float sum = 0.f;
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
      for (int64_t d = 0; d < dim; ++d) sum += buf[d] * buf[d];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
      scalar_t* o = out + r * dim;
      for (int64_t d = 0; d < dim; ++d) {
        const scalar_t normed = from_f<scalar_t>(buf[d] * inv);
        o[d] = from_f<scalar_t>(to_f(weight[d]) * to_f(normed));
      }
    }
  });
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
      for (int64_t h = 0; h < num_heads; ++h) {
        scalar_t* v = x + t * row_stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_f(v[i]);
          const float x2 = to_f(v[i + half]);
          v[i] = from_f<scalar_t>(x1 * c[i] - x2 * s[i]);
          v[i + half] = from_f<scalar_t>(x2 * c[i] + x1 * s[i]);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps) {
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
                              rows, dim, static_cast<float>(eps));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Paged decode attention (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally adding the residual in place first");
  m.def("rotary_inplace", &rotary_inplace, "Rotary embedding in place on the leading heads of each row");
}
