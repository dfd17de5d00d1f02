// cachemgrctl subcommands. Each takes the arguments after its name, prints what it did to
// stdout and errors to stderr, and returns the process exit status: kExitOk, kExitFailure (the
// work failed: unreadable input, bad shapes, compression error) or kExitUsage (bad flags).
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

// Prints "cachemgrctl <command>: <message>" to stderr (plus a pointer to `cachemgrctl help` for
// usage errors) and returns `code`.
int ReportError(const std::string& command, const std::string& message, int code);

}  // namespace cachemgr::ctl
