// Every op of the CUDA backend against the CPU backend on random inputs at awkward sizes: one
// token, odd counts, exactly the sliding window and one past, head dims 256 and 512, partly
// filled pages, experts that receive no token; the KV write and attention also over the bf16
// cache the CUDA backend keeps by default, against the CPU's f32 one; prefill attention on the
// tensor-core kernel. Outputs start as NaN so an unwritten element fails. Skipped, saying so,
// where no CUDA device is present.
#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/attention.h"
#include "kernels/gemv.h"
#include "tests/gpu/cuda_test_util.h"

namespace gemma {
namespace {

using testing::CudaVsCpuTest;
using testing::Pair;

class CudaOpsTest : public CudaVsCpuTest {};

TEST_F(CudaOpsTest, EmbedMatchesForBothDtypesAndForeignIds) {
  const int64_t vocab = 37, hidden = 130, offset = 10;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t n : {1, 7}) {
      std::vector<int32_t> ids(n);
      for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>((i * 13) % 60);  // some foreign
      Pair id = I32(ids);
      Pair table = Weight(Random(vocab * hidden), dtype);
      Pair out = Poisoned(DType::kF32, n * hidden);
      cpu_->Embed(*id.cpu, *table.cpu, n, vocab, offset, hidden, 3.5f, *out.cpu);
      gpu_->Embed(*id.gpu, *table.gpu, n, vocab, offset, hidden, 3.5f, *out.gpu);
      ExpectClose(out, n * hidden, absl::StrCat("embed n=", n));
    }
  }
}

TEST_F(CudaOpsTest, MatMulMatchesAcrossRowCountsDtypesAndRowOffset) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t k : {129, 256}) {
      for (int64_t m : {1, 5, 8, 9, 33}) {
        const int64_t n = 67, offset = 3;
        Pair x = F32(Random(m * k));
        Pair w = Weight(Random((n + offset) * k), dtype);
        Pair y = Poisoned(DType::kF32, m * n);
        cpu_->MatMul(*x.cpu, *w.cpu, m, n, k, *y.cpu, offset);
        gpu_->MatMul(*x.gpu, *w.gpu, m, n, k, *y.gpu, offset);
        // bf16 weights past the few-row kernel run on tensor cores with x rounded to bf16.
        const bool tensor_cores = dtype == DType::kBF16 && m > kernels::kGemvMaxRows;
        ExpectClose(y, m * n, absl::StrCat("matmul ", DTypeName(dtype), " m=", m, " k=", k),
                    tensor_cores ? testing::kCudaRelTol : testing::kCudaF32RelTol);
      }
    }
  }
}

// Wide products take the few-row kernel's 2 and 4 weight rows per warp (n past 16 and 32 rows
// per multiprocessor), with n leaving a partial last warp, and activations both 16-byte aligned
// and not (a view one element in).
TEST_F(CudaOpsTest, FewRowMatMulWithSeveralWeightRowsPerWarp) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t n : {2115, 4229}) {
      for (int64_t k : {256, 129}) {
        for (int64_t m : {1, 3, 8}) {
          for (int64_t x_offset : {0, 1}) {
            Pair x_base = F32(Random(m * k + x_offset));
            Pair w = Weight(Random(n * k), dtype);
            Pair y = Poisoned(DType::kF32, m * n);
            Pair x{*cpu_->View(*x_base.cpu, x_offset, m * k),
                   *gpu_->View(*x_base.gpu, x_offset, m * k)};
            cpu_->MatMul(*x.cpu, *w.cpu, m, n, k, *y.cpu);
            gpu_->MatMul(*x.gpu, *w.gpu, m, n, k, *y.gpu);
            ExpectClose(y, m * n,
                        absl::StrCat("few-row matmul ", DTypeName(dtype), " m=", m, " n=", n,
                                     " k=", k, " x offset ", x_offset));
          }
        }
      }
    }
  }
}

// x and y as views one element into their buffers: pointers 4 bytes past the arena's 256-byte
// alignment, which the cuBLASLt plans (m > 8) must not assume.
TEST_F(CudaOpsTest, MatMulOverViewsAtUnalignedOffsets) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t m : {5, 33}) {
      const int64_t n = 64, k = 128;
      Pair x_base = F32(Random(m * k + 1));
      Pair w = Weight(Random(n * k), dtype);
      Pair y_base = Poisoned(DType::kF32, m * n + 1);
      Pair x{*cpu_->View(*x_base.cpu, 1, m * k), *gpu_->View(*x_base.gpu, 1, m * k)};
      Pair y{*cpu_->View(*y_base.cpu, 1, m * n), *gpu_->View(*y_base.gpu, 1, m * n)};
      cpu_->MatMul(*x.cpu, *w.cpu, m, n, k, *y.cpu);
      gpu_->MatMul(*x.gpu, *w.gpu, m, n, k, *y.gpu);
      const bool tensor_cores = dtype == DType::kBF16 && m > kernels::kGemvMaxRows;
      ExpectClose(y, m * n, absl::StrCat("matmul over views ", DTypeName(dtype), " m=", m),
                  tensor_cores ? testing::kCudaRelTol : testing::kCudaF32RelTol);
    }
  }
}

TEST_F(CudaOpsTest, RmsNormAndAddRmsNormMatch) {
  const int64_t rows = 3, dim = 257;
  for (bool weighted : {false, true}) {
    Pair x = F32(Random(rows * dim, 3.0f));
    Pair w = Weight(Random(dim), DType::kBF16);
    Pair out = Poisoned(DType::kF32, rows * dim);
    cpu_->RmsNorm(*x.cpu, weighted ? w.cpu.get() : nullptr, rows, dim, 1e-6f, *out.cpu);
    gpu_->RmsNorm(*x.gpu, weighted ? w.gpu.get() : nullptr, rows, dim, 1e-6f, *out.gpu);
    ExpectClose(out, rows * dim, "rmsnorm");
    // In place.
    cpu_->RmsNorm(*x.cpu, w.cpu.get(), rows, dim, 1e-6f, *x.cpu);
    gpu_->RmsNorm(*x.gpu, w.gpu.get(), rows, dim, 1e-6f, *x.gpu);
    ExpectClose(x, rows * dim, "rmsnorm in place");
  }
  for (bool with_scalar : {false, true}) {
    Pair residual = F32(Random(rows * dim));
    Pair x = F32(Random(rows * dim, 2.0f));
    Pair w = Weight(Random(dim), DType::kF32);
    Pair scalar = Weight({0.37f}, DType::kF32);
    cpu_->AddRmsNorm(*residual.cpu, *x.cpu, *w.cpu, with_scalar ? scalar.cpu.get() : nullptr,
                     rows, dim, 1e-6f);
    gpu_->AddRmsNorm(*residual.gpu, *x.gpu, *w.gpu, with_scalar ? scalar.gpu.get() : nullptr,
                     rows, dim, 1e-6f);
    ExpectClose(residual, rows * dim, absl::StrCat("add_rmsnorm scalar=", with_scalar));
  }
}

TEST_F(CudaOpsTest, ElementwiseOpsMatch) {
  const int64_t n = 1001, inter = 333, tokens = 3;
  Pair a = F32(Random(n)), b = F32(Random(n));
  Pair sum = Poisoned(DType::kF32, n);
  cpu_->Add(*a.cpu, *b.cpu, n, *sum.cpu);
  gpu_->Add(*a.gpu, *b.gpu, n, *sum.gpu);
  ExpectClose(sum, n, "add");

  Pair gate_up = F32(Random(tokens * 2 * inter, 4.0f));
  Pair act = Poisoned(DType::kF32, tokens * inter);
  cpu_->GeluMul(*gate_up.cpu, tokens, inter, *act.cpu);
  gpu_->GeluMul(*gate_up.gpu, tokens, inter, *act.gpu);
  ExpectClose(act, tokens * inter, "gelu_mul");

  Pair logits = F32(Random(n, 80.0f));
  cpu_->Softcap(*logits.cpu, n, 30.0f);
  gpu_->Softcap(*logits.gpu, n, 30.0f);
  ExpectClose(logits, n, "softcap");

  const int64_t dim = 71;
  Pair x = F32(Random(9 * dim));
  Pair rows = I32({8, 0, 3, 3});
  Pair gathered = Poisoned(DType::kF32, 4 * dim);
  cpu_->GatherRows(*x.cpu, *rows.cpu, 4, dim, *gathered.cpu);
  gpu_->GatherRows(*x.gpu, *rows.gpu, 4, dim, *gathered.gpu);
  ExpectClose(gathered, 4 * dim, "gather_rows");

  // Combine of expert results: several rows per output, skipped slots, an empty row, and a
  // row wider than one block.
  for (const int64_t width : {dim, int64_t{5376}}) {
    Pair src = F32(Random(9 * width));
    Pair idx = I32({8, 0, -1, 3, -1, -1, -1, -1, -1, 5, 5, 2, 1, 7, 6, -1});
    Pair summed = Poisoned(DType::kF32, 4 * width);
    cpu_->GatherSumRows(*src.cpu, *idx.cpu, 4, 4, width, *summed.cpu);
    gpu_->GatherSumRows(*src.gpu, *idx.gpu, 4, 4, width, *summed.gpu);
    ExpectClose(summed, 4 * width, absl::StrCat("gather_sum_rows width ", width));
  }
}

