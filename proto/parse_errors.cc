#include "proto/parse_errors.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace gemma {
namespace {

using grpc::experimental::InterceptionHookPoints;

// Notes when the server's message could not be read (POST_RECV_MESSAGE without a message, as
// gRPC reports a failed parse, or the end of a client stream), and rewrites the status that
// gRPC then gives (UNIMPLEMENTED, no message) before it is sent. A status the service itself
// sets always has a message, so it is never rewritten.
class ParseErrorInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit ParseErrorInterceptor(std::string method) : method_(std::move(method)) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() == nullptr) {
      unread_message_ = true;
    }
    if (unread_message_ &&
        methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED &&
          status.error_message().empty()) {
        methods->ModifySendStatus(grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            absl::StrCat("the request could not be parsed as the protobuf message of ", method_,
                         ": check that the client sends that method's request message (and was "
                         "built from the same .proto files)")));
      }
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
  bool unread_message_ = false;
};

class ParseErrorInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new ParseErrorInterceptor(info->method());
  }
};

}  // namespace

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
ParseErrorInterceptors() {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> out;
  out.push_back(std::make_unique<ParseErrorInterceptorFactory>());
  return out;
}

}  // namespace gemma
