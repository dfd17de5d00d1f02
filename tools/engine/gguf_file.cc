#include "tools/engine/gguf_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/quant.h"

namespace cachemgr::engine {
namespace {

enum ValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

// Bounds-checked little-endian reader over the mapping.
class Reader {
 public:
  Reader(const std::byte* data, size_t size, std::string path)
      : data_(data), size_(size), path_(std::move(path)) {}

  size_t offset() const { return at_; }

  template <typename T>
  absl::Status Read(T* out) {
    if (size_ - at_ < sizeof(T)) return Truncated();
    std::memcpy(out, data_ + at_, sizeof(T));
    at_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status ReadString(std::string* out) {
    uint64_t n = 0;
    RETURN_IF_ERROR(Read(&n));
    if (size_ - at_ < n) return Truncated();
    out->assign(reinterpret_cast<const char*>(data_ + at_), n);
    at_ += n;
    return absl::OkStatus();
  }

  absl::Status Truncated() const {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": truncated GGUF header at byte ", at_, " of ", size_));
  }

 private:
  const std::byte* data_;
  size_t size_;
  size_t at_ = 0;
  std::string path_;
};

absl::Status ReadNumber(Reader& r, uint32_t type, double* out) {
  switch (type) {
#define CACHEMGR_GGUF_NUMBER(id, T) \
  case id: {                        \
    T v{};                          \
    RETURN_IF_ERROR(r.Read(&v));    \
    *out = static_cast<double>(v);  \
    return absl::OkStatus();        \
  }
    CACHEMGR_GGUF_NUMBER(kU8, uint8_t)
    CACHEMGR_GGUF_NUMBER(kI8, int8_t)
    CACHEMGR_GGUF_NUMBER(kU16, uint16_t)
    CACHEMGR_GGUF_NUMBER(kI16, int16_t)
    CACHEMGR_GGUF_NUMBER(kU32, uint32_t)
    CACHEMGR_GGUF_NUMBER(kI32, int32_t)
    CACHEMGR_GGUF_NUMBER(kF32, float)
    CACHEMGR_GGUF_NUMBER(kU64, uint64_t)
    CACHEMGR_GGUF_NUMBER(kI64, int64_t)
    CACHEMGR_GGUF_NUMBER(kF64, double)
#undef CACHEMGR_GGUF_NUMBER
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown GGUF value type ", type));
  }
}

absl::Status ReadValue(Reader& r, uint32_t type, GgufValue* v) {
  if (type == kString) {
    v->kind = GgufValue::Kind::kString;
    return r.ReadString(&v->string);
  }
  if (type == kBool) {
    uint8_t b = 0;
    RETURN_IF_ERROR(r.Read(&b));
    v->kind = GgufValue::Kind::kBool;
    v->boolean = b != 0;
    return absl::OkStatus();
  }
  if (type == kArray) {
    uint32_t elem = 0;
    uint64_t n = 0;
    RETURN_IF_ERROR(r.Read(&elem));
    RETURN_IF_ERROR(r.Read(&n));
    if (elem == kString) {
      v->kind = GgufValue::Kind::kStringArray;
      for (uint64_t i = 0; i < n; ++i) {
        std::string s;
        RETURN_IF_ERROR(r.ReadString(&s));
        v->strings.push_back(std::move(s));
      }
      return absl::OkStatus();
    }
    if (elem == kArray) return absl::InvalidArgumentError("nested GGUF arrays are not supported");
    v->kind = GgufValue::Kind::kNumberArray;
    for (uint64_t i = 0; i < n; ++i) {
      double x = 0;
      if (elem == kBool) {
        uint8_t b = 0;
        RETURN_IF_ERROR(r.Read(&b));
        x = b;
      } else {
        RETURN_IF_ERROR(ReadNumber(r, elem, &x));
      }
      v->numbers.push_back(x);
    }
    return absl::OkStatus();
  }
  v->kind = GgufValue::Kind::kNumber;
  return ReadNumber(r, type, &v->number);
}

}  // namespace

