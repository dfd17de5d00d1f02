// SentencePiece-style BPE: the encoder of llama2.c's run.c (a dummy-prefix space, code points
// looked up whole or as <0xXX> byte tokens, then repeatedly the adjacent pair whose merge has the
// highest score), for llama2.c tokenizer files and GGUF "llama" vocabularies.
#include <cstring>
#include <fstream>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/gguf_file.h"
#include "tools/engine/tokenizer.h"
#include "tools/engine/tokenizer_internal.h"

namespace cachemgr::engine {
namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(std::vector<std::string> pieces, std::vector<float> scores, uint32_t bos,
                         uint32_t eos, bool add_bos, bool add_space_prefix,
                         std::vector<uint32_t> special)
      : pieces_(std::move(pieces)),
        scores_(std::move(scores)),
        bos_(bos),
        eos_(eos),
        add_bos_(add_bos),
        add_space_prefix_(add_space_prefix) {
    for (uint32_t i = 0; i < pieces_.size(); ++i) index_.emplace(pieces_[i], i);
    for (uint32_t id : special) special_.push_back({pieces_[id], id});
    for (uint32_t b = 0; b < 256; ++b) {
      byte_token_[b] = Lookup(absl::StrFormat("<0x%02X>", b));
    }
  }

  std::vector<uint32_t> Encode(absl::string_view text, bool add_bos,
                               bool parse_special) const override {
    std::vector<uint32_t> ids;
    if (add_bos && add_bos_) ids.push_back(bos_);
    for (const TextSegment& seg : SplitSpecial(text, parse_special ? special_ : NoSpecial())) {
      if (seg.special) {
        ids.push_back(seg.token);
        continue;
      }
      EncodePlain(seg.text, &ids);
    }
    return ids;
  }

  std::string Decode(uint32_t previous, uint32_t token) const override {
    if (token >= pieces_.size()) return "";
    absl::string_view piece = pieces_[token];
    if (previous == bos_ && !piece.empty() && piece[0] == ' ') piece.remove_prefix(1);
    unsigned byte = 0;
    if (piece.size() == 6 && piece.substr(0, 3) == "<0x" && piece[5] == '>' &&
        std::sscanf(std::string(piece).c_str(), "<0x%02X>", &byte) == 1) {
      return std::string(1, static_cast<char>(byte));
    }
    return std::string(piece);
  }

  uint32_t vocab_size() const override { return static_cast<uint32_t>(pieces_.size()); }
  uint32_t bos_id() const override { return bos_; }
  uint32_t eos_id() const override { return eos_; }
  bool adds_bos() const override { return add_bos_; }

 private:
  static const std::vector<SpecialToken>& NoSpecial() {
    static const auto* none = new std::vector<SpecialToken>();
    return *none;
  }

  int64_t Lookup(absl::string_view s) const {
    auto it = index_.find(s);
    return it == index_.end() ? int64_t{-1} : int64_t{it->second};
  }

  void EncodePlain(absl::string_view text, std::vector<uint32_t>* out) const {
    if (text.empty()) return;
    std::vector<uint32_t> ids;
    if (add_space_prefix_) {
      if (int64_t space = Lookup(" "); space >= 0) ids.push_back(static_cast<uint32_t>(space));
    }
    for (size_t i = 0; i < text.size();) {
      const size_t len = Utf8Length(static_cast<unsigned char>(text[i]), text.size() - i);
      if (int64_t id = Lookup(text.substr(i, len)); id >= 0) {
        ids.push_back(static_cast<uint32_t>(id));
      } else {
        for (size_t b = 0; b < len; ++b) {
          const int64_t byte = byte_token_[static_cast<unsigned char>(text[i + b])];
          if (byte >= 0) ids.push_back(static_cast<uint32_t>(byte));
        }
      }
      i += len;
    }
    while (true) {
      float best_score = -1e10f;
      int64_t best_id = -1;
      size_t best_at = 0;
      for (size_t i = 0; i + 1 < ids.size(); ++i) {
        const int64_t id = Lookup(pieces_[ids[i]] + pieces_[ids[i + 1]]);
        if (id >= 0 && scores_[id] > best_score) {
          best_score = scores_[id];
          best_id = id;
          best_at = i;
        }
      }
      if (best_id < 0) break;
      ids[best_at] = static_cast<uint32_t>(best_id);
      ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
    out->insert(out->end(), ids.begin(), ids.end());
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  uint32_t bos_, eos_;
  bool add_bos_, add_space_prefix_;
  absl::flat_hash_map<std::string, uint32_t> index_;
  std::vector<SpecialToken> special_;
  int64_t byte_token_[256];
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadLlama2cTokenizer(const std::string& path,
                                                                uint32_t vocab_size) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  if (vocab_size < 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": a vocabulary of ", vocab_size, " tokens lacks BOS (1) and EOS (2)"));
  }
  // Lengths in the file are checked against what it holds before anything is allocated.
  const std::streamoff file_bytes = in.tellg();
  in.seekg(0);
  int32_t max_len = 0;
  in.read(reinterpret_cast<char*>(&max_len), 4);
  // Every token takes at least 8 bytes (score and length).
  if (file_bytes < 4 || static_cast<uint64_t>(file_bytes - 4) / 8 < vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", file_bytes, " bytes cannot hold ", vocab_size, " tokens"));
  }
  std::vector<std::string> pieces(vocab_size);
  std::vector<float> scores(vocab_size);
  for (uint32_t i = 0; i < vocab_size; ++i) {
    int32_t len = 0;
    in.read(reinterpret_cast<char*>(&scores[i]), 4);
    in.read(reinterpret_cast<char*>(&len), 4);
    if (!in || len < 0 || len > max_len || len > file_bytes - in.tellg()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": token ", i,
                                                     " is malformed (the file holds fewer than ",
                                                     vocab_size, " tokens?)"));
    }
    pieces[i].resize(static_cast<size_t>(len));
    in.read(pieces[i].data(), len);
  }
  if (!in) return absl::InvalidArgumentError(absl::StrCat(path, ": truncated"));
  return std::make_unique<SentencePieceTokenizer>(std::move(pieces), std::move(scores), 1, 2,
                                                  /*add_bos=*/true, /*add_space_prefix=*/true,
                                                  std::vector<uint32_t>{});
}

absl::StatusOr<std::unique_ptr<Tokenizer>> SentencePieceFromGguf(const GgufFile& file) {
  ASSIGN_OR_RETURN(const std::vector<std::string>* tokens,
                   file.GetStrings("tokenizer.ggml.tokens"));
  ASSIGN_OR_RETURN(const std::vector<double>* scores, file.GetNumbers("tokenizer.ggml.scores"));
  if (scores->size() != tokens->size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file.path(), ": ", tokens->size(), " tokens but ", scores->size(), " scores"));
  }
  std::vector<std::string> pieces;
  pieces.reserve(tokens->size());
  for (const std::string& t : *tokens)
    pieces.push_back(absl::StrReplaceAll(t, {{"\xe2\x96\x81", " "}}));
  std::vector<float> s(scores->begin(), scores->end());
  ASSIGN_OR_RETURN(GgufVocabInfo info,
                   ReadVocabInfo(file, tokens->size(), /*default_add_bos=*/true));
  return std::make_unique<SentencePieceTokenizer>(std::move(pieces), std::move(s), info.bos,
                                                  info.eos, info.add_bos, info.add_space_prefix,
                                                  std::move(info.special));
}

}  // namespace cachemgr::engine
