// cachemgr-chaos: one chaos client process for soak runs (scripts/soak.py starts many, kills,
// stops and restarts them and the daemon). See tools/soak/chaos_client.h for what it does and
// Usage() for its flags and the events it prints.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "cachemgr/util/status_macros.h"
#include "tools/soak/chaos_client.h"

namespace cachemgr::soak {
namespace {

constexpr char kUsage[] =
    R"(usage: cachemgr-chaos --socket=PATH [--name=chaos] [--model=soak-a|soak-b|soak-c] [--seed=1]
  [--threads=1] [--seconds=0] [--max_live=8] [--stats_interval_ms=1000] [--call_timeout_s=120]
  [--trace] [--corrupt_after_s=0]

One chaos client of cachemgrd for soak runs (scripts/soak.py): a seeded random mix of
Allocate (prefill and decode), K/V writes through the mapped pool, Free, Fork with copy-on-write
appends, Compress (every preset, reserve and byte targets, window queries or scores), Fetch,
Park, GetSequence with digests, ListSequences and requests that must be refused, each answer
and the pool's bytes checked against a model of what every live sequence holds. Survives
daemon restarts and lease loss (re-attaches, forgets the lost sequences). With --threads,
several workers share the session, each with sequences of its own.

  --socket=PATH          the daemon's gRPC socket (required)
  --name=NAME            client name; also the prefix of its sequence ids
  --model=NAME           soak-a (fp32, FlashAttention), soak-b (fp16, FlashInfer), soak-c (bf16)
  --seed=N               seeds every choice and every K/V byte
  --threads=N            workers sharing the session (each with its own sequences)
  --seconds=S            run time; 0: until SIGTERM or SIGINT
  --max_live=N           live sequences per worker at most
  --stats_interval_ms=N  how often the "stats" event reports
  --call_timeout_s=S     a call taking longer prints a "stuck" event and exits 3
  --trace                one "op" event per call
  --corrupt_after_s=S    self-test of the checks: after S seconds worker 0 flips one K byte of
                         a live sequence behind its model's back; a "corruption" event follows

Prints one JSON object per line, each with "event", "client" and "t_ms": attached,
attach_failed, session_lost / session_ready (the client library's events), lost, reattached,
reattach_failed, stats (per op since the last stats: outcomes by status code, latency buckets
of the successful calls: bucket i holds latencies below 2^((i+1)/8) us), corruption (an answer
or the pool's bytes disagree with the model: "problems"), anomaly (a failure no request of
this client invites: "what"), stuck, op (--trace), corrupted_on_purpose and, at the end (after
SIGTERM or --seconds),
done with totals. Exit status: 0 after done; 2 bad flags or stopped before attaching; 3 stuck.
)";

std::atomic<ChaosClient*> g_client{nullptr};

void OnStopSignal(int) {
  ChaosClient* client = g_client.load();
  if (client != nullptr) client->Stop();
}

absl::Status ParseFlags(int argc, char** argv, ChaosOptions* options, uint32_t* call_timeout_s) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    const size_t eq = arg.find('=');
    const std::string flag = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    auto number = [&](auto* out) -> absl::Status {
      if (!absl::SimpleAtoi(value, out)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", flag, "=", value, " is not a non-negative integer"));
      }
      return absl::OkStatus();
    };
    uint32_t u32 = 0;
    if (flag == "socket") {
      options->socket = value;
    } else if (flag == "name") {
      options->name = value;
    } else if (flag == "model") {
      options->model = value;
    } else if (flag == "seed") {
      RETURN_IF_ERROR(number(&options->seed));
    } else if (flag == "threads") {
      RETURN_IF_ERROR(number(&options->threads));
    } else if (flag == "seconds") {
      RETURN_IF_ERROR(number(&u32));
      options->duration = absl::Seconds(u32);
    } else if (flag == "max_live") {
      RETURN_IF_ERROR(number(&options->max_live));
    } else if (flag == "stats_interval_ms") {
      RETURN_IF_ERROR(number(&u32));
      options->stats_interval = absl::Milliseconds(std::max<uint32_t>(u32, 10));
    } else if (flag == "call_timeout_s") {
      RETURN_IF_ERROR(number(call_timeout_s));
    } else if (flag == "corrupt_after_s") {
      RETURN_IF_ERROR(number(&u32));
      options->corrupt_after = absl::Seconds(u32);
    } else if (flag == "trace") {
      options->trace = value.empty() || value == "true" || value == "1";
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", flag));
    }
  }
  if (options->socket.empty()) return absl::InvalidArgumentError("--socket is required");
  if (options->name.empty()) return absl::InvalidArgumentError("--name must not be empty");
  if (options->max_live == 0) return absl::InvalidArgumentError("--max_live must be at least 1");
  if (options->threads == 0 || options->threads > 64) {
    return absl::InvalidArgumentError("--threads must be in [1, 64]");
  }
  RETURN_IF_ERROR(SoakModel(options->model).status());
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  ChaosOptions options;
  uint32_t call_timeout_s = 120;
  if (absl::Status s = ParseFlags(argc, argv, &options, &call_timeout_s); !s.ok()) {
    std::fprintf(stderr, "cachemgr-chaos: %s\n%s", std::string(s.message()).c_str(), kUsage);
    return 2;
  }
  std::mutex out_mu;
  const std::string name = options.name;
  auto emit = [&out_mu, name](nlohmann::json event) {
    event["client"] = name;
    event["t_ms"] = absl::ToUnixMillis(absl::Now());
    const std::string line = event.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    std::lock_guard<std::mutex> lock(out_mu);
    std::fputs((line + "\n").c_str(), stdout);
    std::fflush(stdout);
  };
  ChaosClient client(options, emit);
  g_client.store(&client);
  struct sigaction action = {};
  action.sa_handler = OnStopSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);

  // The watchdog: no call may hang the client (every call has a deadline, and a lost lease
  // cancels calls in flight; this catches what slips through).
  std::atomic<bool> finished{false};
  std::thread watchdog([&] {
    while (!finished.load()) {
      absl::SleepFor(absl::Milliseconds(250));
      for (size_t i = 0; i < client.progress().size(); ++i) {
        const Progress& p = *client.progress()[i];
        const int64_t started = p.call_started_ns.load();
        if (started != 0 && MonotonicNanos() - started > int64_t{call_timeout_s} * 1000000000) {
          emit({{"event", "stuck"},
                {"call", p.call.load()},
                {"thread", i == 0 ? std::string("process") : absl::StrCat("worker ", i - 1)},
                {"seconds", (MonotonicNanos() - started) / 1e9}});
          _exit(3);
        }
      }
    }
  });
  const absl::Status status = client.Run();
  finished.store(true);
  watchdog.join();
  g_client.store(nullptr);
  if (!status.ok()) {
    emit({{"event", "error"}, {"status", absl::StrCat(status.message())}});
    return 2;
  }
  return 0;
}

}  // namespace
}  // namespace cachemgr::soak

int main(int argc, char** argv) { return cachemgr::soak::Main(argc, argv); }
