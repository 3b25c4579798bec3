// Where the cluster's gRPC servers listen: the address checked before it is used, and the
// port taken for this process alone.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace gemma {

// OK when `value`, given as --`flag`, is HOST:PORT ([IPv6]:PORT too) with PORT a whole number
// in [0, 65535] (0: any free port); INVALID_ARGUMENT naming the flag otherwise (gRPC would take
// 99999 as 34463).
absl::Status CheckListenAddress(const std::string& flag, const std::string& value);

// AddListeningPort without SO_REUSEPORT: gRPC sets it by default, which lets a second process
// listen on a port already in use and the kernel split connections between the two (a second
// coordinator would take half the clients and half the workers). Without it, BuildAndStart
// fails on a port in use.
void ListenExclusively(grpc::ServerBuilder& builder, const std::string& address,
                       std::shared_ptr<grpc::ServerCredentials> credentials, int* port);

}  // namespace gemma
