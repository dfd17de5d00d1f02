#include "tests/support/temp_dir.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace cachemgr::testing {
namespace {

constexpr char kTemplate[] = "/tmp/cachemgr-test-XXXXXX";

}  // namespace

absl::StatusOr<TempDir> TempDir::Create() {
  std::string path = kTemplate;
  if (::mkdtemp(path.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp(", kTemplate, "): ", std::strerror(errno)));
  }
  return TempDir(std::move(path));
}

TempDir::TempDir() {
  absl::StatusOr<TempDir> dir = Create();
  if (!dir.ok()) {
    std::fprintf(stderr, "TempDir: %s\n", dir.status().ToString().c_str());
    std::abort();
  }
  path_ = std::exchange(dir->path_, std::string());
}

TempDir::TempDir(TempDir&& other) noexcept : path_(std::exchange(other.path_, std::string())) {}

TempDir& TempDir::operator=(TempDir&& other) noexcept {
  if (this != &other) {
    Remove();
    path_ = std::exchange(other.path_, std::string());
  }
  return *this;
}

TempDir::~TempDir() { Remove(); }

std::string TempDir::file(std::string_view name) const {
  std::string out = path_;
  out += "/";
  out += name;
  return out;
}

void TempDir::Remove() {
  if (path_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
  path_.clear();
}

}  // namespace cachemgr::testing
