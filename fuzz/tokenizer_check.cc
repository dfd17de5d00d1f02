#include "fuzz/tokenizer_check.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "fuzz/fuzz_util.h"

namespace cachemgr::fuzz {

void ExerciseTokenizer(const engine::Tokenizer& tokenizer) {
  // Letters, digits, contractions, spaces, UTF-8 of 2-4 bytes, an invalid byte, specials.
  static const char* const kTexts[] = {
      "Once upon a time, there was 1 cat.",
      "  it's 2024\n\tdon't\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xff",
      "<|im_start|>user\nhi<|im_end|></s><s>",
  };
  for (const char* text : kTexts) {
    for (int mode = 0; mode < 4; ++mode) {
      const std::vector<uint32_t> ids = tokenizer.Encode(text, mode & 1, mode & 2);
      uint32_t previous = tokenizer.bos_id();
      for (size_t i = 0; i < ids.size(); ++i) {
        const uint32_t id = ids[i];
        Check(id < tokenizer.vocab_size(),
              absl::StrCat("Encode produced id ", id, " of a vocabulary of ",
                           tokenizer.vocab_size()));
        tokenizer.Decode(previous, id);
        previous = id;
      }
    }
  }
  const uint32_t n = std::min<uint32_t>(tokenizer.vocab_size(), 4096);
  for (uint32_t id = 0; id <= n; ++id) tokenizer.Decode(tokenizer.bos_id(), id);
}

}  // namespace cachemgr::fuzz
