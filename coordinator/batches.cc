#include "coordinator/batches.h"

#include <algorithm>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "coordinator/request_checks.h"
#include "glog/logging.h"
#include "proto/status_convert.h"

namespace gemma::coordinator {
namespace {

using gemma::v1::Batch;
using gemma::v1::BatchItem;
using Key = std::pair<std::string, int64_t>;

constexpr char kChatEndpoint[] = "/v1/chat/completions";
constexpr char kCompletionEndpoint[] = "/v1/completions";

// An OpenAI batch line as an item: its custom_id and request, or why the line is refused (the
// whole batch when it cannot be read at all: no custom_id to report it under).
absl::Status ReadOpenAiLine(const BatchItem& item, const std::string& required_endpoint,
                            const OpenAiOptions& openai, const BatchOptions& options,
                            NewBatchItem* out) {
  const std::string where =
      item.line() > 0 ? absl::StrCat("line ", item.line()) : std::string("an item");
  if (item.openai_line().size() > options.max_line_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, " has ", item.openai_line().size(),
                                                   " bytes, over the limit of ",
                                                   options.max_line_bytes));
  }
  nlohmann::json line;
  std::string parse_error;
  if (!ParseJsonObject(item.openai_line(), where, &line, &parse_error)) {
    return absl::InvalidArgumentError(parse_error);
  }
  if (!line.contains("custom_id") || !line["custom_id"].is_string() ||
      line["custom_id"].get<std::string>().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, " has no custom_id (a string)"));
  }
  out->custom_id = line["custom_id"].get<std::string>();
  auto refuse = [&](const std::string& code, const std::string& message,
                    absl::StatusCode grpc_code = absl::StatusCode::kInvalidArgument) {
    out->refused = true;
    out->error_code = code;
    out->grpc_code = static_cast<int32_t>(grpc_code);
    out->error_message = message;
    return absl::OkStatus();
  };
  const std::string method = line.contains("method") && line["method"].is_string()
                                 ? line["method"].get<std::string>()
                                 : "";
  if (method != "POST") {
    return refuse("invalid_method", absl::StrCat("method must be \"POST\", got \"", method, "\""));
  }
  const std::string url = line.contains("url") && line["url"].is_string() ? line["url"].get<std::string>() : "";
  if (url != kChatEndpoint && url != kCompletionEndpoint) {
    return refuse("invalid_url", absl::StrCat("url must be ", kChatEndpoint, " or ",
                                              kCompletionEndpoint, ", got \"", url, "\""));
  }
  if (!required_endpoint.empty() && url != required_endpoint) {
    return refuse("mismatched_url", absl::StrCat("url \"", url, "\" differs from the batch's "
                                                 "endpoint ", required_endpoint));
  }
  out->endpoint = url;
  if (!line.contains("body") || !line["body"].is_object()) {
    return refuse("invalid_body", "body must be a JSON object");
  }
  ParseResult parsed = ParseOpenAiRequest(
      line["body"], url == kChatEndpoint ? ApiKind::kChat : ApiKind::kCompletion, openai);
  if (!parsed.ok) {
    // A model not served is a 404 in the error file, as the interactive API answers it.
    return refuse(parsed.error.code.empty() ? "invalid_request" : parsed.error.code,
                  parsed.error.message,
                  parsed.error.http_status == 404 ? absl::StatusCode::kNotFound
                                                  : absl::StatusCode::kInvalidArgument);
  }
  if (parsed.parsed.stream) return refuse("invalid_request", "stream is not allowed in a batch");
  out->request = parsed.parsed.request;
  return absl::OkStatus();
}

}  // namespace

BatchRunner::BatchRunner(BatchStore* store, Registry* registry,
                         std::shared_ptr<grpc::Channel> inference, const OpenAiOptions* openai,
                         BatchOptions options, std::string internal_token)
    : store_(store),
      registry_(registry),
      stub_(gemma::v1::Inference::NewStub(inference)),
      openai_(openai),
      options_(options),
      internal_token_(std::move(internal_token)) {}

BatchRunner::~BatchRunner() { Stop(); }

