// File plumbing shared by cachemgrctl's offline subcommands: loading .npy inputs as float32,
// preparing the output directory, writing outputs. Every error names the file (and, for inputs,
// the flag that named it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cachemgr/util/npy.h"

namespace cachemgr::ctl {

struct FloatArray {
  std::string path;
  std::vector<uint64_t> shape;
  std::vector<float> values;  // C order
};

// Reads `path` (given by --`flag`) and converts it to float32. The array must have `rank`
// dimensions; INVALID_ARGUMENT otherwise, as for unsupported dtypes.
absl::StatusOr<FloatArray> LoadFloatArray(const std::string& path, const std::string& flag,
                                          size_t rank);

// Reads an integer vector of `length` entries (int32, int64 or uint32) whose values fit in
// uint32 (token positions).
absl::StatusOr<std::vector<uint32_t>> LoadUint32Vector(const std::string& path,
                                                       const std::string& flag, uint64_t length);

// "[2, 3, 4]".
std::string ShapeString(const std::vector<uint64_t>& shape);

// Creates `dir` (and parents) if needed and removes the files a previous run of cachemgrctl
// left there (stats.json, layer<N>_*.npy, entries/refs/magnitudes.npy), so no stale output of
// another configuration survives. Other files are left alone.
absl::Status PrepareOutputDir(const std::string& dir);

absl::Status WriteTextFile(const std::string& path, const std::string& contents);

}  // namespace cachemgr::ctl
