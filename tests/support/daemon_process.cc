#include "tests/support/daemon_process.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/client/client.h"
#include "cachemgr/util/status_macros.h"

#ifndef CACHEMGRD_PATH
#error "CACHEMGRD_PATH must be defined (see tests/CMakeLists.txt)"
#endif
#ifndef KV_CLIENT_TOOL_PATH
#error "KV_CLIENT_TOOL_PATH must be defined (see tests/CMakeLists.txt)"
#endif
#ifndef CALL_TOOL_PATH
#error "CALL_TOOL_PATH must be defined (see tests/CMakeLists.txt)"
#endif

namespace cachemgr::testing {
namespace {

constexpr absl::Duration kStartTimeout = absl::Seconds(10);
constexpr absl::Duration kPollInterval = absl::Milliseconds(10);
constexpr size_t kLogTailBytes = 4000;

absl::Status ErrnoError(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Runs `path` with `args`; stdin from /dev/null, stdout/stderr to the given descriptors (-1
// inherits). Reports exec failures through a CLOEXEC pipe so a bad path is an error here.
absl::StatusOr<pid_t> SpawnProcess(const std::string& path, const std::vector<std::string>& args,
                                   int stdout_fd, int stderr_fd,
                                   const SpawnOptions& spawn = SpawnOptions()) {
  std::vector<std::string> storage;
  storage.reserve(args.size() + 1);
  storage.push_back(path);
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& arg : storage) argv.push_back(arg.data());
  argv.push_back(nullptr);

  UniqueFd dev_null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!dev_null.valid()) return ErrnoError("open /dev/null");
  int exec_pipe[2];
  if (::pipe2(exec_pipe, O_CLOEXEC) != 0) return ErrnoError("pipe2");
  UniqueFd exec_read(exec_pipe[0]), exec_write(exec_pipe[1]);

  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return ErrnoError("fork");
  if (pid == 0) {
    // Child: async-signal-safe calls only.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    ::dup2(dev_null.get(), STDIN_FILENO);
    if (stdout_fd >= 0) ::dup2(stdout_fd, STDOUT_FILENO);
    if (stderr_fd >= 0) ::dup2(stderr_fd, STDERR_FILENO);
    int err = 0;
    if (spawn.nofile_limit != 0) {
      const rlimit limit{spawn.nofile_limit, spawn.nofile_limit};
      if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) err = errno;
    }
    if (err == 0 && spawn.identity.has_value()) {
      const ChildIdentity& who = *spawn.identity;
      if (::setgroups(who.supplementary_groups.size(), who.supplementary_groups.data()) != 0 ||
          ::setgid(who.gid) != 0 || ::setuid(who.uid) != 0) {
        err = errno;
      }
    }
    if (err == 0) {
      ::execv(path.c_str(), argv.data());
      err = errno;
    }
    [[maybe_unused]] ssize_t n = ::write(exec_write.get(), &err, sizeof(err));
    ::_exit(127);
  }
  exec_write.reset();
  int child_errno = 0;
  ssize_t n;
  do {
    n = ::read(exec_read.get(), &child_errno, sizeof(child_errno));
  } while (n < 0 && errno == EINTR);
  if (n == sizeof(child_errno)) {
    int status;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return absl::NotFoundError(absl::StrCat("execv ", path, ": ", std::strerror(child_errno)));
  }
  return pid;
}

// Waits up to `timeout` for `pid`; on exit stores the decoded code and sets `*reaped`.
absl::Status WaitFor(pid_t pid, absl::Duration timeout, bool* reaped, int* exit_code) {
  if (*reaped) return absl::OkStatus();
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      *reaped = true;
      *exit_code = DecodeWaitStatus(status);
      return absl::OkStatus();
    }
    if (r < 0 && errno != EINTR) return ErrnoError(absl::StrCat("waitpid ", pid));
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("process ", pid, " still running after ", absl::FormatDuration(timeout)));
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
}

void KillAndReap(pid_t pid, bool* reaped, int* exit_code) {
  if (*reaped || pid <= 0) return;
  ::kill(pid, SIGKILL);
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(pid, &status, 0);
  } while (r < 0 && errno == EINTR);
  *reaped = true;
  *exit_code = r == pid ? DecodeWaitStatus(status) : -1;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string Tail(const std::string& text) {
  if (text.size() <= kLogTailBytes) return text;
  return absl::StrCat("...", text.substr(text.size() - kLogTailBytes));
}

}  // namespace

std::string KvClientPath() { return KV_CLIENT_TOOL_PATH; }
std::string CallToolPath() { return CALL_TOOL_PATH; }
std::string CtlPath() { return CACHEMGRCTL_PATH; }
// $CACHEMGRD overrides the build path (scripts/gpu-check.sh runs the binaries elsewhere).
std::string DaemonPath() {
  const char* env = std::getenv("CACHEMGRD");
  return env != nullptr && *env != 0 ? env : CACHEMGRD_PATH;
}

// ---- DaemonProcess ---------------------------------------------------------------------------

DaemonProcess::DaemonProcess(TempDir dir, std::string socket_path, std::vector<std::string> args,
                             SpawnOptions spawn)
    : dir_(std::move(dir)),
      socket_path_(std::move(socket_path)),
      args_(std::move(args)),
      spawn_(std::move(spawn)) {}

