// gemmactl: the cluster's command-line client.
//   gemmactl [--coordinator HOST:PORT] generate "text" | generate --tokens 2,17,301
//            [--max-tokens N] [--temperature T] [--json]
//   gemmactl [--coordinator HOST:PORT] status [--json]
// --coordinator defaults to $GEMMA_COORDINATOR, else localhost:50051.
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gemma/v1/cluster.grpc.pb.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"

ABSL_FLAG(std::string, coordinator, "", "coordinator HOST:PORT (default $GEMMA_COORDINATOR or "
                                        "localhost:50051)");
ABSL_FLAG(std::string, tokens, "", "generate: comma-separated prompt token ids");
ABSL_FLAG(int64_t, max_tokens, 0, "generate: tokens to generate (0: the server default)");
ABSL_FLAG(double, temperature, 0.0, "generate: sampling temperature; 0 = greedy");
ABSL_FLAG(int64_t, timeout_ms, 60000, "deadline of the whole call");
ABSL_FLAG(int64_t, connect_timeout_ms, 3000, "how long to wait for the coordinator to answer");
ABSL_FLAG(bool, json, false, "print JSON (one object per response for generate)");

namespace {

constexpr char kUsage[] =
    "talks to a gemma-coordinator\n"
    "  gemmactl generate \"text\" | generate --tokens 2,17,301 [--max-tokens N] "
    "[--temperature T] [--json]\n"
    "  gemmactl status [--json]\n"
    "  --coordinator HOST:PORT (default $GEMMA_COORDINATOR, else localhost:50051)";

void NormalizeFlagDashes(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.rfind("--", 0) != 0) continue;
    for (char* p = argv[i] + 2; *p != '\0' && *p != '='; ++p) {
      if (*p == '-') *p = '_';
    }
  }
}

std::string CoordinatorAddress() {
  std::string address = absl::GetFlag(FLAGS_coordinator);
  if (address.empty()) {
    const char* env = std::getenv("GEMMA_COORDINATOR");
    address = env != nullptr && *env != '\0' ? env : "localhost:50051";
  }
  return address;
}

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

// A channel that answered within --connect-timeout-ms.
absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect(const std::string& address) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(absl::GetFlag(FLAGS_connect_timeout_ms));
  if (!channel->WaitForConnected(deadline)) {
    return absl::UnavailableError(absl::StrCat("cannot reach the coordinator at ", address,
                                               " within ", absl::GetFlag(FLAGS_connect_timeout_ms),
                                               " ms; set --coordinator or $GEMMA_COORDINATOR"));
  }
  return channel;
}

std::string ToJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &json, options);
  return json;
}

absl::Status Generate(const std::vector<char*>& args) {
  gemma::v1::GenerateRequest request;
  const std::string tokens = absl::GetFlag(FLAGS_tokens);
  if (!tokens.empty()) {
    if (args.size() > 2) return absl::InvalidArgumentError("give either text or --tokens, not both");
    for (absl::string_view item : absl::StrSplit(tokens, ',')) {
      int32_t id = 0;
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(item), &id)) {
        return absl::InvalidArgumentError(absl::StrCat("--tokens: '", item, "' is not an id"));
      }
      request.mutable_token_ids()->add_ids(id);
    }
  } else if (args.size() == 3) {
    request.set_text(args[2]);
  } else {
    return absl::InvalidArgumentError("generate needs one text argument or --tokens");
  }
  request.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  request.mutable_sampling()->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  const std::string address = CoordinatorAddress();
  auto channel = Connect(address);
  if (!channel.ok()) return channel.status();
  auto stub = gemma::v1::Inference::NewStub(*channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(absl::GetFlag(FLAGS_timeout_ms)));
  std::unique_ptr<grpc::ClientReader<gemma::v1::GenerateResponse>> reader =
      stub->Generate(&context, request);
  const bool json = absl::GetFlag(FLAGS_json);
  const bool ids = request.has_token_ids();
  gemma::v1::GenerateResponse response;
  gemma::v1::GenerateFinal final;
  bool first = true;
  while (reader->Read(&response)) {
    if (json) {
      std::cout << ToJson(response) << "\n" << std::flush;
    } else if (ids) {
      for (int32_t id : response.token_ids()) {
        std::cout << (first ? "" : " ") << id;
        first = false;
      }
      std::cout << std::flush;
    } else {
      std::cout << response.text() << std::flush;
    }
    if (response.has_final()) final = response.final();
  }
  const grpc::Status status = reader->Finish();
  if (!json) std::cout << "\n";
  if (!status.ok()) return FromGrpc(status);
  if (!json) {
    std::cerr << absl::StrFormat("[%s: %d prompt tokens, %d generated]\n", final.finish_reason(),
                                 final.prompt_tokens(), final.generated_tokens());
  }
  return absl::OkStatus();
}

absl::Status Status() {
  const std::string address = CoordinatorAddress();
  auto channel = Connect(address);
  if (!channel.ok()) return channel.status();
  auto stub = gemma::v1::Cluster::NewStub(*channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  gemma::v1::GetStatusResponse response;
  grpc::Status status = stub->GetStatus(&context, gemma::v1::GetStatusRequest(), &response);
  if (!status.ok()) return FromGrpc(status);
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(response) << "\n";
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat("coordinator %s, protocol %d, model fingerprint %s, %d replicas\n",
                               address, response.protocol_version(),
                               response.model_fingerprint().empty() ? "-"
                                                                    : response.model_fingerprint(),
                               response.replicas_size());
  std::cout << absl::StrFormat("%-6s %-22s %-9s %8s %8s %12s %s\n", "ID", "ADDRESS", "HEALTH",
                               "RUNNING", "WAITING", "OUTSTANDING", "KV PAGES (used/total)");
  for (const gemma::v1::ReplicaStatus& replica : response.replicas()) {
    std::vector<std::string> pools;
    for (const gemma::v1::KvPoolUsage& pool : replica.kv_pools()) {
      pools.push_back(absl::StrCat(pool.name(), " ", pool.pages_used(), "/", pool.pages_total()));
    }
    std::cout << absl::StrFormat("%-6s %-22s %-9s %8d %8d %12d %s\n", replica.id(),
                                 replica.address(), replica.healthy() ? "healthy" : "UNHEALTHY",
                                 replica.running(), replica.waiting(), replica.outstanding(),
                                 absl::StrJoin(pools, ", "));
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  NormalizeFlagDashes(argc, argv);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  absl::Status status;
  if (args.size() >= 2 && std::string(args[1]) == "generate") {
    status = Generate(args);
  } else if (args.size() == 2 && std::string(args[1]) == "status") {
    status = Status();
  } else {
    std::cerr << "gemmactl: " << kUsage << "\n";
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "gemmactl: " << absl::StatusCodeToString(status.code()) << ": "
              << status.message() << "\n";
    return 1;
  }
  return 0;
}
