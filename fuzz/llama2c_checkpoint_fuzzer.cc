// Fuzzes the llama2.c checkpoint loader (tools/engine/checkpoint.h, LoadLlama2c): the input is
// the file. Oracle besides the sanitizers: a loaded checkpoint's weights have the sizes its
// header implies, before and after the half-split permutation.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "fuzz/model_check.h"
#include "tools/engine/checkpoint.h"

namespace cachemgr::fuzz {
namespace {

void FuzzOne(const uint8_t* data, size_t size) {
  static MemoryFile* input = new MemoryFile("fuzz-llama2c");
  absl::StatusOr<engine::Checkpoint> ck = engine::LoadLlama2c(input->Write(data, size));
  if (!ck.ok()) return;
  CheckCheckpointSizes(*ck);
  engine::ToHalfSplit(*ck);
  CheckCheckpointSizes(*ck);
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::FuzzOne(data, size);
  return 0;
}
