// Batch jobs on the real coordinator and workers: a batch of 300 items, some invalid, runs to
// completion while the coordinator is SIGKILLed and restarted on its data dir and a replica is
// SIGKILLed, and ends with exactly one result per custom_id, each equal to the same request
// sent alone; cancelling stops the rest and keeps what finished; gemmactl submits an OpenAI
// batch file, shows progress, and writes the OpenAI output and error files.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gemma/v1/batches.grpc.pb.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/cluster/cluster_harness.h"

namespace gemma::testing::cluster {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

std::vector<int32_t> Prompt(int i) {
  std::mt19937 rng(1000 + i);
  std::uniform_int_distribution<int32_t> id(5, 500);
  std::vector<int32_t> prompt = {2};
  for (int k = 0; k < 4 + i % 5; ++k) prompt.push_back(id(rng));
  return prompt;
}

class BatchTest : public ::testing::Test {
 protected:
  void StartCluster(int workers, std::vector<std::string> flags = {}) {
    data_dir_ = absl::StrCat(cluster_.dir(), "/data");
    std::string error;
    flags.insert(flags.begin(), {"--data-dir", data_dir_});
    ASSERT_TRUE(cluster_.StartCoordinator(flags, &error)) << error;
    for (int w = 0; w < workers; ++w) {
      cluster_.StartWorker(kTinyMoe, {"--tokenizer", kTinyMoe + "/tokenizer.json"});
    }
    ASSERT_TRUE(cluster_.WaitHealthy(workers, Clock::now() + seconds(30)))
        << cluster_.Log("worker0");
    Connect();
  }
  void Connect() {
    batches_ = gemma::v1::Batches::NewStub(grpc::CreateChannel(
        cluster_.coordinator_address(), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override { cluster_.Stop(milliseconds(10000)); }

  gemma::v1::Batch Create(const std::vector<gemma::v1::BatchItem>& items) {
    grpc::ClientContext context;
    gemma::v1::Batch batch;
    auto writer = batches_->CreateBatch(&context, &batch);
    for (const auto& item : items) {
      gemma::v1::CreateBatchRequest part;
      *part.mutable_item() = item;
      EXPECT_TRUE(writer->Write(part));
    }
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    EXPECT_TRUE(status.ok()) << status.error_message();
    return batch;
  }

  // The batch as the coordinator reports it; retried while the coordinator restarts.
  gemma::v1::Batch Get(const std::string& id) {
    gemma::v1::Batch batch;
    for (int attempt = 0; attempt < 100; ++attempt) {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + seconds(2));
      gemma::v1::GetBatchRequest request;
      request.set_id(id);
      if (batches_->GetBatch(&context, request, &batch).ok()) return batch;
      std::this_thread::sleep_for(milliseconds(100));
    }
    ADD_FAILURE() << "GetBatch " << id << " kept failing";
    return batch;
  }

  // Waits until `done` holds for the batch (or `timeout`); the batch last seen.
  gemma::v1::Batch WaitFor(const std::string& id,
                           const std::function<bool(const gemma::v1::Batch&)>& done,
                           seconds timeout = seconds(120)) {
    const auto deadline = Clock::now() + timeout;
    gemma::v1::Batch batch = Get(id);
    while (!done(batch) && Clock::now() < deadline) {
      std::this_thread::sleep_for(milliseconds(100));
      batch = Get(id);
    }
    return batch;
  }

  std::vector<gemma::v1::BatchResult> Results(const std::string& id) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + seconds(30));
    gemma::v1::StreamResultsRequest request;
    request.set_id(id);
    auto reader = batches_->StreamResults(&context, request);
    std::vector<gemma::v1::BatchResult> results;
    gemma::v1::BatchResult r;
    while (reader->Read(&r)) results.push_back(r);
    grpc::Status status = reader->Finish();
    EXPECT_TRUE(status.ok()) << status.error_message();
    return results;
  }

