// The batch store on a real SQLite file: a batch and its items survive closing and reopening
// (as after a SIGKILL), an item takes exactly one result however often it is finished,
// cancellation leaves results readable, pages and results come in order, and a file that is
// not a database is refused with its path.
#include "coordinator/batch_store.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include <sqlite3.h>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace gemma::coordinator {
namespace {

std::string TempPath(const std::string& name) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/batch_store_", getpid());
  std::filesystem::create_directories(dir);
  const std::string path = absl::StrCat(dir, "/", name);
  std::filesystem::remove(path);
  std::filesystem::remove(path + "-wal");
  std::filesystem::remove(path + "-shm");
  return path;
}

std::vector<NewBatchItem> Items(int n, int refused_every = 0) {
  std::vector<NewBatchItem> items;
  for (int i = 0; i < n; ++i) {
    NewBatchItem item;
    item.custom_id = absl::StrCat("req-", i);
    item.line = i + 1;
    item.request.set_text(absl::StrCat("prompt ", i));
    if (refused_every > 0 && i % refused_every == 0) {
      item.refused = true;
      item.error_code = "invalid_request";
      item.grpc_code = 3;
      item.error_message = "bad";
    }
    items.push_back(item);
  }
  return items;
}

BatchItemResult Done(const std::string& text, int64_t generated) {
  BatchItemResult r;
  r.response.set_text(text);
  r.response.mutable_final()->set_finish_reason("max_tokens");
  r.response.mutable_final()->set_prompt_tokens(3);
  r.response.mutable_final()->set_generated_tokens(generated);
  return r;
}

TEST(BatchStoreTest, ItemsSurviveReopeningAndEachTakesOneResult) {
  const std::string path = TempPath("reopen.db");
  {
    auto store = BatchStore::Open(path);
    ASSERT_TRUE(store.ok()) << store.status();
    auto batch = (*store)->Create("batch_a", {}, Items(10, 4), 100, 200);
    ASSERT_TRUE(batch.ok()) << batch.status();
    EXPECT_EQ(batch->status(), "validating");
    EXPECT_EQ(batch->counts().total(), 10);
    EXPECT_EQ(batch->counts().failed(), 3);  // items 0, 4, 8 refused
    ASSERT_EQ(batch->errors_size(), 3);
    EXPECT_EQ(batch->errors(1).line(), 5);
    EXPECT_EQ(batch->errors(1).custom_id(), "req-4");
    ASSERT_TRUE((*store)->SetStatus("batch_a", "in_progress", 101).ok());
    auto pending = (*store)->Pending(100, {});
    ASSERT_TRUE(pending.ok());
    ASSERT_EQ(pending->size(), 7u);
    EXPECT_EQ((*pending)[0].custom_id, "req-1");
    EXPECT_EQ((*pending)[0].request.text(), "prompt 1");
    // Two items finish; the process dies (the store is closed without anything else).
    EXPECT_TRUE(*(*store)->Finish("batch_a", 1, Done("one", 4)));
    EXPECT_TRUE(*(*store)->Finish("batch_a", 2, Done("two", 5)));
  }
  auto store = BatchStore::Open(path);
  ASSERT_TRUE(store.ok()) << store.status();
  auto batch = (*store)->Get("batch_a");
  ASSERT_TRUE(batch.ok());
  EXPECT_EQ(batch->status(), "in_progress");
  EXPECT_EQ(batch->in_progress_at(), 101);
  EXPECT_EQ(batch->counts().completed(), 2);
  EXPECT_EQ(batch->completion_tokens(), 9);
  auto unfinished = (*store)->Unfinished();
  ASSERT_TRUE(unfinished.ok());
  ASSERT_EQ(unfinished->size(), 1u);
  // What was running when it died runs again; what finished does not.
  std::set<std::pair<std::string, int64_t>> running = {{"batch_a", 3}};
  auto pending = (*store)->Pending(100, running);
  ASSERT_TRUE(pending.ok());
  std::set<int64_t> indices;
  for (const auto& item : *pending) indices.insert(item.index);
  EXPECT_EQ(indices, (std::set<int64_t>{5, 6, 7, 9}));
  // A second result for a finished item is dropped.
  auto again = (*store)->Finish("batch_a", 1, Done("other", 1));
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(*again);
  auto results = (*store)->Results("batch_a", 0, 100);
  ASSERT_TRUE(results.ok());
  ASSERT_EQ(results->size(), 5u);  // 3 refusals, then 2 results, numbered in that order
  for (size_t i = 0; i < results->size(); ++i) EXPECT_EQ((*results)[i].offset(), int64_t(i));
  EXPECT_EQ((*results)[3].custom_id(), "req-1");
  EXPECT_EQ((*results)[3].response().text(), "one");
  EXPECT_EQ((*results)[0].error_code(), 3);
  auto tail = (*store)->Results("batch_a", 4, 100);
  ASSERT_TRUE(tail.ok());
  ASSERT_EQ(tail->size(), 1u);
  EXPECT_EQ((*tail)[0].custom_id(), "req-2");
}

