#include "worker/service/grpc_store.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "gloo/common/error.h"
#include "proto/status_convert.h"
#include "proto/bearer.h"

namespace gemma::service {
namespace {

namespace iv1 = gemma::internal::v1;

absl::Status FromGrpc(const grpc::Status& status, absl::string_view what) {
  absl::Status converted = gemma::FromGrpc(status, absl::StrCat("rendezvous store: ", what));
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
      status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return absl::Status(converted.code(),
                        absl::StrCat(converted.message(),
                                     " (the store is the coordinator's: is it running and "
                                     "reachable at --coordinator?)"));
  }
  return converted;
}

// Room for the RPC itself on top of the server-side wait.
constexpr std::chrono::seconds kRpcSlack{5};

}  // namespace

absl::Status GrpcStore::Set(absl::string_view key, absl::string_view value) {
  iv1::StoreSetRequest request;
  request.set_key(absl::StrCat(prefix_, key));
  request.set_value(std::string(value));
  iv1::StoreSetResponse response;
  grpc::ClientContext context;
  gemma::AddBearer(context, gemma::EnvToken(gemma::kJoinTokenEnv));
  context.set_wait_for_ready(true);  // the coordinator may still be starting
  context.set_deadline(std::chrono::system_clock::now() + timeout_ + kRpcSlack);
  return FromGrpc(stub_->StoreSet(&context, request, &response), absl::StrCat("set ", key));
}

absl::StatusOr<std::string> GrpcStore::Get(absl::string_view key,
                                           std::chrono::milliseconds timeout) {
  iv1::StoreGetRequest request;
  request.set_key(absl::StrCat(prefix_, key));
  request.set_timeout_ms(timeout.count());
  iv1::StoreGetResponse response;
  grpc::ClientContext context;
  gemma::AddBearer(context, gemma::EnvToken(gemma::kJoinTokenEnv));
  context.set_wait_for_ready(true);  // the coordinator may still be starting
  context.set_deadline(std::chrono::system_clock::now() + timeout + kRpcSlack);
  grpc::Status status = stub_->StoreGet(&context, request, &response);
  if (!status.ok()) return FromGrpc(status, absl::StrCat("get ", key));
  return std::move(*response.mutable_value());
}

absl::Status GrpcStore::Clear() {
  iv1::StoreDeletePrefixRequest request;
  request.set_prefix(prefix_);
  iv1::StoreDeletePrefixResponse response;
  grpc::ClientContext context;
  gemma::AddBearer(context, gemma::EnvToken(gemma::kJoinTokenEnv));
  context.set_wait_for_ready(true);  // the coordinator may still be starting
  context.set_deadline(std::chrono::system_clock::now() + kRpcSlack);
  return FromGrpc(stub_->StoreDeletePrefix(&context, request, &response), "clear");
}

void GrpcStore::set(const std::string& key, const std::vector<char>& data) {
  absl::Status status = Set(key, absl::string_view(data.data(), data.size()));
  if (!status.ok()) throw gloo::IoException(std::string(status.message()));
}

std::vector<char> GrpcStore::get(const std::string& key) {
  absl::StatusOr<std::string> value = Get(key, timeout_);
  if (!value.ok()) throw gloo::IoException(std::string(value.status().message()));
  return std::vector<char>(value->begin(), value->end());
}

void GrpcStore::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void GrpcStore::wait(const std::vector<std::string>& keys,
                     const std::chrono::milliseconds& timeout) {
  // Gloo passes its group's timeout, which for the control group is unbounded: the store's own
  // bound applies to the rendezvous.
  const auto deadline = std::chrono::steady_clock::now() +
                        (timeout.count() > 0 ? std::min(timeout, timeout_) : timeout_);
  for (const std::string& key : keys) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    absl::StatusOr<std::string> value = Get(key, std::max(left, std::chrono::milliseconds(1)));
    if (!value.ok()) throw gloo::IoException(std::string(value.status().message()));
  }
}

}  // namespace gemma::service