  // Joins a thread when the test leaves, also through a failed ASSERT (a joinable thread's
  // destructor would end the whole test binary).
  struct JoinOnExit {
    std::thread& thread;
    ~JoinOnExit() {
      if (thread.joinable()) thread.join();
    }
  };

  Cluster cluster_{"batch"};
  std::string data_dir_;
  std::unique_ptr<gemma::v1::Batches::Stub> batches_;
};

TEST_F(BatchTest, ThreeHundredItemsSurviveACoordinatorKillAndAReplicaKill) {
  // One item in flight per replica: the batch must still be running when each kill comes (with
  // workers back within a second or two of the restart, four in flight finished it first).
  StartCluster(2, {"--batch-max-in-flight-per-replica", "1"});
  constexpr int kItems = 300;
  constexpr int64_t kMaxTokens = 32;  // enough work per item that each kill finds it running
  std::vector<gemma::v1::BatchItem> items;
  std::set<std::string> invalid;
  for (int i = 0; i < kItems; ++i) {
    gemma::v1::BatchItem item;
    item.set_custom_id(absl::StrCat("item-", i));
    std::vector<int32_t> prompt = Prompt(i);
    if (i % 37 == 5) {
      prompt.push_back(100000);  // outside the vocabulary: refused on its own
      invalid.insert(item.custom_id());
    }
    *item.mutable_request() = TokenRequest(prompt, kMaxTokens);
    items.push_back(item);
  }
  const gemma::v1::Batch created = Create(items);
  ASSERT_EQ(created.status(), "in_progress");
  EXPECT_EQ(created.counts().total(), kItems);
  EXPECT_EQ(created.errors_size(), static_cast<int>(invalid.size()));
  for (const auto& e : created.errors()) {
    EXPECT_TRUE(invalid.count(e.custom_id())) << e.custom_id();
    EXPECT_TRUE(absl::StrContains(e.message(), "vocabulary")) << e.message();
  }

  // The coordinator dies mid-batch and comes back on the same data dir.
  gemma::v1::Batch batch = WaitFor(created.id(), [](const gemma::v1::Batch& b) {
    return b.counts().completed() >= 60;
  });
  ASSERT_GE(batch.counts().completed(), 60);
  ASSERT_LT(batch.counts().completed() + batch.counts().failed(), kItems)
      << "the batch finished before the coordinator could be killed";
  std::string error;
  std::cerr << "coordinator killed at " << batch.counts().completed() << " completed\n";
  ASSERT_TRUE(cluster_.RestartCoordinator(&error)) << error;
  Connect();
  ASSERT_TRUE(cluster_.WaitHealthy(2, Clock::now() + seconds(30))) << cluster_.Log("coordinator");
  // Then a replica dies; the other finishes the batch.
  batch = WaitFor(created.id(), [](const gemma::v1::Batch& b) {
    return b.counts().completed() >= 150;
  });
  // Not finished yet, or the kill proves nothing.
  ASSERT_LT(batch.counts().completed() + batch.counts().failed(), kItems);
  std::cerr << "replica killed at " << batch.counts().completed() << " completed\n";
  cluster_.worker(0).Kill();
  batch = WaitFor(created.id(), [](const gemma::v1::Batch& b) { return b.status() == "completed"; });
  ASSERT_EQ(batch.status(), "completed") << cluster_.Log("coordinator");
  EXPECT_EQ(batch.counts().completed(), kItems - static_cast<int>(invalid.size()));
  EXPECT_EQ(batch.counts().failed(), static_cast<int>(invalid.size()));

  // One result per custom_id, numbered 0, 1, ...; each valid one equal to the request alone.
  const std::vector<gemma::v1::BatchResult> results = Results(created.id());
  ASSERT_EQ(results.size(), static_cast<size_t>(kItems));
  std::map<std::string, gemma::v1::BatchResult> by_id;
  for (size_t i = 0; i < results.size(); ++i) {
    EXPECT_EQ(results[i].offset(), static_cast<int64_t>(i));
    EXPECT_TRUE(by_id.emplace(results[i].custom_id(), results[i]).second)
        << "two results for " << results[i].custom_id();
  }
  ASSERT_EQ(by_id.size(), static_cast<size_t>(kItems));
  for (int i = 0; i < kItems; ++i) {
    const std::string id = absl::StrCat("item-", i);
    const gemma::v1::BatchResult& r = by_id.at(id);
    if (invalid.count(id)) {
      EXPECT_EQ(r.error_code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT)) << id;
      continue;
    }
    ASSERT_EQ(r.error_code(), 0) << id << ": " << r.error_message();
    if (i % 3 != 0) continue;  // a third of them against the request sent alone
    StreamResult alone = Generate(cluster_.inference(), TokenRequest(Prompt(i), kMaxTokens));
    ASSERT_TRUE(alone.status.ok()) << alone.status.error_message();
    EXPECT_EQ(std::vector<int32_t>(r.response().token_ids().begin(),
                                   r.response().token_ids().end()),
              alone.ids)
        << id;
    EXPECT_EQ(r.response().final().finish_reason(), alone.final.finish_reason()) << id;
  }
  // Resuming the results from an offset gives the tail.
  grpc::ClientContext context;
  gemma::v1::StreamResultsRequest request;
  request.set_id(created.id());
  request.set_offset(kItems - 2);
  auto reader = batches_->StreamResults(&context, request);
  gemma::v1::BatchResult r;
  int tail = 0;
  while (reader->Read(&r)) EXPECT_EQ(r.custom_id(), results[kItems - 2 + tail++].custom_id());
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tail, 2);
}

