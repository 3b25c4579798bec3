#include "coordinator/batch_store.h"

#include <sqlite3.h>

#include <cerrno>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma::coordinator {
namespace {

using gemma::v1::Batch;

constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS batches (
  num INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL,
  header BLOB NOT NULL,
  errors BLOB NOT NULL,
  created_at INTEGER NOT NULL DEFAULT 0,
  in_progress_at INTEGER NOT NULL DEFAULT 0,
  finalizing_at INTEGER NOT NULL DEFAULT 0,
  completed_at INTEGER NOT NULL DEFAULT 0,
  failed_at INTEGER NOT NULL DEFAULT 0,
  expired_at INTEGER NOT NULL DEFAULT 0,
  cancelling_at INTEGER NOT NULL DEFAULT 0,
  cancelled_at INTEGER NOT NULL DEFAULT 0,
  expires_at INTEGER NOT NULL DEFAULT 0,
  owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS items (
  batch_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  custom_id TEXT NOT NULL,
  line INTEGER NOT NULL,
  endpoint TEXT NOT NULL,
  request BLOB NOT NULL,
  state TEXT NOT NULL,
  seq INTEGER,
  response BLOB,
  error_code INTEGER NOT NULL DEFAULT 0,
  error_message TEXT NOT NULL DEFAULT '',
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (batch_id, idx),
  UNIQUE (batch_id, custom_id)
);
CREATE INDEX IF NOT EXISTS items_by_state ON items (state, batch_id, idx);
CREATE INDEX IF NOT EXISTS items_by_seq ON items (batch_id, seq);
CREATE TABLE IF NOT EXISTS files (
  id TEXT PRIMARY KEY,
  purpose TEXT NOT NULL,
  filename TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  content BLOB NOT NULL,
  owner TEXT NOT NULL DEFAULT ''
);
)sql";

// The error of the last call on `db`: RESOURCE_EXHAUSTED saying so when the disk (or quota)
// under the store is full, INTERNAL otherwise. Either way the change was rolled back.
absl::Status StoreError(sqlite3* db, const std::string& message) {
  const int code = sqlite3_errcode(db) & 0xff;
  const int system = sqlite3_system_errno(db);
  if (code == SQLITE_FULL || system == ENOSPC || system == EDQUOT) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "batch store: the disk under the coordinator's --data-dir is full (", message,
        "); nothing of this change was stored: free space there and try again"));
  }
  return absl::InternalError(absl::StrCat("batch store: ", message));
}

