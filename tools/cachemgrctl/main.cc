// cachemgrctl: the command-line tool of cachemgr: inspects and operates a running daemon, and
// runs the compression math offline. Dispatches to the subcommands of
// commands.h; `cachemgrctl help` prints the usage of all of them.
#include <cstdio>
#include <string>
#include <vector>

#include "tools/cachemgrctl/commands.h"

int main(int argc, char** argv) {
  using namespace cachemgr::ctl;
  if (argc < 2) {
    std::fputs(UsageText().c_str(), stderr);
    return kExitUsage;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "help" || command == "--help" || command == "-h") {
    std::fputs(UsageText().c_str(), stdout);
    return kExitOk;
  }
  if (command == "compress") {
    // With --sequence it compresses a sequence in the daemon; otherwise .npy files offline.
    for (const std::string& arg : args) {
      if (arg.rfind("--sequence=", 0) == 0) return RunDaemonCompress(args);
    }
    return RunCompress(args);
  }
  if (command == "codebook") return RunCodebook(args);
  if (command == "health") return RunHealth(args);
  if (command == "stats") return RunStats(args);
  if (command == "clients") return RunClients(args);
  if (command == "sequences") return RunSequences(args);
  if (command == "sequence") return RunSequence(args);
  if (command == "watch") return RunWatch(args);
  if (command == "free") return RunFree(args);
  if (command == "peers") return RunPeers(args);
  return ReportError(command,
                     "unknown command (known: health, stats, clients, sequences, sequence, watch, "
                     "free, peers, compress, codebook, help)",
                     kExitUsage);
}
