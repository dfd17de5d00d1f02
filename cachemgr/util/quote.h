// QuoteForMessage: client-supplied text as it may appear in an error message. A status message
// travels in a gRPC trailer (a few KiB at most) and into logs, so it quotes at most
// kMaxQuotedBytes of what a client sent, escaped: a 4 MB model name still gets a short,
// printable INVALID_ARGUMENT instead of a trailer-size failure. Thread-safe, no state.
#pragma once

#include <cstddef>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace cachemgr {

inline constexpr size_t kMaxQuotedBytes = 64;

// `"text"` with C escapes (\n, \", \x01, ...); text longer than kMaxQuotedBytes is cut there and
// marked: `"first 64 bytes..." (4194304 bytes)`.
inline std::string QuoteForMessage(absl::string_view text) {
  if (text.size() <= kMaxQuotedBytes) return absl::StrCat("\"", absl::CHexEscape(text), "\"");
  return absl::StrCat("\"", absl::CHexEscape(text.substr(0, kMaxQuotedBytes)), "...\" (",
                      text.size(), " bytes)");
}

}  // namespace cachemgr
