// Sampling kernels: argmax (lowest id on ties), per-row log-sum-exp at a temperature, a full
// descending sort of each row (stable, so equal logits keep ascending ids), top-k read off the
// sorted rows, and the seeded temperature / top-k / top-p draw over the sorted rows.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace gemma::kernels {

// ids[r] = argmax of x[r] (rows x cols), the lowest column on ties.
cudaError_t Argmax(const float* x, int64_t rows, int64_t cols, int32_t* ids, cudaStream_t stream);

// With y_j = x[r, j] / temperature[r]: max_out[r] = max_j y_j, sum_out[r] = sum_j
// exp(y_j - max_out[r]) accumulated in double. temperature [rows] on the device.
cudaError_t LogSumExp(const float* x, int64_t rows, int64_t cols, const float* temperature,
                      float* max_out, float* sum_out, cudaStream_t stream);

// Scratch bytes SortRows needs for rows x cols.
size_t SortRowsScratchBytes(int64_t rows, int64_t cols);
// Sorts each row of x descending into sorted_values with the source column in sorted_ids
// ([rows, cols] each). `scratch` holds SortRowsScratchBytes(rows, cols) bytes.
cudaError_t SortRows(const float* x, int64_t rows, int64_t cols, float* sorted_values,
                     int32_t* sorted_ids, void* scratch, size_t scratch_bytes,
                     cudaStream_t stream);

// values[r, i] = sorted_values[r, i] and ids[r, i] = sorted_ids[r, i] + id_offset for i < k.
cudaError_t TakeTopK(const float* sorted_values, const int32_t* sorted_ids, int64_t rows,
                     int64_t cols, int64_t k, int64_t id_offset, float* values, int32_t* ids,
                     cudaStream_t stream);

// Per-row sampling parameters; `uniform` is the row's draw in [0, 1).
struct SampleRow {
  float temperature = 0.0f;  // <= 0: the row is left as it is (greedy rows come from Argmax)
  int32_t top_k = 0;         // 0: all
  float top_p = 1.0f;
  double uniform = 0.0;
};
// For rows with temperature > 0: softmax of the kept candidates (the top_k largest, then the
// smallest prefix reaching top_p), and ids[r] = the candidate where the cumulative probability
// first exceeds uniform * (nucleus mass). params [rows] on the device.
cudaError_t SampleSorted(const float* sorted_values, const int32_t* sorted_ids, int64_t rows,
                         int64_t cols, const SampleRow* params, int32_t* ids,
                         cudaStream_t stream);

}  // namespace gemma::kernels
