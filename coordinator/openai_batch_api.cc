#include "coordinator/openai_batch_api.h"

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/strings/str_split.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace gemma::coordinator {
namespace {

using nlohmann::json;

void SendJson(httplib::Response& response, const json& value) {
  response.set_content(Dump(value), "application/json");
}

void SendApiError(httplib::Response& response, const ApiError& error) {
  response.status = error.http_status;
  SendJson(response, json{{"error", error.ToJson()}});
}

void SendStatus(httplib::Response& response, const absl::Status& status) {
  ApiError error = ApiErrorFromGrpc(grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                                                 std::string(status.message())));
  // Here RESOURCE_EXHAUSTED is only ever the batch store's full disk: no rate limit, and no
  // point in retrying soon.
  if (status.code() == absl::StatusCode::kResourceExhausted) {
    error.http_status = 507;
    error.type = "server_error";
    error.code = "insufficient_storage";
  }
  SendApiError(response, error);
}

json FileObject(const StoredFile& file) {
  return {{"id", file.id},
          {"object", "file"},
          {"bytes", file.bytes},
          {"created_at", file.created_at},
          {"filename", file.filename},
          {"purpose", file.purpose}};
}

// A batch's output ("-output": results) or error ("-errors": failures) file, from its results.
absl::StatusOr<std::string> ResultFile(BatchRunner& runner, const std::string& batch_id,
                                       bool errors, const std::string& model_name) {
  ASSIGN_OR_RETURN(gemma::v1::Batch batch, runner.store().Get(batch_id));
  std::string out;
  for (int64_t offset = 0;;) {
    ASSIGN_OR_RETURN(auto results, runner.store().Results(batch_id, offset, 1024));
    if (results.empty()) break;
    for (const gemma::v1::BatchResult& r : results) {
      offset = r.offset() + 1;
      if ((r.error_code() != 0) != errors) continue;
      absl::StrAppend(&out, Dump(BatchOutputLine(r, batch_id, model_name, batch.created_at())),
                      "\n");
    }
  }
  return out;
}

// "<batch id>-output" / "<batch id>-errors" -> (batch id, errors?).
bool ResultFileId(const std::string& id, std::string* batch_id, bool* errors) {
  for (const auto& [suffix, is_errors] : {std::pair{"-output", false}, std::pair{"-errors", true}}) {
    absl::string_view rest = id;
    if (absl::ConsumeSuffix(&rest, suffix) && absl::StartsWith(rest, "batch_")) {
      *batch_id = std::string(rest);
      *errors = is_errors;
      return true;
    }
  }
  return false;
}


// A list's `limit` query parameter: `fallback` (`most` unless given) when absent; false, with
// the error sent, when it is not a whole number in [1, most].
bool ListLimit(const httplib::Request& request, httplib::Response& response, int most,
               int* limit, int fallback = 0) {
  *limit = fallback > 0 ? fallback : most;
  if (!request.has_param("limit")) return true;
  if (!absl::SimpleAtoi(request.get_param_value("limit"), limit) || *limit < 1 ||
      *limit > most) {
    SendApiError(response, InvalidRequestError(
                               "limit", absl::StrCat("limit must be a whole number in [1, ", most,
                                                     "], got \"",
                                                     request.get_param_value("limit"), "\"")));
    return false;
  }
  return true;
}

// The caller of an HTTP request (its token was checked before routing); false, with the error
// sent, when it has none that passes.
bool Caller(const Authenticator* auth, const httplib::Request& request,
            httplib::Response& response, Principal* who) {
  absl::StatusOr<Principal> caller = auth->AuthenticateHeader(
      request.get_header_value("Authorization"), {Role::kUser}, request.path);
  if (!caller.ok()) {
    SendStatus(response, caller.status());
    return false;
  }
  *who = *std::move(caller);
  return true;
}

// PERMISSION_DENIED unless `who` uploaded the file (or is an admin).
absl::Status MayAccessFile(const Principal& who, const StoredFile& file) {
  if (who.May(file.owner)) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      "file ", file.id, " belongs to another user: only its owner or an admin token may use it"));
}

// Batch `id` when `who` may see it; NOT_FOUND or PERMISSION_DENIED otherwise.
absl::StatusOr<gemma::v1::Batch> OwnedBatch(BatchRunner& runner, const Principal& who,
                                            const std::string& id) {
  auto batch = runner.store().Get(id);
  if (!batch.ok()) return batch.status();
  if (absl::Status may = MayAccess(who, *batch); !may.ok()) return may;
  return batch;
}

