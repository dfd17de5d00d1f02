#include "tools/eval/report.h"

#include <cmath>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"

namespace cachemgr::eval {
namespace {

std::string Quote(const std::string& s) {
  return absl::StrCat(
      "\"",
      absl::StrReplaceAll(
          s, {{"\\", "\\\\"}, {"\"", "\\\""}, {"\n", "\\n"}, {"\t", "\\t"}, {"\r", "\\r"}}),
      "\"");
}

std::string Csv(const std::string& s) {
  return absl::StrCat("\"", absl::StrReplaceAll(s, {{"\"", "\"\""}, {"\n", " "}}), "\"");
}

absl::Status Write(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace

std::vector<Summary> Summarize(const std::vector<TrialResult>& trials) {
  std::map<std::string, double> reference_nll;
  for (const TrialResult& t : trials) {
    if (t.policy == "fullkv-reference") reference_nll[t.sample] = t.nll;
  }
  std::vector<Summary> out;
  std::map<std::pair<std::string, double>, size_t> index;
  for (const TrialResult& t : trials) {
    const auto key = std::make_pair(t.policy, t.target);
    auto it = index.find(key);
    if (it == index.end()) {
      it = index.emplace(key, out.size()).first;
      Summary s;
      s.policy = t.policy;
      s.target = t.target;
      s.greedy_agreement = s.honest_ratio = s.eq15_ratio = s.block_ratio = s.reserve_ratio = 0;
      out.push_back(s);
    }
    Summary& s = out[it->second];
    if (!t.ok) {
      ++s.failed;
      continue;
    }
    ++s.trials;
    s.nll += t.nll;
    s.delta_nll += t.nll - reference_nll[t.sample];
    s.greedy_agreement += t.greedy_agreement;
    s.first_divergence += t.first_divergence;
    s.exact_match += t.exact_match ? 1 : 0;
    s.honest_ratio += t.honest_ratio;
    s.eq15_ratio += t.eq15_ratio;
    s.block_ratio += t.block_ratio;
    s.reserve_ratio += t.reserve_ratio;
    s.codebook_layers += t.codebook_layers;
    s.compress_ms += t.compress_ms;
    s.decode_ms_per_token += t.decode_ms_per_token;
  }
  for (Summary& s : out) {
    if (s.trials == 0) continue;
    const double n = s.trials;
    for (double* f :
         {&s.nll, &s.delta_nll, &s.greedy_agreement, &s.first_divergence, &s.exact_match,
          &s.honest_ratio, &s.eq15_ratio, &s.block_ratio, &s.reserve_ratio, &s.codebook_layers,
          &s.compress_ms, &s.decode_ms_per_token}) {
      *f /= n;
    }
    s.ppl = std::exp(s.nll);
    s.ppl_ratio = std::exp(s.delta_nll);
  }
  return out;
}

absl::Status WriteTrialsCsv(const std::string& path, const std::vector<TrialResult>& trials) {
  std::string out =
      "sample,policy,target,ok,nll,nll_tokens,greedy_agreement,first_divergence,exact_match,"
      "honest_ratio,eq15_ratio,block_ratio,reserve_ratio,codebook_layers,compress_ms,"
      "decode_ms_per_token,error,greedy_text\n";
  for (const TrialResult& t : trials) {
    absl::StrAppend(
        &out, Csv(t.sample), ",", t.policy, ",", t.target, ",", t.ok ? 1 : 0, ",",
        absl::StrFormat("%.6f", t.nll), ",", t.nll_tokens, ",",
        absl::StrFormat("%.4f", t.greedy_agreement), ",", t.first_divergence, ",",
        t.exact_match ? 1 : 0, ",", absl::StrFormat("%.6f", t.honest_ratio), ",",
        absl::StrFormat("%.6f", t.eq15_ratio), ",", absl::StrFormat("%.6f", t.block_ratio), ",",
        absl::StrFormat("%.6f", t.reserve_ratio), ",", t.codebook_layers, ",",
        absl::StrFormat("%.2f", t.compress_ms), ",", absl::StrFormat("%.3f", t.decode_ms_per_token),
        ",", Csv(t.error), ",", Csv(t.greedy_text), "\n");
  }
  return Write(path, out);
}

absl::Status WriteSummaryJson(const std::string& path, const RunInfo& info,
                              const std::vector<Summary>& summary) {
  std::string out = absl::StrCat(
      "{\n  \"model\": ", Quote(info.model), ",\n  \"dataset\": ", Quote(info.dataset),
      ",\n  \"samples\": ", info.samples, ",\n  \"target_kind\": ", Quote(info.target_kind),
      ",\n  \"window\": ", info.window, ",\n  \"greedy\": ", info.greedy,
      ",\n  \"continuation\": ", info.continuation, ",\n  \"seed\": ", info.seed,
      ",\n  \"seconds\": ", absl::StrFormat("%.1f", info.seconds), ",\n  \"results\": [\n");
  for (size_t i = 0; i < summary.size(); ++i) {
    const Summary& s = summary[i];
    absl::StrAppend(
        &out, "    {\"policy\": ", Quote(s.policy), ", \"target\": ", s.target,
        ", \"trials\": ", s.trials, ", \"failed\": ", s.failed,
        absl::StrFormat(", \"nll\": %.6f, \"delta_nll\": %.6f, \"ppl\": %.4f, \"ppl_ratio\": "
                        "%.6f, \"greedy_agreement\": %.4f, \"first_divergence\": %.2f, "
                        "\"exact_match\": %.4f, \"honest_ratio\": %.6f, \"eq15_ratio\": %.6f, "
                        "\"block_ratio\": %.6f, \"reserve_ratio\": %.6f, \"codebook_layers\": "
                        "%.2f, \"compress_ms\": %.2f, \"decode_ms_per_token\": %.3f}",
                        s.nll, s.delta_nll, s.ppl, s.ppl_ratio, s.greedy_agreement,
                        s.first_divergence, s.exact_match, s.honest_ratio, s.eq15_ratio,
                        s.block_ratio, s.reserve_ratio, s.codebook_layers, s.compress_ms,
                        s.decode_ms_per_token),
        i + 1 < summary.size() ? ",\n" : "\n");
  }
  out += "  ]\n}\n";
  return Write(path, out);
}

std::string SummaryTable(const std::vector<Summary>& summary, bool retrieval) {
  std::string out = absl::StrCat(
      "| policy | target | honest bytes | NLL | ΔNLL | PPL ratio | greedy agree@N | "
      "first diverge |",
      retrieval ? " exact match |" : "", " compress ms | decode ms/tok |\n",
      "|---|---:|---:|---:|---:|---:|---:|---:|", retrieval ? "---:|" : "", "---:|---:|\n");
  for (const Summary& s : summary) {
    if (s.trials == 0) {
      absl::StrAppend(&out, "| ", s.policy, " | ", s.target, " | – | failed on every sample |",
                      retrieval ? " |" : "", " | | | | |\n");
      continue;
    }
    absl::StrAppend(&out,
                    absl::StrFormat("| %s | %.2f | %.3f | %.4f | %+.4f | %.4f | %.3f | %.1f |",
                                    s.policy, s.target, s.honest_ratio, s.nll, s.delta_nll,
                                    s.ppl_ratio, s.greedy_agreement, s.first_divergence),
                    retrieval ? absl::StrFormat(" %.2f |", s.exact_match) : "",
                    absl::StrFormat(" %.1f | %.2f |", s.compress_ms, s.decode_ms_per_token),
                    s.failed > 0 ? absl::StrCat(" (", s.failed, " failed)") : "", "\n");
  }
  return out;
}

}  // namespace cachemgr::eval
