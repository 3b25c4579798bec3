// gemmactl: the cluster's command-line client.
//   gemmactl [--coordinator HOST:PORT] generate "text" | generate --tokens 2,17,301
//            [--max-tokens N] [--temperature T] [--json]
//   gemmactl [--coordinator HOST:PORT] chat [--system "text"] [--max-tokens N]
//            [--temperature T] [--json] [--echo]
//   gemmactl [--coordinator HOST:PORT] status [--json]
// --coordinator defaults to $GEMMA_COORDINATOR, else localhost:50051.
//
// chat reads one user turn per line of stdin ("you> " is shown when stdin is a terminal), sends
// the whole conversation (the optional system message, every earlier turn, the new user turn)
// as GenerateRequest.chat, streams the model's reply and keeps it in the history, until EOF or
// "/exit"; "/reset" forgets the history. Piped stdin gives one turn per line.
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/batch_commands.h"
#include "client/proto_json.h"
#include "proto/bearer.h"
#include "proto/placement_convert.h"
#include "proto/tls.h"
#include "common/flags.h"
#include "common/host_port.h"
#include "common/status_macros.h"
#include "gemma/v1/cluster.grpc.pb.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/support/log.h"
#include "grpcpp/grpcpp.h"
#include "proto/status_convert.h"

ABSL_FLAG(std::string, coordinator, "", "coordinator HOST:PORT (default $GEMMA_COORDINATOR or "
                                        "localhost:50051)");
ABSL_FLAG(std::string, tokens, "", "generate: comma-separated prompt token ids");
ABSL_FLAG(std::string, system, "", "chat: a system message that leads the conversation");
ABSL_FLAG(bool, echo, false, "chat: print each user line after \"you> \" (for piped stdin)");
ABSL_FLAG(int64_t, max_tokens, 0,
          "generate, chat: tokens to generate per reply (0: the server default)");
ABSL_FLAG(double, temperature, 0.0, "generate, chat: sampling temperature; 0 = greedy");
ABSL_FLAG(int64_t, timeout_ms, 60000, "deadline of each call (of each turn for chat)");
ABSL_FLAG(std::string, token, "",
          "bearer token for a coordinator started with --auth-tokens (default $GEMMA_TOKEN)");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA file to verify a coordinator that speaks TLS (default $GEMMA_TLS_CA; none: "
          "plaintext)");
ABSL_FLAG(int64_t, connect_timeout_ms, 3000, "how long to wait for the coordinator to answer");
ABSL_FLAG(bool, json, false, "print JSON (one object per response for generate and chat)");
ABSL_FLAG(bool, watch, false, "experts: redraw every --interval-ms until interrupted");
ABSL_FLAG(int64_t, interval_ms, 1000, "experts --watch: milliseconds between redraws");
ABSL_FLAG(std::string, replica, "", "experts: one replica's totals (default: the whole cluster)");
ABSL_FLAG(std::string, record, "",
          "experts: append every expert-load window as it arrives to this file, one JSON "
          "object a line, until interrupted");
ABSL_FLAG(bool, wait, false,
          "batch submit: follow the batch to its end with a progress bar; batch results: of a "
          "batch still running, write results as items finish until it ends; rebalance: wait "
          "until each replica runs its new placement");
ABSL_FLAG(bool, dry_run, false, "rebalance: plan and report, switch nothing");
ABSL_FLAG(std::string, model, "",
          "generate, chat: the model to run on; experts: the model whose load to show; by its "
          "served name (gemmactl status lists them; default: the cluster's default model)");
ABSL_FLAG(std::string, output, "", "batch results: the OpenAI output file (default stdout)");
ABSL_FLAG(std::string, errors, "",
          "batch results: the OpenAI error file (default OUTPUT.errors.jsonl, or stdout)");
ABSL_FLAG(std::string, model_name, "gemma-4",
          "batch results: the \"model\" written in the OpenAI response bodies of items that "
          "named none (the others say the model they named)");

