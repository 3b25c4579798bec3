#include "client/batch_commands.h"
#include "client/proto_json.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "coordinator/openai_format.h"
#include "gemma/v1/batches.grpc.pb.h"
#include "google/protobuf/util/json_util.h"
#include "common/status_macros.h"
#include "proto/bearer.h"
#include "proto/status_convert.h"

namespace gemma::client {
namespace {

using gemma::FromGrpc;
using gemma::v1::Batch;

constexpr char kBatchUsage[] =
    "gemmactl batch submit FILE.jsonl [--wait]   an OpenAI batch input file\n"
    "gemmactl batch status ID | list | cancel ID [--json]\n"
    "gemmactl batch results ID [--output|-o OUT.jsonl] [--errors ERR.jsonl] [--wait]";


std::string Clock(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  return s >= 3600 ? absl::StrFormat("%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60)
                   : absl::StrFormat("%d:%02d", s / 60, s % 60);
}

// One line per batch, then the items refused at submission; with `detail`, also where the
// errors of items that failed while running are (they are results, not part of the batch).
void PrintBatch(const Batch& b, bool json, bool detail = false) {
  if (json) {
    std::cout << ToJson(b) << "\n";
    return;
  }
  std::cout << absl::StrFormat("%s  %s  %d/%d done, %d failed, %d prompt + %d generated tokens\n",
                               b.id(), b.status(), b.counts().completed() + b.counts().failed(),
                               b.counts().total(), b.counts().failed(), b.prompt_tokens(),
                               b.completion_tokens());
  // A list shows a few refusals a batch; status (detail) up to the 100 the batch keeps.
  const int shown = std::min(b.errors_size(), detail ? b.errors_size() : 5);
  for (int i = 0; i < shown; ++i) {
    const auto& e = b.errors(i);
    std::cout << absl::StrFormat("  line %d (%s): %s: %s\n", e.line(), e.custom_id(), e.code(),
                                 e.message());
  }
  const int64_t refused = std::max<int64_t>(b.refused(), b.errors_size());
  if (refused > shown) {
    std::cout << absl::StrFormat(
        "  ... and %d more refused line%s; each one's error: gemmactl batch results %s "
        "--errors ERRORS.jsonl\n",
        refused - shown, refused - shown == 1 ? "" : "s", b.id());
  }
  const int64_t ran_and_failed = b.counts().failed() - refused;
  if (detail && ran_and_failed > 0) {
    std::cout << absl::StrFormat(
        "  %d item%s failed while running; each one's error: gemmactl batch results %s "
        "--errors ERRORS.jsonl\n",
        ran_and_failed, ran_and_failed == 1 ? "" : "s", b.id());
  }
}

absl::StatusOr<Batch> Get(gemma::v1::Batches::Stub& stub, const std::string& id,
                          const std::string& token) {
  grpc::ClientContext context;
  gemma::AddBearer(context, token);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  gemma::v1::GetBatchRequest request;
  request.set_id(id);
  Batch batch;
  RETURN_IF_ERROR(FromGrpc(stub.GetBatch(&context, request, &batch)));
  return batch;
}

// A live progress line on stderr until the batch ends: done/total, failed, tokens/s, ETA.
absl::StatusOr<Batch> Wait(gemma::v1::Batches::Stub& stub, const std::string& id,
                           const BatchFlags& flags) {
  const bool tty = isatty(STDERR_FILENO);
  const auto start = std::chrono::steady_clock::now();
  int64_t first_tokens = -1;
  // The batch lives on the coordinator: one that restarts (or a network blip) is waited out
  // for up to two minutes, saying so, before giving up with the way back to the batch.
  constexpr auto kOutage = std::chrono::minutes(2);
  std::optional<std::chrono::steady_clock::time_point> unreachable_since;
  while (true) {
    auto batch = Get(stub, id, flags.token);
    // Refused connections are UNAVAILABLE; a Service whose pod is restarting may instead let
    // the call hang until its deadline.
    if (!batch.ok() && (batch.status().code() == absl::StatusCode::kUnavailable ||
                        batch.status().code() == absl::StatusCode::kDeadlineExceeded)) {
      const auto now = std::chrono::steady_clock::now();
      if (!unreachable_since) {
        unreachable_since = now;
        std::cerr << (tty ? "\n" : "") << "the coordinator does not answer ("
                  << batch.status().message() << "); batch " << id
                  << " runs on there: waiting for it to come back\n";
      }
      if (now - *unreachable_since < kOutage) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        continue;
      }
    }
    if (!batch.ok()) {
      return absl::Status(batch.status().code(),
                          absl::StrCat(batch.status().message(), " (batch ", id,
                                       " may still be running: gemmactl batch status ", id, ")"));
    }
    if (unreachable_since) {
      std::cerr << "the coordinator answers again\n";
      unreachable_since.reset();
    }
    const auto& c = batch->counts();
    const int64_t done = c.completed() + c.failed();
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (first_tokens < 0) first_tokens = batch->completion_tokens();
    const double rate = elapsed > 0 ? (batch->completion_tokens() - first_tokens) / elapsed : 0;
    constexpr int kWidth = 30;
    const int filled = c.total() > 0 ? static_cast<int>(kWidth * done / c.total()) : 0;
    std::string eta = "--:--";
    if (done > 0 && done < c.total()) eta = Clock(elapsed * (c.total() - done) / done);
    if (done == c.total()) eta = Clock(0);
    const std::string line = absl::StrFormat(
        "[%s%s] %d/%d done, %d failed, %.1f tokens/s, ETA %s  %s", std::string(filled, '#'),
        std::string(kWidth - filled, '.'), done, c.total(), c.failed(), rate, eta,
        batch->status());
    std::cerr << (tty ? "\r" : "") << line << (tty ? "" : "\n") << std::flush;
    if (coordinator::BatchFinal(batch->status())) {
      if (tty) std::cerr << "\n";
      return batch;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(flags.poll_ms));
  }
}

absl::Status Submit(gemma::v1::Batches::Stub& stub, const std::string& path,
                    const BatchFlags& flags) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is a directory; give an OpenAI batch input file (.jsonl)"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read ", path, ": ",
                                            std::filesystem::exists(path, error)
                                                ? "permission denied?"
                                                : "no such file"));
  }
  grpc::ClientContext context;
  gemma::AddBearer(context, flags.token);
  Batch batch;
  auto writer = stub.CreateBatch(&context, &batch);
  std::string text;
  int64_t line = 0, items = 0;
  while (std::getline(in, text)) {
    ++line;
    if (absl::StripAsciiWhitespace(text).empty()) continue;
    gemma::v1::CreateBatchRequest part;
    part.mutable_item()->set_openai_line(text);
    part.mutable_item()->set_line(line);
    if (!writer->Write(part)) break;  // the coordinator refused: Finish says why
    ++items;
  }
  writer->WritesDone();
  RETURN_IF_ERROR(FromGrpc(writer->Finish(), absl::StrCat("submitting ", path)));
  std::cerr << absl::StrFormat("batch %s: %d items from %s (%d refused)\n", batch.id(), items,
                               path, std::max<int64_t>(batch.refused(), batch.errors_size()));
  if (!flags.wait) {
    PrintBatch(batch, flags.json);
    return absl::OkStatus();
  }
  auto final = Wait(stub, batch.id(), flags);
  if (!final.ok()) return final.status();
  PrintBatch(*final, flags.json);
  if (final->status() != "completed") {
    return absl::AbortedError(absl::StrCat("batch ", final->id(), " ended ", final->status()));
  }
  return absl::OkStatus();
}

