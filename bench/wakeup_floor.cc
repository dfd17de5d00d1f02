// The floor under any local call on this machine: a 40-byte ping-pong over a Unix socketpair
// between two processes pinned to CPUs 0 (server) and 1 (caller), with and without polling
// before sleeping (docs/PERF.md, "The fast path"). Each side polls with non-blocking reads for
// its spin (microseconds) before it blocks in poll(). 20,000 round trips per setting.
//
//   cachemgr_bench_wakeup_floor [--caller_spin_us=N --server_spin_us=N]
//   (without flags: 0/0, 100/0, 0/100 and 100/100)
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

void Pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof(set), &set);
}

// One message: polls for `spin_us`, then sleeps in poll(). Returns recv's result.
ssize_t Receive(int fd, char* buffer, size_t size, long spin_us) {
  const auto until = Clock::now() + std::chrono::microseconds(spin_us);
  for (;;) {
    const ssize_t n = recv(fd, buffer, size, MSG_DONTWAIT);
    if (n >= 0) return n;
    if (Clock::now() >= until) {
      pollfd p{fd, POLLIN, 0};
      poll(&p, 1, -1);
    }
  }
}

void Measure(long caller_spin, long server_spin) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) std::exit(1);
  const pid_t child = fork();
  if (child == 0) {
    close(fds[0]);
    Pin(0);
    char buffer[64];
    for (;;) {
      const ssize_t n = Receive(fds[1], buffer, sizeof(buffer), server_spin);
      if (n <= 0) _exit(0);
      if (send(fds[1], buffer, static_cast<size_t>(n), 0) != n) _exit(1);
    }
  }
  close(fds[1]);
  Pin(1);
  char buffer[64] = {};
  std::vector<long> ns;
  for (int i = 0; i < 20000; ++i) {
    const auto start = Clock::now();
    if (send(fds[0], buffer, 40, 0) != 40) std::exit(1);
    if (Receive(fds[0], buffer, sizeof(buffer), caller_spin) <= 0) std::exit(1);
    ns.push_back(static_cast<long>((Clock::now() - start).count()));
    if (i % 100 == 0) usleep(200);  // a pause now and then, as between a scheduler's steps
  }
  close(fds[0]);
  waitpid(child, nullptr, 0);
  std::sort(ns.begin(), ns.end());
  std::printf("caller spin %4ld us, server spin %4ld us: p50 %6.1f us  p99 %6.1f us\n", caller_spin,
              server_spin, static_cast<double>(ns[ns.size() / 2]) / 1e3,
              static_cast<double>(ns[ns.size() * 99 / 100]) / 1e3);
}

}  // namespace

int main(int argc, char** argv) {
  long caller = -1, server = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--caller_spin_us=", 0) == 0) {
      caller = std::atol(arg.c_str() + 17);
    } else if (arg.rfind("--server_spin_us=", 0) == 0) {
      server = std::atol(arg.c_str() + 17);
    } else {
      std::printf(
          "usage: cachemgr_bench_wakeup_floor [--caller_spin_us=N --server_spin_us=N]\n"
          "  a socketpair ping-pong between CPUs 0 and 1; without flags: 0/0, 100/0, 0/100,\n"
          "  100/100 microseconds of polling before sleeping (docs/PERF.md, \"The fast path\")\n");
      return arg == "--help" || arg == "-h" ? 0 : 2;
    }
  }
  if (caller >= 0 && server >= 0) {
    Measure(caller, server);
    return 0;
  }
  for (auto [c, s] : {std::pair{0L, 0L}, {100L, 0L}, {0L, 100L}, {100L, 100L}}) Measure(c, s);
  return 0;
}
