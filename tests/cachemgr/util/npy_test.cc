#include "cachemgr/util/npy.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "tests/support/allocation_cap.h"
#include "tests/support/temp_dir.h"

namespace cachemgr {
namespace {

using ::cachemgr::testing::AllocationCap;
using ::cachemgr::testing::TempDir;

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
NpyArray RawArray(const char* dtype, const std::vector<T>& values, std::vector<uint64_t> shape) {
  NpyArray array;
  array.dtype = dtype;
  array.shape = std::move(shape);
  array.data.resize(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(array.data.data(), values.data(), array.data.size());
  return array;
}

// A v1.0 (2-byte length) or v2.0 (4-byte length) file around `header`, padded like numpy.
std::string NpyBytes(const std::string& header, int major, const std::string& data) {
  const size_t preamble = major == 1 ? 10 : 12;
  std::string padded = header;
  while ((preamble + padded.size() + 1) % 64 != 0) padded.push_back(' ');
  padded.push_back('\n');
  std::string out("\x93NUMPY", 6);
  out.push_back(static_cast<char>(major));
  out.push_back(0);
  for (size_t i = 0; i < preamble - 8; ++i) {
    out.push_back(static_cast<char>((padded.size() >> (8 * i)) & 0xff));
  }
  return out + padded + data;
}

std::string FloatBytes(const std::vector<float>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
}

void CheckRoundTrip(const TempDir& dir, const NpyArray& array) {
  const std::string path = dir.file("a.npy");
  REQUIRE(WriteNpy(path, array).ok());
  const std::string bytes = ReadBytes(path);
  // Data starts on a 64-byte boundary, after a header that ends in '\n'.
  const size_t data_offset = bytes.size() - array.data.size();
  CHECK(data_offset % 64 == 0);
  CHECK(bytes[data_offset - 1] == '\n');
  CHECK(bytes.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));

  absl::StatusOr<NpyArray> read = ReadNpy(path);
  REQUIRE(read.ok());
  CHECK(read->dtype == array.dtype);
  CHECK(read->shape == array.shape);
  CHECK(read->data == array.data);
}

TEST_CASE("npy round trip of every dtype and shape", "[cpu]") {
  TempDir dir;
  const std::vector<std::vector<uint64_t>> shapes = {{}, {5}, {2, 3, 4}, {0, 3}};
  for (const auto& shape : shapes) {
    uint64_t n = 1;
    for (uint64_t d : shape) n *= d;
    INFO("elements " << n);
    std::vector<float> f(n);
    std::vector<uint32_t> u(n);
    std::vector<int32_t> i32(n);
    std::vector<int64_t> i64(n);
    std::vector<uint16_t> f16(n);
    for (uint64_t k = 0; k < n; ++k) {
      f[k] = 0.25f * static_cast<float>(k) - 3.0f;
      u[k] = 4000000000u - static_cast<uint32_t>(k);
      i32[k] = -static_cast<int32_t>(k) * 1000;
      i64[k] = -(int64_t{1} << 40) + static_cast<int64_t>(k);
      f16[k] = static_cast<uint16_t>(0x3c00 + k);
    }
    CheckRoundTrip(dir, NpyFromFloat32(f, shape));
    CheckRoundTrip(dir, NpyFromUint32(u, shape));
    CheckRoundTrip(dir, NpyFromInt32(i32, shape));
    CheckRoundTrip(dir, RawArray("<i8", i64, shape));
    CheckRoundTrip(dir, RawArray("<f2", f16, shape));
  }
}

TEST_CASE("npy header text matches numpy's", "[cpu]") {
  TempDir dir;
  const std::string path = dir.file("a.npy");
  REQUIRE(WriteNpy(path, NpyFromFloat32({1, 2, 3}, {3})).ok());
  const std::string bytes = ReadBytes(path);
  const std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
  CHECK(bytes.substr(10, header.size()) == header);
  REQUIRE(WriteNpy(path, NpyFromFloat32({}, {0, 2, 1})).ok());
  CHECK(ReadBytes(path).find("'shape': (0, 2, 1), }") != std::string::npos);
}

TEST_CASE("npy hand-written v1.0 and v2.0 headers parse", "[cpu]") {
  TempDir dir;
  const std::string path = dir.file("h.npy");
  WriteBytes(path, NpyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }", 1,
                            FloatBytes({1.5f, -2.0f})));
  absl::StatusOr<NpyArray> a = ReadNpy(path);
  REQUIRE(a.ok());
  CHECK(a->dtype == "<f4");
  CHECK(a->shape == std::vector<uint64_t>{2, 1});
  CHECK(*NpyToFloat32(*a) == std::vector<float>{1.5f, -2.0f});

  // Other key order, double quotes, no trailing comma, Python-2 long suffix, version 2.0.
  WriteBytes(path, NpyBytes(R"({"shape": (3L,), "fortran_order": False, "descr": "<f4"})", 2,
                            FloatBytes({1, 2, 3})));
  a = ReadNpy(path);
  REQUIRE(a.ok());
  CHECK(a->shape == std::vector<uint64_t>{3});
  CHECK(*NpyToFloat32(*a) == std::vector<float>{1, 2, 3});

  // A scalar.
  WriteBytes(path, NpyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 1,
                            FloatBytes({7})));
  a = ReadNpy(path);
  REQUIRE(a.ok());
  CHECK(a->shape.empty());
  CHECK(a->num_elements() == 1);
}