DaemonProcess::~DaemonProcess() { KillAndReap(pid_, &reaped_, &exit_code_); }

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(
    std::vector<std::string> extra_args) {
  return Start(std::move(extra_args), SpawnOptions());
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(
    std::vector<std::string> extra_args, const SpawnOptions& spawn) {
  ASSIGN_OR_RETURN(TempDir dir, TempDir::Create());
  std::string socket_path = dir.file("cachemgr.sock");
  std::vector<std::string> args;
  args.push_back("--socket=" + socket_path);
  for (std::string& arg : extra_args) args.push_back(std::move(arg));
  std::unique_ptr<DaemonProcess> daemon(
      new DaemonProcess(std::move(dir), std::move(socket_path), std::move(args), spawn));
  RETURN_IF_ERROR(daemon->Spawn());
  return daemon;
}

absl::Status DaemonProcess::Restart() {
  if (running()) {
    return absl::FailedPreconditionError(absl::StrCat("cachemgrd ", pid_, " still runs"));
  }
  return Spawn();
}

absl::Status DaemonProcess::Spawn() {
  const std::string log_path = dir_.file("daemon.log");
  UniqueFd log(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!log.valid()) return ErrnoError(absl::StrCat("open ", log_path));
  ASSIGN_OR_RETURN(pid_, SpawnProcess(DaemonPath(), args_, log.get(), log.get(), spawn_));
  reaped_ = false;
  exit_code_ = -1;
  log.reset();

  const absl::Time deadline = absl::Now() + kStartTimeout;
  absl::Status last = absl::UnavailableError("socket not created yet");
  while (absl::Now() < deadline) {
    if (!running()) {
      return absl::InternalError(absl::StrCat(DaemonPath(), " exited with code ", exit_code_,
                                              " before serving; log:\n", Tail(log_contents())));
    }
    struct stat st;
    if (::stat(socket_path_.c_str(), &st) == 0) {
      absl::StatusOr<client::Stats> stats = client::GetStats(socket_path_);
      if (stats.ok()) return absl::OkStatus();
      last = stats.status();
    }
    absl::SleepFor(kPollInterval);
  }
  KillAndReap(pid_, &reaped_, &exit_code_);
  return absl::DeadlineExceededError(absl::StrCat(DaemonPath(), " did not serve on ", socket_path_,
                                                  " within ", absl::FormatDuration(kStartTimeout),
                                                  " (last: ", last.ToString(), "); log:\n",
                                                  Tail(log_contents())));
}

std::string DaemonProcess::log_contents() const { return ReadFile(log_path()); }

bool DaemonProcess::running() {
  if (reaped_) return false;
  (void)WaitFor(pid_, absl::ZeroDuration(), &reaped_, &exit_code_);
  return !reaped_;
}

absl::StatusOr<int> DaemonProcess::Terminate(int signal, absl::Duration timeout) {
  if (!running()) return exit_code_;
  if (::kill(pid_, signal) != 0 && errno != ESRCH) {
    return ErrnoError(absl::StrCat("kill ", pid_, " ", signal));
  }
  RETURN_IF_ERROR(WaitFor(pid_, timeout, &reaped_, &exit_code_));
  return exit_code_;
}

// ---- ChildProcess ----------------------------------------------------------------------------

ChildProcess::ChildProcess(pid_t pid, UniqueFd stdout_fd)
    : pid_(pid), stdout_fd_(std::move(stdout_fd)) {}

ChildProcess::~ChildProcess() { KillAndReap(pid_, &reaped_, &exit_code_); }

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Spawn(const std::string& path,
                                                                  std::vector<std::string> args) {
  int out_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) return ErrnoError("pipe2");
  UniqueFd out_read(out_pipe[0]), out_write(out_pipe[1]);
  ASSIGN_OR_RETURN(pid_t pid, SpawnProcess(path, args, out_write.get(), /*stderr_fd=*/-1));
  out_write.reset();
  return std::unique_ptr<ChildProcess>(new ChildProcess(pid, std::move(out_read)));
}

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::SpawnAs(const ChildIdentity& who,
                                                                    const std::string& path,
                                                                    std::vector<std::string> args) {
  int out_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) return ErrnoError("pipe2");
  UniqueFd out_read(out_pipe[0]), out_write(out_pipe[1]);
  SpawnOptions spawn;
  spawn.identity = who;
  ASSIGN_OR_RETURN(pid_t pid, SpawnProcess(path, args, out_write.get(), /*stderr_fd=*/-1, spawn));
  out_write.reset();
  return std::unique_ptr<ChildProcess>(new ChildProcess(pid, std::move(out_read)));
}

absl::StatusOr<std::string> ChildProcess::ReadLine(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const size_t newline = buffer_.find('\n');
    if (newline != std::string::npos) {
      std::string line = buffer_.substr(0, newline);
      buffer_.erase(0, newline + 1);
      return line;
    }
    if (eof_) {
      if (!buffer_.empty()) return std::exchange(buffer_, std::string());
      return absl::OutOfRangeError(absl::StrCat("process ", pid_, " closed its stdout"));
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(
          absl::StrCat("no line from process ", pid_, " within ", absl::FormatDuration(timeout)));
    }
    pollfd pfd{stdout_fd_.get(), POLLIN, 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(left) + 1));
    if (ready < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("poll");
    }
    if (ready == 0) continue;  // the deadline check above reports the timeout
    char chunk[4096];
    const ssize_t n = ::read(stdout_fd_.get(), chunk, sizeof(chunk));
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return ErrnoError("read");
    }
    if (n == 0) {
      eof_ = true;
    } else {
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }
}

absl::Status ChildProcess::Kill(int sig) {
  if (reaped_) return absl::OkStatus();
  if (::kill(pid_, sig) != 0 && errno != ESRCH) {
    return ErrnoError(absl::StrCat("kill ", pid_, " ", sig));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> ChildProcess::Wait(absl::Duration timeout) {
  RETURN_IF_ERROR(WaitFor(pid_, timeout, &reaped_, &exit_code_));
  return exit_code_;
}

}  // namespace cachemgr::testing
