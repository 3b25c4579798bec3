// The model's step graphs, exercised without a GPU: a backend that records the ops enqueued
// between BeginCapture and EndCapture (running none of them) and runs the recording on Replay,
// over the CPU backend. Like a CUDA graph, a recording keeps the buffers and scalars of the
// capture, so replays are right only if the model rewrites every per-step input into the same
// buffers before each replay and never replays over buffers it has since replaced. Decode
// steps through recordings must give the same logits and tokens as eager steps.
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "glog/logging.h"
#include "gtest/gtest.h"
#include "tests/testing/compare.h"
#include "tests/testing/decode_together.h"
#include "tests/testing/thread_replica.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/engine/generate.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

namespace gemma {
namespace {

class RecordingBackend final : public Backend {
 public:
  RecordingBackend() : cpu_(CpuBackendOptions{2}) {}

  std::string Name() const override { return "recording-cpu"; }
  bool SupportsGraphs() const override { return true; }
  absl::Status BeginCapture() override {
    if (capturing_) return absl::FailedPreconditionError("capture under way");
    capturing_ = true;
    recording_ = {};
    capture_error_ = absl::OkStatus();
    return absl::OkStatus();
  }
  absl::Status EndCapture(int64_t key) override {
    capturing_ = false;
    if (!capture_error_.ok()) return capture_error_;
    graphs_[key] = std::move(recording_);
    ++captures;
    return absl::OkStatus();
  }
  absl::Status Replay(int64_t key) override {
    auto it = graphs_.find(key);
    if (it == graphs_.end()) return absl::NotFoundError("no recording");
    for (auto& op : it->second.ops) op();
    ++replays;
    return absl::OkStatus();
  }
  bool HasGraph(int64_t key) const override { return graphs_.count(key) > 0; }
  void DropGraphs() override {
    if (!graphs_.empty()) ++drops;
    graphs_.clear();
  }

  absl::StatusOr<BufferPtr> Alloc(DType dtype, int64_t numel) override {
    return cpu_.Alloc(dtype, numel);
  }
  absl::StatusOr<BufferPtr> UploadWeight(DType src_dtype, const void* src,
                                         int64_t numel) override {
    return cpu_.UploadWeight(src_dtype, src, numel);
  }
  void Write(Buffer& dst, const void* src, size_t bytes, size_t offset) override {
    if (Refuse("Write")) return;
    cpu_.Write(dst, src, bytes, offset);
  }
  absl::Status Read(const Buffer& src, void* dst, size_t bytes, size_t offset) override {
    if (Refuse("Read")) return capture_error_;
    return cpu_.Read(src, dst, bytes, offset);
  }
  absl::Status Synchronize() override {
    if (Refuse("Synchronize")) return capture_error_;
    return cpu_.Synchronize();
  }
  absl::StatusOr<BufferPtr> View(Buffer& base, int64_t offset, int64_t numel) override {
    return cpu_.View(base, offset, numel);
  }
  void* RawData(Buffer& b) override { return cpu_.RawData(b); }

