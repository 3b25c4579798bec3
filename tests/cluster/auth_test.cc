// Bearer tokens on the real coordinator (--auth-tokens): a worker joins only with a worker
// token (and says why when refused), gemmactl and the official openai client need a user
// token, a token of the wrong role is refused naming the role, and everything that goes through
// the coordinator's own in-process calls (the OpenAI API, batch jobs) still works.
#include <signal.h>

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/cluster/cluster_harness.h"

namespace gemma::testing::cluster {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr char kUser[] = "user-token-5f1c0a7e93";
constexpr char kWorker[] = "worker-token-b2d84c1f06";
constexpr char kOtherUser[] = "user-token-bob-77c2e910";
constexpr char kAdmin[] = "admin-token-0e5d2b8a41";

class AuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string tokens = WriteFile(cluster_.dir() + "/tokens",
                                         absl::StrCat("# token role name\n", kUser,
                                                      " user alice\n", kWorker, " worker nodes\n",
                                                      kOtherUser, " user bob\n", kAdmin,
                                                      " admin ops\n"));
    http_ = absl::StrCat("127.0.0.1:", FreeLocalPort());
    std::string error;
    ASSERT_TRUE(cluster_.StartCoordinator({"--auth-tokens", tokens, "--http-listen", http_,
                                           "--data-dir", cluster_.dir() + "/data"},
                                          &error))
        << error;
  }
  void TearDown() override { cluster_.Stop(milliseconds(10000)); }

  ToolRun Gemmactl(std::vector<std::string> args, const std::string& token) {
    args.insert(args.begin(), {"gemmactl", "--coordinator", cluster_.coordinator_address()});
    if (!token.empty()) args.push_back("--token=" + token);
    return RunWithStdin(args, "", seconds(60));
  }

  Cluster cluster_{"auth"};
  std::string http_;
};

