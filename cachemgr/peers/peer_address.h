// PeerSource: one entry of --peers, and what it resolves to.
//
// An entry is "HOST:PORT" (a host name or address; IPv6 in brackets: "[fd00::1]:50051"), probed
// as given, or "dns:NAME:PORT": NAME resolved again at every probe round to all its addresses
// (a Kubernetes headless Service resolves to one address per daemon), each probed as a peer.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace cachemgr {

struct PeerSource {
  std::string entry;  // as written in --peers
  std::string host;   // host, address (IPv6 without brackets) or DNS name
  uint16_t port = 0;
  bool dns = false;  // "dns:" entry: every address of `host`
};

// Parses a comma-separated --peers value (empty entries and surrounding spaces ignored).
// INVALID_ARGUMENT naming --peers and the entry for a malformed one (no port, port not in
// 1..65535, empty host, a duplicate).
absl::StatusOr<std::vector<PeerSource>> ParsePeerList(absl::string_view text);

// The "host:port" addresses a source stands for: the entry itself, or every address NAME
// resolves to (IPv4 and IPv6, deduplicated, sorted) with the port. UNAVAILABLE naming the name
// if it does not resolve (a headless Service with no ready pods, say).
absl::StatusOr<std::vector<std::string>> ResolvePeerSource(const PeerSource& source);

}  // namespace cachemgr
