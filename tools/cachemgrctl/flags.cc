#include "tools/cachemgrctl/flags.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace cachemgr::ctl {

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args,
                                   const std::vector<std::string>& known,
                                   const std::string& command) {
  Flags flags;
  flags.command_ = command;
  for (const std::string& arg : args) {
    if (!absl::StartsWith(arg, "--") || arg.size() == 2) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "' (", command,
                                                     " takes only --name=value flags)"));
    }
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    const std::string value = eq == std::string::npos ? "true" : arg.substr(eq + 1);
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, " for '", command, "' (see 'cachemgrctl help')"));
    }
    if (!flags.values_.emplace(name, value).second) {
      return absl::InvalidArgumentError(absl::StrCat("flag --", name, " is given twice"));
    }
  }
  return flags;
}

std::optional<std::string> Flags::Get(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::string> Flags::Required(const std::string& name) const {
  std::optional<std::string> value = Get(name);
  if (!value.has_value() || value->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("missing required flag --", name, " for '", command_, "'"));
  }
  return *value;
}

absl::Status Flags::GetDouble(const std::string& name, double* out) const {
  const std::optional<std::string> value = Get(name);
  if (!value.has_value()) return absl::OkStatus();
  double parsed = 0.0;
  if (!absl::SimpleAtod(*value, &parsed) || !std::isfinite(parsed)) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", name, ": expected a number, got '", *value, "'"));
  }
  *out = parsed;
  return absl::OkStatus();
}

absl::Status Flags::GetFloat(const std::string& name, float* out) const {
  double parsed = *out;
  if (absl::Status s = GetDouble(name, &parsed); !s.ok()) return s;
  *out = static_cast<float>(parsed);
  return absl::OkStatus();
}

absl::Status Flags::GetUint32(const std::string& name, uint32_t* out) const {
  const std::optional<std::string> value = Get(name);
  if (!value.has_value()) return absl::OkStatus();
  uint32_t parsed = 0;
  if (!absl::SimpleAtoi(*value, &parsed)) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", name, ": expected a non-negative integer, got '", *value, "'"));
  }
  *out = parsed;
  return absl::OkStatus();
}

absl::Status Flags::GetBool(const std::string& name, bool* out) const {
  return GetChoice<bool>(name, {{"true", true}, {"false", false}, {"1", true}, {"0", false}}, out);
}

absl::Status Flags::ChoiceError(const std::string& name, const std::string& value,
                                const std::vector<std::string>& names) const {
  return absl::InvalidArgumentError(
      absl::StrCat("flag --", name, ": '", value, "' is not one of ", absl::StrJoin(names, "|")));
}

}  // namespace cachemgr::ctl
