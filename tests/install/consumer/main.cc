// Links the installed client and calls it: with no daemon at the path the call must fail with
// UNAVAILABLE, which proves the library (and its gRPC dependencies) linked and ran.
#include <cstdio>

#include "cachemgr/client/client.h"

int main(int argc, char** argv) {
  const std::string socket = argc > 1 ? argv[1] : "/nonexistent/cachemgr.sock";
  auto stats = cachemgr::client::GetStats(socket);
  if (stats.ok()) {
    std::printf("unexpected: stats from %s\n", socket.c_str());
    return 1;
  }
  std::printf("consumer linked cachemgr::client; GetStats: %s\n",
              stats.status().ToString().c_str());
  return stats.status().code() == absl::StatusCode::kUnavailable ? 0 : 1;
}
