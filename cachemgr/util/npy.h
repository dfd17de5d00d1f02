// Minimal .npy (NumPy format 1.0/2.0) reader and writer for the offline tools and reference
// tests: little-endian float32 ('<f4'), float16 ('<f2'), int32 ('<i4'), int64 ('<i8'),
// uint32 ('<u4'), C order only. Errors name the file and what is unsupported.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cachemgr {

struct NpyArray {
  std::string dtype;            // numpy descr, e.g. "<f4"
  std::vector<uint64_t> shape;  // empty for a scalar
  std::vector<uint8_t> data;    // raw little-endian bytes, C order
  uint64_t num_elements() const;
};

absl::StatusOr<NpyArray> ReadNpy(const std::string& path);
absl::Status WriteNpy(const std::string& path, const NpyArray& array);

// Converts any supported float/int dtype to float32 values (fp16 decoded exactly).
absl::StatusOr<std::vector<float>> NpyToFloat32(const NpyArray& array);
NpyArray NpyFromFloat32(const std::vector<float>& values, std::vector<uint64_t> shape);
NpyArray NpyFromUint32(const std::vector<uint32_t>& values, std::vector<uint64_t> shape);
NpyArray NpyFromInt32(const std::vector<int32_t>& values, std::vector<uint64_t> shape);

}  // namespace cachemgr
