#include "cachemgr/util/log.h"

#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <limits>
#include <regex>
#include <string>
#include <vector>

namespace cachemgr {
namespace {

// The fixed prefix every line starts with: timestamp with microseconds, UTC.
const std::regex kPrefix(
    R"re(^\{"ts":"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z","level":"([a-z]+)","msg":)re");

std::string AfterPrefix(const std::string& line) {
  std::smatch m;
  REQUIRE(std::regex_search(line, m, kPrefix));
  return line.substr(m[0].length());
}

TEST_CASE("log line has timestamp, level and message", "[cpu]") {
  const std::string line = FormatLogLine(LogLevel::kInfo, "client attached", {});
  std::smatch m;
  REQUIRE(std::regex_search(line, m, kPrefix));
  CHECK(m[1] == "info");
  CHECK(AfterPrefix(line) == R"("client attached"})");
  CHECK(line.find('\n') == std::string::npos);
}

TEST_CASE("level names", "[cpu]") {
  auto level_of = [](LogLevel level) {
    std::smatch m;
    const std::string line = FormatLogLine(level, "m", {});
    REQUIRE(std::regex_search(line, m, kPrefix));
    return m[1].str();
  };
  CHECK(level_of(LogLevel::kDebug) == "debug");
  CHECK(level_of(LogLevel::kInfo) == "info");
  CHECK(level_of(LogLevel::kWarning) == "warning");
  CHECK(level_of(LogLevel::kError) == "error");
}

TEST_CASE("strings are JSON-escaped, numbers are not quoted", "[cpu]") {
  const std::string line = FormatLogLine(LogLevel::kWarning, "say \"hi\"\n\\ok\x01\x1f\t",
                                         {{"client_id", "c-3"},
                                          {"weird \"key\"", std::string("a\rb\x7f")},
                                          {"blocks", int64_t{-42}},
                                          {"bytes", uint64_t{18446744073709551615ull}},
                                          {"n", 7},
                                          {"ratio", 0.5},
                                          {"utf8", "h\xc3\xa9"}});
  CHECK(AfterPrefix(line) ==
        R"("say \"hi\"\n\\ok\u0001\u001f\t","client_id":"c-3","weird \"key\"":"a\rb\u007f",)"
        R"("blocks":-42,"bytes":18446744073709551615,"n":7,"ratio":0.500000,"utf8":"h)"
        "\xc3\xa9"
        R"("})");
  // No raw control characters survive.
  for (char c : line) CHECK(static_cast<unsigned char>(c) >= 0x20);
}

TEST_CASE("bytes that are not well-formed UTF-8 become U+FFFD, so the line stays JSON", "[cpu]") {
  struct Case {
    std::string in, out;
  };
  for (const Case& c : std::vector<Case>{
           {"a\xff"
            "b",
            "a\\ufffdb"},                                                     // never a UTF-8 byte
           {"\xc3", "\\ufffd"},                                               // truncated sequence
           {"\xc0\xaf", "\\ufffd\\ufffd"},                                    // overlong '/'
           {"\xed\xa0\x80", "\\ufffd\\ufffd\\ufffd"},                         // a surrogate
           {"\xf4\x90\x80\x80", "\\ufffd\\ufffd\\ufffd\\ufffd"},              // above U+10FFFF
           {"\xe2\x82\xac\xf0\x9f\x98\x80", "\xe2\x82\xac\xf0\x9f\x98\x80"},  // euro, emoji
       }) {
    CAPTURE(c.in);
    const std::string line = FormatLogLine(LogLevel::kInfo, c.in, {{"k", c.in}});
    CHECK(AfterPrefix(line) == "\"" + c.out + "\",\"k\":\"" + c.out + "\"}");
  }
}

TEST_CASE("non-finite numbers become strings so the line stays JSON", "[cpu]") {
  const std::string line = FormatLogLine(LogLevel::kError, "m",
                                         {{"nan", std::numeric_limits<double>::quiet_NaN()},
                                          {"inf", std::numeric_limits<double>::infinity()}});
  CHECK(AfterPrefix(line).find(R"("nan":"nan")") != std::string::npos);
  CHECK(AfterPrefix(line).find(R"("inf":"inf")") != std::string::npos);
}

