// cuda_decode_bench: decode steps of the Gemma 4 26B-A4B or 31B network at its real widths on
// the CUDA backend, against the memory-bandwidth floor of a step.
//   cuda_decode_bench [--model 26b-a4b|31b --layers 6 --batch 1,8,32 --steps 64
//                      --prompt-len 128 --kv-dtype bf16|f32 --tensor-core-attention
//                      --device-scheduled-experts --dir DIR --keep --threads N --seed S --json]
//
// 1. Measures the device-to-device copy bandwidth (bytes read plus written per second of a 1 GiB
//    cudaMemcpyAsync, the fastest of 20; the same measurement as cuda_kernels_bench).
// 2. Writes a random bf16 checkpoint (config.json + model.safetensors, seeded) with the
//    --model config. 26B-A4B: hidden 2816, 16 query heads, sliding layers 8 KV heads x 256,
//    full layers 2 KV heads x 512 with K = V, dense MLP 2112, 128 experts of 704 (top 8).
//    31B: hidden 5376, 32 query heads, sliding 16 KV heads x 256, full 4 x 512 with K = V,
//    dense MLP 21504, no experts. Both: vocabulary 262144 with the tied embedding as the output
//    head, sliding window 1024; but only --layers layers, in the real pattern (5 sliding then 1
//    full, repeated; the last layer is full, as HF forces). The default of 6 layers is one
//    period of the pattern, a fifth of the 26B-A4B's 30 layers and a tenth of the 31B's 60.
//    The directory is /dev/shm when it has room, else $TMPDIR or /tmp (--dir to choose); it is
//    deleted once the model is loaded (--keep keeps it, e.g. for gemma-engine-bench).
// 3. Loads it on the CUDA backend (Model::Load, as the tools do). Then for each batch size B of
//    --batch: prefills B seeded random prompts of --prompt-len tokens in one step (a fresh KV
//    cache per batch size, in --kv-dtype), runs 4 untimed decode steps (from whose routing the distinct
//    experts per layer are counted), then times --steps decode steps as the engine runs them:
//    one Model::Forward of one token per sequence with the last position's logits, then the
//    greedy sample back on the host. Then --steps more steps without logits (Forward with
//    LogitsMode::kNone, no head, no sampling), which splits the time of the layers from that
//    of the head.
// 4. Prints ms per step (wall clock; every step ends synchronised) against the floor: the bytes
//    a step must move over the measured bandwidth. Counted: every attention, dense-MLP, router
//    and norm weight of every layer; the weights of each distinct expert the step's tokens
//    select; the embedding rows; the output head; the KV cache each sequence reads (sliding
//    layers at most the window) and writes, at the mean context of the timed steps, in the
//    cache's element type (the backend's default, bf16); the f32 logits (written, soft-capped
//    in place, read by the sampler). Activations are left out (kilobytes per token).
// Without a CUDA device (or in a build without it) it says so and exits 1.
#include <cuda_runtime.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "common/model_config.h"
#include "common/status_macros.h"
#include "common/tool_main.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

ABSL_FLAG(std::string, model, "26b-a4b", "the widths: 26b-a4b (MoE) or 31b (dense)");
ABSL_FLAG(int32_t, layers, 6,
          "decoder layers (the real 26B-A4B has 30, the 31B 60; 6 = one period of 5 sliding + "
          "1 full)");
ABSL_FLAG(std::string, batch, "1",
          "comma-separated batch sizes: sequences decoded together, one token each per step");
ABSL_FLAG(int64_t, steps, 64, "timed decode steps (of each kind: with and without the head)");
ABSL_FLAG(int64_t, prompt_len, 128, "prompt length per sequence in tokens, BOS included");
ABSL_FLAG(std::string, dir, "",
          "parent directory for the temporary checkpoint (default: /dev/shm when it has room, "
          "else $TMPDIR or /tmp)");
ABSL_FLAG(bool, keep, false, "keep the checkpoint directory (its path is printed)");
ABSL_FLAG(int32_t, threads, 0, "threads writing the checkpoint (0: all cores)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the weights and the prompts");
ABSL_FLAG(bool, json, false, "also print one JSON line with every number");
ABSL_FLAG(std::string, kv_dtype, "bf16",
          "KV-cache element type: bf16 (the CUDA backend's default) or f32 (to compare)");
ABSL_FLAG(bool, tensor_core_attention, false,
          "prefill attention on the tensor-core kernel (CudaBackendOptions, off by default)");
ABSL_FLAG(bool, device_scheduled_experts, false,
          "prefill expert products scheduled on the device (CudaBackendOptions, off by default)");

