// libFuzzer entry point: arbitrary bytes as a gemma.v1.GenerateRequest off the wire (bytes that
// do not parse are skipped, as gRPC refuses them before the coordinator sees them), through the
// coordinator's checks (coordinator/request_checks.h) under a few model limits. A request is
// accepted or refused INVALID_ARGUMENT with a message; one accepted stays accepted once
// PrepareForReplicas has resolved it.
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "coordinator/request_checks.h"
#include "glog/logging.h"
#include "google/protobuf/stubs/logging.h"

namespace {

using gemma::coordinator::ModelLimits;

constexpr ModelLimits kLimits[] = {
    {},                // unknown: not checked
    {262144, 131072},  // Gemma 4
    {512, 64},         // a tiny test model
    {1, 1},
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs an error for each string field that is not UTF-8 before refusing the message;
  // the fuzzer makes plenty.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gemma::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  for (const ModelLimits& limits : kLimits) {
    absl::Status status = gemma::coordinator::ValidateGenerateRequest(request, limits);
    if (!status.ok()) {
      CHECK_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
      CHECK(!status.message().empty());
      continue;
    }
    gemma::v1::GenerateRequest prepared = request;
    gemma::coordinator::PrepareForReplicas(&prepared, /*random_seed=*/42);
    CHECK_GT(prepared.max_tokens(), 0);
    CHECK(prepared.sampling().temperature() == 0 || prepared.sampling().has_seed());
    absl::Status again = gemma::coordinator::ValidateGenerateRequest(prepared, limits);
    CHECK(again.ok()) << "accepted, then refused once prepared: " << again;
  }
  return 0;
}
