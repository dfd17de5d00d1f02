#include "tools/cachemgrctl/compress_options.h"

#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"
#include "tools/cachemgrctl/flags.h"

namespace cachemgr::ctl {
namespace {

using compress::BudgetSchedule;
using compress::CodebookScope;
using compress::GqaMode;
using compress::Pooling;
using compress::RopeStyle;
using compress::Scoring;
using compress::WindowNormalization;

template <typename T>
using Table = std::vector<std::pair<std::string, T>>;

const Table<BudgetSchedule> kSchedules = {{"full", BudgetSchedule::kFull},
                                          {"uniform", BudgetSchedule::kUniform},
                                          {"pyramid", BudgetSchedule::kPyramid},
                                          {"zigzag", BudgetSchedule::kZigZag}};
const Table<Scoring> kScorings = {{"window", Scoring::kWindow},
                                  {"accumulated", Scoring::kAccumulated},
                                  {"sinks_recent", Scoring::kSinksRecent}};
const Table<WindowNormalization> kNormalizations = {{"literal", WindowNormalization::kLiteral},
                                                    {"sum", WindowNormalization::kSum}};
const Table<Pooling> kPoolings = {
    {"none", Pooling::kNone}, {"avg", Pooling::kAvg}, {"max", Pooling::kMax}};
const Table<GqaMode> kGqaModes = {{"mean", GqaMode::kGroupMean}, {"repeat", GqaMode::kRepeat}};
const Table<CodebookScope> kScopes = {{"layer", CodebookScope::kLayer},
                                      {"kv_head", CodebookScope::kKvHead}};
const Table<compress::CodebookSearch> kSearches = {{"exact", compress::CodebookSearch::kExact},
                                                   {"lsh", compress::CodebookSearch::kLsh}};
const Table<RopeStyle> kRopes = {{"interleaved", RopeStyle::kInterleaved},
                                 {"half_split", RopeStyle::kHalfSplit},
                                 {"none", RopeStyle::kNone}};

template <typename T>
std::string NameOf(const Table<T>& table, T value) {
  for (const auto& [name, v] : table) {
    if (v == value) return name;
  }
  return absl::StrCat("unknown(", static_cast<int>(value), ")");
}

const std::vector<std::string> kKnownFlags = {"keys",
                                              "values",
                                              "queries",
                                              "scores",
                                              "positions",
                                              "out",
                                              "policy",
                                              "reserve_ratio",
                                              "byte_ratio",
                                              "schedule",
                                              "beta",
                                              "zigzag_tau",
                                              "zigzag_min_fraction",
                                              "scoring",
                                              "window",
                                              "normalization",
                                              "pooling",
                                              "pool_kernel",
                                              "sinks",
                                              "gqa",
                                              "codebook",
                                              "theta_k",
                                              "theta_v",
                                              "codebook_scope",
                                              "codebook_only_if_smaller",
                                              "codebook_search",
                                              "num_q_heads",
                                              "rope",
                                              "rope_theta",
                                              "rope_scaling",
                                              "rotary_dim",
                                              "elem_bytes"};

absl::Status ApplyPolicyOverrides(const Flags& flags, compress::PolicyConfig* policy) {
  RETURN_IF_ERROR(flags.GetChoice("schedule", kSchedules, &policy->schedule));
  RETURN_IF_ERROR(flags.GetDouble("beta", &policy->beta));
  RETURN_IF_ERROR(flags.GetDouble("zigzag_tau", &policy->zigzag_tau));
  RETURN_IF_ERROR(flags.GetDouble("zigzag_min_fraction", &policy->zigzag_min_fraction));
  RETURN_IF_ERROR(flags.GetChoice("scoring", kScorings, &policy->scoring));
  RETURN_IF_ERROR(flags.GetUint32("window", &policy->window));
  RETURN_IF_ERROR(flags.GetChoice("normalization", kNormalizations, &policy->normalization));
  RETURN_IF_ERROR(flags.GetChoice("pooling", kPoolings, &policy->pooling));
  RETURN_IF_ERROR(flags.GetUint32("pool_kernel", &policy->pool_kernel));
  RETURN_IF_ERROR(flags.GetUint32("sinks", &policy->sinks));
  RETURN_IF_ERROR(flags.GetChoice("gqa", kGqaModes, &policy->gqa));
  RETURN_IF_ERROR(flags.GetBool("codebook", &policy->codebook));
  RETURN_IF_ERROR(flags.GetFloat("theta_k", &policy->theta_k));
  RETURN_IF_ERROR(flags.GetFloat("theta_v", &policy->theta_v));
  RETURN_IF_ERROR(flags.GetChoice("codebook_scope", kScopes, &policy->codebook_scope));
  RETURN_IF_ERROR(flags.GetBool("codebook_only_if_smaller", &policy->codebook_only_if_smaller));
  RETURN_IF_ERROR(flags.GetChoice("codebook_search", kSearches, &policy->codebook_search));
  if (absl::Status s = compress::ValidatePolicy(*policy); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy \"", policy->name, "\" with the given overrides: ", s.message()));
  }
  return absl::OkStatus();
}

