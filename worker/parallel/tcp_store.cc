#include "worker/parallel/tcp_store.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "gloo/common/error.h"

namespace gemma::parallel {
namespace {

using Clock = std::chrono::steady_clock;

enum Opcode : uint8_t { kSet = 1, kGet = 2, kWait = 3, kAdd = 4, kCheck = 5 };
enum Code : uint8_t { kOk = 0, kNotFound = 1, kTimeout = 2, kBadRequest = 3 };

// The longest a server-side wait may block, whatever the client asks.
constexpr uint32_t kMaxWaitMs = 3600u * 1000u;

void PutU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutString(std::string* out, absl::string_view s) {
  PutU32(out, static_cast<uint32_t>(s.size()));
  out->append(s.data(), s.size());
}
uint32_t GetU32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

// Bounds-checked reader over a request or response body.
class Reader {
 public:
  explicit Reader(absl::string_view data) : data_(data) {}
  bool U32(uint32_t* v) {
    if (data_.size() < 4) return false;
    *v = GetU32(reinterpret_cast<const unsigned char*>(data_.data()));
    data_.remove_prefix(4);
    return true;
  }
  bool U64(uint64_t* v) {
    uint32_t lo, hi;
    if (!U32(&lo) || !U32(&hi)) return false;
    *v = static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
    return true;
  }
  bool String(std::string* s, uint32_t max_len) {
    uint32_t len;
    if (!U32(&len) || len > max_len || len > data_.size()) return false;
    s->assign(data_.data(), len);
    data_.remove_prefix(len);
    return true;
  }
  bool done() const { return data_.empty(); }

 private:
  absl::string_view data_;
};

std::string ErrnoText(int err) { return std::string(strerror(err)); }

// Writes all of `data`; false on error.
bool WriteAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// Reads exactly `len` bytes. Returns 0 on success, else an errno value (ECONNRESET for EOF,
// EAGAIN for a receive timeout).
int ReadAll(int fd, char* buf, size_t len) {
  while (len > 0) {
    ssize_t n = recv(fd, buf, len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == EWOULDBLOCK ? EAGAIN : errno;
    if (n == 0) return ECONNRESET;
    buf += n;
    len -= static_cast<size_t>(n);
  }
  return 0;
}

std::string Frame(uint8_t kind, const std::string& body) {
  std::string frame;
  frame.reserve(5 + body.size());
  PutU32(&frame, static_cast<uint32_t>(body.size()));
  frame.push_back(static_cast<char>(kind));
  frame.append(body);
  return frame;
}

}  // namespace

// ---- Server ---------------------------------------------------------------------------------

class TcpStoreServerState {
 public:
  struct Connection {
    int fd = -1;
    std::thread thread;
    bool done = false;
  };

  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, std::string> data;
  bool stopping = false;
  int64_t next_id = 0;
  std::map<int64_t, Connection> connections;
  std::atomic<int64_t> rejected{0};

  // Serves one client until it disconnects, misbehaves or the server stops.
  void Serve(int64_t id, int fd) {
    for (;;) {
      unsigned char header[5];
      if (ReadAll(fd, reinterpret_cast<char*>(header), sizeof(header)) != 0) break;
      const uint32_t body_len = GetU32(header);
      const uint8_t opcode = header[4];
      if (body_len > kTcpStoreMaxFrameBytes) {
        Reject(fd, absl::StrCat("frame of ", body_len, " bytes"));
        break;
      }
      std::string body(body_len, '\0');
      if (body_len > 0 && ReadAll(fd, body.data(), body_len) != 0) break;
      std::string reply;
      uint8_t code = kOk;
      if (!Handle(opcode, body, &code, &reply)) {
        Reject(fd, absl::StrCat("malformed request (opcode ", static_cast<int>(opcode), ", ",
                                body_len, " bytes)"));
        break;
      }
      if (!WriteAll(fd, Frame(code, reply))) break;
    }
    // The peer sees end-of-stream now; the fd itself is closed when the thread is reaped.
    shutdown(fd, SHUT_RDWR);
    std::lock_guard<std::mutex> lock(mu);
    connections[id].done = true;
  }

 private:
  void Reject(int fd, const std::string& why) {
    rejected.fetch_add(1);
    LOG(WARNING) << "tcp store: closing connection (fd " << fd << "): " << why;
    WriteAll(fd, Frame(kBadRequest, why));
  }

