// The operator credential. Operator calls (Free, Compress, GetSequence and ListSequences of any
// client's sequences, the full Stats, Watch) need proof of operator rights, not merely a
// connection: the daemon makes a fresh token (128 random bits) at every start and writes it to
// a file that only the daemon's user (and root), or members of --operator_group, can read. A
// call carries it as `x-cachemgr-operator: <token>` metadata.
#pragma once

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace cachemgr {

// The metadata key of the operator credential (gRPC keys are lowercase).
inline constexpr char kOperatorMetadataKey[] = "x-cachemgr-operator";

// Where the daemon writes the token when --operator_token_file is not given, and where clients
// look for it by default.
inline std::string DefaultOperatorTokenPath(const std::string& socket_path) {
  return socket_path + ".operator";
}

class OperatorToken {
 public:
  // Writes a fresh token to `path` (replacing what a previous daemon left there) with mode 0600,
  // or 0640 owned by `group` when set. The file appears complete (written under a temporary
  // name, then renamed). INTERNAL / PERMISSION_DENIED naming the path on failure.
  static absl::StatusOr<std::unique_ptr<OperatorToken>> Create(const std::string& path,
                                                               std::optional<gid_t> group);
  // Removes the file if it is still the one this object wrote.
  ~OperatorToken();
  OperatorToken(const OperatorToken&) = delete;
  OperatorToken& operator=(const OperatorToken&) = delete;

  // Whether `presented` is the token (constant time). Thread-safe.
  bool Matches(absl::string_view presented) const;
  const std::string& path() const { return path_; }

 private:
  OperatorToken(std::string path, std::string token, dev_t dev, ino_t ino);

  const std::string path_;
  const std::string token_;
  const dev_t dev_;
  const ino_t ino_;
};

}  // namespace cachemgr