absl::Status ParseTarget(const Flags& flags, compress::CompressTarget* target) {
  if (flags.Has("reserve_ratio") && flags.Has("byte_ratio")) {
    return absl::InvalidArgumentError("give one of --reserve_ratio and --byte_ratio, not both");
  }
  target->kind = compress::TargetKind::kReserveRatio;
  target->value = 0.2;
  const char* flag = "reserve_ratio";
  if (flags.Has("byte_ratio")) {
    target->kind = compress::TargetKind::kByteRatio;
    flag = "byte_ratio";
  }
  RETURN_IF_ERROR(flags.GetDouble(flag, &target->value));
  if (!(target->value > 0.0 && target->value <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", flag, " must be in (0, 1], got ", target->value));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CompressOptions> ParseCompressOptions(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(const Flags flags, Flags::Parse(args, kKnownFlags, "compress"));
  CompressOptions options;
  ASSIGN_OR_RETURN(options.keys_path, flags.Required("keys"));
  ASSIGN_OR_RETURN(options.values_path, flags.Required("values"));
  ASSIGN_OR_RETURN(options.out_dir, flags.Required("out"));
  if (flags.Has("queries") && flags.Has("scores")) {
    return absl::InvalidArgumentError("give one of --queries and --scores, not both");
  }
  if (flags.Has("queries")) {
    ASSIGN_OR_RETURN(options.queries_path, flags.Required("queries"));
  }
  if (flags.Has("scores")) {
    ASSIGN_OR_RETURN(options.scores_path, flags.Required("scores"));
  }
  if (flags.Has("positions")) {
    ASSIGN_OR_RETURN(options.positions_path, flags.Required("positions"));
  }

  const std::string policy_name = flags.Get("policy").value_or(compress::kDefaultPreset);
  absl::StatusOr<compress::PolicyConfig> preset = compress::PresetPolicy(policy_name);
  if (!preset.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("flag --policy: ", preset.status().message()));
  }
  options.policy = *std::move(preset);
  RETURN_IF_ERROR(ApplyPolicyOverrides(flags, &options.policy));
  RETURN_IF_ERROR(ParseTarget(flags, &options.target));

  if (flags.Has("num_q_heads")) {
    uint32_t heads = 0;
    RETURN_IF_ERROR(flags.GetUint32("num_q_heads", &heads));
    if (heads == 0) return absl::InvalidArgumentError("flag --num_q_heads must be >= 1");
    options.num_q_heads = heads;
  }
  if (flags.Has("rope")) {
    RETURN_IF_ERROR(flags.GetChoice("rope", kRopes, &options.rope_style));
  } else if (options.policy.codebook) {
    return absl::InvalidArgumentError(
        "missing flag --rope=interleaved|half_split|none: the policy builds codebooks on "
        "pre-RoPE keys, so the layout of K's rotation must be given");
  }
  RETURN_IF_ERROR(flags.GetDouble("rope_theta", &options.rope_theta));
  RETURN_IF_ERROR(flags.GetDouble("rope_scaling", &options.rope_scaling));
  RETURN_IF_ERROR(flags.GetUint32("rotary_dim", &options.rotary_dim));
  RETURN_IF_ERROR(flags.GetUint32("elem_bytes", &options.elem_bytes));
  if (options.elem_bytes != 1 && options.elem_bytes != 2 && options.elem_bytes != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --elem_bytes must be 1, 2 or 4, got ", options.elem_bytes));
  }
  if (!(options.rope_theta > 0.0)) {
    return absl::InvalidArgumentError("flag --rope_theta must be > 0");
  }
  if (!(options.rope_scaling > 0.0)) {
    return absl::InvalidArgumentError("flag --rope_scaling must be > 0");
  }
  return options;
}

std::string ScheduleName(BudgetSchedule value) { return NameOf(kSchedules, value); }
std::string ScoringName(Scoring value) { return NameOf(kScorings, value); }
std::string NormalizationName(WindowNormalization value) { return NameOf(kNormalizations, value); }
std::string PoolingName(Pooling value) { return NameOf(kPoolings, value); }
std::string GqaName(GqaMode value) { return NameOf(kGqaModes, value); }
std::string CodebookScopeName(CodebookScope value) { return NameOf(kScopes, value); }
std::string CodebookSearchName(compress::CodebookSearch value) { return NameOf(kSearches, value); }
std::string RopeName(RopeStyle value) { return NameOf(kRopes, value); }

}  // namespace cachemgr::ctl
