#include "cachemgr/util/secret_file.h"

#include <errno.h>
#include <sys/random.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace cachemgr {

std::string RandomHex(size_t bytes) {
  std::vector<unsigned char> raw(bytes);
  size_t got = 0;
  while (got < raw.size()) {
    const ssize_t n = ::getrandom(raw.data() + got, raw.size() - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(raw.data()), raw.size()));
}

std::string RandomHexToken() { return RandomHex(16); }

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

absl::Status CheckPrivateFile(const std::string& path, const char* flag) {
  struct stat st = {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": cannot read ", path, ": ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is not a regular file"));
  }
  if ((st.st_mode & 0066) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: %s has mode %04o: group or others can read or change it; it holds a secret, so it "
        "must be readable by its owner only (chmod 600 %s)",
        flag, path, st.st_mode & 07777, path));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadPrivateFile(const std::string& path, const char* flag) {
  if (absl::Status s = CheckPrivateFile(path, flag); !s.ok()) return s;
  std::ifstream in(path);
  std::stringstream buf;
  buf << in.rdbuf();
  if (!in) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path));
  return std::string(absl::StripAsciiWhitespace(buf.str()));
}

}  // namespace cachemgr