void BatchRunner::Start() {
  // Batches created before a restart: those still validating had every item committed with
  // them (one transaction), so they run.
  auto unfinished = store_->Unfinished();
  if (unfinished.ok()) {
    for (const auto& [id, status] : *unfinished) {
      if (status == "validating") store_->SetStatus(id, "in_progress", UnixNow()).IgnoreError();
      LOG(INFO) << "batch " << id << " (" << status << ") resumes";
    }
  } else {
    LOG(ERROR) << unfinished.status();
  }
  loop_ = std::thread([this] { Loop(); });
}

void BatchRunner::Stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stop_) return;
    stop_ = true;
    for (auto& [key, context] : running_) context->TryCancel();
  }
  wake_.notify_all();
  if (loop_.joinable()) loop_.join();
  std::map<uint64_t, std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    threads.swap(threads_);
  }
  for (auto& [key, thread] : threads) thread.join();
}

int BatchRunner::Bound() {
  int healthy = 0;
  const gemma::v1::GetStatusResponse status = registry_->Status();
  for (const auto& replica : status.replicas()) healthy += replica.healthy() ? 1 : 0;
  return std::max(1, healthy) * options_.max_in_flight_per_replica;
}

absl::StatusOr<Batch> BatchRunner::Create(const gemma::v1::CreateBatchHeader& header,
                                          const std::vector<BatchItem>& items) {
  if (items.empty()) return absl::InvalidArgumentError("the batch has no items");
  if (static_cast<int64_t>(items.size()) > options_.max_items) {
    return absl::InvalidArgumentError(absl::StrCat("the batch has ", items.size(),
                                                   " items, over the limit of ",
                                                   options_.max_items, "; split it"));
  }
  if (!header.endpoint().empty() && header.endpoint() != kChatEndpoint &&
      header.endpoint() != kCompletionEndpoint) {
    return absl::InvalidArgumentError(absl::StrCat("endpoint must be ", kChatEndpoint, " or ",
                                                   kCompletionEndpoint, ", got \"",
                                                   header.endpoint(), "\""));
  }
  std::vector<NewBatchItem> rows(items.size());
  std::map<std::string, int64_t> seen;  // custom_id -> line (or item number)
  for (size_t i = 0; i < items.size(); ++i) {
    const BatchItem& item = items[i];
    NewBatchItem& row = rows[i];
    row.line = item.line();
    const std::string where =
        item.line() > 0 ? absl::StrCat("line ", item.line()) : absl::StrCat("item ", i + 1);
    switch (item.input_case()) {
      case BatchItem::kOpenaiLine:
        RETURN_IF_ERROR(ReadOpenAiLine(item, header.endpoint(), *openai_, options_, &row));
        break;
      case BatchItem::kRequest:
        if (item.custom_id().empty()) {
          return absl::InvalidArgumentError(absl::StrCat(where, " has no custom_id"));
        }
        row.custom_id = item.custom_id();
        row.request = item.request();
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(where, " has no request"));
    }
    auto [it, fresh] = seen.emplace(row.custom_id, item.line() > 0 ? item.line() : i + 1);
    if (!fresh) {
      return absl::InvalidArgumentError(absl::StrCat(
          "custom_id \"", row.custom_id, "\" appears twice (", where, " and ",
          item.line() > 0 ? "line " : "item ", it->second, "); custom_ids must be unique"));
    }
    if (row.refused) continue;
    row.request.set_priority(options_.priority);
    absl::Status valid = ValidateGenerateRequest(row.request, registry_->Limits(row.request.model()));
    if (!valid.ok()) {
      row.refused = true;
      row.error_code = "invalid_request";
      row.grpc_code = static_cast<int32_t>(valid.code());
      row.error_message = std::string(valid.message());
    }
  }
  const std::string id = NewId("batch_");
  const int64_t now = UnixNow();
  const int64_t expires =
      now + std::chrono::duration_cast<std::chrono::seconds>(options_.completion_window).count();
  RETURN_IF_ERROR(store_->Create(id, header, rows, now, expires).status());
  // Every line refused: the input failed validation, as OpenAI ends such a batch, at once (it
  // went through in_progress, which its creator saw as "8000/8000 done").
  const bool all_refused =
      std::all_of(rows.begin(), rows.end(), [](const NewBatchItem& row) { return row.refused; });
  RETURN_IF_ERROR(store_->SetStatus(id, all_refused ? "failed" : "in_progress", UnixNow()));
  LOG(INFO) << "batch " << id << ": " << rows.size() << " items"
            << (all_refused ? ", every one refused: failed" : "");
  wake_.notify_all();
  return store_->Get(id);
}

