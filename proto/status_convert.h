// The one conversion between absl::Status and grpc::Status for every gRPC binary (the two enums
// share their numeric codes).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/status.h"

namespace gemma {

inline grpc::Status ToGrpc(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

// `what` (e.g. "registering with HOST:PORT"), when given, prefixes the message.
inline absl::Status FromGrpc(const grpc::Status& status, absl::string_view what = "") {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(
      static_cast<absl::StatusCode>(status.error_code()),
      what.empty() ? status.error_message() : absl::StrCat(what, ": ", status.error_message()));
}

}  // namespace gemma
