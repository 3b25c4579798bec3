#include "worker/parallel/rendezvous.h"

#include <exception>

#include "absl/strings/str_cat.h"

namespace gemma::parallel {

absl::Status StoreSet(gloo::rendezvous::Store& store, const std::string& key,
                      absl::string_view value) {
  try {
    store.set(key, std::vector<char>(value.begin(), value.end()));
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("rendezvous store: setting ", key, " failed: ", e.what()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> StoreGet(gloo::rendezvous::Store& store, const std::string& key,
                                     std::chrono::milliseconds timeout) {
  try {
    store.wait({key}, timeout);
    std::vector<char> value = store.get(key);
    return std::string(value.begin(), value.end());
  } catch (const std::exception& e) {
    return absl::DeadlineExceededError(absl::StrCat("rendezvous store: ", key, " not there within ",
                                                    timeout.count(), " ms: ", e.what()));
  }
}

}  // namespace gemma::parallel
