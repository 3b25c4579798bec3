// libFuzzer entry point: arbitrary bytes as an uploaded OpenAI batch input file (JSONL). Its
// lines become items as POST /v1/batches makes them (coordinator/openai_batch_api.cc: split at
// '\n', blank lines skipped, numbered from 1), and BatchRunner::Create reads each line
// (custom_id, method, url, body through ParseOpenAiRequest), checks the requests and commits
// the batch to a BatchStore in memory. Every file must give a batch (items accepted or refused
// one by one) or an INVALID_ARGUMENT for the whole batch; never an exception. The refusals are
// then written out as the batch's error file is.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "coordinator/batch_store.h"
#include "coordinator/batches.h"
#include "coordinator/openai_format.h"
#include "coordinator/registry.h"
#include "glog/logging.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace {

using namespace gemma::coordinator;  // NOLINT: fuzzer glue

struct Fixture {
  Registry registry{RegistryOptions()};
  // Never dialled: Create does not call the Inference service.
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel("localhost:1", grpc::InsecureChannelCredentials());
  OpenAiOptions openai;
  BatchOptions options;
  Fixture() { options.max_line_bytes = 2048; }  // reachable at libFuzzer's default max_len
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  FLAGS_minloglevel = google::GLOG_WARNING;  // Create logs each batch at INFO
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture* fixture = new Fixture;
  const absl::string_view content(reinterpret_cast<const char*>(data), size);
  std::vector<gemma::v1::BatchItem> items = gemma::coordinator::OpenAiBatchItems(content);
  // The batch's endpoint: any (gRPC callers may leave it empty), or one of the two.
  static const char* const kEndpoints[] = {"", "/v1/chat/completions", "/v1/completions"};
  gemma::v1::CreateBatchHeader header;
  header.set_endpoint(kEndpoints[size % 3]);

  auto store = BatchStore::Open(":memory:");
  CHECK(store.ok()) << store.status();
  BatchRunner runner(store->get(), &fixture->registry, fixture->channel, &fixture->openai,
                     fixture->options, "");
  auto batch = runner.Create(header, items);
  if (!batch.ok()) {
    CHECK_EQ(batch.status().code(), absl::StatusCode::kInvalidArgument) << batch.status();
    return 0;
  }
  // Running, or failed at once when every line was refused (the input did not validate).
  CHECK_EQ(batch->status(), batch->refused() == static_cast<int64_t>(items.size()) ? "failed"
                                                                                  : "in_progress");
  CHECK_EQ(batch->counts().total(), static_cast<int64_t>(items.size()));
  CHECK_LE(batch->errors_size(), kBatchErrorsListed);
  (void)Dump(BatchObject(*batch));
  auto results = (*store)->Results(batch->id(), 0, batch->counts().total());
  CHECK(results.ok()) << results.status();
  for (const gemma::v1::BatchResult& result : *results) {
    (void)Dump(BatchOutputLine(result, batch->id(), fixture->openai.model_name,
                               batch->created_at()));
  }
  return 0;
}
