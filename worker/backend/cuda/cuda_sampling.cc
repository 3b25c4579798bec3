// TopK, LogSumExp and Sample of the CUDA backend. Greedy rows are an argmax kernel; rows that
// sample sort the whole row on the device (stable, so ties keep the lower id first) and draw
// with the same keyed uniform as the CPU backend, computed on the host and uploaded with the
// row's parameters.
#include <algorithm>
#include <vector>

#include "glog/logging.h"
#include "kernels/sampling.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_check.h"

namespace gemma {

void CudaBackend::TopK(const Buffer& x, int64_t rows, int64_t cols, int64_t k, int64_t id_offset,
                       Buffer& values, Buffer& ids) {
  CHECK_LE(k, cols);
  if (rows == 0 || k == 0) return;
  std::shared_ptr<Buffer> sorted_v = Scratch(DType::kF32, rows * cols);
  std::shared_ptr<Buffer> sorted_i = Scratch(DType::kI32, rows * cols);
  const size_t scratch_bytes = kernels::SortRowsScratchBytes(rows, cols);
  std::shared_ptr<Buffer> scratch = Scratch(DType::kI32, static_cast<int64_t>(scratch_bytes / 4 + 1));
  if (!sorted_v || !sorted_i || !scratch) return;
  GEMMA_CUDA_CHECK(kernels::SortRows(F32Ptr(x), rows, cols, F32Ptr(*sorted_v), I32Ptr(*sorted_i),
                                     AsCuda(*scratch).data(), scratch->bytes(), stream_));
  GEMMA_CUDA_CHECK(kernels::TakeTopK(F32Ptr(*sorted_v), I32Ptr(*sorted_i), rows, cols, k,
                                     id_offset, F32Ptr(values), I32Ptr(ids), stream_));
}

void CudaBackend::LogSumExp(const Buffer& x, int64_t rows, int64_t cols,
                            const std::vector<float>& temperature, Buffer& max_out,
                            Buffer& sum_out) {
  CHECK_EQ(static_cast<int64_t>(temperature.size()), rows);
  if (rows == 0) return;
  if (RefuseWhileCapturing("LogSumExp")) return;
  std::shared_ptr<Buffer> t = UploadScratch(DType::kF32, temperature.data(), rows);
  if (t == nullptr) return;
  GEMMA_CUDA_CHECK(kernels::LogSumExp(F32Ptr(x), rows, cols, F32Ptr(*t), F32Ptr(max_out),
                                      F32Ptr(sum_out), stream_));
}

void CudaBackend::Sample(const Buffer& logits, int64_t rows, int64_t vocab,
                         const std::vector<SamplingParams>& params, Buffer& ids) {
  CHECK_EQ(static_cast<int64_t>(params.size()), rows);
  if (rows == 0) return;
  GEMMA_CUDA_CHECK(kernels::Argmax(F32Ptr(logits), rows, vocab, I32Ptr(ids), stream_));
  const bool any_sampled = std::any_of(params.begin(), params.end(),
                                       [](const SamplingParams& p) { return p.temperature > 0; });
  if (!any_sampled) return;
  if (RefuseWhileCapturing("Sample with temperature")) return;
  std::vector<kernels::SampleRow> host(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const SamplingParams& p = params[r];
    host[r].temperature = p.temperature;
    host[r].top_k = p.top_k;
    host[r].top_p = p.top_p;
    host[r].uniform = p.temperature > 0 ? SamplingUniform(p) : 0.0;
  }
  const int64_t param_words =
      static_cast<int64_t>((rows * sizeof(kernels::SampleRow) + sizeof(int32_t) - 1) / sizeof(int32_t));
  std::shared_ptr<Buffer> params_d = UploadScratch(DType::kI32, host.data(), param_words);
  std::shared_ptr<Buffer> sorted_v = Scratch(DType::kF32, rows * vocab);
  std::shared_ptr<Buffer> sorted_i = Scratch(DType::kI32, rows * vocab);
  const size_t scratch_bytes = kernels::SortRowsScratchBytes(rows, vocab);
  std::shared_ptr<Buffer> scratch = Scratch(DType::kI32, static_cast<int64_t>(scratch_bytes / 4 + 1));
  if (!params_d || !sorted_v || !sorted_i || !scratch) return;
  GEMMA_CUDA_CHECK(kernels::SortRows(F32Ptr(logits), rows, vocab, F32Ptr(*sorted_v),
                                     I32Ptr(*sorted_i), AsCuda(*scratch).data(),
                                     scratch->bytes(), stream_));
  GEMMA_CUDA_CHECK(kernels::SampleSorted(
      F32Ptr(*sorted_v), I32Ptr(*sorted_i), rows, vocab,
      static_cast<const kernels::SampleRow*>(AsCuda(*params_d).data()), I32Ptr(ids), stream_));
}

}  // namespace gemma