TEST_F(AuthTest, OnlyTheRightTokensGetIn) {
  // Workers: none, or a user's, are refused with the reason; a worker token joins (two ranks:
  // the rendezvous store's calls carry it too).
  for (const std::string& token : {std::string(), std::string(kUser)}) {
    std::vector<std::string> args = {kBin + "gemma-worker", "--coordinator",
                                     cluster_.coordinator_address(), "--model", kTinyMoe,
                                     "--register-timeout-s", "5"};
    if (!token.empty()) args.push_back("--join-token=" + token);
    const std::string log = cluster_.dir() + "/refused_worker.log";
    ChildProcess refused(args, log);
    EXPECT_EQ(refused.WaitForExitCode(seconds(60)), 1) << ReadFileToString(log);
    EXPECT_TRUE(absl::StrContains(ReadFileToString(log),
                                  token.empty() ? "Register needs a bearer token"
                                                : "not for the user role"))
        << ReadFileToString(log);
  }
  cluster_.StartWorker(kTinyMoe, {"--cpu-ranks", "2", absl::StrCat("--join-token=", kWorker)});
  ASSERT_TRUE(PollUntil(
      [&] {
        ToolRun status = Gemmactl({"status", "--json"}, kUser);
        return status.exit_code == 0 && absl::StrContains(status.out, "\"healthy\":true");
      },
      milliseconds(30000)))
      << cluster_.Log("worker0");

  // gemmactl: no token, an unknown one, a worker's, then a user's.
  ToolRun none = Gemmactl({"status"}, "");
  EXPECT_EQ(none.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(none.err, "UNAUTHENTICATED: GetStatus needs a bearer token"))
      << none.err;
  ToolRun unknown = Gemmactl({"status"}, "not-a-real-token-at-all");
  EXPECT_TRUE(absl::StrContains(unknown.err, "not known")) << unknown.err;
  ToolRun worker = Gemmactl({"generate", "In the beginning", "--max-tokens", "4"}, kWorker);
  EXPECT_EQ(worker.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(worker.err, "PERMISSION_DENIED")) << worker.err;
  ToolRun user = Gemmactl({"generate", "--tokens", "2,17,301", "--max-tokens", "4"}, kUser);
  EXPECT_EQ(user.exit_code, 0) << user.err;
  // What only an admin may do says so.
  ToolRun drain = Gemmactl({"drain", "r1"}, kUser);
  EXPECT_EQ(drain.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(drain.err, "(it needs an admin token)")) << drain.err;

  // A batch: its items go through the coordinator's own calls.
  const std::string file = WriteFile(
      cluster_.dir() + "/batch.jsonl",
      nlohmann::json{{"custom_id", "a"},
                     {"method", "POST"},
                     {"url", "/v1/completions"},
                     {"body", {{"model", "gemma-4"}, {"prompt", "In"}, {"max_tokens", 3}}}}
          .dump());
  ToolRun batch = Gemmactl({"batch", "submit", file, "--wait"}, kUser);
  EXPECT_EQ(batch.exit_code, 0) << batch.out << batch.err;

  // HTTP: /v1 needs the token (OpenAI's error shape), /metrics stays open.
  const size_t colon = http_.rfind(':');
  httplib::Client http(http_.substr(0, colon), std::stoi(http_.substr(colon + 1)));
  auto refused = http.Get("/v1/models");
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->status, 401);
  EXPECT_EQ(nlohmann::json::parse(refused->body)["error"]["type"], "authentication_error");
  auto allowed = http.Get("/v1/models", {{"Authorization", absl::StrCat("Bearer ", kUser)}});
  ASSERT_TRUE(allowed);
  EXPECT_EQ(allowed->status, 200) << allowed->body;
  auto metrics = http.Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_EQ(metrics->status, 200);

  // The official openai client, with the user token as its api_key, and with a wrong one.
  const std::string script = WriteFile(cluster_.dir() + "/client.py", R"(
import sys, openai
base, good = sys.argv[1], sys.argv[2]
ok = openai.OpenAI(base_url=base, api_key=good, max_retries=0).chat.completions.create(
    model="gemma-4", messages=[{"role": "user", "content": "In the beginning"}], max_tokens=3,
    temperature=0)
print("ok", 1 <= ok.usage.completion_tokens <= 3)  # an end id may come first
try:
    openai.OpenAI(base_url=base, api_key="wrong-key-0000000000", max_retries=0).models.list()
    print("accepted")
except openai.AuthenticationError as e:
    print("refused", e.status_code)
)");
  ToolRun client = RunWithStdin({GEMMA_TEST_PYTHON, script, absl::StrCat("http://", http_, "/v1"),
                                 kUser},
                                "", seconds(60));
  ASSERT_EQ(client.exit_code, 0) << client.out << client.err;
  EXPECT_TRUE(absl::StrContains(client.out, "ok True")) << client.out;
  EXPECT_TRUE(absl::StrContains(client.out, "refused 401")) << client.out;
}

