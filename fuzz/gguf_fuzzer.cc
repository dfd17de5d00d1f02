// Fuzzes the GGUF reader and what the engine builds from a GGUF file (tools/engine): the input
// is the file. GgufFile::Open, every metadata getter and tensor read, the Llama checkpoint
// loader (LoadGguf, then the half-split permutation) and the tokenizer (TokenizerFromGguf, then
// encoding and decoding). Oracles besides the sanitizers: a tensor reads back as exactly its
// element count of floats; a loaded checkpoint's weights have the sizes its config implies.
#include <cstddef>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/model_check.h"
#include "tools/engine/checkpoint.h"
#include "tools/engine/gguf_file.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::fuzz {
namespace {

using engine::Checkpoint;
using engine::GgufFile;

void FuzzOne(const uint8_t* data, size_t size) {
  static MemoryFile* input = new MemoryFile("fuzz-gguf");
  const std::string& path = input->Write(data, size);
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::Open(path);
  if (!file.ok()) return;
  const GgufFile& f = **file;
  for (const char* key : {"general.architecture", "general.alignment", "llama.block_count",
                          "tokenizer.ggml.tokens", "tokenizer.ggml.scores"}) {
    (void)f.GetNumber(key);
    (void)f.GetString(key);
    (void)f.GetNumbers(key);
    (void)f.GetStrings(key);
  }
  for (const GgufFile::Tensor& t : f.tensors()) {
    absl::StatusOr<std::vector<float>> values = f.ReadFloat(t.name, t.dims);
    if (values.ok()) {
      Check(values->size() == t.elements(),
            absl::StrCat("tensor ", t.name, " read ", values->size(), " of ", t.elements()));
    }
  }
  if (absl::StatusOr<Checkpoint> ck = engine::LoadGguf(path); ck.ok()) {
    CheckCheckpointSizes(*ck);
    engine::ToHalfSplit(*ck);
    CheckCheckpointSizes(*ck);
  }
  if (auto tokenizer = engine::TokenizerFromGguf(f); tokenizer.ok()) {
    ExerciseTokenizer(**tokenizer);
  }
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::FuzzOne(data, size);
  return 0;
}