// One prepared statement; binds by position (1-based), steps, reads columns.
class Statement {
 public:
  Statement(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  absl::Status status() const {
    if (rc_ == SQLITE_OK) return absl::OkStatus();
    return StoreError(db_, sqlite3_errmsg(db_));
  }
  Statement& Bind(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Statement& BindBlob(int i, const std::string& v) {
    sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Statement& Bind(int i, int64_t v) {
    sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  // True with a row, false when done; an error otherwise.
  absl::StatusOr<bool> Step() {
    RETURN_IF_ERROR(status());
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return StoreError(db_, sqlite3_errmsg(db_));
  }
  absl::Status Run() { return Step().status(); }
  // For the next row: the same statement, its bindings cleared (NULL).
  void Reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  int64_t Int(int col) { return sqlite3_column_int64(stmt_, col); }
  std::string Text(int col) {
    const void* p = sqlite3_column_blob(stmt_, col);
    return p == nullptr ? std::string()
                        : std::string(static_cast<const char*>(p), sqlite3_column_bytes(stmt_, col));
  }
  int Changes() { return sqlite3_changes(db_); }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_ = SQLITE_OK;
};

absl::Status Exec(sqlite3* db, const char* sql) {
  char* error = nullptr;
  if (sqlite3_exec(db, sql, nullptr, nullptr, &error) != SQLITE_OK) {
    absl::Status status = StoreError(db, error != nullptr ? error : "unknown error");
    sqlite3_free(error);
    return status;
  }
  return absl::OkStatus();
}

// BEGIN IMMEDIATE ... COMMIT, rolled back unless committed.
class Transaction {
 public:
  explicit Transaction(sqlite3* db) : db_(db) { begun_ = Exec(db, "BEGIN IMMEDIATE"); }
  ~Transaction() {
    if (begun_.ok() && !done_) Exec(db_, "ROLLBACK").IgnoreError();
  }
  absl::Status begun() const { return begun_; }
  absl::Status Commit() {
    done_ = true;
    return Exec(db_, "COMMIT");
  }

 private:
  sqlite3* db_;
  absl::Status begun_;
  bool done_ = false;
};

// Adds `column` (its SQL type and default in `definition`) to a table of a store made before
// it existed. A store written before batches and files had owners gets the owner column
// (owned by "", which only admin tokens and open coordinators may see).
absl::Status AddColumn(sqlite3* db, const char* table, const char* column,
                       const char* definition) {
  Statement columns(db, absl::StrCat("PRAGMA table_info(", table, ")").c_str());
  while (true) {
    ASSIGN_OR_RETURN(bool row, columns.Step());
    if (!row) break;
    if (columns.Text(1) == column) return absl::OkStatus();
  }
  return Exec(db,
              absl::StrCat("ALTER TABLE ", table, " ADD COLUMN ", column, " ", definition).c_str());
}

const char* StampColumn(const std::string& status) {
  if (status == "in_progress") return "in_progress_at";
  if (status == "finalizing") return "finalizing_at";
  if (status == "completed") return "completed_at";
  if (status == "failed") return "failed_at";
  if (status == "expired") return "expired_at";
  if (status == "cancelling") return "cancelling_at";
  if (status == "cancelled") return "cancelled_at";
  return nullptr;
}

}  // namespace

absl::StatusOr<std::unique_ptr<BatchStore>> BatchStore::Open(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                      nullptr) != SQLITE_OK) {
    std::string message = db != nullptr ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open the batch store ", path, ": ", message));
  }
  std::unique_ptr<BatchStore> store(new BatchStore(db));
  sqlite3_busy_timeout(db, 5000);
  for (const char* sql : {"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", kSchema}) {
    absl::Status status = Exec(db, sql);
    if (!status.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("the batch store ", path, " cannot be used: ", status.message()));
    }
  }
  // Columns newer than some stores: the owner of batches and files, and deleted files (kept
  // as rows without content, so that a list's cursor past one still finds its place).
  for (const auto& [table, column, definition] :
       std::vector<std::tuple<const char*, const char*, const char*>>{
           {"batches", "owner", "TEXT NOT NULL DEFAULT ''"},
           {"files", "owner", "TEXT NOT NULL DEFAULT ''"},
           {"files", "deleted", "INTEGER NOT NULL DEFAULT 0"}}) {
    if (absl::Status status = AddColumn(db, table, column, definition); !status.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("the batch store ", path, " cannot be used: ", status.message()));
    }
  }
  return store;
}

BatchStore::~BatchStore() { sqlite3_close(db_); }

