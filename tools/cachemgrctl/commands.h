// cachemgrctl subcommands. Each takes the arguments after its name, prints what it did to
// stdout and errors to stderr, and returns the process exit status: kExitOk, kExitFailure (the
// work failed: unreadable input, bad shapes, compression error, a daemon call's error status) or
// kExitUsage (bad flags).
#pragma once

#include <string>
#include <vector>

namespace cachemgr::ctl {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// The full `cachemgrctl help` text.
std::string UsageText();

// `cachemgrctl compress`: runs a compression policy offline on .npy KV tensors.
int RunCompress(const std::vector<std::string>& args);

// `cachemgrctl codebook`: the similarity codebook (Algorithm 1) of one set of vectors.
int RunCodebook(const std::vector<std::string>& args);

// Commands that talk to a running daemon (daemon_client.h lists their shared flags).
int RunHealth(const std::vector<std::string>& args);     // exit 1 unless SERVING
int RunStats(const std::vector<std::string>& args);      // pools, per device and layer
int RunClients(const std::vector<std::string>& args);    // attached clients
int RunSequences(const std::vector<std::string>& args);  // every client's sequences
int RunSequence(const std::vector<std::string>& args);   // one sequence's layers
int RunWatch(const std::vector<std::string>& args);      // the event stream, live
int RunFree(const std::vector<std::string>& args);       // frees any client's sequence
int RunPeers(const std::vector<std::string>& args);      // the daemon's peers (operator)
// `cachemgrctl compress --sequence=ID`: an operator Compress in the daemon (no inputs).
int RunDaemonCompress(const std::vector<std::string>& args);

// Prints "cachemgrctl <command>: <message>" to stderr (plus a pointer to `cachemgrctl help` for
// usage errors) and returns `code`.
int ReportError(const std::string& command, const std::string& message, int code);

}  // namespace cachemgr::ctl
