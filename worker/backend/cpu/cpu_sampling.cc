// Token sampling of the CPU backend: greedy, or temperature / top-k / top-p with the keyed
// uniform of SamplingUniform, so a seeded draw depends only on (seed, request, position).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace gemma {

void CpuBackend::TopK(const Buffer& x, int64_t rows, int64_t cols, int64_t k, int64_t id_offset,
                      Buffer& values, Buffer& ids) {
  CHECK_LE(k, cols);
  const float* xs = F32Data(x);
  float* v = F32Data(values);
  int32_t* id = I32Data(ids);
  std::vector<int32_t> order(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xs + r * cols;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t i, int32_t j) {
      return row[i] != row[j] ? row[i] > row[j] : i < j;
    });
    for (int64_t i = 0; i < k; ++i) {
      v[r * k + i] = row[order[i]];
      id[r * k + i] = static_cast<int32_t>(order[i] + id_offset);
    }
  }
}

void CpuBackend::LogSumExp(const Buffer& x, int64_t rows, int64_t cols,
                           const std::vector<float>& temperature, Buffer& max_out,
                           Buffer& sum_out) {
  CHECK_EQ(static_cast<int64_t>(temperature.size()), rows);
  const float* xs = F32Data(x);
  float* mx = F32Data(max_out);
  float* sm = F32Data(sum_out);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xs + r * cols;
    const float t = temperature[r];
    float max_scaled = *std::max_element(row, row + cols) / t;
    double total = 0.0;
    for (int64_t j = 0; j < cols; ++j) total += std::exp(row[j] / t - static_cast<double>(max_scaled));
    mx[r] = max_scaled;
    sm[r] = static_cast<float>(total);
  }
}

void CpuBackend::Sample(const Buffer& logits, int64_t rows, int64_t vocab,
                        const std::vector<SamplingParams>& params, Buffer& ids) {
  CHECK_EQ(static_cast<int64_t>(params.size()), rows);
  const float* l = F32Data(logits);
  int32_t* out = I32Data(ids);
  std::vector<int32_t> order;
  std::vector<double> probs;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = l + r * vocab;
    const SamplingParams& p = params[r];
    if (p.temperature <= 0.0f) {
      out[r] = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      continue;
    }
    int64_t keep = p.top_k > 0 ? std::min<int64_t>(p.top_k, vocab) : vocab;
    order.resize(vocab);
    std::iota(order.begin(), order.end(), 0);
    auto by_logit = [&](int32_t i, int32_t j) {
      return row[i] != row[j] ? row[i] > row[j] : i < j;
    };
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_logit);
    // Softmax of the kept candidates at this temperature (largest first).
    probs.resize(keep);
    double max_scaled = row[order[0]] / p.temperature;
    double total = 0.0;
    for (int64_t i = 0; i < keep; ++i) {
      probs[i] = std::exp(row[order[i]] / p.temperature - max_scaled);
      total += probs[i];
    }
    // Top-p: the smallest prefix whose probability reaches top_p.
    int64_t nucleus = keep;
    if (p.top_p < 1.0f) {
      double cumulative = 0.0;
      for (int64_t i = 0; i < keep; ++i) {
        cumulative += probs[i] / total;
        if (cumulative >= p.top_p) {
          nucleus = i + 1;
          break;
        }
      }
    }
    double nucleus_total = 0.0;
    for (int64_t i = 0; i < nucleus; ++i) nucleus_total += probs[i];
    double target = SamplingUniform(p) * nucleus_total;
    int64_t chosen = nucleus - 1;
    double cumulative = 0.0;
    for (int64_t i = 0; i < nucleus; ++i) {
      cumulative += probs[i];
      if (target < cumulative) {
        chosen = i;
        break;
      }
    }
    out[r] = order[chosen];
  }
}

}  // namespace gemma
