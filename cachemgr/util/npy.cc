#include "cachemgr/util/npy.h"

#include <bit>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "cachemgr/util/status_macros.h"

// The element bytes are copied as they are stored; .npy data is little-endian.
static_assert(std::endian::native == std::endian::little, "npy.cc assumes a little-endian host");

namespace cachemgr {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
// numpy pads the header so that the data starts on a 64-byte boundary (format.py ARRAY_ALIGN).
constexpr size_t kAlignment = 64;

// Bytes per element of a supported descr, or 0.
size_t ItemSize(absl::string_view descr) {
  if (descr == "<f4" || descr == "<i4" || descr == "<u4") return 4;
  if (descr == "<f2") return 2;
  if (descr == "<i8") return 8;
  return 0;
}

constexpr absl::string_view kSupported = "'<f4', '<f2', '<i4', '<i8', '<u4'";

bool CountElements(const std::vector<uint64_t>& shape, uint64_t* count) {
  uint64_t n = 1;
  for (uint64_t dim : shape) {
    if (__builtin_mul_overflow(n, dim, &n)) return false;
  }
  *count = n;
  return true;
}

// A tiny parser for the header's Python dict literal, e.g.
// {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : text_(text) {}

  absl::Status Parse(std::string* descr, bool* fortran_order, std::vector<uint64_t>* shape) {
    bool seen_descr = false, seen_fortran = false, seen_shape = false;
    SkipSpace();
    if (!Consume('{')) return Error("expected '{'");
    while (true) {
      SkipSpace();
      if (Consume('}')) break;
      std::string key;
      RETURN_IF_ERROR(ParseString(&key));
      SkipSpace();
      if (!Consume(':')) return Error(absl::StrCat("expected ':' after '", key, "'"));
      SkipSpace();
      if (key == "descr") {
        RETURN_IF_ERROR(ParseString(descr));
        seen_descr = true;
      } else if (key == "fortran_order") {
        RETURN_IF_ERROR(ParseBool(fortran_order));
        seen_fortran = true;
      } else if (key == "shape") {
        RETURN_IF_ERROR(ParseShape(shape));
        seen_shape = true;
      } else {
        return Error(absl::StrCat("unexpected key '", key, "'"));
      }
      SkipSpace();
      if (Consume(',')) continue;
      SkipSpace();
      if (Consume('}')) break;
      return Error("expected ',' or '}'");
    }
    SkipSpace();
    if (pos_ != text_.size()) return Error("trailing characters after '}'");
    if (!seen_descr) return Error("missing 'descr'");
    if (!seen_fortran) return Error("missing 'fortran_order'");
    if (!seen_shape) return Error("missing 'shape'");
    return absl::OkStatus();
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed header at byte ", pos_, " (", what, "): ", text_));
  }
  void SkipSpace() {
    while (pos_ < text_.size() && absl::ascii_isspace(static_cast<unsigned char>(text_[pos_]))) {
      ++pos_;
    }
  }
  bool Consume(char c) {
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ConsumeWord(absl::string_view word) {
    if (text_.substr(pos_, word.size()) == word) {
      pos_ += word.size();
      return true;
    }
    return false;
  }
  absl::Status ParseString(std::string* out) {
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) {
      return Error("expected a quoted string");
    }
    const char quote = text_[pos_++];
    const size_t end = text_.find(quote, pos_);
    if (end == absl::string_view::npos) return Error("unterminated string");
    *out = std::string(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return absl::OkStatus();
  }
  absl::Status ParseBool(bool* out) {
    if (ConsumeWord("True")) {
      *out = true;
    } else if (ConsumeWord("False")) {
      *out = false;
    } else {
      return Error("expected True or False");
    }
    return absl::OkStatus();
  }
  absl::Status ParseShape(std::vector<uint64_t>* shape) {
    shape->clear();
    if (!Consume('(')) return Error("expected '(' for shape");
    while (true) {
      SkipSpace();
      if (Consume(')')) return absl::OkStatus();
      const size_t start = pos_;
      while (pos_ < text_.size() && absl::ascii_isdigit(static_cast<unsigned char>(text_[pos_]))) {
        ++pos_;
      }
      // numpy 1.x on some platforms writes dimensions with an 'L' suffix (Python 2 longs).
      uint64_t dim = 0;
      if (!absl::SimpleAtoi(text_.substr(start, pos_ - start), &dim)) {
        return Error("expected a non-negative integer dimension");
      }
      Consume('L');
      shape->push_back(dim);
      SkipSpace();
      if (Consume(',')) continue;
      SkipSpace();
      if (Consume(')')) return absl::OkStatus();
      return Error("expected ',' or ')' in shape");
    }
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

std::string ShapeLiteral(const std::vector<uint64_t>& shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

absl::Status FileError(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  const uint32_t exponent = (h >> 10) & 0x1f;
  const uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exactly representable in float.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, or nan keeping its payload
  } else {
    bits = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(bits);
}

template <typename T>
std::vector<float> ConvertElements(const NpyArray& array) {
  const size_t n = array.data.size() / sizeof(T);
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    T value;
    std::memcpy(&value, array.data.data() + i * sizeof(T), sizeof(T));
    if constexpr (std::is_same_v<T, uint16_t>) {
      out[i] = HalfToFloat(value);
    } else {
      out[i] = static_cast<float>(value);
    }
  }
  return out;
}

template <typename T>
NpyArray MakeArray(const char* descr, const std::vector<T>& values, std::vector<uint64_t> shape) {
  NpyArray array;
  array.dtype = descr;
  array.shape = std::move(shape);
  array.data.resize(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(array.data.data(), values.data(), array.data.size());
  return array;
}

}  // namespace

uint64_t NpyArray::num_elements() const {
  uint64_t n = 0;
  return CountElements(shape, &n) ? n : std::numeric_limits<uint64_t>::max();
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  FilePtr file(std::fopen(path.c_str(), "rb"));
  if (file == nullptr) {
    const int err = errno;
    const std::string what = absl::StrCat("cannot open: ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(absl::StrCat(path, ": ", what))
                         : FileError(path, what);
  }
  // Magic (6), version (2), header length (2 bytes in v1.0, 4 in v2.0/v3.0).
  uint8_t preamble[12];
  if (std::fread(preamble, 1, 10, file.get()) != 10) {
    return FileError(path, "truncated: shorter than the .npy preamble");
  }
  if (std::memcmp(preamble, kMagic, kMagicLen) != 0) {
    return FileError(path, "not a .npy file (bad magic)");
  }
  const uint8_t major = preamble[6], minor = preamble[7];
  uint64_t header_len = 0;
  size_t preamble_len = 10;
  if (major == 1) {
    header_len = preamble[8] | (static_cast<uint32_t>(preamble[9]) << 8);
  } else if (major == 2 || major == 3) {
    if (std::fread(preamble + 10, 1, 2, file.get()) != 2) {
      return FileError(path, "truncated: shorter than the .npy preamble");
    }
    header_len = preamble[8] | (static_cast<uint32_t>(preamble[9]) << 8) |
                 (static_cast<uint32_t>(preamble[10]) << 16) |
                 (static_cast<uint32_t>(preamble[11]) << 24);
    preamble_len = 12;
  } else {
    return FileError(path, absl::StrCat("unsupported .npy format version ", major, ".", minor,
                                        " (1.0, 2.0 and 3.0 are supported)"));
  }
  // The file size bounds everything allocated below: a corrupt length field must not make us
  // allocate gigabytes.
  if (std::fseek(file.get(), 0, SEEK_END) != 0) return FileError(path, "cannot seek");
  const long file_size = std::ftell(file.get());
  if (file_size < 0) return FileError(path, "cannot tell the file size");
  if (static_cast<uint64_t>(file_size) - preamble_len < header_len) {
    return FileError(
        path, absl::StrCat("truncated: header of ", header_len, " bytes, file ends inside it"));
  }
  if (std::fseek(file.get(), static_cast<long>(preamble_len), SEEK_SET) != 0) {
    return FileError(path, "cannot seek");
  }
  std::string header(header_len, '\0');
  if (header_len > 0 && std::fread(header.data(), 1, header_len, file.get()) != header_len) {
    return FileError(
        path, absl::StrCat("truncated: header of ", header_len, " bytes, file ends inside it"));
  }

  NpyArray array;
  bool fortran_order = false;
  absl::Status parsed = HeaderParser(header).Parse(&array.dtype, &fortran_order, &array.shape);
  if (!parsed.ok()) return FileError(path, parsed.message());
  const size_t item_size = ItemSize(array.dtype);
  if (item_size == 0) {
    return FileError(
        path, absl::StrCat("unsupported dtype '", array.dtype, "' (supported: ", kSupported, ")"));
  }
  if (fortran_order) {
    return FileError(path, "fortran_order=True is not supported (write a C-order array)");
  }
  uint64_t count = 0, data_bytes = 0;
  if (!CountElements(array.shape, &count) ||
      __builtin_mul_overflow(count, static_cast<uint64_t>(item_size), &data_bytes)) {
    return FileError(path, absl::StrCat("shape ", ShapeLiteral(array.shape), " is too large"));
  }

  // Compare with the file size first so a corrupt shape cannot make us allocate terabytes.
  const uint64_t data_offset = preamble_len + header_len;
  const uint64_t available =
      static_cast<uint64_t>(file_size) > data_offset ? file_size - data_offset : 0;
  if (available < data_bytes) {
    return FileError(
        path, absl::StrCat("truncated: shape ", ShapeLiteral(array.shape), " of ", array.dtype,
                           " needs ", data_bytes, " bytes of data, the file has ", available));
  }
  if (available > data_bytes) {
    return FileError(
        path, absl::StrCat("has ", available - data_bytes,
                           " trailing bytes after the data of shape ", ShapeLiteral(array.shape)));
  }
  if (std::fseek(file.get(), static_cast<long>(data_offset), SEEK_SET) != 0) {
    return FileError(path, "cannot seek");
  }
  array.data.resize(data_bytes);
  if (data_bytes > 0 && std::fread(array.data.data(), 1, data_bytes, file.get()) != data_bytes) {
    return FileError(path, "read error in the data");
  }
  return array;
}

absl::Status WriteNpy(const std::string& path, const NpyArray& array) {
  const size_t item_size = ItemSize(array.dtype);
  if (item_size == 0) {
    return FileError(path, absl::StrCat("cannot write unsupported dtype '", array.dtype,
                                        "' (supported: ", kSupported, ")"));
  }
  uint64_t count = 0;
  if (!CountElements(array.shape, &count) || count > array.data.size() / item_size ||
      count * item_size != array.data.size()) {
    return FileError(
        path, absl::StrCat("cannot write: shape ", ShapeLiteral(array.shape), " of ", array.dtype,
                           " does not match ", array.data.size(), " bytes of data"));
  }
  std::string header =
      absl::StrCat("{'descr': '", array.dtype,
                   "', 'fortran_order': False, 'shape': ", ShapeLiteral(array.shape), ", }");
  // Version 1.0 has a 2-byte header length; version 2.0 (4 bytes) only when it does not fit.
  size_t preamble_len = 10;
  uint8_t major = 1;
  if (header.size() + 1 + preamble_len + kAlignment > 0xffff) {
    preamble_len = 12;
    major = 2;
  }
  const size_t unpadded = preamble_len + header.size() + 1;  // + the terminating '\n'
  header.append((kAlignment - unpadded % kAlignment) % kAlignment, ' ');
  header.push_back('\n');
  const uint64_t header_len = header.size();

  std::string preamble(kMagic, kMagicLen);
  preamble.push_back(static_cast<char>(major));
  preamble.push_back(0);
  for (size_t i = 0; i < preamble_len - kMagicLen - 2; ++i) {
    preamble.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
  }

  FilePtr file(std::fopen(path.c_str(), "wb"));
  if (file == nullptr) {
    return FileError(path, absl::StrCat("cannot create: ", std::strerror(errno)));
  }
  if (std::fwrite(preamble.data(), 1, preamble.size(), file.get()) != preamble.size() ||
      std::fwrite(header.data(), 1, header.size(), file.get()) != header.size() ||
      (!array.data.empty() &&
       std::fwrite(array.data.data(), 1, array.data.size(), file.get()) != array.data.size())) {
    return FileError(path, absl::StrCat("write failed: ", std::strerror(errno)));
  }
  if (std::fclose(file.release()) != 0) {
    return FileError(path, absl::StrCat("write failed on close: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> NpyToFloat32(const NpyArray& array) {
  const size_t item_size = ItemSize(array.dtype);
  if (item_size == 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot convert dtype '", array.dtype,
                                                   "' to float32 (supported: ", kSupported, ")"));
  }
  uint64_t count = 0;
  if (!CountElements(array.shape, &count) || count > array.data.size() / item_size ||
      count * item_size != array.data.size()) {
    return absl::InvalidArgumentError(absl::StrCat("array of shape ", ShapeLiteral(array.shape),
                                                   " and dtype ", array.dtype, " has ",
                                                   array.data.size(), " bytes of data"));
  }
  if (array.dtype == "<f4") return ConvertElements<float>(array);
  if (array.dtype == "<f2") return ConvertElements<uint16_t>(array);
  if (array.dtype == "<i4") return ConvertElements<int32_t>(array);
  if (array.dtype == "<i8") return ConvertElements<int64_t>(array);
  return ConvertElements<uint32_t>(array);  // "<u4"
}

NpyArray NpyFromFloat32(const std::vector<float>& values, std::vector<uint64_t> shape) {
  return MakeArray("<f4", values, std::move(shape));
}

NpyArray NpyFromUint32(const std::vector<uint32_t>& values, std::vector<uint64_t> shape) {
  return MakeArray("<u4", values, std::move(shape));
}

NpyArray NpyFromInt32(const std::vector<int32_t>& values, std::vector<uint64_t> shape) {
  return MakeArray("<i4", values, std::move(shape));
}

}  // namespace cachemgr
