// The flags of `cachemgrctl compress`, validated into one immutable options struct, and the
// names of the policy stages as the flags (and stats.json) spell them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "cachemgr/compress/compress.h"

namespace cachemgr::ctl {

struct CompressOptions {
  std::string keys_path;
  std::string values_path;
  std::string queries_path;    // empty when absent
  std::string scores_path;     // empty when absent
  std::string positions_path;  // empty when absent
  std::string out_dir;
  compress::PolicyConfig policy;  // preset + overrides, validated
  compress::CompressTarget target;
  std::optional<uint32_t> num_q_heads;  // from the flag; else taken from Q or S
  // Shape fields other than the counts (those come from the files).
  compress::RopeStyle rope_style = compress::RopeStyle::kNone;
  double rope_theta = 10000.0;
  double rope_scaling = 1.0;
  uint32_t rotary_dim = 0;
  uint32_t elem_bytes = 2;
};

// INVALID_ARGUMENT naming the flag for anything wrong (the caller exits with kExitUsage).
absl::StatusOr<CompressOptions> ParseCompressOptions(const std::vector<std::string>& args);

// Flag spellings of the stage enums (also used in stats.json).
std::string ScheduleName(compress::BudgetSchedule value);
std::string ScoringName(compress::Scoring value);
std::string NormalizationName(compress::WindowNormalization value);
std::string PoolingName(compress::Pooling value);
std::string GqaName(compress::GqaMode value);
std::string CodebookScopeName(compress::CodebookScope value);
std::string CodebookSearchName(compress::CodebookSearch value);
std::string RopeName(compress::RopeStyle value);

}  // namespace cachemgr::ctl