namespace gemma {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int32_t kBos = 2;
constexpr int32_t kFirstRandomId = 5;
constexpr int64_t kPageSize = 16;
constexpr int64_t kWarmupSteps = 4;
constexpr int64_t kCopyBytes = int64_t{1} << 30;
constexpr int kCopyReps = 20;
// The layer pattern of both models: 5 sliding layers, then 1 full.
constexpr int kPatternPeriod = 6;

// The widths that differ between the two models (gemma4-architecture.md, section 1).
struct ModelShape {
  const char* name;
  int real_layers;
  int hidden, inter, heads, kv_heads, global_kv_heads;
  bool moe;
  int experts, top_k, moe_inter;
};
constexpr ModelShape k26b{"26B-A4B", 30, 2816, 2112, 16, 8, 2, true, 128, 8, 704};
constexpr ModelShape k31b{"31B", 60, 5376, 21504, 32, 16, 4, false, 0, 0, 0};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---- the config ----

// config.json: the model's text_config (gemma4-architecture.md, section 1) with $LAYERS layers.
constexpr char kConfigTemplate[] = R"({
  "architectures": ["Gemma4ForConditionalGeneration"],
  "model_type": "gemma4",
  "dtype": "bfloat16",
  "eos_token_id": [1, 106],
  "tie_word_embeddings": true,
  "vision_config": null,
  "audio_config": null,
  "text_config": {
    "model_type": "gemma4_text",
    "vocab_size": 262144,
    "hidden_size": $HIDDEN,
    "intermediate_size": $INTER,
    "num_hidden_layers": $LAYERS,
    "layer_types": [$TYPES],
    "num_attention_heads": $HEADS,
    "num_key_value_heads": $KV,
    "num_global_key_value_heads": $GKV,
    "head_dim": 256,
    "global_head_dim": 512,
    "attention_k_eq_v": true,
    "enable_moe_block": $MOE,
    "num_experts": $EXPERTS,
    "top_k_experts": $TOPK,
    "moe_intermediate_size": $MOE_INTER,
    "sliding_window": 1024,
    "rope_parameters": {
      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
      "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                         "rope_theta": 1000000.0}
    },
    "rms_norm_eps": 1e-06,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": true,
    "max_position_embeddings": 262144,
    "hidden_size_per_layer_input": 0,
    "num_kv_shared_layers": 0,
    "use_double_wide_mlp": false,
    "attention_bias": false,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": [1, 106]
  }
}
)";

std::string ConfigJson(const ModelShape& m, int layers) {
  std::vector<std::string> types;
  for (int i = 0; i < layers; ++i) {
    const bool full = (i + 1) % kPatternPeriod == 0 || i == layers - 1;
    types.push_back(full ? "\"full_attention\"" : "\"sliding_attention\"");
  }
  return absl::StrReplaceAll(
      kConfigTemplate,
      {{"$LAYERS", absl::StrCat(layers)}, {"$TYPES", absl::StrJoin(types, ", ")},
       {"$HIDDEN", absl::StrCat(m.hidden)}, {"$INTER", absl::StrCat(m.inter)},
       {"$HEADS", absl::StrCat(m.heads)}, {"$KV", absl::StrCat(m.kv_heads)},
       {"$GKV", absl::StrCat(m.global_kv_heads)}, {"$MOE", m.moe ? "true" : "false"},
       {"$EXPERTS", m.moe ? absl::StrCat(m.experts) : "null"},
       {"$TOPK", m.moe ? absl::StrCat(m.top_k) : "null"},
       {"$MOE_INTER", m.moe ? absl::StrCat(m.moe_inter) : "null"}});
}

// ---- the random checkpoint ----

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  float lo = 0, hi = 0;  // values uniform in [lo, hi)
  int64_t numel = 0;
  uint64_t offset = 0;  // in the data section
};

// Every tensor Model::Load reads, with the real names and shapes. Matrices get values of
// standard deviation 1/sqrt(fan-in) (uniform), so activations stay near unit scale; norm
// weights, scales and layer scalars get values around one, as scripts/bench_cpu.py does.
std::vector<TensorSpec> CheckpointTensors(const ModelConfig& c) {
  std::vector<TensorSpec> specs;
  const std::string& pre = c.tensor_prefix;
  auto matrix = [&](std::string name, std::vector<int64_t> shape) {
    const float a = std::sqrt(3.0f / static_cast<float>(shape.back()));
    specs.push_back({pre + name, std::move(shape), -a, a});
  };
  auto ones = [&](std::string name, std::vector<int64_t> shape) {
    specs.push_back({pre + name, std::move(shape), 0.5f, 1.5f});
  };
  const int64_t h = c.hidden_size;
  matrix("embed_tokens.weight", {c.vocab_size, h});
  ones("norm.weight", {h});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("layers.", l, ".");
    const int64_t d = c.LayerHeadDim(l), heads = c.num_attention_heads, kv = c.LayerKvHeads(l);
    ones(p + "input_layernorm.weight", {h});
    matrix(p + "self_attn.q_proj.weight", {heads * d, h});
    matrix(p + "self_attn.k_proj.weight", {kv * d, h});
    if (!c.LayerKEqV(l)) matrix(p + "self_attn.v_proj.weight", {kv * d, h});
    matrix(p + "self_attn.o_proj.weight", {h, heads * d});
    ones(p + "self_attn.q_norm.weight", {d});
    ones(p + "self_attn.k_norm.weight", {d});
    ones(p + "post_attention_layernorm.weight", {h});
    ones(p + "pre_feedforward_layernorm.weight", {h});
    matrix(p + "mlp.gate_proj.weight", {c.intermediate_size, h});
    matrix(p + "mlp.up_proj.weight", {c.intermediate_size, h});
    matrix(p + "mlp.down_proj.weight", {h, c.intermediate_size});
    ones(p + "post_feedforward_layernorm.weight", {h});
    ones(p + "layer_scalar", {1});
    if (!c.enable_moe_block) continue;
    matrix(p + "router.proj.weight", {c.num_experts, h});
    ones(p + "router.scale", {h});
    ones(p + "router.per_expert_scale", {c.num_experts});
    matrix(p + "experts.gate_up_proj", {c.num_experts, 2 * c.moe_intermediate_size, h});
    matrix(p + "experts.down_proj", {c.num_experts, h, c.moe_intermediate_size});
    ones(p + "pre_feedforward_layernorm_2.weight", {h});
    ones(p + "post_feedforward_layernorm_1.weight", {h});
    ones(p + "post_feedforward_layernorm_2.weight", {h});
  }
  uint64_t offset = 0;
  for (TensorSpec& t : specs) {
    t.numel = 1;
    for (int64_t dim : t.shape) t.numel *= dim;
    t.offset = offset;
    offset += static_cast<uint64_t>(t.numel) * 2;
  }
  return specs;
}