namespace {

constexpr char kUsage[] =
    "talks to a gemma-coordinator\n"
    "  gemmactl generate \"text\" | generate --tokens 2,17,301 [--max-tokens N] "
    "[--temperature T] [--model NAME] [--json]\n"
    "  gemmactl chat [--system \"text\"] [--max-tokens N] [--temperature T] [--model NAME] "
    "[--json] [--echo]\n"
    "      one user turn per line of stdin; /reset forgets the conversation, /exit or EOF ends\n"
    "  gemmactl status [--json]\n"
    "  gemmactl experts [--model NAME] [--replica ID] [--json] [--watch [--interval-ms N]]\n"
    "                   [--record FILE]\n"
    "      expert load: a layers x experts heatmap, each layer's balancedness, per-rank load;\n"
    "      --record appends each window as it arrives (JSON lines) until interrupted\n"
    "  gemmactl drain REPLICA   (admin) no new requests; it leaves once its requests are done\n"
    "  gemmactl rebalance [--replica ID] [--dry-run] [--wait]   (admin)\n"
    "      fits each replica's expert placement (copies of hot experts in its spare slots) to\n"
    "      its recent load and switches to it live; prints balancedness before and predicted\n"
    "  gemmactl batch submit FILE.jsonl [--wait]   an OpenAI batch input file\n"
    "  gemmactl batch status ID | list | cancel ID [--json]\n"
    "  gemmactl batch results ID [--output|-o OUT.jsonl] [--errors ERR.jsonl] [--model-name NAME] "
    "[--wait]\n"
    "  gemmactl COMMAND --help   that command's usage and flags\n"
    "  --coordinator HOST:PORT (default $GEMMA_COORDINATOR, else localhost:50051)\n"
    "  --token TOKEN (default $GEMMA_TOKEN) for a coordinator that asks for one\n"
    "  --tls-ca FILE (default $GEMMA_TLS_CA) for a coordinator that speaks TLS";

// What `gemmactl COMMAND --help` (or `gemmactl help COMMAND`) prints: the command's usage
// and the flags it reads, each with its description and default, then the connection flags
// every command shares.
struct CommandHelp {
  const char* name;
  const char* usage;
  std::vector<const char*> flags;  // Abseil's names (underscores)
};

const std::vector<CommandHelp>& CommandHelps() {
  static const auto* helps = new std::vector<CommandHelp>{
      {"generate",
       "gemmactl generate \"text\" | generate --tokens 2,17,301 [--max-tokens N] "
       "[--temperature T] [--model NAME] [--json]\n"
       "  streams one completion of the text (or of the token ids) to stdout",
       {"tokens", "max_tokens", "temperature", "model", "json"}},
      {"chat",
       "gemmactl chat [--system \"text\"] [--max-tokens N] [--temperature T] [--model NAME] "
       "[--json] [--echo]\n"
       "  one user turn per line of stdin; /reset forgets the conversation, /exit or EOF ends",
       {"system", "max_tokens", "temperature", "model", "json", "echo"}},
      {"status",
       "gemmactl status [--json]\n"
       "  a table of the replicas: model, state, parallelism, requests, KV pool use",
       {"json"}},
      {"experts",
       "gemmactl experts [--model NAME] [--replica ID] [--json] [--watch [--interval-ms N]] "
       "[--record FILE]\n"
       "  expert load: a layers x experts heatmap, each layer's balancedness, per-rank load",
       {"model", "replica", "json", "watch", "interval_ms", "record"}},
      {"drain",
       "gemmactl drain REPLICA   (admin)\n"
       "  the replica takes no new requests and leaves once its requests are done",
       {}},
      {"rebalance",
       "gemmactl rebalance [--replica ID] [--dry-run] [--wait] [--json]   (admin)\n"
       "  fits each replica's expert placement (copies of hot experts in its spare slots) to\n"
       "  its recent load and switches to it live; prints balancedness before and predicted",
       {"replica", "dry_run", "wait", "json"}},
      {"batch",
       "gemmactl batch submit FILE.jsonl [--wait]   an OpenAI batch input file\n"
       "gemmactl batch status ID | list | cancel ID [--json]\n"
       "gemmactl batch results ID [--output|-o OUT.jsonl] [--errors ERR.jsonl] [--model-name NAME] "
       "[--wait]",
       {"wait", "json", "output", "errors", "model_name"}},
  };
  return *helps;
}

void PrintFlagHelp(std::ostream& out, absl::string_view name) {
  const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
  if (flag == nullptr) return;
  std::string dashed(name);
  std::replace(dashed.begin(), dashed.end(), '_', '-');
  out << "  --" << dashed << "  " << flag->Help();
  const std::string fallback = flag->DefaultValue();
  if (!fallback.empty()) out << " (default: " << fallback << ")";
  out << "\n";
}

// The command `gemmactl ARGS --help` asks about, or nullptr: the first argument that names a
// command ("help batch" names batch).
const CommandHelp* HelpedCommand(int argc, char** argv) {
  bool help = false;
  const CommandHelp* command = nullptr;
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg == "--help" || arg == "-h" || arg == "-help") {
      help = true;
      continue;
    }
    if (command != nullptr || absl::StartsWith(arg, "-")) continue;
    // A word right after "--flag" (no "=") is that flag's value unless the flag is a switch.
    if (i > 1 && absl::StartsWith(argv[i - 1], "--") && !absl::StrContains(argv[i - 1], "=")) {
      std::string name(absl::string_view(argv[i - 1]).substr(2));
      std::replace(name.begin(), name.end(), '-', '_');
      const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
      if (flag != nullptr && !flag->IsOfType<bool>()) continue;
    }
    if (arg == "help") {  // `gemmactl help COMMAND`
      help = true;
      continue;
    }
    for (const CommandHelp& c : CommandHelps()) {
      if (arg == c.name) command = &c;
    }
  }
  return help ? command : nullptr;
}

void PrintCommandHelp(const CommandHelp& command) {
  std::cout << "usage:\n  " << absl::StrReplaceAll(command.usage, {{"\n", "\n  "}}) << "\n";
  if (!command.flags.empty()) {
    std::cout << "\nflags:\n";
    for (const char* name : command.flags) PrintFlagHelp(std::cout, name);
  }
  std::cout << "\nconnection flags (every command):\n";
  for (const char* name : {"coordinator", "token", "tls_ca", "timeout_ms", "connect_timeout_ms"}) {
    PrintFlagHelp(std::cout, name);
  }
  std::cout << "\ngemmactl --help lists every command.\n" << std::flush;
}

std::string CoordinatorAddress() {
  std::string address = absl::GetFlag(FLAGS_coordinator);
  if (address.empty()) {
    const char* env = std::getenv("GEMMA_COORDINATOR");
    address = env != nullptr && *env != '\0' ? env : "localhost:50051";
  }
  return address;
}

using gemma::FromGrpc;

// A channel that answered within --connect-timeout-ms.
// --tls-ca, else $GEMMA_TLS_CA ("" when neither: plaintext).
std::string TlsCa() {
  const std::string flag = absl::GetFlag(FLAGS_tls_ca);
  return flag.empty() ? gemma::EnvToken("GEMMA_TLS_CA") : flag;
}

// INVALID_ARGUMENT for what cannot be the coordinator's gRPC address: a URL, no port, a port
// outside 1-65535. gRPC's own target forms (dns:, unix:, ipv4:, ipv6:, ...) pass as they are.
absl::Status CheckAddress(const std::string& address) {
  if (absl::StartsWith(address, "http://") || absl::StartsWith(address, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--coordinator \"", address, "\" is a URL; give HOST:PORT of the coordinator's gRPC "
        "port (its --listen, 50051 by default; the HTTP API's port is another one)"));
  }
  for (const char* scheme : {"dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:"}) {
    if (absl::StartsWith(address, scheme)) return absl::OkStatus();
  }
  std::string host, port;
  if (!gemma::SplitHostPort(address, &host, &port)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--coordinator \"", address, "\" has no port; give HOST:PORT (the coordinator's "
        "--listen, 50051 by default)"));
  }
  if (gemma::PortOf(address, /*lo=*/1) < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--coordinator \"", address, "\": port \"",
                                                   port, "\" is not a number in 1-65535"));
  }
  return absl::OkStatus();
}

