// CPU backend ops against hand-computed values: RoPE of both kinds, the sliding-window boundary,
// routing with ties, renormalisation and per-expert scale, expert compute on both of its
// schedules, sampling, matrix products of every kernel's row counts, and the vectorised tanh of
// GELU and the logit softcap.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace gemma {
namespace {

BufferPtr F32(CpuBackend& backend, const std::vector<float>& values) {
  BufferPtr b = *backend.Alloc(DType::kF32, static_cast<int64_t>(values.size()));
  backend.Write(*b, values.data(), values.size() * sizeof(float));
  return b;
}
BufferPtr I32(CpuBackend& backend, const std::vector<int32_t>& values) {
  BufferPtr b = *backend.Alloc(DType::kI32, static_cast<int64_t>(values.size()));
  backend.Write(*b, values.data(), values.size() * sizeof(int32_t));
  return b;
}
std::vector<float> ReadF32(CpuBackend& backend, const Buffer& b, int64_t n) {
  std::vector<float> out(n);
  EXPECT_TRUE(backend.Read(b, out.data(), n * sizeof(float)).ok());
  return out;
}

TEST(RopeTest, DefaultKindRotatesEveryPairWithHeadDimExponents) {
  RopeSpec rope{/*head_dim=*/8, /*rotary_pairs=*/4, /*theta=*/10000.0, /*factor=*/1.0};
  std::vector<float> inv = cpu::RopeInvFreq(rope);
  ASSERT_EQ(inv.size(), 4u);
  EXPECT_FLOAT_EQ(inv[0], 1.0f);
  EXPECT_FLOAT_EQ(inv[1], 0.1f);
  EXPECT_FLOAT_EQ(inv[2], 0.01f);
  EXPECT_FLOAT_EQ(inv[3], 0.001f);
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8};
  cpu::ApplyRope(x.data(), 3, rope);
  // Pair (0, 4) at angle 3 * 1: (1, 5) -> (cos3 - 5 sin3, 5 cos3 + sin3).
  EXPECT_NEAR(x[0], std::cos(3.0) - 5 * std::sin(3.0), 1e-5);
  EXPECT_NEAR(x[4], 5 * std::cos(3.0) + std::sin(3.0), 1e-5);
  // Pair (2, 6) at angle 0.03.
  EXPECT_NEAR(x[2], 3 * std::cos(0.03) - 7 * std::sin(0.03), 1e-5);
  EXPECT_NEAR(x[6], 7 * std::cos(0.03) + 3 * std::sin(0.03), 1e-5);
}

TEST(RopeTest, ProportionalKindRotatesOnlyLeadingPairsWithFullHeadDimExponent) {
  // head_dim 16, partial 0.25 -> 2 rotated pairs: (0, 8) and (1, 9); exponent over 16, not 4.
  RopeSpec rope{/*head_dim=*/16, /*rotary_pairs=*/2, /*theta=*/1e6, /*factor=*/1.0};
  std::vector<float> inv = cpu::RopeInvFreq(rope);
  EXPECT_FLOAT_EQ(inv[0], 1.0f);
  EXPECT_FLOAT_EQ(inv[1], static_cast<float>(std::pow(1e6, -2.0 / 16.0)));
  for (int i = 2; i < 8; ++i) EXPECT_EQ(inv[i], 0.0f) << i;
  std::vector<float> x(16);
  std::iota(x.begin(), x.end(), 1.0f);
  std::vector<float> before = x;
  const int position = 5;
  cpu::ApplyRope(x.data(), position, rope);
  double a1 = position * std::pow(1e6, -2.0 / 16.0);
  EXPECT_NEAR(x[0], before[0] * std::cos(5.0) - before[8] * std::sin(5.0), 1e-5);
  EXPECT_NEAR(x[8], before[8] * std::cos(5.0) + before[0] * std::sin(5.0), 1e-5);
  EXPECT_NEAR(x[1], before[1] * std::cos(a1) - before[9] * std::sin(a1), 1e-5);
  EXPECT_NEAR(x[9], before[9] * std::cos(a1) + before[1] * std::sin(a1), 1e-5);
  for (int i : {2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15}) EXPECT_EQ(x[i], before[i]) << i;
}