// Batches and uploaded files belong to the token that made them: another user can neither see,
// read nor cancel them (gRPC through gemmactl, and the OpenAI files and batches endpoints), an
// admin token can; each user's list holds only their own batches.
TEST_F(AuthTest, BatchesAndFilesBelongToTheirOwner) {
  std::string file;
  for (int i = 0; i < 3; ++i) {
    file += nlohmann::json{{"custom_id", absl::StrCat("q", i)},
                           {"method", "POST"},
                           {"url", "/v1/completions"},
                           {"body", {{"model", "gemma-4"}, {"prompt", "private"}, {"max_tokens", 2}}}}
                .dump() +
            "\n";
  }
  const std::string input = WriteFile(cluster_.dir() + "/alice.jsonl", file);
  ToolRun submitted = Gemmactl({"batch", "submit", input, "--json"}, kUser);
  ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
  const std::string id = nlohmann::json::parse(submitted.out)["id"];
  EXPECT_EQ(nlohmann::json::parse(submitted.out)["owner"], "alice") << submitted.out;

  for (const std::vector<std::string>& command :
       {std::vector<std::string>{"batch", "status", id},
        std::vector<std::string>{"batch", "results", id},
        std::vector<std::string>{"batch", "cancel", id}}) {
    ToolRun refused = Gemmactl(command, kOtherUser);
    EXPECT_EQ(refused.exit_code, 1) << command[1];
    EXPECT_TRUE(absl::StrContains(refused.err, "belongs to another user")) << refused.err;
  }
  ToolRun bob_list = Gemmactl({"batch", "list", "--json"}, kOtherUser);
  EXPECT_EQ(bob_list.exit_code, 0) << bob_list.err;
  EXPECT_FALSE(absl::StrContains(bob_list.out, id)) << bob_list.out;
  ToolRun alice_list = Gemmactl({"batch", "list", "--json"}, kUser);
  EXPECT_TRUE(absl::StrContains(alice_list.out, id)) << alice_list.out;
  ToolRun admin = Gemmactl({"batch", "status", id}, kAdmin);
  EXPECT_EQ(admin.exit_code, 0) << admin.err;
  ToolRun admin_list = Gemmactl({"batch", "list", "--json"}, kAdmin);
  EXPECT_TRUE(absl::StrContains(admin_list.out, id)) << admin_list.out;

  // The same over HTTP: alice uploads a file and makes a batch of it; bob gets 403 for each.
  const size_t colon = http_.rfind(':');
  httplib::Client client(http_.substr(0, colon), std::stoi(http_.substr(colon + 1)));
  auto as = [](const char* token) {
    return httplib::Headers{{"Authorization", std::string("Bearer ") + token}};
  };
  httplib::MultipartFormDataItems upload = {{"purpose", "batch", "", ""},
                                            {"file", file, "in.jsonl", "application/jsonl"}};
  auto uploaded = client.Post("/v1/files", as(kUser), upload);
  ASSERT_TRUE(uploaded && uploaded->status == 200) << (uploaded ? uploaded->body : "no answer");
  const std::string file_id = nlohmann::json::parse(uploaded->body)["id"];
  auto created = client.Post("/v1/batches", as(kUser),
                             nlohmann::json{{"input_file_id", file_id},
                                            {"endpoint", "/v1/completions"},
                                            {"completion_window", "24h"}}
                                 .dump(),
                             "application/json");
  ASSERT_TRUE(created && created->status == 200) << (created ? created->body : "no answer");
  const std::string http_batch = nlohmann::json::parse(created->body)["id"];
  auto bob_uses_file = client.Post("/v1/batches", as(kOtherUser),
                                   nlohmann::json{{"input_file_id", file_id},
                                                  {"endpoint", "/v1/completions"},
                                                  {"completion_window", "24h"}}
                                       .dump(),
                                   "application/json");
  ASSERT_TRUE(bob_uses_file);
  EXPECT_EQ(bob_uses_file->status, 403) << bob_uses_file->body;
  for (const std::string& path :
       {"/v1/files/" + file_id, "/v1/files/" + file_id + "/content", "/v1/batches/" + http_batch}) {
    auto got = client.Get(path, as(kOtherUser));
    ASSERT_TRUE(got) << path;
    EXPECT_EQ(got->status, 403) << path << ": " << got->body;
    EXPECT_TRUE(absl::StrContains(got->body, "belongs to another user")) << got->body;
    auto mine = client.Get(path, as(kUser));
    ASSERT_TRUE(mine);
    EXPECT_EQ(mine->status, 200) << path << ": " << mine->body;
  }
  auto cancelled = client.Post("/v1/batches/" + http_batch + "/cancel", as(kOtherUser), "",
                               "application/json");
  ASSERT_TRUE(cancelled);
  EXPECT_EQ(cancelled->status, 403) << cancelled->body;
  auto listed = client.Get("/v1/batches", as(kOtherUser));
  ASSERT_TRUE(listed && listed->status == 200);
  EXPECT_FALSE(absl::StrContains(listed->body, http_batch)) << listed->body;
  auto by_admin = client.Post("/v1/batches/" + http_batch + "/cancel", as(kAdmin), "",
                              "application/json");
  ASSERT_TRUE(by_admin);
  EXPECT_EQ(by_admin->status, 200) << by_admin->body;
}

