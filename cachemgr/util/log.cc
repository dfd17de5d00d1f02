#include "cachemgr/util/log.h"

#include <errno.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace cachemgr {
namespace {

std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "unknown";
}

// Length of the well-formed UTF-8 sequence at the start of `text` (RFC 3629: no overlong forms,
// no surrogates, nothing above U+10FFFF), or 0 when it is not one.
size_t Utf8SequenceLength(std::string_view text) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(0);
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // the allowed range of the second byte
  if (lead >= 0xc2 && lead <= 0xdf) {
    n = 2;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    n = 3;
    if (lead == 0xe0) lo = 0xa0;
    if (lead == 0xed) hi = 0x9f;
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    n = 4;
    if (lead == 0xf0) lo = 0x90;
    if (lead == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (text.size() < n || byte(1) < lo || byte(1) > hi) return 0;
  for (size_t i = 2; i < n; ++i) {
    if (byte(i) < 0x80 || byte(i) > 0xbf) return 0;
  }
  return n;
}

void AppendJsonString(std::string* out, std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x80) {
      // UTF-8 stays readable; a byte that is not part of well-formed UTF-8 (a client-supplied
      // string, a peer's garbage) becomes U+FFFD, so every line stays valid JSON.
      if (const size_t n = Utf8SequenceLength(text.substr(i)); n > 0) {
        out->append(text.substr(i, n));
        i += n - 1;
      } else {
        out->append("\\ufffd");
      }
      continue;
    }
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        // Other control characters (and DEL, which terminals misrender) as \u00XX.
        if (u < 0x20 || u == 0x7f) {
          out->append("\\u00");
          out->push_back(kHex[u >> 4]);
          out->push_back(kHex[u & 0xf]);
        } else {
          out->push_back(c);
        }
    }
  }
  out->push_back('"');
}

// std::to_string(double) yields "nan"/"inf" for non-finite values, which are not JSON numbers.
bool IsJsonNumber(std::string_view v) {
  size_t i = 0;
  if (i < v.size() && v[i] == '-') ++i;
  if (i >= v.size() || !std::isdigit(static_cast<unsigned char>(v[i]))) return false;
  for (; i < v.size(); ++i) {
    const char c = v[i];
    if (!std::isdigit(static_cast<unsigned char>(c)) && c != '.' && c != 'e' && c != 'E' &&
        c != '+' && c != '-') {
      return false;
    }
  }
  return true;
}

}  // namespace

void SetMinLogLevel(LogLevel level) {
  g_min_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

LogLevel MinLogLevel() {
  return static_cast<LogLevel>(g_min_level.load(std::memory_order_relaxed));
}

std::string FormatLogLine(LogLevel level, std::string_view msg,
                          std::initializer_list<LogField> fields) {
  std::string line;
  line.reserve(96 + msg.size());
  line.append("{\"ts\":\"");
  line.append(absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone()));
  line.append("\",\"level\":\"");
  line.append(LevelName(level));
  line.append("\",\"msg\":");
  AppendJsonString(&line, msg);
  for (const LogField& field : fields) {
    line.push_back(',');
    AppendJsonString(&line, field.key);
    line.push_back(':');
    if (field.quoted || !IsJsonNumber(field.value)) {
      AppendJsonString(&line, field.value);
    } else {
      line.append(field.value);
    }
  }
  line.push_back('}');
  return line;
}

void Log(LogLevel level, std::string_view msg, std::initializer_list<LogField> fields) {
  if (static_cast<int>(level) < g_min_level.load(std::memory_order_relaxed)) return;
  std::string line = FormatLogLine(level, msg, fields);
  line.push_back('\n');
  // One write(2) per line keeps concurrent lines whole; the loop only matters for the rare
  // short write (e.g. a signal mid-write on a pipe), where finishing the line beats dropping it.
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    const ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // Nowhere to report a failing stderr.
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

bool ParseLogLevel(std::string_view text, LogLevel* level) {
  const std::string lower = absl::AsciiStrToLower(absl::string_view(text.data(), text.size()));
  if (lower == "debug") {
    *level = LogLevel::kDebug;
  } else if (lower == "info") {
    *level = LogLevel::kInfo;
  } else if (lower == "warning" || lower == "warn") {
    *level = LogLevel::kWarning;
  } else if (lower == "error") {
    *level = LogLevel::kError;
  } else {
    return false;
  }
  return true;
}

ThrottledLog::ThrottledLog(LogLevel level, std::string msg, absl::Duration interval)
    : level_(level), msg_(std::move(msg)), interval_(interval) {}

bool ThrottledLog::Due(absl::Time now) {
  ++unlogged_;
  if (now - last_line_ < interval_) return false;
  last_line_ = now;
  return true;
}

bool ThrottledLog::Record(absl::Time now) {
  if (!Due(now)) return false;
  Log(level_, msg_, {{"occurrences", std::exchange(unlogged_, 0)}});
  return true;
}

bool ThrottledLog::Record(absl::Time now, const LogField& detail) {
  if (!Due(now)) return false;
  Log(level_, msg_, {{"occurrences", std::exchange(unlogged_, 0)}, detail});
  return true;
}

}  // namespace cachemgr