// True when HOST:PORT answers a plain HTTP request (within half a second): the coordinator's
// HTTP port given where its gRPC port belongs.
bool AnswersHttp(const std::string& address) {
  std::string host, port;
  if (!gemma::SplitHostPort(address, &host, &port)) return false;
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) {
    return false;
  }
  bool http = false;
  for (addrinfo* a = found; a != nullptr && !http; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    pollfd p{fd, POLLOUT, 0};
    const bool connected = (connect(fd, a->ai_addr, a->ai_addrlen) == 0 || errno == EINPROGRESS) &&
                           poll(&p, 1, 500) == 1 && (p.revents & POLLOUT) != 0;
    int error = 0;
    socklen_t length = sizeof(error);
    if (connected && getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error == 0) {
      const char request[] = "GET / HTTP/1.0\r\n\r\n";
      char reply[5] = {};
      p = {fd, POLLIN, 0};
      http = send(fd, request, sizeof(request) - 1, MSG_NOSIGNAL) > 0 && poll(&p, 1, 500) == 1 &&
             recv(fd, reply, sizeof(reply), 0) == static_cast<ssize_t>(sizeof(reply)) &&
             std::memcmp(reply, "HTTP/", sizeof(reply)) == 0;
    }
    close(fd);
  }
  freeaddrinfo(found);
  return http;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect(const std::string& address) {
  RETURN_IF_ERROR(CheckAddress(address));
  auto credentials = gemma::CoordinatorCredentials(TlsCa());
  if (!credentials.ok()) return credentials.status();
  // Replies above gRPC's 4 MiB default (a page of 100 batches, each with its listed refusals)
  // are read rather than failed.
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Follows (batch submit --wait, experts --watch) find a restarted coordinator within about
  // two seconds rather than after gRPC's backoff, which grows toward two minutes.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 500);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  auto channel = grpc::CreateCustomChannel(address, *credentials, args);
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(absl::GetFlag(FLAGS_connect_timeout_ms));
  if (!channel->WaitForConnected(deadline)) {
    if (AnswersHttp(address)) {
      return absl::UnavailableError(absl::StrCat(
          address, " answers HTTP, not gRPC: is it the coordinator's --http-listen port? "
          "gemmactl talks to its gRPC --listen port (50051 by default)"));
    }
    return absl::UnavailableError(absl::StrCat(
        "cannot reach the coordinator at ", address, " within ",
        absl::GetFlag(FLAGS_connect_timeout_ms), " ms; set --coordinator or $GEMMA_COORDINATOR",
        TlsCa().empty() ? "; if it speaks TLS, give its CA with --tls-ca or $GEMMA_TLS_CA"
                        : "; check that --tls-ca is the CA of its certificate"));
  }
  return channel;
}

using gemma::client::ToJson;

// --token, else $GEMMA_TOKEN ("" when neither: an open coordinator).
std::string Token() {
  const std::string flag = absl::GetFlag(FLAGS_token);
  return flag.empty() ? gemma::EnvToken(gemma::kTokenEnv) : flag;
}

// The sampling and length flags shared by generate and chat.
void SetSampling(gemma::v1::GenerateRequest* request) {
  request->set_model(absl::GetFlag(FLAGS_model));
  request->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  request->mutable_sampling()->set_temperature(
      static_cast<float>(absl::GetFlag(FLAGS_temperature)));
}

// One Inference.Generate call: `on_response` sees every response as it arrives; the last one's
// final is copied to `final`. A refused or failed call returns its gRPC status.
absl::Status StreamGenerate(
    gemma::v1::Inference::Stub& stub, const gemma::v1::GenerateRequest& request,
    const std::function<void(const gemma::v1::GenerateResponse&)>& on_response,
    gemma::v1::GenerateFinal* final) {
  grpc::ClientContext context;
  gemma::AddBearer(context, Token());
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(absl::GetFlag(FLAGS_timeout_ms)));
  std::unique_ptr<grpc::ClientReader<gemma::v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  gemma::v1::GenerateResponse response;
  int64_t tokens = 0;
  bool finished = false;
  while (reader->Read(&response)) {
    tokens += response.token_ids_size();
    on_response(response);
    if (response.has_final()) {
      *final = response.final();
      finished = true;
    }
  }
  const grpc::Status status = reader->Finish();
  // A stream cut before its final message: the coordinator went away (or the network), and
  // what was printed is not the whole answer.
  const std::string lower = absl::AsciiStrToLower(status.error_message());
  const bool transport = absl::StrContains(lower, "socket closed") ||
                         absl::StrContains(lower, "connection reset") ||
                         absl::StrContains(lower, "broken pipe") ||
                         absl::StrContains(lower, "goaway") ||
                         absl::StrContains(lower, "failed to connect");
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE && transport && !finished) {
    return absl::UnavailableError(absl::StrCat(
        "the connection to the coordinator at ", CoordinatorAddress(), " was lost after ",
        tokens, tokens == 1 ? " token" : " tokens", " (", status.error_message(),
        "): the request did not finish", tokens > 0 ? " and the output above is incomplete" : "",
        "; send it again once `gemmactl status` answers"));
  }
  return FromGrpc(status);
}

void PrintFinal(const gemma::v1::GenerateFinal& final) {
  std::cerr << absl::StrFormat("[%s: %d prompt tokens, %d generated]\n", final.finish_reason(),
                               final.prompt_tokens(), final.generated_tokens());
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
  SetSampling(&request);
  const std::string address = CoordinatorAddress();
  auto channel = Connect(address);
  if (!channel.ok()) return channel.status();
  auto stub = gemma::v1::Inference::NewStub(*channel);
  const bool json = absl::GetFlag(FLAGS_json);
  const bool ids = request.has_token_ids();
  bool first = true;
  bool printed = false;  // a refused request prints nothing, not even a newline
  gemma::v1::GenerateFinal final;
  const absl::Status status = StreamGenerate(
      *stub, request,
      [&](const gemma::v1::GenerateResponse& response) {
        printed = true;
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
      },
      &final);
  if (!json && printed) std::cout << "\n";
  if (!status.ok()) return status;
  if (!json) PrintFinal(final);
  return absl::OkStatus();
}

