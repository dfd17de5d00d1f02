// Black-box test helpers: run the real cachemgrd (DaemonProcess) and other programs such as the
// KV client tool (ChildProcess) as child processes.
//
//   ASSIGN_OR_RETURN(auto daemon, DaemonProcess::Start({"--lease_timeout_ms=500"}));
//   ASSIGN_OR_RETURN(auto client, ChildProcess::Spawn(KvClientPath(),
//                                                     {"--socket=" + daemon->socket_path()}));
//   ASSIGN_OR_RETURN(std::string json, client->ReadLine(absl::Seconds(10)));
//
// Children get PR_SET_PDEATHSIG(SIGKILL), so they die with the test process (spawn them from
// a thread that outlives them, normally the main thread). Not thread-safe: use each object
// from one thread.
#pragma once

#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/util/unique_fd.h"
#include "tests/support/temp_dir.h"

namespace cachemgr::testing {

// Path of the cachemgr_test_kv_client binary (KV_CLIENT_TOOL_PATH).
std::string KvClientPath();
// Path of the cachemgrd binary (CACHEMGRD_PATH).
std::string DaemonPath();
// Path of the cachemgr_test_call binary (CALL_TOOL_PATH): one raw gRPC call, see its header.
std::string CallToolPath();
// Path of the cachemgrctl binary (CACHEMGRCTL_PATH).
std::string CtlPath();

// Who a child runs as: the parent (root, in the tests) switches to these ids in the child, after
// fork and before exec (setgroups, setgid, setuid). The default is nobody:nogroup.
struct ChildIdentity {
  uid_t uid = 65534;
  gid_t gid = 65534;
  std::vector<gid_t> supplementary_groups;
};

// How a child process is set up besides its arguments.
struct SpawnOptions {
  // Run as another user (needs root); nullopt: as the test process.
  std::optional<ChildIdentity> identity;
  // RLIMIT_NOFILE (soft and hard) in the child; 0: inherited.
  rlim_t nofile_limit = 0;
};

// A running cachemgrd with its own temp directory, socket and log.
class DaemonProcess {
 public:
  // Creates a TempDir, spawns cachemgrd with `--socket=<dir>/cachemgr.sock` followed by
  // `extra_args`, stdout and stderr appended to `<dir>/daemon.log`, and waits up to 10 s until
  // client::GetStats on the socket succeeds. On failure (spawn error, early exit, timeout) the
  // process is killed and the error carries the log's tail.
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(
      std::vector<std::string> extra_args = {});
  // The same, with the daemon spawned under `spawn` (e.g. a low descriptor limit).
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(std::vector<std::string> extra_args,
                                                              const SpawnOptions& spawn);

  // SIGKILLs and reaps the daemon if it still runs; removes the directory.
  ~DaemonProcess();
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  const std::string& socket_path() const { return socket_path_; }
  const std::string& dir() const { return dir_.path(); }
  pid_t pid() const { return pid_; }
  std::string log_path() const { return dir_.file("daemon.log"); }
  // The whole log so far (empty if unreadable).
  std::string log_contents() const;
  // Whether the process has not exited yet (reaps it if it has).
  bool running();

  // Sends `signal` and waits up to `timeout` for the exit. Returns the exit code, or 128 + the
  // signal number that killed it. DEADLINE_EXCEEDED if it is still running at the deadline.
  // If the process already exited, returns its status without signalling.
  absl::StatusOr<int> Terminate(int signal = SIGTERM, absl::Duration timeout = absl::Seconds(10));

  // Starts cachemgrd again, with the same arguments on the same socket and log, after it exited
  // (Terminate); waits as Start does. FAILED_PRECONDITION while it still runs.
  absl::Status Restart();

 private:
  DaemonProcess(TempDir dir, std::string socket_path, std::vector<std::string> args,
                SpawnOptions spawn);
  // Spawns the process and waits up to 10 s until it serves.
  absl::Status Spawn();

  TempDir dir_;
  std::string socket_path_;
  std::vector<std::string> args_;
  SpawnOptions spawn_;  // every (re)start's
  pid_t pid_ = -1;
  bool reaped_ = true;  // nothing to reap before the first Spawn()
  int exit_code_ = -1;
};

// A child program with its stdout captured through a pipe; stderr is inherited.
class ChildProcess {
 public:
  // Runs `path` with `args` (argv[0] is `path`), stdin from /dev/null.
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Spawn(const std::string& path,
                                                             std::vector<std::string> args);
  // The same as another user (the test process must be root): `who`'s groups, gid and uid are
  // set in the child before exec. A failure to switch is an exec failure (NOT_FOUND).
  static absl::StatusOr<std::unique_ptr<ChildProcess>> SpawnAs(const ChildIdentity& who,
                                                               const std::string& path,
                                                               std::vector<std::string> args);

  // SIGKILLs and reaps the child if it still runs.
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }

  // Next line of the child's stdout, without the '\n'. DEADLINE_EXCEEDED if none arrives in
  // `timeout`; OUT_OF_RANGE at end of output (a final unterminated line is returned first).
  absl::StatusOr<std::string> ReadLine(absl::Duration timeout);
  // Sends `sig`. OK if the child already exited and was reaped.
  absl::Status Kill(int sig);
  // Waits up to `timeout` for the exit: the exit code, or 128 + the terminating signal.
  // DEADLINE_EXCEEDED if still running. Can be called again after it returned.
  absl::StatusOr<int> Wait(absl::Duration timeout);

 private:
  ChildProcess(pid_t pid, UniqueFd stdout_fd);

  pid_t pid_ = -1;
  UniqueFd stdout_fd_;
  std::string buffer_;
  bool eof_ = false;
  bool reaped_ = false;
  int exit_code_ = -1;
};

}  // namespace cachemgr::testing