// A file id: an uploaded file, or a batch's output or error file; OK when `who` may read it.
absl::Status MayReadFile(BatchRunner& runner, const Principal& who, const std::string& id) {
  std::string batch_id;
  bool errors = false;
  if (ResultFileId(id, &batch_id, &errors)) {
    auto batch = runner.store().Get(batch_id);
    if (!batch.ok()) return absl::NotFoundError(absl::StrCat("no file ", id));
    return MayAccess(who, *batch);
  }
  auto file = runner.store().GetFile(id);
  if (!file.ok()) return file.status();
  return MayAccessFile(who, *file);
}

}  // namespace

void AddOpenAiBatchRoutes(httplib::Server& http, BatchRunner* runner,
                          const OpenAiOptions* openai, const OpenAiBatchOptions& options,
                          const Authenticator* auth) {
  const size_t max_file_bytes = options.max_file_bytes;
  http.Post("/v1/files", [runner, max_file_bytes, auth](const httplib::Request& request,
                                                        httplib::Response& response) {
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    if (!request.is_multipart_form_data() || !request.has_file("file")) {
      SendApiError(response, InvalidRequestError(
                                 "file", "send the file as multipart/form-data field \"file\""));
      return;
    }
    const httplib::MultipartFormData file = request.get_file_value("file");
    const std::string purpose =
        request.has_file("purpose") ? request.get_file_value("purpose").content : "";
    if (purpose != "batch") {
      SendApiError(response, InvalidRequestError(
                                 "purpose", absl::StrCat("purpose must be \"batch\" (the only "
                                                         "files this server keeps), got \"",
                                                         purpose, "\"")));
      return;
    }
    if (file.content.size() > max_file_bytes) {
      ApiError e = InvalidRequestError(
          "file", absl::StrCat("the file has ", file.content.size(),
                               " bytes, over the limit of ", max_file_bytes));
      e.http_status = 413;
      SendApiError(response, e);
      return;
    }
    StoredFile stored{NewId("file-"), purpose, file.filename,
                      static_cast<int64_t>(file.content.size()), UnixNow(), who.name};
    absl::Status put = runner->store().PutFile(stored, file.content);
    if (!put.ok()) {
      SendStatus(response, put);
      return;
    }
    SendJson(response, FileObject(stored));
  });
  // The caller's uploaded files (an admin's: everyone's), newest first, as OpenAI lists them:
  // `purpose`, `limit` (1 to 10000) and `after` (a file id) narrow the list.
  http.Get("/v1/files", [runner, auth](const httplib::Request& request,
                                       httplib::Response& response) {
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    int limit = 0;
    if (!ListLimit(request, response, 10000, &limit)) return;
    if (request.has_param("order") && request.get_param_value("order") != "desc") {
      SendApiError(response, InvalidRequestError(
                                 "order", "only order=desc (newest first) is supported"));
      return;
    }
    // One more than asked for tells whether there are more.
    auto files = runner->store().ListFiles(limit + 1, request.get_param_value("after"), who.name,
                                           who.admin, request.get_param_value("purpose"));
    if (!files.ok()) {
      SendStatus(response, files.status());
      return;
    }
    const bool has_more = static_cast<int>(files->size()) > limit;
    if (has_more) files->pop_back();
    json data = json::array();
    for (const StoredFile& f : *files) data.push_back(FileObject(f));
    SendJson(response, {{"object", "list"},
                        {"data", data},
                        {"first_id", data.empty() ? json(nullptr) : data.front()["id"]},
                        {"last_id", data.empty() ? json(nullptr) : data.back()["id"]},
                        {"has_more", has_more}});
  });
  http.Delete(R"(/v1/files/([^/]+))", [runner, auth](const httplib::Request& request,
                                                     httplib::Response& response) {
    const std::string id = request.matches[1];
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    std::string batch_id;
    bool errors = false;
    if (ResultFileId(id, &batch_id, &errors)) {
      SendApiError(response,
                   InvalidRequestError("file_id", absl::StrCat(
                                                      id, " is a batch's ",
                                                      errors ? "error" : "output",
                                                      " file, made from its results when read; "
                                                      "it cannot be deleted on its own")));
      return;
    }
    auto file = runner->store().GetFile(id);
    if (!file.ok()) {
      SendStatus(response, file.status());
      return;
    }
    if (absl::Status may = MayAccessFile(who, *file); !may.ok()) {
      SendStatus(response, may);
      return;
    }
    if (absl::Status deleted = runner->store().DeleteFile(id); !deleted.ok()) {
      SendStatus(response, deleted);
      return;
    }
    SendJson(response, {{"id", id}, {"object", "file"}, {"deleted", true}});
  });
  http.Get(R"(/v1/files/([^/]+))", [runner, openai, auth](const httplib::Request& request,
                                                          httplib::Response& response) {
    const std::string id = request.matches[1];
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    if (absl::Status may = MayReadFile(*runner, who, id); !may.ok()) {
      SendStatus(response, may);
      return;
    }
    std::string batch_id;
    bool errors = false;
    if (ResultFileId(id, &batch_id, &errors)) {
      auto batch = runner->store().Get(batch_id);
      if (!batch.ok()) {
        SendStatus(response, absl::NotFoundError(absl::StrCat("no file ", id)));
        return;
      }
      // Its size is that of the lines it holds now (rendered, as its content is), kept once
      // the batch has ended and its results no longer change, so polling the object does not
      // render a large file each time.
      static absl::Mutex sizes_mutex;
      static auto* sizes = new std::map<std::string, int64_t>();
      std::optional<int64_t> bytes;
      {
        absl::MutexLock lock(&sizes_mutex);
        if (auto it = sizes->find(id); it != sizes->end()) bytes = it->second;
      }
      if (!bytes) {
        absl::StatusOr<std::string> content =
            ResultFile(*runner, batch_id, errors, openai->model_name);
        if (!content.ok()) {
          SendStatus(response, content.status());
          return;
        }
        bytes = static_cast<int64_t>(content->size());
        if (BatchFinal(batch->status())) {
          absl::MutexLock lock(&sizes_mutex);
          (*sizes)[id] = *bytes;
        }
      }
      SendJson(response, FileObject({id, "batch_output", id + ".jsonl", *bytes,
                                     batch->created_at(), batch->owner()}));
      return;
    }
    auto file = runner->store().GetFile(id);
    if (!file.ok()) {
      SendStatus(response, file.status());
      return;
    }
    SendJson(response, FileObject(*file));
  });
  http.Get(R"(/v1/files/([^/]+)/content)", [runner, openai, auth](
                                                  const httplib::Request& request,
                                                  httplib::Response& response) {
    const std::string id = request.matches[1];
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    if (absl::Status may = MayReadFile(*runner, who, id); !may.ok()) {
      SendStatus(response, may);
      return;
    }
    std::string batch_id;
    bool errors = false;
    absl::StatusOr<std::string> content =
        ResultFileId(id, &batch_id, &errors)
            ? ResultFile(*runner, batch_id, errors, openai->model_name)
            : runner->store().FileContent(id);
    if (!content.ok()) {
      SendStatus(response, content.status());
      return;
    }
    response.set_content(*content, "application/jsonl");
  });
  http.Post("/v1/batches", [runner, auth](const httplib::Request& request,
                                          httplib::Response& response) {
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    json body;
    std::string parse_error;
    if (!ParseJsonObject(request.body, "the request body", &body, &parse_error)) {
      SendApiError(response, InvalidRequestError("", parse_error));
      return;
    }
    for (const auto& [key, value] : body.items()) {
      if (key != "input_file_id" && key != "endpoint" && key != "completion_window" &&
          key != "metadata") {
        SendApiError(response, InvalidRequestError(
                                   key, absl::StrCat("Unrecognized request argument supplied: ",
                                                     key)));
        return;
      }
    }
    if (!body.contains("input_file_id") || !body["input_file_id"].is_string()) {
      SendApiError(response, InvalidRequestError("input_file_id", "input_file_id is required"));
      return;
    }
    if (!body.contains("endpoint") || !body["endpoint"].is_string()) {
      SendApiError(response, InvalidRequestError("endpoint", "endpoint is required"));
      return;
    }
    // Required, as OpenAI's API (and its client) has it.
    if (!body.contains("completion_window") || body["completion_window"] != "24h") {
      SendApiError(response, InvalidRequestError(
                                 "completion_window",
                                 body.contains("completion_window")
                                     ? "completion_window must be \"24h\""
                                     : "completion_window is required: \"24h\""));
      return;
    }
    // OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    if (body.contains("metadata") && !body["metadata"].is_null()) {
      const json& metadata = body["metadata"];
      std::string wrong;
      if (!metadata.is_object()) {
        wrong = "metadata must be an object of strings";
      } else if (metadata.size() > 16) {
        wrong = absl::StrCat("metadata has ", metadata.size(), " keys; at most 16");
      } else {
        for (const auto& [k, v] : metadata.items()) {
          if (k.size() > 64) wrong = absl::StrCat("metadata key \"", k.substr(0, 16), "...\" is longer than 64 characters");
          if (!v.is_string()) wrong = "metadata values are strings";
          else if (v.get<std::string>().size() > 512) wrong = absl::StrCat("metadata[\"", k, "\"] is longer than 512 characters");
          if (!wrong.empty()) break;
        }
      }
      if (!wrong.empty()) {
        SendApiError(response, InvalidRequestError("metadata", wrong));
        return;
      }
    }
    gemma::v1::CreateBatchHeader header;
    header.set_input_file_id(body["input_file_id"].get<std::string>());
    header.set_endpoint(body["endpoint"].get<std::string>());
    if (body.contains("metadata") && body["metadata"].is_object()) {
      for (const auto& [k, v] : body["metadata"].items()) {
        if (!v.is_string()) {
          SendApiError(response, InvalidRequestError("metadata", "metadata values are strings"));
          return;
        }
        (*header.mutable_metadata())[k] = v.get<std::string>();
      }
    }
    header.set_owner(who.name);
    if (absl::Status may = MayReadFile(*runner, who, header.input_file_id()); !may.ok()) {
      SendStatus(response, may);
      return;
    }
    auto content = runner->store().FileContent(header.input_file_id());
    if (!content.ok()) {
      SendStatus(response, content.status());
      return;
    }
    std::vector<gemma::v1::BatchItem> items = OpenAiBatchItems(*content);
    auto batch = runner->Create(header, items);
    if (!batch.ok()) {
      SendStatus(response, batch.status());
      return;
    }
    SendJson(response, BatchObject(*batch));
  });
  http.Get("/v1/batches", [runner, auth](const httplib::Request& request,
                                         httplib::Response& response) {
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    int limit = 0;
    if (!ListLimit(request, response, 100, &limit, 20)) return;
    const std::string after = request.get_param_value("after");
    auto page = runner->store().List(limit, after, who.name, who.admin);
    if (!page.ok()) {
      // The store names its cursor page_token (gemmactl's word); this API calls it after.
      SendStatus(response, page.status().code() == absl::StatusCode::kInvalidArgument
                               ? absl::InvalidArgumentError(absl::StrCat(
                                     "after=\"", after, "\" names no batch you can see; give "
                                     "the id of a batch of the previous page (its last_id)"))
                               : page.status());
      return;
    }
    json data = json::array();
    for (const auto& b : page->batches()) data.push_back(BatchObject(b));
    SendJson(response, {{"object", "list"},
                        {"data", data},
                        {"first_id", data.empty() ? json(nullptr) : data.front()["id"]},
                        {"last_id", data.empty() ? json(nullptr) : data.back()["id"]},
                        {"has_more", !page->next_page_token().empty()}});
  });
  http.Get(R"(/v1/batches/([^/]+))", [runner, auth](const httplib::Request& request,
                                                    httplib::Response& response) {
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    auto batch = OwnedBatch(*runner, who, request.matches[1]);
    if (!batch.ok()) {
      SendStatus(response, batch.status());
      return;
    }
    SendJson(response, BatchObject(*batch));
  });
  http.Post(R"(/v1/batches/([^/]+)/cancel)", [runner, auth](const httplib::Request& request,
                                                            httplib::Response& response) {
    Principal who;
    if (!Caller(auth, request, response, &who)) return;
    auto owned = OwnedBatch(*runner, who, request.matches[1]);
    if (!owned.ok()) {
      SendStatus(response, owned.status());
      return;
    }
    auto batch = runner->Cancel(request.matches[1]);
    if (!batch.ok()) {
      SendStatus(response, batch.status());
      return;
    }
    SendJson(response, BatchObject(*batch));
  });
}

}  // namespace gemma::coordinator