absl::Status Chat() {
  const std::string address = CoordinatorAddress();
  auto channel = Connect(address);
  if (!channel.ok()) return channel.status();
  auto stub = gemma::v1::Inference::NewStub(*channel);
  const bool json = absl::GetFlag(FLAGS_json);
  const bool interactive = isatty(STDIN_FILENO) != 0;
  const bool echo = absl::GetFlag(FLAGS_echo) && !interactive;
  const std::string system = absl::GetFlag(FLAGS_system);
  std::vector<gemma::v1::ChatMessage> history;
  std::string line;
  while (true) {
    if (interactive) std::cout << "you> " << std::flush;
    if (!std::getline(std::cin, line)) {
      if (interactive) std::cout << "\n";
      break;
    }
    const std::string user(absl::StripAsciiWhitespace(line));
    if (user.empty()) continue;
    if (echo && !json) std::cout << "you> " << user << "\n" << std::flush;
    if (user == "/exit" || user == "/quit") break;
    if (user == "/reset") {
      history.clear();
      if ((interactive || echo) && !json) std::cout << "(conversation cleared)\n" << std::flush;
      continue;
    }
    gemma::v1::GenerateRequest request;
    gemma::v1::Chat* chat = request.mutable_chat();
    if (!system.empty()) {
      gemma::v1::ChatMessage* message = chat->add_messages();
      message->set_role("system");
      message->set_content(system);
    }
    for (const gemma::v1::ChatMessage& message : history) *chat->add_messages() = message;
    gemma::v1::ChatMessage* turn = chat->add_messages();
    turn->set_role("user");
    turn->set_content(user);
    SetSampling(&request);

    std::string reply;
    bool labelled = false;  // "model> " goes out with the first response
    gemma::v1::GenerateFinal final;
    const absl::Status status = StreamGenerate(
        *stub, request,
        [&](const gemma::v1::GenerateResponse& response) {
          reply += response.text();
          if (json) {
            std::cout << ToJson(response) << "\n" << std::flush;
            return;
          }
          if (!labelled) std::cout << "model> ";
          labelled = true;
          std::cout << response.text() << std::flush;
        },
        &final);
    if (!labelled && status.ok() && !json) std::cout << "model> ";  // an empty reply
    if (labelled || (status.ok() && !json)) std::cout << "\n" << std::flush;
    if (!status.ok()) return status;
    if (!json) PrintFinal(final);
    history.push_back(*turn);
    gemma::v1::ChatMessage answer;
    answer.set_role("model");
    answer.set_content(reply);
    history.push_back(std::move(answer));
  }
  return absl::OkStatus();
}

// A text table: columns padded to their widest cell, numbers right-aligned.
class Table {
 public:
  explicit Table(std::vector<std::string> header) : rows_{std::move(header)} {}
  void Add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  // `right[i]`: column i is right-aligned.
  std::string Render(const std::vector<bool>& right) const {
    std::vector<size_t> width;
    for (const std::vector<std::string>& row : rows_) {
      width.resize(std::max(width.size(), row.size()), 0);
      for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
    }
    std::string out;
    for (const std::vector<std::string>& row : rows_) {
      std::string line;
      for (size_t i = 0; i < row.size(); ++i) {
        const std::string pad(width[i] - row[i].size(), ' ');
        const bool align_right = i < right.size() && right[i];
        absl::StrAppend(&line, i == 0 ? "" : "  ", align_right ? pad : "", row[i],
                        align_right ? "" : pad);
      }
      absl::StrAppend(&out, absl::StripTrailingAsciiWhitespace(line), "\n");
    }
    return out;
  }

 private:
  std::vector<std::vector<std::string>> rows_;
};

std::string PoolUsage(const gemma::v1::KvPoolUsage& pool) {
  if (pool.pages_total() <= 0) return absl::StrCat(pool.pages_used(), "/-");
  return absl::StrFormat(
      "%d/%d %.0f%%", pool.pages_used(), pool.pages_total(),
      100.0 * static_cast<double>(pool.pages_used()) / static_cast<double>(pool.pages_total()));
}

std::string HeartbeatAge(int64_t ms) {
  if (ms < 0) return "-";
  if (ms < 10000) return absl::StrFormat("%.1fs", static_cast<double>(ms) / 1000.0);
  return absl::StrFormat("%ds", ms / 1000);
}

