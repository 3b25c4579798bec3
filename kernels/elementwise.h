// Element-wise and row-copy kernels: embedding gather, add, gated GELU, softcap, row gather,
// KV-cache scatter (into an f32 or bf16 cache) and the f32 -> bf16 conversion used before bf16
// matrix products.
// Raw device pointers, sizes and a stream; each returns the launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace gemma::kernels {

// out[t] = table[ids[t] - vocab_offset] * scale for ids inside [vocab_offset, vocab_offset +
// vocab), zeros otherwise. ids [n] i32; table [vocab, hidden] f32 or bf16; out [n, hidden] f32.
cudaError_t Embed(const int32_t* ids, const void* table, ElemType table_type, int64_t n,
                  int64_t vocab, int64_t vocab_offset, int64_t hidden, float scale, float* out,
                  cudaStream_t stream);

// out = a + b over n elements (out may alias either).
cudaError_t Add(const float* a, const float* b, int64_t n, float* out, cudaStream_t stream);

// out[t, i] = gelu_tanh(gate_up[t, i]) * gate_up[t, inter + i]; gate_up [n, 2 * inter].
cudaError_t GeluMul(const float* gate_up, int64_t n, int64_t inter, float* out,
                    cudaStream_t stream);

// x = cap * tanh(x / cap) over n elements, in place.
cudaError_t Softcap(float* x, int64_t n, float cap, cudaStream_t stream);

// out[r] = x[rows[r]] for rows [num_rows] i32 inside [0, x_rows); rows outside get NaN.
cudaError_t GatherRows(const float* x, int64_t x_rows, const int32_t* rows, int64_t num_rows,
                       int64_t dim, float* out, cudaStream_t stream);

// out[r] = sum over j < k of x[idx[r * k + j]], added in j order onto zero; indices below zero
// add nothing, indices at or past x_rows make the row NaN.
cudaError_t GatherSumRows(const float* x, int64_t x_rows, const int32_t* idx, int64_t rows,
                          int64_t k, int64_t dim, float* out, cudaStream_t stream);

// cache[slots[t]] = src[t] for rows of row_elems values (k and k_cache may be null); slots below
// zero or at/after cache_rows are skipped. k and v are f32; the caches hold `cache_type`: f32
// rows are copied, bf16 rows rounded to nearest even (as F32ToBf16).
cudaError_t WriteKv(const float* k, const float* v, const int32_t* slots, int64_t num_tokens,
                    int64_t row_elems, int64_t cache_rows, void* k_cache, void* v_cache,
                    ElemType cache_type, cudaStream_t stream);

// dst = bf16(src), round to nearest even, n elements.
cudaError_t F32ToBf16(const float* src, int64_t n, void* dst, cudaStream_t stream);

// x[i] = value for i < n.
cudaError_t Fill(float* x, int64_t n, float value, cudaStream_t stream);

}  // namespace gemma::kernels