// With a zero query every visible key scores the same, so the output is the mean of the visible
// values: the window shows in which values are averaged.
class WindowTest : public ::testing::Test {
 protected:
  // Output of a single query at `position` with a window, over keys 0..position whose values
  // are v_j = j + 1 (one head, head_dim 2, page size 4).
  float AttendAt(int64_t position, int64_t window) {
    const int64_t page_size = 4, d = 2;
    const int64_t len = position + 1;
    const int64_t pages = (len + page_size - 1) / page_size;
    std::vector<float> cache(pages * page_size * d, 0.0f);
    for (int64_t j = 0; j < len; ++j) cache[j * d] = cache[j * d + 1] = static_cast<float>(j + 1);
    auto k_cache = F32(backend_, cache);
    auto v_cache = F32(backend_, cache);
    std::vector<int32_t> table(pages);
    std::iota(table.begin(), table.end(), 0);
    auto q = F32(backend_, {0.0f, 0.0f});
    auto out = *backend_.Alloc(DType::kF32, d);
    auto positions = I32(backend_, {static_cast<int32_t>(position)});
    auto query_start = I32(backend_, {0, 1});
    auto seq_lens = I32(backend_, {static_cast<int32_t>(len)});
    auto page_table = I32(backend_, table);
    BatchLayout layout;
    layout.num_tokens = 1;
    layout.num_seqs = 1;
    layout.max_pages_per_seq = pages;
    layout.positions = positions.get();
    layout.query_start = query_start.get();
    layout.seq_lens = seq_lens.get();
    layout.page_tables[0] = page_table.get();
    layout.host_query_start = {0, 1};
    layout.host_seq_lens = {static_cast<int32_t>(len)};
    AttentionArgs args;
    args.layout = &layout;
    args.q = q.get();
    args.k_cache = k_cache.get();
    args.v_cache = v_cache.get();
    args.num_heads = 1;
    args.num_kv_heads = 1;
    args.head_dim = d;
    args.page_size = page_size;
    args.window = window;
    args.out = out.get();
    backend_.Attention(args);
    return ReadF32(backend_, *out, d)[0];
  }
  static float MeanOf(int64_t first, int64_t last) {  // mean of j + 1 over [first, last]
    return static_cast<float>(first + last + 2) / 2.0f;
  }
  CpuBackend backend_;
};

TEST_F(WindowTest, QueryAtWindowMinusOneSeesEveryKey) {
  EXPECT_FLOAT_EQ(AttendAt(7, 8), MeanOf(0, 7));
}

TEST_F(WindowTest, QueryOnePastTheWindowDropsTheFirstKey) {
  EXPECT_FLOAT_EQ(AttendAt(8, 8), MeanOf(1, 8));
}

TEST_F(WindowTest, WindowIncludesCurrentTokenAndWindowMinusOnePrevious) {
  EXPECT_FLOAT_EQ(AttendAt(20, 8), MeanOf(13, 20));
  EXPECT_FLOAT_EQ(AttendAt(20, 0), MeanOf(0, 20));  // full causal
}

struct RouteResult {
  std::vector<int32_t> ids;
  std::vector<float> weights;
  std::vector<int32_t> counts;
};

// Routes one token whose router logits are `logits` (hidden 1, x = 1, scale = 1: the router
// projection column is the logits themselves).
RouteResult Route(const std::vector<float>& logits, const std::vector<float>& per_expert,
                  int64_t top_k) {
  CpuBackend backend;
  const int64_t experts = static_cast<int64_t>(logits.size());
  auto x = F32(backend, {1.0f});
  auto scale = F32(backend, {1.0f});
  auto proj = F32(backend, logits);
  auto pes = F32(backend, per_expert);
  auto ids = *backend.Alloc(DType::kI32, top_k);
  auto weights = *backend.Alloc(DType::kF32, top_k);
  std::vector<int32_t> zeros(experts, 0);
  auto counts = I32(backend, zeros);
  MoeRouteArgs args;
  args.x = x.get();
  args.router_scale = scale.get();
  args.router_proj = proj.get();
  args.per_expert_scale = pes.get();
  args.num_tokens = 1;
  args.hidden = 1;
  args.num_experts = experts;
  args.top_k = top_k;
  args.topk_ids = ids.get();
  args.topk_weights = weights.get();
  args.expert_counts = counts.get();
  backend.MoeRoute(args);
  RouteResult r;
  r.ids.resize(top_k);
  r.counts.resize(experts);
  EXPECT_TRUE(backend.Read(*ids, r.ids.data(), top_k * sizeof(int32_t)).ok());
  r.weights = ReadF32(backend, *weights, top_k);
  EXPECT_TRUE(backend.Read(*counts, r.counts.data(), experts * sizeof(int32_t)).ok());
  return r;
}

TEST(MoeRouteTest, TiesGoToTheLowerExpertId) {
  // Experts 1, 3 and 4 tie for second place; top-2 takes 0 and then 1.
  RouteResult r = Route({3.0f, 1.0f, -2.0f, 1.0f, 1.0f}, {1, 1, 1, 1, 1}, 2);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(r.counts, (std::vector<int32_t>{1, 1, 0, 0, 0}));
}

