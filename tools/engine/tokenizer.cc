#include "tools/engine/tokenizer.h"

#include <algorithm>

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

absl::StatusOr<GgufVocabInfo> ReadVocabInfo(const GgufFile& file, bool default_add_bos) {
  GgufVocabInfo info;
  info.add_bos = default_add_bos;
  if (auto v = file.GetNumber("tokenizer.ggml.bos_token_id"); v.ok()) {
    info.bos = static_cast<uint32_t>(*v);
  }
  if (auto v = file.GetNumber("tokenizer.ggml.eos_token_id"); v.ok()) {
    info.eos = static_cast<uint32_t>(*v);
  }
  if (auto v = file.GetNumber("tokenizer.ggml.add_bos_token"); v.ok()) info.add_bos = *v != 0;
  if (auto v = file.GetNumber("tokenizer.ggml.add_space_prefix"); v.ok()) {
    info.add_space_prefix = *v != 0;
  }
  if (auto types = file.GetNumbers("tokenizer.ggml.token_type"); types.ok()) {
    for (size_t i = 0; i < (*types)->size(); ++i) {
      const int t = static_cast<int>((**types)[i]);
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
