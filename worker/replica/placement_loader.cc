#include "worker/replica/placement_loader.h"

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace gemma::replica {

void PlacementLoader::Start(eplb::Placement placement) {
  Drop();
  epoch_ = placement.epoch;
  done_.store(false);
  auto load = [this, placement = std::move(placement)] {
    if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
    result_ = model_->PrepareExperts(placement);
    done_.store(true, std::memory_order_release);
  };
  if (model_->backend().ThreadSafeUploads()) {
    thread_ = std::thread(std::move(load));
  } else {
    load();
  }
}

int64_t PlacementLoader::Vote() {
  if (epoch_ == 0) return 0;
  if (!done_.load(std::memory_order_acquire)) return 1;
  return result_.ok() ? 0 : kFailed;
}

absl::Status PlacementLoader::Install(uint64_t epoch) {
  if (epoch_ == 0 || epoch != epoch_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "switch to expert placement epoch ", epoch, " but this rank was offered ",
        epoch_ == 0 ? std::string("none") : absl::StrCat("epoch ", epoch_)));
  }
  if (thread_.joinable()) thread_.join();
  if (!result_.ok()) return result_.status();
  absl::Status installed = model_->InstallExperts(*std::move(result_));
  result_ = nullptr;
  epoch_ = 0;
  return installed;
}

void PlacementLoader::Drop() {
  if (thread_.joinable()) thread_.join();
  result_ = nullptr;
  epoch_ = 0;
  done_.store(false);
}

}  // namespace gemma::replica
