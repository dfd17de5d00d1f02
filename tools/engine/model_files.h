// Loading a model and its tokenizer from files: a GGUF file carries both; a llama2.c checkpoint
// needs its tokenizer file beside it.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "tools/engine/checkpoint.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::engine {

struct LoadedModel {
  Checkpoint checkpoint;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string name;  // file name without directory and extension, e.g. "stories260K"
};

// `model_path` ending in ".gguf": GGUF (tokenizer from its vocabulary; `tokenizer_path` must be
// empty). Otherwise a llama2.c checkpoint with the llama2.c tokenizer at `tokenizer_path`.
// `half_split` permutes Q/K rows for an engine that rotates halves (ToHalfSplit).
absl::StatusOr<LoadedModel> LoadModel(const std::string& model_path,
                                      const std::string& tokenizer_path, bool half_split = false);

}  // namespace cachemgr::engine