absl::StatusOr<Batch> BatchStore::Create(const std::string& id,
                                         const gemma::v1::CreateBatchHeader& header,
                                         const std::vector<NewBatchItem>& items, int64_t now,
                                         int64_t expires_at) {
  std::lock_guard<std::mutex> lock(mutex_);
  Transaction transaction(db_);
  RETURN_IF_ERROR(transaction.begun());
  // The first refusals are kept with the batch (what its object shows); a file of 100,000 bad
  // lines made every reply of a batch or a list of batches megabytes. All of them are results.
  Batch errors;
  for (size_t i = 0; i < items.size(); ++i) {
    if (!items[i].refused) continue;
    errors.set_refused(errors.refused() + 1);
    if (errors.errors_size() >= kBatchErrorsListed) continue;
    // Each cut to a bounded size (a line may be a megabyte; its item keeps everything).
    auto cut = [](const std::string& text, size_t most) {
      return text.size() <= most ? text : text.substr(0, most - 3) + "...";
    };
    auto* e = errors.add_errors();
    e->set_line(items[i].line);
    e->set_custom_id(cut(items[i].custom_id, 256));
    e->set_code(cut(items[i].error_code, 64));
    e->set_message(cut(items[i].error_message, 1024));
  }
  {
    Statement insert(db_,
                     "INSERT INTO batches (id, status, header, errors, created_at, expires_at, "
                     "owner) VALUES (?, 'validating', ?, ?, ?, ?, ?)");
    insert.Bind(1, id).BindBlob(2, header.SerializeAsString());
    insert.BindBlob(3, errors.SerializeAsString()).Bind(4, now).Bind(5, expires_at);
    insert.Bind(6, header.owner());
    RETURN_IF_ERROR(insert.Run());
  }
  Statement row(db_,
                "INSERT INTO items (batch_id, idx, custom_id, line, endpoint, request, state, seq, "
                "error_code, error_message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
  RETURN_IF_ERROR(row.status());
  int64_t refused_seq = 0;  // refusals are the first results
  for (size_t i = 0; i < items.size(); ++i) {
    const NewBatchItem& item = items[i];
    row.Reset();
    row.Bind(1, id).Bind(2, static_cast<int64_t>(i)).Bind(3, item.custom_id).Bind(4, item.line);
    row.Bind(5, item.endpoint).BindBlob(6, item.request.SerializeAsString());
    row.Bind(7, std::string(item.refused ? "failed" : "pending"));
    if (item.refused) row.Bind(8, refused_seq++);  // else NULL: not finished
    row.Bind(9, static_cast<int64_t>(item.grpc_code)).Bind(10, item.error_message);
    RETURN_IF_ERROR(row.Run());
  }
  RETURN_IF_ERROR(transaction.Commit());
  return GetLocked(id);
}

absl::StatusOr<Batch> BatchStore::Get(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  return GetLocked(id);
}

absl::StatusOr<Batch> BatchStore::GetLocked(const std::string& id) {
  Statement q(db_,
              "SELECT status, header, errors, created_at, in_progress_at, finalizing_at, "
              "completed_at, failed_at, expired_at, cancelling_at, cancelled_at, expires_at "
              "FROM batches WHERE id = ?");
  q.Bind(1, id);
  ASSIGN_OR_RETURN(bool found, q.Step());
  if (!found) return absl::NotFoundError(absl::StrCat("no batch ", id));
  Batch batch;
  if (!batch.ParseFromString(q.Text(2))) {
    return absl::DataLossError(absl::StrCat("batch ", id, ": its stored errors do not parse"));
  }
  // Stores written before the cap kept every refusal and no count.
  if (batch.refused() == 0) batch.set_refused(batch.errors_size());
  if (batch.errors_size() > kBatchErrorsListed) {
    batch.mutable_errors()->DeleteSubrange(kBatchErrorsListed,
                                           batch.errors_size() - kBatchErrorsListed);
  }
  batch.set_id(id);
  batch.set_status(q.Text(0));
  gemma::v1::CreateBatchHeader header;
  header.ParseFromString(q.Text(1));
  batch.mutable_metadata()->insert(header.metadata().begin(), header.metadata().end());
  batch.set_endpoint(header.endpoint());
  batch.set_input_file_id(header.input_file_id());
  batch.set_owner(header.owner());
  batch.set_created_at(q.Int(3));
  batch.set_in_progress_at(q.Int(4));
  batch.set_finalizing_at(q.Int(5));
  batch.set_completed_at(q.Int(6));
  batch.set_failed_at(q.Int(7));
  batch.set_expired_at(q.Int(8));
  batch.set_cancelling_at(q.Int(9));
  batch.set_cancelled_at(q.Int(10));
  batch.set_expires_at(q.Int(11));
  Statement counts(db_,
                   "SELECT COUNT(*), COALESCE(SUM(state = 'completed'), 0), "
                   "COALESCE(SUM(state = 'failed'), 0), COALESCE(SUM(prompt_tokens), 0), "
                   "COALESCE(SUM(completion_tokens), 0) FROM items WHERE batch_id = ?");
  counts.Bind(1, id);
  ASSIGN_OR_RETURN(bool row, counts.Step());
  if (row) {
    batch.mutable_counts()->set_total(counts.Int(0));
    batch.mutable_counts()->set_completed(counts.Int(1));
    batch.mutable_counts()->set_failed(counts.Int(2));
    batch.set_prompt_tokens(counts.Int(3));
    batch.set_completion_tokens(counts.Int(4));
  }
  return batch;
}

absl::StatusOr<gemma::v1::ListBatchesResponse> BatchStore::List(int page_size,
                                                                const std::string& page_token,
                                                                const std::string& owner,
                                                                bool everyone) {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t before = INT64_MAX;
  if (!page_token.empty()) {
    Statement q(db_, "SELECT num FROM batches WHERE id = ?");
    q.Bind(1, page_token);
    ASSIGN_OR_RETURN(bool found, q.Step());
    if (!found) {
      return absl::InvalidArgumentError(
          absl::StrCat("page_token \"", page_token, "\" names no batch"));
    }
    before = q.Int(0);
  }
  Statement q(db_,
              "SELECT id FROM batches WHERE num < ? AND (? OR owner = ?) ORDER BY num DESC "
              "LIMIT ?");
  q.Bind(1, before).Bind(2, static_cast<int64_t>(everyone ? 1 : 0)).Bind(3, owner);
  q.Bind(4, static_cast<int64_t>(page_size) + 1);
  std::vector<std::string> ids;
  while (true) {
    ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    ids.push_back(q.Text(0));
  }
  gemma::v1::ListBatchesResponse response;
  for (size_t i = 0; i < ids.size() && static_cast<int>(i) < page_size; ++i) {
    ASSIGN_OR_RETURN(*response.add_batches(), GetLocked(ids[i]));
  }
  if (static_cast<int>(ids.size()) > page_size) response.set_next_page_token(ids[page_size - 1]);
  return response;
}

absl::Status BatchStore::SetStatus(const std::string& id, const std::string& status,
                                   int64_t now, const std::string& from) {
  std::lock_guard<std::mutex> lock(mutex_);
  const char* stamp = StampColumn(status);
  std::string sql = stamp == nullptr
                        ? std::string("UPDATE batches SET status = ? WHERE id = ?")
                        : absl::StrCat("UPDATE batches SET status = ?, ", stamp,
                                       " = ? WHERE id = ?");
  if (!from.empty()) sql += " AND status = ?";
  Statement q(db_, sql.c_str());
  int i = 1;
  q.Bind(i++, status);
  if (stamp != nullptr) q.Bind(i++, now);
  q.Bind(i++, id);
  if (!from.empty()) q.Bind(i++, from);
  RETURN_IF_ERROR(q.Run());
  if (q.Changes() > 0) return absl::OkStatus();
  if (!from.empty()) {
    return absl::AbortedError(absl::StrCat("batch ", id, " is no longer ", from));
  }
  return absl::NotFoundError(absl::StrCat("no batch ", id));
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> BatchStore::Unfinished() {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_,
              "SELECT id, status FROM batches WHERE status IN ('validating', 'in_progress', "
              "'finalizing', 'cancelling') ORDER BY num");
  std::vector<std::pair<std::string, std::string>> out;
  while (true) {
    ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    out.emplace_back(q.Text(0), q.Text(1));
  }
  return out;
}

absl::StatusOr<std::vector<BatchItemRecord>> BatchStore::Pending(
    int limit, const std::set<std::pair<std::string, int64_t>>& running) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_,
              "SELECT i.batch_id, i.idx, i.custom_id, i.line, i.endpoint, i.request FROM items i "
              "JOIN batches b ON b.id = i.batch_id WHERE b.status = 'in_progress' AND "
              "i.state = 'pending' ORDER BY b.num, i.idx LIMIT ?");
  q.Bind(1, static_cast<int64_t>(limit + running.size()));
  std::vector<BatchItemRecord> out;
  while (static_cast<int>(out.size()) < limit) {
    ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    BatchItemRecord item;
    item.batch_id = q.Text(0);
    item.index = q.Int(1);
    if (running.count({item.batch_id, item.index})) continue;
    item.custom_id = q.Text(2);
    item.line = q.Int(3);
    item.endpoint = q.Text(4);
    if (!item.request.ParseFromString(q.Text(5))) {
      return absl::DataLossError(absl::StrCat("batch ", item.batch_id, " item ", item.index,
                                              ": its stored request does not parse"));
    }
    out.push_back(std::move(item));
  }
  return out;
}

