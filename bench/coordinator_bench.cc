// What the coordinator adds: the same streaming requests sent straight to a replica leader
// (gemma.internal.v1.Replica.Generate) and through the coordinator (gemma.v1.Inference), in
// alternating rounds. Prints time to first response and the gap between streamed responses
// (medians and p90, both paths), then the requests/s of many concurrent streams, both paths.
// scripts/bench_coordinator.sh starts a cluster and runs it.
//   coordinator_bench --coordinator HOST:PORT --replica HOST:PORT [--requests 200]
//                     [--max-tokens 16] [--streams 64] [--seconds 10]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/flags.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"

ABSL_FLAG(std::string, coordinator, "", "coordinator HOST:PORT");
ABSL_FLAG(std::string, replica, "", "the replica leader's HOST:PORT (as in gemmactl status)");
ABSL_FLAG(int32_t, requests, 200, "sequential requests per path for the latency part");
ABSL_FLAG(int64_t, max_tokens, 16, "tokens per request");
ABSL_FLAG(int32_t, streams, 64, "concurrent streams for the throughput part");
ABSL_FLAG(double, seconds, 10.0, "duration of each throughput run");

namespace {

using Clock = std::chrono::steady_clock;
namespace iv1 = gemma::internal::v1;
namespace v1 = gemma::v1;

struct Timing {
  double first_ms = 0;            // request sent -> first response
  std::vector<double> gaps_ms;    // between consecutive responses
  bool ok = false;
};

v1::GenerateRequest MakeRequest(int i, int64_t max_tokens) {
  v1::GenerateRequest request;
  for (int32_t id : {2, 10 + i % 400, 17, 301}) request.mutable_token_ids()->add_ids(id);
  request.set_max_tokens(max_tokens);
  return request;
}

template <typename Reader, typename Response>
Timing ReadStream(Reader& reader, Clock::time_point start) {
  Timing timing;
  Response response;
  Clock::time_point last = start;
  bool first = true;
  while (reader->Read(&response)) {
    const Clock::time_point now = Clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - last).count();
    if (first) {
      timing.first_ms = ms;
      first = false;
    } else {
      timing.gaps_ms.push_back(ms);
    }
    last = now;
  }
  timing.ok = reader->Finish().ok();
  return timing;
}

Timing ThroughCoordinator(v1::Inference::Stub& stub, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  const Clock::time_point start = Clock::now();
  auto reader = stub.Generate(&context, request);
  return ReadStream<decltype(reader), v1::GenerateResponse>(reader, start);
}

Timing Direct(iv1::Replica::Stub& stub, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  iv1::ReplicaGenerateRequest call;
  *call.mutable_request() = request;
  const Clock::time_point start = Clock::now();
  auto reader = stub.Generate(&context, call);
  return ReadStream<decltype(reader), iv1::ReplicaGenerateResponse>(reader, start);
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t index = std::min(values.size() - 1, static_cast<size_t>(p * values.size()));
  return values[index];
}

// Requests completed per second by `streams` threads each sending one request after another.
template <typename Send>
double Throughput(int streams, double seconds, const Send& send) {
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> failed{0};
  const Clock::time_point end =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::vector<std::thread> threads;
  const Clock::time_point start = Clock::now();
  for (int t = 0; t < streams; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; Clock::now() < end; ++i) {
        if (send(t * 1000 + i)) {
          done.fetch_add(1);
        } else {
          failed.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  if (failed.load() > 0) std::printf("  (%lld requests failed)\n", static_cast<long long>(failed.load()));
  return done.load() / elapsed;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "latency and throughput of streaming requests through the coordinator against straight "
      "to a replica leader\n  coordinator_bench --coordinator HOST:PORT --replica HOST:PORT");
  gemma::ParseFlags(argc, argv);
  const std::string coordinator = absl::GetFlag(FLAGS_coordinator);
  const std::string replica = absl::GetFlag(FLAGS_replica);
  if (coordinator.empty() || replica.empty()) {
    std::fprintf(stderr, "coordinator_bench: --coordinator and --replica are required\n");
    return 1;
  }
  auto inference = v1::Inference::NewStub(
      grpc::CreateChannel(coordinator, grpc::InsecureChannelCredentials()));
  auto direct = iv1::Replica::NewStub(
      grpc::CreateChannel(replica, grpc::InsecureChannelCredentials()));
  const int64_t max_tokens = absl::GetFlag(FLAGS_max_tokens);
  const int requests = absl::GetFlag(FLAGS_requests);

  // Warm both paths (connections, the engine's first steps).
  for (int i = 0; i < 5; ++i) {
    if (!Direct(*direct, MakeRequest(i, max_tokens)).ok ||
        !ThroughCoordinator(*inference, MakeRequest(i, max_tokens)).ok) {
      std::fprintf(stderr, "coordinator_bench: a warm-up request failed; is the cluster up?\n");
      return 1;
    }
  }
  std::vector<double> first[2], gaps[2];
  for (int i = 0; i < requests; ++i) {
    // Alternate which path goes first, so drift hits both alike.
    for (int k = 0; k < 2; ++k) {
      const int path = (i + k) % 2;
      Timing t = path == 0 ? Direct(*direct, MakeRequest(i, max_tokens))
                           : ThroughCoordinator(*inference, MakeRequest(i, max_tokens));
      if (!t.ok) {
        std::fprintf(stderr, "coordinator_bench: request %d failed\n", i);
        return 1;
      }
      first[path].push_back(t.first_ms);
      gaps[path].insert(gaps[path].end(), t.gaps_ms.begin(), t.gaps_ms.end());
    }
  }
  std::printf("sequential requests: %d per path, %lld tokens each\n", requests,
              static_cast<long long>(max_tokens));
  std::printf("%-22s %14s %14s %14s %14s\n", "path", "first p50 ms", "first p90 ms",
              "gap p50 ms", "gap p90 ms");
  const char* names[2] = {"direct to the leader", "through coordinator"};
  for (int path = 0; path < 2; ++path) {
    std::printf("%-22s %14.3f %14.3f %14.3f %14.3f\n", names[path], Percentile(first[path], 0.5),
                Percentile(first[path], 0.9), Percentile(gaps[path], 0.5),
                Percentile(gaps[path], 0.9));
  }
  std::printf("added by the coordinator: %.3f ms to the first response, %.3f ms per streamed "
              "response (medians)\n",
              Percentile(first[1], 0.5) - Percentile(first[0], 0.5),
              Percentile(gaps[1], 0.5) - Percentile(gaps[0], 0.5));

  const int streams = absl::GetFlag(FLAGS_streams);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  const double direct_rps = Throughput(streams, seconds, [&](int i) {
    return Direct(*direct, MakeRequest(i, max_tokens)).ok;
  });
  const double coordinator_rps = Throughput(streams, seconds, [&](int i) {
    return ThroughCoordinator(*inference, MakeRequest(i, max_tokens)).ok;
  });
  std::printf("%d concurrent streams, %.0f s each: direct %.1f requests/s, through the "
              "coordinator %.1f requests/s (%.2fx)\n",
              streams, seconds, direct_rps, coordinator_rps, coordinator_rps / direct_rps);
  return 0;
}