// Writes to `path` through a temporary file renamed at the end, so an interrupted run never
// leaves a partial file under the final name ("" or "-": stdout).
class Output {
 public:
  explicit Output(std::string path) : path_(std::move(path)) {
    if (!path_.empty() && path_ != "-") {
      temp_ = path_ + ".partial";
      errno = 0;
      file_.open(temp_, std::ios::binary | std::ios::trunc);
      if (!file_.good()) error_ = errno;
    }
  }
  // OK, or why the file cannot be written (naming it).
  absl::Status status() const {
    if (temp_.empty() || file_.good()) return absl::OkStatus();
    const std::string why = absl::StrCat("cannot write ", temp_, " (for ", path_, "): ",
                                         error_ != 0 ? std::strerror(error_) : "open failed");
    if (error_ == EACCES || error_ == EPERM || error_ == EROFS) {
      return absl::PermissionDeniedError(why);
    }
    return absl::FailedPreconditionError(why);
  }
  std::ostream& stream() { return temp_.empty() ? std::cout : file_; }
  // A run that fails leaves no temporary file (the results stay on the coordinator).
  ~Output() {
    if (temp_.empty() || closed_) return;
    file_.close();
    std::error_code ignored;
    std::filesystem::remove(temp_, ignored);
  }
  absl::Status Close() {
    if (temp_.empty()) return absl::OkStatus();
    file_.close();
    if (!file_) return absl::DataLossError(absl::StrCat("cannot write ", temp_));
    std::error_code error;
    std::filesystem::rename(temp_, path_, error);
    if (error) return absl::DataLossError(absl::StrCat("cannot rename ", temp_, ": ", error.message()));
    closed_ = true;  // renamed: nothing for the destructor to remove
    return absl::OkStatus();
  }