// The safetensors header (JSON), padded with spaces to a multiple of 8 bytes.
std::string SafetensorsHeader(const std::vector<TensorSpec>& specs) {
  std::string json = R"({"__metadata__":{"format":"pt"})";
  for (const TensorSpec& t : specs) {
    absl::StrAppend(&json, ",\"", t.name, "\":{\"dtype\":\"BF16\",\"shape\":[",
                    absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", t.offset, ",",
                    t.offset + static_cast<uint64_t>(t.numel) * 2, "]}");
  }
  json += "}";
  while ((json.size() + 8) % 8 != 0) json += ' ';
  return json;
}

// splitmix64.
uint64_t Mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

absl::Status PwriteAll(int fd, const void* data, size_t bytes, uint64_t offset,
                       const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::pwrite(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("writing ", path, ": ", std::strerror(errno)));
    }
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

// Writes config.json and model.safetensors into `dir`: chunks of 4M values generated and
// written by `threads` threads (values depend on the seed only, not on the thread count).
absl::Status WriteCheckpoint(const std::string& dir, const std::string& config_json,
                             const std::vector<TensorSpec>& specs, uint64_t seed, int threads) {
  {
    std::ofstream out(fs::path(dir) / "config.json");
    out << config_json;
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", dir, "/config.json"));
  }
  const std::string path = (fs::path(dir) / "model.safetensors").string();
  const int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
  if (fd < 0)
    return absl::InternalError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  const std::string header = SafetensorsHeader(specs);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(header.size() >> (8 * i));
  absl::Status status = PwriteAll(fd, len, 8, 0, path);
  if (status.ok()) status = PwriteAll(fd, header.data(), header.size(), 8, path);
  const uint64_t data_start = 8 + header.size();

  constexpr int64_t kChunk = int64_t{1} << 22;
  struct Item {
    size_t tensor;
    int64_t begin;
  };
  std::vector<Item> items;
  for (size_t t = 0; t < specs.size(); ++t) {
    for (int64_t b = 0; b < specs[t].numel; b += kChunk) items.push_back({t, b});
  }
  std::atomic<size_t> next{0};
  std::mutex mu;
  auto work = [&] {
    std::vector<uint16_t> buf(kChunk);
    while (true) {
      const size_t i = next.fetch_add(1);
      if (i >= items.size()) return;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!status.ok()) return;
      }
      const TensorSpec& t = specs[items[i].tensor];
      const int64_t n = std::min(kChunk, t.numel - items[i].begin);
      uint64_t state = Mix(seed ^ Mix(items[i].tensor * 0x1000003ull + items[i].begin));
      const float scale = (t.hi - t.lo) / 16777216.0f;
      for (int64_t j = 0; j < n; j += 2) {
        state += 0x9E3779B97F4A7C15ull;
        const uint64_t r = Mix(state);
        buf[j] = F32ToBf16(t.lo + scale * static_cast<float>(r & 0xFFFFFF));
        if (j + 1 < n)
          buf[j + 1] = F32ToBf16(t.lo + scale * static_cast<float>((r >> 32) & 0xFFFFFF));
      }
      absl::Status s =
          PwriteAll(fd, buf.data(), static_cast<size_t>(n) * 2,
                    data_start + t.offset + static_cast<uint64_t>(items[i].begin) * 2, path);
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (status.ok()) status = s;
        return;
      }
    }
  };
  if (status.ok()) {
    std::vector<std::thread> pool;
    for (int i = 0; i < threads; ++i) pool.emplace_back(work);
    for (std::thread& th : pool) th.join();
  }
  if (::close(fd) != 0 && status.ok()) {
    status = absl::InternalError(absl::StrCat("closing ", path, ": ", std::strerror(errno)));
  }
  return status;
}