TEST_CASE("ParseLogLevel", "[cpu]") {
  LogLevel level = LogLevel::kError;
  CHECK(ParseLogLevel("debug", &level));
  CHECK(level == LogLevel::kDebug);
  CHECK(ParseLogLevel("info", &level));
  CHECK(level == LogLevel::kInfo);
  CHECK(ParseLogLevel("warning", &level));
  CHECK(level == LogLevel::kWarning);
  CHECK(ParseLogLevel("WARN", &level));
  CHECK(level == LogLevel::kWarning);
  CHECK(ParseLogLevel("Error", &level));
  CHECK(level == LogLevel::kError);
  CHECK_FALSE(ParseLogLevel("verbose", &level));
  CHECK_FALSE(ParseLogLevel("", &level));
  CHECK(level == LogLevel::kError);  // untouched on failure
}

// Runs `fn` with stderr redirected into a pipe and returns what it wrote.
template <typename Fn>
std::string CaptureStderr(Fn fn) {
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  const int saved = ::dup(STDERR_FILENO);
  REQUIRE(saved >= 0);
  REQUIRE(::dup2(p[1], STDERR_FILENO) == STDERR_FILENO);
  ::close(p[1]);
  fn();
  REQUIRE(::dup2(saved, STDERR_FILENO) == STDERR_FILENO);
  ::close(saved);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(p[0], buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(p[0]);
  return out;
}

TEST_CASE("Log writes whole lines to stderr and honours the min level", "[cpu]") {
  const LogLevel saved = MinLogLevel();
  CHECK(saved == LogLevel::kInfo);  // the default

  const std::string out = CaptureStderr([] {
    Log(LogLevel::kDebug, "hidden debug");
    Log(LogLevel::kInfo, "shown", {{"k", 1}});
    SetMinLogLevel(LogLevel::kError);
    Log(LogLevel::kWarning, "hidden warning");
    Log(LogLevel::kError, "shown error");
  });
  SetMinLogLevel(saved);
  CHECK(MinLogLevel() == LogLevel::kInfo);

  CHECK(out.find("hidden") == std::string::npos);
  const size_t first_nl = out.find('\n');
  REQUIRE(first_nl != std::string::npos);
  const std::string first = out.substr(0, first_nl);
  const std::string second = out.substr(first_nl + 1);
  CHECK(AfterPrefix(first) == R"("shown","k":1})");
  REQUIRE(!second.empty());
  CHECK(second.back() == '\n');
  CHECK(AfterPrefix(second.substr(0, second.size() - 1)) == R"("shown error"})");
}

TEST_CASE("ThrottledLog writes at most one line per interval, counting the rest", "[cpu]") {
  ThrottledLog throttled(LogLevel::kWarning, "peer flood", absl::Seconds(1));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  std::vector<bool> wrote;
  const std::string out = CaptureStderr([&] {
    wrote.push_back(throttled.Record(t0, {"peer", "a"}));                           // first: writes
    wrote.push_back(throttled.Record(t0 + absl::Milliseconds(10), {"peer", "b"}));  // suppressed
    wrote.push_back(throttled.Record(t0 + absl::Milliseconds(999), {"peer", "c"}));  // suppressed
    wrote.push_back(throttled.Record(t0 + absl::Seconds(1), {"peer", "d"}));  // due: 3 since last
    wrote.push_back(throttled.Record(t0 + absl::Seconds(5)));                 // due: just itself
  });
  CHECK(wrote == std::vector<bool>{true, false, false, true, true});
  std::vector<std::string> lines;
  for (size_t start = 0, nl; (nl = out.find('\n', start)) != std::string::npos; start = nl + 1) {
    lines.push_back(AfterPrefix(out.substr(start, nl - start)));
  }
  CHECK(lines == std::vector<std::string>{R"("peer flood","occurrences":1,"peer":"a"})",
                                          R"("peer flood","occurrences":3,"peer":"d"})",
                                          R"("peer flood","occurrences":1})"});
}

}  // namespace
}  // namespace cachemgr