absl::Status Status() {
  const std::string address = CoordinatorAddress();
  auto channel = Connect(address);
  if (!channel.ok()) return channel.status();
  auto stub = gemma::v1::Cluster::NewStub(*channel);
  grpc::ClientContext context;
  gemma::AddBearer(context, Token());
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  gemma::v1::GetStatusResponse response;
  grpc::Status status = stub->GetStatus(&context, gemma::v1::GetStatusRequest(), &response);
  if (!status.ok()) return FromGrpc(status);
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(response) << "\n";
    return absl::OkStatus();
  }
  int healthy = 0;
  // One KV column per pool name, in the order the replicas report them.
  std::vector<std::string> pool_names;
  for (const gemma::v1::ReplicaStatus& replica : response.replicas()) {
    healthy += replica.healthy() ? 1 : 0;
    for (const gemma::v1::KvPoolUsage& pool : replica.kv_pools()) {
      if (std::find(pool_names.begin(), pool_names.end(), pool.name()) == pool_names.end()) {
        pool_names.push_back(pool.name());
      }
    }
  }
  std::cout << absl::StrFormat(
      "coordinator %s  protocol %d  model %s\n", address, response.protocol_version(),
      response.model_fingerprint().empty() ? "-" : response.model_fingerprint());
  std::cout << absl::StrFormat(
      "replicas %d (%d healthy)  requests in flight %d  queued %d  re-queued %d  admission limit "
      "%s per replica\n",
      response.replicas_size(), healthy, response.requests_in_flight(),
      response.requests_queued(), response.requests_requeued(),
      response.max_outstanding_per_replica() > 0
          ? absl::StrCat(response.max_outstanding_per_replica())
          : std::string("-"));
  for (const gemma::v1::ServedModel& m : response.models()) {
    std::cout << absl::StrFormat("model %s: %d replica%s", m.name(), m.replicas(),
                                 m.replicas() == 1 ? "" : "s");
    if (!m.path().empty()) {
      std::cout << absl::StrFormat(" (wants %d..%d; %s; %s)", m.min_replicas(), m.max_replicas(),
                                   m.layout(), m.path());
    }
    std::cout << "\n";
  }
  for (const gemma::v1::FreeWorker& w : response.free_workers()) {
    std::cout << absl::StrFormat("free worker %s on %s: %d %s rank%s, %.1f GiB, waiting for a "
                                 "model\n",
                                 w.worker_id(), w.host().empty() ? "-" : w.host(), w.ranks(),
                                 w.backend(), w.ranks() == 1 ? "" : "s",
                                 static_cast<double>(w.memory_bytes()) / (1 << 30));
  }
  if (response.replicas_size() == 0) {
    std::cout << "no replica has registered\n";
    return absl::OkStatus();
  }
  std::vector<std::string> header = {"ID",       "NAME",  "ADDRESS",  "MODEL",      "HEALTH",
                                     "PARALLEL", "WORLD", "RUN/WAIT", "OUTSTANDING"};
  std::vector<bool> right = {false, false, false, false, false, false, true, true, true};
  for (const std::string& name : pool_names) {
    header.push_back(absl::StrCat("KV ", name));
    right.push_back(true);
  }
  for (const char* name : {"PREEMPTIONS", "HEARTBEAT"}) {
    header.push_back(name);
    right.push_back(true);
  }
  Table table(header);
  for (const gemma::v1::ReplicaStatus& replica : response.replicas()) {
    std::vector<std::string> row = {
        replica.id(),
        replica.name().empty() ? "-" : replica.name(),
        replica.address(),
        replica.model().empty() ? "-" : replica.model(),
        !replica.healthy() ? "UNHEALTHY" : replica.draining() ? "draining" : "healthy",
        replica.parallel().empty() ? "-" : replica.parallel(),
        replica.world_size() > 0 ? absl::StrCat(replica.world_size()) : "-",
        absl::StrCat(replica.running(), "/", replica.waiting()),
        absl::StrCat(replica.outstanding())};
    for (const std::string& name : pool_names) {
      std::string cell = "-";
      for (const gemma::v1::KvPoolUsage& pool : replica.kv_pools()) {
        if (pool.name() == name) cell = PoolUsage(pool);
      }
      row.push_back(cell);
    }
    row.push_back(absl::StrFormat("%d (%.1f/s)", replica.preemptions(), replica.preemptions_per_s()));
    row.push_back(HeartbeatAge(replica.ms_since_heartbeat()));
    table.Add(std::move(row));
  }
  std::cout << table.Render(right);
  return absl::OkStatus();
}

// One cell per expert, darker for more load relative to the layer's busiest expert.
constexpr const char* kRamp[] = {" ", "\u2591", "\u2592", "\u2593", "\u2588"};

// A replica's placement in a few lines: epoch, slots, the experts with the most copies, and
// its last switch with the balancedness before, predicted and measured.
std::string RenderPlacement(const std::string& replica_id, const gemma::v1::ReplicaExpertLoad& r) {
  const gemma::v1::ExpertPlacement& p = r.placement();
  if (p.num_ranks() <= 1) return "";
  std::vector<int> most(p.num_experts(), 0);  // per expert, its most copies in any layer
  for (int l = 0; l < p.num_layers(); ++l) {
    std::vector<int> copies(p.num_experts(), 0);
    for (int i = 0; i < p.num_ranks() * p.slots_per_rank(); ++i) {
      const int32_t e = p.slots(l * p.num_ranks() * p.slots_per_rank() + i);
      if (e >= 0 && e < p.num_experts()) ++copies[e];
    }
    for (int e = 0; e < p.num_experts(); ++e) most[e] = std::max(most[e], copies[e]);
  }
  std::vector<int> copied;
  for (int e = 0; e < p.num_experts(); ++e) {
    if (most[e] > 1) copied.push_back(e);
  }
  std::stable_sort(copied.begin(), copied.end(), [&](int a, int b) { return most[a] > most[b]; });
  std::vector<std::string> shown;
  for (size_t i = 0; i < copied.size() && i < 8; ++i) {
    shown.push_back(absl::StrFormat("#%d x%d", copied[i], most[copied[i]]));
  }
  std::string out = absl::StrFormat(
      "replica %s: placement epoch %d, %d ranks x %d slots (%d redundant)%s%s\n", replica_id,
      p.epoch(), p.num_ranks(), p.slots_per_rank(),
      p.num_ranks() * p.slots_per_rank() - p.num_experts(),
      shown.empty() ? "" : "; most copies: ", absl::StrJoin(shown, ", "));
  if (r.switches_size() > 0) {
    const gemma::v1::RebalanceRecord& s = r.switches(r.switches_size() - 1);
    out += absl::StrFormat(
        "  last switch: epoch %d (%s, %s): rank balance %.3f before, %.3f predicted, %s\n",
        s.epoch(), s.reason(), s.state(), s.balancedness_before(), s.balancedness_predicted(),
        s.balancedness_measured() >= 0 ? absl::StrFormat("%.3f measured", s.balancedness_measured())
                                       : std::string("not measured yet"));
  }
  return out;
}