// A directory removed on destruction unless kept.
class TempDir {
 public:
  static absl::StatusOr<std::unique_ptr<TempDir>> Create(const std::string& parent, bool keep) {
    std::string templ = (fs::path(parent) / "gemma-decode-bench-XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) {
      return absl::InternalError(
          absl::StrCat("cannot create a directory under ", parent, ": ", std::strerror(errno)));
    }
    return std::unique_ptr<TempDir>(new TempDir(templ, keep));
  }
  ~TempDir() { Remove(); }
  void Remove() {
    if (keep_ || removed_) return;
    std::error_code ec;
    fs::remove_all(path_, ec);
    removed_ = true;
  }
  const std::string& path() const { return path_; }

 private:
  TempDir(std::string path, bool keep) : path_(std::move(path)), keep_(keep) {}
  std::string path_;
  bool keep_;
  bool removed_ = false;
};

// --dir, or /dev/shm when it has room for `bytes` (plus 2 GiB), or the temp directory.
absl::StatusOr<std::string> PickParent(uint64_t bytes) {
  const uint64_t margin = uint64_t{2} << 30;
  auto room = [&](const fs::path& p) -> uint64_t {
    std::error_code ec;
    const fs::space_info space = fs::space(p, ec);
    return ec ? 0 : space.available;
  };
  std::string flag = absl::GetFlag(FLAGS_dir);
  if (!flag.empty()) {
    if (room(flag) < bytes) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("--dir %s has %.2f GB free; the checkpoint needs %.2f GB", flag,
                          room(flag) / 1e9, bytes / 1e9));
    }
    return flag;
  }
  if (room("/dev/shm") >= bytes + margin) return std::string("/dev/shm");
  std::error_code ec;
  const fs::path tmp = fs::temp_directory_path(ec);
  if (!ec && room(tmp) >= bytes + margin) return tmp.string();
  return absl::ResourceExhaustedError(absl::StrFormat(
      "no room for the %.2f GB checkpoint: /dev/shm has %.2f GB free, %s %.2f GB; pass "
      "--dir or fewer --layers",
      bytes / 1e9, room("/dev/shm") / 1e9, ec ? std::string("the temp dir") : tmp.string(),
      ec ? 0.0 : room(tmp) / 1e9));
}

// ---- measurement ----

// Fastest of `reps` device-to-device copies of `bytes` (after two warm-ups), in seconds.
absl::StatusOr<double> FastestCopySeconds(CudaBackend& b, int64_t bytes, int reps) {
  ASSIGN_OR_RETURN(BufferPtr src, b.Alloc(DType::kI32, bytes / 4));
  ASSIGN_OR_RETURN(BufferPtr dst, b.Alloc(DType::kI32, bytes / 4));
  void* s = static_cast<CudaBuffer&>(*src).data();
  void* d = static_cast<CudaBuffer&>(*dst).data();
  cudaEvent_t start = nullptr, stop = nullptr;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaError_t err = cudaMemsetAsync(s, 1, bytes, b.stream());
  double best = -1;
  for (int i = 0; i < reps + 2 && err == cudaSuccess; ++i) {
    cudaEventRecord(start, b.stream());
    err = cudaMemcpyAsync(d, s, bytes, cudaMemcpyDeviceToDevice, b.stream());
    cudaEventRecord(stop, b.stream());
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
    float ms = 0;
    if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, start, stop);
    if (err == cudaSuccess && i >= 2 && ms > 0 && (best < 0 || ms / 1e3 < best)) best = ms / 1e3;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (err != cudaSuccess || best <= 0) {
    return absl::InternalError(
        absl::StrCat("device-to-device copy failed: ", cudaGetErrorString(err)));
  }
  return best;
}

// Nearest-rank percentile (sorts a copy).
double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t rank = static_cast<size_t>(p / 100.0 * static_cast<double>(v.size()) + 0.5);
  rank = std::clamp<size_t>(rank, 1, v.size());
  return v[rank - 1];
}

double Mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0 : sum / static_cast<double>(v.size());
}

// Bytes one decode step must move, by part.
struct StepBytes {
  double attention = 0, mlp = 0, router = 0, experts = 0, norms = 0, kv = 0, embed = 0;
  double head = 0, logits = 0;
  double flops = 0;
  double Layers() const { return attention + mlp + router + experts + norms + kv + embed; }
  double Head() const { return head + logits; }
  double Total() const { return Layers() + Head(); }
};