// TLS on both ports (--tls-cert, a certificate made here by openssl for 127.0.0.1): a worker
// joins verifying it (--coordinator-ca), gemmactl needs the CA and says so without it, the
// OpenAI client verifies it too, and plaintext HTTP gets nothing.
TEST(TlsTest, BothPortsSpeakTlsAndClientsVerifyTheCoordinator) {
  Cluster cluster("tls");
  const std::string cert = cluster.dir() + "/tls.crt", key = cluster.dir() + "/tls.key";
  ToolRun made = RunWithStdin(
      {"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
       "-out", cert, "-days", "2", "-subj", "/CN=localhost", "-addext",
       "subjectAltName=IP:127.0.0.1,DNS:localhost"},
      "");
  ASSERT_EQ(made.exit_code, 0) << made.err;
  const std::string address = absl::StrCat("127.0.0.1:", FreeLocalPort());
  const std::string http = absl::StrCat("127.0.0.1:", FreeLocalPort());
  // TLS without tokens: still --insecure (open to anyone who can reach it).
  ChildProcess coordinator({kBin + "gemma-coordinator", "--listen", address, "--http-listen", http,
                            "--tls-cert", cert, "--tls-key", key, "--insecure"},
                           cluster.dir() + "/coordinator.log");
  ChildProcess worker({kBin + "gemma-worker", "--coordinator", address, "--coordinator-ca", cert,
                       "--model", kTinyMoe, "--cpu-ranks", "2", "--threads", "1"},
                      cluster.dir() + "/worker.log");
  auto gemmactl = [&](std::vector<std::string> args, bool with_ca) {
    args.insert(args.begin(), {"gemmactl", "--coordinator", address, "--connect-timeout-ms",
                               "1500"});
    if (with_ca) args.push_back("--tls-ca=" + cert);
    return RunWithStdin(args, "", seconds(30));
  };
  ASSERT_TRUE(PollUntil(
      [&] {
        ToolRun status = gemmactl({"status", "--json"}, true);
        return status.exit_code == 0 && absl::StrContains(status.out, "\"healthy\":true");
      },
      milliseconds(30000)))
      << ReadFileToString(cluster.dir() + "/worker.log")
      << ReadFileToString(cluster.dir() + "/coordinator.log");
  ToolRun generated = gemmactl({"generate", "--tokens", "2,17,301", "--max-tokens", "4"}, true);
  EXPECT_EQ(generated.exit_code, 0) << generated.err;
  ToolRun without_ca = gemmactl({"status"}, false);
  EXPECT_EQ(without_ca.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(without_ca.err, "give its CA with --tls-ca")) << without_ca.err;

  const std::string script = WriteFile(cluster.dir() + "/client.py", R"(
import sys, openai
base, ca = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="-", max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=ca))
print("models", [m.id for m in client.models.list().data])
)");
  ToolRun client = RunWithStdin({GEMMA_TEST_PYTHON, script, absl::StrCat("https://", http, "/v1"),
                                 cert},
                                "", seconds(60));
  EXPECT_EQ(client.exit_code, 0) << client.out << client.err;
  EXPECT_TRUE(absl::StrContains(client.out, "models ['gemma-4']")) << client.out;
  const size_t colon = http.rfind(':');
  httplib::Client plain(http.substr(0, colon), std::stoi(http.substr(colon + 1)));
  plain.set_connection_timeout(2, 0);
  auto refused = plain.Get("/v1/models");
  EXPECT_TRUE(!refused || refused->status != 200);
  worker.Signal(SIGTERM);
  worker.WaitForExitCode(seconds(10));
}

// Certificates made by openssl in `dir`: CAs, and certificates they sign (by default for
// 127.0.0.1 and localhost).
class Pki {
 public:
  explicit Pki(std::string dir) : dir_(std::move(dir)) {}
  void Ca(const std::string& name) {
    Run({"req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", dir_ + name + ".key",
         "-out", dir_ + name + ".crt", "-days", "2", "-subj", "/CN=" + name});
  }
  // Valid for `days` (negative: expired).
  void Cert(const std::string& name, const std::string& ca, int days,
            const std::string& san = "IP:127.0.0.1,DNS:localhost") {
    const std::string ext = WriteFile(dir_ + name + ".ext", "subjectAltName=" + san + "\n");
    Run({"req", "-newkey", "rsa:2048", "-nodes", "-keyout", dir_ + name + ".key", "-out",
         dir_ + name + ".csr", "-subj", "/CN=" + name});
    Run({"x509", "-req", "-in", dir_ + name + ".csr", "-CA", dir_ + ca + ".crt", "-CAkey",
         dir_ + ca + ".key", "-CAcreateserial", "-out", dir_ + name + ".crt", "-days",
         absl::StrCat(days), "-extfile", ext});
  }

