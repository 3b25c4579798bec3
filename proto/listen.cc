#include "proto/listen.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "grpc/grpc.h"

namespace gemma {

absl::Status CheckListenAddress(const std::string& flag, const std::string& value) {
  const size_t colon = value.rfind(':');
  const size_t bracket = value.rfind(']');
  int port = -1;
  if (colon == std::string::npos || colon == 0 ||
      (bracket != std::string::npos && colon < bracket) ||
      !absl::SimpleAtoi(value.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, " \"", value, "\" is not HOST:PORT with a port in 0-65535 (0: any free one)"));
  }
  return absl::OkStatus();
}

void ListenExclusively(grpc::ServerBuilder& builder, const std::string& address,
                       std::shared_ptr<grpc::ServerCredentials> credentials, int* port) {
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(address, std::move(credentials), port);
}

}  // namespace gemma
