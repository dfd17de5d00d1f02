#include "tools/cachemgrctl/table.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace cachemgr::ctl {
namespace {

// A number with an optional sign, a unit or percent: "12", "-0.5", "45.7%", "1.5 KiB", "9.3 s".
bool LooksNumeric(absl::string_view cell) {
  for (absl::string_view unit : {"%", " B", " KiB", " MiB", " GiB", " TiB", " s"}) {
    if (absl::ConsumeSuffix(&cell, unit)) break;
  }
  absl::ConsumePrefix(&cell, "-") || absl::ConsumePrefix(&cell, "+");
  if (cell.empty() || !absl::ascii_isdigit(cell[0])) return false;
  return cell.find_first_not_of("0123456789.") == absl::string_view::npos;
}

}  // namespace

void Table::AddRow(std::vector<std::string> cells) {
  cells.resize(headers_.size());
  rows_.push_back(std::move(cells));
}

std::string Table::Render() const {
  std::vector<size_t> width(headers_.size());
  std::vector<bool> numeric(headers_.size(), !rows_.empty());
  for (size_t c = 0; c < headers_.size(); ++c) {
    width[c] = headers_[c].size();
    for (const auto& row : rows_) {
      width[c] = std::max(width[c], row[c].size());
      if (!row[c].empty() && !LooksNumeric(row[c])) numeric[c] = false;
    }
  }
  std::string out;
  auto line = [&](const std::vector<std::string>& cells) {
    std::string text;
    for (size_t c = 0; c < cells.size(); ++c) {
      const size_t pad = width[c] - cells[c].size();
      if (c > 0) text += "  ";
      if (numeric[c]) text.append(pad, ' ');
      text += cells[c];
      if (!numeric[c]) text.append(pad, ' ');
    }
    text.erase(text.find_last_not_of(' ') + 1);
    absl::StrAppend(&out, text, "\n");
  };
  line(headers_);
  for (const auto& row : rows_) line(row);
  return out;
}

std::string HumanBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double value = static_cast<double>(bytes) / 1024;
  int unit = 0;
  while (value >= 1024 && unit < 3) {
    value /= 1024;
    ++unit;
  }
  return absl::StrFormat("%.1f %s", value, kUnits[unit]);
}

std::string Percent(double fraction) { return absl::StrFormat("%.1f%%", 100 * fraction); }

}  // namespace cachemgr::ctl
