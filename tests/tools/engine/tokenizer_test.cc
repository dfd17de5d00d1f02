// The SentencePiece-style tokenizer on tok512 (llama2.c file and the GGUF vocabulary of
// stories260K agree), and the pieces of the GPT-2 BPE pre-tokenizer on a hand-made vocabulary.
#include "tools/engine/tokenizer.h"

#include <catch2/catch.hpp>
#include <cstdint>
#include <fstream>
#include <sstream>

#include "tests/support/allocation_cap.h"
#include "tests/support/temp_dir.h"
#include "tests/support/testdata.h"
#include "tests/tools/engine/gguf_writer.h"
#include "tools/engine/gguf_file.h"

namespace cachemgr::engine {
namespace {

std::string Decode(const Tokenizer& t, const std::vector<uint32_t>& ids) {
  std::string out;
  uint32_t prev = t.bos_id();
  for (uint32_t id : ids) {
    out += t.Decode(prev, id);
    prev = id;
  }
  return out;
}

std::string TinyStories(size_t bytes) {
  std::ifstream in(cachemgr::testing::TextDir() + "/tinystories/tiny_stories_train_head.txt");
  std::string text(bytes, '\0');
  in.read(text.data(), static_cast<std::streamsize>(bytes));
  text.resize(static_cast<size_t>(in.gcount()));
  return text;
}

TEST_CASE("tok512: llama2.c file and GGUF vocabulary encode alike and round-trip", "[cpu]") {
  auto bin = LoadLlama2cTokenizer(cachemgr::testing::Tok512(), 512);
  REQUIRE(bin.ok());
  auto file = GgufFile::Open(cachemgr::testing::StoriesGguf());
  REQUIRE(file.ok());
  auto gguf = TokenizerFromGguf(**file);
  REQUIRE(gguf.ok());
  CHECK((*bin)->bos_id() == 1);
  CHECK((*bin)->eos_id() == 2);
  CHECK((*gguf)->vocab_size() == 512);
  // " Once upon a time" merges to the ids the greedy reference starts with after BOS.
  const std::vector<uint32_t> once = (*bin)->Encode("Once upon a time", true);
  REQUIRE(once.size() >= 2);
  CHECK(once[0] == 1);
  CHECK(once[1] == 403);
  CHECK(once[2] == 407);
  const std::string text = TinyStories(20000);
  const std::vector<uint32_t> a = (*bin)->Encode(text, false);
  CHECK(a == (*gguf)->Encode(text, false));
  CHECK(a.size() < text.size() / 2);  // real merging happened
  // The dummy prefix space is dropped after BOS, so decoding gives the text back.
  std::vector<uint32_t> with_bos = (*bin)->Encode(text, true);
  with_bos.erase(with_bos.begin());
  CHECK(Decode(**bin, with_bos) == text);
  // Characters outside the vocabulary fall back to byte tokens ("é" and "€" are in tok512,
  // "日" is not).
  const std::string odd = "caf\xc3\xa9 \xe2\x82\xac \xe6\x97\xa5";
  const std::vector<uint32_t> bytes = (*bin)->Encode(odd, true);
  std::vector<uint32_t> body(bytes.begin() + 1, bytes.end());
  CHECK(Decode(**bin, body) == odd);
  CHECK(std::find(body.begin(), body.end(), 3 + 0xe6) != body.end());
  CHECK(std::find(body.begin(), body.end(), 3 + 0xe2) == body.end());
}

TEST_CASE("GPT-2 BPE: pre-tokenizer pieces, digits, merges, special tokens", "[cpu]") {
  // Byte-level symbols are their own tokens here; "Ġ" (U+0120) is the space byte.
  // clang-format off
  const std::vector<std::string> tokens = {"<|endoftext|>", "<|im_start|>", "h", "e", "l", "o",
                                           "\xc4\xa0", "w", "r", "d", "1", "2", "'", "s", "!",
                                           "\xc4\x8a", "he", "ll", "hell", "hello",
                                           "\xc4\xa0" "w", "\xc4\xa0" "wo", "or", "\xc4\xa0\xc4\xa0"};
  const std::vector<std::string> merges = {"h e", "l l", "he ll", "hell o", "\xc4\xa0 w",
                                           "o r", "\xc4\xa0w o", "\xc4\xa0 \xc4\xa0"};
  // clang-format on
  std::vector<int32_t> types(tokens.size(), 1);
  types[0] = types[1] = 3;
  testing::GgufWriter w;
  w.String("tokenizer.ggml.model", "gpt2");
  w.String("tokenizer.ggml.pre", "smollm");
  w.Strings("tokenizer.ggml.tokens", tokens);
  w.Strings("tokenizer.ggml.merges", merges);
  w.Int32s("tokenizer.ggml.token_type", types);
  w.Uint32("tokenizer.ggml.bos_token_id", 1);
  w.Uint32("tokenizer.ggml.eos_token_id", 0);
  w.Bool("tokenizer.ggml.add_bos_token", false);
  cachemgr::testing::TempDir dir;
  w.Write(dir.file("v.gguf"));
  auto file = GgufFile::Open(dir.file("v.gguf"));
  REQUIRE(file.ok());
  auto t = TokenizerFromGguf(**file);
  REQUIRE(t.ok());
  auto id = [&](const std::string& s) {
    return static_cast<uint32_t>(std::find(tokens.begin(), tokens.end(), s) - tokens.begin());
  };
  // "hello world": "hello" merges fully; " world" -> "Ġw" (rank 4), then "or" (rank 5) wins
  // over "Ġw o" (rank 6), which then no longer applies.
  CHECK((*t)->Encode("hello world", true) ==
        std::vector<uint32_t>{id("hello"), id("\xc4\xa0w"), id("or"), id("l"), id("d")});
  // Digits are cut out one by one, spaces before them stay apart; "'s" is its own piece.
  CHECK((*t)->Encode("he's 12!", false) == std::vector<uint32_t>{id("he"), id("'"), id("s"),
                                                                 id("\xc4\xa0"), id("1"), id("2"),
                                                                 id("!")});
  // Two spaces before a word: the first stands alone (\s+(?!\S)), the second joins the word.
  CHECK((*t)->Encode("he  wo", false) ==
        std::vector<uint32_t>{id("he"), id("\xc4\xa0"), id("\xc4\xa0wo")});
  // Special tokens only when asked.
  CHECK((*t)->Encode("<|im_start|>he", false, true) == std::vector<uint32_t>{1, id("he")});
  CHECK((*t)->Encode("<|im_start|>he", false, false) != std::vector<uint32_t>{1, id("he")});
  std::string back;
  for (uint32_t x : (*t)->Encode("hello  world!\n", false)) back += (*t)->Decode(0, x);
  CHECK(back == "hello  world!\n");
}

// Found by fuzz/llama2c_tokenizer_fuzzer.cc and fuzz/gguf_fuzzer.cc, or while writing them
// (inputs in fuzz/corpus/): lengths and counts are checked against the file before they size an
// allocation, and every id a vocabulary states is one of its tokens.

// A llama2.c tokenizer file: max_token_length, then (score, length, bytes) per piece; `lengths`
// overrides the stated length of the first pieces.
std::string Llama2cTokenizerBytes(int32_t max_len, const std::vector<std::string>& pieces,
                                  const std::vector<int32_t>& lengths = {}) {
  std::string out(reinterpret_cast<const char*>(&max_len), 4);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const float score = -static_cast<float>(i);
    const int32_t len = i < lengths.size() ? lengths[i] : static_cast<int32_t>(pieces[i].size());
    out.append(reinterpret_cast<const char*>(&score), 4);
    out.append(reinterpret_cast<const char*>(&len), 4);
    out += pieces[i];
  }
  return out;
}

TEST_CASE("llama2.c tokenizer: lengths and counts are checked against the file", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("tok.bin");
  const std::vector<std::string> pieces = {"<unk>", "<s>", "</s>", "a"};
  cachemgr::testing::AllocationCap cap(uint64_t{64} << 20);
  auto load = [&](const std::string& bytes, uint32_t vocab) {
    std::ofstream(path, std::ios::binary) << bytes;
    return LoadLlama2cTokenizer(path, vocab);
  };
  REQUIRE(load(Llama2cTokenizerBytes(5, pieces), 4).ok());
  // A piece stating 2^31 - 1 bytes (the maximum allows it) in a 50-byte file.
  auto long_piece = load(Llama2cTokenizerBytes(INT32_MAX, pieces, {INT32_MAX}), 4);
  CHECK(long_piece.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(long_piece.status().message()), Catch::Contains("token 0 is malformed"));
  // A checkpoint stating 2^24 tokens for this file.
  auto many = load(Llama2cTokenizerBytes(5, pieces), 1u << 24);
  CHECK(many.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(many.status().message()), Catch::Contains("cannot hold 16777216 tokens"));
  // BOS (1) and EOS (2) must be tokens: the engine embeds them.
  auto tiny = load(Llama2cTokenizerBytes(5, pieces), 2);
  CHECK(tiny.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(tiny.status().message()), Catch::Contains("lacks BOS"));
}

TEST_CASE("GGUF vocabularies: token types and BOS/EOS ids must fit the tokens", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("v.gguf");
  auto vocabulary = [&](const std::string& model, auto&& extra) {
    testing::GgufWriter w;
    w.String("tokenizer.ggml.model", model);
    w.Strings("tokenizer.ggml.tokens", {"a", "b", "c"});
    w.Floats("tokenizer.ggml.scores", {0, -1, -2});
    w.Strings("tokenizer.ggml.merges", {"a b"});
    extra(w);
    w.Write(path);
    auto file = GgufFile::Open(path);
    REQUIRE(file.ok());
    return TokenizerFromGguf(**file);
  };
  for (const std::string model : {"llama", "gpt2"}) {
    INFO(model);
    CHECK(vocabulary(model, [](testing::GgufWriter&) {}).ok());
    // A CONTROL type (3) for a fourth token the vocabulary does not have: its text was read
    // from past the end of the token list.
    auto types = vocabulary(model, [](testing::GgufWriter& w) {
      w.Int32s("tokenizer.ggml.token_type", {1, 1, 1, 3});
    });
    CHECK(types.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(types.status().message()), Catch::Contains("4 token types for 3"));
    for (float bos : {3.0f, -1.0f, 1e30f, 0.5f}) {
      INFO("bos " << bos);
      auto bad = vocabulary(
          model, [&](testing::GgufWriter& w) { w.Float32("tokenizer.ggml.bos_token_id", bos); });
      CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
      CHECK_THAT(std::string(bad.status().message()), Catch::Contains("bos_token_id"));
    }
  }
}

}  // namespace
}  // namespace cachemgr::engine