TEST_F(CudaOpsTest, HeadNormRopeMatchesForHeadDims256And512) {
  struct Case {
    int64_t head_dim, pairs;
    bool weighted;
  };
  for (const Case& c : {Case{256, 128, true}, Case{512, 64, true}, Case{512, 0, false},
                        Case{256, 128, false}}) {
    const int64_t tokens = 3, heads = 5;
    RopeSpec rope{c.head_dim, c.pairs, c.head_dim == 512 ? 1e6 : 1e4, 1.0};
    Pair x = F32(Random(tokens * heads * c.head_dim, 2.0f));
    Pair w = Weight(Random(c.head_dim), DType::kBF16);
    Pair pos = I32({0, 17, 40000});
    cpu_->HeadNormRope(*x.cpu, c.weighted ? w.cpu.get() : nullptr, *pos.cpu, tokens, heads, rope,
                       1e-6f);
    gpu_->HeadNormRope(*x.gpu, c.weighted ? w.gpu.get() : nullptr, *pos.gpu, tokens, heads, rope,
                       1e-6f);
    ExpectClose(x, tokens * heads * c.head_dim,
                absl::StrCat("head_norm_rope d=", c.head_dim, " pairs=", c.pairs));
  }
}

// A batch of sequences over a paged cache with shuffled physical pages.
struct AttentionCase {
  int64_t head_dim;
  int64_t window;
  bool k_eq_v;
  std::vector<int32_t> seq_lens;   // cached length after the step
  std::vector<int32_t> new_tokens; // queries of each sequence (the last positions)
  int64_t heads = 8, kv_heads = 2;
};

class CudaAttentionTest : public CudaVsCpuTest {
 protected:
  void Run(const AttentionCase& c) {
    const int64_t page_size = 16, heads = c.heads, kv_heads = c.kv_heads, d = c.head_dim;
    const int64_t num_seqs = static_cast<int64_t>(c.seq_lens.size());
    int64_t max_pages = 0, total_pages = 0;
    for (int32_t len : c.seq_lens) {
      max_pages = std::max<int64_t>(max_pages, (len + page_size - 1) / page_size);
    }
    total_pages = max_pages * num_seqs + 3;
    std::vector<int32_t> physical(total_pages);
    std::iota(physical.begin(), physical.end(), 0);
    std::shuffle(physical.begin(), physical.end(), rng_);
    std::vector<int32_t> table(num_seqs * max_pages, -1);
    std::vector<int32_t> query_start{0}, positions;
    int64_t next = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t pages = (c.seq_lens[s] + page_size - 1) / page_size;
      for (int64_t p = 0; p < pages; ++p) table[s * max_pages + p] = physical[next++];
      for (int32_t i = c.seq_lens[s] - c.new_tokens[s]; i < c.seq_lens[s]; ++i) positions.push_back(i);
      query_start.push_back(static_cast<int32_t>(positions.size()));
    }
    const int64_t tokens = static_cast<int64_t>(positions.size());
    const int64_t cache_elems = total_pages * page_size * kv_heads * d;
    Pair k_cache = F32(Random(cache_elems));
    Pair v_cache = F32(Random(cache_elems));
    Pair q = F32(Random(tokens * heads * d, 0.2f));
    Pair k_norm = Weight(Random(d), DType::kBF16);
    Pair pos = I32(positions), qs = I32(query_start), lens = I32(c.seq_lens), pt = I32(table);
    Pair out = Poisoned(DType::kF32, tokens * heads * d);
    auto layout_for = [&](bool gpu) {
      BatchLayout l;
      l.num_tokens = tokens;
      l.num_seqs = num_seqs;
      l.max_pages_per_seq = max_pages;
      l.positions = gpu ? pos.gpu.get() : pos.cpu.get();
      l.query_start = gpu ? qs.gpu.get() : qs.cpu.get();
      l.seq_lens = gpu ? lens.gpu.get() : lens.cpu.get();
      l.page_tables[1] = gpu ? pt.gpu.get() : pt.cpu.get();
      l.host_query_start = query_start;
      l.host_seq_lens = c.seq_lens;
      return l;
    };
    BatchLayout cpu_layout = layout_for(false), gpu_layout = layout_for(true);
    auto args_for = [&](bool gpu) {
      AttentionArgs a;
      a.layout = gpu ? &gpu_layout : &cpu_layout;
      a.pool = 1;
      a.q = gpu ? q.gpu.get() : q.cpu.get();
      a.k_cache = c.k_eq_v ? nullptr : (gpu ? k_cache.gpu.get() : k_cache.cpu.get());
      a.v_cache = gpu ? v_cache.gpu.get() : v_cache.cpu.get();
      a.k_norm_weight = gpu ? k_norm.gpu.get() : k_norm.cpu.get();
      a.rope = RopeSpec{d, d == 512 ? 64 : d / 2, d == 512 ? 1e6 : 1e4, 1.0};
      a.num_heads = heads;
      a.num_kv_heads = kv_heads;
      a.head_dim = d;
      a.page_size = page_size;
      a.window = c.window;
      a.scale = 1.0f;
      a.out = gpu ? out.gpu.get() : out.cpu.get();
      return a;
    };
    cpu_->Attention(args_for(false));
    gpu_->Attention(args_for(true));
    ExpectClose(out, tokens * heads * d,
                absl::StrCat("attention d=", d, " window=", c.window, " k_eq_v=", c.k_eq_v,
                             " heads=", heads, "/", kv_heads));
  }
};

TEST_F(CudaAttentionTest, DecodeOverPartlyFilledPages) {
  for (int64_t d : {256, 512}) {
    Run({d, 0, false, {1, 37, 100}, {1, 1, 1}});
    Run({d, 0, true, {1, 37, 100}, {1, 1, 1}});
  }
}

TEST_F(CudaAttentionTest, PrefillAndMixedBatchCausal) {
  for (int64_t d : {256, 512}) {
    Run({d, 0, false, {5, 40, 23}, {5, 9, 1}});
    Run({d, 0, true, {5, 40, 23}, {5, 9, 1}});
  }
}

// Few queries over long key ranges: the keys are split over several blocks and merged
// (flash-decoding), with slices that see no key (the one-token sequence), a window that cuts
// the range, and a few prefill queries at the end of a long sequence.
TEST_F(CudaAttentionTest, LongRangesSplitOverBlocks) {
  kernels::PagedAttentionParams shape;  // the first case's launch shape
  shape.num_tokens = 3;
  shape.num_heads = 8;
  shape.num_kv_heads = 2;
  shape.max_pages_per_seq = 188;
  shape.page_size = 16;
  shape.head_dim = 256;
  ASSERT_GT(kernels::PagedAttentionSplits(shape), 1) << "the cases below would not split";
  for (int64_t d : {256, 512}) {
    for (bool k_eq_v : {false, true}) {
      Run({d, 0, k_eq_v, {1, 700, 3000}, {1, 1, 1}});
      Run({d, 600, k_eq_v, {2000, 90}, {1, 1}});
      Run({d, 0, k_eq_v, {777}, {4}});
    }
  }
}

// A block serves up to 8 query heads of one KV group, sharing each key's read and derivation:
// groups of 8 (the global layers of both models), 2 (their sliding layers), 1, 16 (two blocks
// a group) and 3 (one head a block), decode and prefill, split and not.
TEST_F(CudaAttentionTest, QueryHeadsPerKvGroup) {
  const std::vector<std::pair<int64_t, int64_t>> groups{{16, 2}, {16, 8}, {4, 4}, {32, 2}, {6, 2}};
  for (const auto& [heads, kv_heads] : groups) {
    for (int64_t d : {256, 512}) {
      for (bool k_eq_v : {false, true}) {
        Run({d, 0, k_eq_v, {1, 37, 1500}, {1, 1, 1}, heads, kv_heads});
        Run({d, 64, k_eq_v, {40, 200}, {40, 3}, heads, kv_heads});
      }
    }
  }
}

TEST_F(CudaAttentionTest, SlidingWindowAtExactlyTheWindowAndOnePast) {
  const int64_t w = 32;
  Run({256, w, false, {w, w + 1, w + 2}, {w, 1, 3}});
  Run({256, w, false, {w + 1, 2 * w + 1}, {w + 1, 2}});
  Run({512, w, false, {w, w + 1}, {1, w + 1}});
}