  void Embed(const Buffer& ids, const Buffer& table, int64_t n, int64_t vocab,
             int64_t vocab_offset, int64_t hidden, float scale, Buffer& out) override {
    Buffer *i = Pin(&ids), *t = Pin(&table), *o = Pin(&out);
    Run([=, this] { cpu_.Embed(*i, *t, n, vocab, vocab_offset, hidden, scale, *o); });
  }
  void MatMul(const Buffer& x, const Buffer& w, int64_t m, int64_t n, int64_t k, Buffer& y,
              int64_t w_row_offset) override {
    Buffer *xp = Pin(&x), *wp = Pin(&w), *yp = Pin(&y);
    Run([=, this] { cpu_.MatMul(*xp, *wp, m, n, k, *yp, w_row_offset); });
  }
  void RmsNorm(const Buffer& x, const Buffer* w, int64_t rows, int64_t dim, float eps,
               Buffer& out) override {
    Buffer *xp = Pin(&x), *wp = Pin(w), *o = Pin(&out);
    Run([=, this] { cpu_.RmsNorm(*xp, wp, rows, dim, eps, *o); });
  }
  void AddRmsNorm(Buffer& residual, const Buffer& x, const Buffer& w, const Buffer* scalar,
                  int64_t rows, int64_t dim, float eps) override {
    Buffer *r = Pin(&residual), *xp = Pin(&x), *wp = Pin(&w), *s = Pin(scalar);
    Run([=, this] { cpu_.AddRmsNorm(*r, *xp, *wp, s, rows, dim, eps); });
  }
  void Add(const Buffer& a, const Buffer& b, int64_t n, Buffer& out) override {
    Buffer *ap = Pin(&a), *bp = Pin(&b), *o = Pin(&out);
    Run([=, this] { cpu_.Add(*ap, *bp, n, *o); });
  }
  void HeadNormRope(Buffer& x, const Buffer* w, const Buffer& positions, int64_t num_tokens,
                    int64_t num_heads, const RopeSpec& rope, float eps) override {
    Buffer *xp = Pin(&x), *wp = Pin(w), *p = Pin(&positions);
    Run([=, this] { cpu_.HeadNormRope(*xp, wp, *p, num_tokens, num_heads, rope, eps); });
  }
  void WriteKv(const Buffer* k, const Buffer& v, const Buffer& slots, int64_t num_tokens,
               int64_t row, Buffer* k_cache, Buffer& v_cache) override {
    Buffer *kp = Pin(k), *vp = Pin(&v), *s = Pin(&slots), *kc = Pin(k_cache), *vc = Pin(&v_cache);
    Run([=, this] { cpu_.WriteKv(kp, *vp, *s, num_tokens, row, kc, *vc); });
  }
  void Attention(const AttentionArgs& args) override {
    if (!capturing_) return cpu_.Attention(args);
    // A kernel reads the step's lengths from its buffers when it runs; the CPU backend reads
    // the host copies in the layout, so a replay refreshes them from the buffers.
    auto layout = std::make_shared<BatchLayout>(*args.layout);
    layout->positions = Pin(layout->positions);
    layout->query_start = Pin(layout->query_start);
    layout->seq_lens = Pin(layout->seq_lens);
    for (int pool = 0; pool < 2; ++pool) {
      layout->page_tables[pool] = Pin(layout->page_tables[pool]);
      layout->slots[pool] = Pin(layout->slots[pool]);
    }
    AttentionArgs a = args;
    a.q = Pin(a.q);
    a.k_cache = Pin(a.k_cache);
    a.v_cache = Pin(a.v_cache);
    a.k_norm_weight = Pin(a.k_norm_weight);
    a.out = Pin(a.out);
    Run([=, this] {
      BatchLayout& l = *layout;
      l.host_query_start.resize(l.num_seqs + 1);
      l.host_seq_lens.resize(l.num_seqs);
      CHECK(cpu_.Read(*l.query_start, l.host_query_start.data(), (l.num_seqs + 1) * 4).ok());
      CHECK(cpu_.Read(*l.seq_lens, l.host_seq_lens.data(), l.num_seqs * 4).ok());
      AttentionArgs run = a;
      run.layout = &l;
      cpu_.Attention(run);
    });
  }
  void GeluMul(const Buffer& gate_up, int64_t n, int64_t inter, Buffer& out) override {
    Buffer *g = Pin(&gate_up), *o = Pin(&out);
    Run([=, this] { cpu_.GeluMul(*g, n, inter, *o); });
  }
  void MoeRoute(const MoeRouteArgs& args) override {
    MoeRouteArgs a = args;
    a.x = Pin(a.x);
    a.router_scale = Pin(a.router_scale);
    a.router_proj = Pin(a.router_proj);
    a.per_expert_scale = Pin(a.per_expert_scale);
    a.topk_ids = Pin(a.topk_ids);
    a.topk_weights = Pin(a.topk_weights);
    a.expert_counts = Pin(a.expert_counts);
    Run([=, this] { cpu_.MoeRoute(a); });
  }
  void MoeExperts(const MoeExpertsArgs& args) override {
    MoeExpertsArgs a = args;
    a.x = Pin(a.x);
    a.topk_ids = Pin(a.topk_ids);
    a.topk_weights = Pin(a.topk_weights);
    a.gate_up = Pin(a.gate_up);
    a.down = Pin(a.down);
    a.out = Pin(a.out);
    Run([=, this] { cpu_.MoeExperts(a); });
  }
  void Softcap(Buffer& x, int64_t n, float cap) override {
    Buffer* xp = Pin(&x);
    Run([=, this] { cpu_.Softcap(*xp, n, cap); });
  }
  void GatherRows(const Buffer& x, const Buffer& rows, int64_t num_rows, int64_t dim,
                  Buffer& out) override {
    Buffer *xp = Pin(&x), *r = Pin(&rows), *o = Pin(&out);
    Run([=, this] { cpu_.GatherRows(*xp, *r, num_rows, dim, *o); });
  }
  void GatherSumRows(const Buffer& x, const Buffer& idx, int64_t rows, int64_t k, int64_t dim,
                     Buffer& out) override {
    Buffer *xp = Pin(&x), *i = Pin(&idx), *o = Pin(&out);
    Run([=, this] { cpu_.GatherSumRows(*xp, *i, rows, k, dim, *o); });
  }
  // Host arguments: not capturable, as on CUDA.
  void TopK(const Buffer& x, int64_t rows, int64_t cols, int64_t k, int64_t id_offset,
            Buffer& values, Buffer& ids) override {
    if (Refuse("TopK")) return;
    cpu_.TopK(x, rows, cols, k, id_offset, values, ids);
  }
  void LogSumExp(const Buffer& x, int64_t rows, int64_t cols,
                 const std::vector<float>& temperature, Buffer& max_out,
                 Buffer& sum_out) override {
    if (Refuse("LogSumExp")) return;
    cpu_.LogSumExp(x, rows, cols, temperature, max_out, sum_out);
  }
  void Sample(const Buffer& logits, int64_t rows, int64_t vocab,
              const std::vector<SamplingParams>& params, Buffer& ids) override {
    if (Refuse("Sample")) return;
    cpu_.Sample(logits, rows, vocab, params, ids);
  }

