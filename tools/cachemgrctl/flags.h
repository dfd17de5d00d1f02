// Command-line flags of one cachemgrctl subcommand: `--name=value` (or a bare `--name`, which
// means `--name=true`), each name at most once, every name from the subcommand's known set.
//
// Parse and getter errors are usage errors: their messages name the flag, and the caller exits
// with status 2. Getters leave `*out` unchanged when the flag is absent, so defaults are simply
// the values callers initialise.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cachemgr::ctl {

class Flags {
 public:
  // `args` are the arguments after the subcommand. INVALID_ARGUMENT for a positional argument,
  // a flag not in `known`, or a repeated flag.
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args,
                                     const std::vector<std::string>& known,
                                     const std::string& command);

  bool Has(const std::string& name) const { return values_.count(name) != 0; }
  std::optional<std::string> Get(const std::string& name) const;
  absl::StatusOr<std::string> Required(const std::string& name) const;

  absl::Status GetDouble(const std::string& name, double* out) const;
  absl::Status GetFloat(const std::string& name, float* out) const;
  absl::Status GetUint32(const std::string& name, uint32_t* out) const;
  absl::Status GetBool(const std::string& name, bool* out) const;  // true/false/1/0
  // One of `choices` (flag value -> enum value); the error lists them.
  template <typename T>
  absl::Status GetChoice(const std::string& name,
                         const std::vector<std::pair<std::string, T>>& choices, T* out) const;

 private:
  absl::Status ChoiceError(const std::string& name, const std::string& value,
                           const std::vector<std::string>& names) const;

  std::string command_;
  std::map<std::string, std::string> values_;
};

template <typename T>
absl::Status Flags::GetChoice(const std::string& name,
                              const std::vector<std::pair<std::string, T>>& choices, T* out) const {
  const std::optional<std::string> value = Get(name);
  if (!value.has_value()) return absl::OkStatus();
  std::vector<std::string> names;
  for (const auto& [choice, result] : choices) {
    if (choice == *value) {
      *out = result;
      return absl::OkStatus();
    }
    names.push_back(choice);
  }
  return ChoiceError(name, *value, names);
}

}  // namespace cachemgr::ctl