// `experts_per_layer`: distinct experts the step's tokens select in each layer; `context`: the
// positions each sequence holds after the step (mean over the timed steps); `kv_bytes`: bytes
// of one element of the KV cache (its dtype's size).
StepBytes CountStepBytes(const ModelConfig& c, int64_t batch,
                         const std::vector<double>& experts_per_layer, double context,
                         double kv_bytes, bool with_head) {
  StepBytes s;
  const double h = static_cast<double>(c.hidden_size), bf16 = 2, f32 = 4;
  const double b = static_cast<double>(batch);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const double d = static_cast<double>(c.LayerHeadDim(l));
    const double heads = static_cast<double>(c.num_attention_heads);
    const double kv = static_cast<double>(c.LayerKvHeads(l));
    const double kv_mats = c.LayerKEqV(l) ? 1 : 2;  // k_eq_v: one projection, V only cached
    const double attn_params = h * (2 * heads * d + kv_mats * kv * d);
    s.attention += bf16 * attn_params;
    const double mlp_params = 3.0 * static_cast<double>(c.intermediate_size) * h;
    s.mlp += bf16 * mlp_params;
    const double experts = c.enable_moe_block ? static_cast<double>(c.num_experts) : 0.0;
    s.router += bf16 * experts * h;
    const double expert_params = 3.0 * static_cast<double>(c.moe_intermediate_size) * h;
    s.experts += bf16 * experts_per_layer[l] * expert_params;
    s.norms += bf16 * ((c.enable_moe_block ? 8 : 4) * h + 2 * d + experts + 1);
    const double seen =
        c.IsFull(l) ? context : std::min(context, static_cast<double>(c.sliding_window));
    // Read what is seen, write the new row.
    s.kv += b * kv_bytes * kv * d * kv_mats * (seen + 1);
    s.flops += 2 * b *
               (attn_params + mlp_params + experts * h +
                (c.enable_moe_block ? static_cast<double>(c.top_k_experts) * expert_params : 0));
    s.flops += b * 4 * heads * d * seen;
  }
  s.embed = b * bf16 * h;
  if (with_head) {
    const double v = static_cast<double>(c.vocab_size);
    s.head = bf16 * v * h + bf16 * h;  // the tied embedding as head, the final norm
    s.logits = b * f32 * v * 4;        // written, soft-capped (read + write), sampled
    s.flops += 2 * b * v * h;
  }
  return s;
}

struct Sequence {
  std::vector<int32_t> prompt;
  SequenceKv kv;
  int32_t next = 0;
};

// What every batch size shares: the loaded model and the measurements so far.
struct Bench {
  const ModelShape& shape;
  const ModelConfig& config;
  CudaBackend& backend;
  gemma4::Model& model;
  double bandwidth = 0;  // bytes per second
  std::string device;
  int32_t layers = 0;
  int64_t steps = 0;
  int64_t prompt_len = 0;
  uint64_t weight_bytes = 0;
  double write_s = 0, load_s = 0;
};

