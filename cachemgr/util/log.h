// Structured logs: one JSON object per line on stderr, e.g.
//   {"ts":"2026-11-24T18:55:32.123456Z","level":"info","msg":"client attached","client_id":"c-3"}
// Thread-safe; a line is written with one write(2) so concurrent lines never interleave.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "absl/time/time.h"

namespace cachemgr {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// One key/value of a log line. Values are rendered as JSON strings or numbers.
struct LogField {
  LogField(std::string_view k, std::string_view v) : key(k), value(v), quoted(true) {}
  LogField(std::string_view k, const char* v) : key(k), value(v), quoted(true) {}
  LogField(std::string_view k, const std::string& v) : key(k), value(v), quoted(true) {}
  LogField(std::string_view k, int64_t v) : key(k), value(std::to_string(v)), quoted(false) {}
  LogField(std::string_view k, uint64_t v) : key(k), value(std::to_string(v)), quoted(false) {}
  LogField(std::string_view k, int v) : key(k), value(std::to_string(v)), quoted(false) {}
  LogField(std::string_view k, unsigned v) : key(k), value(std::to_string(v)), quoted(false) {}
  LogField(std::string_view k, double v) : key(k), value(std::to_string(v)), quoted(false) {}
  std::string key;
  std::string value;
  bool quoted;
};

// Lines below this level are dropped. Default kInfo.
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();

// Writes one line to stderr. Keys and values are JSON-escaped; a numeric field whose value is
// not a JSON number (NaN, infinity) is written as a string.
void Log(LogLevel level, std::string_view msg, std::initializer_list<LogField> fields = {});

// Renders the line Log would write (without the newline); exposed for tests.
std::string FormatLogLine(LogLevel level, std::string_view msg,
                          std::initializer_list<LogField> fields);

// Parses "debug" / "info" / "warning" (or "warn") / "error", case-insensitively. Returns false
// (leaving *level untouched) for anything else.
bool ParseLogLevel(std::string_view text, LogLevel* level);

// A recurring message logged at most once per `interval`, so a flood (a hostile peer, an
// exhausted resource) cannot flood the log: Record() counts an occurrence and writes a line
// only when the previous line is at least `interval` old (the first occurrence always writes).
// The line carries "occurrences" (how many Record() calls it stands for: this one and those
// suppressed since the previous line) and the `detail` field of this call. Not thread-safe.
class ThrottledLog {
 public:
  ThrottledLog(LogLevel level, std::string msg, absl::Duration interval = absl::Seconds(1));

  // True when this call wrote a line.
  bool Record(absl::Time now);
  bool Record(absl::Time now, const LogField& detail);

 private:
  const LogLevel level_;
  const std::string msg_;
  const absl::Duration interval_;
  bool Due(absl::Time now);

  absl::Time last_line_ = absl::InfinitePast();
  uint64_t unlogged_ = 0;  // occurrences since the last line
};

}  // namespace cachemgr
