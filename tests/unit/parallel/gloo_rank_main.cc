// One rank of a Gloo group, run as its own process by gloo_communicator_test. Joins through the
// TCP store, then in mode "collectives" runs every collective check once; in mode "until_error"
// publishes "ready/<rank>" and runs collectives until one fails. Either way it writes
// "result/<rank>" = "<status code>|<message>" to the store and exits 0 on success, 1 otherwise.
//
// Usage: parallel_gloo_rank <store_port> <rank> <world_size> <timeout_ms> <mode> <prefix>
#include <chrono>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "tests/unit/parallel/collective_checks.h"
#include "worker/parallel/gloo_communicator.h"
#include "worker/parallel/tcp_store.h"

namespace gemma::parallel {
namespace {

absl::Status RunUntilError(Communicator& comm, TcpStoreClient& store) {
  RETURN_IF_ERROR(store.Set(absl::StrCat("ready/", comm.rank()), "1"));
  std::vector<float> data(1024, 1.0f);
  for (;;) {
    RETURN_IF_ERROR(comm.AllReduce(data.data(), data.size(), DType::kF32));
    RETURN_IF_ERROR(comm.Barrier());
    data.assign(data.size(), 1.0f);
  }
}

int Main(int argc, char** argv) {
  if (argc != 7) {
    LOG(ERROR) << "usage: parallel_gloo_rank <store_port> <rank> <world_size> <timeout_ms> "
                  "<mode> <prefix>";
    return 2;
  }
  const int port = std::atoi(argv[1]);
  const int rank = std::atoi(argv[2]);
  const int world_size = std::atoi(argv[3]);
  const std::chrono::milliseconds timeout(std::atoi(argv[4]));
  const std::string mode = argv[5];

  TcpStoreClient::Options store_options;
  store_options.connect_timeout = timeout;
  store_options.timeout = timeout;
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", port, store_options);
  if (!store.ok()) {
    LOG(ERROR) << "rank " << rank << ": " << store.status();
    return 1;
  }
  GlooOptions options;
  options.rank = rank;
  options.world_size = world_size;
  options.hostname = "127.0.0.1";
  options.timeout = timeout;
  options.key_prefix = argv[6];
  absl::Status status;
  absl::StatusOr<std::unique_ptr<Communicator>> comm = CreateGlooCommunicator(options, **store);
  if (!comm.ok()) {
    status = comm.status();
  } else if (mode == "collectives") {
    status = testing::RunAllCollectiveChecks(**comm, /*seed=*/11, /*exact_f32=*/false);
  } else if (mode == "until_error") {
    status = RunUntilError(**comm, **store);
  } else {
    status = absl::InvalidArgumentError(absl::StrCat("unknown mode ", mode));
  }
  LOG(INFO) << "rank " << rank << " finished: " << status;
  absl::Status published =
      (*store)->Set(absl::StrCat("result/", rank),
                    absl::StrCat(static_cast<int>(status.code()), "|", status.message()));
  if (!published.ok()) LOG(ERROR) << "rank " << rank << ": " << published;
  return status.ok() ? 0 : 1;
}

}  // namespace
}  // namespace gemma::parallel

int main(int argc, char** argv) {
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  return gemma::parallel::Main(argc, argv);
}