absl::StatusOr<Batch> BatchRunner::Cancel(const std::string& id) {
  ASSIGN_OR_RETURN(Batch batch, store_->Get(id));
  if (BatchFinal(batch.status()) || batch.status() == "cancelling") return batch;
  if (absl::Status moved = store_->SetStatus(id, "cancelling", UnixNow(), batch.status());
      !moved.ok()) {
    // It finished (or was cancelled) meanwhile: that is the answer.
    if (moved.code() == absl::StatusCode::kAborted) return store_->Get(id);
    return moved;
  }
  RETURN_IF_ERROR(store_->CancelPending(id).status());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [key, context] : running_) {
      if (key.first == id) context->TryCancel();
    }
  }
  wake_.notify_all();
  return store_->Get(id);
}

void BatchRunner::Advance() {
  auto unfinished = store_->Unfinished();
  if (!unfinished.ok()) {
    LOG(ERROR) << unfinished.status();
    return;
  }
  for (const auto& [id, listed] : *unfinished) {
    bool running = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& [key, context] : running_) running = running || key.first == id;
    }
    if (running) continue;
    auto batch = store_->Get(id);
    if (!batch.ok()) continue;
    // The status as it is now (a cancel may have come since the list was read); every move
    // below is conditional on it, so a cancel that lands in between is never overwritten.
    const std::string status = batch->status();
    if (status == "cancelling") {
      // Items cancelled while in flight were left pending: cancel them now.
      store_->CancelPending(id).IgnoreError();
      if (store_->SetStatus(id, "cancelled", UnixNow(), status).ok()) {
        LOG(INFO) << "batch " << id << " cancelled";
      }
      continue;
    }
    if (status == "in_progress" && UnixNow() > batch->expires_at()) {
      if (store_->SetStatus(id, "expired", UnixNow(), status).ok()) {
        store_->CancelPending(id).IgnoreError();
        LOG(INFO) << "batch " << id << " expired";
      }
      continue;
    }
    auto pending = store_->CountPending(id);
    if (!pending.ok() || *pending > 0) continue;
    std::string from = status;
    if (status == "in_progress") {
      if (!store_->SetStatus(id, "finalizing", UnixNow(), status).ok()) continue;
      from = "finalizing";
    }
    // Every result is committed: nothing to assemble (output files are written on reading).
    // Completed even when every item failed while running, as OpenAI's batches are; "failed"
    // is for an input refused whole, here every line refused at submission.
    const bool input_refused =
        batch->counts().total() > 0 && batch->refused() == batch->counts().total();
    const char* final_status = input_refused ? "failed" : "completed";
    if (store_->SetStatus(id, final_status, UnixNow(), from).ok()) {
      LOG(INFO) << "batch " << id << " " << final_status << " ("
                << batch->counts().completed() << " completed, " << batch->counts().failed()
                << " failed" << (input_refused ? ": every line was refused" : "") << ")";
    }
  }
}