 private:
  void Run(std::vector<std::string> args) {
    args.insert(args.begin(), "/usr/bin/openssl");
    ToolRun run = RunWithStdin(args, "");
    EXPECT_EQ(run.exit_code, 0) << run.err;
  }
  std::string dir_;
};

// A replica's Generate called directly (not through the coordinator) with `credentials`: the
// responses it streamed and how it finished.
std::pair<int, grpc::Status> CallReplica(
    const std::string& address, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const grpc::ChannelArguments& args, const std::vector<int32_t>& prompt) {
  auto stub = gemma::internal::v1::Replica::NewStub(
      grpc::CreateCustomChannel(address, credentials, args));
  gemma::internal::v1::ReplicaGenerateRequest request;
  *request.mutable_request() = TokenRequest(prompt, 4);
  grpc::ClientContext context;
  context.set_deadline(In(milliseconds(5000)));
  auto reader = stub->Generate(&context, request);
  gemma::internal::v1::ReplicaGenerateResponse response;
  int messages = 0;
  while (reader->Read(&response)) ++messages;
  return {messages, reader->Finish()};
}

// Mutual TLS on a separate internal port (--internal-listen, --internal-ca), with certificates
// made here by openssl: the public port no longer takes workers; a worker joins only with a
// certificate the cluster CA signed (and serves its replica port over TLS, to the coordinator
// alone), and each way of getting it wrong is refused at once, saying what is wrong.
TEST(MutualTlsTest, OnlyWorkersCertifiedByTheClusterCaJoinTheInternalPort) {
  Cluster cluster("mtls");
  const std::string d = cluster.dir() + "/";
  Pki pki(d);
  pki.Ca("cluster-ca");
  pki.Ca("other-ca");
  pki.Cert("coordinator", "cluster-ca", 2);
  pki.Cert("worker", "cluster-ca", 2);
  pki.Cert("stranger", "other-ca", 2);
  pki.Cert("expired", "cluster-ca", -1);
  if (::testing::Test::HasFailure()) return;

  const std::string internal = absl::StrCat("127.0.0.1:", FreeLocalPort());
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator(
      {"--internal-listen", internal, "--internal-tls-cert", d + "coordinator.crt",
       "--internal-tls-key", d + "coordinator.key", "--internal-ca", d + "cluster-ca.crt"},
      &error))
      << error;
  ASSERT_TRUE(PollUntil(
      [&] { return absl::StrContains(cluster.Log("coordinator"), "(mutual TLS)"); },
      milliseconds(10000)));

  // Each refused worker exits 1 within seconds, its log saying why.
  auto refused = [&](const std::string& what, const std::vector<std::string>& flags,
                     const std::string& expected) {
    std::vector<std::string> args = {kBin + "gemma-worker", "--model", kTinyMoe,
                                     "--register-timeout-s", "4", "--threads", "1"};
    args.insert(args.end(), flags.begin(), flags.end());
    const std::string log = d + "refused_" + what + ".log";
    ChildProcess worker(args, log);
    EXPECT_EQ(worker.WaitForExitCode(seconds(60)), 1) << what << ": " << ReadFileToString(log);
    EXPECT_TRUE(absl::StrContains(ReadFileToString(log), expected))
        << what << ": " << ReadFileToString(log);
  };
  const std::vector<std::string> to_internal = {"--coordinator", internal, "--coordinator-ca",
                                                d + "cluster-ca.crt"};
  auto with = [&](std::vector<std::string> flags, const std::string& cert,
                  const std::string& key) {
    flags.push_back("--tls-cert=" + d + cert);
    flags.push_back("--tls-key=" + d + key);
    return flags;
  };
  refused("no_certificate", to_internal,
          "needs a client certificate signed by its --internal-ca");
  refused("stranger", with(to_internal, "stranger.crt", "stranger.key"),
          "check that --coordinator-ca is the CA of the coordinator's certificate, that "
          "--tls-cert is signed by the CA the coordinator trusts");
  refused("expired", with(to_internal, "expired.crt", "expired.key"),
          "expired on ");
  refused("wrong_key", with(to_internal, "worker.crt", "stranger.key"),
          "does not belong to the certificate --tls-cert");
  refused("public_port",
          with({"--coordinator", cluster.coordinator_address()}, "worker.crt", "worker.key"),
          "give the CA of the coordinator's certificate too");
  refused("public_port_plain", {"--coordinator", cluster.coordinator_address()},
          "does not take workers on this port");
  refused("plaintext", {"--coordinator", internal},
          "it closed the connection at once: if it speaks TLS");
  EXPECT_EQ(cluster.HealthyReplicas(), 0);

  // The certified worker joins with two rank processes (the rendezvous store goes over the
  // same mutual-TLS channel) and serves through the public port.
  cluster.StartWorker(kTinyMoe, with(to_internal, "worker.crt", "worker.key"));
  cluster.StartWorker(kTinyMoe, with({"--cpu-ranks", "2", "--coordinator", internal,
                                      "--coordinator-ca", d + "cluster-ca.crt"},
                                     "worker.crt", "worker.key"));
  ASSERT_TRUE(cluster.WaitHealthy(2, Clock::now() + seconds(60)))
      << cluster.Log("worker0") << cluster.Log("worker1") << cluster.Log("coordinator");
  const std::vector<int32_t> prompt = {2, 17, 301, 44};
  const std::vector<int32_t> expected = GemmaGenerate(kTinyMoe, prompt, 12);
  for (int i = 0; i < 4; ++i) {
    StreamResult result = Generate(cluster.inference(), TokenRequest(prompt, 12));
    EXPECT_TRUE(result.status.ok()) << result.status.error_message();
    EXPECT_EQ(result.ids, expected);
  }

  // The replica port takes calls from the coordinator's certificate only.
  const gemma::v1::GetStatusResponse status = cluster.Status();
  ASSERT_GT(status.replicas_size(), 0);
  const std::string replica = status.replicas(0).address();
  auto call_replica = [&](const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
    return CallReplica(replica, credentials, grpc::ChannelArguments(), prompt);
  };
  grpc::SslCredentialsOptions server_only;
  server_only.pem_root_certs = ReadFileToString(d + "cluster-ca.crt");
  for (const auto& credentials :
       {grpc::InsecureChannelCredentials(), grpc::SslCredentials(server_only)}) {
    auto [messages, finished] = call_replica(credentials);
    EXPECT_EQ(messages, 0);
    EXPECT_EQ(finished.error_code(), grpc::StatusCode::UNAVAILABLE) << finished.error_message();
  }
  cluster.Stop(milliseconds(10000));
}

