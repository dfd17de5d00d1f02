// GPT-2 byte-level BPE (GGUF tokenizer.ggml.model "gpt2"): text is pre-split into words, each
// word's bytes are mapped to printable code points (GPT-2's bytes_to_unicode), and adjacent
// symbols merge by merge rank, lowest first, until no listed merge applies.
//
// Pre-tokenization follows GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// written out by hand (no regex engine); with pre "smollm" (and the other llama.cpp
// pre-tokenizers that split digits), every digit is first cut out as a word of its own.
// Character classes: ASCII exactly; outside ASCII, Unicode whitespace is \s, the general
// punctuation and symbol blocks are "other", and every other code point counts as a letter
// (an approximation of \p{L} that is exact for the text this project evaluates on).
#include <algorithm>
#include <array>
#include <climits>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/gguf_file.h"
#include "tools/engine/tokenizer.h"
#include "tools/engine/tokenizer_internal.h"

namespace cachemgr::engine {
namespace {

enum class CharClass { kLetter, kNumber, kSpace, kOther };

struct CodePoint {
  uint32_t value = 0;
  size_t begin = 0, end = 0;  // bytes in the text
};

std::vector<CodePoint> DecodeUtf8(absl::string_view text) {
  std::vector<CodePoint> out;
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    const size_t len = Utf8Length(lead, text.size() - i);
    uint32_t v = len == 1 ? lead : lead & (0x7F >> len);
    for (size_t k = 1; k < len; ++k)
      v = (v << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
    out.push_back({v, i, i + len});
    i += len;
  }
  return out;
}

CharClass Classify(uint32_t c) {
  if (c < 0x80) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CharClass::kLetter;
    if (c >= '0' && c <= '9') return CharClass::kNumber;
    if (c == ' ' || (c >= '\t' && c <= '\r')) return CharClass::kSpace;
    return CharClass::kOther;
  }
  if (c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
      c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000) {
    return CharClass::kSpace;
  }
  if (c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE)) return CharClass::kNumber;
  if ((c >= 0xA1 && c <= 0xBF && c != 0xAA && c != 0xB5 && c != 0xBA) || c == 0xD7 || c == 0xF7 ||
      (c >= 0x2010 && c <= 0x2BFF) || (c >= 0x3001 && c <= 0x303F) ||
      (c >= 0xFE30 && c <= 0xFE4F) || (c >= 0xFF01 && c <= 0xFF0F) ||
      (c >= 0x1F000 && c <= 0x1FAFF)) {
    return CharClass::kOther;
  }
  return CharClass::kLetter;
}

// Byte ranges of the words of `text` under the GPT-2 pattern.
void SplitGpt2(absl::string_view text, std::vector<absl::string_view>* words) {
  const std::vector<CodePoint> cps = DecodeUtf8(text);
  const size_t n = cps.size();
  auto cls = [&](size_t i) { return Classify(cps[i].value); };
  auto emit = [&](size_t from, size_t to) {
    words->push_back(text.substr(cps[from].begin, cps[to - 1].end - cps[from].begin));
  };
  size_t i = 0;
  while (i < n) {
    // 's 't 're 've 'm 'll 'd
    if (cps[i].value == '\'' && i + 1 < n) {
      static constexpr std::array<absl::string_view, 7> kSuffixes = {"s", "t",  "re", "ve",
                                                                     "m", "ll", "d"};
      size_t matched = 0;
      for (absl::string_view suf : kSuffixes) {
        if (i + 1 + suf.size() > n) continue;
        bool ok = true;
        for (size_t k = 0; k < suf.size(); ++k) {
          ok = ok && cps[i + 1 + k].value == static_cast<uint32_t>(suf[k]);
        }
        if (ok) {
          matched = suf.size();
          break;
        }
      }
      if (matched > 0) {
        emit(i, i + 1 + matched);
        i += 1 + matched;
        continue;
      }
    }
    // ' ?X+' for X in letters, numbers, other (an optional leading ASCII space).
    const size_t start = i;
    size_t j = (cps[i].value == ' ' && i + 1 < n) ? i + 1 : i;
    const CharClass c = cls(j);
    if (c != CharClass::kSpace) {
      size_t k = j + 1;
      while (k < n && cls(k) == c) ++k;
      emit(start, k);
      i = k;
      continue;
    }
    // \s+(?!\S) | \s+
    size_t k = i;
    while (k < n && cls(k) == CharClass::kSpace) ++k;
    if (k < n && k - i > 1) --k;  // leave the last space to the word after it
    emit(i, k);
    i = k;
  }
}

std::array<std::string, 256> ByteToUnicode() {
  std::array<std::string, 256> map;
  auto encode = [](uint32_t cp) {
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    return s;
  };
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    map[b] = encode(printable ? b : next++);
  }
  return map;
}

class Gpt2BpeTokenizer final : public Tokenizer {
 public:
  Gpt2BpeTokenizer(std::vector<std::string> tokens, const std::vector<std::string>& merges,
                   GgufVocabInfo info, bool split_digits)
      : tokens_(std::move(tokens)), info_(std::move(info)), split_digits_(split_digits) {
    byte_to_unicode_ = ByteToUnicode();
    for (uint32_t b = 0; b < 256; ++b) unicode_to_byte_[byte_to_unicode_[b]] = static_cast<char>(b);
    for (uint32_t i = 0; i < tokens_.size(); ++i) index_.emplace(tokens_[i], i);
    for (uint32_t r = 0; r < merges.size(); ++r) {
      const size_t space = merges[r].find(' ', 1);
      if (space == std::string::npos) continue;
      ranks_.emplace(merges[r].substr(0, space) + '\x01' + merges[r].substr(space + 1), r);
    }
    for (uint32_t id : info_.special) special_.push_back({tokens_[id], id});
  }

