// Helpers shared by the fuzz targets (fuzz/*_fuzzer.cc): the input as a file the parsers under
// test open by path, and a check that aborts so libFuzzer reports the input that broke it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr::fuzz {

// A file in memory (memfd), opened by path through /proc/self/fd: the loaders under test read
// the fuzzer's bytes as they read a file, and the fuzzer never touches the disk. Not thread-safe.
class MemoryFile {
 public:
  // Aborts when the memfd cannot be created (the fuzzer cannot run without it).
  explicit MemoryFile(const char* name);
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;

  // Replaces the contents with `bytes`; returns path().
  const std::string& Write(absl::string_view bytes);
  const std::string& Write(const uint8_t* data, size_t size) {
    return Write(absl::string_view(reinterpret_cast<const char*>(data), size));
  }
  // Reads the whole contents back (what a writer under test produced).
  std::string Read() const;
  const std::string& path() const { return path_; }

 private:
  UniqueFd fd_;
  std::string path_;
};

// Prints "fuzz check failed: <what>" and aborts (libFuzzer then saves the input as a crash).
[[noreturn]] void Fail(absl::string_view what);
inline void Check(bool ok, absl::string_view what) {
  if (!ok) Fail(what);
}

// Silences the daemon's structured log (every rejected input would print a line).
void QuietLogs();

// CACHEMGR_FUZZ_VERBOSE=1 in the environment: targets print what each call did (for
// reproducing a finding by hand).
bool Verbose();

}  // namespace cachemgr::fuzz