 private:
  std::string path_, temp_;
  std::ofstream file_;
  int error_ = 0;
  bool closed_ = false;
};

absl::Status Results(gemma::v1::Batches::Stub& stub, const std::string& id,
                     const BatchFlags& flags) {
  ASSIGN_OR_RETURN(Batch batch, Get(stub, id, flags.token));
  if (!coordinator::BatchFinal(batch.status())) {
    const std::string progress =
        absl::StrFormat("batch %s is %s (%d/%d done)", id, batch.status(),
                        batch.counts().completed() + batch.counts().failed(),
                        batch.counts().total());
    if (!flags.wait) {
      return absl::FailedPreconditionError(absl::StrCat(
          progress, ": its results are whole once it ends. gemmactl batch results ", id,
          " --wait writes them as items finish until then; gemmactl batch status ", id,
          " shows its progress"));
    }
    std::cerr << progress << ": writing results as items finish, until it ends\n";
  }
  const bool to_stdout = flags.output.empty() || flags.output == "-";
  std::string errors_path = flags.errors;
  if (errors_path.empty()) {
    errors_path = to_stdout ? "-" : absl::StrCat(flags.output, ".errors.jsonl");
  }
  Output out(flags.output), errors(errors_path);
  RETURN_IF_ERROR(out.status());
  RETURN_IF_ERROR(errors.status());
  int64_t ok = 0, failed = 0;
  // Results are numbered in the order they finished, so a stream cut by a coordinator restart
  // resumes after the last one written (waited out for up to two minutes, as submit --wait).
  std::optional<std::chrono::steady_clock::time_point> unreachable_since;
  while (true) {
    grpc::ClientContext context;
    gemma::AddBearer(context, flags.token);
    gemma::v1::StreamResultsRequest request;
    request.set_id(id);
    request.set_offset(ok + failed);
    auto reader = stub.StreamResults(&context, request);
    gemma::v1::BatchResult result;
    bool progressed = false;
    while (reader->Read(&result)) {
      const bool error = result.error_code() != 0;
      (error ? errors : out).stream()
          << coordinator::Dump(coordinator::BatchOutputLine(result, id, flags.model_name,
                                                            batch.created_at()))
          << "\n";
      ++(error ? failed : ok);
      progressed = true;
    }
    const grpc::Status finished = reader->Finish();
    if (finished.ok()) break;
    const bool outage = finished.error_code() == grpc::StatusCode::UNAVAILABLE ||
                        finished.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
                        finished.error_code() == grpc::StatusCode::CANCELLED;  // its shutdown
    if (!outage || !flags.wait) {
      return FromGrpc(finished, absl::StrCat("reading the results of ", id));
    }
    const auto now = std::chrono::steady_clock::now();
    if (progressed || !unreachable_since) {
      if (!unreachable_since) {
        std::cerr << "the coordinator does not answer (" << finished.error_message()
                  << "); resuming after result " << ok + failed << " when it is back\n";
      }
      unreachable_since = now;
    } else if (now - *unreachable_since > std::chrono::minutes(2)) {
      return FromGrpc(finished, absl::StrCat("reading the results of ", id, " (", ok + failed,
                                             " written; batch ", id, " may still be running)"));
    }
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  RETURN_IF_ERROR(out.Close());
  RETURN_IF_ERROR(errors.Close());
  std::cerr << absl::StrFormat("%d results%s, %d errors%s\n", ok,
                               to_stdout ? "" : absl::StrCat(" in ", flags.output), failed,
                               errors_path == "-" ? "" : absl::StrCat(" in ", errors_path));
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckBatchArgs(const std::vector<std::string>& args) {
  const std::string verb = args.empty() ? "" : args[0];
  const size_t want = verb == "list" ? 1 : 2;
  const bool known = verb == "submit" || verb == "status" || verb == "results" ||
                     verb == "cancel" || verb == "list";
  if (known && args.size() == want) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      verb.empty() ? "gemmactl batch needs a subcommand"
      : known      ? absl::StrCat("gemmactl batch ", verb, " takes ",
                                  verb == "list" ? "no argument" : "one argument")
                   : absl::StrCat("unknown batch subcommand '", verb, "'"),
      "; usage:\n", kBatchUsage));
}

