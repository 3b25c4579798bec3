// Per-head norms, RoPE, KV-cache writes and paged attention of the CPU backend.
// Attention runs one task per (sequence, kv head): it collects that head's key and value rows for
// the positions the sequence's queries can see (pointers into the cache; K derived from V into a
// scratch buffer on k_eq_v layers), then serves every query head of the group.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace gemma {
namespace cpu {
namespace {
// out[i] += p * v[i].
__attribute__((target_clones("avx512f", "avx2", "default"))) void AddScaled(float p, const float* v,
                                                                            int64_t d, float* out) {
  for (int64_t i = 0; i < d; ++i) out[i] += p * v[i];
}
}  // namespace

std::vector<float> RopeInvFreq(const RopeSpec& rope) {
  int64_t half = rope.head_dim / 2;
  std::vector<float> inv(half, 0.0f);
  for (int64_t i = 0; i < std::min(half, rope.rotary_pairs); ++i) {
    // As the reference: exponent 2i/head_dim in f32, theta^exponent, reciprocal.
    float exponent = static_cast<float>(2 * i) / static_cast<float>(rope.head_dim);
    float inv_freq = 1.0f / static_cast<float>(std::pow(rope.theta, static_cast<double>(exponent)));
    inv[i] = static_cast<float>(inv_freq / rope.factor);
  }
  return inv;
}

namespace {
// The CPU backend is the fp32 reference: its KvCacheDType() is F32, and a cache of another type
// (one made for a bf16 backend) is a programming error, not something to convert silently.
void CheckF32Cache(const Buffer* k_cache, const Buffer& v_cache) {
  CHECK(v_cache.dtype() == DType::kF32 && (k_cache == nullptr || k_cache->dtype() == DType::kF32))
      << "the CPU backend keeps its KV cache in f32 only; got a "
      << DTypeName(k_cache != nullptr && k_cache->dtype() != DType::kF32 ? k_cache->dtype()
                                                                         : v_cache.dtype())
      << " cache (was it made for another backend?)";
}

void RotateWithFreqs(float* head, int64_t position, int64_t half, int64_t pairs,
                     const float* inv_freq) {
  for (int64_t i = 0; i < pairs; ++i) {
    float angle = inv_freq[i] * static_cast<float>(position);
    float c = std::cos(angle);
    float s = std::sin(angle);
    float a = head[i];
    float b = head[i + half];
    head[i] = a * c - b * s;
    head[i + half] = b * c + a * s;
  }
}
}  // namespace

void ApplyRope(float* head, int64_t position, const RopeSpec& rope) {
  std::vector<float> inv = RopeInvFreq(rope);
  int64_t half = rope.head_dim / 2;
  RotateWithFreqs(head, position, half, std::min(half, rope.rotary_pairs), inv.data());
}

}  // namespace cpu

void CpuBackend::HeadNormRope(Buffer& x, const Buffer* w, const Buffer& positions,
                              int64_t num_tokens, int64_t num_heads, const RopeSpec& rope,
                              float eps) {
  const int64_t d = rope.head_dim;
  CHECK_GT(d, 0);
  CHECK_LE(num_tokens * num_heads * d, x.numel());
  float* xs = F32Data(x);
  const int32_t* pos = I32Data(positions);
  std::vector<float> weight;
  if (w != nullptr) {
    weight.resize(d);
    LoadF32Range(*w, 0, d, weight.data());
  }
  std::vector<float> inv = cpu::RopeInvFreq(rope);
  const int64_t half = d / 2;
  const int64_t pairs = std::min(half, rope.rotary_pairs);
  pool_.ParallelFor(num_tokens * num_heads, 8, [&](int64_t th_begin, int64_t th_end) {
    for (int64_t th = th_begin; th < th_end; ++th) {
      float* h = xs + th * d;
      double sum = 0.0;
      for (int64_t i = 0; i < d; ++i) sum += static_cast<double>(h[i]) * h[i];
      float inv_rms = 1.0f / std::sqrt(static_cast<float>(sum / d) + eps);
      for (int64_t i = 0; i < d; ++i) {
        float v = h[i] * inv_rms;
        h[i] = weight.empty() ? v : v * weight[i];
      }
      if (pairs > 0) {
        int64_t t = th / num_heads;
        float angle_pos = static_cast<float>(pos[t]);
        for (int64_t i = 0; i < pairs; ++i) {
          float angle = inv[i] * angle_pos;
          float c = std::cos(angle);
          float s = std::sin(angle);
          float a = h[i];
          float b = h[i + half];
          h[i] = a * c - b * s;
          h[i + half] = b * c + a * s;
        }
      }
    }
  });
}

void CpuBackend::WriteKv(const Buffer* k, const Buffer& v, const Buffer& slots, int64_t num_tokens,
                         int64_t row_elems, Buffer* k_cache, Buffer& v_cache) {
  cpu::CheckF32Cache(k_cache, v_cache);
  const int32_t* slot = I32Data(slots);
  const float* vs = F32Data(v);
  float* vc = F32Data(v_cache);
  const float* ks = k != nullptr ? F32Data(*k) : nullptr;
  float* kc = k_cache != nullptr ? F32Data(*k_cache) : nullptr;
  for (int64_t t = 0; t < num_tokens; ++t) {
    CHECK_GE(slot[t], 0) << "token " << t << " has no cache slot";
    int64_t dst = static_cast<int64_t>(slot[t]) * row_elems;
    CHECK_LE(dst + row_elems, v_cache.numel()) << "cache slot " << slot[t] << " out of range";
    std::memcpy(vc + dst, vs + t * row_elems, row_elems * sizeof(float));
    if (kc != nullptr) std::memcpy(kc + dst, ks + t * row_elems, row_elems * sizeof(float));
  }
}

