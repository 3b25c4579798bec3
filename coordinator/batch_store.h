// The durable store of batch jobs and uploaded files: one SQLite database (WAL journal,
// synchronous FULL) under the coordinator's --data-dir. A batch's items are committed in one
// transaction before CreateBatch returns; each item's result is committed with the change of its
// state from pending, so an item ends with exactly one result however often the coordinator
// restarts (a result for an item no longer pending is dropped). SQLite's journal keeps a torn
// write from corrupting the database. Thread-safe (one connection behind a mutex).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "gemma/v1/batches.pb.h"

struct sqlite3;

namespace gemma::coordinator {

// The refusals a batch keeps with itself (Batch.errors); Batch.refused counts them all.
inline constexpr int kBatchErrorsListed = 100;

// What an item asks for, and for an OpenAI line its endpoint (how its result is written out).
struct BatchItemRecord {
  std::string batch_id;
  int64_t index = 0;
  std::string custom_id;
  int64_t line = 0;
  std::string endpoint;  // of an OpenAI line; empty for a GenerateRequest
  gemma::v1::GenerateRequest request;
};

// An item to create: accepted (with its request), or refused at creation (error set).
struct NewBatchItem {
  std::string custom_id;
  int64_t line = 0;
  std::string endpoint;  // of an OpenAI line; empty for a GenerateRequest
  gemma::v1::GenerateRequest request;
  bool refused = false;
  std::string error_code;  // e.g. "invalid_request"
  int32_t grpc_code = 0;
  std::string error_message;
};

// The end of one item: its response (text, ids, final), or an error.
struct BatchItemResult {
  gemma::v1::GenerateResponse response;
  int32_t error_code = 0;  // google.rpc.Code; 0: the response is the result
  std::string error_message;
};

struct StoredFile {
  std::string id;
  std::string purpose;
  std::string filename;
  int64_t bytes = 0;
  int64_t created_at = 0;
  std::string owner;  // the uploader's token name ("" on an open coordinator)
};

class BatchStore {
 public:
  // Opens (creating) the database at `path`. FAILED_PRECONDITION naming the path when it
  // cannot be opened or is not a batch store.
  static absl::StatusOr<std::unique_ptr<BatchStore>> Open(const std::string& path);
  ~BatchStore();

  absl::StatusOr<gemma::v1::Batch> Create(const std::string& id,
                                          const gemma::v1::CreateBatchHeader& header,
                                          const std::vector<NewBatchItem>& items, int64_t now,
                                          int64_t expires_at);
  // NOT_FOUND naming the id.
  absl::StatusOr<gemma::v1::Batch> Get(const std::string& id);
  // Newest first; page_token is the id of the last batch of the previous page. Only `owner`'s
  // batches unless `everyone`.
  absl::StatusOr<gemma::v1::ListBatchesResponse> List(int page_size,
                                                      const std::string& page_token,
                                                      const std::string& owner = "",
                                                      bool everyone = true);
  // Moves a batch to `status` and stamps the matching time (in_progress_at, ...). With `from`,
  // only a batch still in that status moves (ABORTED otherwise: someone else moved it first).
  absl::Status SetStatus(const std::string& id, const std::string& status, int64_t now,
                         const std::string& from = "");
  // Batches not yet in a final state, oldest first, with their status.
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> Unfinished();
  // Up to `limit` pending items of in_progress batches, oldest batch and lowest index first,
  // leaving out those in `running` (batch id, index).
  absl::StatusOr<std::vector<BatchItemRecord>> Pending(
      int limit, const std::set<std::pair<std::string, int64_t>>& running);
  absl::StatusOr<int64_t> CountPending(const std::string& id);
  // Commits the item's result if it is still pending; false when it was not.
  absl::StatusOr<bool> Finish(const std::string& batch_id, int64_t index,
                              const BatchItemResult& result);
  // Marks every pending item of the batch cancelled; how many.
  absl::StatusOr<int64_t> CancelPending(const std::string& id);
  // Results numbered `offset` on (in the order they completed), at most `limit`.
  absl::StatusOr<std::vector<gemma::v1::BatchResult>> Results(const std::string& id,
                                                              int64_t offset, int64_t limit);
  absl::Status PutFile(const StoredFile& file, const std::string& content);
  absl::StatusOr<StoredFile> GetFile(const std::string& id);
  absl::StatusOr<std::string> FileContent(const std::string& id);
  // Newest first, at most `limit`, only those uploaded before file `after` when it is given;
  // only `owner`'s unless `everyone`, only of `purpose` unless it is empty.
  absl::StatusOr<std::vector<StoredFile>> ListFiles(int limit, const std::string& after,
                                                    const std::string& owner, bool everyone,
                                                    const std::string& purpose);
  // NOT_FOUND naming the id when there is no such file. Its content is freed; its row stays
  // (hidden) so that a list's `after` naming it still works. Batches made from it keep their
  // items.
  absl::Status DeleteFile(const std::string& id);

 private:
  explicit BatchStore(sqlite3* db) : db_(db) {}
  absl::StatusOr<gemma::v1::Batch> GetLocked(const std::string& id);

  std::mutex mutex_;
  sqlite3* db_;
};

}  // namespace gemma::coordinator
