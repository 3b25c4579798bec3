// Tokenizer throughput: encoding and decoding the 1 MB golden document with the test
// tokenizer, single thread. scripts/bench_tokenizer.sh runs it beside the Hugging Face library.
#include <fstream>
#include <sstream>
#include <string>

#include "benchmark/benchmark.h"
#include "common/tokenizer/tokenizer.h"

namespace {

constexpr char kData[] = GEMMA_SOURCE_DIR "/tests/golden/data/tokenizer/";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

const gemma::tokenizer::Tokenizer& TestTokenizer() {
  static const auto* tokenizer = [] {
    auto loaded = gemma::tokenizer::Tokenizer::FromFile(std::string(kData) +
                                                        "gemma4_test_tokenizer.json");
    if (!loaded.ok()) {
      std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
      std::abort();
    }
    return loaded->release();
  }();
  return *tokenizer;
}

void BM_EncodeDocument(benchmark::State& state) {
  const std::string doc = ReadFile(std::string(kData) + "corpus/doc_1mb.txt");
  const auto& tokenizer = TestTokenizer();
  size_t num_ids = 0;
  for (auto _ : state) {
    auto ids = tokenizer.Encode(doc);
    num_ids = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * doc.size()));
  state.counters["ids"] = static_cast<double>(num_ids);
}
BENCHMARK(BM_EncodeDocument)->Unit(benchmark::kMillisecond)->MinTime(2.0);

void BM_DecodeDocument(benchmark::State& state) {
  const std::string doc = ReadFile(std::string(kData) + "corpus/doc_1mb.txt");
  const auto& tokenizer = TestTokenizer();
  const auto ids = tokenizer.Encode(doc);
  for (auto _ : state) {
    std::string text = tokenizer.Decode(ids);
    benchmark::DoNotOptimize(text.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * doc.size()));
}
BENCHMARK(BM_DecodeDocument)->Unit(benchmark::kMillisecond);

void BM_Load(benchmark::State& state) {
  const std::string json = ReadFile(std::string(kData) + "gemma4_test_tokenizer.json");
  for (auto _ : state) {
    auto tokenizer = gemma::tokenizer::Tokenizer::FromJson(json);
    benchmark::DoNotOptimize(tokenizer.ok());
  }
}
BENCHMARK(BM_Load)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
