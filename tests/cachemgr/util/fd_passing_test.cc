#include "cachemgr/util/fd_passing.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "tests/support/temp_dir.h"

namespace cachemgr {
namespace {

struct SocketPair {
  UniqueFd a, b;
};

SocketPair MakePair() {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

UniqueFd MakeMemfd(const std::string& contents) {
  UniqueFd fd(::memfd_create("fd_passing_test", MFD_CLOEXEC));
  REQUIRE(fd.valid());
  REQUIRE(::write(fd.get(), contents.data(), contents.size()) ==
          static_cast<ssize_t>(contents.size()));
  return fd;
}

std::string ReadAt(int fd, size_t n, off_t offset = 0) {
  std::string out(n, '\0');
  const ssize_t got = ::pread(fd, out.data(), n, offset);
  REQUIRE(got >= 0);
  out.resize(static_cast<size_t>(got));
  return out;
}

bool IsCloseOnExec(int fd) {
  const int flags = ::fcntl(fd, F_GETFD);
  REQUIRE(flags >= 0);
  return (flags & FD_CLOEXEC) != 0;
}

bool SameFile(int x, int y) {
  struct stat sx = {};
  struct stat sy = {};
  REQUIRE(::fstat(x, &sx) == 0);
  REQUIRE(::fstat(y, &sy) == 0);
  return sx.st_dev == sy.st_dev && sx.st_ino == sy.st_ino;
}

TEST_CASE("payload and descriptors round-trip over a socketpair", "[cpu]") {
  SocketPair sp = MakePair();
  UniqueFd m1 = MakeMemfd("first memfd");
  UniqueFd m2 = MakeMemfd("second memfd");
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);  // deliberately without O_CLOEXEC
  UniqueFd pipe_r(pipe_fds[0]), pipe_w(pipe_fds[1]);

  const std::string payload = "OK 3 with some payload";
  REQUIRE(SendFdMessage(sp.a.get(), payload, {m1.get(), m2.get(), pipe_w.get()}).ok());
  // Sent descriptors are borrowed, not closed.
  CHECK(::fcntl(m1.get(), F_GETFD) >= 0);
  CHECK(::fcntl(pipe_w.get(), F_GETFD) >= 0);

  absl::StatusOr<FdMessage> msg = ReceiveFdMessage(sp.b.get());
  REQUIRE(msg.ok());
  CHECK(msg->payload == payload);
  REQUIRE(msg->fds.size() == 3);
  for (const UniqueFd& fd : msg->fds) {
    CHECK(fd.valid());
    CHECK(IsCloseOnExec(fd.get()));
  }
  // New descriptor numbers, same open files.
  CHECK(msg->fds[0].get() != m1.get());
  CHECK(SameFile(msg->fds[0].get(), m1.get()));
  CHECK(SameFile(msg->fds[1].get(), m2.get()));
  CHECK_FALSE(SameFile(msg->fds[0].get(), msg->fds[1].get()));

  // Bytes written through one descriptor are read through the other, both directions.
  CHECK(ReadAt(msg->fds[0].get(), 64) == "first memfd");
  CHECK(ReadAt(msg->fds[1].get(), 64) == "second memfd");
  const std::string update = "WRITTEN";
  REQUIRE(::pwrite(msg->fds[1].get(), update.data(), update.size(), 0) ==
          static_cast<ssize_t>(update.size()));
  CHECK(ReadAt(m2.get(), 64) == "WRITTENmemfd");

  const std::string through_pipe = "via received pipe end";
  REQUIRE(::write(msg->fds[2].get(), through_pipe.data(), through_pipe.size()) ==
          static_cast<ssize_t>(through_pipe.size()));
  std::string got(through_pipe.size(), '\0');
  REQUIRE(::read(pipe_r.get(), got.data(), got.size()) == static_cast<ssize_t>(got.size()));
  CHECK(got == through_pipe);
}

TEST_CASE("many descriptors in one message", "[cpu]") {
  SocketPair sp = MakePair();
  std::vector<UniqueFd> owned;
  std::vector<int> raw;
  for (int i = 0; i < 40; ++i) {
    owned.push_back(MakeMemfd("memfd #" + std::to_string(i)));
    raw.push_back(owned.back().get());
  }
  REQUIRE(SendFdMessage(sp.a.get(), "many", raw).ok());
  auto msg = ReceiveFdMessage(sp.b.get());
  REQUIRE(msg.ok());
  REQUIRE(msg->fds.size() == raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    CHECK(ReadAt(msg->fds[i].get(), 64) == "memfd #" + std::to_string(i));
  }
}

TEST_CASE("empty payload is a message, not end of stream", "[cpu]") {
  SocketPair sp = MakePair();
  REQUIRE(SendFdMessage(sp.a.get(), "", {}).ok());
  UniqueFd m = MakeMemfd("x");
  REQUIRE(SendFdMessage(sp.a.get(), "", {m.get()}).ok());
  REQUIRE(SendFdMessage(sp.a.get(), "after", {}).ok());

  auto first = ReceiveFdMessage(sp.b.get());
  REQUIRE(first.ok());
  CHECK(first->payload.empty());
  CHECK(first->fds.empty());

  auto second = ReceiveFdMessage(sp.b.get());
  REQUIRE(second.ok());
  CHECK(second->payload.empty());
  REQUIRE(second->fds.size() == 1);
  CHECK(SameFile(second->fds[0].get(), m.get()));

  auto third = ReceiveFdMessage(sp.b.get());
  REQUIRE(third.ok());
  CHECK(third->payload == "after");

  // The receive left SO_PASSCRED as it found it (off).
  int passcred = -1;
  socklen_t len = sizeof(passcred);
  REQUIRE(::getsockopt(sp.b.get(), SOL_SOCKET, SO_PASSCRED, &passcred, &len) == 0);
  CHECK(passcred == 0);
}

TEST_CASE("largest payload round-trips", "[cpu]") {
  SocketPair sp = MakePair();
  int size = 512 * 1024;  // room for a 64 KiB datagram
  REQUIRE(::setsockopt(sp.a.get(), SOL_SOCKET, SO_SNDBUF, &size, sizeof(size)) == 0);
  std::string payload(kMaxFdMessagePayload, '\0');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 7);
  REQUIRE(SendFdMessage(sp.a.get(), payload, {}).ok());
  auto msg = ReceiveFdMessage(sp.b.get());
  REQUIRE(msg.ok());
  CHECK(msg->payload == payload);
}

TEST_CASE("limits are rejected with INVALID_ARGUMENT before sending", "[cpu]") {
  SocketPair sp = MakePair();
  const std::string big(kMaxFdMessagePayload + 1, 'x');
  CHECK(SendFdMessage(sp.a.get(), big, {}).code() == absl::StatusCode::kInvalidArgument);

  UniqueFd m = MakeMemfd("x");
  std::vector<int> too_many(kMaxFdsPerMessage + 1, m.get());
  CHECK(SendFdMessage(sp.a.get(), "x", too_many).code() == absl::StatusCode::kInvalidArgument);
  CHECK(SendFdMessage(sp.a.get(), "x", {-1}).code() == absl::StatusCode::kInvalidArgument);

  // Nothing was sent: the next message the peer sees is this one.
  REQUIRE(SendFdMessage(sp.a.get(), "marker", {}).ok());
  auto msg = ReceiveFdMessage(sp.b.get());
  REQUIRE(msg.ok());
  CHECK(msg->payload == "marker");
  CHECK(msg->fds.empty());
}

TEST_CASE("a vanished peer is UNAVAILABLE on send and receive", "[cpu]") {
  SECTION("receive after orderly close") {
    SocketPair sp = MakePair();
    REQUIRE(SendFdMessage(sp.a.get(), "last words", {}).ok());
    sp.a.reset();
    auto msg = ReceiveFdMessage(sp.b.get());
    REQUIRE(msg.ok());  // queued messages are still delivered
    CHECK(msg->payload == "last words");
    CHECK(ReceiveFdMessage(sp.b.get()).status().code() == absl::StatusCode::kUnavailable);
  }
  SECTION("send to a closed peer (no SIGPIPE)") {
    SocketPair sp = MakePair();
    sp.b.reset();
    CHECK(SendFdMessage(sp.a.get(), "anyone?", {}).code() == absl::StatusCode::kUnavailable);
  }
}

TEST_CASE("receive timeout is DEADLINE_EXCEEDED", "[cpu]") {
  SocketPair sp = MakePair();
  timeval tv{0, 50 * 1000};
  REQUIRE(::setsockopt(sp.b.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
  CHECK(ReceiveFdMessage(sp.b.get()).status().code() == absl::StatusCode::kDeadlineExceeded);
}

TEST_CASE("an oversize message is DATA_LOSS and its descriptors are closed", "[cpu]") {
  // A raw sendmsg bypasses SendFdMessage's limit, so the receiver sees MSG_TRUNC.
  SocketPair sp = MakePair();
  int size = 512 * 1024;
  REQUIRE(::setsockopt(sp.a.get(), SOL_SOCKET, SO_SNDBUF, &size, sizeof(size)) == 0);
  const std::string big(kMaxFdMessagePayload + 100, 'y');
  UniqueFd m = MakeMemfd("x");
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  iovec iov{const_cast<char*>(big.data()), big.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  const int raw = m.get();
  std::memcpy(CMSG_DATA(c), &raw, sizeof(int));
  REQUIRE(::sendmsg(sp.a.get(), &msg, 0) == static_cast<ssize_t>(big.size()));

  // Count open descriptors before/after: the one that arrived must have been closed.
  auto count_fds = [] {
    int n = 0;
    for (int fd = 0; fd < 1024; ++fd) n += ::fcntl(fd, F_GETFD) >= 0 ? 1 : 0;
    return n;
  };
  const int before = count_fds();
  CHECK(ReceiveFdMessage(sp.b.get()).status().code() == absl::StatusCode::kDataLoss);
  CHECK(count_fds() == before);
}

TEST_CASE("ListenSeqpacket creates a 0600 socket and accepts connections", "[cpu]") {
  testing::TempDir dir;
  const std::string path = dir.file("share.sock");
  auto listener = ListenSeqpacket(path);
  REQUIRE(listener.ok());
  CHECK(IsCloseOnExec(listener->get()));
  struct stat st = {};
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 07777) == 0600);

  auto client = ConnectSeqpacket(path);
  REQUIRE(client.ok());
  CHECK(IsCloseOnExec(client->get()));
  UniqueFd server(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
  REQUIRE(server.valid());
  REQUIRE(SendFdMessage(client->get(), "hello", {}).ok());
  auto msg = ReceiveFdMessage(server.get());
  REQUIRE(msg.ok());
  CHECK(msg->payload == "hello");
}

TEST_CASE("ListenSeqpacket replaces a stale socket", "[cpu]") {
  testing::TempDir dir;
  const std::string path = dir.file("stale.sock");
  {
    auto first = ListenSeqpacket(path);
    REQUIRE(first.ok());
  }  // closed, but the file stays behind
  // A second link keeps the stale inode alive, so its number cannot be reused by the new one.
  const std::string keep = dir.file("keep");
  REQUIRE(::link(path.c_str(), keep.c_str()) == 0);
  struct stat st = {};
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  const ino_t stale_ino = st.st_ino;

  auto second = ListenSeqpacket(path);
  REQUIRE(second.ok());
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK(st.st_ino != stale_ino);
  CHECK(ConnectSeqpacket(path).ok());
}

TEST_CASE("ListenSeqpacket refuses to replace a regular file", "[cpu]") {
  testing::TempDir dir;
  const std::string path = dir.file("not-a-socket");
  { std::ofstream(path) << "precious"; }
  auto listener = ListenSeqpacket(path);
  CHECK(listener.status().code() == absl::StatusCode::kFailedPrecondition);
  std::ifstream in(path);
  std::string contents;
  std::getline(in, contents);
  CHECK(contents == "precious");
}

TEST_CASE("socket paths that do not fit sun_path are INVALID_ARGUMENT", "[cpu]") {
  const std::string long_path = "/tmp/" + std::string(200, 'p') + ".sock";
  auto listener = ListenSeqpacket(long_path);
  CHECK(listener.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(listener.status().message()).find(long_path) != std::string::npos);
  CHECK(ConnectSeqpacket(long_path).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(ListenSeqpacket("").status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("connecting where nothing listens is UNAVAILABLE", "[cpu]") {
  testing::TempDir dir;
  CHECK(ConnectSeqpacket(dir.file("nobody.sock")).status().code() ==
        absl::StatusCode::kUnavailable);
  // A stale socket file with no listener behind it: ECONNREFUSED.
  { REQUIRE(ListenSeqpacket(dir.file("stale.sock")).ok()); }
  CHECK(ConnectSeqpacket(dir.file("stale.sock")).status().code() == absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace cachemgr
