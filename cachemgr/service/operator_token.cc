#include "cachemgr/service/operator_token.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/secret_file.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {
namespace {

absl::Status ErrnoStatus(int err, absl::string_view what, const std::string& path) {
  const auto code = err == EACCES || err == EPERM ? absl::StatusCode::kPermissionDenied
                                                  : absl::StatusCode::kInternal;
  return absl::Status(
      code, absl::StrCat("--operator_token_file: ", what, " ", path, ": ", std::strerror(err)));
}

}  // namespace

OperatorToken::OperatorToken(std::string path, std::string token, dev_t dev, ino_t ino)
    : path_(std::move(path)), token_(std::move(token)), dev_(dev), ino_(ino) {}

absl::StatusOr<std::unique_ptr<OperatorToken>> OperatorToken::Create(const std::string& path,
                                                                     std::optional<gid_t> group) {
  const std::string token = RandomHexToken();
  const std::string temp = absl::StrCat(path, ".tmp.", ::getpid());
  ::unlink(temp.c_str());  // a leftover of a crashed daemon with our pid
  // O_EXCL|O_NOFOLLOW: never write through a link someone planted at the temporary name.
  UniqueFd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!fd.valid()) return ErrnoStatus(errno, "cannot create", temp);
  auto fail = [&](int err, absl::string_view what) {
    ::unlink(temp.c_str());
    return ErrnoStatus(err, what, temp);
  };
  if (group.has_value()) {
    if (::fchown(fd.get(), -1, *group) != 0) return fail(errno, "cannot chown");
    if (::fchmod(fd.get(), 0640) != 0) return fail(errno, "cannot chmod");
  }
  const std::string contents = token + "\n";
  if (::write(fd.get(), contents.data(), contents.size()) !=
      static_cast<ssize_t>(contents.size())) {
    return fail(errno, "cannot write");
  }
  struct stat st = {};
  if (::fstat(fd.get(), &st) != 0) return fail(errno, "cannot stat");
  if (::rename(temp.c_str(), path.c_str()) != 0) return fail(errno, "cannot rename to " + path);
  return std::unique_ptr<OperatorToken>(new OperatorToken(path, token, st.st_dev, st.st_ino));
}

OperatorToken::~OperatorToken() {
  struct stat st = {};
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) {
    ::unlink(path_.c_str());
  }
}

bool OperatorToken::Matches(absl::string_view presented) const {
  return ConstantTimeEquals(presented, token_);
}

}  // namespace cachemgr