TEST(BatchStoreTest, CancellingKeepsResultsAndStopsTheRest) {
  auto store = BatchStore::Open(TempPath("cancel.db"));
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Create("batch_c", {}, Items(5), 1, 2).ok());
  ASSERT_TRUE((*store)->SetStatus("batch_c", "in_progress", 1).ok());
  ASSERT_TRUE(*(*store)->Finish("batch_c", 0, Done("kept", 2)));
  // A move conditional on a status another move has left is refused: a cancel is never
  // overwritten by a completion read before it.
  ASSERT_TRUE((*store)->SetStatus("batch_c", "cancelling", 2, "in_progress").ok());
  EXPECT_EQ((*store)->SetStatus("batch_c", "finalizing", 3, "in_progress").code(),
            absl::StatusCode::kAborted);
  EXPECT_EQ((*store)->Get("batch_c")->status(), "cancelling");
  auto cancelled = (*store)->CancelPending("batch_c");
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(*cancelled, 4);
  EXPECT_FALSE(*(*store)->Finish("batch_c", 1, Done("late", 2)));  // cancelled, not pending
  EXPECT_EQ(*(*store)->CountPending("batch_c"), 0);
  auto results = (*store)->Results("batch_c", 0, 10);
  ASSERT_TRUE(results.ok());
  ASSERT_EQ(results->size(), 1u);
  EXPECT_EQ((*results)[0].response().text(), "kept");
}

TEST(BatchStoreTest, ListsNewestFirstInPagesAndNamesWhatIsMissing) {
  auto store = BatchStore::Open(TempPath("list.db"));
  ASSERT_TRUE(store.ok());
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE((*store)->Create(absl::StrCat("batch_", i), {}, Items(1), i, i + 1).ok());
  }
  auto first = (*store)->List(2, "");
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->batches_size(), 2);
  EXPECT_EQ(first->batches(0).id(), "batch_4");
  EXPECT_EQ(first->next_page_token(), "batch_3");
  auto second = (*store)->List(2, first->next_page_token());
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->batches(0).id(), "batch_2");
  auto last = (*store)->List(2, "batch_1");
  ASSERT_TRUE(last.ok());
  ASSERT_EQ(last->batches_size(), 1);
  EXPECT_TRUE(last->next_page_token().empty());
  EXPECT_EQ((*store)->Get("batch_9").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*store)->List(2, "batch_9").status().code(), absl::StatusCode::kInvalidArgument);
  // The same id twice is refused, and leaves nothing behind.
  EXPECT_FALSE((*store)->Create("batch_0", {}, Items(1), 0, 1).ok());
  EXPECT_EQ((*store)->Get("batch_0")->counts().total(), 1);
}