absl::Status BatchCommand(const std::vector<std::string>& args,
                          const std::shared_ptr<grpc::Channel>& channel, const BatchFlags& flags) {
  auto stub = gemma::v1::Batches::NewStub(channel);
  const std::string verb = args.empty() ? "" : args[0];
  if (verb == "submit" && args.size() == 2) return Submit(*stub, args[1], flags);
  if (verb == "status" && args.size() == 2) {
    ASSIGN_OR_RETURN(Batch batch, Get(*stub, args[1], flags.token));
    PrintBatch(batch, flags.json, /*detail=*/true);
    return absl::OkStatus();
  }
  if (verb == "results" && args.size() == 2) return Results(*stub, args[1], flags);
  if (verb == "cancel" && args.size() == 2) {
    // What it was before says whether this cancel stopped it: a running batch with nothing in
    // flight goes straight to "cancelled", which is no sign that it had ended.
    ASSIGN_OR_RETURN(const Batch before, Get(*stub, args[1], flags.token));
    grpc::ClientContext context;
    gemma::AddBearer(context, flags.token);
    gemma::v1::CancelBatchRequest request;
    request.set_id(args[1]);
    Batch batch;
    RETURN_IF_ERROR(FromGrpc(stub->CancelBatch(&context, request, &batch)));
    if (coordinator::BatchFinal(before.status())) {
      std::cerr << "batch " << batch.id() << " had already ended (" << before.status()
                << "): nothing to cancel\n";
    } else {
      std::cerr << "batch " << batch.id() << " " << batch.status()
                << ": no new items start; results already in stay readable\n";
    }
    PrintBatch(batch, flags.json);
    return absl::OkStatus();
  }
  if (verb == "list" && args.size() == 1) {
    std::string token;
    do {
      grpc::ClientContext context;
      gemma::AddBearer(context, flags.token);
      gemma::v1::ListBatchesRequest request;
      request.set_page_size(100);
      request.set_page_token(token);
      gemma::v1::ListBatchesResponse page;
      RETURN_IF_ERROR(FromGrpc(stub->ListBatches(&context, request, &page)));
      for (const Batch& b : page.batches()) PrintBatch(b, flags.json);
      token = page.next_page_token();
    } while (!token.empty());
    return absl::OkStatus();
  }
  return CheckBatchArgs(args);
}

}  // namespace gemma::client