// The heatmap of `load` and each layer's balancedness (mean / max tokens per expert: 1 is
// perfectly even) and busiest expert's share of the layer's routed tokens.
// `colour`: each level of the ramp also in its colour (blue, green, yellow, red), for terminals.
// `placement` (a replica's, may be null): per-rank load follows its slots, each expert's
// tokens split evenly over its copies; without one, ranks own contiguous blocks.
std::string RenderExpertLoad(const gemma::v1::ExpertLoad& load, bool colour,
                             const gemma::v1::ExpertPlacement* placement = nullptr) {
  const int layers = load.num_layers(), experts = load.num_experts();
  if (layers == 0 || experts == 0 ||
      load.counts_size() != static_cast<int64_t>(layers) * experts) {
    return "no expert load reported yet (a model without experts, or no request has run)\n";
  }
  std::string out = absl::StrFormat(
      "expert load: %d layers x %d experts, steps %d..%d, %d windows; each row is a layer, each "
      "cell an expert: ' ' none, \u2591 \u2592 \u2593 \u2588 up to the layer's busiest\n",
      layers, experts, load.first_step(), load.last_step(), load.windows());
  int64_t all = 0, all_max_sum = 0;
  for (int l = 0; l < layers; ++l) {
    int64_t total = 0, max = 0;
    int busiest = 0;
    for (int e = 0; e < experts; ++e) {
      const int64_t c = load.counts(l * experts + e);
      total += c;
      if (c > max) {
        max = c;
        busiest = e;
      }
    }
    std::string row;
    for (int e = 0; e < experts; ++e) {
      const int64_t c = load.counts(l * experts + e);
      const int level = c == 0 || max == 0 ? 0 : static_cast<int>(1 + (3 * c) / max);
      static constexpr const char* kColours[] = {"", "\x1b[34m", "\x1b[32m", "\x1b[33m",
                                                 "\x1b[31m"};
      const int shade = std::min(level, 4);
      if (colour && shade > 0) {
        row += absl::StrCat(kColours[shade], kRamp[shade], "\x1b[0m");
      } else {
        row += kRamp[shade];
      }
    }
    const double mean = static_cast<double>(total) / experts;
    out += absl::StrFormat("%3d |%s| balance %.2f, busiest #%d %.1f%%\n", l, row,
                           max > 0 ? mean / max : 1.0, busiest,
                           total > 0 ? 100.0 * max / total : 0.0);
    all += total;
    all_max_sum += max;
  }
  // Ranks: the busiest rank sets the pace of every expert all-to-all.
  absl::StatusOr<gemma::eplb::Placement> placed = absl::NotFoundError("none");
  if (placement != nullptr && placement->num_ranks() > 1 &&
      placement->num_layers() == layers && placement->num_experts() == experts) {
    placed = gemma::PlacementFromProto(*placement);
  }
  if (placed.ok()) {
    const int ranks = placed->num_ranks;
    std::vector<double> rank_tokens(ranks, 0);
    double balance_sum = 0;
    std::vector<int64_t> counts(load.counts().begin(), load.counts().end());
    for (int l = 0; l < layers; ++l) {
      const std::vector<double> per_rank = gemma::eplb::RankLoads(
          *placed, l, std::span<const int64_t>(counts).subspan(l * experts, experts));
      double max = 0, total = 0;
      for (int r = 0; r < ranks; ++r) {
        rank_tokens[r] += per_rank[r];
        max = std::max(max, per_rank[r]);
        total += per_rank[r];
      }
      balance_sum += max > 0 ? total / ranks / max : 1.0;
    }
    const double busiest = *std::max_element(rank_tokens.begin(), rank_tokens.end());
    out += absl::StrFormat(
        "ranks (%d slots each, placement epoch %d; an expert's tokens split over its copies), "
        "tokens over all layers:\n",
        placed->slots_per_rank, placed->epoch);
    for (int r = 0; r < ranks; ++r) {
      const int width = busiest > 0 ? static_cast<int>(40 * rank_tokens[r] / busiest) : 0;
      out += absl::StrFormat("  rank %2d %s %.0f\n", r, std::string(width, '#'), rank_tokens[r]);
    }
    out += absl::StrFormat("rank balance %.2f (mean over layers of mean / max tokens per rank)\n",
                           balance_sum / layers);
  }
  const int ranks = load.expert_ranks();
  if (!placed.ok() && ranks > 1 && experts % ranks == 0) {
    const int per_rank = experts / ranks;
    std::vector<int64_t> rank_tokens(ranks, 0);
    double balance_sum = 0;
    for (int l = 0; l < layers; ++l) {
      int64_t max = 0, total = 0;
      for (int r = 0; r < ranks; ++r) {
        int64_t sum = 0;
        for (int e = r * per_rank; e < (r + 1) * per_rank; ++e) sum += load.counts(l * experts + e);
        rank_tokens[r] += sum;
        max = std::max(max, sum);
        total += sum;
      }
      balance_sum += max > 0 ? static_cast<double>(total) / ranks / max : 1.0;
    }
    const int64_t busiest = *std::max_element(rank_tokens.begin(), rank_tokens.end());
    out += absl::StrFormat("ranks (%d experts each), tokens over all layers:\n", per_rank);
    for (int r = 0; r < ranks; ++r) {
      const int width = busiest > 0 ? static_cast<int>(40 * rank_tokens[r] / busiest) : 0;
      out += absl::StrFormat("  rank %2d %s %d\n", r, std::string(width, '#'), rank_tokens[r]);
    }
    out += absl::StrFormat("rank balance %.2f (mean over layers of mean / max tokens per rank)\n",
                           balance_sum / layers);
  }
  if (load.recomputed_tokens() > 0) {
    out += absl::StrFormat("%d tokens recomputed after preemptions (counted above)\n",
                           load.recomputed_tokens());
  }
  const double mean_of_max = static_cast<double>(all_max_sum) / layers;
  out += absl::StrFormat("overall balance %.2f (mean over layers of mean / max), %d routed\n",
                         mean_of_max > 0 ? (static_cast<double>(all) / layers / experts) /
                                               mean_of_max
                                         : 1.0,
                         all);
  return out;
}