// Pods get their addresses after their certificates are made: every worker presents one
// certificate naming "gemma-worker" (no address), and --replica-tls-name makes the coordinator
// check that name instead of each replica's address. The worker's plaintext --health-listen
// port answers probes from the start, and stops answering SERVING when it drains.
TEST(MutualTlsTest, WorkersShareOneCertificateNamedByReplicaTlsNameAndProbeInPlaintext) {
  Cluster cluster("mtls_name");
  const std::string d = cluster.dir() + "/";
  Pki pki(d);
  pki.Ca("cluster-ca");
  pki.Cert("coordinator", "cluster-ca", 2);
  pki.Cert("worker", "cluster-ca", 2, "DNS:gemma-worker");
  if (::testing::Test::HasFailure()) return;
  const std::string internal = absl::StrCat("127.0.0.1:", FreeLocalPort());
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator(
      {"--internal-listen", internal, "--internal-tls-cert", d + "coordinator.crt",
       "--internal-tls-key", d + "coordinator.key", "--internal-ca", d + "cluster-ca.crt",
       "--replica-tls-name", "gemma-worker"},
      &error))
      << error;
  const std::string health = absl::StrCat("127.0.0.1:", FreeLocalPort());
  ChildProcess worker({kBin + "gemma-worker", "--model", kTinyMoe, "--threads", "1",
                       "--coordinator", internal, "--coordinator-ca", d + "cluster-ca.crt",
                       "--tls-cert", d + "worker.crt", "--tls-key", d + "worker.key",
                       "--health-listen", health, "--coordinator-tls-name", "coordinator"},
                      d + "worker.log");
  EXPECT_TRUE(WaitServing(health, Clock::now() + seconds(30))) << ReadFileToString(d + "worker.log");
  ASSERT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(60)))
      << ReadFileToString(d + "worker.log") << cluster.Log("coordinator");
  // Readiness: its ranks have loaded.
  EXPECT_TRUE(WaitServing(health, Clock::now() + seconds(10), "gemma.worker.Ready"))
      << ReadFileToString(d + "worker.log");
  // The coordinator reaches the replica (at 127.0.0.1, which the certificate does not name).
  const std::vector<int32_t> prompt = {2, 17, 301, 44};
  StreamResult result = Generate(cluster.inference(), TokenRequest(prompt, 8));
  EXPECT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.ids, GemmaGenerate(kTinyMoe, prompt, 8));
  // Another holder of a certificate from the same CA (the workers' shared one) may not call the
  // replica directly: --coordinator-tls-name admits the coordinator's certificate alone.
  {
    grpc::SslCredentialsOptions as_worker;
    as_worker.pem_root_certs = ReadFileToString(d + "cluster-ca.crt");
    as_worker.pem_cert_chain = ReadFileToString(d + "worker.crt");
    as_worker.pem_private_key = ReadFileToString(d + "worker.key");
    grpc::ChannelArguments args;
    args.SetSslTargetNameOverride("gemma-worker");
    const auto [messages, finished] = CallReplica(cluster.Status().replicas(0).address(),
                                                  grpc::SslCredentials(as_worker), args, prompt);
    EXPECT_EQ(messages, 0);
    EXPECT_EQ(finished.error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << finished.error_message();
    EXPECT_TRUE(absl::StrContains(finished.error_message(), "--coordinator-tls-name"))
        << finished.error_message();
  }
  worker.Signal(SIGTERM);
  EXPECT_TRUE(PollUntil([&] { return !WaitServing(health, Clock::now() + milliseconds(200)); },
                        milliseconds(10000)));
  EXPECT_FALSE(WaitServing(health, Clock::now() + milliseconds(200), "gemma.worker.Ready"));
  EXPECT_EQ(worker.WaitForExitCode(seconds(30)), 0) << ReadFileToString(d + "worker.log");
  cluster.Stop(milliseconds(10000));
}

