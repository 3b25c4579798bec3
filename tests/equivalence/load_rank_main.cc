// Test helper: loads a checkpoint as rank R of a tensor-parallel group of W (no collectives are
// needed to load) and prints the resident and anonymous memory before and after, in KiB:
//   load_rank MODEL_DIR W R  ->  "rss_before rss_after anon_before anon_after"
#include <fstream>
#include <iostream>
#include <string>

#include "worker/backend/cpu/cpu_backend.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/in_process_communicator.h"

namespace {
int64_t StatusKb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stoll(line.substr(key.size() + 1));
  }
  return -1;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: load_rank MODEL_DIR WORLD RANK\n";
    return 2;
  }
  const int world = std::stoi(argv[2]);
  const int rank = std::stoi(argv[3]);
  gemma::parallel::InProcessGroup group(world);
  auto comm = group.communicator(rank);
  gemma::gemma4::ModelParallel parallel;
  parallel.layout = {world, rank, world, rank};
  parallel.tp_comm = world > 1 ? comm.get() : nullptr;
  gemma::CpuBackend backend(gemma::CpuBackendOptions{1});
  const int64_t rss_before = StatusKb("VmRSS"), anon_before = StatusKb("RssAnon");
  auto model = gemma::gemma4::Model::Load(argv[1], backend, parallel);
  if (!model.ok()) {
    std::cerr << model.status() << "\n";
    return 1;
  }
  std::cout << rss_before << " " << StatusKb("VmRSS") << " " << anon_before << " "
            << StatusKb("RssAnon") << "\n";
  return 0;
}
