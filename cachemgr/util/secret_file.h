// Secrets on disk and in memory: random tokens, comparison that does not leak through timing,
// and reading a secret file only when nobody but its owner can read or change it.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace cachemgr {

// `bytes` random bytes from the kernel's CSPRNG, as 2 * bytes lowercase hex characters.
std::string RandomHex(size_t bytes);

// 128 random bits from the kernel's CSPRNG, as 32 lowercase hex characters.
std::string RandomHexToken();

// Compares without an early exit, so a secret cannot be guessed byte by byte from timing (the
// length is not secret).
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

// OK when `path` is a regular file that group and others can neither read nor write (mode
// & 0066 == 0). FAILED_PRECONDITION naming `flag`, the file and its mode otherwise;
// INVALID_ARGUMENT when it cannot be examined.
absl::Status CheckPrivateFile(const std::string& path, const char* flag);

// CheckPrivateFile, then the file's contents with surrounding whitespace stripped.
absl::StatusOr<std::string> ReadPrivateFile(const std::string& path, const char* flag);

}  // namespace cachemgr