// experts --record FILE: appends every window as it arrives (Cluster.WatchExpertLoad), one
// ExpertLoadWindow JSON object a line, flushed each time, until interrupted.
absl::Status RecordExpertLoad(gemma::v1::Cluster::Stub& stub, const std::string& path,
                              const std::string& replica) {
  std::ofstream out(path, std::ios::app);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot append to ", path));
  grpc::ClientContext context;
  gemma::AddBearer(context, Token());
  gemma::v1::WatchExpertLoadRequest request;
  request.set_replica_id(replica);
  request.set_model(absl::GetFlag(FLAGS_model));
  auto reader = stub.WatchExpertLoad(&context, request);
  std::cerr << "recording expert-load windows to " << path << " (Ctrl-C to stop)\n";
  gemma::v1::ExpertLoadWindow window;
  int64_t n = 0;
  while (reader->Read(&window)) {
    out << ToJson(window) << "\n" << std::flush;
    if (!out) return absl::DataLossError(absl::StrCat("cannot write ", path));
    ++n;
    std::cerr << absl::StrFormat("\rwindows recorded: %d (replica %s, steps %d..%d)", n,
                                 window.replica_id(), window.window().first_step(),
                                 window.window().last_step())
              << std::flush;
  }
  std::cerr << "\n";
  return FromGrpc(reader->Finish(), "watching the expert load");
}

absl::Status Experts() {
  if (absl::GetFlag(FLAGS_interval_ms) <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--interval-ms must be positive, got ",
                                                   absl::GetFlag(FLAGS_interval_ms)));
  }
  const std::string address = CoordinatorAddress();
  auto channel = Connect(address);
  if (!channel.ok()) return channel.status();
  auto stub = gemma::v1::Cluster::NewStub(*channel);
  const std::string replica = absl::GetFlag(FLAGS_replica);
  if (const std::string record = absl::GetFlag(FLAGS_record); !record.empty()) {
    return RecordExpertLoad(*stub, record, replica);
  }
  while (true) {
    grpc::ClientContext context;
    gemma::AddBearer(context, Token());
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    gemma::v1::GetExpertLoadResponse response;
    gemma::v1::GetExpertLoadRequest request;
    request.set_model(absl::GetFlag(FLAGS_model));
    grpc::Status status = stub->GetExpertLoad(&context, request, &response);
    if (!status.ok()) return FromGrpc(status);
    const gemma::v1::ExpertLoad* load = &response.totals();
    const gemma::v1::ReplicaExpertLoad* chosen = nullptr;
    if (!replica.empty()) {
      load = nullptr;
      for (const gemma::v1::ReplicaExpertLoad& r : response.replicas()) {
        if (r.replica_id() == replica) {
          load = &r.totals();
          chosen = &r;
        }
      }
      if (load == nullptr) {
        std::vector<std::string> ids;
        for (const auto& r : response.replicas()) ids.push_back(r.replica_id());
        return absl::NotFoundError(absl::StrCat("no replica \"", replica, "\"; known: ",
                                                ids.empty() ? "none" : absl::StrJoin(ids, ", ")));
      }
    }
    if (absl::GetFlag(FLAGS_json)) {
      std::cout << (replica.empty() ? ToJson(response) : ToJson(*load)) << "\n" << std::flush;
    } else {
      // In place on a terminal: home the cursor and clear the screen first.
      if (absl::GetFlag(FLAGS_watch)) std::cout << "\x1b[H\x1b[2J";
      std::string placements;
      for (const gemma::v1::ReplicaExpertLoad& r : response.replicas()) {
        if (chosen == nullptr || &r == chosen) placements += RenderPlacement(r.replica_id(), r);
      }
      if (!response.model().empty()) std::cout << "model " << response.model() << ": ";
      std::cout << RenderExpertLoad(*load, isatty(STDOUT_FILENO),
                                    chosen != nullptr ? &chosen->placement() : nullptr)
                << placements << std::flush;
    }
    if (!absl::GetFlag(FLAGS_watch)) return absl::OkStatus();
    std::this_thread::sleep_for(std::chrono::milliseconds(absl::GetFlag(FLAGS_interval_ms)));
  }
}

// drain REPLICA: Cluster.Drain; prints the entries now draining.
absl::Status Drain(const std::string& replica) {
  auto channel = Connect(CoordinatorAddress());
  if (!channel.ok()) return channel.status();
  auto stub = gemma::v1::Cluster::NewStub(*channel);
  gemma::v1::DrainRequest request;
  request.set_replica_id(replica);
  gemma::v1::DrainResponse response;
  grpc::ClientContext context;
  gemma::AddBearer(context, Token());
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::Status status = stub->Drain(&context, request, &response);
  if (!status.ok()) return FromGrpc(status, "draining");
  std::cout << absl::StrFormat(
      "draining %s: no new requests; each leaves once its requests are done (its worker's "
      "--drain-grace-s at most)\n",
      absl::StrJoin(response.replica_ids(), ", "));
  return absl::OkStatus();
}