// The worker's new flags refuse nonsense at start-up, saying which flag and why.
TEST(WorkerFlagsTest, NewFlagsRefuseNonsenseNamingTheFlag) {
  Cluster cluster("worker_flags");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  struct Bad {
    std::vector<std::string> flags;
    std::string expected;
  };
  for (const Bad& bad : std::vector<Bad>{
           {{"--data-plane", "mpi"}, "--data-plane \"mpi\" is not one of auto, nccl, gloo"},
           {{"--data-plane", "nccl"}, "--data-plane nccl needs --backend cuda"},
           {{"--health-listen", "nowhere"}, "--health-listen \"nowhere\" is not HOST:PORT"},
           {{"--coordinator-tls-name", "gemma-coordinator"},
            "--coordinator-tls-name names the certificate the replica port admits"},
           {{"--kv-dtype", "bf16"}, "--kv-dtype bf16 needs --backend cuda"},
           {{"--listen", "127.0.0.1:99999"},
            "--listen \"127.0.0.1:99999\" is not HOST:PORT with a port in 0-65535"},
           {{"--cache-tokens", "0"}, "raise --cache-tokens (0)"}}) {
    std::vector<std::string> args = {kBin + "gemma-worker", "--coordinator",
                                     cluster.coordinator_address(), "--model", kTinyMoe};
    args.insert(args.end(), bad.flags.begin(), bad.flags.end());
    ToolRun run = RunWithStdin(args, "", seconds(30));
    EXPECT_EQ(run.exit_code, 1) << bad.flags[0] << ": " << run.err;
    EXPECT_TRUE(absl::StrContains(run.err, bad.expected)) << bad.flags[0] << ": " << run.err;
  }
  cluster.Stop(milliseconds(10000));
}

// Addresses are checked before anything waits on them: a worker's --coordinator that is not
// HOST:PORT is refused at once (not after the registration timeout).
TEST(WorkerFlagsTest, ACoordinatorAddressThatIsNotHostPortIsRefusedAtOnce) {
  for (const std::string address : {"nohostport", "http://127.0.0.1:50051", "127.0.0.1:0"}) {
    const auto start = std::chrono::steady_clock::now();
    ToolRun run = RunWithStdin(
        {kBin + "gemma-worker", "--coordinator", address, "--model", kTinyMoe}, "", seconds(30));
    EXPECT_EQ(run.exit_code, 1) << address << ": " << run.err;
    EXPECT_TRUE(absl::StrContains(run.err, "is not HOST:PORT of the coordinator")) << run.err;
    EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(5)) << address;
  }
}