TEST(MoeRouteTest, WeightsAreRenormalisedThenScaledPerExpert) {
  RouteResult r = Route({0.5f, 2.0f, -1.0f, 1.0f}, {1.0f, 2.0f, 3.0f, 0.5f}, 2);
  ASSERT_EQ(r.ids, (std::vector<int32_t>{1, 3}));  // ascending id order
  double e1 = std::exp(2.0), e3 = std::exp(1.0);
  EXPECT_NEAR(r.weights[0], e1 / (e1 + e3) * 2.0, 1e-6);
  EXPECT_NEAR(r.weights[1], e3 / (e1 + e3) * 0.5, 1e-6);
}

// Experts of one rank (local experts 3..8 of 10, as under expert parallelism) over uneven
// routing: expert 5 takes every token, others a few or none. Each token's output must be the
// weighted sum of its local experts' MLPs (double-precision reference), whether the threads
// claim whole experts (decode sizes) or split every product (larger batches, or the option at
// 0), with 1, 2 and 3 threads.
TEST(MoeExpertsTest, BothSchedulesMatchDoubleReference) {
  const int64_t hidden = 40, inter = 24, top_k = 3, first = 3, local = 6;
  auto gelu = [](double v) {
    return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
  };
  for (int64_t tokens : {int64_t{1}, int64_t{5}, int64_t{40}, int64_t{70}}) {
    std::vector<float> x(tokens * hidden), gate_up(local * 2 * inter * hidden),
        down(local * hidden * inter), weights(tokens * top_k);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37 * i + 0.2);
    for (size_t i = 0; i < gate_up.size(); ++i) gate_up[i] = 0.2f * std::cos(0.013 * i);
    for (size_t i = 0; i < down.size(); ++i) down[i] = 0.2f * std::sin(0.029 * i + 1.0);
    std::vector<int32_t> ids;
    for (int64_t t = 0; t < tokens; ++t) {
      // Ascending ids: one below the local range, expert 5, and one of 6..9 (9 is not local).
      ids.insert(ids.end(), {static_cast<int32_t>(t % 3), 5, static_cast<int32_t>(6 + t % 4)});
      for (int64_t k = 0; k < top_k; ++k) weights[t * top_k + k] = 0.5f + 0.1f * k + 0.01f * t;
    }
    std::vector<double> want(tokens * hidden, 0.0);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t e = ids[t * top_k + k] - first;
        if (e < 0 || e >= local) continue;
        std::vector<double> act(inter);
        for (int64_t i = 0; i < inter; ++i) {
          double g = 0, u = 0;
          for (int64_t j = 0; j < hidden; ++j) {
            g += static_cast<double>(x[t * hidden + j]) * gate_up[(e * 2 * inter + i) * hidden + j];
            u += static_cast<double>(x[t * hidden + j]) *
                 gate_up[(e * 2 * inter + inter + i) * hidden + j];
          }
          act[i] = gelu(g) * u;
        }
        for (int64_t o = 0; o < hidden; ++o) {
          double y = 0;
          for (int64_t i = 0; i < inter; ++i) y += act[i] * down[(e * hidden + o) * inter + i];
          want[t * hidden + o] += weights[t * top_k + k] * y;
        }
      }
    }
    for (int threads : {1, 2, 3}) {
      for (int64_t whole_max : {int64_t{64}, int64_t{0}}) {
        CpuBackend backend(
            CpuBackendOptions{.num_threads = threads, .experts_whole_max_tokens = whole_max});
        auto xb = F32(backend, x);
        auto ib = I32(backend, ids);
        auto wb = F32(backend, weights);
        auto gu = *backend.UploadWeight(DType::kF32, gate_up.data(), gate_up.size());
        auto dn = *backend.UploadWeight(DType::kF32, down.data(), down.size());
        auto out = F32(backend, std::vector<float>(tokens * hidden, 123.0f));
        MoeExpertsArgs a{.x = xb.get(), .topk_ids = ib.get(), .topk_weights = wb.get(),
                         .gate_up = gu.get(), .down = dn.get(), .num_tokens = tokens,
                         .hidden = hidden, .inter = inter, .top_k = top_k, .first_expert = first,
                         .num_local_experts = local, .out = out.get()};
        backend.MoeExperts(a);
        auto got = ReadF32(backend, *out, tokens * hidden);
        for (int64_t i = 0; i < tokens * hidden; ++i) {
          ASSERT_NEAR(got[i], want[i], 1e-5 * (1.0 + std::abs(want[i])))
              << "tokens " << tokens << " threads " << threads << " whole_max " << whole_max
              << " output " << i;
        }
      }
    }
  }
}

