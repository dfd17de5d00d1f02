// Pieces shared by the tokenizers (not part of the engine's interface).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::engine {

struct SpecialToken {
  std::string text;
  uint32_t id = 0;
};

// A run of plain text, or one special token.
struct TextSegment {
  absl::string_view text;
  bool special = false;
  uint32_t token = 0;
};

// Splits `text` at every occurrence of a special token's text (longest first at a position).
std::vector<TextSegment> SplitSpecial(absl::string_view text,
                                      const std::vector<SpecialToken>& special);

// Bytes of the UTF-8 sequence starting with `lead` (1 for a stray continuation byte), at most
// `left`.
size_t Utf8Length(unsigned char lead, size_t left);

// What every GGUF vocabulary states besides its tokens.
struct GgufVocabInfo {
  uint32_t bos = 1, eos = 2;
  bool add_bos = true;
  bool add_space_prefix = true;
  std::vector<uint32_t> special;  // token_type CONTROL (3) or USER_DEFINED (4)
};
// For a vocabulary of `vocab_size` tokens: INVALID_ARGUMENT when a stated BOS / EOS id is not
// one of its tokens or token_type does not have one entry per token.
absl::StatusOr<GgufVocabInfo> ReadVocabInfo(const GgufFile& file, size_t vocab_size,
                                            bool default_add_bos);

absl::StatusOr<std::unique_ptr<Tokenizer>> SentencePieceFromGguf(const GgufFile& file);
absl::StatusOr<std::unique_ptr<Tokenizer>> Gpt2BpeFromGguf(const GgufFile& file);

}  // namespace cachemgr::engine