TEST_F(BatchTest, CancellingStopsTheRestAndKeepsWhatFinished) {
  StartCluster(1);
  std::vector<gemma::v1::BatchItem> items;
  for (int i = 0; i < 200; ++i) {
    gemma::v1::BatchItem item;
    item.set_custom_id(absl::StrCat("c", i));
    *item.mutable_request() = TokenRequest(Prompt(i), 24);
    items.push_back(item);
  }
  const gemma::v1::Batch created = Create(items);
  WaitFor(created.id(), [](const gemma::v1::Batch& b) { return b.counts().completed() >= 4; });
  // gemmactl's results of a running batch: refused at once saying so, or with --wait written
  // as items finish until the batch ends (here: its cancellation).
  const std::string coordinator = cluster_.coordinator_address();
  ToolRun early = RunWithStdin({"gemmactl", "--coordinator", coordinator, "batch", "results",
                                created.id()},
                               "", seconds(10));
  EXPECT_EQ(early.exit_code, 1) << early.err;
  EXPECT_TRUE(absl::StrContains(early.err, "is in_progress")) << early.err;
  EXPECT_TRUE(absl::StrContains(early.err, "--wait")) << early.err;
  const std::string out = cluster_.dir() + "/running.jsonl";
  ToolRun waited;
  std::thread waiting([&] {
    waited = RunWithStdin({"gemmactl", "--coordinator", coordinator, "batch", "results",
                           created.id(), "--wait", "-o", out},
                          "", seconds(120));
  });
  JoinOnExit join_waiting{waiting};
  // gemmactl has read the batch (still running) once it opens its temporary output file.
  EXPECT_TRUE(PollUntil([&] { return std::filesystem::exists(out + ".partial"); },
                        milliseconds(10000)));
  // Cancelled with gemmactl, which says it stopped the batch (a batch with nothing in flight
  // goes straight to cancelled, which it read as "had already ended").
  ToolRun cancelled = RunWithStdin(
      {"gemmactl", "--coordinator", coordinator, "batch", "cancel", created.id()}, "");
  ASSERT_EQ(cancelled.exit_code, 0) << cancelled.err;
  EXPECT_TRUE(absl::StrContains(cancelled.err, "no new items start")) << cancelled.err;
  EXPECT_FALSE(absl::StrContains(cancelled.err, "had already ended")) << cancelled.err;
  const gemma::v1::Batch batch =
      WaitFor(created.id(), [](const gemma::v1::Batch& b) { return b.status() == "cancelled"; });
  ToolRun again = RunWithStdin(
      {"gemmactl", "--coordinator", coordinator, "batch", "cancel", created.id()}, "");
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_TRUE(absl::StrContains(again.err, "had already ended (cancelled)")) << again.err;
  ASSERT_EQ(batch.status(), "cancelled");
  EXPECT_GE(batch.counts().completed(), 4);
  EXPECT_LT(batch.counts().completed(), 200);
  EXPECT_GT(batch.cancelled_at(), 0);
  // Nothing runs after the cancellation; what finished stays readable.
  std::this_thread::sleep_for(milliseconds(500));
  EXPECT_EQ(Get(created.id()).counts().completed(), batch.counts().completed());
  waiting.join();
  EXPECT_EQ(waited.exit_code, 0) << waited.err;
  EXPECT_TRUE(absl::StrContains(waited.err, "writing results as items finish")) << waited.err;
  const std::string written = ReadFileToString(out);
  EXPECT_EQ(std::count(written.begin(), written.end(), '\n'), batch.counts().completed());
  const auto results = Results(created.id());
  EXPECT_EQ(static_cast<int64_t>(results.size()), batch.counts().completed());
  // Each a whole result (its end id or max_tokens), none a call cut short by the cancel.
  for (const auto& r : results) {
    EXPECT_EQ(r.error_code(), 0) << r.custom_id();
    const std::string reason = r.response().final().finish_reason();
    EXPECT_TRUE(reason == "max_tokens" || reason == "end_id") << r.custom_id() << ": " << reason;
    if (reason == "max_tokens") {
      EXPECT_EQ(r.response().token_ids_size(), 24) << r.custom_id();
    }
    EXPECT_LE(r.response().token_ids_size(), 24) << r.custom_id();
  }
}

