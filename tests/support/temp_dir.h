// TempDir: a fresh directory under /tmp ("cachemgr-test-XXXXXX") that is removed, with
// everything inside it, when the object goes away. Test-only helper.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace cachemgr::testing {

class TempDir {
 public:
  // Creates the directory; aborts the process if mkdtemp fails (a test cannot go on without it).
  TempDir();
  // Creates the directory; INTERNAL (with errno text) if mkdtemp fails.
  static absl::StatusOr<TempDir> Create();

  TempDir(TempDir&& other) noexcept;
  TempDir& operator=(TempDir&& other) noexcept;
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  // Removes the directory recursively (best effort).
  ~TempDir();

  // Absolute path of the directory, without a trailing slash. Empty after a move.
  const std::string& path() const { return path_; }
  // `path() + "/" + name`.
  std::string file(std::string_view name) const;

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  void Remove();

  std::string path_;
};

}  // namespace cachemgr::testing
