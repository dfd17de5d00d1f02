// A plain-text table for cachemgrctl's human output: a header row, then rows; columns padded
// to their widest cell, numeric cells right-aligned.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cachemgr::ctl {

class Table {
 public:
  explicit Table(std::vector<std::string> headers) : headers_(std::move(headers)) {}

  // Missing trailing cells print empty; extra cells are a programming error (dropped).
  void AddRow(std::vector<std::string> cells);
  bool empty() const { return rows_.empty(); }

  // Every line ends with '\n'; two spaces between columns, no trailing spaces.
  std::string Render() const;

 private:
  std::vector<std::string> headers_;
  std::vector<std::vector<std::string>> rows_;
};

// 1536 -> "1.5 KiB"; below 1 KiB the exact count ("512 B").
std::string HumanBytes(uint64_t bytes);

// 0.4567 -> "45.7%".
std::string Percent(double fraction);

}  // namespace cachemgr::ctl