  // The queue is the backend itself: an op enqueued here is recorded while a capture is under
  // way and run at once otherwise, like a kernel on a CUDA stream.
  void* NativeStream() override { return this; }
  void Enqueue(std::function<void()> op) { Run(std::move(op)); }

  int captures = 0, replays = 0, drops = 0;
  size_t graphs() const { return graphs_.size(); }

 private:
  struct Recording {
    std::vector<std::function<void()>> ops;
    std::vector<BufferPtr> pins;  // views of every buffer an op uses, as the capture saw them
  };

  // While capturing: a view of `b`'s memory owned by the recording, so a replay uses the
  // memory the capture saw even after the model has dropped the Buffer object (as a CUDA graph
  // keeps raw device pointers). Otherwise `b` itself.
  Buffer* Pin(const Buffer* b) {
    Buffer* mutable_b = const_cast<Buffer*>(b);
    if (!capturing_ || b == nullptr) return mutable_b;
    auto view = cpu_.View(*mutable_b, 0, b->numel());
    CHECK(view.ok()) << view.status();
    recording_.pins.push_back(*std::move(view));
    return recording_.pins.back().get();
  }
  void Run(std::function<void()> op) {
    if (capturing_) {
      recording_.ops.push_back(std::move(op));
    } else {
      op();
    }
  }
  bool Refuse(const char* what) {
    if (!capturing_) return false;
    if (capture_error_.ok()) {
      capture_error_ = absl::FailedPreconditionError(std::string(what) + " while capturing");
    }
    return true;
  }

