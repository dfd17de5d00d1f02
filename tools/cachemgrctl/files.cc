#include "tools/cachemgrctl/files.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace cachemgr::ctl {

std::string ShapeString(const std::vector<uint64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<FloatArray> LoadFloatArray(const std::string& path, const std::string& flag,
                                          size_t rank) {
  absl::StatusOr<NpyArray> array = ReadNpy(path);
  if (!array.ok()) {
    return absl::Status(array.status().code(),
                        absl::StrCat("--", flag, ": ", array.status().message()));
  }
  if (array->shape.size() != rank) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " has shape ",
                                                   ShapeString(array->shape), ", expected ", rank,
                                                   " dimensions"));
  }
  absl::StatusOr<std::vector<float>> values = NpyToFloat32(*array);
  if (!values.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": ", path, ": ", values.status().message()));
  }
  FloatArray out;
  out.path = path;
  out.shape = std::move(array->shape);
  out.values = std::move(*values);
  return out;
}

absl::StatusOr<std::vector<uint32_t>> LoadUint32Vector(const std::string& path,
                                                       const std::string& flag, uint64_t length) {
  absl::StatusOr<NpyArray> array = ReadNpy(path);
  if (!array.ok()) {
    return absl::Status(array.status().code(),
                        absl::StrCat("--", flag, ": ", array.status().message()));
  }
  if (array->shape != std::vector<uint64_t>{length}) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " has shape ",
                                                   ShapeString(array->shape), ", expected [",
                                                   length, "]"));
  }
  std::vector<uint32_t> out(length);
  for (uint64_t i = 0; i < length; ++i) {
    int64_t value = 0;
    if (array->dtype == "<i4") {
      int32_t v;
      std::memcpy(&v, array->data.data() + 4 * i, 4);
      value = v;
    } else if (array->dtype == "<u4") {
      uint32_t v;
      std::memcpy(&v, array->data.data() + 4 * i, 4);
      value = v;
    } else if (array->dtype == "<i8") {
      std::memcpy(&value, array->data.data() + 8 * i, 8);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " has dtype ",
                                                     array->dtype,
                                                     ", expected int32, int64 or uint32"));
    }
    if (value < 0 || value > int64_t{UINT32_MAX}) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": ", path, "[", i, "] = ", value, " is not a valid position"));
    }
    out[i] = static_cast<uint32_t>(value);
  }
  return out;
}

absl::Status PrepareOutputDir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code error;
  fs::create_directories(dir, error);
  if (error) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out: cannot create directory ", dir, ": ", error.message()));
  }
  static const std::regex kOurs(
      R"(stats\.json|entries\.npy|refs\.npy|magnitudes\.npy|layer[0-9]+_.*\.npy)");
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, error)) {
    if (!entry.is_regular_file()) continue;
    if (std::regex_match(entry.path().filename().string(), kOurs)) {
      fs::remove(entry.path(), error);
      if (error) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--out: cannot remove old output ", entry.path().string(), ": ", error.message()));
      }
    }
  }
  if (error) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out: cannot list directory ", dir, ": ", error.message()));
  }
  return absl::OkStatus();
}

absl::Status WriteTextFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  out.close();
  if (!out) {
    return absl::InternalError(absl::StrCat(path, ": write failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace cachemgr::ctl