  // Executes one request; false if it is malformed.
  bool Handle(uint8_t opcode, const std::string& body, uint8_t* code, std::string* reply) {
    Reader reader(body);
    switch (opcode) {
      case kSet: {
        std::string key, value;
        if (!reader.String(&key, kTcpStoreMaxKeyBytes) ||
            !reader.String(&value, kTcpStoreMaxFrameBytes) || !reader.done()) {
          return false;
        }
        std::lock_guard<std::mutex> lock(mu);
        data[key] = std::move(value);
        cv.notify_all();
        return true;
      }
      case kGet:
      case kCheck: {
        std::string key;
        if (!reader.String(&key, kTcpStoreMaxKeyBytes) || !reader.done()) return false;
        std::lock_guard<std::mutex> lock(mu);
        auto it = data.find(key);
        if (it == data.end()) {
          *code = kNotFound;
        } else if (opcode == kGet) {
          *reply = it->second;
        }
        return true;
      }
      case kWait: {
        uint32_t timeout_ms, num_keys;
        if (!reader.U32(&timeout_ms) || !reader.U32(&num_keys) || num_keys > 1u << 16) {
          return false;
        }
        std::vector<std::string> keys(num_keys);
        for (std::string& key : keys) {
          if (!reader.String(&key, kTcpStoreMaxKeyBytes)) return false;
        }
        if (!reader.done()) return false;
        const auto deadline =
            Clock::now() + std::chrono::milliseconds(std::min(timeout_ms, kMaxWaitMs));
        std::unique_lock<std::mutex> lock(mu);
        const bool ready = cv.wait_until(lock, deadline, [&] {
          if (stopping) return true;
          for (const std::string& key : keys) {
            if (data.find(key) == data.end()) return false;
          }
          return true;
        });
        if (!ready || stopping) {
          *code = kTimeout;
          for (const std::string& key : keys) {
            if (data.find(key) == data.end()) {
              PutString(reply, key);
            }
          }
        }
        return true;
      }
      case kAdd: {
        std::string key;
        uint64_t delta;
        if (!reader.String(&key, kTcpStoreMaxKeyBytes) || !reader.U64(&delta) || !reader.done()) {
          return false;
        }
        std::lock_guard<std::mutex> lock(mu);
        std::string& slot = data[key];
        uint64_t value = 0;
        if (slot.size() == 8) {
          Reader old(slot);
          old.U64(&value);
        }
        value += delta;
        slot.clear();
        PutU64(&slot, value);
        *reply = slot;
        cv.notify_all();
        return true;
      }
      default:
        return false;
    }
  }
};

absl::StatusOr<std::unique_ptr<TcpStoreServer>> TcpStoreServer::Start(const std::string& host,
                                                                      int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* result = nullptr;
  const std::string port_text = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port_text.c_str(), &hints, &result);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("tcp store: cannot resolve ", host, ": ", gai_strerror(rc)));
  }
  std::string last_error = "no address";
  int fd = -1;
  for (addrinfo* ai = result; ai != nullptr; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = ErrnoText(errno);
      continue;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 512) == 0) break;
    last_error = ErrnoText(errno);
    close(fd);
    fd = -1;
  }
  freeaddrinfo(result);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("tcp store: cannot listen on ", host, ":", port, ": ", last_error));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  int bound_port = port;
  if (bound.ss_family == AF_INET) {
    bound_port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  } else if (bound.ss_family == AF_INET6) {
    bound_port = ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
  }
  std::unique_ptr<TcpStoreServer> server(new TcpStoreServer(host, bound_port, fd));
  if (pipe2(server->wake_pipe_, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("tcp store: pipe: ", ErrnoText(errno)));
  }
  server->accept_thread_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  LOG(INFO) << "tcp store listening on " << host << ":" << bound_port;
  return server;
}

TcpStoreServer::TcpStoreServer(std::string host, int port, int listen_fd)
    : host_(std::move(host)),
      port_(port),
      listen_fd_(listen_fd),
      state_(std::make_shared<TcpStoreServerState>()) {}

TcpStoreServer::~TcpStoreServer() { Stop(); }

void TcpStoreServer::AcceptLoop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_pipe_[0], POLLIN, 0}};
    int n = poll(fds, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (fds[1].revents & POLLIN) || stopped_.load()) return;
    // Reap finished connections.
    std::vector<TcpStoreServerState::Connection> finished;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      for (auto it = state_->connections.begin(); it != state_->connections.end();) {
        if (it->second.done) {
          finished.push_back(std::move(it->second));
          it = state_->connections.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& conn : finished) {
      conn.thread.join();
      close(conn.fd);
    }
    if (!(fds[0].revents & POLLIN)) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    std::lock_guard<std::mutex> lock(state_->mu);
    const int64_t id = state_->next_id++;
    TcpStoreServerState::Connection& conn = state_->connections[id];
    conn.fd = fd;
    conn.thread = std::thread([state = state_, id, fd] { state->Serve(id, fd); });
  }
}