absl::StatusOr<int64_t> BatchStore::CountPending(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_, "SELECT COUNT(*) FROM items WHERE batch_id = ? AND state = 'pending'");
  q.Bind(1, id);
  ASSIGN_OR_RETURN(bool row, q.Step());
  return row ? q.Int(0) : 0;
}

absl::StatusOr<bool> BatchStore::Finish(const std::string& batch_id, int64_t index,
                                        const BatchItemResult& result) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_,
              "UPDATE items SET state = ?, seq = (SELECT COALESCE(MAX(seq), -1) + 1 FROM items "
              "WHERE batch_id = ?), response = ?, error_code = ?, error_message = ?, "
              "prompt_tokens = ?, completion_tokens = ? WHERE batch_id = ? AND idx = ? AND "
              "state = 'pending'");
  const bool ok = result.error_code == 0;
  q.Bind(1, std::string(ok ? "completed" : "failed")).Bind(2, batch_id);
  q.BindBlob(3, result.response.SerializeAsString());
  q.Bind(4, static_cast<int64_t>(result.error_code)).Bind(5, result.error_message);
  q.Bind(6, result.response.final().prompt_tokens());
  q.Bind(7, result.response.final().generated_tokens());
  q.Bind(8, batch_id).Bind(9, index);
  RETURN_IF_ERROR(q.Run());
  return q.Changes() > 0;
}

