#include "cachemgr/peers/peer_address.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace cachemgr {
namespace {

absl::Status Malformed(absl::string_view entry, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("--peers entry \"", entry, "\": ", why,
                   " (expected HOST:PORT, [IPV6]:PORT or dns:NAME:PORT)"));
}

// "host:port" with brackets around an IPv6 host.
std::string Join(absl::string_view host, uint16_t port) {
  return host.find(':') == absl::string_view::npos ? absl::StrCat(host, ":", port)
                                                   : absl::StrCat("[", host, "]:", port);
}

}  // namespace

absl::StatusOr<std::vector<PeerSource>> ParsePeerList(absl::string_view text) {
  std::vector<PeerSource> sources;
  std::set<std::pair<std::string, uint16_t>> seen;
  for (absl::string_view raw : absl::StrSplit(text, ',')) {
    const absl::string_view entry = absl::StripAsciiWhitespace(raw);
    if (entry.empty()) continue;
    PeerSource source;
    source.entry = std::string(entry);
    absl::string_view rest = entry;
    source.dns = absl::ConsumePrefix(&rest, "dns:");
    const size_t colon = rest.rfind(':');
    if (colon == absl::string_view::npos) return Malformed(entry, "no port");
    absl::string_view host = rest.substr(0, colon);
    uint32_t port = 0;
    if (!absl::SimpleAtoi(rest.substr(colon + 1), &port) || port == 0 || port > 65535) {
      return Malformed(entry, "the port is not in 1..65535");
    }
    if (absl::ConsumePrefix(&host, "[") && !absl::ConsumeSuffix(&host, "]")) {
      return Malformed(entry, "an unclosed [");
    }
    if (host.empty()) return Malformed(entry, "no host");
    if (!source.dns && host.find(':') != absl::string_view::npos && rest.front() != '[') {
      return Malformed(entry, "an IPv6 address needs brackets");
    }
    source.host = std::string(host);
    source.port = static_cast<uint16_t>(port);
    if (!seen.emplace(absl::StrCat(source.dns ? "dns:" : "", source.host), source.port).second) {
      return Malformed(entry, "listed twice");
    }
    sources.push_back(std::move(source));
  }
  return sources;
}

absl::StatusOr<std::vector<std::string>> ResolvePeerSource(const PeerSource& source) {
  if (!source.dns) return std::vector<std::string>{Join(source.host, source.port)};
  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int err = ::getaddrinfo(source.host.c_str(), nullptr, &hints, &found); err != 0) {
    return absl::UnavailableError(
        absl::StrCat("resolving ", source.host, " (", source.entry, "): ", ::gai_strerror(err)));
  }
  std::set<std::string> addresses;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    char text[INET6_ADDRSTRLEN] = {};
    const void* raw =
        a->ai_family == AF_INET
            ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in*>(a->ai_addr)->sin_addr)
            : static_cast<const void*>(
                  &reinterpret_cast<const sockaddr_in6*>(a->ai_addr)->sin6_addr);
    if ((a->ai_family == AF_INET || a->ai_family == AF_INET6) &&
        ::inet_ntop(a->ai_family, raw, text, sizeof(text)) != nullptr) {
      addresses.insert(Join(text, source.port));
    }
  }
  ::freeaddrinfo(found);
  if (addresses.empty()) {
    return absl::UnavailableError(
        absl::StrCat("resolving ", source.host, " (", source.entry, "): no IPv4 or IPv6 address"));
  }
  return std::vector<std::string>(addresses.begin(), addresses.end());
}

}  // namespace cachemgr