void TcpStoreServer::Stop() {
  if (stopped_.exchange(true)) return;
  const char byte = 1;
  if (write(wake_pipe_[1], &byte, 1) < 0) PLOG(WARNING) << "tcp store: wake pipe";
  if (accept_thread_.joinable()) accept_thread_.join();
  std::map<int64_t, TcpStoreServerState::Connection> connections;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stopping = true;
    state_->cv.notify_all();
    for (auto& [id, conn] : state_->connections) shutdown(conn.fd, SHUT_RDWR);
    connections.swap(state_->connections);
  }
  for (auto& [id, conn] : connections) {
    conn.thread.join();
    close(conn.fd);
  }
  close(listen_fd_);
  close(wake_pipe_[0]);
  close(wake_pipe_[1]);
}

int64_t TcpStoreServer::num_keys() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return static_cast<int64_t>(state_->data.size());
}

int64_t TcpStoreServer::num_rejected_connections() const { return state_->rejected.load(); }

// ---- Client ---------------------------------------------------------------------------------

namespace {

// One connection attempt bounded by `deadline`; returns the fd or -1 with `error` set.
int TryConnect(const std::string& host, int port, Clock::time_point deadline, std::string* error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &result);
  if (rc != 0) {
    *error = gai_strerror(rc);
    return -1;
  }
  int fd = -1;
  for (addrinfo* ai = result; ai != nullptr && fd < 0; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) {
      *error = ErrnoText(errno);
      continue;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        *error = ErrnoText(errno);
        close(fd);
        fd = -1;
        continue;
      }
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      pollfd pfd{fd, POLLOUT, 0};
      int err = 0;
      socklen_t len = sizeof(err);
      if (poll(&pfd, 1, std::max<int64_t>(0, left.count())) != 1 ||
          getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        *error = err != 0 ? ErrnoText(err) : "connect timed out";
        close(fd);
        fd = -1;
        continue;
      }
    }
  }
  freeaddrinfo(result);
  if (fd >= 0) {
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  return fd;
}

void SetReceiveTimeout(int fd, std::chrono::milliseconds timeout) {
  timeval tv{};
  tv.tv_sec = timeout.count() / 1000;
  tv.tv_usec = (timeout.count() % 1000) * 1000;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

// Slack for a server-side wait to answer before the client gives up on the socket.
constexpr std::chrono::milliseconds kIoSlack = std::chrono::seconds(5);

}  // namespace

absl::StatusOr<std::unique_ptr<TcpStoreClient>> TcpStoreClient::Connect(const std::string& host,
                                                                        int port,
                                                                        const Options& options) {
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = start + options.connect_timeout;
  std::string error;
  std::chrono::milliseconds backoff(10);
  for (;;) {
    int fd = TryConnect(host, port, deadline, &error);
    if (fd >= 0) {
      return std::unique_ptr<TcpStoreClient>(
          new TcpStoreClient(fd, absl::StrCat(host, ":", port), options));
    }
    const Clock::time_point now = Clock::now();
    if (now >= deadline) break;
    // Retry with a bounded backoff until the deadline: the server may not be up yet.
    std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - now));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(200));
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return absl::UnavailableError(absl::StrCat("rendezvous ", host, ":", port, " unreachable after ",
                                             absl::StrFormat("%.1f", seconds), "s: ", error));
}

TcpStoreClient::TcpStoreClient(int fd, std::string address, Options options)
    : fd_(fd), address_(std::move(address)), options_(options) {}

TcpStoreClient::~TcpStoreClient() { close(fd_); }

absl::StatusOr<std::pair<uint8_t, std::string>> TcpStoreClient::Call(
    uint8_t opcode, const std::string& body, std::chrono::milliseconds io_timeout) {
  std::lock_guard<std::mutex> lock(mu_);
  SetReceiveTimeout(fd_, io_timeout);
  if (!WriteAll(fd_, Frame(opcode, body))) {
    return absl::UnavailableError(
        absl::StrCat("rendezvous ", address_, ": send failed: ", ErrnoText(errno)));
  }
  unsigned char header[5];
  int err = ReadAll(fd_, reinterpret_cast<char*>(header), sizeof(header));
  std::string reply;
  if (err == 0) {
    const uint32_t len = GetU32(header);
    if (len > kTcpStoreMaxFrameBytes) {
      return absl::DataLossError(absl::StrCat("rendezvous ", address_, ": reply of ", len,
                                              " bytes exceeds the frame limit"));
    }
    reply.resize(len);
    if (len > 0) err = ReadAll(fd_, reply.data(), len);
  }
  if (err == EAGAIN) {
    return absl::DeadlineExceededError(
        absl::StrCat("rendezvous ", address_, ": no reply within ", io_timeout.count(), " ms"));
  }
  if (err != 0) {
    return absl::UnavailableError(
        absl::StrCat("rendezvous ", address_, ": connection lost: ", ErrnoText(err)));
  }
  if (header[4] == kBadRequest) {
    return absl::InternalError(absl::StrCat("rendezvous ", address_, " rejected request: ", reply));
  }
  return std::make_pair(header[4], std::move(reply));
}