// A file of many bad lines: the batch keeps the first kBatchErrorsListed refusals and counts
// them all (every one is a failed result), so its object stays small however many there are.
TEST(BatchStoreTest, ABatchKeepsItsFirstRefusalsAndCountsThemAll) {
  auto store = BatchStore::Open(TempPath("refusals.db"));
  ASSERT_TRUE(store.ok()) << store.status();
  auto batch = (*store)->Create("batch_r", {}, Items(1000, 2), 100, 200);  // 500 refused
  ASSERT_TRUE(batch.ok()) << batch.status();
  EXPECT_EQ(batch->refused(), 500);
  EXPECT_EQ(batch->counts().failed(), 500);
  ASSERT_EQ(batch->errors_size(), kBatchErrorsListed);
  EXPECT_EQ(batch->errors(0).custom_id(), "req-0");
  EXPECT_EQ(batch->errors(kBatchErrorsListed - 1).custom_id(),
            absl::StrCat("req-", 2 * (kBatchErrorsListed - 1)));
  EXPECT_LT(batch->ByteSizeLong(), 20000u);
  // However long what a refused line carried, the batch keeps a bounded excerpt.
  std::vector<NewBatchItem> long_items = Items(3, 1);
  for (NewBatchItem& item : long_items) {
    item.custom_id = std::string(100000, 'c') + item.custom_id;
    item.error_message = std::string(1 << 20, 'm');
  }
  auto long_batch = (*store)->Create("batch_long", {}, long_items, 100, 200);
  ASSERT_TRUE(long_batch.ok()) << long_batch.status();
  ASSERT_EQ(long_batch->errors_size(), 3);
  EXPECT_LT(long_batch->ByteSizeLong(), 5000u);
  auto results = (*store)->Results("batch_r", 0, 1000);
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_EQ(results->size(), 500u);  // the refusals are results, all of them
}

// Batches belong to the token that created them: the list shows a user its own, an admin all;
// a store written before owners existed gets the column, its batches owned by "".
TEST(BatchStoreTest, ListsEachOwnersBatchesAndOwnersComeToOldStores) {
  const std::string path = TempPath("owners.db");
  {
    // The schema of a store from before owners (batches and files without the column).
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db,
                           "CREATE TABLE batches (num INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT "
                           "NOT NULL UNIQUE, status TEXT NOT NULL, header BLOB NOT NULL, errors "
                           "BLOB NOT NULL, created_at INTEGER NOT NULL DEFAULT 0, in_progress_at "
                           "INTEGER NOT NULL DEFAULT 0, finalizing_at INTEGER NOT NULL DEFAULT 0, "
                           "completed_at INTEGER NOT NULL DEFAULT 0, failed_at INTEGER NOT NULL "
                           "DEFAULT 0, expired_at INTEGER NOT NULL DEFAULT 0, cancelling_at "
                           "INTEGER NOT NULL DEFAULT 0, cancelled_at INTEGER NOT NULL DEFAULT 0, "
                           "expires_at INTEGER NOT NULL DEFAULT 0);"
                           "INSERT INTO batches (id, status, header, errors) VALUES "
                           "('batch_old', 'completed', x'', x'');"
                           "CREATE TABLE files (id TEXT PRIMARY KEY, purpose TEXT NOT NULL, "
                           "filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER "
                           "NOT NULL, content BLOB NOT NULL);",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  auto store = BatchStore::Open(path);
  ASSERT_TRUE(store.ok()) << store.status();
  for (const std::string owner : {"alice", "bob", "alice"}) {
    gemma::v1::CreateBatchHeader header;
    header.set_owner(owner);
    static int n = 0;
    ASSERT_TRUE((*store)->Create(absl::StrCat("batch_", owner, n++), header, Items(1), 1, 2).ok());
  }
  auto ids = [&](const std::string& owner, bool everyone) {
    std::vector<std::string> out;
    auto page = (*store)->List(10, "", owner, everyone);
    EXPECT_TRUE(page.ok()) << page.status();
    for (const auto& b : page->batches()) out.push_back(b.id() + ":" + b.owner());
    return out;
  };
  EXPECT_EQ(ids("alice", false), (std::vector<std::string>{"batch_alice2:alice", "batch_alice0:alice"}));
  EXPECT_EQ(ids("bob", false), (std::vector<std::string>{"batch_bob1:bob"}));
  EXPECT_EQ(ids("", false), (std::vector<std::string>{"batch_old:"}));
  EXPECT_EQ(ids("bob", true).size(), 4u);
  ASSERT_TRUE((*store)->PutFile({"file-9", "batch", "x.jsonl", 1, 1, "bob"}, "x").ok());
  EXPECT_EQ((*store)->GetFile("file-9")->owner, "bob");
}

TEST(BatchStoreTest, FilesRoundTripAndANonDatabaseIsRefusedByPath) {
  const std::string path = TempPath("files.db");
  auto store = BatchStore::Open(path);
  ASSERT_TRUE(store.ok());
  const std::string content("line one\n\0binary\n", 17);
  ASSERT_TRUE((*store)->PutFile({"file-1", "batch", "in.jsonl", 17, 5, "alice"}, content).ok());
  auto file = (*store)->GetFile("file-1");
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(file->filename, "in.jsonl");
  EXPECT_EQ(file->owner, "alice");
  EXPECT_EQ(*(*store)->FileContent("file-1"), content);
  EXPECT_EQ((*store)->GetFile("file-2").status().code(), absl::StatusCode::kNotFound);

  const std::string garbage = TempPath("garbage.db");
  std::ofstream(garbage) << std::string(4096, 'x');
  auto refused = BatchStore::Open(garbage);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find(garbage), std::string::npos);
}