// Prefill, warm-up, timed steps and the report for `batch` sequences decoded together.
absl::Status RunBatch(const Bench& bench, int64_t batch) {
  const ModelConfig& config = bench.config;
  CudaBackend* backend = &bench.backend;
  gemma4::Model* model = &bench.model;
  const double bandwidth = bench.bandwidth;
  const int32_t layers = bench.layers;
  const int64_t steps = bench.steps, prompt_len = bench.prompt_len;

  // ---- cache and sequences ----
  const int64_t total = prompt_len + kWarmupSteps + 2 * steps;
  KvCacheOptions cache_options;
  cache_options.page_size = kPageSize;
  cache_options.num_pages[kFullPool] = batch * ((total + kPageSize - 1) / kPageSize + 1) + 1;
  cache_options.num_pages[kSlidingPool] =
      batch * ((std::min<int64_t>(total, config.sliding_window + prompt_len) + kPageSize - 1) /
                   kPageSize +
               2) +
      1;
  ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
                   KvCache::Create(config, *backend, model->CacheOptions(cache_options)));
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed) + static_cast<uint64_t>(batch));
  std::uniform_int_distribution<int32_t> pick(kFirstRandomId,
                                              static_cast<int32_t>(config.vocab_size - 1));
  std::vector<Sequence> seqs(batch);
  for (Sequence& s : seqs) {
    s.prompt.push_back(kBos);
    while (static_cast<int64_t>(s.prompt.size()) < prompt_len) s.prompt.push_back(pick(rng));
  }
  const std::vector<SamplingParams> greedy(batch);  // temperature 0

  // One step over every sequence: the prompts (prefill) or one token each.
  auto step = [&](bool prefill, gemma4::LogitsMode mode) -> absl::Status {
    std::vector<gemma4::SequenceStep> batch_steps;
    batch_steps.reserve(seqs.size());
    for (Sequence& s : seqs) {
      std::span<const int32_t> tokens =
          prefill ? std::span<const int32_t>(s.prompt) : std::span<const int32_t>(&s.next, 1);
      RETURN_IF_ERROR(cache->Grow(s.kv, s.kv.length + static_cast<int64_t>(tokens.size())));
      batch_steps.push_back(gemma4::SequenceStep{tokens, &s.kv, mode});
    }
    RETURN_IF_ERROR(model->Forward(batch_steps, *cache).status());
    for (Sequence& s : seqs) cache->TrimSliding(s.kv);
    if (mode == gemma4::LogitsMode::kLast) {
      ASSIGN_OR_RETURN(std::vector<int32_t> next, model->Sample(greedy));
      for (size_t i = 0; i < seqs.size(); ++i) seqs[i].next = next[i];
    }
    return absl::OkStatus();
  };

  const Clock::time_point t0 = Clock::now();
  RETURN_IF_ERROR(step(true, gemma4::LogitsMode::kLast));
  const double prefill_s = Seconds(Clock::now() - t0);

  // Warm-up steps, observing the routing: distinct experts per layer per step.
  std::vector<double> experts_per_layer(layers, 0.0);
  absl::Status observe_status;
  model->set_observer(
      [&](std::string_view name, const Buffer& buffer, const std::vector<int64_t>& shape) {
        constexpr std::string_view kSuffix = ".router_ids";
        if (name.size() <= kSuffix.size() || name.substr(name.size() - kSuffix.size()) != kSuffix) {
          return;
        }
        const int layer = std::atoi(std::string(name.substr(7)).c_str());  // "layers.N.router_ids"
        std::vector<int32_t> ids(shape[0] * shape[1]);
        absl::Status s = backend->Read(buffer, ids.data(), ids.size() * sizeof(int32_t));
        if (!s.ok()) {
          observe_status.Update(s);
          return;
        }
        const std::set<int32_t> distinct(ids.begin(), ids.end());
        if (layer >= 0 && layer < layers) {
          experts_per_layer[layer] += static_cast<double>(distinct.size()) / kWarmupSteps;
        }
      });
  for (int64_t i = 0; i < kWarmupSteps; ++i)
    RETURN_IF_ERROR(step(false, gemma4::LogitsMode::kLast));
  model->set_observer(nullptr);
  RETURN_IF_ERROR(observe_status);
  const double context_full =
      static_cast<double>(prompt_len + kWarmupSteps) + static_cast<double>(steps + 1) / 2.0;

  std::vector<double> full_ms, layers_ms;
  for (int64_t i = 0; i < steps; ++i) {
    const Clock::time_point s0 = Clock::now();
    RETURN_IF_ERROR(step(false, gemma4::LogitsMode::kLast));
    full_ms.push_back(Seconds(Clock::now() - s0) * 1e3);
  }
  for (int64_t i = 0; i < steps; ++i) {
    const Clock::time_point s0 = Clock::now();
    RETURN_IF_ERROR(step(false, gemma4::LogitsMode::kNone));
    layers_ms.push_back(Seconds(Clock::now() - s0) * 1e3);
  }
  RETURN_IF_ERROR(backend->Synchronize());
  for (Sequence& s : seqs) cache->Release(s.kv);
  const double context_layers = context_full + static_cast<double>(steps);

  // ---- report ----
  const double kv_bytes = static_cast<double>(DTypeSize(cache->dtype()));
  const StepBytes full =
      CountStepBytes(config, batch, experts_per_layer, context_full, kv_bytes, true);
  const StepBytes lay =
      CountStepBytes(config, batch, experts_per_layer, context_layers, kv_bytes, false);
  const double full_floor = full.Total() / bandwidth * 1e3;
  const double layers_floor = lay.Total() / bandwidth * 1e3;
  const double head_floor = full.Head() / bandwidth * 1e3;
  const double full50 = Percentile(full_ms, 50), layers50 = Percentile(layers_ms, 50);
  const double head50 = full50 - layers50;
  double mean_experts = 0;
  for (double e : experts_per_layer) mean_experts += e / layers;

  std::cout << absl::StrFormat(
      "\n== batch %d ==\nprompt %d tokens per sequence (prefill step %.1f ms), %d warm-up steps, "
      "then %d timed "
      "steps of each kind; mean context %.0f (with head) and %.0f (without)\n\n",
      batch, prompt_len, prefill_s * 1e3, kWarmupSteps, steps, context_full, context_layers);
  std::cout << "| decode step (batch " << batch
            << ") | ms p50 | ms mean | ms p10 / p90 | tokens/s (p50) | floor ms | vs floor |\n"
               "|---|---:|---:|---:|---:|---:|---:|\n";
  auto row = [&](const char* what, const std::vector<double>& ms, double floor) {
    const double p50 = Percentile(ms, 50);
    std::cout << absl::StrFormat("| %s | %.3f | %.3f | %.3f / %.3f | %.1f | %.3f | %.2fx |\n", what,
                                 p50, Mean(ms), Percentile(ms, 10), Percentile(ms, 90),
                                 static_cast<double>(batch) / p50 * 1e3, floor, p50 / floor);
  };
  row("Forward + greedy sample (as the engine)", full_ms, full_floor);
  row("layers only (Forward without logits)", layers_ms, layers_floor);
  std::cout << absl::StrFormat(
      "| head, logits and sample (difference of the p50s) | %.3f | | | | %.3f | %.2fx |\n\n",
      head50, head_floor, head50 / head_floor);

  std::cout << absl::StrFormat(
      "floor of a step with the head: bytes it must move over %.1f GB/s; %.1f GFLOP per step\n"
      "| part | MB per step | floor ms | share |\n|---|---:|---:|---:|\n",
      bandwidth / 1e9, full.flops / 1e9);
  auto part = [&](const std::string& what, double bytes) {
    std::cout << absl::StrFormat("| %s | %.2f | %.4f | %.1f%% |\n", what, bytes / 1e6,
                                 bytes / bandwidth * 1e3, 100.0 * bytes / full.Total());
  };
  part("attention weights (q, k, v, o)", full.attention);
  part("dense MLP weights (gate, up, down)", full.mlp);
  part("router weights", full.router);
  part(absl::StrFormat("expert weights (%.1f distinct experts per layer, from the warm-up "
                       "routing)",
                       mean_experts),
       full.experts);
  part("norm weights, scales, layer scalars", full.norms);
  part(absl::StrFormat("KV cache read + written (%s, mean context %.0f)",
                       DTypeName(cache->dtype()), context_full),
       full.kv);
  part("embedding rows", full.embed);
  part(absl::StrFormat("output head (tied embedding, %d x %d) and final norm", config.vocab_size,
                       config.hidden_size),
       full.head);
  part("logits (f32: written, soft-capped, sampled)", full.logits);
  part("total", full.Total());

  double estimate_ms = 0, estimate_floor = 0;
  if (layers % kPatternPeriod == 0) {
    // Head once, the layers' share scaled to the real depth (same pattern, same widths).
    const int real_layers = bench.shape.real_layers;
    const double scale = static_cast<double>(real_layers) / layers;
    estimate_ms = head50 + layers50 * scale;
    estimate_floor = head_floor + layers_floor * scale;
    std::cout << absl::StrFormat(
        "\nlinear estimate for the real %d layers (head once, layers x %.0f): %.3f ms per step "
        "against a floor of %.3f ms (%.2fx)\n",
        real_layers, scale, estimate_ms, estimate_floor, estimate_ms / estimate_floor);
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << absl::StrFormat(
        "{\"device\": \"%s\", \"copy_GBps\": %.2f, \"layers\": %d, \"batch\": %d, "
        "\"steps\": %d, \"prompt_len\": %d, \"weight_bytes\": %d, \"write_s\": %.2f, "
        "\"load_s\": %.2f, \"prefill_ms\": %.3f, \"experts_per_layer\": %.3f, "
        "\"step_ms\": {\"p50\": %.4f, \"mean\": %.4f, \"p90\": %.4f}, \"step_floor_ms\": %.4f, "
        "\"layers_ms\": {\"p50\": %.4f, \"mean\": %.4f, \"p90\": %.4f}, "
        "\"layers_floor_ms\": %.4f, \"head_ms\": %.4f, \"head_floor_ms\": %.4f, "
        "\"step_bytes\": %.0f, \"step_flops\": %.0f, \"estimate_real_layers_ms\": %.4f, "
        "\"estimate_real_layers_floor_ms\": %.4f, \"model\": \"%s\", \"kv_dtype\": \"%s\", "
        "\"tensor_core_attention\": %s, \"device_scheduled_experts\": %s}\n",
        bench.device, bandwidth / 1e9, layers, batch, steps, prompt_len, bench.weight_bytes,
        bench.write_s, bench.load_s, prefill_s * 1e3, mean_experts, full50, Mean(full_ms),
        Percentile(full_ms, 90), full_floor, layers50, Mean(layers_ms), Percentile(layers_ms, 90),
        layers_floor, head50, head_floor, full.Total(), full.flops, estimate_ms, estimate_floor,
        bench.shape.name, DTypeName(cache->dtype()),
        absl::GetFlag(FLAGS_tensor_core_attention) ? "true" : "false",
        absl::GetFlag(FLAGS_device_scheduled_experts) ? "true" : "false");
  }
  return absl::OkStatus();
}

