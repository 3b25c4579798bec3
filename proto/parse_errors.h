// A request body that is not a valid protobuf message for the method called: gRPC's callback
// servers answer it UNIMPLEMENTED with an empty message, which reads as "this method does not
// exist". Servers that add this interceptor answer INVALID_ARGUMENT instead, naming the method
// and what to check.
#pragma once

#include <memory>
#include <vector>

#include "grpcpp/support/server_interceptor.h"

namespace gemma {

// The interceptor factories every server passes to
// ServerBuilder::experimental().SetInterceptorCreators().
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
ParseErrorInterceptors();

}  // namespace gemma
