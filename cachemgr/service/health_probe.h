// HealthProbe: the daemon checks that it can still serve new clients. A process whose listener
// is wedged (descriptors exhausted, socket file removed) would otherwise stay alive and report
// healthy to anyone already connected, so systemd would never restart it.
//
// Every `interval` the probe opens a fresh connection to the daemon's own Unix socket and makes
// a real call (grpc.health.v1.Health/Check) with a deadline; any answer from the server counts
// as success (with --nohealth the call is UNIMPLEMENTED, still an answer), while UNAVAILABLE or
// DEADLINE_EXCEEDED count as failure. After `failures_to_unserve` consecutive failures it
// reports "unserving"; after the next success, "serving" again.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace cachemgr {

struct HealthProbeOptions {
  std::string socket_path;
  absl::Duration interval = absl::Seconds(2);
  // Each probe call's deadline.
  absl::Duration deadline = absl::Seconds(2);
  uint32_t failures_to_unserve = 3;
};

class HealthProbe {
 public:
  // Called on the probe's thread when the verdict changes: serving == false after the failures,
  // true after a later success. `why` is the last failure's status.
  using OnChange = std::function<void(bool serving, const std::string& why)>;

  static std::unique_ptr<HealthProbe> Start(const HealthProbeOptions& options, OnChange on_change);
  ~HealthProbe();  // Stops.
  // Joins the thread; on_change is not called afterwards. Idempotent.
  void Stop();

 private:
  HealthProbe(HealthProbeOptions options, OnChange on_change);
  void Run();
  // OK or the failure's status text.
  std::string ProbeOnce() const;

  const HealthProbeOptions options_;
  const OnChange on_change_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace cachemgr
