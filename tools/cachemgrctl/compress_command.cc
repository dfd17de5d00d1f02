// `cachemgrctl compress`: loads K/V (and Q or S) from .npy files, runs CompressSequence, and
// writes what each layer kept (and its codebooks) plus stats.json. docs/OFFLINE.md documents
// the files.
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/compress/compress.h"
#include "cachemgr/util/npy.h"
#include "cachemgr/util/status_macros.h"
#include "tools/cachemgrctl/commands.h"
#include "tools/cachemgrctl/compress_options.h"
#include "tools/cachemgrctl/files.h"
#include "tools/cachemgrctl/json_output.h"

namespace cachemgr::ctl {
namespace {

constexpr char kCommand[] = "compress";

// The loaded inputs; `input` points into the arrays.
struct LoadedSequence {
  FloatArray keys;
  FloatArray values;
  FloatArray queries;  // empty when scores (or nothing) are given
  FloatArray scores;
  compress::ModelShape shape;
  compress::SequenceInput input;
};

absl::Status ShapeError(const FloatArray& array, const std::string& flag,
                        const std::string& expected) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", array.path, " has shape ",
                                                 ShapeString(array.shape), ", expected ",
                                                 expected));
}

absl::Status Load(const CompressOptions& options, LoadedSequence* seq) {
  ASSIGN_OR_RETURN(seq->keys, LoadFloatArray(options.keys_path, "keys", 4));
  ASSIGN_OR_RETURN(seq->values, LoadFloatArray(options.values_path, "values", 4));
  const std::vector<uint64_t>& kv = seq->keys.shape;
  for (uint64_t dim : kv) {
    if (dim == 0 || dim > UINT32_MAX) {
      return ShapeError(seq->keys, "keys",
                        "[num_layers, num_tokens, num_kv_heads, head_dim], all >= 1");
    }
  }
  if (seq->values.shape != kv) {
    return ShapeError(seq->values, "values",
                      absl::StrCat(ShapeString(kv), " (the shape of --keys)"));
  }
  const uint64_t layers = kv[0], tokens = kv[1], head_dim = kv[3];

  std::optional<uint64_t> q_heads;
  std::string q_heads_source;
  uint32_t num_queries = 0;
  if (!options.queries_path.empty()) {
    ASSIGN_OR_RETURN(seq->queries, LoadFloatArray(options.queries_path, "queries", 4));
    const std::vector<uint64_t>& q = seq->queries.shape;
    if (q[0] != layers || q[1] == 0 || q[1] > tokens || q[2] == 0 || q[3] != head_dim) {
      return ShapeError(seq->queries, "queries",
                        absl::StrCat("[", layers, ", num_queries in [1, ", tokens,
                                     "], num_q_heads, ", head_dim, "]"));
    }
    q_heads = q[2];
    q_heads_source = seq->queries.path;
    num_queries = static_cast<uint32_t>(q[1]);
  }
  if (!options.scores_path.empty()) {
    ASSIGN_OR_RETURN(seq->scores, LoadFloatArray(options.scores_path, "scores", 3));
    const std::vector<uint64_t>& s = seq->scores.shape;
    if (s[0] != layers || s[1] == 0 || s[2] != tokens) {
      return ShapeError(seq->scores, "scores",
                        absl::StrCat("[", layers, ", num_q_heads, ", tokens, "]"));
    }
    q_heads = s[1];
    q_heads_source = seq->scores.path;
  }
  if (options.num_q_heads.has_value()) {
    if (q_heads.has_value() && *q_heads != *options.num_q_heads) {
      return absl::InvalidArgumentError(absl::StrCat("--num_q_heads=", *options.num_q_heads,
                                                     " but ", q_heads_source, " has ", *q_heads,
                                                     " query heads"));
    }
    q_heads = *options.num_q_heads;
  }
  if (!q_heads.has_value()) {
    return absl::InvalidArgumentError(
        "--num_q_heads is required when neither --queries nor --scores is given");
  }

  compress::ModelShape& shape = seq->shape;
  shape.num_layers = static_cast<uint32_t>(layers);
  shape.num_q_heads = static_cast<uint32_t>(*q_heads);
  shape.num_kv_heads = static_cast<uint32_t>(kv[2]);
  shape.head_dim = static_cast<uint32_t>(head_dim);
  shape.elem_bytes = options.elem_bytes;
  shape.rope_style = options.rope_style;
  shape.rope_theta = options.rope_theta;
  shape.rope_scaling = options.rope_scaling;
  shape.rotary_dim = options.rotary_dim;

  compress::SequenceInput& input = seq->input;
  input.num_tokens = static_cast<uint32_t>(tokens);
  if (!options.positions_path.empty()) {
    ASSIGN_OR_RETURN(input.positions,
                     LoadUint32Vector(options.positions_path, "positions", tokens));
  }
  const size_t kv_layer = tokens * kv[2] * head_dim;
  const size_t q_layer = seq->queries.values.size() / layers;
  const size_t s_layer = seq->scores.values.size() / layers;
  input.layers.resize(layers);
  for (uint64_t l = 0; l < layers; ++l) {
    compress::LayerInput& layer = input.layers[l];
    layer.keys = seq->keys.values.data() + l * kv_layer;
    layer.values = seq->values.values.data() + l * kv_layer;
    if (q_layer > 0) {
      layer.queries = seq->queries.values.data() + l * q_layer;
      layer.num_queries = num_queries;
    }
    if (s_layer > 0) layer.scores = seq->scores.values.data() + l * s_layer;
  }
  return absl::OkStatus();
}

