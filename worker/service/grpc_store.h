// The rendezvous store of a replica's rank processes, kept by the coordinator and reached over
// gemma.internal.v1.Coordinator's Store* calls. Every key is put under a prefix chosen by the
// worker's supervisor, so the ranks of one start of one replica share keys and nobody else's.
// It is a gloo::rendezvous::Store so Gloo communicators can rendezvous through it.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "gloo/rendezvous/store.h"

namespace gemma::service {

class GrpcStore : public gloo::rendezvous::Store {
 public:
  // `stub` is not owned. `timeout` bounds Get and Wait.
  GrpcStore(gemma::internal::v1::Coordinator::Stub* stub, std::string prefix,
            std::chrono::milliseconds timeout)
      : stub_(stub), prefix_(std::move(prefix)), timeout_(timeout) {}

  absl::Status Set(absl::string_view key, absl::string_view value);
  // Waits up to `timeout` for `key`; DEADLINE_EXCEEDED naming it.
  absl::StatusOr<std::string> Get(absl::string_view key, std::chrono::milliseconds timeout);
  // Removes every key of this store's prefix.
  absl::Status Clear();

  // gloo::rendezvous::Store. Gloo's interface reports failure only by throwing
  // gloo::IoException, which GlooCommunicator catches at its boundary.
  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

 private:
  gemma::internal::v1::Coordinator::Stub* stub_;
  std::string prefix_;
  std::chrono::milliseconds timeout_;
};

}  // namespace gemma::service
