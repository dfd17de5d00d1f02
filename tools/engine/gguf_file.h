// GgufFile: a read-only view of a GGUF (v2 / v3) file: its metadata and its tensors, memory
// mapped. Tensor data is dequantized to float32 on request (quant.h).
//
// Layout (gguf.md in ggml): "GGUF", u32 version, u64 tensor count, u64 metadata count; metadata
// as (string key, u32 value type, value); tensor infos as (string name, u32 n_dims, u64 ne[n],
// u32 ggml type, u64 offset); then, aligned to general.alignment (default 32), the data, each
// tensor at its offset. ne[0] is the innermost (contiguous) dimension: a 2-D tensor with
// ne = {cols, rows} is row-major [rows, cols].
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace cachemgr::engine {

// A metadata value: a scalar (number, bool, string) or an array of numbers or strings.
struct GgufValue {
  enum class Kind { kNumber, kBool, kString, kNumberArray, kStringArray };
  Kind kind = Kind::kNumber;
  double number = 0.0;  // every integer type up to 2^53 and both float types
  bool boolean = false;
  std::string string;
  std::vector<double> numbers;
  std::vector<std::string> strings;
};

class GgufFile {
 public:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> dims;  // ne[0] first
    uint32_t type = 0;
    const std::byte* data = nullptr;
    uint64_t bytes = 0;
    uint64_t elements() const;
  };

  // INVALID_ARGUMENT for a file that is not GGUF v2/v3 or whose header or tensor table runs
  // past its end; NOT_FOUND when it cannot be opened.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  const GgufValue* Find(absl::string_view key) const;
  // Typed getters: NOT_FOUND naming the key, INVALID_ARGUMENT for another kind.
  absl::StatusOr<double> GetNumber(absl::string_view key) const;
  absl::StatusOr<std::string> GetString(absl::string_view key) const;
  absl::StatusOr<const std::vector<double>*> GetNumbers(absl::string_view key) const;
  absl::StatusOr<const std::vector<std::string>*> GetStrings(absl::string_view key) const;

  const std::vector<Tensor>& tensors() const { return tensors_; }
  const Tensor* FindTensor(absl::string_view name) const;
  // The tensor dequantized to float32, checking its dims against `dims` (ne[0] first).
  absl::StatusOr<std::vector<float>> ReadFloat(absl::string_view name,
                                               const std::vector<uint64_t>& dims) const;

 private:
  GgufFile() = default;

  std::string path_;
  uint32_t version_ = 0;
  const std::byte* map_ = nullptr;
  size_t map_bytes_ = 0;
  absl::flat_hash_map<std::string, GgufValue> metadata_;
  std::vector<Tensor> tensors_;
  absl::flat_hash_map<std::string, size_t> tensor_index_;
};

}  // namespace cachemgr::engine