Json PolicyJson(const compress::PolicyConfig& p) {
  return Json{{"name", p.name},
              {"schedule", ScheduleName(p.schedule)},
              {"beta", JsonDouble(p.beta)},
              {"zigzag_tau", JsonDouble(p.zigzag_tau)},
              {"zigzag_min_fraction", JsonDouble(p.zigzag_min_fraction)},
              {"scoring", ScoringName(p.scoring)},
              {"window", p.window},
              {"normalization", NormalizationName(p.normalization)},
              {"pooling", PoolingName(p.pooling)},
              {"pool_kernel", p.pool_kernel},
              {"sinks", p.sinks},
              {"gqa", GqaName(p.gqa)},
              {"codebook", p.codebook},
              {"theta_k", JsonFloat(p.theta_k)},
              {"theta_v", JsonFloat(p.theta_v)},
              {"codebook_scope", CodebookScopeName(p.codebook_scope)},
              {"codebook_only_if_smaller", p.codebook_only_if_smaller},
              {"codebook_search", CodebookSearchName(p.codebook_search)}};
}

std::string StatsJson(const CompressOptions& options, const LoadedSequence& seq,
                      const compress::SequenceResult& result) {
  const compress::ModelShape& shape = seq.shape;
  Json inputs = {{"keys", options.keys_path}, {"values", options.values_path}};
  if (!options.queries_path.empty()) {
    inputs["queries"] = options.queries_path;
    inputs["num_queries"] = seq.input.layers[0].num_queries;
  }
  if (!options.scores_path.empty()) inputs["scores"] = options.scores_path;
  if (!options.positions_path.empty()) inputs["positions"] = options.positions_path;

  Json layers = Json::array();
  for (size_t l = 0; l < result.layers.size(); ++l) {
    const compress::LayerResult& layer = result.layers[l];
    const bool codebook = layer.key_codebook.has_value();
    layers.push_back(
        {{"layer", l},
         {"context_ratio", JsonDouble(layer.context_ratio)},
         {"kept_per_head", layer.kept_per_head},
         {"codebook", codebook},
         {"codebook_size_k", codebook ? layer.key_codebook->size() : 0},
         {"codebook_size_v", codebook ? layer.value_codebook->size() : 0},
         {"codebook_parts",
          codebook && !layer.key_entry_offsets.empty() ? layer.key_entry_offsets.size() - 1 : 0},
         {"bytes_held", layer.bytes_held},
         {"eq15_ratio", JsonDouble(layer.eq15_ratio)}});
  }

  const compress::CompressionStats& stats = result.stats;
  const Json json = {
      {"policy", PolicyJson(options.policy)},
      {"target",
       {{"kind",
         options.target.kind == compress::TargetKind::kByteRatio ? "byte_ratio" : "reserve_ratio"},
        {"value", JsonDouble(options.target.value)}}},
      {"shape",
       {{"num_layers", shape.num_layers},
        {"num_tokens", seq.input.num_tokens},
        {"num_q_heads", shape.num_q_heads},
        {"num_kv_heads", shape.num_kv_heads},
        {"head_dim", shape.head_dim},
        {"elem_bytes", shape.elem_bytes},
        {"rope", RopeName(shape.rope_style)},
        {"rope_theta", JsonDouble(shape.rope_theta)},
        {"rope_scaling", JsonDouble(shape.rope_scaling)},
        {"rotary_dim", shape.rotary_dim}}},
      {"inputs", std::move(inputs)},
      {"full_bytes", stats.full_bytes},
      {"held_bytes", stats.held_bytes},
      {"honest_ratio", JsonDouble(stats.honest_ratio)},
      {"eq15_ratio", JsonDouble(stats.eq15_ratio)},
      {"reserve_ratio", JsonDouble(stats.reserve_ratio)},
      {"layers", std::move(layers)}};
  return DumpJson(json);
}