TEST_CASE("npy rejects what it does not support, naming the file", "[cpu]") {
  TempDir dir;
  const std::string path = dir.file("bad.npy");
  auto error_of = [&](const std::string& bytes) {
    WriteBytes(path, bytes);
    absl::StatusOr<NpyArray> a = ReadNpy(path);
    REQUIRE_FALSE(a.ok());
    const std::string message(a.status().message());
    CHECK(message.find(path) != std::string::npos);
    return message;
  };
  CHECK(error_of(NpyBytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 1,
                          FloatBytes({1, 2, 3, 4})))
            .find("fortran_order") != std::string::npos);
  CHECK(error_of(NpyBytes("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", 1,
                          FloatBytes({1})))
            .find("'>f4'") != std::string::npos);
  CHECK(error_of(NpyBytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", 1,
                          std::string(8, '\0')))
            .find("'<f8'") != std::string::npos);
  CHECK(error_of(NpyBytes("{'descr': '<f4', 'shape': (1,), }", 1, FloatBytes({1})))
            .find("fortran_order") != std::string::npos);
  CHECK(error_of(NpyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 1,
                          FloatBytes({1, 2})))
            .find("trailing") != std::string::npos);
  CHECK(error_of("PK\x03\x04 not npy").find("magic") != std::string::npos);
  CHECK(error_of(std::string("\x93NUMPY\x04\x00\x10\x00", 10)).find("version") !=
        std::string::npos);
}

TEST_CASE("npy truncated files are errors naming the file", "[cpu]") {
  TempDir dir;
  const std::string path = dir.file("full.npy");
  REQUIRE(WriteNpy(path, NpyFromFloat32({1, 2, 3, 4}, {2, 2})).ok());
  const std::string bytes = ReadBytes(path);
  for (size_t keep : {size_t{0}, size_t{5}, size_t{30}, bytes.size() - 1, bytes.size() - 8}) {
    INFO("kept " << keep << " bytes");
    const std::string cut = dir.file("cut.npy");
    WriteBytes(cut, bytes.substr(0, keep));
    absl::StatusOr<NpyArray> a = ReadNpy(cut);
    REQUIRE_FALSE(a.ok());
    const std::string message(a.status().message());
    CHECK(message.find(cut) != std::string::npos);
    CHECK(message.find("truncated") != std::string::npos);
  }
  absl::StatusOr<NpyArray> missing = ReadNpy(dir.file("missing.npy"));
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(missing.status().message()).find("missing.npy") != std::string::npos);
}

// Found by fuzz/npy_fuzzer.cc (fuzz/corpus/npy/oom-header-length): a v2.0 header length of up
// to 4 GiB was allocated before the file was seen to end first.
TEST_CASE("npy header length beyond the file is refused before it is allocated", "[cpu]") {
  TempDir dir;
  const std::string path = dir.file("long-header.npy");
  WriteBytes(path, std::string("\x93NUMPY\x02\x00\xff\xff\xff\xff{}", 14));
  AllocationCap cap(uint64_t{64} << 20);
  absl::StatusOr<NpyArray> a = ReadNpy(path);
  REQUIRE_FALSE(a.ok());
  CHECK(a.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(a.status().message()),
             Catch::Contains("header of 4294967295 bytes, file ends inside it"));
}

TEST_CASE("npy write errors name the file", "[cpu]") {
  TempDir dir;
  absl::Status status = WriteNpy(dir.file("no/such/dir/a.npy"), NpyFromFloat32({1}, {1}));
  REQUIRE_FALSE(status.ok());
  CHECK(std::string(status.message()).find("no/such/dir/a.npy") != std::string::npos);
  status = WriteNpy(dir.file("a.npy"), NpyFromFloat32({1, 2}, {3}));  // shape/data mismatch
  REQUIRE_FALSE(status.ok());
  CHECK(std::string(status.message()).find("a.npy") != std::string::npos);
}

TEST_CASE("fp16 decodes exactly, subnormals, infinities and nans included", "[cpu]") {
  const std::vector<uint16_t> halves = {0x3c00, 0xc000, 0x0001, 0x03ff, 0x0400, 0x7bff,
                                        0x7c00, 0xfc00, 0x8000, 0x3555, 0x7e00, 0xfe01};
  absl::StatusOr<std::vector<float>> f = NpyToFloat32(RawArray("<f2", halves, {halves.size()}));
  REQUIRE(f.ok());
  const std::vector<float>& v = *f;
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == -2.0f);
  CHECK(v[2] == std::ldexp(1.0f, -24));     // smallest subnormal
  CHECK(v[3] == std::ldexp(1023.0f, -24));  // largest subnormal
  CHECK(v[4] == std::ldexp(1.0f, -14));     // smallest normal
  CHECK(v[5] == 65504.0f);                  // largest finite
  CHECK(v[6] == std::numeric_limits<float>::infinity());
  CHECK(v[7] == -std::numeric_limits<float>::infinity());
  CHECK(v[8] == 0.0f);
  CHECK(std::signbit(v[8]));
  CHECK(v[9] == 0.333251953125f);  // 0x3555
  CHECK(std::isnan(v[10]));
  CHECK(std::isnan(v[11]));
  CHECK(std::signbit(v[11]));
}

TEST_CASE("integer dtypes convert to float32", "[cpu]") {
  CHECK(*NpyToFloat32(RawArray<int64_t>("<i8", {-3, 1 << 20}, {2})) ==
        std::vector<float>{-3.0f, 1048576.0f});
  CHECK(*NpyToFloat32(NpyFromInt32({-7, 9}, {2})) == std::vector<float>{-7.0f, 9.0f});
  CHECK(*NpyToFloat32(NpyFromUint32({4000000000u}, {1})) == std::vector<float>{4.0e9f});
  NpyArray bad = NpyFromFloat32({1, 2}, {3});
  CHECK_FALSE(NpyToFloat32(bad).ok());
}

}  // namespace
}  // namespace cachemgr