  CpuBackend cpu_;
  bool capturing_ = false;
  Recording recording_;
  absl::Status capture_error_;
  std::map<int64_t, Recording> graphs_;
};

struct Loaded {
  std::unique_ptr<RecordingBackend> backend;
  std::unique_ptr<gemma4::Model> model;
  std::unique_ptr<KvCache> cache;
};

Loaded Load(const std::string& name) {
  Loaded l;
  l.backend = std::make_unique<RecordingBackend>();
  auto model = gemma4::Model::Load(testing::GoldenPath(name), *l.backend);
  CHECK(model.ok()) << model.status();
  l.model = *std::move(model);
  KvCacheOptions options;
  options.page_size = 4;
  options.default_tokens = 512;
  auto cache = KvCache::Create(l.model->config(), *l.backend, l.model->CacheOptions(options));
  CHECK(cache.ok()) << cache.status();
  l.cache = *std::move(cache);
  return l;
}

class StepGraphTest : public ::testing::TestWithParam<std::string> {};

TEST_P(StepGraphTest, ReplayedDecodeStepsMatchEagerSteps) {
  Loaded l = Load(GetParam());
  gemma4::Model& model = *l.model;
  KvCache& cache = *l.cache;
  const std::vector<int32_t> prompt = {2, 45, 301, 7, 88, 120, 9, 33, 410, 5, 61};
  // Lengths 11, 3 and 40: page tables of different widths (page size 4), past the window.
  std::vector<std::vector<int32_t>> prompts = {prompt, {2, 7, 9}, {}};
  for (int i = 0; i < 40; ++i) prompts[2].push_back(static_cast<int32_t>(2 + (i * 31) % 400));
  GenerateOptions greedy;
  greedy.max_new_tokens = 14;

  model.set_use_graphs(false);
  auto eager_logits = PromptLogits(model, cache, prompt, /*prefill_chunk=*/1);
  ASSERT_TRUE(eager_logits.ok()) << eager_logits.status();
  auto eager_greedy = Generate(model, cache, prompt, greedy);
  auto eager_sampled = Generate(model, cache, prompt, testing::SampledOptions());
  ASSERT_TRUE(eager_greedy.ok() && eager_sampled.ok());
  auto eager_batch = testing::DecodeTogether(model, cache, prompts, 12);
  ASSERT_TRUE(eager_batch.ok()) << eager_batch.status();
  EXPECT_EQ(l.backend->captures, 0);

  model.set_use_graphs(true);
  auto graph_logits = PromptLogits(model, cache, prompt, /*prefill_chunk=*/1);
  ASSERT_TRUE(graph_logits.ok()) << graph_logits.status();
  auto graph_greedy = Generate(model, cache, prompt, greedy);
  auto graph_sampled = Generate(model, cache, prompt, testing::SampledOptions());
  ASSERT_TRUE(graph_greedy.ok()) << graph_greedy.status();
  ASSERT_TRUE(graph_sampled.ok()) << graph_sampled.status();
  auto graph_batch = testing::DecodeTogether(model, cache, prompts, 12);
  ASSERT_TRUE(graph_batch.ok()) << graph_batch.status();

  EXPECT_GT(l.backend->captures, 0);
  EXPECT_EQ(model.graph_captures(), l.backend->captures);
  EXPECT_GT(l.backend->replays, 3 * l.backend->captures);  // most steps replay a recording
  EXPECT_EQ(l.backend->drops, 0);

  // A 64-token step outgrows the scratch the recordings use: they are dropped, and decode
  // records anew over the new buffers.
  const int captures_before = l.backend->captures;
  std::vector<int32_t> long_prompt(64);
  for (int i = 0; i < 64; ++i) long_prompt[i] = static_cast<int32_t>(2 + (i * 17) % 450);
  GenerateOptions one;
  one.max_new_tokens = 1;  // one logit row: only the token scratch grows
  ASSERT_TRUE(Generate(model, cache, long_prompt, one).ok());
  EXPECT_GT(l.backend->drops, 0);
  auto regrown_greedy = Generate(model, cache, prompt, greedy);
  ASSERT_TRUE(regrown_greedy.ok()) << regrown_greedy.status();
  EXPECT_EQ(*regrown_greedy, *eager_greedy);
  EXPECT_GT(l.backend->captures, captures_before);

  // The recordings write and read the KV storage they saw: a step on a new cache (benchmarks
  // make one per run) drops them instead of replaying into the old one's memory.
  l.cache.reset();
  KvCacheOptions options;
  options.page_size = 4;
  options.default_tokens = 512;
  auto other = KvCache::Create(model.config(), *l.backend, model.CacheOptions(options));
  ASSERT_TRUE(other.ok()) << other.status();
  const int drops_before = l.backend->drops;
  auto other_greedy = Generate(model, **other, prompt, greedy);
  ASSERT_TRUE(other_greedy.ok()) << other_greedy.status();
  EXPECT_EQ(*other_greedy, *eager_greedy);
  EXPECT_GT(l.backend->drops, drops_before);

  auto cmp = testing::Compare(*graph_logits, *eager_logits);
  EXPECT_FALSE(cmp.nan_mismatch);
  EXPECT_LE(cmp.Relative(), 1e-6) << cmp.ToString();
  EXPECT_EQ(*graph_greedy, *eager_greedy);
  EXPECT_EQ(*graph_sampled, *eager_sampled);
  ASSERT_EQ(graph_batch->size(), eager_batch->size());
  auto batch_cmp = testing::Compare(*graph_batch, *eager_batch);
  EXPECT_FALSE(batch_cmp.nan_mismatch);
  EXPECT_LE(batch_cmp.Relative(), 1e-6) << batch_cmp.ToString();
}

// A tensor-parallel communicator whose sums go on the recording backend's queue, as NCCL's go
// on a CUDA stream: recorded into the step graph during a capture, run when it replays. A sum
// that fails surfaces at AwaitStream, as an asynchronous NCCL error does.
class StreamOrderedComm final : public parallel::ForwardingCommunicator {
 public:
  explicit StreamOrderedComm(std::unique_ptr<parallel::Communicator> inner)
      : ForwardingCommunicator(inner.get()), owned_(std::move(inner)) {}
  bool SupportsStreamOrdered() const override { return true; }
  absl::Status EnqueueAllReduce(void* data, size_t count, DType dtype, void* stream) override {
    ++enqueued;
    if (enqueued == fail_enqueue) {
      // Refused, as the staging wrapper refuses a buffer in the wrong memory: the
      // communicator stays healthy.
      return absl::InvalidArgumentError("enqueue refused (test)");
    }
    parallel::Communicator* inner = owned_.get();
    backend_ = static_cast<RecordingBackend*>(stream);
    backend_->Enqueue([=, this] {
      ++ran;
      // A failed sum fails the rest of its replay on every rank alike (no rank waits on one
      // that gave up), as an asynchronous NCCL error would.
      if (ran == fail_run) error_ = absl::UnavailableError("peer lost during a replay (test)");
      if (!error_.ok()) return;
      absl::Status status = inner->AllReduce(data, count, dtype);
      if (!status.ok()) error_ = status;
    });
    return absl::OkStatus();
  }
  absl::Status AwaitStream(void*) override {
    ++awaited;
    return error_;
  }
  absl::Status AllReduce(void* data, size_t count, DType dtype) override {
    ++blocking;
    return owned_->AllReduce(data, count, dtype);
  }
  bool healthy() const override { return error_.ok() && owned_->healthy(); }
  void Abort() override {
    ++aborts;
    graphs_at_abort = backend_ != nullptr ? static_cast<int>(backend_->graphs()) : -1;
  }
  int enqueued = 0, ran = 0, awaited = 0, blocking = 0, aborts = 0;
  int graphs_at_abort = -1;  // graphs the backend held when Abort was called
  // Which enqueue (1-based) is refused, and which sum fails as it runs; 0: none.
  int fail_enqueue = 0, fail_run = 0;