// gemmactl follows a batch across a coordinator restart: submit --wait keeps its progress bar
// going (saying the coordinator is away), and results --wait resumes after the last result it
// wrote, so the output file has every item exactly once.
TEST_F(BatchTest, GemmactlFollowsABatchAcrossACoordinatorRestart) {
  StartCluster(1, {"--batch-max-in-flight-per-replica", "1"});
  std::string file;
  for (int i = 0; i < 60; ++i) {
    file += json{{"custom_id", absl::StrCat("f", i)},
                 {"method", "POST"},
                 {"url", "/v1/completions"},
                 {"body", {{"model", "gemma-4"}, {"prompt", absl::StrCat("Verse ", i)},
                           {"max_tokens", 24}, {"temperature", 0}}}}
                .dump() +
            "\n";
  }
  const std::string input = WriteFile(cluster_.dir() + "/follow.jsonl", file);
  const std::string coordinator = cluster_.coordinator_address();
  ToolRun submitted;
  std::thread submitting([&] {
    submitted = RunWithStdin({"gemmactl", "--coordinator", coordinator, "batch", "submit", input,
                              "--wait", "--json"},
                             "", seconds(180));
  });
  JoinOnExit join_submitting{submitting};
  // The batch appears; a follower of its results starts; then the coordinator restarts.
  std::string id;
  ASSERT_TRUE(PollUntil(
      [&] {
        grpc::ClientContext context;
        gemma::v1::ListBatchesResponse page;
        if (!batches_->ListBatches(&context, gemma::v1::ListBatchesRequest(), &page).ok() ||
            page.batches_size() == 0) {
          return false;
        }
        id = page.batches(0).id();
        return page.batches(0).counts().completed() >= 5;
      },
      milliseconds(30000)));
  const std::string out = cluster_.dir() + "/follow.out.jsonl";
  ToolRun results;
  std::thread following([&] {
    results = RunWithStdin({"gemmactl", "--coordinator", coordinator, "batch", "results", id,
                            "--wait", "-o", out},
                           "", seconds(180));
  });
  JoinOnExit join_following{following};
  WaitFor(id, [](const gemma::v1::Batch& b) { return b.counts().completed() >= 10; });
  std::string error;
  ASSERT_TRUE(cluster_.RestartCoordinator(&error)) << error;
  Connect();
  submitting.join();
  following.join();
  ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
  EXPECT_TRUE(absl::StrContains(submitted.err, "waiting for it to come back")) << submitted.err;
  EXPECT_EQ(json::parse(submitted.out)["status"], "completed") << submitted.out;
  ASSERT_EQ(results.exit_code, 0) << results.err;
  EXPECT_TRUE(absl::StrContains(results.err, "resuming after result")) << results.err;
  std::set<std::string> seen;
  for (absl::string_view text : absl::StrSplit(ReadFileToString(out), '\n', absl::SkipEmpty())) {
    EXPECT_TRUE(seen.insert(json::parse(text)["custom_id"].get<std::string>()).second) << text;
  }
  EXPECT_EQ(seen.size(), 60u) << results.err;
}

