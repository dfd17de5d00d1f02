#include "cachemgr/util/quote.h"

#include <catch2/catch.hpp>
#include <string>

namespace cachemgr {
namespace {

TEST_CASE("short text is quoted whole, escaped", "[cpu]") {
  CHECK(QuoteForMessage("seq-1") == "\"seq-1\"");
  CHECK(QuoteForMessage("") == "\"\"");
  CHECK(QuoteForMessage(std::string("a\"b\n\x01", 5)) == "\"a\\\"b\\n\\x01\"");
}

TEST_CASE("long text is cut at 64 bytes and its length given", "[cpu]") {
  const std::string huge(4 << 20, 'x');
  const std::string q = QuoteForMessage(huge);
  CHECK(q == "\"" + std::string(64, 'x') + "...\" (4194304 bytes)");
  // Escapes never grow past a few bytes per input byte.
  const std::string nasty(1000, '\x7f');
  CHECK(QuoteForMessage(nasty).size() < 64 * 4 + 32);
}

}  // namespace
}  // namespace cachemgr
