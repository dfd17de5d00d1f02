// cachemgrctl: the command-line tool of cachemgr. Dispatches to the subcommands of
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
  if (command == "compress") return RunCompress(args);
  if (command == "codebook") return RunCodebook(args);
  return ReportError(command, "unknown command (known: compress, codebook, help)", kExitUsage);
}