TEST(SampleTest, GreedyTakesTheLowestIdOnTies) {
  CpuBackend backend;
  auto logits = F32(backend, {0.5f, 2.0f, 2.0f, -1.0f});
  auto ids = *backend.Alloc(DType::kI32, 1);
  backend.Sample(*logits, 1, 4, {SamplingParams{}}, *ids);
  int32_t id = -1;
  ASSERT_TRUE(backend.Read(*ids, &id, sizeof(id)).ok());
  EXPECT_EQ(id, 1);
}

TEST(SampleTest, SeededDrawsDependOnlyOnSeedRequestAndPosition) {
  CpuBackend backend;
  std::vector<float> row = {1.0f, 1.2f, 0.8f, 1.1f, 0.9f, 1.05f};
  auto logits = F32(backend, row);
  auto ids = *backend.Alloc(DType::kI32, 1);
  auto draw = [&](uint64_t seed, uint64_t key, int64_t position, int32_t top_k = 0,
                  float top_p = 1.0f) {
    SamplingParams p;
    p.temperature = 1.0f;
    p.seed = seed;
    p.request_key = key;
    p.position = position;
    p.top_k = top_k;
    p.top_p = top_p;
    backend.Sample(*logits, 1, 6, {p}, *ids);
    int32_t id = -1;
    EXPECT_TRUE(backend.Read(*ids, &id, sizeof(id)).ok());
    return id;
  };
  std::vector<int32_t> first, again, other_seed;
  for (int pos = 0; pos < 64; ++pos) {
    first.push_back(draw(42, 7, pos));
    again.push_back(draw(42, 7, pos));
    other_seed.push_back(draw(43, 7, pos));
  }
  EXPECT_EQ(first, again);
  EXPECT_NE(first, other_seed);
  // Every token gets drawn sometimes (no bias to one id).
  for (int id = 0; id < 6; ++id) {
    EXPECT_NE(std::count(first.begin(), first.end(), id), 0) << id;
  }
  // top_k 1 and a tiny top_p are greedy.
  for (int pos = 0; pos < 16; ++pos) {
    EXPECT_EQ(draw(1, 2, pos, /*top_k=*/1), 1);
    EXPECT_EQ(draw(1, 2, pos, 0, /*top_p=*/1e-3f), 1);
    int32_t two = draw(5, 2, pos, /*top_k=*/2);
    EXPECT_TRUE(two == 1 || two == 3) << two;
  }
}

