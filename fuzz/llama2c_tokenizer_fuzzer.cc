// Fuzzes the llama2.c tokenizer loader (tools/engine/tokenizer.h, LoadLlama2cTokenizer) and the
// tokenizer it builds. Input: a little-endian uint16 vocabulary size (as a checkpoint header
// would state it), then the tokenizer file.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "fuzz/model_check.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::fuzz {
namespace {

void FuzzOne(const uint8_t* data, size_t size) {
  static MemoryFile* input = new MemoryFile("fuzz-llama2c-tokenizer");
  if (size < 2) return;
  const uint32_t vocab_size = data[0] | (uint32_t{data[1]} << 8);
  auto tokenizer = engine::LoadLlama2cTokenizer(input->Write(data + 2, size - 2), vocab_size);
  if (!tokenizer.ok()) return;
  Check((*tokenizer)->vocab_size() == vocab_size, "vocabulary size differs from the asked one");
  ExerciseTokenizer(**tokenizer);
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::FuzzOne(data, size);
  return 0;
}