void BatchRunner::Loop() {
  while (true) {
    std::vector<std::thread> finished;
    std::set<Key> exclude;
    int room = 0;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (stop_) break;
      for (uint64_t key : done_threads_) {
        finished.push_back(std::move(threads_[key]));
        threads_.erase(key);
      }
      done_threads_.clear();
      const auto now = std::chrono::steady_clock::now();
      for (auto it = cooling_.begin(); it != cooling_.end();) {
        it = it->second <= now ? cooling_.erase(it) : std::next(it);
      }
      for (const auto& [key, context] : running_) exclude.insert(key);
      for (const auto& [key, until] : cooling_) exclude.insert(key);
      room = Bound() - static_cast<int>(running_.size());
    }
    for (std::thread& t : finished) t.join();
    Advance();
    if (room > 0) {
      auto items = store_->Pending(room, exclude);
      if (!items.ok()) {
        LOG(ERROR) << items.status();
      } else {
        std::lock_guard<std::mutex> lock(mutex_);
        for (BatchItemRecord& item : *items) {
          const uint64_t key = next_thread_++;
          running_[{item.batch_id, item.index}] = nullptr;  // the call sets its context
          threads_[key] = std::thread(
              [this, item = std::move(item), key]() mutable { RunItem(std::move(item), key); });
        }
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    if (stop_) break;
    wake_.wait_for(lock, std::chrono::milliseconds(100));
  }
}

void BatchRunner::RunItem(BatchItemRecord item, uint64_t thread_key) {
  const Key key{item.batch_id, item.index};
  grpc::ClientContext context;
  AddBearer(context, internal_token_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    running_[key] = &context;
    if (stop_) context.TryCancel();
  }
  BatchItemResult result;
  auto reader = stub_->Generate(&context, item.request);
  gemma::v1::GenerateResponse response;
  bool has_final = false;
  while (reader->Read(&response)) {
    result.response.mutable_token_ids()->Add(response.token_ids().begin(),
                                             response.token_ids().end());
    result.response.mutable_text()->append(response.text());
    if (response.has_final()) {
      *result.response.mutable_final() = response.final();
      has_final = true;
    }
  }
  const grpc::Status status = reader->Finish();
  bool stopping;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping = stop_;
  }
  const auto code = status.error_code();
  // A call cancelled here (the batch cancelled, the coordinator stopping) may still end with a
  // final response whose reason is "cancelled": that is no result, the item stays pending.
  const bool cancelled_final =
      has_final && result.response.final().finish_reason() == "cancelled";
  bool retry = code == grpc::StatusCode::UNAVAILABLE ||
                     code == grpc::StatusCode::RESOURCE_EXHAUSTED ||
                     code == grpc::StatusCode::CANCELLED || (status.ok() && !has_final) ||
                     cancelled_final;
  if (!retry) {
    if (!status.ok()) {
      result = BatchItemResult();
      result.error_code = static_cast<int32_t>(code);
      result.error_message = status.error_message();
    }
    auto committed = store_->Finish(item.batch_id, item.index, result);
    if (!committed.ok()) {
      // Not stored (a full disk, most likely): the item stays pending and runs again after
      // retry_wait, so its result is neither lost nor stored twice.
      LOG_EVERY_N(ERROR, 20) << "batch " << item.batch_id << " item " << item.index
                             << ": its result cannot be stored, it will run again: "
                             << committed.status();
      retry = true;
    }
  } else if (!stopping) {
    VLOG(1) << "batch " << item.batch_id << " item " << item.index << " waits: "
            << status.error_message();
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    running_.erase(key);
    if (retry) cooling_[key] = std::chrono::steady_clock::now() + options_.retry_wait;
    done_threads_.push_back(thread_key);
  }
  wake_.notify_all();
}

absl::Status MayAccess(const Principal& who, const gemma::v1::Batch& batch) {
  if (who.May(batch.owner())) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      "batch ", batch.id(), " belongs to another user: only its owner or an admin token may see, "
      "read or cancel it"));
}

absl::StatusOr<BatchRunner*> BatchesService::Runner(const grpc::ServerContext* context,
                                                    absl::string_view what,
                                                    Principal* who) const {
  absl::StatusOr<Principal> caller =
      auth_->Authenticate(context->client_metadata(), {Role::kUser}, what);
  if (!caller.ok()) return caller.status();
  *who = *std::move(caller);
  BatchRunner* runner = runner_->load();
  if (runner == nullptr) {
    return absl::FailedPreconditionError(
        "this coordinator keeps no batches: start it with --data-dir DIR");
  }
  return runner;
}

grpc::Status BatchesService::CreateBatch(grpc::ServerContext* context,
                                         grpc::ServerReader<gemma::v1::CreateBatchRequest>* reader,
                                         Batch* response) {
  Principal who;
  auto runner_or = Runner(context, "CreateBatch", &who);
  if (!runner_or.ok()) return ToGrpc(runner_or.status());
  BatchRunner* runner = *runner_or;
  gemma::v1::CreateBatchHeader header;
  std::vector<BatchItem> items;
  gemma::v1::CreateBatchRequest part;
  bool first = true;
  while (reader->Read(&part)) {
    if (part.has_header()) {
      if (!first) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "the header must be the first message of CreateBatch");
      }
      header = part.header();
    } else if (part.has_item()) {
      if (static_cast<int64_t>(items.size()) >= runner->options().max_items) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("more than ", runner->options().max_items,
                                         " items in one batch; split it"));
      }
      items.push_back(std::move(*part.mutable_item()));
    }
    first = false;
  }
  header.set_owner(who.name);
  auto batch = runner->Create(header, items);
  if (!batch.ok()) return ToGrpc(batch.status());
  *response = std::move(*batch);
  return grpc::Status::OK;
}