absl::Status WriteCodebook(const std::string& prefix, const compress::Codebook& codebook,
                           const std::vector<uint32_t>& offsets) {
  const uint64_t n = codebook.refs.size();
  RETURN_IF_ERROR(WriteNpy(prefix + "_codebook.npy",
                           NpyFromFloat32(codebook.entries, {codebook.size(), codebook.dim})));
  RETURN_IF_ERROR(WriteNpy(prefix + "_refs.npy", NpyFromUint32(codebook.refs, {n})));
  RETURN_IF_ERROR(WriteNpy(prefix + "_magnitudes.npy", NpyFromFloat32(codebook.magnitudes, {n})));
  return WriteNpy(prefix + "_offsets.npy", NpyFromUint32(offsets, {offsets.size()}));
}

absl::Status WriteOutputs(const CompressOptions& options, const LoadedSequence& seq,
                          const compress::SequenceResult& result) {
  RETURN_IF_ERROR(PrepareOutputDir(options.out_dir));
  for (size_t l = 0; l < result.layers.size(); ++l) {
    const compress::LayerResult& layer = result.layers[l];
    const std::string prefix = absl::StrCat(options.out_dir, "/layer", l);
    RETURN_IF_ERROR(
        WriteNpy(prefix + "_kept.npy",
                 NpyFromUint32(layer.kept, {seq.shape.num_kv_heads, layer.kept_per_head})));
    if (layer.key_codebook.has_value()) {
      RETURN_IF_ERROR(WriteCodebook(prefix + "_k", *layer.key_codebook, layer.key_entry_offsets));
      RETURN_IF_ERROR(
          WriteCodebook(prefix + "_v", *layer.value_codebook, layer.value_entry_offsets));
    }
  }
  return WriteTextFile(options.out_dir + "/stats.json", StatsJson(options, seq, result));
}

}  // namespace

int RunCompress(const std::vector<std::string>& args) {
  absl::StatusOr<CompressOptions> options = ParseCompressOptions(args);
  if (!options.ok()) {
    return ReportError(kCommand, std::string(options.status().message()), kExitUsage);
  }
  LoadedSequence seq;
  if (absl::Status s = Load(*options, &seq); !s.ok()) {
    return ReportError(kCommand, std::string(s.message()), kExitFailure);
  }
  absl::StatusOr<compress::SequenceResult> result =
      compress::CompressSequence(seq.shape, options->policy, seq.input, options->target);
  if (!result.ok()) {
    return ReportError(kCommand, absl::StrCat("compression failed: ", result.status().message()),
                       kExitFailure);
  }
  if (absl::Status s = WriteOutputs(*options, seq, *result); !s.ok()) {
    return ReportError(kCommand, std::string(s.message()), kExitFailure);
  }
  const compress::CompressionStats& stats = result->stats;
  std::printf(
      "%s: %u layers x %u tokens, reserve ratio %.4f, held %llu of %llu bytes (honest ratio "
      "%.4f, eq. 15 ratio %.4f) -> %s\n",
      options->policy.name.c_str(), seq.shape.num_layers, seq.input.num_tokens, stats.reserve_ratio,
      static_cast<unsigned long long>(stats.held_bytes),
      static_cast<unsigned long long>(stats.full_bytes), stats.honest_ratio, stats.eq15_ratio,
      options->out_dir.c_str());
  return kExitOk;
}

}  // namespace cachemgr::ctl
