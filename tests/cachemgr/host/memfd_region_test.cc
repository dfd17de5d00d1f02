#include "cachemgr/host/memfd_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

namespace cachemgr {
namespace {

constexpr size_t kBytes = 3 * 4096 + 100;  // not page-aligned on purpose

UniqueFd Dup(int fd) {
  UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  REQUIRE(copy.valid());
  return copy;
}

TEST_CASE("Create gives a zero-filled, writable region of the requested size", "[cpu]") {
  auto region = MemfdRegion::Create("cachemgr-test-pool", kBytes);
  REQUIRE(region.ok());
  REQUIRE(region->data() != nullptr);
  CHECK(region->size() == kBytes);
  CHECK(region->fd() >= 0);
  CHECK(std::all_of(region->data(), region->data() + kBytes,
                    [](std::byte b) { return b == std::byte{0}; }));
  std::memset(region->data(), 0xab, kBytes);  // every byte is writable
  CHECK(region->data()[kBytes - 1] == std::byte{0xab});

  struct stat st = {};
  REQUIRE(::fstat(region->fd(), &st) == 0);
  CHECK(static_cast<size_t>(st.st_size) == kBytes);
  CHECK((::fcntl(region->fd(), F_GETFD) & FD_CLOEXEC) != 0);
  // The name shows in /proc/self/fd.
  char link[256] = {};
  const std::string proc = "/proc/self/fd/" + std::to_string(region->fd());
  REQUIRE(::readlink(proc.c_str(), link, sizeof(link) - 1) > 0);
  CHECK(std::string(link).find("cachemgr-test-pool") != std::string::npos);
}

TEST_CASE("Create commits the memory and maps it populated; Map populates too", "[cpu]") {
  constexpr size_t kPages = 256;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  auto region = MemfdRegion::Create("committed", kPages * page);
  REQUIRE(region.ok());
  // The file's pages exist (fallocate), before anyone touched them...
  struct stat st = {};
  REQUIRE(::fstat(region->fd(), &st) == 0);
  CHECK(static_cast<uint64_t>(st.st_blocks) * 512 >= kPages * page);
  // ...and both mappings have every page resident without a fault (MAP_POPULATE).
  auto other = MemfdRegion::Map(Dup(region->fd()), kPages * page);
  REQUIRE(other.ok());
  for (const MemfdRegion* r : {&*region, &*other}) {
    std::vector<unsigned char> resident(kPages);
    REQUIRE(::mincore(r->data(), kPages * page, resident.data()) == 0);
    CHECK(std::all_of(resident.begin(), resident.end(), [](unsigned char v) { return v & 1; }));
  }
}

TEST_CASE("Create refuses more than the memory available instead of taking it all", "[cpu]") {
  // shmem's fallocate would allocate until the OOM killer stepped in.
  auto huge = MemfdRegion::Create("huge", size_t{1} << 50);
  REQUIRE(huge.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(huge.status().message()), Catch::Contains("MemAvailable"));
}

TEST_CASE("Create rejects zero bytes", "[cpu]") {
  CHECK(MemfdRegion::Create("x", 0).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Map of the same memfd sees writes both ways", "[cpu]") {
  auto owner = MemfdRegion::Create("shared", kBytes);
  REQUIRE(owner.ok());
  auto mapped = MemfdRegion::Map(Dup(owner->fd()), kBytes);
  REQUIRE(mapped.ok());
  CHECK(mapped->size() == kBytes);
  CHECK(mapped->data() != owner->data());  // a second mapping, not an alias

  std::memcpy(owner->data() + 10, "from owner", 10);
  CHECK(std::memcmp(mapped->data() + 10, "from owner", 10) == 0);
  std::memcpy(mapped->data() + kBytes - 11, "from mapped", 11);
  CHECK(std::memcmp(owner->data() + kBytes - 11, "from mapped", 11) == 0);

  // A smaller mapping of a larger region is allowed.
  auto prefix = MemfdRegion::Map(Dup(owner->fd()), 4096);
  REQUIRE(prefix.ok());
  CHECK(std::memcmp(prefix->data() + 10, "from owner", 10) == 0);
}

TEST_CASE("Map validates size and descriptor", "[cpu]") {
  auto owner = MemfdRegion::Create("small", 4096);
  REQUIRE(owner.ok());
  CHECK(MemfdRegion::Map(Dup(owner->fd()), 4097).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(MemfdRegion::Map(Dup(owner->fd()), 0).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(MemfdRegion::Map(UniqueFd(), 4096).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("the region is sealed against shrinking and growing", "[cpu]") {
  auto region = MemfdRegion::Create("sealed", kBytes);
  REQUIRE(region.ok());
  const int seals = ::fcntl(region->fd(), F_GET_SEALS);
  REQUIRE(seals >= 0);
  CHECK((seals & F_SEAL_SHRINK) != 0);
  CHECK((seals & F_SEAL_SEAL) != 0);

  // A client holding the fd cannot truncate it under the daemon ...
  UniqueFd client = Dup(region->fd());
  const int rc = ::ftruncate(client.get(), 0);
  const int err = errno;
  CHECK(rc != 0);
  CHECK(err == EPERM);
  CHECK(::ftruncate(client.get(), kBytes * 2) != 0);
  // ... nor add seals that would lock out other clients' writable mappings.
  CHECK(::fcntl(client.get(), F_ADD_SEALS, F_SEAL_WRITE) != 0);

  struct stat st = {};
  REQUIRE(::fstat(region->fd(), &st) == 0);
  CHECK(static_cast<size_t>(st.st_size) == kBytes);
  region->data()[kBytes - 1] = std::byte{1};  // still mapped and usable
}

TEST_CASE("moves transfer ownership and leave the source empty", "[cpu]") {
  auto created = MemfdRegion::Create("move", 4096);
  REQUIRE(created.ok());
  MemfdRegion a = std::move(*created);
  std::byte* const data = a.data();
  const int fd = a.fd();
  a.data()[0] = std::byte{7};

  MemfdRegion b(std::move(a));
  CHECK(a.data() == nullptr);
  CHECK(a.size() == 0);
  CHECK(a.fd() == -1);
  CHECK(b.data() == data);
  CHECK(b.fd() == fd);
  CHECK(b.data()[0] == std::byte{7});

  auto other = MemfdRegion::Create("other", 8192);
  REQUIRE(other.ok());
  const int other_fd = other->fd();
  b = std::move(*other);  // releases b's old region
  CHECK(other->data() == nullptr);
  CHECK(other->fd() == -1);
  CHECK(b.size() == 8192);
  CHECK(b.fd() == other_fd);
  CHECK(::fcntl(fd, F_GETFD) == -1);  // the old memfd was closed

  MemfdRegion empty;
  CHECK(empty.data() == nullptr);
  CHECK(empty.fd() == -1);
}

TEST_CASE("a forked child's writes are visible to the parent", "[cpu]") {
  auto region = MemfdRegion::Create("fork", kBytes);
  REQUIRE(region.ok());
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Child: map the region anew from the inherited fd (as a client would) and write.
    auto child_map = MemfdRegion::Map(UniqueFd(::dup(region->fd())), kBytes);
    if (!child_map.ok()) ::_exit(2);
    std::memcpy(child_map->data() + 1234, "child wrote this", 16);
    region->data()[kBytes - 1] = std::byte{0x5a};  // and via the inherited mapping
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  CHECK(std::memcmp(region->data() + 1234, "child wrote this", 16) == 0);
  CHECK(region->data()[kBytes - 1] == std::byte{0x5a});
}

}  // namespace
}  // namespace cachemgr
