// Fuzzes the .npy reader (cachemgr/util/npy.h) with the input as the file. Oracles besides the
// sanitizers: an array that reads back has exactly the bytes its shape and dtype describe,
// converts to that many floats, and survives a write/read round trip unchanged.
#include <cstddef>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/npy.h"
#include "fuzz/fuzz_util.h"

namespace cachemgr::fuzz {
namespace {

size_t ItemSize(const std::string& dtype) {
  if (dtype == "<f2") return 2;
  if (dtype == "<i8") return 8;
  return 4;
}

void FuzzOne(const uint8_t* data, size_t size) {
  static MemoryFile* input = new MemoryFile("fuzz-npy-in");
  static MemoryFile* output = new MemoryFile("fuzz-npy-out");
  absl::StatusOr<NpyArray> array = ReadNpy(input->Write(data, size));
  if (!array.ok()) {
    Check(!array.status().message().empty(), "an error without a message");
    return;
  }
  const uint64_t elements = array->num_elements();
  Check(array->data.size() / ItemSize(array->dtype) == elements &&
            array->data.size() % ItemSize(array->dtype) == 0,
        absl::StrCat("read ", array->data.size(), " bytes for ", elements, " elements"));
  absl::StatusOr<std::vector<float>> floats = NpyToFloat32(*array);
  Check(floats.ok() && floats->size() == elements, "a read array does not convert to float32");
  Check(WriteNpy(output->path(), *array).ok(), "a read array cannot be written back");
  absl::StatusOr<NpyArray> again = ReadNpy(output->path());
  Check(again.ok() && again->dtype == array->dtype && again->shape == array->shape &&
            again->data == array->data,
        "write/read round trip changed the array");
}

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::FuzzOne(data, size);
  return 0;
}