TEST_F(BatchTest, GemmactlSubmitsAnOpenAiFileAndWritesItsOutputFiles) {
  StartCluster(1);
  const std::string dir = cluster_.dir();
  auto line = [](const std::string& custom_id, const json& body) {
    return json{{"custom_id", custom_id},
                {"method", "POST"},
                {"url", "/v1/chat/completions"},
                {"body", body}}
        .dump();
  };
  auto chat = [](const std::string& text) {
    return json{{"model", "gemma-4"},
                {"messages", {{{"role", "user"}, {"content", text}}}},
                {"max_tokens", 5},
                {"temperature", 0}};
  };
  // A line that is not JSON refuses the whole file, naming the line.
  const std::string bad = WriteFile(dir + "/bad.jsonl", line("a", chat("one")) + "\n{oops\n");
  ToolRun refused = RunWithStdin(
      {"gemmactl", "--coordinator", cluster_.coordinator_address(), "batch", "submit", bad}, "");
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(refused.err, "line 2")) << refused.err;
  // A repeated custom_id too.
  const std::string twice =
      WriteFile(dir + "/twice.jsonl", line("a", chat("one")) + "\n" + line("a", chat("two")));
  ToolRun repeated = RunWithStdin(
      {"gemmactl", "--coordinator", cluster_.coordinator_address(), "batch", "submit", twice}, "");
  EXPECT_EQ(repeated.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(repeated.err, "appears twice")) << repeated.err;
  // A directory is named as one, not read as an empty batch.
  ToolRun directory = RunWithStdin(
      {"gemmactl", "--coordinator", cluster_.coordinator_address(), "batch", "submit", dir}, "");
  EXPECT_EQ(directory.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(directory.err, dir + " is a directory")) << directory.err;

  std::string file;
  for (int i = 0; i < 12; ++i) {
    json body = chat(absl::StrCat("Verse ", i));
    if (i == 7) body["n"] = 3;  // refused on its own
    file += line(absl::StrCat("q", i), body) + "\n";
  }
  const std::string input = WriteFile(dir + "/in.jsonl", file);
  ToolRun submitted = RunWithStdin({"gemmactl", "--coordinator", cluster_.coordinator_address(),
                                    "batch", "submit", input, "--wait", "--json"},
                                   "", seconds(120));
  ASSERT_EQ(submitted.exit_code, 0) << submitted.out << submitted.err;
  EXPECT_TRUE(absl::StrContains(submitted.err, "12/12 done, 1 failed")) << submitted.err;
  const json batch = json::parse(submitted.out);
  EXPECT_EQ(batch["status"], "completed");
  const std::string id = batch["id"];

  const std::string out = dir + "/out.jsonl";
  // --model-name is for items that named no model; these named gemma-4, which their bodies say.
  ToolRun results = RunWithStdin({"gemmactl", "--coordinator", cluster_.coordinator_address(),
                                  "batch", "results", id, "-o", out, "--model-name", "other"},
                                 "");
  ASSERT_EQ(results.exit_code, 0) << results.err;
  EXPECT_FALSE(std::filesystem::exists(out + ".partial"));
  std::set<std::string> seen;
  for (absl::string_view text : absl::StrSplit(ReadFileToString(out), '\n', absl::SkipEmpty())) {
    const json line_out = json::parse(text);
    const std::string custom_id = line_out["custom_id"];
    EXPECT_TRUE(seen.insert(custom_id).second) << custom_id;
    EXPECT_EQ(line_out["response"]["status_code"], 200);
    const json& body = line_out["response"]["body"];
    EXPECT_EQ(body["object"], "chat.completion");
    EXPECT_EQ(body["model"], "gemma-4");
    // Equal to the same chat sent alone.
    gemma::v1::GenerateRequest alone;
    auto* m = alone.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(absl::StrCat("Verse ", custom_id.substr(1)));
    alone.set_max_tokens(5);
    alone.set_skip_special_tokens(true);  // as the OpenAI API's bodies are by default
    StreamResult reference = Generate(cluster_.inference(), alone);
    EXPECT_EQ(body["choices"][0]["message"]["content"], reference.text) << custom_id;
    EXPECT_EQ(body["usage"]["completion_tokens"], reference.final.generated_tokens());
  }
  EXPECT_EQ(seen.size(), 11u);
  const std::string errors = ReadFileToString(out + ".errors.jsonl");
  const json error_line = json::parse(errors.substr(0, errors.find('\n')));
  EXPECT_EQ(error_line["custom_id"], "q7");
  EXPECT_EQ(error_line["response"]["status_code"], 400);
  EXPECT_TRUE(absl::StrContains(error_line["response"]["body"]["error"]["message"].get<std::string>(),
                                "n other than 1"))
      << errors;

  // Every item failing while it runs (each input longer than the context, which only the
  // replica's tokenizer finds): the batch still completes, as OpenAI's do ("failed" is for a
  // file refused as a whole), and its status says where each item's error is.
  std::string too_long;
  for (int i = 0; i < 5000; ++i) too_long += "and ";
  std::string failing;
  for (int i = 0; i < 3; ++i) failing += line(absl::StrCat("long", i), chat(too_long)) + "\n";
  ToolRun all_failed = RunWithStdin(
      {"gemmactl", "--coordinator", cluster_.coordinator_address(), "batch", "submit",
       WriteFile(dir + "/failing.jsonl", failing), "--wait", "--json"},
      "", seconds(120));
  ASSERT_EQ(all_failed.exit_code, 0) << all_failed.out << all_failed.err;
  const json failed_batch = json::parse(all_failed.out);
  EXPECT_EQ(failed_batch["status"], "completed") << all_failed.out;
  EXPECT_EQ(failed_batch["counts"]["failed"], "3") << all_failed.out;  // proto JSON: int64 as text
  ToolRun status = RunWithStdin({"gemmactl", "--coordinator", cluster_.coordinator_address(),
                                 "batch", "status", failed_batch["id"]},
                                "");
  ASSERT_EQ(status.exit_code, 0) << status.err;
  EXPECT_TRUE(absl::StrContains(status.out, "3 items failed while running")) << status.out;
  EXPECT_TRUE(absl::StrContains(status.out, "gemmactl batch results")) << status.out;

  // Every line refused at submission: the input failed as a whole, as OpenAI marks it. The
  // batch keeps its first 100 refusals and counts all 150; gemmactl names how many more.
  std::string refused_lines;
  for (int i = 0; i < 150; ++i) {
    json body = chat("x");
    body["n"] = 2;
    refused_lines += line(absl::StrCat("r", i), body) + "\n";
  }
  ToolRun all_refused = RunWithStdin(
      {"gemmactl", "--coordinator", cluster_.coordinator_address(), "batch", "submit",
       WriteFile(dir + "/refused.jsonl", refused_lines), "--wait", "--json"},
      "", seconds(60));
  const json refused_batch = json::parse(all_refused.out, nullptr, false);
  ASSERT_FALSE(refused_batch.is_discarded()) << all_refused.out << all_refused.err;
  EXPECT_EQ(refused_batch["status"], "failed") << all_refused.out;
  // Failed from the start: never shown as running.
  EXPECT_FALSE(absl::StrContains(all_refused.err, "in_progress")) << all_refused.err;
  EXPECT_EQ(refused_batch["errors"].size(), 100u);
  EXPECT_EQ(refused_batch["refused"], "150");  // proto JSON: int64 as text
  ToolRun listed = RunWithStdin(
      {"gemmactl", "--coordinator", cluster_.coordinator_address(), "batch", "list"}, "");
  ASSERT_EQ(listed.exit_code, 0) << listed.err;
  EXPECT_TRUE(absl::StrContains(listed.out, "... and 145 more refused lines")) << listed.out;
  EXPECT_LT(std::count(listed.out.begin(), listed.out.end(), '\n'), 30) << listed.out;
}

