// TcpStoreServer / TcpStoreClient over real loopback sockets: set/get/wait, timeouts, counters,
// many clients, hostile bytes, and an unreachable server.
#include "worker/parallel/tcp_store.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "gtest/gtest.h"

namespace gemma::parallel {
namespace {

using Clock = std::chrono::steady_clock;

std::unique_ptr<TcpStoreServer> StartServer() {
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  CHECK(server.ok()) << server.status();
  return std::move(*server);
}

std::unique_ptr<TcpStoreClient> ConnectTo(const TcpStoreServer& server) {
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> client =
      TcpStoreClient::Connect("127.0.0.1", server.port());
  CHECK(client.ok()) << client.status();
  return std::move(*client);
}

TEST(TcpStoreTest, EphemeralPortIsReported) {
  std::unique_ptr<TcpStoreServer> server = StartServer();
  EXPECT_GT(server->port(), 0);
}

TEST(TcpStoreTest, SetThenGetFromAnotherClient) {
  std::unique_ptr<TcpStoreServer> server = StartServer();
  std::unique_ptr<TcpStoreClient> a = ConnectTo(*server);
  std::unique_ptr<TcpStoreClient> b = ConnectTo(*server);
  const std::string binary("\0\x01\xff payload", 11);
  ASSERT_TRUE(a->Set("nccl/unique_id", binary).ok());
  absl::StatusOr<std::string> got = b->Get("nccl/unique_id", std::chrono::seconds(1));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, binary);
  ASSERT_TRUE(a->Set("nccl/unique_id", "v2").ok());
  EXPECT_EQ(*b->Get("nccl/unique_id"), "v2");
  EXPECT_TRUE(*b->Check("nccl/unique_id"));
  EXPECT_FALSE(*b->Check("absent"));
  EXPECT_EQ(server->num_keys(), 1);
}

TEST(TcpStoreTest, WaitReturnsOnceAnotherClientSetsTheKeys) {
  std::unique_ptr<TcpStoreServer> server = StartServer();
  std::unique_ptr<TcpStoreClient> waiter = ConnectTo(*server);
  std::unique_ptr<TcpStoreClient> setter = ConnectTo(*server);
  absl::Status waited;
  std::thread t([&] { waited = waiter->Wait({"k0", "k1"}, std::chrono::seconds(10)); });
  ASSERT_TRUE(setter->Set("k0", "a").ok());
  ASSERT_TRUE(setter->Set("k1", "b").ok());
  t.join();
  EXPECT_TRUE(waited.ok()) << waited;
}

TEST(TcpStoreTest, WaitTimesOutNamingTheMissingKey) {
  std::unique_ptr<TcpStoreServer> server = StartServer();
  std::unique_ptr<TcpStoreClient> client = ConnectTo(*server);
  ASSERT_TRUE(client->Set("present", "x").ok());
  const Clock::time_point start = Clock::now();
  absl::Status status = client->Wait({"present", "missing"}, std::chrono::milliseconds(300));
  const auto elapsed = Clock::now() - start;
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "[missing]")) << status;
  EXPECT_GE(elapsed, std::chrono::milliseconds(290));
  EXPECT_LT(elapsed, std::chrono::seconds(3));
  EXPECT_EQ(client->Get("missing", std::chrono::milliseconds(100)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST(TcpStoreTest, ManyClientsAddConcurrently) {
  std::unique_ptr<TcpStoreServer> server = StartServer();
  constexpr int kClients = 16, kAdds = 50;
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&] {
      std::unique_ptr<TcpStoreClient> client = ConnectTo(*server);
      for (int i = 0; i < kAdds; ++i) ASSERT_TRUE(client->Add("counter", 1).ok());
    });
  }
  for (std::thread& t : threads) t.join();
  std::unique_ptr<TcpStoreClient> client = ConnectTo(*server);
  EXPECT_EQ(*client->Add("counter", 0), kClients * kAdds);
  EXPECT_EQ(*client->Add("counter", -5), kClients * kAdds - 5);
}

// Sends `bytes` on a raw connection and reads until the server closes it.
void SendGarbage(int port, const std::string& bytes) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL), static_cast<ssize_t>(bytes.size()));
  shutdown(fd, SHUT_WR);
  char buf[256];
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  while (recv(fd, buf, sizeof(buf), 0) > 0) {
  }
  close(fd);
}

TEST(TcpStoreTest, GarbageBytesDoNotCrashTheServer) {
  std::unique_ptr<TcpStoreServer> server = StartServer();
  std::unique_ptr<TcpStoreClient> client = ConnectTo(*server);
  ASSERT_TRUE(client->Set("before", "1").ok());
  // A frame claiming 4 GiB, an unknown opcode, a key length past the body, random bytes.
  SendGarbage(server->port(), std::string("\xff\xff\xff\xff\x01", 5));
  SendGarbage(server->port(), std::string("\x00\x00\x00\x00\x63", 5));
  SendGarbage(server->port(), std::string("\x08\x00\x00\x00\x01\xff\xff\x00\x00zzzz", 13));
  std::mt19937 rng(7);
  for (int i = 0; i < 20; ++i) {
    std::string noise(1 + rng() % 64, '\0');
    for (char& c : noise) c = static_cast<char>(rng());
    SendGarbage(server->port(), noise);
  }
  EXPECT_GE(server->num_rejected_connections(), 3);
  // The server still serves the old and new clients.
  EXPECT_EQ(*client->Get("before"), "1");
  std::unique_ptr<TcpStoreClient> fresh = ConnectTo(*server);
  ASSERT_TRUE(fresh->Set("after", "2").ok());
  EXPECT_EQ(*client->Get("after"), "2");
}

TEST(TcpStoreTest, UnreachableServerIsUnavailableAfterTheConnectTimeout) {
  // Find a port nobody listens on: bind, read the port, close.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  close(fd);

  TcpStoreClient::Options options;
  options.connect_timeout = std::chrono::milliseconds(1000);
  const Clock::time_point start = Clock::now();
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> client =
      TcpStoreClient::Connect("127.0.0.1", port, options);
  const auto elapsed = Clock::now() - start;
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(client.status().message(),
                                absl::StrCat("rendezvous 127.0.0.1:", port, " unreachable after")))
      << client.status();
  EXPECT_GE(elapsed, std::chrono::milliseconds(1000));
  EXPECT_LT(elapsed, std::chrono::milliseconds(3000));
}

TEST(TcpStoreTest, StopWakesBlockedWaiters) {
  std::unique_ptr<TcpStoreServer> server = StartServer();
  std::unique_ptr<TcpStoreClient> client = ConnectTo(*server);
  absl::Status waited;
  const Clock::time_point start = Clock::now();
  std::thread t([&] { waited = client->Wait({"never"}, std::chrono::seconds(30)); });
  // Whether or not the wait has reached the server yet, stopping must end it well before 30 s.
  server->Stop();
  t.join();
  EXPECT_FALSE(waited.ok());
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(10));
}

}  // namespace
}  // namespace gemma::parallel