grpc::Status BatchesService::GetBatch(grpc::ServerContext* context,
                                      const gemma::v1::GetBatchRequest* request,
                                      Batch* response) {
  Principal who;
  auto runner_or = Runner(context, "GetBatch", &who);
  if (!runner_or.ok()) return ToGrpc(runner_or.status());
  BatchRunner* runner = *runner_or;
  auto batch = runner->store().Get(request->id());
  if (!batch.ok()) return ToGrpc(batch.status());
  if (absl::Status may = MayAccess(who, *batch); !may.ok()) return ToGrpc(may);
  *response = std::move(*batch);
  return grpc::Status::OK;
}

grpc::Status BatchesService::ListBatches(grpc::ServerContext* context,
                                         const gemma::v1::ListBatchesRequest* request,
                                         gemma::v1::ListBatchesResponse* response) {
  Principal who;
  auto runner_or = Runner(context, "ListBatches", &who);
  if (!runner_or.ok()) return ToGrpc(runner_or.status());
  BatchRunner* runner = *runner_or;
  if (request->page_size() < 0 || request->page_size() > 100) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("page_size must be in [0, 100], got ", request->page_size()));
  }
  auto page = runner->store().List(request->page_size() == 0 ? 20 : request->page_size(),
                                    request->page_token(), who.name, who.admin);
  if (!page.ok()) return ToGrpc(page.status());
  *response = std::move(*page);
  return grpc::Status::OK;
}

grpc::Status BatchesService::CancelBatch(grpc::ServerContext* context,
                                         const gemma::v1::CancelBatchRequest* request,
                                         Batch* response) {
  Principal who;
  auto runner_or = Runner(context, "CancelBatch", &who);
  if (!runner_or.ok()) return ToGrpc(runner_or.status());
  BatchRunner* runner = *runner_or;
  auto owned = runner->store().Get(request->id());
  if (!owned.ok()) return ToGrpc(owned.status());
  if (absl::Status may = MayAccess(who, *owned); !may.ok()) return ToGrpc(may);
  auto batch = runner->Cancel(request->id());
  if (!batch.ok()) return ToGrpc(batch.status());
  *response = std::move(*batch);
  return grpc::Status::OK;
}

grpc::Status BatchesService::StreamResults(grpc::ServerContext* context,
                                           const gemma::v1::StreamResultsRequest* request,
                                           grpc::ServerWriter<gemma::v1::BatchResult>* writer) {
  Principal who;
  auto runner_or = Runner(context, "StreamResults", &who);
  if (!runner_or.ok()) return ToGrpc(runner_or.status());
  BatchRunner* runner = *runner_or;
  if (request->offset() < 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "offset must be >= 0");
  }
  int64_t offset = request->offset();
  while (!context->IsCancelled()) {
    // The status first: results committed before a final status are all there.
    auto batch = runner->store().Get(request->id());
    if (!batch.ok()) return ToGrpc(batch.status());
    if (absl::Status may = MayAccess(who, *batch); !may.ok()) return ToGrpc(may);
    const bool final = BatchFinal(batch->status());
    auto results = runner->store().Results(request->id(), offset, 256);
    if (!results.ok()) return ToGrpc(results.status());
    for (const gemma::v1::BatchResult& r : *results) {
      if (!writer->Write(r)) return grpc::Status(grpc::StatusCode::CANCELLED, "client left");
      offset = r.offset() + 1;
    }
    if (results->empty()) {
      if (final) return grpc::Status::OK;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  return grpc::Status(grpc::StatusCode::CANCELLED, "client left");
}

std::vector<gemma::v1::BatchItem> OpenAiBatchItems(absl::string_view content) {
  std::vector<gemma::v1::BatchItem> items;
  int64_t line_number = 0;
  for (absl::string_view line : absl::StrSplit(content, '\n')) {
    ++line_number;
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    gemma::v1::BatchItem item;
    item.set_openai_line(std::string(line));
    item.set_line(line_number);
    items.push_back(std::move(item));
  }
  return items;
}

}  // namespace gemma::coordinator