// A step's batch over a paged cache with shuffled physical pages, as the model lays it out:
// per sequence its page-table row and every cached position's slot, split into what earlier
// steps wrote and this step's new tokens (the queries).
struct PagedBatch {
  static constexpr int64_t kPageSize = 16;
  PagedBatch(const AttentionCase& c, std::mt19937& rng) {
    num_seqs = static_cast<int64_t>(c.seq_lens.size());
    for (int32_t len : c.seq_lens) {
      max_pages = std::max<int64_t>(max_pages, (len + kPageSize - 1) / kPageSize);
    }
    total_pages = max_pages * num_seqs + 3;
    std::vector<int32_t> physical(total_pages);
    std::iota(physical.begin(), physical.end(), 0);
    std::shuffle(physical.begin(), physical.end(), rng);
    table.assign(num_seqs * max_pages, -1);
    query_start = {0};
    int64_t next = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t pages = (c.seq_lens[s] + kPageSize - 1) / kPageSize;
      for (int64_t p = 0; p < pages; ++p) table[s * max_pages + p] = physical[next++];
      const int32_t first_new = c.seq_lens[s] - c.new_tokens[s];
      for (int32_t i = 0; i < c.seq_lens[s]; ++i) {
        const int32_t slot =
            table[s * max_pages + i / kPageSize] * static_cast<int32_t>(kPageSize) +
            i % static_cast<int32_t>(kPageSize);
        (i < first_new ? old_slots : new_slots).push_back(slot);
        if (i >= first_new) positions.push_back(i);
      }
      query_start.push_back(static_cast<int32_t>(positions.size()));
    }
  }
  int64_t tokens() const { return static_cast<int64_t>(positions.size()); }
  int64_t cache_rows() const { return total_pages * kPageSize; }

  int64_t num_seqs = 0, max_pages = 0, total_pages = 0;
  std::vector<int32_t> table, query_start, positions, old_slots, new_slots;
};

// The values a bf16 cache holds for `x`: rounded to nearest even, widened back to f32.
std::vector<float> RoundedToBf16(std::vector<float> x) {
  for (float& v : x) v = Bf16ToF32(F32ToBf16(v));
  return x;
}

// WriteKv then Attention on the CUDA backend's default cache (bf16), against the CPU backend's
// f32 cache fed the same f32 keys and values: earlier positions written by one WriteKv, the
// step's new tokens by another (as the model writes them), then attention of the new tokens.
// Three checks:
//   - the bf16 cache holds exactly F32ToBf16 of what was written (round to nearest even), and
//     rows no token was written to are untouched;
//   - the output equals the CPU's attention over an f32 cache of those same rounded values to
//     kCudaF32RelTol (only summation order and sincosf differ: the kernel's f32 arithmetic after
//     the load is what the f32 cache gets);
//   - against the CPU's unrounded f32 cache it is within kCudaBf16KvRelTol (2^-7 of the largest
//     output). That bound is what the rounding costs: every cached key and value moves by at
//     most 2^-9 of itself, so a query that sees one key returns that value within 2^-9, and
//     with more keys the scores move too (q . dk, and on k_eq_v layers the key derived from
//     the rounded V). At these shapes and distributions (q in [-0.2, 0.2], k and v in [-1, 1])
//     a double-precision simulation of the same attention over rounded and unrounded caches
//     gave 2e-3 to 3.3e-3 on average and 4.7e-3 at worst over 200 draws per shape, and the CPU
//     backend over this test's own draws, rounded and not, 1.5e-3 to 4.7e-3.
class CudaBf16KvTest : public CudaVsCpuTest {
 protected:
  // The cache buffers of one side: K (null on k_eq_v layers) and V.
  struct Cache {
    BufferPtr k, v;
  };

  // A cache of `rows` rows on `backend` in `dtype`, every element NaN.
  Cache NanCache(Backend& backend, DType dtype, int64_t rows, int64_t row, bool k_eq_v) {
    auto make = [&] {
      BufferPtr b = *backend.Alloc(dtype, rows * row);
      if (dtype == DType::kF32) {
        std::vector<float> nan(rows * row, std::numeric_limits<float>::quiet_NaN());
        backend.Write(*b, nan.data(), nan.size() * sizeof(float));
      } else {
        std::vector<uint16_t> nan(rows * row, 0x7fc0);
        backend.Write(*b, nan.data(), nan.size() * sizeof(uint16_t));
      }
      EXPECT_TRUE(backend.Synchronize().ok());  // the host vectors die here
      return b;
    };
    Cache c;
    if (!k_eq_v) c.k = make();
    c.v = make();
    return c;
  }

  BufferPtr Upload(Backend& backend, DType dtype, const void* data, int64_t n) {
    BufferPtr b = *backend.Alloc(dtype, n);
    backend.Write(*b, data, n * 4);
    EXPECT_TRUE(backend.Synchronize().ok());
    return b;
  }
  BufferPtr UploadF32(Backend& backend, const std::vector<float>& v) {
    return Upload(backend, DType::kF32, v.data(), static_cast<int64_t>(v.size()));
  }
  BufferPtr UploadI32(Backend& backend, const std::vector<int32_t>& v) {
    return Upload(backend, DType::kI32, v.data(), static_cast<int64_t>(v.size()));
  }

  // WriteKv of the rows k and v (row floats each; k ignored on k_eq_v layers) at `slots`.
  void Write(Backend& backend, const std::vector<float>& k, const std::vector<float>& v,
             const std::vector<int32_t>& slots, int64_t row, Cache& cache) {
    if (slots.empty()) return;
    BufferPtr kb = cache.k != nullptr ? UploadF32(backend, k) : nullptr;
    BufferPtr vb = UploadF32(backend, v);
    BufferPtr sb = UploadI32(backend, slots);
    backend.WriteKv(kb.get(), *vb, *sb, static_cast<int64_t>(slots.size()), row, cache.k.get(),
                    *cache.v);
    EXPECT_TRUE(backend.Synchronize().ok());  // the inputs die here
  }

  // Attention of the batch's new tokens over `cache` on `backend`; the output, read back.
  std::vector<float> Attend(Backend& backend, const AttentionCase& c, const PagedBatch& batch,
                            const std::vector<float>& q, const Cache& cache,
                            const Buffer& k_norm) {
    const int64_t n_out = batch.tokens() * c.heads * c.head_dim;
    BufferPtr qb = UploadF32(backend, q);
    BufferPtr pos = UploadI32(backend, batch.positions);
    BufferPtr qs = UploadI32(backend, batch.query_start);
    BufferPtr lens = UploadI32(backend, c.seq_lens);
    BufferPtr pt = UploadI32(backend, batch.table);
    BufferPtr out = UploadF32(backend, std::vector<float>(n_out, std::nanf("")));
    BatchLayout l;
    l.num_tokens = batch.tokens();
    l.num_seqs = batch.num_seqs;
    l.max_pages_per_seq = batch.max_pages;
    l.positions = pos.get();
    l.query_start = qs.get();
    l.seq_lens = lens.get();
    l.page_tables[1] = pt.get();
    l.host_query_start = batch.query_start;
    l.host_seq_lens = c.seq_lens;
    backend.Attention(Args(c, l, *qb, cache, k_norm, *out));
    return ReadF32(backend, *out, n_out);
  }

  static AttentionArgs Args(const AttentionCase& c, const BatchLayout& layout, const Buffer& q,
                            const Cache& cache, const Buffer& k_norm, Buffer& out) {
    const int64_t d = c.head_dim;
    AttentionArgs a;
    a.layout = &layout;
    a.pool = 1;
    a.q = &q;
    a.k_cache = cache.k.get();
    a.v_cache = cache.v.get();
    a.k_norm_weight = &k_norm;
    a.rope = RopeSpec{d, d == 512 ? 64 : d / 2, d == 512 ? 1e6 : 1e4, 1.0};
    a.num_heads = c.heads;
    a.num_kv_heads = c.kv_heads;
    a.head_dim = d;
    a.page_size = PagedBatch::kPageSize;
    a.window = c.window;
    a.scale = 1.0f;
    a.out = &out;
    return a;
  }

