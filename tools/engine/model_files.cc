#include "tools/engine/model_files.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/gguf_file.h"

namespace cachemgr::engine {

absl::StatusOr<LoadedModel> LoadModel(const std::string& model_path,
                                      const std::string& tokenizer_path, bool half_split) {
  LoadedModel m;
  std::string base = model_path.substr(model_path.find_last_of('/') + 1);
  m.name = base.substr(0, base.find_last_of('.'));
  if (absl::EndsWith(model_path, ".gguf")) {
    if (!tokenizer_path.empty()) {
      return absl::InvalidArgumentError("a GGUF model carries its tokenizer: drop --tokenizer");
    }
    ASSIGN_OR_RETURN(m.checkpoint, LoadGguf(model_path));
    ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(model_path));
    ASSIGN_OR_RETURN(m.tokenizer, TokenizerFromGguf(*file));
  } else {
    if (tokenizer_path.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(model_path, " is a llama2.c checkpoint: --tokenizer is required"));
    }
    ASSIGN_OR_RETURN(m.checkpoint, LoadLlama2c(model_path));
    ASSIGN_OR_RETURN(m.tokenizer,
                     LoadLlama2cTokenizer(tokenizer_path, m.checkpoint.config.vocab_size));
  }
  if (m.tokenizer->vocab_size() != m.checkpoint.config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("the tokenizer has ", m.tokenizer->vocab_size(),
                                                   " tokens but the model ",
                                                   m.checkpoint.config.vocab_size));
  }
  if (half_split) ToHalfSplit(m.checkpoint);
  return m;
}

}  // namespace cachemgr::engine
