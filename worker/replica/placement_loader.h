// One rank's side of a live expert-placement switch: loads the slots of an offered placement
// in the background (from the mapped checkpoint) while steps go on, says whether it is ready,
// and installs it at the step that switches. Knows nothing of plans or communicators.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>

#include "absl/status/statusor.h"
#include "eplb/placement.h"
#include "worker/model/gemma4/model.h"

namespace gemma::replica {

class PlacementLoader {
 public:
  // A vote: 0 ready (or nothing offered), 1 still loading, kFailed when the loading failed.
  static constexpr int64_t kFailed = int64_t{1} << 20;

  // `delay` stalls each load before it starts (a test of loading slower than steps).
  explicit PlacementLoader(gemma4::Model* model,
                           std::chrono::milliseconds delay = std::chrono::milliseconds(0))
      : model_(model), delay_(delay) {}
  ~PlacementLoader() { Drop(); }
  PlacementLoader(const PlacementLoader&) = delete;
  PlacementLoader& operator=(const PlacementLoader&) = delete;

  // Starts loading `placement`'s slots for this rank, dropping any earlier offer. On a backend
  // whose uploads are thread-safe (CPU) it loads on its own thread; otherwise (CUDA uploads on
  // the step stream) it loads here, before returning.
  void Start(eplb::Placement placement);
  // This rank's vote on the offer (see kFailed). Step thread.
  int64_t Vote();
  // Installs the loaded slots (waiting for the load if it has not finished): the model's next
  // step uses them. FAILED_PRECONDITION when nothing with `epoch` was offered; the load's error.
  absl::Status Install(uint64_t epoch);
  // Forgets the offer (joining its loading thread).
  void Drop();
  // The epoch being loaded or loaded (0: none).
  uint64_t offered_epoch() const { return epoch_; }
  // The load's error after a kFailed vote.
  absl::Status error() const { return result_.ok() ? absl::OkStatus() : result_.status(); }

 private:
  gemma4::Model* model_;
  const std::chrono::milliseconds delay_;
  uint64_t epoch_ = 0;
  std::thread thread_;
  std::atomic<bool> done_{false};
  absl::StatusOr<std::unique_ptr<gemma4::ExpertSlots>> result_ = nullptr;
};

}  // namespace gemma::replica
