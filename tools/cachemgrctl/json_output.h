// cachemgrctl's own JSON documents (stats.json, health --json, free --json; the other --json
// output is protobuf's JSON mapping): nlohmann::ordered_json, so keys print in the order they
// were added, printed by DumpJson.
#pragma once

#include <string>

#include "nlohmann/json.hpp"

namespace cachemgr::ctl {

using Json = nlohmann::ordered_json;

// A double as a JSON number: an integral value of magnitude below 2^53 as an integer (10000.0
// prints as 10000, as cachemgrctl always printed it), anything else with the fewest digits
// that read back to the same double. NaN and infinities print as null.
Json JsonDouble(double value);
// A float with the fewest digits that read back to the same float (0.98f prints as 0.98, not
// 0.9800000190734863); integral values as integers, NaN and infinities as null.
Json JsonFloat(float value);

// The document, indented by two spaces per level, with a trailing newline. Bytes in strings
// that are not UTF-8 (a path, a sequence id) are replaced by U+FFFD, so the output is JSON.
std::string DumpJson(const Json& json);

}  // namespace cachemgr::ctl