 private:
  std::unique_ptr<parallel::Communicator> owned_;
  RecordingBackend* backend_ = nullptr;  // the queue sums were last enqueued on
  absl::Status error_;
};

testing::ReplicaOptions RecordingTp2(const std::string& model, bool stream_ordered) {
  testing::ReplicaOptions o;
  o.model = model;
  o.world = 2;
  o.tp = 2;
  o.check_routing = false;  // it reads the routing on the host, which no graph can
  o.make_backend = [](int, testing::ReplicaRank&) -> absl::StatusOr<std::unique_ptr<Backend>> {
    return std::unique_ptr<Backend>(std::make_unique<RecordingBackend>());
  };
  if (stream_ordered) {
    o.wrap = [](int, std::unique_ptr<parallel::Communicator> comm, testing::ReplicaRank&)
        -> std::unique_ptr<parallel::Communicator> {
      return std::make_unique<StreamOrderedComm>(std::move(comm));
    };
  }
  return o;
}

// Runs fn on every rank of a RecordingTp2 replica with stream-ordered sums, with the rank's
// communicator and backend.
void OnEveryRank(testing::ThreadReplica& replica,
                 const std::function<void(int r, testing::ReplicaRank& rank,
                                          StreamOrderedComm* comm, RecordingBackend* backend)>& fn) {
  replica.RunAll([&](int r) {
    testing::ReplicaRank& rank = replica.rank(r);
    ASSERT_NE(rank.model, nullptr) << "rank " << r << " did not load";
    auto* comm = dynamic_cast<StreamOrderedComm*>(rank.tp_comm.get());
    ASSERT_NE(comm, nullptr) << "rank " << r;
    fn(r, rank, comm, static_cast<RecordingBackend*>(rank.backend.get()));
  });
}

// tp = 2 whose sums can be enqueued on the step's queue: decode steps are recorded with their
// sums and replayed, every replay is awaited through the communicator, and the tokens and
// logits are those of eager steps (which wait for each sum).
TEST_P(StepGraphTest, TensorParallelDecodeRecordsItsSums) {
  testing::ThreadReplica replica(RecordingTp2(GetParam(), /*stream_ordered=*/true));
  const std::vector<int32_t> prompt = {2, 45, 301, 7, 88, 120, 9, 33, 410, 5, 61};
  GenerateOptions greedy;
  greedy.max_new_tokens = 10;
  OnEveryRank(replica, [&](int r, testing::ReplicaRank& rank, StreamOrderedComm* comm,
                           RecordingBackend* backend) {
    gemma4::Model& model = *rank.model;

    model.set_use_graphs(false);
    auto eager_logits = PromptLogits(model, *rank.cache, prompt, /*prefill_chunk=*/1);
    auto eager = Generate(model, *rank.cache, prompt, greedy);
    auto eager_sampled = Generate(model, *rank.cache, prompt, testing::SampledOptions());
    ASSERT_TRUE(eager_logits.ok() && eager.ok() && eager_sampled.ok()) << "rank " << r;
    EXPECT_EQ(comm->enqueued, 0);
    EXPECT_EQ(backend->captures, 0);
    const int blocking_eager = comm->blocking;

    model.set_use_graphs(true);
    auto graph_logits = PromptLogits(model, *rank.cache, prompt, /*prefill_chunk=*/1);
    auto graph = Generate(model, *rank.cache, prompt, greedy);
    auto graph_sampled = Generate(model, *rank.cache, prompt, testing::SampledOptions());
    ASSERT_TRUE(graph_logits.ok()) << "rank " << r << ": " << graph_logits.status();
    ASSERT_TRUE(graph.ok()) << "rank " << r << ": " << graph.status();
    ASSERT_TRUE(graph_sampled.ok()) << "rank " << r << ": " << graph_sampled.status();
    EXPECT_EQ(*graph, *eager) << "rank " << r;
    EXPECT_EQ(*graph_sampled, *eager_sampled) << "rank " << r;
    auto cmp = testing::Compare(*graph_logits, *eager_logits);
    EXPECT_FALSE(cmp.nan_mismatch);
    EXPECT_LE(cmp.Relative(), 1e-6) << "rank " << r << ": " << cmp.ToString();

    EXPECT_GT(backend->captures, 0) << "rank " << r;
    EXPECT_GT(backend->replays, 3 * backend->captures) << "rank " << r;
    // Sums were recorded (once per capture, not per replay) and ran on every replay; each
    // replay was awaited. The steps' sums no longer go through the blocking call, which only
    // the steps outside graphs (prefill) and sampling still use.
    EXPECT_GT(comm->enqueued, 0);
    EXPECT_EQ(comm->ran, comm->enqueued / backend->captures * backend->replays)
        << "rank " << r << ": every replay runs the recorded sums";
    EXPECT_EQ(comm->awaited, backend->replays);
    EXPECT_LT(comm->blocking - blocking_eager, blocking_eager / 2) << "rank " << r;
  });
}

// A sum that fails while a replay runs surfaces at the await: the step fails naming it, the
// step graphs (which hold the dead communicator's collectives) are dropped and only then is
// the communicator aborted, and no later step records or replays one over it.
TEST_P(StepGraphTest, AFailedSumInAReplayDropsTheGraphsBeforeTheAbort) {
  testing::ThreadReplica replica(RecordingTp2(GetParam(), /*stream_ordered=*/true));
  const std::vector<int32_t> prompt = {2, 45, 301, 7, 88};
  GenerateOptions greedy;
  greedy.max_new_tokens = 12;
  OnEveryRank(replica, [&](int, testing::ReplicaRank& rank, StreamOrderedComm* comm,
                           RecordingBackend* backend) {
    auto first = Generate(*rank.model, *rank.cache, prompt, greedy);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_GT(backend->graphs(), 0u);
    comm->fail_run = comm->ran + 3;  // the third sum of the next replay
    auto failed = Generate(*rank.model, *rank.cache, prompt, greedy);
    ASSERT_FALSE(failed.ok());
    EXPECT_NE(failed.status().message().find("peer lost during a replay"), std::string::npos)
        << failed.status();
    EXPECT_EQ(backend->graphs(), 0u) << "graphs holding the dead communicator's sums were kept";
    EXPECT_EQ(comm->aborts, 1);
    EXPECT_EQ(comm->graphs_at_abort, 0) << "aborted while graphs still held its collectives";
    const int captures = backend->captures, replays = backend->replays;
    (void)Generate(*rank.model, *rank.cache, prompt, greedy);  // fails or not: no graph over it
    EXPECT_EQ(backend->captures, captures);
    EXPECT_EQ(backend->replays, replays);
  });
}

// A sum refused while a step is being recorded fails the step, and nothing of the part-way
// recording is kept for a later step of that shape to replay, though the communicator lives on
// (no abort) and so nothing else would drop it.
TEST_P(StepGraphTest, ARecordingThatFailsPartWayIsNotKept) {
  testing::ThreadReplica replica(RecordingTp2(GetParam(), /*stream_ordered=*/true));
  OnEveryRank(replica, [&](int, testing::ReplicaRank& rank, StreamOrderedComm* comm,
                           RecordingBackend* backend) {
    comm->fail_enqueue = 2;  // the second sum of the first recorded step
    GenerateOptions greedy;
    greedy.max_new_tokens = 4;
    const std::vector<int32_t> prompt = {2, 45, 301, 7};
    auto failed = Generate(*rank.model, *rank.cache, prompt, greedy);
    ASSERT_FALSE(failed.ok());
    EXPECT_NE(failed.status().message().find("enqueue refused"), std::string::npos)
        << failed.status();
    EXPECT_EQ(backend->graphs(), 0u) << "a part-way recording was kept";
    EXPECT_EQ(backend->replays, 0);
    EXPECT_EQ(comm->aborts, 0);
    EXPECT_TRUE(comm->healthy());
  });
}

// Without stream-ordered sums (Gloo, or a group staged through the host) a tp step cannot be
// recorded: decode runs eagerly.
TEST_P(StepGraphTest, TensorParallelDecodeWithoutStreamOrderedSumsRunsEagerly) {
  testing::ThreadReplica replica(RecordingTp2(GetParam(), /*stream_ordered=*/false));
  GenerateOptions greedy;
  greedy.max_new_tokens = 4;
  replica.RunAll([&](int r) {
    testing::ReplicaRank& rank = replica.rank(r);
    ASSERT_NE(rank.model, nullptr) << "rank " << r << " did not load";
    const std::vector<int32_t> prompt = {2, 45, 301, 7};
    auto tokens = Generate(*rank.model, *rank.cache, prompt, greedy);
    ASSERT_TRUE(tokens.ok()) << tokens.status();
    EXPECT_EQ(static_cast<RecordingBackend*>(rank.backend.get())->captures, 0);
    EXPECT_EQ(rank.model->graph_captures(), 0);
  });
}

TEST(StepGraphCpuTest, CpuBackendRunsEagerly) {
  CpuBackend cpu(CpuBackendOptions{1});
  EXPECT_FALSE(cpu.SupportsGraphs());
  EXPECT_EQ(cpu.BeginCapture().code(), absl::StatusCode::kUnimplemented);
}

INSTANTIATE_TEST_SUITE_P(Models, StepGraphTest, ::testing::Values("tiny-dense", "tiny-moe"));

}  // namespace
}  // namespace gemma
