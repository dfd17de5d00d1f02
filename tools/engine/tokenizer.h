// Tokenizers of the engine: SentencePiece-style BPE by scores (llama2.c's tokenizer files and
// GGUF "llama" vocabularies) and GPT-2 byte-level BPE by merge ranks (GGUF "gpt2" vocabularies,
// e.g. SmolLM2).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace cachemgr::engine {

class GgufFile;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text (UTF-8) to token ids, with BOS first when `add_bos` (and the vocabulary adds one).
  // `parse_special`: spelled-out control tokens ("<|im_start|>") become their ids.
  virtual std::vector<uint32_t> Encode(absl::string_view text, bool add_bos,
                                       bool parse_special = false) const = 0;
  // The bytes `token` stands for when it follows `previous` (SentencePiece drops the leading
  // space of the first piece after BOS).
  virtual std::string Decode(uint32_t previous, uint32_t token) const = 0;

  virtual uint32_t vocab_size() const = 0;
  virtual uint32_t bos_id() const = 0;
  virtual uint32_t eos_id() const = 0;
  // Whether Encode(add_bos = true) prepends BOS for this vocabulary (GGUF add_bos_token).
  virtual bool adds_bos() const = 0;
};

// llama2.c's tokenizer file (max_token_length, then per token: float score, int32 length,
// bytes) for a vocabulary of `vocab_size` tokens. BOS 1, EOS 2, bytes as <0xXX> at 3 + byte.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadLlama2cTokenizer(const std::string& path,
                                                                uint32_t vocab_size);

// The vocabulary of a GGUF file: tokenizer.ggml.model "llama" (tokens, scores; "▁" is a space)
// or "gpt2" (tokens, merges; pre-tokenizer "smollm"/"gpt2"-style splitting, digits one by one
// for smollm). UNIMPLEMENTED for other models.
absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromGguf(const GgufFile& file);

}  // namespace cachemgr::engine
