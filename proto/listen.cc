#include "proto/listen.h"

#include "absl/strings/str_cat.h"
#include "common/host_port.h"
#include "grpc/grpc.h"

namespace gemma {

absl::Status CheckListenAddress(const std::string& flag, const std::string& value) {
  if (PortOf(value) < 0 || value.front() == ':') {
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