absl::StatusOr<int64_t> BatchStore::CancelPending(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_, "UPDATE items SET state = 'cancelled' WHERE batch_id = ? AND state = 'pending'");
  q.Bind(1, id);
  RETURN_IF_ERROR(q.Run());
  return static_cast<int64_t>(q.Changes());
}

absl::StatusOr<std::vector<gemma::v1::BatchResult>> BatchStore::Results(const std::string& id,
                                                                        int64_t offset,
                                                                        int64_t limit) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_,
              "SELECT seq, custom_id, line, response, error_code, error_message, endpoint, request "
              "FROM items "
              "WHERE batch_id = ? AND seq >= ? ORDER BY seq LIMIT ?");
  q.Bind(1, id).Bind(2, offset).Bind(3, limit);
  std::vector<gemma::v1::BatchResult> out;
  while (true) {
    ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    gemma::v1::BatchResult r;
    r.set_offset(q.Int(0));
    r.set_custom_id(q.Text(1));
    r.set_line(q.Int(2));
    r.mutable_response()->ParseFromString(q.Text(3));
    r.set_error_code(static_cast<int32_t>(q.Int(4)));
    r.set_error_message(q.Text(5));
    r.set_endpoint(q.Text(6));
    gemma::v1::GenerateRequest request;
    if (request.ParseFromString(q.Text(7))) r.set_model(request.model());
    out.push_back(std::move(r));
  }
  return out;
}

absl::Status BatchStore::PutFile(const StoredFile& file, const std::string& content) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_,
              "INSERT INTO files (id, purpose, filename, bytes, created_at, content, owner) "
              "VALUES (?, ?, ?, ?, ?, ?, ?)");
  q.Bind(1, file.id).Bind(2, file.purpose).Bind(3, file.filename).Bind(4, file.bytes);
  q.Bind(5, file.created_at).BindBlob(6, content).Bind(7, file.owner);
  return q.Run();
}

absl::StatusOr<StoredFile> BatchStore::GetFile(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_,
              "SELECT purpose, filename, bytes, created_at, owner FROM files "
              "WHERE id = ? AND deleted = 0");
  q.Bind(1, id);
  ASSIGN_OR_RETURN(bool row, q.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("no file ", id));
  return StoredFile{id, q.Text(0), q.Text(1), q.Int(2), q.Int(3), q.Text(4)};
}

absl::StatusOr<std::vector<StoredFile>> BatchStore::ListFiles(int limit, const std::string& after,
                                                               const std::string& owner,
                                                               bool everyone,
                                                               const std::string& purpose) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_,
              "SELECT id, purpose, filename, bytes, created_at, owner FROM files "
              "WHERE deleted = 0 AND (? OR owner = ?) AND (? = '' OR purpose = ?) "
              "AND (? = '' OR rowid < (SELECT rowid FROM files WHERE id = ?)) "
              "ORDER BY rowid DESC LIMIT ?");
  q.Bind(1, static_cast<int64_t>(everyone ? 1 : 0)).Bind(2, owner).Bind(3, purpose);
  q.Bind(4, purpose).Bind(5, after).Bind(6, after).Bind(7, static_cast<int64_t>(limit));
  std::vector<StoredFile> files;
  while (true) {
    ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    files.push_back({q.Text(0), q.Text(1), q.Text(2), q.Int(3), q.Int(4), q.Text(5)});
  }
  return files;
}

absl::Status BatchStore::DeleteFile(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  // The row stays, without its content, for list cursors that name it.
  Statement q(db_, "UPDATE files SET deleted = 1, content = X'' WHERE id = ? AND deleted = 0");
  q.Bind(1, id);
  RETURN_IF_ERROR(q.Run());
  if (sqlite3_changes(db_) == 0) return absl::NotFoundError(absl::StrCat("no file ", id));
  return absl::OkStatus();
}

absl::StatusOr<std::string> BatchStore::FileContent(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  Statement q(db_, "SELECT content FROM files WHERE id = ? AND deleted = 0");
  q.Bind(1, id);
  ASSIGN_OR_RETURN(bool row, q.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("no file ", id));
  return q.Text(0);
}

}  // namespace gemma::coordinator