TEST(SamplingUniformTest, InUnitIntervalAndSpread) {
  double sum = 0.0;
  for (int i = 0; i < 10000; ++i) {
    double u = SamplingUniform(3, 9, i);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  EXPECT_NEAR(sum / 10000, 0.5, 0.02);
}

TEST(MatMulTest, Bf16WeightsMatchF32WeightsOfTheSameValues) {
  CpuBackend backend;
  const int64_t m = 13, n = 37, k = 29;
  std::vector<float> x(m * k), w(n * k);
  std::vector<uint16_t> w_bf16(n * k);
  for (int64_t i = 0; i < m * k; ++i) x[i] = std::sin(0.37 * i + 0.1);
  for (int64_t i = 0; i < n * k; ++i) {
    w_bf16[i] = F32ToBf16(std::cos(0.11 * i));
    w[i] = Bf16ToF32(w_bf16[i]);
  }
  auto xb = F32(backend, x);
  auto wf = *backend.UploadWeight(DType::kF32, w.data(), n * k);
  auto wb = *backend.UploadWeight(DType::kBF16, w_bf16.data(), n * k);
  for (int64_t rows : {int64_t{1}, int64_t{4}, m}) {  // dot kernel and blocked path
    auto y1 = *backend.Alloc(DType::kF32, rows * n);
    auto y2 = *backend.Alloc(DType::kF32, rows * n);
    backend.MatMul(*xb, *wf, rows, n, k, *y1);
    backend.MatMul(*xb, *wb, rows, n, k, *y2);
    auto a = ReadF32(backend, *y1, rows * n);
    auto b = ReadF32(backend, *y2, rows * n);
    for (int64_t i = 0; i < rows * n; ++i) {
      double ref = 0;
      for (int64_t j = 0; j < k; ++j) ref += static_cast<double>(x[(i / n) * k + j]) * w[(i % n) * k + j];
      EXPECT_NEAR(a[i], ref, 1e-4) << i;
      EXPECT_NEAR(b[i], ref, 1e-4) << i;
    }
  }
}

TEST(MatMulTest, EveryRowCountAndTailMatchesDoubleProducts) {
  // Row counts of every kernel (sgemv, tiles with 1 to 3 rows left over, the streaming and the
  // shared-load tiles, sgemm) and lengths with and without a remainder past 16 columns; n = 37
  // leaves one weight row past the tiles of four.
  CpuBackend backend;
  const int64_t n = 37;
  for (int64_t k : {int64_t{16}, int64_t{29}, int64_t{256}, int64_t{1043}}) {
    const int64_t max_rows = 65;
    std::vector<float> x(max_rows * k), w(n * k);
    for (int64_t i = 0; i < max_rows * k; ++i) x[i] = std::sin(0.37 * i + 0.1);
    for (int64_t i = 0; i < n * k; ++i) w[i] = std::cos(0.11 * i);
    auto xb = F32(backend, x);
    auto wf = *backend.UploadWeight(DType::kF32, w.data(), n * k);
    for (int64_t rows : {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 16, 33, 64, 65}) {
      auto y = *backend.Alloc(DType::kF32, rows * n);
      backend.MatMul(*xb, *wf, rows, n, k, *y);
      auto got = ReadF32(backend, *y, rows * n);
      for (int64_t i = 0; i < rows * n; ++i) {
        double ref = 0;
        for (int64_t j = 0; j < k; ++j) {
          ref += static_cast<double>(x[(i / n) * k + j]) * w[(i % n) * k + j];
        }
        ASSERT_NEAR(got[i], ref, 1e-5 * k) << "k " << k << " rows " << rows << " output " << i;
      }
    }
  }
}

TEST(TanhTest, GeluMulAndSoftcapMatchStdTanh) {
  CpuBackend backend;
  const int64_t inter = 1000;
  std::vector<float> gate_up(2 * inter);
  for (int64_t i = 0; i < inter; ++i) {
    gate_up[i] = -12.0f + 24.0f * static_cast<float>(i) / inter;  // gate, through both tails
    gate_up[inter + i] = 0.5f + std::cos(0.3 * i);                // up
  }
  gate_up[0] = 0.0f;
  gate_up[1] = 1e-5f;
  gate_up[2] = -3e-4f;
  auto gu = F32(backend, gate_up);
  auto act = *backend.Alloc(DType::kF32, inter);
  backend.GeluMul(*gu, 1, inter, *act);
  auto got = ReadF32(backend, *act, inter);
  for (int64_t i = 0; i < inter; ++i) {
    const double g = gate_up[i];
    const double ref =
        0.5 * g * (1.0 + std::tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) *
        gate_up[inter + i];
    EXPECT_NEAR(got[i], ref, 1e-6 * std::max(1.0, std::fabs(ref))) << gate_up[i];
  }

  const float cap = 30.0f;
  std::vector<float> logits(4001);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = -400.0f + 0.2f * static_cast<float>(i);
  logits[2000] = 0.0f;
  logits[2001] = 1e-3f;
  auto lb = F32(backend, logits);
  backend.Softcap(*lb, static_cast<int64_t>(logits.size()), cap);
  auto capped = ReadF32(backend, *lb, static_cast<int64_t>(logits.size()));
  for (size_t i = 0; i < logits.size(); ++i) {
    const double ref = cap * std::tanh(static_cast<double>(logits[i]) / cap);
    EXPECT_NEAR(capped[i], ref, 1e-6 * std::max(1e-3, std::fabs(ref))) << logits[i];
    EXPECT_LE(std::fabs(capped[i]), cap);
  }
}

TEST(GatherSumRowsTest, SumsRowsLeftToRightAndSkipsNegativeIndices) {
  CpuBackend backend;
  const int64_t dim = 3;
  // Rows whose sum depends on the order of addition in f32: 1e8 + 1 - 1e8 is 0 left to right.
  auto x = F32(backend, {1e8f, 1.0f, 2.0f, 1.0f, 10.0f, 20.0f, -1e8f, 100.0f, 200.0f});
  auto idx = I32(backend, {0, 1, 2, -1, -1, -1, 2, -1, 1});
  auto out = *backend.Alloc(DType::kF32, 3 * dim);
  backend.GatherSumRows(*x, *idx, 3, 3, dim, *out);
  EXPECT_THAT(ReadF32(backend, *out, 3 * dim),
              ::testing::ElementsAre(0.0f, 111.0f, 222.0f,  //
                                     0.0f, 0.0f, 0.0f,      //
                                     -1e8f, 110.0f, 220.0f));
}

}  // namespace
}  // namespace gemma
