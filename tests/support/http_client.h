// Raw HTTP over loopback TCP for tests of the metrics endpoint: exact bytes, no client library
// in between. Test-only helper.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr::testing {

// A TCP connection to 127.0.0.1:`port` whose receives time out after 20 s (so a test fails
// instead of hanging). UNAVAILABLE when the connection is refused, INTERNAL otherwise.
absl::StatusOr<UniqueFd> ConnectLoopback(int port);

// Sends "`method` `path` HTTP/1.0" (with a Host header and, for a method other than GET, an
// empty body) on a fresh connection and returns everything the server sends until it closes:
// status line, headers and body.
absl::StatusOr<std::string> HttpRequest(int port, const std::string& method,
                                        const std::string& path);

}  // namespace cachemgr::testing