absl::Status Run() {
  const int32_t layers = absl::GetFlag(FLAGS_layers);
  const std::string model_flag = absl::AsciiStrToLower(absl::GetFlag(FLAGS_model));
  const ModelShape* shape_ptr = model_flag == "26b-a4b" ? &k26b : model_flag == "31b" ? &k31b
                                                                                      : nullptr;
  if (shape_ptr == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--model: '", absl::GetFlag(FLAGS_model),
                                                   "' is neither 26b-a4b nor 31b"));
  }
  const ModelShape& shape = *shape_ptr;
  const int kRealLayers = shape.real_layers;
  std::vector<int64_t> batches;
  for (absl::string_view item : absl::StrSplit(absl::GetFlag(FLAGS_batch), ',')) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(item, &n) || n < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--batch: '", item, "' is not a positive integer"));
    }
    batches.push_back(n);
  }
  const int64_t steps = absl::GetFlag(FLAGS_steps);
  const int64_t prompt_len = absl::GetFlag(FLAGS_prompt_len);
  if (layers < 1 || layers > kRealLayers) {
    return absl::InvalidArgumentError(absl::StrCat("--layers must be in [1, ", kRealLayers, "]"));
  }
  if (steps < 1) return absl::InvalidArgumentError("--steps must be >= 1");
  if (prompt_len < 1) return absl::InvalidArgumentError("--prompt-len must be >= 1");
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0 (0: all cores)");
  if (threads == 0) threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));

  CudaBackendOptions backend_options;
  const std::string kv_flag = absl::AsciiStrToLower(absl::GetFlag(FLAGS_kv_dtype));
  if (kv_flag == "f32") {
    backend_options.kv_dtype = DType::kF32;
  } else if (kv_flag != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-dtype: '", absl::GetFlag(FLAGS_kv_dtype), "' is neither bf16 nor f32"));
  }
  backend_options.tensor_core_attention = absl::GetFlag(FLAGS_tensor_core_attention);
  backend_options.device_scheduled_experts = absl::GetFlag(FLAGS_device_scheduled_experts);
  if (CudaBackend::DeviceCount() <= 0) {
    return absl::FailedPreconditionError(
        "no CUDA device is visible to this process; cuda_decode_bench needs one");
  }
  const std::string config_json = ConfigJson(shape, layers);
  ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(config_json, "cuda_decode_bench config"));
  const std::vector<TensorSpec> specs = CheckpointTensors(config);
  uint64_t weight_bytes = 0;
  int64_t params = 0;
  for (const TensorSpec& t : specs) {
    weight_bytes += static_cast<uint64_t>(t.numel) * 2;
    params += t.numel;
  }

  ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> backend, CudaBackend::Create(backend_options));
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const size_t arena = backend->arena().capacity();
  // Weights, plus room for the KV cache, the logits and scratch.
  if (weight_bytes + (uint64_t{2} << 30) > arena) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "%d layers need %.2f GB of weights; the device arena has %.2f GB: use fewer --layers",
        layers, weight_bytes / 1e9, arena / 1e9));
  }
  ASSIGN_OR_RETURN(const double copy_s, FastestCopySeconds(*backend, kCopyBytes, kCopyReps));
  const double bandwidth = 2.0 * static_cast<double>(kCopyBytes) / copy_s;

  int sliding = 0;
  for (int l = 0; l < layers; ++l) sliding += config.IsFull(l) ? 0 : 1;
  std::cout << absl::StrFormat(
      "cuda_decode_bench: Gemma 4 %s widths, %d layers (%d sliding, %d full), vocabulary "
      "%d, bf16 weights (%.2fG parameters, %.2f GB), KV cache in %s, batch %s\n",
      shape.name, layers, sliding, layers - sliding, config.vocab_size, params / 1e9, weight_bytes / 1e9,
      DTypeName(backend->KvCacheDType()), absl::StrJoin(batches, ", "));
  std::cout << absl::StrFormat(
      "device: %s (%d SMs, %.1f GiB); measured copy bandwidth %.1f GB/s (device-to-device, "
      "%d MiB, bytes read + written, fastest of %d)\n",
      prop.name, prop.multiProcessorCount, prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0),
      bandwidth / 1e9, kCopyBytes >> 20, kCopyReps);
  std::cout.flush();

  // ---- write, load, delete ----
  ASSIGN_OR_RETURN(const std::string parent, PickParent(weight_bytes + (uint64_t{64} << 20)));
  ASSIGN_OR_RETURN(std::unique_ptr<TempDir> dir,
                   TempDir::Create(parent, absl::GetFlag(FLAGS_keep)));
  Clock::time_point t0 = Clock::now();
  RETURN_IF_ERROR(
      WriteCheckpoint(dir->path(), config_json, specs, absl::GetFlag(FLAGS_seed), threads));
  const double write_s = Seconds(Clock::now() - t0);
  t0 = Clock::now();
  ASSIGN_OR_RETURN(std::unique_ptr<gemma4::Model> model,
                   gemma4::Model::Load(dir->path(), *backend));
  const double load_s = Seconds(Clock::now() - t0);
  dir->Remove();
  std::cout << absl::StrFormat(
      "checkpoint: written to %s in %.1f s (%d threads), loaded in %.1f s, %s\n", dir->path(),
      write_s, threads, load_s, absl::GetFlag(FLAGS_keep) ? "kept" : "deleted");
  std::cout.flush();

  const Bench bench{.shape = shape,
                    .config = config,
                    .backend = *backend,
                    .model = *model,
                    .bandwidth = bandwidth,
                    .device = prop.name,
                    .layers = layers,
                    .steps = steps,
                    .prompt_len = prompt_len,
                    .weight_bytes = weight_bytes,
                    .write_s = write_s,
                    .load_s = load_s};
  for (int64_t batch : batches) RETURN_IF_ERROR(RunBatch(bench, batch));
  return absl::OkStatus();
}

}  // namespace
}  // namespace gemma

int main(int argc, char** argv) {
  return gemma::ToolMain(
      argc, argv, "cuda_decode_bench",
      "decode steps of the 26B-A4B or 31B network (random bf16 weights, real widths, a few "
      "layers) on the CUDA backend against their memory-bandwidth floor\n"
      "  cuda_decode_bench [--model 26b-a4b|31b --layers 6 --batch 1,32 --steps 64 "
      "--prompt-len 128 --json]",
      gemma::Run);
}