uint64_t GgufFile::Tensor::elements() const {
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;  // Open refused tensors whose count overflows
  return n;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size < 24) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is too short to be a GGUF file"));
  }
  void* map = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot map ", path, ": ", strerror(errno)));
  }
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  file->map_ = static_cast<const std::byte*>(map);
  file->map_bytes_ = static_cast<size_t>(st.st_size);

  Reader r(file->map_, file->map_bytes_, path);
  char magic[4];
  RETURN_IF_ERROR(r.Read(&magic));
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a GGUF file (bad magic)"));
  }
  RETURN_IF_ERROR(r.Read(&file->version_));
  if (file->version_ != 2 && file->version_ != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": GGUF version ", file->version_, " is not supported (2 or 3)"));
  }
  uint64_t num_tensors = 0, num_kv = 0;
  RETURN_IF_ERROR(r.Read(&num_tensors));
  RETURN_IF_ERROR(r.Read(&num_kv));
  if (num_tensors > (1u << 20) || num_kv > (1u << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": implausible counts (", num_tensors,
                                                   " tensors, ", num_kv, " metadata entries)"));
  }
  for (uint64_t i = 0; i < num_kv; ++i) {
    std::string key;
    uint32_t type = 0;
    RETURN_IF_ERROR(r.ReadString(&key));
    RETURN_IF_ERROR(r.Read(&type));
    GgufValue value;
    if (absl::Status s = ReadValue(r, type, &value); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": metadata \"", key, "\": ", s.message()));
    }
    file->metadata_[key] = std::move(value);
  }
  struct Info {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type = 0;
    uint64_t offset = 0;
  };
  std::vector<Info> infos(num_tensors);
  for (Info& info : infos) {
    uint32_t n_dims = 0;
    RETURN_IF_ERROR(r.ReadString(&info.name));
    RETURN_IF_ERROR(r.Read(&n_dims));
    if (n_dims == 0 || n_dims > 4) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor \"", info.name, "\" has ", n_dims, " dimensions"));
    }
    info.dims.resize(n_dims);
    uint64_t elements = 1;
    for (uint64_t& d : info.dims) {
      RETURN_IF_ERROR(r.Read(&d));
      if (__builtin_mul_overflow(elements, d, &elements)) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor \"", info.name, "\" has more than 2^64 elements"));
      }
    }
    RETURN_IF_ERROR(r.Read(&info.type));
    RETURN_IF_ERROR(r.Read(&info.offset));
  }
  uint64_t alignment = 32;
  if (const GgufValue* a = file->Find("general.alignment"); a != nullptr) {
    // A power of two up to 2^30 (ggml writes 32); checked as a double before any conversion.
    const double value = a->number;
    alignment = a->kind == GgufValue::Kind::kNumber && value >= 1 && value <= (1u << 30)
                    ? static_cast<uint64_t>(value)
                    : 0;
    if (alignment == 0 || alignment != value || (alignment & (alignment - 1)) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": bad general.alignment ", value));
    }
  }
  const uint64_t data_start = (r.offset() + alignment - 1) / alignment * alignment;
  for (Info& info : infos) {
    Tensor t;
    t.name = std::move(info.name);
    t.dims = std::move(info.dims);
    t.type = info.type;
    uint64_t bytes = 0;
    // Unsupported types are listed (bytes 0) and refused when read.
    if (GgmlRowBytes(t.type, t.elements(), &bytes).ok()) {
      // Written so that no sum can wrap: offsets come from the file.
      if (data_start > file->map_bytes_ || info.offset > file->map_bytes_ - data_start ||
          bytes > file->map_bytes_ - data_start - info.offset) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor \"", t.name, "\" runs past the end of the file"));
      }
      t.data = file->map_ + data_start + info.offset;
      t.bytes = bytes;
    }
    file->tensor_index_[t.name] = file->tensors_.size();
    file->tensors_.push_back(std::move(t));
  }
  return file;
}

GgufFile::~GgufFile() {
  if (map_ != nullptr) munmap(const_cast<std::byte*>(map_), map_bytes_);
}

const GgufValue* GgufFile::Find(absl::string_view key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

absl::StatusOr<double> GgufFile::GetNumber(absl::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no metadata \"", key, "\""));
  if (v->kind == GgufValue::Kind::kBool) return v->boolean ? 1.0 : 0.0;
  if (v->kind != GgufValue::Kind::kNumber) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": \"", key, "\" is not a number"));
  }
  return v->number;
}

absl::StatusOr<std::string> GgufFile::GetString(absl::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no metadata \"", key, "\""));
  if (v->kind != GgufValue::Kind::kString) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": \"", key, "\" is not a string"));
  }
  return v->string;
}

absl::StatusOr<const std::vector<double>*> GgufFile::GetNumbers(absl::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no metadata \"", key, "\""));
  if (v->kind != GgufValue::Kind::kNumberArray) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": \"", key, "\" is not an array of numbers"));
  }
  return &v->numbers;
}

absl::StatusOr<const std::vector<std::string>*> GgufFile::GetStrings(absl::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no metadata \"", key, "\""));
  if (v->kind != GgufValue::Kind::kStringArray) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": \"", key, "\" is not an array of strings"));
  }
  return &v->strings;
}

const GgufFile::Tensor* GgufFile::FindTensor(absl::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::vector<float>> GgufFile::ReadFloat(absl::string_view name,
                                                       const std::vector<uint64_t>& dims) const {
  const Tensor* t = FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no tensor \"", name, "\""));
  if (t->dims != dims) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor \"", name, "\" has ne [",
                                                   absl::StrJoin(t->dims, ", "), "], expected [",
                                                   absl::StrJoin(dims, ", "), "]"));
  }
  uint64_t bytes = 0;
  if (absl::Status s = GgmlRowBytes(t->type, t->elements(), &bytes); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path_, ": tensor \"", name, "\": ", s.message()));
  }
  std::vector<float> out(t->elements());
  Dequantize(t->type, t->data, absl::MakeSpan(out));
  return out;
}

}  // namespace cachemgr::engine