absl::Status TcpStoreClient::Set(absl::string_view key, absl::string_view value) {
  if (key.size() > kTcpStoreMaxKeyBytes || value.size() > kTcpStoreMaxFrameBytes - 16) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous key or value too long (key ",
                                                   key.size(), ", value ", value.size(), ")"));
  }
  std::string body;
  PutString(&body, key);
  PutString(&body, value);
  ASSIGN_OR_RETURN(auto reply, Call(kSet, body, options_.timeout));
  (void)reply;
  return absl::OkStatus();
}

absl::Status TcpStoreClient::Wait(const std::vector<std::string>& keys,
                                  std::chrono::milliseconds timeout) {
  std::string body;
  PutU32(&body, static_cast<uint32_t>(std::clamp<int64_t>(timeout.count(), 0, kMaxWaitMs)));
  PutU32(&body, static_cast<uint32_t>(keys.size()));
  for (const std::string& key : keys) PutString(&body, key);
  ASSIGN_OR_RETURN(auto reply, Call(kWait, body, timeout + kIoSlack));
  if (reply.first == kOk) return absl::OkStatus();
  std::vector<std::string> missing;
  Reader reader(reply.second);
  std::string key;
  while (reader.String(&key, kTcpStoreMaxKeyBytes)) missing.push_back(key);
  return absl::DeadlineExceededError(absl::StrCat("rendezvous ", address_, ": keys [",
                                                  absl::StrJoin(missing, ","), "] not set within ",
                                                  timeout.count(), " ms"));
}

absl::StatusOr<std::string> TcpStoreClient::Get(absl::string_view key,
                                                std::chrono::milliseconds timeout) {
  RETURN_IF_ERROR(Wait({std::string(key)}, timeout));
  std::string body;
  PutString(&body, key);
  ASSIGN_OR_RETURN(auto reply, Call(kGet, body, options_.timeout));
  if (reply.first != kOk) {
    return absl::NotFoundError(absl::StrCat("rendezvous ", address_, ": key ", key, " vanished"));
  }
  return std::move(reply.second);
}

absl::StatusOr<int64_t> TcpStoreClient::Add(absl::string_view key, int64_t delta) {
  std::string body;
  PutString(&body, key);
  PutU64(&body, static_cast<uint64_t>(delta));
  ASSIGN_OR_RETURN(auto reply, Call(kAdd, body, options_.timeout));
  Reader reader(reply.second);
  uint64_t value = 0;
  if (!reader.U64(&value)) {
    return absl::DataLossError(absl::StrCat("rendezvous ", address_, ": malformed add reply"));
  }
  return static_cast<int64_t>(value);
}

absl::StatusOr<bool> TcpStoreClient::Check(absl::string_view key) {
  std::string body;
  PutString(&body, key);
  ASSIGN_OR_RETURN(auto reply, Call(kCheck, body, options_.timeout));
  return reply.first == kOk;
}

void TcpStoreClient::set(const std::string& key, const std::vector<char>& data) {
  absl::Status status = Set(key, absl::string_view(data.data(), data.size()));
  if (!status.ok()) throw gloo::IoException(std::string(status.message()));
}

std::vector<char> TcpStoreClient::get(const std::string& key) {
  absl::StatusOr<std::string> value = Get(key, options_.timeout);
  if (!value.ok()) throw gloo::IoException(std::string(value.status().message()));
  return std::vector<char>(value->begin(), value->end());
}

void TcpStoreClient::wait(const std::vector<std::string>& keys) { wait(keys, options_.timeout); }

void TcpStoreClient::wait(const std::vector<std::string>& keys,
                          const std::chrono::milliseconds& timeout) {
  absl::Status status = Wait(keys, timeout.count() > 0 ? timeout : options_.timeout);
  if (!status.ok()) throw gloo::IoException(std::string(status.message()));
}

}  // namespace gemma::parallel