void CpuBackend::Attention(const AttentionArgs& a) {
  const BatchLayout& layout = *a.layout;
  const int64_t d = a.head_dim;
  const int64_t num_kv = a.num_kv_heads;
  const int64_t group = a.num_heads / num_kv;
  CHECK_EQ(group * num_kv, a.num_heads);
  cpu::CheckF32Cache(a.k_cache, *a.v_cache);
  const float* q = F32Data(*a.q);
  float* out = F32Data(*a.out);
  const float* kc = a.k_cache != nullptr ? F32Data(*a.k_cache) : nullptr;
  const float* vc = F32Data(*a.v_cache);
  const int32_t* pos = I32Data(*layout.positions);
  const int32_t* page_table = I32Data(*layout.page_tables[a.pool]);
  const bool derive_k = kc == nullptr;
  std::vector<float> k_norm_w;
  std::vector<float> inv_freq;
  if (derive_k) {
    CHECK(a.k_norm_weight != nullptr) << "k_eq_v attention needs the k_norm weight";
    k_norm_w.resize(d);
    LoadF32Range(*a.k_norm_weight, 0, d, k_norm_w.data());
    inv_freq = cpu::RopeInvFreq(a.rope);
  }
  const int64_t half = d / 2;
  const int64_t pairs = std::min(half, a.rope.rotary_pairs);
  const int64_t num_seqs = layout.num_seqs;
  const int64_t row_elems = num_kv * d;

  pool_.ParallelFor(num_seqs * num_kv, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<float> derived_keys, scores;
    std::vector<const float*> key_rows, value_rows;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t s = task / num_kv;
      const int64_t g = task % num_kv;
      const int64_t q_begin = layout.host_query_start[s];
      const int64_t q_end = layout.host_query_start[s + 1];
      if (q_begin == q_end) continue;
      const int64_t seq_len = layout.host_seq_lens[s];
      // The keys any query of this sequence may see.
      int64_t first_pos = std::numeric_limits<int64_t>::max();
      int64_t last_pos = -1;
      for (int64_t t = q_begin; t < q_end; ++t) {
        first_pos = std::min<int64_t>(first_pos, pos[t]);
        last_pos = std::max<int64_t>(last_pos, pos[t]);
      }
      CHECK_LT(last_pos, seq_len) << "query position past the cached length";
      int64_t key_lo = a.window > 0 ? std::max<int64_t>(0, first_pos - a.window + 1) : 0;
      int64_t num_keys = last_pos + 1 - key_lo;
      key_rows.resize(num_keys);
      value_rows.resize(num_keys);
      if (derive_k) derived_keys.resize(num_keys * d);
      const int32_t* table = page_table + s * layout.max_pages_per_seq;
      for (int64_t j = 0; j < num_keys; ++j) {
        int64_t p = key_lo + j;
        int64_t logical_page = p / a.page_size;
        CHECK_LT(logical_page, layout.max_pages_per_seq);
        int32_t page = table[logical_page];
        CHECK_GE(page, 0) << "position " << p << " of sequence " << s << " is not cached";
        int64_t src =
            (static_cast<int64_t>(page) * a.page_size + p % a.page_size) * row_elems + g * d;
        value_rows[j] = vc + src;
        if (!derive_k) {
          key_rows[j] = kc + src;
        } else {
          float* kj = &derived_keys[j * d];
          for (int64_t i = 0; i < d; ++i) kj[i] = vc[src + i] * k_norm_w[i];
          float fp = static_cast<float>(p);
          for (int64_t i = 0; i < pairs; ++i) {
            float angle = inv_freq[i] * fp;
            float c = std::cos(angle);
            float sn = std::sin(angle);
            float x0 = kj[i];
            float x1 = kj[i + half];
            kj[i] = x0 * c - x1 * sn;
            kj[i + half] = x1 * c + x0 * sn;
          }
          key_rows[j] = kj;
        }
      }
      scores.resize(group * num_keys);
      for (int64_t t = q_begin; t < q_end; ++t) {
        const int64_t qp = pos[t];
        const int64_t lo = a.window > 0 ? std::max<int64_t>(0, qp - a.window + 1) : 0;
        const int64_t j0 = lo - key_lo;
        const int64_t j1 = qp - key_lo;  // inclusive
        // Every head of the group against one key (then value) row while it is in L1.
        const float* qg = q + (t * a.num_heads + g * group) * d;
        float* og = out + (t * a.num_heads + g * group) * d;
        for (int64_t j = j0; j <= j1; ++j) {
          for (int64_t h = 0; h < group; ++h) {
            scores[h * num_keys + j] = cpu::DotLanes(qg + h * d, key_rows[j], d) * a.scale;
          }
        }
        for (int64_t h = 0; h < group; ++h) {
          float* sh = &scores[h * num_keys];
          float max_score = -std::numeric_limits<float>::infinity();
          for (int64_t j = j0; j <= j1; ++j) max_score = std::max(max_score, sh[j]);
          double denom = 0.0;
          for (int64_t j = j0; j <= j1; ++j) {
            sh[j] = std::exp(sh[j] - max_score);
            denom += sh[j];
          }
          const float inv_denom = static_cast<float>(1.0 / denom);
          for (int64_t j = j0; j <= j1; ++j) sh[j] *= inv_denom;
        }
        std::fill(og, og + group * d, 0.0f);
        for (int64_t j = j0; j <= j1; ++j) {
          for (int64_t h = 0; h < group; ++h) {
            cpu::AddScaled(scores[h * num_keys + j], value_rows[j], d, og + h * d);
          }
        }
      }
    }
  });
}

}  // namespace gemma
