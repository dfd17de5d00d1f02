// A minimal GGUF v3 writer for tests: metadata of the scalar, string and array kinds, and
// tensors whose bytes the test provides (already in their ggml type's encoding).
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace cachemgr::engine::testing {

class GgufWriter {
 public:
  void Uint32(const std::string& key, uint32_t v) { Key(key, 4), Put(v); }
  void Float32(const std::string& key, float v) { Key(key, 6), Put(v); }
  void Float64(const std::string& key, double v) { Key(key, 12), Put(v); }
  void Bool(const std::string& key, bool v) { Key(key, 7), Put(static_cast<uint8_t>(v)); }
  void String(const std::string& key, const std::string& v) { Key(key, 8), PutString(v); }
  void Strings(const std::string& key, const std::vector<std::string>& v) {
    Key(key, 9);
    Put(uint32_t{8});
    Put(static_cast<uint64_t>(v.size()));
    for (const std::string& s : v) PutString(s);
  }
  void Floats(const std::string& key, const std::vector<float>& v) {
    Key(key, 9);
    Put(uint32_t{6});
    Put(static_cast<uint64_t>(v.size()));
    for (float f : v) Put(f);
  }
  void Int32s(const std::string& key, const std::vector<int32_t>& v) {
    Key(key, 9);
    Put(uint32_t{5});
    Put(static_cast<uint64_t>(v.size()));
    for (int32_t x : v) Put(x);
  }
  // ne[0] first; `data` in the type's encoding.
  void Tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type,
              std::vector<uint8_t> data) {
    tensors_.push_back({name, std::move(dims), type, std::move(data), std::nullopt});
  }
  // A tensor whose info states `offset` (into the data section) and whose data is not written.
  void TensorAt(const std::string& name, std::vector<uint64_t> dims, uint32_t type,
                uint64_t offset) {
    tensors_.push_back({name, std::move(dims), type, {}, offset});
  }

  // Writes the file; `truncate_to` > 0 cuts it to that many bytes.
  void Write(const std::string& path, size_t truncate_to = 0, uint32_t version = 3) const {
    std::string out = "GGUF";
    Append(out, version);
    Append(out, static_cast<uint64_t>(tensors_.size()));
    Append(out, static_cast<uint64_t>(kv_count_));
    out += kv_;
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (const auto& t : tensors_) {
      Append(out, static_cast<uint64_t>(t.name.size()));
      out += t.name;
      Append(out, static_cast<uint32_t>(t.dims.size()));
      for (uint64_t d : t.dims) Append(out, d);
      Append(out, t.type);
      Append(out, t.stated_offset.value_or(offset));
      offsets.push_back(offset);
      offset += (t.data.size() + 31) / 32 * 32;
    }
    out.resize((out.size() + 31) / 32 * 32, '\0');
    for (size_t i = 0; i < tensors_.size(); ++i) {
      std::string data(tensors_[i].data.begin(), tensors_[i].data.end());
      data.resize((data.size() + 31) / 32 * 32, '\0');
      out += data;
    }
    if (truncate_to > 0) out.resize(truncate_to);
    std::ofstream(path, std::ios::binary)
        .write(out.data(), static_cast<std::streamsize>(out.size()));
  }

 private:
  struct T {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type;
    std::vector<uint8_t> data;
    std::optional<uint64_t> stated_offset;
  };
  template <typename V>
  static void Append(std::string& s, V v) {
    char b[sizeof(V)];
    std::memcpy(b, &v, sizeof(V));
    s.append(b, sizeof(V));
  }
  template <typename V>
  void Put(V v) {
    Append(kv_, v);
  }
  void PutString(const std::string& v) {
    Put(static_cast<uint64_t>(v.size()));
    kv_ += v;
  }
  void Key(const std::string& key, uint32_t type) {
    ++kv_count_;
    PutString(key);
    Put(type);
  }

  std::string kv_;
  size_t kv_count_ = 0;
  std::vector<T> tensors_;
};

}  // namespace cachemgr::engine::testing