// A port out of range is refused naming the flag (gRPC would wrap 99999 to 34463), and a
// second coordinator on a port in use fails instead of sharing it (SO_REUSEPORT would let the
// kernel split clients and workers between the two).
TEST(CoordinatorFlagsTest, ListenPortsAreCheckedAndNotShared) {
  ToolRun wrapped = RunWithStdin(
      {"gemma-coordinator", "--listen", "127.0.0.1:99999", "--insecure"}, "", seconds(20));
  EXPECT_EQ(wrapped.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(wrapped.err, "--listen \"127.0.0.1:99999\" is not HOST:PORT"))
      << wrapped.err;
  Cluster cluster("shared_port");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  ToolRun second = RunWithStdin(
      {"gemma-coordinator", "--listen", cluster.coordinator_address(), "--insecure"}, "",
      seconds(20));
  EXPECT_EQ(second.exit_code, 1) << second.err;
  EXPECT_TRUE(absl::StrContains(second.err, "cannot listen on " + cluster.coordinator_address()))
      << second.err;
  cluster.Stop(milliseconds(10000));
}

// One coordinator a --data-dir: a second on another port but the same directory is refused
// naming the first's pid (both would run the same batches); once the first is gone, the
// directory is free again.
TEST(CoordinatorFlagsTest, ADataDirServesOneCoordinator) {
  Cluster cluster("shared_data_dir");
  const std::string data = cluster.dir() + "/data";
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({"--data-dir", data}, &error)) << error;
  ToolRun second = RunWithStdin({"gemma-coordinator", "--listen", "127.0.0.1:0", "--insecure",
                                 "--data-dir", data},
                                "", seconds(20));
  EXPECT_EQ(second.exit_code, 1) << second.err;
  EXPECT_TRUE(absl::StrContains(second.err, "is in use by another coordinator (pid "))
      << second.err;
  cluster.Stop(milliseconds(10000));
  Cluster again("shared_data_dir_again");
  ASSERT_TRUE(again.StartCoordinator({"--data-dir", data}, &error)) << error;
  again.Stop(milliseconds(10000));
}

TEST(CoordinatorFlagsTest, ReplicaTlsNameWithoutInternalCaIsRefused) {
  ToolRun run = RunWithStdin({"gemma-coordinator", "--listen", "127.0.0.1:0", "--insecure",
                              "--replica-tls-name", "gemma-worker"},
                             "", seconds(20));
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(run.err, "--replica-tls-name names the workers' certificates"))
      << run.err;
}

TEST(AuthFileTest, ABadTokensFileStopsTheCoordinatorSayingWhichLine) {
  Cluster cluster("auth_file");
  const std::string file = WriteFile(cluster.dir() + "/tokens", "short user\n");
  ToolRun run = RunWithStdin({"gemma-coordinator", "--listen", "127.0.0.1:0", "--auth-tokens",
                              file},
                             "", seconds(20));
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(run.err, "line 1: a token must have at least 16 characters"))
      << run.err;
  const std::string roles = WriteFile(cluster.dir() + "/roles",
                                      "a-long-enough-token-1234 superuser\n");
  ToolRun bad_role = RunWithStdin({"gemma-coordinator", "--listen", "127.0.0.1:0",
                                   "--auth-tokens", roles},
                                  "", seconds(20));
  EXPECT_EQ(bad_role.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(bad_role.err, "unknown role \"superuser\"")) << bad_role.err;
  // Closed by default: open only with --insecure, and the refusal says what is open.
  ToolRun open = RunWithStdin({"gemma-coordinator", "--listen", "127.0.0.1:0"}, "", seconds(20));
  EXPECT_EQ(open.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(open.err, "refusing to serve plaintext (no --tls-cert/--tls-key) "
                                          "and open to anyone (no --auth-tokens)"))
      << open.err;
  EXPECT_TRUE(absl::StrContains(open.err, "--insecure")) << open.err;
}

}  // namespace
}  // namespace gemma::testing::cluster
