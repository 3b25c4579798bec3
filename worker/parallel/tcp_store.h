// Rendezvous key-value store over TCP: a threaded server run by the replica leader (or a test) and
// a client that ranks use to exchange addresses (Gloo) and our own keys (the NCCL unique id).
// Knows nothing of collectives or models; values are opaque bytes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gloo/rendezvous/store.h"

namespace gemma::parallel {

// Wire format (all integers little-endian):
//   request  = u32 body_len | u8 opcode | body
//   response = u32 body_len | u8 code | body
// Strings are u32 length | bytes. A frame longer than kMaxFrameBytes, a key longer than
// kMaxKeyBytes, an unknown opcode or a malformed body closes that connection; the server goes on.
inline constexpr uint32_t kTcpStoreMaxFrameBytes = 64u << 20;
inline constexpr uint32_t kTcpStoreMaxKeyBytes = 4096;

class TcpStoreServerState;

// Serves the store on one TCP port with a thread per client connection. Stopped and joined by
// the destructor (or Stop()).
class TcpStoreServer {
 public:
  // Binds `host` ("127.0.0.1", "0.0.0.0", a name) and `port` (0: an ephemeral port; see port()).
  // UNAVAILABLE if the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<TcpStoreServer>> Start(const std::string& host, int port);
  ~TcpStoreServer();

  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  const std::string& host() const { return host_; }
  // The bound port.
  int port() const { return port_; }
  // Stops accepting, closes every connection, wakes blocked waits, joins threads. Idempotent.
  void Stop();

  // Counters for tests and logs.
  int64_t num_keys() const;
  int64_t num_rejected_connections() const;

 private:
  TcpStoreServer(std::string host, int port, int listen_fd);
  void AcceptLoop();

  std::string host_;
  int port_;
  int listen_fd_;
  int wake_pipe_[2] = {-1, -1};
  std::shared_ptr<TcpStoreServerState> state_;
  std::thread accept_thread_;
  std::atomic<bool> stopped_{false};
};

// A connection to a TcpStoreServer. Thread-safe (requests are serialised).
//
// Also a gloo::rendezvous::Store so a Gloo context can rendezvous through it; those overrides are
// called only by gloo and report failure the only way gloo's interface allows, by throwing
// gloo::IoException, which GlooCommunicator catches at its single boundary. Our own code uses the
// Status-returning methods.
class TcpStoreClient : public gloo::rendezvous::Store {
 public:
  struct Options {
    // How long Connect keeps retrying an unreachable server.
    std::chrono::milliseconds connect_timeout = std::chrono::seconds(30);
    // Default bound on Get and Wait, and on any one request.
    std::chrono::milliseconds timeout = std::chrono::seconds(60);
  };

  // Connects, retrying until connect_timeout; UNAVAILABLE
  // "rendezvous HOST:PORT unreachable after Ns: <last error>" when it never answers.
  static absl::StatusOr<std::unique_ptr<TcpStoreClient>> Connect(const std::string& host, int port,
                                                                 const Options& options);
  static absl::StatusOr<std::unique_ptr<TcpStoreClient>> Connect(const std::string& host,
                                                                 int port) {
    return Connect(host, port, Options());
  }
  ~TcpStoreClient() override;

  // Sets (overwrites) `key`.
  absl::Status Set(absl::string_view key, absl::string_view value);
  // Waits up to `timeout` for `key`, then returns its value; DEADLINE_EXCEEDED naming the key.
  absl::StatusOr<std::string> Get(absl::string_view key, std::chrono::milliseconds timeout);
  absl::StatusOr<std::string> Get(absl::string_view key) { return Get(key, options_.timeout); }
  // Waits until every key exists; DEADLINE_EXCEEDED naming the missing keys after `timeout`.
  absl::Status Wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);
  // Atomically adds `delta` to the 64-bit counter at `key` (created at 0); returns the new value.
  absl::StatusOr<int64_t> Add(absl::string_view key, int64_t delta);
  // True if `key` exists now.
  absl::StatusOr<bool> Check(absl::string_view key);

  const std::string& address() const { return address_; }

  // gloo::rendezvous::Store (see the class comment).
  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

 private:
  TcpStoreClient(int fd, std::string address, Options options);
  // Sends one request and reads its response; `io_timeout` bounds the socket reads.
  absl::StatusOr<std::pair<uint8_t, std::string>> Call(uint8_t opcode, const std::string& body,
                                                       std::chrono::milliseconds io_timeout);

  int fd_;
  std::string address_;
  Options options_;
  std::mutex mu_;
};

}  // namespace gemma::parallel
