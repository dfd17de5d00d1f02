// GgufFile on files written by GgufWriter: metadata of every kind, tensors of several types,
// and the errors of malformed files.
#include "tools/engine/gguf_file.h"

#include <catch2/catch.hpp>
#include <cstring>

#include "tests/support/allocation_cap.h"
#include "tests/support/temp_dir.h"
#include "tests/tools/engine/gguf_writer.h"

namespace cachemgr::engine {
namespace {

using testing::GgufWriter;

std::vector<uint8_t> Floats(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * 4);
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

GgufWriter Sample() {
  GgufWriter w;
  w.String("general.architecture", "llama");
  w.Uint32("llama.block_count", 5);
  w.Float32("llama.rope.freq_base", 500000.0f);
  w.Bool("tokenizer.ggml.add_bos_token", false);
  w.Strings("tokenizer.ggml.tokens", {"a", "b",
                                      "\xe2\x96\x81"
                                      "c"});
  w.Floats("tokenizer.ggml.scores", {0.0f, -1.0f, -2.5f});
  w.Int32s("tokenizer.ggml.token_type", {1, 3, 1});
  w.Tensor("w", {3, 2}, 0, Floats({1, 2, 3, 4, 5, 6}));
  std::vector<uint8_t> q8(34, 0);
  const uint16_t half_one = 0x3c00;
  std::memcpy(q8.data(), &half_one, 2);
  for (int j = 0; j < 32; ++j) q8[2 + j] = static_cast<uint8_t>(j);
  w.Tensor("q", {32}, 8, q8);
  return w;
}

TEST_CASE("metadata and tensors read back", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.path() + "/m.gguf";
  Sample().Write(path);
  auto file = GgufFile::Open(path);
  REQUIRE(file.ok());
  CHECK((*file)->version() == 3);
  CHECK(*(*file)->GetString("general.architecture") == "llama");
  CHECK(*(*file)->GetNumber("llama.block_count") == 5);
  CHECK(*(*file)->GetNumber("llama.rope.freq_base") == 500000.0);
  CHECK(*(*file)->GetNumber("tokenizer.ggml.add_bos_token") == 0);
  CHECK(**(*file)->GetStrings("tokenizer.ggml.tokens") == std::vector<std::string>{"a", "b",
                                                                                   "\xe2\x96\x81"
                                                                                   "c"});
  CHECK(**(*file)->GetNumbers("tokenizer.ggml.scores") == std::vector<double>{0, -1, -2.5});
  CHECK((*file)->GetNumber("missing").status().code() == absl::StatusCode::kNotFound);
  CHECK((*file)->GetString("llama.block_count").status().code() ==
        absl::StatusCode::kInvalidArgument);
  auto w = (*file)->ReadFloat("w", {3, 2});
  REQUIRE(w.ok());
  CHECK(*w == std::vector<float>{1, 2, 3, 4, 5, 6});
  auto q = (*file)->ReadFloat("q", {32});
  REQUIRE(q.ok());
  for (int j = 0; j < 32; ++j) CHECK((*q)[j] == static_cast<float>(j));
  auto wrong = (*file)->ReadFloat("w", {2, 3});
  CHECK(wrong.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(wrong.status().message()), Catch::Contains("ne [3, 2]"));
  CHECK((*file)->ReadFloat("nope", {1}).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("malformed files are refused with the reason", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.path() + "/bad.gguf";
  GgufWriter w = Sample();
  w.Write(path, /*truncate_to=*/60);  // inside the metadata
  auto truncated = GgufFile::Open(path);
  CHECK(truncated.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(truncated.status().message()), Catch::Contains("truncated"));
  w.Write(path, 0, /*version=*/1);
  CHECK_THAT(std::string(GgufFile::Open(path).status().message()), Catch::Contains("version 1"));
  GgufWriter big;
  big.Tensor("huge", {1u << 20}, 0, Floats({1, 2}));  // data shorter than its shape
  big.Write(path);
  CHECK_THAT(std::string(GgufFile::Open(path).status().message()), Catch::Contains("past the end"));
  std::ofstream(path) << "not a gguf file at all, but long enough";
  CHECK_THAT(std::string(GgufFile::Open(path).status().message()), Catch::Contains("magic"));
  CHECK(GgufFile::Open(dir.path() + "/missing.gguf").status().code() ==
        absl::StatusCode::kNotFound);
}

// Found by fuzz/gguf_fuzzer.cc or while writing it (inputs in fuzz/corpus/gguf/): what the file
// states about sizes and offsets is checked without wrapping, before anything is allocated.

TEST_CASE("a tensor of more than 2^64 bytes is refused when read, not allocated", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("wrap.gguf");
  GgufWriter w;
  w.Tensor("wrap", {uint64_t{1} << 62}, 0, Floats({1}));  // 2^62 f32: 2^64 bytes, wraps to 0
  w.Write(path);
  cachemgr::testing::AllocationCap cap(uint64_t{64} << 20);
  auto file = GgufFile::Open(path);
  REQUIRE(file.ok());
  auto read = (*file)->ReadFloat("wrap", {uint64_t{1} << 62});
  CHECK(read.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(read.status().message()), Catch::Contains("2^64 bytes"));
}

TEST_CASE("a tensor of more than 2^64 elements is refused", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("wrap.gguf");
  GgufWriter w;
  w.Tensor("wrap", {uint64_t{1} << 32, uint64_t{1} << 32}, 0, {});  // 2^64 elements: wraps to 0
  w.Write(path);
  auto file = GgufFile::Open(path);
  CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(file.status().message()),
             Catch::Contains("\"wrap\" has more than 2^64 elements"));
}

TEST_CASE("a tensor offset that wraps around the file is refused", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("far.gguf");
  GgufWriter w;
  // Data starts at byte 64; 64 + (2^64 - 64) wraps to 0, the file's first byte.
  w.TensorAt("far", {4}, 0, ~uint64_t{0} - 63);
  w.Write(path);
  auto file = GgufFile::Open(path);
  CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(file.status().message()), Catch::Contains("past the end"));
}

TEST_CASE("general.alignment must be a power of two that fits", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("a.gguf");
  for (double alignment : {1e300, -32.0, 48.0, 0.5}) {
    INFO("alignment " << alignment);
    GgufWriter w;
    w.Float64("general.alignment", alignment);
    w.Write(path);
    auto file = GgufFile::Open(path);
    CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(file.status().message()), Catch::Contains("general.alignment"));
  }
  GgufWriter w;
  w.Float64("general.alignment", 32.0);  // as the writer aligns
  w.Tensor("w", {2}, 0, Floats({1, 2}));
  w.Write(path);
  auto file = GgufFile::Open(path);
  REQUIRE(file.ok());
  CHECK(*(*file)->ReadFloat("w", {2}) == std::vector<float>{1, 2});
}

// UndefinedBehaviorSanitizer flagged the read (memcpy to a null destination).
TEST_CASE("a tensor with a zero dimension reads as empty", "[cpu]") {
  cachemgr::testing::TempDir dir;
  const std::string path = dir.file("empty.gguf");
  GgufWriter w;
  w.Tensor("empty", {0, 4}, 0, {});
  w.Write(path);
  auto file = GgufFile::Open(path);
  REQUIRE(file.ok());
  auto read = (*file)->ReadFloat("empty", {0, 4});
  REQUIRE(read.ok());
  CHECK(read->empty());
}

}  // namespace
}  // namespace cachemgr::engine