  std::vector<uint32_t> Encode(absl::string_view text, bool add_bos,
                               bool parse_special) const override {
    std::vector<uint32_t> ids;
    if (add_bos && info_.add_bos) ids.push_back(info_.bos);
    static const std::vector<SpecialToken> kNone;
    for (const TextSegment& seg : SplitSpecial(text, parse_special ? special_ : kNone)) {
      if (seg.special) {
        ids.push_back(seg.token);
        continue;
      }
      std::vector<absl::string_view> words;
      if (split_digits_) {
        size_t plain = 0;
        for (size_t i = 0; i <= seg.text.size(); ++i) {
          const bool digit = i < seg.text.size() && seg.text[i] >= '0' && seg.text[i] <= '9';
          if (i == seg.text.size() || digit) {
            if (i > plain) SplitGpt2(seg.text.substr(plain, i - plain), &words);
            if (digit) words.push_back(seg.text.substr(i, 1));
            plain = i + 1;
          }
        }
      } else {
        SplitGpt2(seg.text, &words);
      }
      for (absl::string_view w : words) EncodeWord(w, &ids);
    }
    return ids;
  }

  std::string Decode(uint32_t /*previous*/, uint32_t token) const override {
    if (token >= tokens_.size()) return "";
    const std::string& t = tokens_[token];
    if (std::find(info_.special.begin(), info_.special.end(), token) != info_.special.end()) {
      return t;
    }
    std::string out;
    for (size_t i = 0; i < t.size();) {
      const size_t len = Utf8Length(static_cast<unsigned char>(t[i]), t.size() - i);
      auto it = unicode_to_byte_.find(t.substr(i, len));
      if (it != unicode_to_byte_.end()) out.push_back(it->second);
      i += len;
    }
    return out;
  }

  uint32_t vocab_size() const override { return static_cast<uint32_t>(tokens_.size()); }
  uint32_t bos_id() const override { return info_.bos; }
  uint32_t eos_id() const override { return info_.eos; }
  bool adds_bos() const override { return info_.add_bos; }

 private:
  void EncodeWord(absl::string_view word, std::vector<uint32_t>* out) const {
    std::vector<std::string> symbols;
    for (char ch : word) symbols.push_back(byte_to_unicode_[static_cast<unsigned char>(ch)]);
    while (symbols.size() > 1) {
      uint32_t best = UINT32_MAX;
      size_t at = 0;
      for (size_t i = 0; i + 1 < symbols.size(); ++i) {
        auto it = ranks_.find(symbols[i] + '\x01' + symbols[i + 1]);
        if (it != ranks_.end() && it->second < best) {
          best = it->second;
          at = i;
        }
      }
      if (best == UINT32_MAX) break;
      // Merge every occurrence of the best pair, left to right (GPT-2's bpe()).
      const std::string left = symbols[at], right = symbols[at + 1];
      std::vector<std::string> merged;
      for (size_t i = 0; i < symbols.size();) {
        if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
          merged.push_back(left + right);
          i += 2;
        } else {
          merged.push_back(symbols[i]);
          ++i;
        }
      }
      symbols = std::move(merged);
    }
    for (const std::string& s : symbols) {
      auto it = index_.find(s);
      if (it != index_.end()) {
        out->push_back(it->second);
        continue;
      }
      // Not in the vocabulary (cannot happen for a complete byte-level vocabulary): its bytes.
      for (size_t i = 0; i < s.size();) {
        const size_t len = Utf8Length(static_cast<unsigned char>(s[i]), s.size() - i);
        if (auto b = index_.find(s.substr(i, len)); b != index_.end()) out->push_back(b->second);
        i += len;
      }
    }
  }

  std::vector<std::string> tokens_;
  GgufVocabInfo info_;
  bool split_digits_;
  std::array<std::string, 256> byte_to_unicode_;
  absl::flat_hash_map<std::string, char> unicode_to_byte_;
  absl::flat_hash_map<std::string, uint32_t> index_;
  absl::flat_hash_map<std::string, uint32_t> ranks_;
  std::vector<SpecialToken> special_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Gpt2BpeFromGguf(const GgufFile& file) {
  ASSIGN_OR_RETURN(const std::vector<std::string>* tokens,
                   file.GetStrings("tokenizer.ggml.tokens"));
  ASSIGN_OR_RETURN(const std::vector<std::string>* merges,
                   file.GetStrings("tokenizer.ggml.merges"));
  ASSIGN_OR_RETURN(GgufVocabInfo info,
                   ReadVocabInfo(file, tokens->size(), /*default_add_bos=*/false));
  std::string pre = "gpt2";
  if (auto p = file.GetString("tokenizer.ggml.pre"); p.ok()) pre = *p;
  // llama.cpp's pre-tokenizers that cut out every digit before the GPT-2 pattern.
  const bool split_digits = pre == "smollm" || pre == "starcoder" || pre == "refact" ||
                            pre == "command-r" || pre == "codeshell" || pre == "exaone";
  return std::make_unique<Gpt2BpeTokenizer>(*tokens, *merges, std::move(info), split_digits);
}

}  // namespace cachemgr::engine