  void Run(const AttentionCase& c) {
    ASSERT_EQ(gpu_->KvCacheDType(), DType::kBF16) << "the CUDA backend's default KV cache";
    const std::string what =
        absl::StrCat("bf16 cache d=", c.head_dim, " window=", c.window, " k_eq_v=", c.k_eq_v,
                     " heads=", c.heads, "/", c.kv_heads);
    const PagedBatch batch(c, rng_);
    const int64_t row = c.kv_heads * c.head_dim, rows = batch.cache_rows();
    const int64_t n_old = static_cast<int64_t>(batch.old_slots.size());
    const int64_t n_new = static_cast<int64_t>(batch.new_slots.size());
    // Keys and values as HeadNormRope leaves them (f32), and the queries.
    const std::vector<float> k_old = Random(n_old * row), v_old = Random(n_old * row);
    const std::vector<float> k_new = Random(n_new * row), v_new = Random(n_new * row);
    const std::vector<float> q = Random(batch.tokens() * c.heads * c.head_dim, 0.2f);
    Pair k_norm = Weight(Random(c.head_dim), DType::kBF16);

    Cache gpu = NanCache(*gpu_, DType::kBF16, rows, row, c.k_eq_v);
    Cache cpu = NanCache(*cpu_, DType::kF32, rows, row, c.k_eq_v);
    Cache cpu_rounded = NanCache(*cpu_, DType::kF32, rows, row, c.k_eq_v);
    Write(*gpu_, k_old, v_old, batch.old_slots, row, gpu);
    Write(*gpu_, k_new, v_new, batch.new_slots, row, gpu);
    Write(*cpu_, k_old, v_old, batch.old_slots, row, cpu);
    Write(*cpu_, k_new, v_new, batch.new_slots, row, cpu);
    Write(*cpu_, RoundedToBf16(k_old), RoundedToBf16(v_old), batch.old_slots, row, cpu_rounded);
    Write(*cpu_, RoundedToBf16(k_new), RoundedToBf16(v_new), batch.new_slots, row, cpu_rounded);

    // The cache's bits: each written row is F32ToBf16 of its source, every other row NaN.
    auto check_bits = [&](const Buffer& buf, const std::vector<float>& old_rows,
                          const std::vector<float>& new_rows, const char* name) {
      std::vector<uint16_t> got(rows * row);
      ASSERT_TRUE(gpu_->Read(buf, got.data(), got.size() * sizeof(uint16_t)).ok());
      std::vector<uint16_t> want(rows * row, 0x7fc0);
      for (int64_t t = 0; t < n_old; ++t) {
        for (int64_t i = 0; i < row; ++i) {
          want[batch.old_slots[t] * row + i] = F32ToBf16(old_rows[t * row + i]);
        }
      }
      for (int64_t t = 0; t < n_new; ++t) {
        for (int64_t i = 0; i < row; ++i) {
          want[batch.new_slots[t] * row + i] = F32ToBf16(new_rows[t * row + i]);
        }
      }
      int64_t wrong = 0, first_wrong = -1;
      for (int64_t i = 0; i < rows * row; ++i) {
        if (got[i] != want[i] && wrong++ == 0) first_wrong = i;
      }
      EXPECT_EQ(wrong, 0) << what << ": " << name << " cache differs from F32ToBf16 at "
                          << wrong << " elements, the first at " << first_wrong;
    };
    if (!c.k_eq_v) check_bits(*gpu.k, k_old, k_new, "K");
    check_bits(*gpu.v, v_old, v_new, "V");

    const std::vector<float> ours = Attend(*gpu_, c, batch, q, gpu, *k_norm.gpu);
    const std::vector<float> ref = Attend(*cpu_, c, batch, q, cpu, *k_norm.cpu);
    const std::vector<float> ref_rounded = Attend(*cpu_, c, batch, q, cpu_rounded, *k_norm.cpu);
    for (size_t i = 0; i < ours.size(); ++i) {
      ASSERT_FALSE(std::isnan(ours[i])) << what << ": NaN (an unwritten key?) at " << i;
    }
    const testing::Comparison same_values = testing::Compare(ours, ref_rounded);
    EXPECT_FALSE(same_values.nan_mismatch) << what;
    EXPECT_LE(same_values.Relative(), testing::kCudaF32RelTol)
        << what << ", against the CPU over the same rounded values: " << same_values.ToString();
    const testing::Comparison against_f32 = testing::Compare(ours, ref);
    EXPECT_FALSE(against_f32.nan_mismatch) << what;
    EXPECT_LE(against_f32.Relative(), testing::kCudaBf16KvRelTol)
        << what << ", against the CPU's f32 cache: " << against_f32.ToString();
  }
};

// Sliding layers keep K and V at head_dim 256, within a window: decode steps of sequences
// shorter than, inside and far past the window (the long one splits its keys over blocks),
// a prefill crossing the window, and a prefill beside a chunk of a long sequence; groups of 4
// query heads a KV head and of 2 (the 26B-A4B's sliding layers).
TEST_F(CudaBf16KvTest, SlidingLayerWithKAndVAtHeadDim256) {
  for (const auto& [heads, kv_heads] : std::vector<std::pair<int64_t, int64_t>>{{8, 2}, {16, 8}}) {
    Run({256, 64, false, {1, 37, 100, 1500}, {1, 1, 1, 1}, heads, kv_heads});
    Run({256, 64, false, {40, 90}, {40, 90}, heads, kv_heads});
    Run({256, 64, false, {5, 200}, {5, 3}, heads, kv_heads});
  }
}

// Full k_eq_v layers keep V only at head_dim 512 and derive K = RoPE(V * k_norm) from the bf16
// values: decode (long ranges split over blocks), prefill, and a few queries at the end of a
// long sequence; a group of 8 query heads a KV head, as both models' full layers.
TEST_F(CudaBf16KvTest, KEqVLayerWithVOnlyAtHeadDim512) {
  Run({512, 0, true, {1, 37, 1500}, {1, 1, 1}, 16, 2});
  Run({512, 0, true, {40, 23}, {40, 23}, 16, 2});
  Run({512, 0, true, {777}, {4}, 16, 2});
}

// A decode step's WriteKv and Attention on a bf16 cache, captured once as a CUDA graph (as the
// model records decode steps) and replayed on new queries, keys and values, gives what eager
// launches give, bit for bit: the kernels and their launch shapes are the same.
TEST_F(CudaBf16KvTest, DecodeStepOnABf16CacheReplaysAsEagerLaunches) {
  const std::vector<AttentionCase> cases = {{256, 64, false, {37, 100, 1500}, {1, 1, 1}, 16, 8},
                                            {512, 0, true, {37, 1500}, {1, 1}, 16, 2}};
  for (size_t key = 0; key < cases.size(); ++key) {
    const AttentionCase& c = cases[key];
    const PagedBatch batch(c, rng_);
    const int64_t row = c.kv_heads * c.head_dim, n_new = batch.tokens();
    const int64_t n_out = n_new * c.heads * c.head_dim;
    Cache cache = NanCache(*gpu_, DType::kBF16, batch.cache_rows(), row, c.k_eq_v);
    const int64_t n_old = static_cast<int64_t>(batch.old_slots.size());
    Write(*gpu_, Random(n_old * row), Random(n_old * row), batch.old_slots, row, cache);
    Pair k_norm = Weight(Random(c.head_dim), DType::kBF16);
    BufferPtr q = UploadF32(*gpu_, Random(n_out, 0.2f));
    BufferPtr k = UploadF32(*gpu_, Random(n_new * row)), v = UploadF32(*gpu_, Random(n_new * row));
    BufferPtr slots = UploadI32(*gpu_, batch.new_slots);
    BufferPtr pos = UploadI32(*gpu_, batch.positions), qs = UploadI32(*gpu_, batch.query_start);
    BufferPtr lens = UploadI32(*gpu_, c.seq_lens), pt = UploadI32(*gpu_, batch.table);
    BufferPtr out = *gpu_->Alloc(DType::kF32, n_out);
    BatchLayout l;
    l.num_tokens = n_new;
    l.num_seqs = batch.num_seqs;
    l.max_pages_per_seq = batch.max_pages;
    l.positions = pos.get();
    l.query_start = qs.get();
    l.seq_lens = lens.get();
    l.page_tables[1] = pt.get();
    l.slots[1] = slots.get();
    l.host_query_start = batch.query_start;
    l.host_seq_lens = c.seq_lens;
    auto step = [&] {
      gpu_->WriteKv(c.k_eq_v ? nullptr : k.get(), *v, *slots, n_new, row, cache.k.get(),
                    *cache.v);
      gpu_->Attention(Args(c, l, *q, cache, *k_norm.gpu, *out));
    };
    ASSERT_TRUE(gpu_->BeginCapture().ok());
    step();
    ASSERT_TRUE(gpu_->EndCapture(static_cast<int64_t>(key)).ok());
    for (int trial = 0; trial < 2; ++trial) {
      const std::vector<float> q_in = Random(n_out, 0.2f), k_in = Random(n_new * row),
                               v_in = Random(n_new * row);
      gpu_->Write(*q, q_in.data(), q_in.size() * sizeof(float));
      gpu_->Write(*k, k_in.data(), k_in.size() * sizeof(float));
      gpu_->Write(*v, v_in.data(), v_in.size() * sizeof(float));
      step();
      const std::vector<float> eager = ReadF32(*gpu_, *out, n_out);
      const std::vector<float> poison(n_out, std::nanf(""));
      gpu_->Write(*out, poison.data(), poison.size() * sizeof(float));
      ASSERT_TRUE(gpu_->Replay(static_cast<int64_t>(key)).ok());
      const std::vector<float> replayed = ReadF32(*gpu_, *out, n_out);
      int64_t differ = 0;
      for (int64_t i = 0; i < n_out; ++i) {
        if (std::memcmp(&eager[i], &replayed[i], sizeof(float)) != 0) ++differ;
      }
      EXPECT_EQ(differ, 0) << "case " << key << " trial " << trial << ": " << differ << " of "
                           << n_out << " outputs differ between the replay and eager launches";
    }
  }
  gpu_->DropGraphs();
}

