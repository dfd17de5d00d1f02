// The policies an evaluation compares: the named presets, and compositions of their stages
// (client::CompressionPolicy overrides), each with the Compress input it needs.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cachemgr/client/client.h"

namespace cachemgr::eval {

struct Variant {
  std::string name;  // preset name, or "<preset>+<change>" for compositions
  client::CompressionPolicy policy;
  client::CompressInputSource input = client::CompressInputSource::kWindowQueries;
  // Keeps every token whatever the ratio (fullkv, codebook-only): evaluated once, at 1.0.
  bool ratio_independent = false;
};

// Every variant this tool knows, in report order:
//   fullkv streamingllm h2o snapkv pyramidkv pyramidinfer zigzagkv codebook spindlekv
//   snapkv+codebook     uniform budgets with the codebook stage (SpindleKV's codebook on
//                       SnapKV's schedule)
//   zigzagkv+codebook   ZigZag budgets with the codebook
//   spindlekv+mean      SpindleKV with GQA group-mean scores (eq. 3) instead of repeat
//   spindlekv+literal   SpindleKV with eq. 2's literal (l - a) divisor instead of the plain sum
//   spindlekv+headcb    SpindleKV with one codebook per KV head instead of per layer
//   codebook+exact      codebook-only with the exact similarity search (every pair) instead of
//                       the default hashed one (CodebookSearch); spindlekv+exact likewise
std::vector<Variant> AllVariants(uint32_t window);

// The variants named in `names` (comma-separated; "all" for every one). INVALID_ARGUMENT naming
// an unknown one.
absl::StatusOr<std::vector<Variant>> SelectVariants(const std::string& names, uint32_t window);

}  // namespace cachemgr::eval
