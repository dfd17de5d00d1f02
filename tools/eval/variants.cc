#include "tools/eval/variants.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace cachemgr::eval {
namespace {

Variant Preset(const std::string& preset, uint32_t window) {
  Variant v;
  v.name = preset;
  v.policy.preset = preset;
  v.policy.window = window;
  if (preset == "h2o") v.input = client::CompressInputSource::kScores;
  if (preset == "fullkv" || preset == "streamingllm" || preset == "codebook") {
    v.input = client::CompressInputSource::kNone;
  }
  v.ratio_independent = preset == "fullkv" || preset == "codebook";
  return v;
}

}  // namespace

std::vector<Variant> AllVariants(uint32_t window) {
  std::vector<Variant> out;
  for (const char* p : {"fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "pyramidinfer",
                        "zigzagkv", "codebook", "spindlekv"}) {
    out.push_back(Preset(p, window));
  }
  Variant v = Preset("snapkv", window);
  v.name = "snapkv+codebook";
  v.policy.codebook = true;
  out.push_back(v);
  v = Preset("zigzagkv", window);
  v.name = "zigzagkv+codebook";
  v.policy.codebook = true;
  out.push_back(v);
  v = Preset("spindlekv", window);
  v.name = "spindlekv+mean";
  v.policy.gqa = client::GqaMode::kGroupMean;
  out.push_back(v);
  v = Preset("spindlekv", window);
  v.name = "spindlekv+literal";
  v.policy.normalization = client::WindowNormalization::kLiteral;
  out.push_back(v);
  v = Preset("spindlekv", window);
  v.name = "spindlekv+headcb";
  v.policy.codebook_scope = client::CodebookScope::kKvHead;
  out.push_back(v);
  // The exact similarity search (every pair) against the default hashed one.
  v = Preset("codebook", window);
  v.name = "codebook+exact";
  v.policy.codebook_search = client::CodebookSearch::kExact;
  out.push_back(v);
  v = Preset("spindlekv", window);
  v.name = "spindlekv+exact";
  v.policy.codebook_search = client::CodebookSearch::kExact;
  out.push_back(v);
  return out;
}

absl::StatusOr<std::vector<Variant>> SelectVariants(const std::string& names, uint32_t window) {
  const std::vector<Variant> all = AllVariants(window);
  if (names == "all") return all;
  std::vector<Variant> out;
  for (absl::string_view name : absl::StrSplit(names, ',', absl::SkipEmpty())) {
    bool found = false;
    for (const Variant& v : all) {
      if (v.name == name) {
        out.push_back(v);
        found = true;
      }
    }
    if (!found) {
      std::vector<std::string> known;
      for (const Variant& v : all) known.push_back(v.name);
      return absl::InvalidArgumentError(
          absl::StrCat("--policies: unknown \"", name, "\"; known: ", absl::StrJoin(known, ", ")));
    }
  }
  if (out.empty()) return absl::InvalidArgumentError("--policies names no policy");
  return out;
}

}  // namespace cachemgr::eval