// Prefill attention on the tensor-core kernel (CudaBackendOptions::tensor_core_attention),
// against the CPU backend over an f32 cache of the cached values rounded to bf16 (which a bf16
// cache holds, and which the kernel makes of an f32 cache's K and V as it loads them), so that
// what differs is the kernel's own rounding: Q, K derived on k_eq_v layers (the CPU derives it
// from the rounded V and keeps it f32) and the softmax weights P go into the bf16 products
// rounded to nearest even, each off by at most 2^-9 of itself, with f32 accumulation. The
// scores then move by a few 1e-3 (q . dk and dq . k summed over head_dim) and each weight by
// 2^-9, and the output, a convex combination of the values, by a few 1e-3 of max |ref|: an
// emulation of the kernel's tiling and rounding in double precision at these shapes and
// distributions (q in [-0.2, 0.2], k and v in [-1, 1]) gave 2.3e-3 to 2.9e-3 at head_dim 256
// and 3.7e-3 to 4.4e-3 at 512 over four draws. Held to kCudaRelTol (2^-7 of max |ref|), the
// bound of the other products that round activations to bf16. Every comparison also checks
// that the tensor-core kernel ran (the backend's path counter). The caches are filled directly
// with random values; sequences bring prefixes already in the cache (nonzero first positions)
// beside one-token rows, in one batch.
class CudaTensorCoreAttentionTest : public CudaBf16KvTest {
 protected:
  void SetUp() override {
    CudaBf16KvTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    CudaBackendOptions options;
    options.arena_bytes = size_t{2} << 30;
    options.tensor_core_attention = true;
    ASSERT_NO_FATAL_FAILURE(ReplaceGpu(options));
    options.arena_bytes = size_t{1} << 30;
    options.tensor_core_attention = false;
    auto scalar = CudaBackend::Create(options);
    ASSERT_TRUE(scalar.ok()) << scalar.status();
    scalar_ = *std::move(scalar);
  }

  // A cache of the given rows on `backend` in `dtype` (bf16: rounded to nearest even).
  Cache UploadCache(Backend& backend, DType dtype, const std::vector<float>& k,
                    const std::vector<float>& v, bool k_eq_v) {
    auto make = [&](const std::vector<float>& x) {
      BufferPtr b = *backend.Alloc(dtype, static_cast<int64_t>(x.size()));
      std::vector<uint16_t> bits;
      if (dtype == DType::kF32) {
        backend.Write(*b, x.data(), x.size() * sizeof(float));
      } else {
        bits.resize(x.size());
        for (size_t i = 0; i < x.size(); ++i) bits[i] = F32ToBf16(x[i]);
        backend.Write(*b, bits.data(), bits.size() * sizeof(uint16_t));
      }
      EXPECT_TRUE(backend.Synchronize().ok());  // the host copies die here
      return b;
    };
    Cache c;
    if (!k_eq_v) c.k = make(k);
    c.v = make(v);
    return c;
  }

  // The whole output's comparison, and the worst (token, head) row's error over that row's
  // own largest value: a fault in the rows that see many keys (small outputs, the ones whose
  // accumulators are rescaled most) hides under the whole output's bound, which the rows near
  // a sequence's start (a few keys: outputs near a value row) set.
  struct Comparison {
    testing::Comparison all;
    double worst_row = 0;
    int64_t worst_row_index = -1;
  };

  // Attention of the case's new tokens on the tensor-core backend (over a `dtype` cache) and
  // on `ref` (over an f32 cache of the values rounded to bf16), the batch changed by `edit`
  // where given. Every cache row that no sequence's page-table row maps (past each sequence's
  // end, unmapped pages, spare pages) holds NaN, so a read of a key no query sees shows.
  // Expects the tensor-core kernel to have run and no NaN out.
  Comparison Compare(Backend& ref, const AttentionCase& c, DType dtype,
                     const std::function<void(PagedBatch&)>& edit = nullptr) {
    PagedBatch batch(c, rng_);
    if (edit) edit(batch);
    const int64_t row = c.kv_heads * c.head_dim, n = batch.cache_rows() * row;
    std::vector<float> k = Random(n), v = Random(n);
    std::vector<bool> mapped(batch.cache_rows(), false);
    for (int64_t s = 0; s < batch.num_seqs; ++s) {
      for (int64_t p = 0; p < c.seq_lens[s]; ++p) {
        const int32_t page = batch.table[s * batch.max_pages + p / PagedBatch::kPageSize];
        if (page >= 0) mapped[page * PagedBatch::kPageSize + p % PagedBatch::kPageSize] = true;
      }
    }
    for (int64_t r = 0; r < batch.cache_rows(); ++r) {
      if (mapped[r]) continue;
      std::fill_n(k.begin() + r * row, row, std::numeric_limits<float>::quiet_NaN());
      std::fill_n(v.begin() + r * row, row, std::numeric_limits<float>::quiet_NaN());
    }
    const std::vector<float> q = Random(batch.tokens() * c.heads * c.head_dim, 0.2f);
    const std::vector<float> norm = Random(c.head_dim);
    std::vector<uint16_t> norm_bits(norm.size());
    for (size_t i = 0; i < norm.size(); ++i) norm_bits[i] = F32ToBf16(norm[i]);
    BufferPtr norm_gpu = *gpu_->UploadWeight(DType::kBF16, norm_bits.data(), norm_bits.size());
    BufferPtr norm_ref = *ref.UploadWeight(DType::kBF16, norm_bits.data(), norm_bits.size());
    const Cache gpu_cache = UploadCache(*gpu_, dtype, k, v, c.k_eq_v);
    const Cache ref_cache =
        UploadCache(ref, DType::kF32, RoundedToBf16(k), RoundedToBf16(v), c.k_eq_v);
    const int64_t before = gpu_->attention_paths().tensor_core;
    const std::vector<float> ours = Attend(*gpu_, c, batch, q, gpu_cache, *norm_gpu);
    const std::vector<float> want = Attend(ref, c, batch, q, ref_cache, *norm_ref);
    EXPECT_EQ(gpu_->attention_paths().tensor_core, before + 1) << "the tensor-core kernel ran";
    for (size_t i = 0; i < ours.size(); ++i) {
      if (std::isnan(ours[i])) {
        ADD_FAILURE() << "NaN (an unwritten row, or a key no query sees read) at " << i;
        break;
      }
    }
    Comparison cmp;
    cmp.all = testing::Compare(ours, want);
    const int64_t d = c.head_dim, rows = static_cast<int64_t>(ours.size()) / d;
    for (int64_t r = 0; r < rows && rows * d == static_cast<int64_t>(want.size()); ++r) {
      const double err = testing::Compare(ours.data() + r * d, want.data() + r * d, d).Relative();
      if (err > cmp.worst_row) {
        cmp.worst_row = err;
        cmp.worst_row_index = r;
      }
    }
    return cmp;
  }

  // The whole output within kCudaRelTol (2^-7 of max |ref|), and every (token, head) row
  // within kRowRelTol of its own largest value. An emulation of the kernel's tiling and
  // rounding in double precision (q, k rounded, P rounded per 64-key tile with the online max)
  // over 720 rows at head_dim 256 (1400 keys, windows 1024 and 64) and 512 (137 and 700 keys)
  // put the worst row at 4.9e-3 of its own largest value (mean 2.0e-3 to 2.5e-3).
  static constexpr double kRowRelTol = 1.0 / 64;
  void ExpectCloseByRow(const Comparison& cmp, const std::string& what) {
    EXPECT_FALSE(cmp.all.nan_mismatch) << what;
    EXPECT_LE(cmp.all.Relative(), testing::kCudaRelTol) << what << ": " << cmp.all.ToString();
    EXPECT_LE(cmp.worst_row, kRowRelTol)
        << what << ": (token, head) row " << cmp.worst_row_index << " is off by "
        << cmp.worst_row << " of its own largest value";
  }
  void ExpectCloseToCpu(const AttentionCase& c, DType dtype) {
    ExpectCloseByRow(Compare(*cpu_, c, dtype),
                absl::StrCat("tensor-core attention d=", c.head_dim, " window=", c.window,
                             " k_eq_v=", c.k_eq_v, " heads=", c.heads, "/", c.kv_heads,
                             " cache=", DTypeName(dtype)));
  }

