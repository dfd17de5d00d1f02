// Replays a scheduler trace through the C++ client, one Session::Step per scheduler step, and
// prints each step's wall time (microseconds, one per line). bench/scheduler_trace.py writes the
// trace and runs this next to its Python and vLLM replays (docs/PERF.md, "The fast path").
//
//   cachemgr_bench_trace_replay --socket=PATH --trace=FILE --num_blocks=N [--layers=32]
//       [--block_size=16] [--fast_path=true|false]
//
// Trace file: one line per step, ops separated by ';': "f ID" (free), "a ID TOKENS" (allocate),
// "k PARENT CHILD" (fork), "d ID" (one decode token).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cachemgr/client/client.h"

namespace {

using cachemgr::client::StepOp;

int Usage() {
  std::printf(
      "usage: cachemgr_bench_trace_replay --socket=PATH --trace=FILE --num_blocks=N "
      "[--layers=32] [--block_size=16] [--fast_path=true|false]\n");
  return 2;
}

bool ParseStep(const std::string& line, std::vector<StepOp>* ops) {
  ops->clear();
  for (absl::string_view op : absl::StrSplit(line, ';', absl::SkipEmpty())) {
    std::vector<std::string> f = absl::StrSplit(op, ' ', absl::SkipEmpty());
    uint32_t tokens = 0;
    if (f.size() == 2 && f[0] == "f") {
      ops->push_back(StepOp::Free(f[1]));
    } else if (f.size() == 2 && f[0] == "d") {
      ops->push_back(StepOp::Allocate(f[1], 1));
    } else if (f.size() == 3 && f[0] == "a" && absl::SimpleAtoi(f[2], &tokens)) {
      ops->push_back(StepOp::Allocate(f[1], tokens));
    } else if (f.size() == 3 && f[0] == "k") {
      ops->push_back(StepOp::Fork(f[1], f[2]));
    } else {
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket, trace;
  uint32_t num_blocks = 0, layers = 32, block_size = 16;
  bool fast_path = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string flag = arg.substr(0, eq),
                      value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    if (flag == "--socket") {
      socket = value;
    } else if (flag == "--trace") {
      trace = value;
    } else if (flag == "--num_blocks" && absl::SimpleAtoi(value, &num_blocks)) {
    } else if (flag == "--layers" && absl::SimpleAtoi(value, &layers)) {
    } else if (flag == "--block_size" && absl::SimpleAtoi(value, &block_size)) {
    } else if (flag == "--fast_path" && (value == "true" || value == "false")) {
      fast_path = value == "true";
    } else {
      const int code = Usage();
      return flag == "--help" || flag == "-h" ? 0 : code;
    }
  }
  if (socket.empty() || trace.empty() || num_blocks == 0) return Usage();

  std::vector<std::vector<StepOp>> steps;
  std::ifstream in(trace);
  for (std::string line; std::getline(in, line);) {
    if (!ParseStep(line, &steps.emplace_back())) {
      std::fprintf(stderr, "%s: bad step %zu\n", trace.c_str(), steps.size());
      return 1;
    }
  }
  cachemgr::client::AttachOptions options;
  options.client_name = "trace-replay";
  options.model.name = "trace-bench";
  options.model.num_layers = layers;
  options.model.num_q_heads = 1;
  options.model.num_kv_heads = 1;
  options.model.head_dim = 8;
  options.model.block_size = block_size;
  options.num_blocks = num_blocks;
  options.fast_path = fast_path;
  auto session = cachemgr::client::Session::Attach(socket, options);
  if (!session.ok()) {
    std::fprintf(stderr, "Attach: %s\n", session.status().ToString().c_str());
    return 1;
  }
  std::vector<double> us;
  for (size_t s = 0; s < steps.size(); ++s) {
    const auto start = std::chrono::steady_clock::now();
    auto results = (*session)->Step(steps[s]);
    const auto end = std::chrono::steady_clock::now();
    if (!results.ok()) {
      std::fprintf(stderr, "step %zu: %s\n", s, results.status().ToString().c_str());
      return 1;
    }
    for (const auto& r : *results) {
      if (!r.status.ok()) {
        std::fprintf(stderr, "step %zu: %s\n", s, r.status.ToString().c_str());
        return 1;
      }
    }
    us.push_back(std::chrono::duration<double, std::micro>(end - start).count());
  }
  if (fast_path && (*session)->fast_path_calls() < steps.size()) {
    std::fprintf(stderr, "steps went through gRPC, not the fast path\n");
    return 1;
  }
  for (double t : us) std::printf("%.1f\n", t);
  return 0;
}