// The disk under --data-dir full (a 16 MiB tmpfs, filled up): a new batch is refused by gemmactl
// and a file upload by the OpenAI files endpoint (507), both saying the disk is full and that
// nothing was stored; what was stored stays readable; a batch running when the disk fills
// loses no item and stores none twice; once space is freed the same batch is taken, and the
// database passes SQLite's integrity check. Needs root (CI runs as root) to mount the tmpfs.
TEST_F(BatchTest, AFullDataDirRefusesNewBatchesClearlyAndCorruptsNothing) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to mount a small tmpfs as the data dir";
  const std::string data = absl::StrCat(cluster_.dir(), "/data");
  std::filesystem::create_directories(data);
  ToolRun mounted =
      RunWithStdin({"/bin/mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", data}, "");
  if (mounted.exit_code != 0) GTEST_SKIP() << "cannot mount a tmpfs here: " << mounted.err;
  struct Unmount {
    std::string dir;
    ~Unmount() { RunWithStdin({"/bin/umount", "-l", dir}, ""); }
  } unmount{data};
  const std::string http = absl::StrCat("127.0.0.1:", FreeLocalPort());
  StartCluster(1, {"--http-listen", http, "--batch-max-in-flight-per-replica", "2"});
  if (HasFatalFailure()) return;

  auto items = [](int n, int max_tokens) {
    std::vector<gemma::v1::BatchItem> list;
    for (int i = 0; i < n; ++i) {
      gemma::v1::BatchItem item;
      item.set_custom_id(absl::StrCat("item-", i));
      *item.mutable_request() = TokenRequest(Prompt(i), max_tokens);
      list.push_back(item);
    }
    return list;
  };
  auto done = [](const gemma::v1::Batch& b) { return b.status() == "completed"; };
  const gemma::v1::Batch stored = Create(items(6, 8));
  ASSERT_TRUE(done(WaitFor(stored.id(), done)));
  const std::vector<gemma::v1::BatchResult> stored_results = Results(stored.id());
  ASSERT_EQ(stored_results.size(), 6u);

  // A batch that runs while the disk fills up.
  const gemma::v1::Batch running = Create(items(40, 24));
  const std::string filler = data + "/filler";
  auto fill = [&] {
    std::ofstream out(filler, std::ios::binary | std::ios::app);
    const std::string block(64 * 1024, 'x');
    while (out.write(block.data(), block.size()) && out.flush()) {
    }
  };
  fill();

  std::string file;
  for (int i = 0; i < 300; ++i) {
    file += json{{"custom_id", absl::StrCat("q", i)},
                 {"method", "POST"},
                 {"url", "/v1/completions"},
                 {"body", {{"model", "gemma-4"}, {"prompt", Prompt(i)}, {"max_tokens", 4}}}}
                .dump() +
            "\n";
  }
  const std::string input = WriteFile(cluster_.dir() + "/in.jsonl", file);
  auto submit = [&](bool wait) {
    std::vector<std::string> args = {"gemmactl", "--coordinator", cluster_.coordinator_address(),
                                     "batch", "submit", input, "--json"};
    if (wait) args.push_back("--wait");
    return RunWithStdin(args, "", seconds(180));
  };
  fill();  // what the running batch freed meanwhile
  ToolRun refused = submit(false);
  EXPECT_EQ(refused.exit_code, 1) << refused.out;
  EXPECT_TRUE(absl::StrContains(refused.err, "the disk under the coordinator's --data-dir is full"))
      << refused.err;
  EXPECT_TRUE(absl::StrContains(refused.err, "nothing of this change was stored")) << refused.err;
  const size_t colon = http.rfind(':');
  httplib::Client client(http.substr(0, colon), std::stoi(http.substr(colon + 1)));
  fill();
  httplib::MultipartFormDataItems upload = {{"purpose", "batch", "", ""},
                                            {"file", file, "in.jsonl", "application/jsonl"}};
  auto uploaded = client.Post("/v1/files", upload);
  ASSERT_TRUE(uploaded);
  EXPECT_EQ(uploaded->status, 507) << uploaded->body;
  EXPECT_TRUE(absl::StrContains(uploaded->body, "is full")) << uploaded->body;
  // What was stored reads as before.
  const std::vector<gemma::v1::BatchResult> again = Results(stored.id());
  ASSERT_EQ(again.size(), stored_results.size());
  for (size_t i = 0; i < again.size(); ++i) {
    EXPECT_EQ(again[i].SerializeAsString(), stored_results[i].SerializeAsString());
  }

  // Space again: the running batch ends with one result per item, and the refused one is taken.
  std::this_thread::sleep_for(milliseconds(1500));
  std::filesystem::remove(filler);
  const gemma::v1::Batch finished = WaitFor(running.id(), done, seconds(180));
  EXPECT_EQ(finished.status(), "completed");
  std::set<std::string> seen;
  for (const gemma::v1::BatchResult& r : Results(running.id())) {
    EXPECT_TRUE(seen.insert(r.custom_id()).second) << r.custom_id() << " stored twice";
    EXPECT_TRUE(r.has_response()) << r.custom_id() << ": " << r.error_message();
  }
  EXPECT_EQ(seen.size(), 40u);
  ToolRun taken = submit(true);
  EXPECT_EQ(taken.exit_code, 0) << taken.err;
  EXPECT_TRUE(absl::StrContains(taken.err, "300/300 done")) << taken.err;

  cluster_.Stop(milliseconds(10000));
  ToolRun check = RunWithStdin(
      {"/usr/bin/python3", "-c",
       "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
       "'pragma integrity_check').fetchone()[0])",
       data + "/batches.db"},
      "");
  EXPECT_EQ(check.out, "ok\n") << check.err;
}

TEST_F(BatchTest, WithoutADataDirBatchesAreRefusedSayingHowToGetThem) {
  std::string error;
  const int http_port = FreeLocalPort();
  ASSERT_TRUE(cluster_.StartCoordinator(
      {"--http-listen", absl::StrCat("127.0.0.1:", http_port)}, &error))
      << error;
  Connect();
  grpc::ClientContext context;
  gemma::v1::ListBatchesRequest request;
  gemma::v1::ListBatchesResponse response;
  grpc::Status status = batches_->ListBatches(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "--data-dir")) << status.error_message();
  // The HTTP API's Files and Batches paths say the same (not "405 takes GET, not GET").
  httplib::Client http("127.0.0.1", http_port);
  for (const char* path : {"/v1/files", "/v1/batches"}) {
    auto answer = http.Get(path);
    ASSERT_TRUE(answer) << path;
    EXPECT_EQ(answer->status, 404) << path;
    EXPECT_TRUE(absl::StrContains(answer->body, "--data-dir")) << answer->body;
  }
}

}  // namespace
}  // namespace gemma::testing::cluster