  std::unique_ptr<CudaBackend> scalar_;  // tensor_core_attention off
};

// Sliding layers (K and V cached, head_dim 256): windows of 64 (cutting 64-key tiles) and 1024
// (the models'), groups of 2 query heads a KV head (the 26B-A4B's sliding layers) and 8; a
// batch of 1, 37 and 300 new tokens after prefixes of 40, 100 and 1100 positions, and a prompt
// from position 0; bf16 and f32 caches.
TEST_F(CudaTensorCoreAttentionTest, SlidingLayersAtHeadDim256) {
  for (const auto& [heads, kv_heads] : std::vector<std::pair<int64_t, int64_t>>{{16, 8}, {16, 2}}) {
    for (int64_t window : {64, 1024}) {
      for (DType dtype : {DType::kBF16, DType::kF32}) {
        ExpectCloseToCpu({256, window, false, {41, 137, 1400}, {1, 37, 300}, heads, kv_heads},
                         dtype);
        ExpectCloseToCpu({256, window, false, {200}, {200}, heads, kv_heads}, dtype);
      }
    }
  }
}

// Full k_eq_v layers (V cached, head_dim 512, K = RoPE(V * k_norm) derived in the kernel):
// groups of 8 (both models' full layers), a mixed batch as above (a shorter prefix: every key
// is visible, which the CPU reference pays for) and a prompt from 0.
TEST_F(CudaTensorCoreAttentionTest, KEqVLayersAtHeadDim512) {
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    ExpectCloseToCpu({512, 0, true, {41, 137, 700}, {1, 37, 300}, 16, 2}, dtype);
    ExpectCloseToCpu({512, 0, true, {130}, {130}, 16, 2}, dtype);
  }
}

// Other shapes the kernel takes, against the CPU: head dims that are multiples of 16 other
// than the models' (80 on the 64-row tiles; 272 and 384 on the 32-row tiles, whose score
// products split head_dim over two warps unevenly at 272), groups of 3 (one head a block, 64
// tokens) and 16 (two blocks a group), K = V and not, windows that cut a sequence's first tile.
TEST_F(CudaTensorCoreAttentionTest, OtherHeadDimsAndGroups) {
  const std::vector<AttentionCase> cases = {
      {80, 0, false, {90, 70}, {90, 20}, 8, 2},
      {272, 40, true, {90, 70}, {90, 20}, 8, 2},
      {384, 0, false, {90, 70}, {90, 20}, 8, 1},
      {256, 100, false, {150, 3}, {140, 3}, 6, 2},
      {512, 0, true, {150, 3}, {140, 3}, 32, 2},
  };
  for (const AttentionCase& c : cases) ExpectCloseToCpu(c, DType::kBF16);
}

// Pages of -1 inside the keys a query sees are skipped, as PagedAttention skips them (the CPU
// reference refuses them): the tensor-core kernel against the f32 kernel on the GPU, with
// every third page of each sequence's row unmapped.
TEST_F(CudaTensorCoreAttentionTest, UnmappedPagesAreSkippedAsThePagedKernelSkipsThem) {
  for (bool k_eq_v : {false, true}) {
    const int64_t d = k_eq_v ? 512 : 256;
    const AttentionCase c{d, k_eq_v ? 0 : 100, k_eq_v, {300, 90}, {200, 90}, 16, 2};
    const Comparison cmp = Compare(*scalar_, c, DType::kBF16, [](PagedBatch& b) {
      for (int64_t s = 0; s < b.num_seqs; ++s) {
        for (int64_t p = 1; p < b.max_pages; p += 3) b.table[s * b.max_pages + p] = -1;
      }
    });
    ExpectCloseByRow(cmp, absl::StrCat("unmapped pages, k_eq_v=", k_eq_v));
  }
}

// The f32 kernel keeps every step with tensor_core_attention off (the default), every step
// with f32_products (the exact-check mode), decode steps (one token a sequence), and head
// dims the tensor-core kernel does not take; a prefill with the option on takes the
// tensor-core kernel.
TEST_F(CudaTensorCoreAttentionTest, WhichKernelEachStepTakes) {
  CudaBackendOptions options;
  options.arena_bytes = size_t{1} << 30;
  options.tensor_core_attention = true;
  options.f32_products = true;
  auto exact = CudaBackend::Create(options);
  ASSERT_TRUE(exact.ok()) << exact.status();
  const AttentionCase prefill{256, 64, false, {100, 80}, {100, 80}, 8, 2};
  const AttentionCase decode{256, 64, false, std::vector<int32_t>(70, 90),
                             std::vector<int32_t>(70, 1), 8, 2};
  const AttentionCase odd_dim{40, 0, false, {100, 80}, {100, 80}, 8, 2};
  const PagedBatch batch(prefill, rng_), decode_batch(decode, rng_), odd_batch(odd_dim, rng_);
  auto run = [&](CudaBackend& b, const AttentionCase& c, const PagedBatch& pb) {
    const int64_t row = c.kv_heads * c.head_dim, n = pb.cache_rows() * row;
    const Cache cache = UploadCache(b, DType::kBF16, RoundedToBf16(Random(n)),
                                    RoundedToBf16(Random(n)), false);
    const std::vector<float> norm(c.head_dim, 1.0f);
    BufferPtr norm_b = *b.UploadWeight(DType::kF32, norm.data(), c.head_dim);
    const std::vector<float> out =
        Attend(b, c, pb, Random(pb.tokens() * c.heads * c.head_dim, 0.2f), cache, *norm_b);
    EXPECT_TRUE(std::none_of(out.begin(), out.end(), [](float x) { return std::isnan(x); }));
    return b.attention_paths();
  };
  auto expect = [](const CudaBackend::AttentionPathCounts& got, int64_t scalar,
                   int64_t tensor_core, const char* what) {
    EXPECT_EQ(got.scalar, scalar) << what;
    EXPECT_EQ(got.tensor_core, tensor_core) << what;
  };
  expect(run(*scalar_, prefill, batch), 1, 0, "prefill, option off");
  expect(run(**exact, prefill, batch), 1, 0, "prefill, option on with f32 products");
  expect(run(*gpu_, decode, decode_batch), 1, 0, "decode, option on");
  expect(run(*gpu_, odd_dim, odd_batch), 2, 0, "head_dim 40, option on");
  expect(run(*gpu_, prefill, batch), 2, 1, "prefill, option on");
}

TEST_F(CudaOpsTest, WriteKvScattersToSlots) {
  const int64_t tokens = 5, row = 2 * 256, cache_rows = 40;
  Pair k = F32(Random(tokens * row)), v = F32(Random(tokens * row));
  Pair slots = I32({3, 39, 0, 17, 18});
  Pair k_cache = F32(Random(cache_rows * row)), v_cache = F32(Random(cache_rows * row));
  cpu_->WriteKv(k.cpu.get(), *v.cpu, *slots.cpu, tokens, row, k_cache.cpu.get(), *v_cache.cpu);
  gpu_->WriteKv(k.gpu.get(), *v.gpu, *slots.gpu, tokens, row, k_cache.gpu.get(), *v_cache.gpu);
  ExpectClose(k_cache, cache_rows * row, "write_kv k", 0.0);
  ExpectClose(v_cache, cache_rows * row, "write_kv v", 0.0);
  Pair v_only = F32(Random(cache_rows * row));
  cpu_->WriteKv(nullptr, *v.cpu, *slots.cpu, tokens, row, nullptr, *v_only.cpu);
  gpu_->WriteKv(nullptr, *v.gpu, *slots.gpu, tokens, row, nullptr, *v_only.gpu);
  ExpectClose(v_only, cache_rows * row, "write_kv v only", 0.0);
}