// rebalance [--replica ID] [--dry-run] [--wait]: Cluster.Rebalance, one line per replica; with
// --wait, polls until each replica offered a placement runs it (or it is abandoned).
absl::Status Rebalance() {
  auto channel = Connect(CoordinatorAddress());
  if (!channel.ok()) return channel.status();
  auto stub = gemma::v1::Cluster::NewStub(*channel);
  gemma::v1::RebalanceRequest request;
  request.set_replica_id(absl::GetFlag(FLAGS_replica));
  request.set_dry_run(absl::GetFlag(FLAGS_dry_run));
  gemma::v1::RebalanceResponse response;
  {
    grpc::ClientContext context;
    gemma::AddBearer(context, Token());
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Status status = stub->Rebalance(&context, request, &response);
    if (!status.ok()) return FromGrpc(status, "rebalancing");
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(response) << "\n";
  } else if (response.replicas_size() == 0) {
    std::cout << "no replica has its experts spread over several ranks: nothing to balance\n";
  }
  std::map<std::string, uint64_t> waiting;
  for (const gemma::v1::ReplicaRebalance& r : response.replicas()) {
    if (absl::GetFlag(FLAGS_json)) {
      if (r.has_plan()) waiting[r.replica_id()] = r.plan().epoch();
      continue;
    }
    if (!r.has_plan()) {
      std::cout << absl::StrFormat("%s: unchanged: %s\n", r.replica_id(), r.skipped());
      continue;
    }
    std::cout << absl::StrFormat(
        "%s: placement epoch %d %s: rank balance %.3f -> %.3f predicted on its recent load, "
        "%d slots to load\n",
        r.replica_id(), r.plan().epoch(),
        request.dry_run() ? "planned (dry run, not offered)" : "offered", r.plan().balancedness_before(),
        r.plan().balancedness_predicted(), r.plan().slots_moved());
    if (!request.dry_run()) waiting[r.replica_id()] = r.plan().epoch();
  }
  if (!absl::GetFlag(FLAGS_wait) || request.dry_run() || waiting.empty()) return absl::OkStatus();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(150);
  while (!waiting.empty()) {
    if (std::chrono::steady_clock::now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "replicas ", absl::StrJoin(waiting, ", ", absl::PairFormatter("@epoch ")),
          " did not switch within 150 s; see the coordinator's log"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    grpc::ClientContext context;
    gemma::AddBearer(context, Token());
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    gemma::v1::GetExpertLoadResponse load;
    grpc::Status status = stub->GetExpertLoad(&context, {}, &load);
    if (!status.ok()) return FromGrpc(status, "waiting for the switch");
    for (const gemma::v1::ReplicaExpertLoad& r : load.replicas()) {
      auto it = waiting.find(r.replica_id());
      if (it == waiting.end()) continue;
      for (const gemma::v1::RebalanceRecord& s : r.switches()) {
        if (s.epoch() != it->second) continue;
        if (s.state() == "abandoned") {
          return absl::AbortedError(absl::StrCat(r.replica_id(), ": placement epoch ", s.epoch(),
                                                 " was abandoned (a rank could not load it, or a "
                                                 "newer one replaced it); see the logs"));
        }
      }
      if (r.placement().epoch() >= it->second) {
        if (!absl::GetFlag(FLAGS_json)) {
          std::cout << absl::StrFormat("%s: switched to placement epoch %d\n", r.replica_id(),
                                       r.placement().epoch());
        }
        waiting.erase(it);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // gRPC's own log lines ("E1206 ... SSL_ERROR_SSL ...") would come before gemmactl's one-line
  // error that says the same in words; GRPC_VERBOSITY set by the user keeps them.
  if (std::getenv("GRPC_VERBOSITY") == nullptr) gpr_set_log_function([](gpr_log_func_args*) {});
  // -o is --output, as users of other tools expect (Abseil has no short flags).
  static char kOutputFlag[] = "--output";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--") == 0) break;
    if (std::strcmp(argv[i], "-o") == 0) argv[i] = kOutputFlag;
  }
  if (const CommandHelp* command = HelpedCommand(argc, argv); command != nullptr) {
    PrintCommandHelp(*command);
    return 0;
  }
  std::vector<char*> args = gemma::ParseFlags(argc, argv);
  if (args.size() == 2 && std::strcmp(args[1], "help") == 0) {
    std::cout << "gemmactl: " << kUsage << "\n";
    return 0;
  }
  absl::Status status;
  const std::string command = args.size() >= 2 ? args[1] : "";
  if (command == "generate") {
    status = Generate(args);
  } else if (command == "chat" && args.size() == 2) {
    status = Chat();
  } else if (command == "status" && args.size() == 2) {
    status = Status();
  } else if (command == "experts" && args.size() == 2) {
    status = Experts();
  } else if (command == "rebalance" && args.size() == 2) {
    status = Rebalance();
  } else if (command == "drain" && args.size() == 3) {
    status = Drain(args[2]);
  } else if (command == "batch") {
    const std::vector<std::string> batch_args(args.begin() + 2, args.end());
    if (const absl::Status usage = gemma::client::CheckBatchArgs(batch_args); !usage.ok()) {
      std::cerr << "gemmactl: " << usage.message() << "\n";  // the usage keeps its lines
      return 2;
    }
    auto channel = Connect(CoordinatorAddress());
    if (channel.ok()) {
      gemma::client::BatchFlags flags;
      flags.wait = absl::GetFlag(FLAGS_wait);
      flags.json = absl::GetFlag(FLAGS_json);
      flags.output = absl::GetFlag(FLAGS_output);
      flags.errors = absl::GetFlag(FLAGS_errors);
      flags.model_name = absl::GetFlag(FLAGS_model_name);
      flags.token = Token();
      status = gemma::client::BatchCommand(batch_args, *channel, flags);
    } else {
      status = channel.status();
    }
  } else {
    bool known = false;
    for (const CommandHelp& c : CommandHelps()) known = known || command == c.name;
    if (command.empty()) {
      std::cerr << "gemmactl: no command given\n";
    } else if (command == "help" && args.size() >= 3) {
      std::cerr << "gemmactl: no command \"" << args[2] << "\" to help with\n";
    } else if (!known) {
      std::cerr << "gemmactl: unknown command \"" << command << "\"\n";
    } else {
      std::cerr << "gemmactl: wrong arguments for " << command << " (gemmactl " << command
                << " --help)\n";
    }
    std::cerr << "gemmactl: " << kUsage << "\n";
    return 2;
  }
  if (!status.ok()) {
    // One line, whatever the server wrote.
    std::string message(status.message());
    std::replace(message.begin(), message.end(), '\n', ' ');
    std::cerr << "gemmactl: " << absl::StatusCodeToString(status.code()) << ": " << message << "\n";
    return 1;
  }
  return 0;
}
