#include "tools/cachemgrctl/json_output.h"

#include <catch2/catch.hpp>
#include <cstdint>
#include <limits>
#include <string>

namespace cachemgr::ctl {
namespace {

TEST_CASE("documents print indented, keys in insertion order, with a trailing newline", "[cpu]") {
  const Json json = {{"zeta", 1},
                     {"alpha", {{"b", true}, {"a", "x"}}},
                     {"list", {1, 2}},
                     {"empty_object", Json::object()},
                     {"empty_list", Json::array()}};
  CHECK(DumpJson(json) ==
        "{\n"
        "  \"zeta\": 1,\n"
        "  \"alpha\": {\n"
        "    \"b\": true,\n"
        "    \"a\": \"x\"\n"
        "  },\n"
        "  \"list\": [\n"
        "    1,\n"
        "    2\n"
        "  ],\n"
        "  \"empty_object\": {},\n"
        "  \"empty_list\": []\n"
        "}\n");
}

TEST_CASE("numbers print as cachemgrctl always printed them", "[cpu]") {
  auto dump = [](const Json& value) { return value.dump(); };
  CHECK(dump(JsonDouble(10000.0)) == "10000");  // integral: no ".0"
  CHECK(dump(JsonDouble(-3.0)) == "-3");
  CHECK(dump(JsonDouble(0.05)) == "0.05");
  CHECK(dump(JsonDouble(0.7499999999999998)) == "0.7499999999999998");
  CHECK(dump(JsonDouble(9007199254740992.0)) == "9.007199254740992e+15");  // 2^53: a double
  CHECK(dump(JsonFloat(0.98f)) == "0.98");                                 // not 0.9800000190734863
  CHECK(dump(JsonFloat(0.95f)) == "0.95");
  CHECK(dump(JsonFloat(1.0f)) == "1");
  CHECK(dump(JsonDouble(std::numeric_limits<double>::quiet_NaN())) == "null");
  CHECK(dump(JsonDouble(-std::numeric_limits<double>::infinity())) == "null");
  CHECK(dump(JsonFloat(std::numeric_limits<float>::infinity())) == "null");
  CHECK(dump(Json(uint64_t{18446744073709551615ull})) == "18446744073709551615");
}

TEST_CASE("strings are escaped, and bytes that are not UTF-8 replaced", "[cpu]") {
  CHECK(DumpJson(Json("say \"hi\"\n\\\x01")) == "\"say \\\"hi\\\"\\n\\\\\\u0001\"\n");
  CHECK(DumpJson(Json("caf\xc3\xa9")) == "\"caf\xc3\xa9\"\n");  // UTF-8 kept as is
  CHECK(DumpJson(Json("bad\xff"
                      "end")) ==
        "\"bad\xef\xbf\xbd"
        "end\"\n");  // U+FFFD
}

}  // namespace
}  // namespace cachemgr::ctl