TEST_F(CudaOpsTest, MoeRouteChoosesTheSameExpertsWithWeightsAndCounts) {
  const int64_t hidden = 96, experts = 128, top_k = 8;
  for (int64_t tokens : {1, 13}) {
    Pair x = F32(Random(tokens * hidden, 2.0f));
    Pair scale = Weight(Random(hidden), DType::kF32);
    Pair proj = Weight(Random(experts * hidden), DType::kBF16);
    Pair per_expert = Weight(Random(experts), DType::kF32);
    Pair ids = Poisoned(DType::kI32, tokens * top_k);
    Pair weights = Poisoned(DType::kF32, tokens * top_k);
    Pair counts = I32(std::vector<int32_t>(experts, 2));
    auto args_for = [&](bool gpu) {
      auto pick = [&](const Pair& p) { return gpu ? p.gpu.get() : p.cpu.get(); };
      MoeRouteArgs a;
      a.x = pick(x);
      a.router_scale = pick(scale);
      a.router_proj = pick(proj);
      a.per_expert_scale = pick(per_expert);
      a.num_tokens = tokens;
      a.hidden = hidden;
      a.num_experts = experts;
      a.top_k = top_k;
      a.topk_ids = pick(ids);
      a.topk_weights = pick(weights);
      a.expert_counts = pick(counts);
      return a;
    };
    cpu_->MoeRoute(args_for(false));
    gpu_->MoeRoute(args_for(true));
    ExpectEqualI32(ids, tokens * top_k, "router ids");
    ExpectClose(weights, tokens * top_k, "router weights");
    ExpectEqualI32(counts, experts, "expert counts");
  }
}

TEST_F(CudaOpsTest, MoeExpertsMatchOnFusedAndGroupedPathsWithIdleExperts) {
  const int64_t hidden = 64, inter = 48, experts = 16, top_k = 4;
  const int64_t first = 4, local = 8;  // this "rank" owns experts 4..11
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    Pair gate_up = Weight(Random(local * 2 * inter * hidden, 0.3f), dtype);
    Pair down = Weight(Random(local * hidden * inter, 0.3f), dtype);
    for (int64_t tokens : {1, 5, 37, 300}) {
      // Ascending distinct ids per token, avoiding expert 9 so one local expert gets nothing.
      std::vector<int32_t> ids;
      for (int64_t t = 0; t < tokens; ++t) {
        std::vector<int32_t> all;
        for (int32_t e = 0; e < experts; ++e) if (e != 9) all.push_back(e);
        std::shuffle(all.begin(), all.end(), rng_);
        std::sort(all.begin(), all.begin() + top_k);
        ids.insert(ids.end(), all.begin(), all.begin() + top_k);
      }
      Pair id = I32(ids);
      Pair w = F32(Random(tokens * top_k));
      Pair x = F32(Random(tokens * hidden));
      Pair out = Poisoned(DType::kF32, tokens * hidden);
      auto args_for = [&](bool gpu) {
        auto pick = [&](const Pair& p) { return gpu ? p.gpu.get() : p.cpu.get(); };
        MoeExpertsArgs a;
        a.x = pick(x);
        a.topk_ids = pick(id);
        a.topk_weights = pick(w);
        a.gate_up = pick(gate_up);
        a.down = pick(down);
        a.num_tokens = tokens;
        a.hidden = hidden;
        a.inter = inter;
        a.top_k = top_k;
        a.first_expert = first;
        a.num_local_experts = local;
        a.out = gpu ? out.gpu.get() : out.cpu.get();
        return a;
      };
      const CudaBackend::MoePathCounts before = gpu_->moe_paths();
      cpu_->MoeExperts(args_for(false));
      gpu_->MoeExperts(args_for(true));
      const CudaBackend::MoePathCounts after = gpu_->moe_paths();
      // Few tokens take the fused kernels; many the permuted products (cuBLAS's grouped GEMM,
      // or one cuBLASLt product per expert where cuBLAS refuses it), and the test says which
      // ran, so the grouped path cannot pass by falling back unseen.
      const bool many = tokens > 16;
      EXPECT_EQ(after.fused - before.fused, many ? 0 : 1) << "tokens=" << tokens;
      EXPECT_EQ((after.grouped + after.per_expert) - (before.grouped + before.per_expert),
                many ? 1 : 0)
          << "tokens=" << tokens;
      const bool bf16_rounded = many && dtype == DType::kBF16;
      ExpectClose(out, tokens * hidden,
                  absl::StrCat("moe experts ", DTypeName(dtype), " tokens=", tokens, " (",
                               many ? (after.grouped > before.grouped ? "grouped GEMM"
                                                                      : "per-expert products")
                                    : "fused",
                               ")"),
                  bf16_rounded ? testing::kCudaRelTol : testing::kCudaF32RelTol);
    }
  }
}

// The expert products scheduled on the device (CudaBackendOptions::device_scheduled_experts):
// a backend that takes them for every step of more than 16 tokens with bf16 weights.
class CudaScheduledExpertsTest : public CudaVsCpuTest {
 protected:
  void SetUp() override {
    CudaVsCpuTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    CudaBackendOptions options;
    options.arena_bytes = size_t{2} << 30;
    options.device_scheduled_experts = true;
    ASSERT_NO_FATAL_FAILURE(ReplaceGpu(options));
  }

  // `tokens` rows of ascending distinct ids drawn from `pool`.
  std::vector<int32_t> Ids(int64_t tokens, int64_t top_k, const std::vector<int32_t>& pool) {
    std::vector<int32_t> ids;
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<int32_t> all = pool;
      std::shuffle(all.begin(), all.end(), rng_);
      std::sort(all.begin(), all.begin() + top_k);
      ids.insert(ids.end(), all.begin(), all.begin() + top_k);
    }
    return ids;
  }

  struct Case {
    Pair gate_up, down, id, w, x, out;
    MoeExpertsArgs Args(bool gpu) const {
      auto pick = [&](const Pair& p) { return gpu ? p.gpu.get() : p.cpu.get(); };
      MoeExpertsArgs a;
      a.x = pick(x);
      a.topk_ids = pick(id);
      a.topk_weights = pick(w);
      a.gate_up = pick(gate_up);
      a.down = pick(down);
      a.out = pick(out);
      return a;
    }
  };
};

// Against the CPU's products at awkward shapes: experts with several row tiles, two with none
// (one in the middle, the last), k not a multiple of the 32-wide stage (and, at hidden 60, not of the 8-wide vector
// either), output widths that leave a partial column block, and a step where no slot is local
// (all zeros). The path counter shows the scheduled kernels ran.
TEST_F(CudaScheduledExpertsTest, MatchTheCpuAtAwkwardShapesAndIdleExperts) {
  const int64_t experts = 16, top_k = 4, first = 4, local = 8;  // this rank owns 4..11
  struct Shape {
    int64_t hidden, inter;
  };
  for (const Shape shape : {Shape{64, 48}, Shape{60, 36}, Shape{256, 104}}) {
    Case c;
    c.gate_up = Weight(Random(local * 2 * shape.inter * shape.hidden, 0.3f), DType::kBF16);
    c.down = Weight(Random(local * shape.hidden * shape.inter, 0.3f), DType::kBF16);
    std::vector<int32_t> idle_9_and_11, remote;
    for (int32_t e = 0; e < experts; ++e) {
      if (e != 9 && e != 11) idle_9_and_11.push_back(e);
      if (e < first || e >= first + local) remote.push_back(e);
    }
    for (int64_t tokens : {17, 300, 1000, -40}) {
      const bool none_local = tokens < 0;
      if (none_local) tokens = -tokens;
      c.id = I32(Ids(tokens, top_k, none_local ? remote : idle_9_and_11));
      c.w = F32(Random(tokens * top_k));
      c.x = F32(Random(tokens * shape.hidden));
      c.out = Poisoned(DType::kF32, tokens * shape.hidden);
      const std::string what = absl::StrCat("hidden=", shape.hidden, " inter=", shape.inter,
                                            " tokens=", tokens, none_local ? " (none local)" : "");
      const int64_t before = gpu_->moe_paths().scheduled;
      for (bool gpu : {false, true}) {
        MoeExpertsArgs a = c.Args(gpu);
        a.num_tokens = tokens;
        a.hidden = shape.hidden;
        a.inter = shape.inter;
        a.top_k = top_k;
        a.first_expert = first;
        a.num_local_experts = local;
        (gpu ? static_cast<Backend&>(*gpu_) : static_cast<Backend&>(*cpu_)).MoeExperts(a);
      }
      EXPECT_EQ(gpu_->moe_paths().scheduled - before, 1) << what;
      ExpectClose(c.out, tokens * shape.hidden, what, testing::kCudaRelTol);
    }
  }
}

