#include "tools/engine/tokenizer.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/gguf_file.h"
#include "tools/engine/tokenizer_internal.h"

namespace cachemgr::engine {

size_t Utf8Length(unsigned char lead, size_t left) {
  size_t len = 1;
  if ((lead & 0xE0) == 0xC0) {
    len = 2;
  } else if ((lead & 0xF0) == 0xE0) {
    len = 3;
  } else if ((lead & 0xF8) == 0xF0) {
    len = 4;
  }
  return std::min(len, left);
}

std::vector<TextSegment> SplitSpecial(absl::string_view text,
                                      const std::vector<SpecialToken>& special) {
  std::vector<TextSegment> out;
  size_t plain_begin = 0;
  size_t i = 0;
  while (i < text.size()) {
    const SpecialToken* best = nullptr;
    if (!special.empty()) {
      for (const SpecialToken& s : special) {
        if (!s.text.empty() && text.substr(i, s.text.size()) == s.text &&
            (best == nullptr || s.text.size() > best->text.size())) {
          best = &s;
        }
      }
    }
    if (best == nullptr) {
      ++i;
      continue;
    }
    if (i > plain_begin) out.push_back({text.substr(plain_begin, i - plain_begin)});
    out.push_back({text.substr(i, best->text.size()), true, best->id});
    i += best->text.size();
    plain_begin = i;
  }
  if (plain_begin < text.size()) out.push_back({text.substr(plain_begin)});
  return out;
}

absl::StatusOr<GgufVocabInfo> ReadVocabInfo(const GgufFile& file, size_t vocab_size,
                                            bool default_add_bos) {
  GgufVocabInfo info;
  info.add_bos = default_add_bos;
  // Token ids are checked as doubles: converting one outside uint32 would be undefined.
  auto token_id = [&](const char* key, uint32_t* id) -> absl::Status {
    absl::StatusOr<double> v = file.GetNumber(key);
    if (!v.ok()) return absl::OkStatus();  // optional
    if (!(*v >= 0 && *v < static_cast<double>(vocab_size)) || *v != std::floor(*v)) {
      return absl::InvalidArgumentError(
          absl::StrCat(file.path(), ": ", key, " is ", *v, ", not a token of ", vocab_size));
    }
    *id = static_cast<uint32_t>(*v);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(token_id("tokenizer.ggml.bos_token_id", &info.bos));
  RETURN_IF_ERROR(token_id("tokenizer.ggml.eos_token_id", &info.eos));
  if (auto v = file.GetNumber("tokenizer.ggml.add_bos_token"); v.ok()) info.add_bos = *v != 0;
  if (auto v = file.GetNumber("tokenizer.ggml.add_space_prefix"); v.ok()) {
    info.add_space_prefix = *v != 0;
  }
  if (auto types = file.GetNumbers("tokenizer.ggml.token_type"); types.ok()) {
    if ((*types)->size() != vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(file.path(), ": ", (*types)->size(),
                                                     " token types for ", vocab_size, " tokens"));
    }
    for (size_t i = 0; i < (*types)->size(); ++i) {
      const double t = (**types)[i];
      if (t == 3 || t == 4) info.special.push_back(static_cast<uint32_t>(i));
    }
  }
  return info;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromGguf(const GgufFile& file) {
  ASSIGN_OR_RETURN(std::string model, file.GetString("tokenizer.ggml.model"));
  if (model == "llama") return SentencePieceFromGguf(file);
  if (model == "gpt2") return Gpt2BpeFromGguf(file);
  return absl::UnimplementedError(
      absl::StrCat(file.path(), ": tokenizer.ggml.model \"", model, "\" is not supported"));
}

}  // namespace cachemgr::engine
