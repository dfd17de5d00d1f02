#include "fuzz/fuzz_util.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/log.h"

namespace cachemgr::fuzz {

MemoryFile::MemoryFile(const char* name) : fd_(memfd_create(name, MFD_CLOEXEC)) {
  if (!fd_.valid()) Fail(absl::StrCat("memfd_create(", name, ") failed"));
  path_ = absl::StrCat("/proc/self/fd/", fd_.get());
}

const std::string& MemoryFile::Write(absl::string_view bytes) {
  if (ftruncate(fd_.get(), 0) != 0) Fail("ftruncate of the memory file failed");
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n =
        pwrite(fd_.get(), bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n <= 0) Fail("pwrite to the memory file failed");
    done += static_cast<size_t>(n);
  }
  return path_;
}

std::string MemoryFile::Read() const {
  std::string out;
  char buf[4096];
  off_t at = 0;
  while (true) {
    const ssize_t n = pread(fd_.get(), buf, sizeof(buf), at);
    if (n < 0) Fail("pread of the memory file failed");
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
    at += n;
  }
}

void Fail(absl::string_view what) {
  std::fprintf(stderr, "fuzz check failed: %.*s\n", static_cast<int>(what.size()), what.data());
  std::fflush(stderr);
  std::abort();
}

void QuietLogs() { SetMinLogLevel(LogLevel::kError); }

bool Verbose() {
  static const bool verbose = std::getenv("CACHEMGR_FUZZ_VERBOSE") != nullptr;
  return verbose;
}

}  // namespace cachemgr::fuzz
