// The client's view of its lease: CLOCK_BOOTTIME, the local deadline and how it is printed.
//
// The daemon judges a lease by when a call arrived (never earlier than when the client sent it)
// plus the lease timeout. The client moves its local deadline to `send time + granted - margin`
// after each call that renewed the lease, so the local deadline always passes first, with a
// margin for the two processes' clocks and for the work of revoking the mapping.
#pragma once

#include <time.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace cachemgr::client {

// Nanoseconds on CLOCK_BOOTTIME: monotonic, and it keeps counting while the machine is
// suspended or the process is stopped, as the daemon's lease does.
inline int64_t BootNanos() {
  timespec ts{};
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

// A tenth of the lease, between 1 ms and 1 s.
inline int64_t LeaseMarginNanos(uint32_t lease_ms) {
  return std::clamp<int64_t>(int64_t{lease_ms} * 100'000, 1'000'000, 1'000'000'000);
}

// The local deadline after a renewal sent at `sent_ns` that granted `granted_ms`.
inline int64_t LocalLeaseDeadline(int64_t sent_ns, uint32_t granted_ms, uint32_t lease_ms) {
  return sent_ns + int64_t{granted_ms} * 1'000'000 - LeaseMarginNanos(lease_ms);
}

// `boot_ns` as wall-clock time, for messages ("lease expired at 2024-05-01T10:00:00.250Z").
inline std::string FormatBootTime(int64_t boot_ns) {
  const absl::Time wall = absl::Now() - absl::Nanoseconds(BootNanos() - boot_ns);
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", wall, absl::UTCTimeZone());
}

}  // namespace cachemgr::client