// The scheduled path needs no host round trip: recorded in a CUDA graph, replays on new inputs
// (other routing, so other counts per expert) give the eager launches' outputs bit for bit.
// f32 weights and few tokens keep their paths.
TEST_F(CudaScheduledExpertsTest, RecordedInAGraphAndLeftToOtherPathsWhereItDoesNotApply) {
  const int64_t hidden = 128, inter = 64, experts = 8, top_k = 2, tokens = 96;
  std::vector<int32_t> pool;
  for (int32_t e = 0; e < experts; ++e) pool.push_back(e);
  Case c;
  c.gate_up = Weight(Random(experts * 2 * inter * hidden, 0.3f), DType::kBF16);
  c.down = Weight(Random(experts * hidden * inter, 0.3f), DType::kBF16);
  c.id = I32(Ids(tokens, top_k, pool));
  c.w = F32(Random(tokens * top_k));
  c.x = F32(Random(tokens * hidden));
  c.out = Poisoned(DType::kF32, tokens * hidden);
  MoeExpertsArgs a = c.Args(true);
  a.num_tokens = tokens;
  a.hidden = hidden;
  a.inter = inter;
  a.top_k = top_k;
  a.num_local_experts = experts;
  ASSERT_TRUE(gpu_->BeginCapture().ok());
  gpu_->MoeExperts(a);
  ASSERT_TRUE(gpu_->EndCapture(1).ok());
  for (int trial = 0; trial < 3; ++trial) {
    const std::vector<int32_t> ids = Ids(tokens, top_k, pool);
    const std::vector<float> x = Random(tokens * hidden);
    gpu_->Write(*c.id.gpu, ids.data(), ids.size() * sizeof(int32_t));
    gpu_->Write(*c.x.gpu, x.data(), x.size() * sizeof(float));
    gpu_->MoeExperts(a);
    const std::vector<float> eager = ReadF32(*gpu_, *c.out.gpu, tokens * hidden);
    const std::vector<float> poison(tokens * hidden, std::nanf(""));
    gpu_->Write(*c.out.gpu, poison.data(), poison.size() * sizeof(float));
    ASSERT_TRUE(gpu_->Replay(1).ok());
    EXPECT_EQ(ReadF32(*gpu_, *c.out.gpu, tokens * hidden), eager) << "trial " << trial;
  }
  const CudaBackend::MoePathCounts before = gpu_->moe_paths();
  Case f32;
  f32.gate_up = Weight(Random(experts * 2 * inter * hidden, 0.3f), DType::kF32);
  f32.down = Weight(Random(experts * hidden * inter, 0.3f), DType::kF32);
  MoeExpertsArgs b = a;
  b.gate_up = f32.gate_up.gpu.get();
  b.down = f32.down.gpu.get();
  gpu_->MoeExperts(b);  // f32 weights: cuBLAS's products
  MoeExpertsArgs few = a;
  few.num_tokens = 5;
  gpu_->MoeExperts(few);  // decode-sized: the fused kernels
  ASSERT_TRUE(gpu_->Synchronize().ok());
  const CudaBackend::MoePathCounts after = gpu_->moe_paths();
  EXPECT_EQ(after.scheduled, before.scheduled);
  EXPECT_EQ(after.fused - before.fused, 1);
  EXPECT_EQ((after.grouped + after.per_expert) - (before.grouped + before.per_expert), 1);
}

TEST_F(CudaOpsTest, TopKAndLogSumExpMatch) {
  const int64_t rows = 3, cols = 1001, k = 17;
  Pair x = F32(Random(rows * cols, 10.0f));
  Pair values = Poisoned(DType::kF32, rows * k);
  Pair ids = Poisoned(DType::kI32, rows * k);
  cpu_->TopK(*x.cpu, rows, cols, k, 500, *values.cpu, *ids.cpu);
  gpu_->TopK(*x.gpu, rows, cols, k, 500, *values.gpu, *ids.gpu);
  ExpectClose(values, rows * k, "topk values", 0.0);
  ExpectEqualI32(ids, rows * k, "topk ids");
  std::vector<float> temperature{1.0f, 0.7f, 1.3f};
  Pair mx = Poisoned(DType::kF32, rows), sm = Poisoned(DType::kF32, rows);
  cpu_->LogSumExp(*x.cpu, rows, cols, temperature, *mx.cpu, *sm.cpu);
  gpu_->LogSumExp(*x.gpu, rows, cols, temperature, *mx.gpu, *sm.gpu);
  ExpectClose(mx, rows, "lse max");
  ExpectClose(sm, rows, "lse sum");
}

TEST_F(CudaOpsTest, SampleDrawsTheSameTokensAsTheCpuBackend) {
  const int64_t rows = 5, vocab = 3001;
  Pair logits = F32(Random(rows * vocab, 6.0f));
  std::vector<SamplingParams> params(rows);
  params[0] = {};  // greedy
  params[1] = {0.8f, 0, 1.0f, 7, 11, 3};
  params[2] = {1.0f, 40, 1.0f, 7, 12, 9};
  params[3] = {1.2f, 0, 0.9f, 8, 13, 100};
  params[4] = {0.6f, 100, 0.5f, 9, 14, 1};
  for (int trial = 0; trial < 4; ++trial) {
    for (auto& p : params) p.position += 1;
    Pair ids = Poisoned(DType::kI32, rows);
    cpu_->Sample(*logits.cpu, rows, vocab, params, *ids.cpu);
    gpu_->Sample(*logits.gpu, rows, vocab, params, *ids.gpu);
    ExpectEqualI32(ids, rows, absl::StrCat("sample trial ", trial));
  }
}

// Greedy rows at vocabulary widths that take the vectorised argmax (a multiple of 4, up to the
// real 262144): a tie goes to the lower id, a maximum in the last column or the first is found.
TEST_F(CudaOpsTest, GreedyArgmaxOnWideRowsWithTiesAndEdges) {
  for (int64_t vocab : {4100, 262144}) {
    const int64_t rows = 4;
    std::vector<float> host = Random(rows * vocab, 6.0f);
    host[1 * vocab + vocab - 3] = 50.0f;  // tie: the lower id must win
    host[1 * vocab + 17] = 50.0f;
    host[2 * vocab + vocab - 1] = 50.0f;  // the last column
    host[3 * vocab + 0] = 50.0f;          // the first column
    Pair logits = F32(host);
    std::vector<SamplingParams> greedy(rows);
    Pair ids = Poisoned(DType::kI32, rows);
    cpu_->Sample(*logits.cpu, rows, vocab, greedy, *ids.cpu);
    gpu_->Sample(*logits.gpu, rows, vocab, greedy, *ids.gpu);
    ExpectEqualI32(ids, rows, absl::StrCat("greedy vocab ", vocab));
    std::vector<int32_t> got = ReadI32(*gpu_, *ids.gpu, rows);
    EXPECT_EQ(got[1], 17);
    EXPECT_EQ(got[2], vocab - 1);
    EXPECT_EQ(got[3], 0);
  }
}

// A chain of ops captured once as a CUDA graph and replayed on new inputs gives the tokens that
// eager launches give.
TEST_F(CudaOpsTest, GraphReplayGivesTheSameTokensAsEagerLaunches) {
  const int64_t rows = 3, hidden = 96, vocab = 301;
  Pair x = F32(Random(rows * hidden));
  Pair norm_w = Weight(Random(hidden), DType::kBF16);
  Pair head = Weight(Random(vocab * hidden), DType::kBF16);
  auto normed = *gpu_->Alloc(DType::kF32, rows * hidden);
  auto logits = *gpu_->Alloc(DType::kF32, rows * vocab);
  auto ids = *gpu_->Alloc(DType::kI32, rows);
  std::vector<SamplingParams> greedy(rows);
  auto step = [&] {
    gpu_->RmsNorm(*x.gpu, norm_w.gpu.get(), rows, hidden, 1e-6f, *normed);
    gpu_->MatMul(*normed, *head.gpu, rows, vocab, hidden, *logits);
    gpu_->Softcap(*logits, rows * vocab, 30.0f);
    gpu_->Sample(*logits, rows, vocab, greedy, *ids);
  };
  ASSERT_TRUE(gpu_->BeginCapture().ok());
  step();
  ASSERT_TRUE(gpu_->EndCapture(rows).ok());
  for (int trial = 0; trial < 3; ++trial) {
    std::vector<float> input = Random(rows * hidden, 3.0f);
    gpu_->Write(*x.gpu, input.data(), input.size() * sizeof(float));
    step();
    std::vector<int32_t> eager = ReadI32(*gpu_, *ids, rows);
    std::vector<int32_t> poison(rows, -7);
    gpu_->Write(*ids, poison.data(), rows * sizeof(int32_t));
    ASSERT_TRUE(gpu_->Replay(rows).ok());
    EXPECT_EQ(ReadI32(*gpu_, *ids, rows), eager) << "trial " << trial;
  }
}

TEST_F(CudaOpsTest, CaptureMisuseBecomesAStickyError) {
  // Capturing forbids host reads: the refusal becomes the sticky error.
  ASSERT_TRUE(gpu_->BeginCapture().ok());
  std::vector<float> host(4, 1.0f);
  auto buf = *gpu_->Alloc(DType::kF32, 4);
  gpu_->Write(*buf, host.data(), 16);
  EXPECT_FALSE(gpu_->EndCapture(0).ok());
  absl::Status s = gpu_->Synchronize();
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(gpu_->Synchronize().ok()) << "the error must stay";
}

}  // namespace
}  // namespace gemma
