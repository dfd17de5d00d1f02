// `cachemgrctl codebook`: BuildCodebook on one [n, dim] array, for tests and inspection.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/compress/codebook.h"
#include "cachemgr/util/npy.h"
#include "tools/cachemgrctl/commands.h"
#include "tools/cachemgrctl/files.h"
#include "tools/cachemgrctl/flags.h"

namespace cachemgr::ctl {
namespace {

constexpr char kCommand[] = "codebook";

struct CodebookOptions {
  std::string vectors_path;
  std::string out_dir;
  float theta = 0.0f;
};

absl::StatusOr<CodebookOptions> ParseOptions(const std::vector<std::string>& args) {
  absl::StatusOr<Flags> flags = Flags::Parse(args, {"vectors", "theta", "out"}, kCommand);
  if (!flags.ok()) return flags.status();
  CodebookOptions options;
  absl::StatusOr<std::string> vectors = flags->Required("vectors");
  if (!vectors.ok()) return vectors.status();
  absl::StatusOr<std::string> out = flags->Required("out");
  if (!out.ok()) return out.status();
  if (!flags->Has("theta")) return absl::InvalidArgumentError("missing required flag --theta");
  if (absl::Status s = flags->GetFloat("theta", &options.theta); !s.ok()) return s;
  if (!(options.theta > 0.0f && options.theta <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --theta must be in (0, 1], got ", *flags->Get("theta")));
  }
  options.vectors_path = *vectors;
  options.out_dir = *out;
  return options;
}

}  // namespace

int RunCodebook(const std::vector<std::string>& args) {
  absl::StatusOr<CodebookOptions> options = ParseOptions(args);
  if (!options.ok())
    return ReportError(kCommand, std::string(options.status().message()), kExitUsage);

  absl::StatusOr<FloatArray> vectors = LoadFloatArray(options->vectors_path, "vectors", 2);
  if (!vectors.ok())
    return ReportError(kCommand, std::string(vectors.status().message()), kExitFailure);
  const uint64_t n = vectors->shape[0];
  const uint64_t dim = vectors->shape[1];
  if (dim == 0 || dim > UINT32_MAX) {
    return ReportError(kCommand,
                       absl::StrCat("--vectors: ", vectors->path, " has shape ",
                                    ShapeString(vectors->shape), "; dim must be >= 1"),
                       kExitFailure);
  }
  absl::StatusOr<compress::Codebook> codebook =
      compress::BuildCodebook(vectors->values, static_cast<uint32_t>(dim), options->theta);
  if (!codebook.ok()) {
    return ReportError(kCommand, absl::StrCat(vectors->path, ": ", codebook.status().message()),
                       kExitFailure);
  }

  if (absl::Status s = PrepareOutputDir(options->out_dir); !s.ok()) {
    return ReportError(kCommand, std::string(s.message()), kExitFailure);
  }
  const std::string dir = options->out_dir + "/";
  for (const auto& [name, array] :
       {std::pair<std::string, NpyArray>{
            "entries.npy", NpyFromFloat32(codebook->entries, {codebook->size(), dim})},
        {"refs.npy", NpyFromUint32(codebook->refs, {n})},
        {"magnitudes.npy", NpyFromFloat32(codebook->magnitudes, {n})}}) {
    if (absl::Status s = WriteNpy(dir + name, array); !s.ok()) {
      return ReportError(kCommand, std::string(s.message()), kExitFailure);
    }
  }
  std::printf("%llu vectors of dim %llu, theta %g: %u entries -> %s\n",
              static_cast<unsigned long long>(n), static_cast<unsigned long long>(dim),
              options->theta, codebook->size(), options->out_dir.c_str());
  return kExitOk;
}

}  // namespace cachemgr::ctl