// Files list newest first, one owner's or everyone's, by purpose, after a cursor; a deleted file
// is gone (and deleting it again is NOT_FOUND).
TEST(BatchStoreTest, FilesListByOwnerAndCursorAndDelete) {
  auto store = BatchStore::Open(TempPath("list-files.db"));
  ASSERT_TRUE(store.ok());
  for (const auto& [id, owner] : std::vector<std::pair<std::string, std::string>>{
           {"file-a", "alice"}, {"file-b", "bob"}, {"file-c", "alice"}, {"file-d", "alice"}}) {
    ASSERT_TRUE((*store)->PutFile({id, "batch", id + ".jsonl", 1, 1, owner}, "x").ok());
  }
  auto ids = [&](int limit, const std::string& after, const std::string& owner, bool everyone,
                 const std::string& purpose = "") {
    std::vector<std::string> out;
    auto files = (*store)->ListFiles(limit, after, owner, everyone, purpose);
    EXPECT_TRUE(files.ok()) << files.status();
    if (files.ok()) {
      for (const StoredFile& f : *files) out.push_back(f.id);
    }
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(ids(10, "", "alice", false), (V{"file-d", "file-c", "file-a"}));
  EXPECT_EQ(ids(10, "", "", true), (V{"file-d", "file-c", "file-b", "file-a"}));
  EXPECT_EQ(ids(1, "file-c", "", true), (V{"file-b"}));
  EXPECT_EQ(ids(10, "", "", true, "fine-tune"), V{});
  ASSERT_TRUE((*store)->DeleteFile("file-c").ok());
  EXPECT_EQ(ids(10, "", "alice", false), (V{"file-d", "file-a"}));
  // A cursor naming a deleted file still finds its place (list a page, delete it, go on).
  EXPECT_EQ(ids(10, "file-c", "", true), (V{"file-b", "file-a"}));
  EXPECT_EQ((*store)->FileContent("file-c").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*store)->DeleteFile("file-c").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*store)->GetFile("file-c").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace gemma::coordinator
