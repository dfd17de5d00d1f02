#include "tools/cachemgrctl/json_output.h"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace cachemgr::ctl {

Json JsonDouble(double value) {
  constexpr double kExactIntegers = 9007199254740992.0;  // 2^53
  if (std::isfinite(value) && std::trunc(value) == value && std::fabs(value) < kExactIntegers) {
    return static_cast<int64_t>(value);
  }
  return value;
}

Json JsonFloat(float value) {
  if (!std::isfinite(value)) return static_cast<double>(value);
  // The float's shortest decimal form, read back as the double closest to it.
  char text[32];
  const std::to_chars_result printed = std::to_chars(text, text + sizeof(text) - 1, value);
  *printed.ptr = '\0';
  return JsonDouble(std::strtod(text, nullptr));
}

std::string DumpJson(const Json& json) {
  return json.dump(2, ' ', /*ensure_ascii=*/false, Json::error_handler_t::replace) + "\n";
}

}  // namespace cachemgr::ctl
