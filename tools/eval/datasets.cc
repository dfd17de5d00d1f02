#include "tools/eval/datasets.h"

#include <algorithm>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "cachemgr/util/status_macros.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"

namespace cachemgr::eval {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// One object per line; `field` of each as a string.
absl::StatusOr<std::vector<google::protobuf::Struct>> ReadJsonLines(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::vector<google::protobuf::Struct> out;
  std::string line;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    google::protobuf::Struct s;
    if (!google::protobuf::util::JsonStringToMessage(line, &s).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", lineno, ": not a JSON object"));
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::string Field(const google::protobuf::Struct& s, const std::string& key) {
  auto it = s.fields().find(key);
  if (it == s.fields().end()) return "";
  if (it->second.has_string_value()) return it->second.string_value();
  if (it->second.has_list_value() && it->second.list_value().values_size() > 0) {
    return it->second.list_value().values(0).string_value();
  }
  return "";
}

std::vector<uint32_t> WithBos(const engine::Tokenizer& t, std::vector<uint32_t> ids) {
  if (t.adds_bos()) ids.insert(ids.begin(), t.bos_id());
  return ids;
}

// `count` prompt lengths from [lo, hi], seeded.
std::vector<uint32_t> Lengths(uint32_t count, uint32_t lo, uint32_t hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<uint32_t> dist(lo, std::max(lo, hi));
  std::vector<uint32_t> out(count);
  for (uint32_t& v : out) v = dist(rng);
  return out;
}

absl::Status CheckOptions(const DatasetOptions& o) {
  if (o.samples == 0 || o.min_prompt == 0 || o.max_prompt < o.min_prompt) {
    return absl::InvalidArgumentError("samples must be >= 1 and 1 <= min_prompt <= max_prompt");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<Sample>> TinyStoriesSamples(const engine::Tokenizer& tokenizer,
                                                       const DatasetOptions& o) {
  RETURN_IF_ERROR(CheckOptions(o));
  ASSIGN_OR_RETURN(std::string text,
                   ReadFile(o.data_dir + "/tinystories/tiny_stories_train_head.txt"));
  // Paragraphs of a story are separated by a blank line, stories by a single line break. The
  // model saw its training stories one after another, each after BOS: so is the stream here.
  std::vector<std::string> stories;
  size_t begin = 0;
  for (size_t i = 0; i <= text.size(); ++i) {
    const bool end = i == text.size();
    const bool single_break = !end && text[i] == '\n' && (i == 0 || text[i - 1] != '\n') &&
                              (i + 1 == text.size() || text[i + 1] != '\n');
    if ((end || single_break) && i > begin) {
      stories.push_back(text.substr(begin, i - begin));
      begin = i + 1;
    }
  }
  // Tokenized lazily: only as far as the samples reach.
  std::vector<uint32_t> stream;
  std::vector<size_t> story_start;  // index into `stream` of each story's BOS
  auto tokenize_until = [&](size_t story, size_t tokens) {
    while (story_start.size() < stories.size() &&
           (story_start.size() <= story || stream.size() < tokens)) {
      story_start.push_back(stream.size());
      const std::vector<uint32_t> ids =
          tokenizer.Encode(stories[story_start.size() - 1], /*add_bos=*/true);
      stream.insert(stream.end(), ids.begin(), ids.end());
    }
  };
  const std::vector<uint32_t> lengths = Lengths(o.samples, o.min_prompt, o.max_prompt, o.seed);
  std::mt19937_64 rng(o.seed * 7919 + 1);
  std::vector<Sample> out;
  size_t story = std::uniform_int_distribution<size_t>(0, 10)(rng);
  for (uint32_t s = 0; s < o.samples; ++s) {
    const size_t need = lengths[s] + o.continuation;
    tokenize_until(story, 0);
    if (story < story_start.size()) tokenize_until(story, story_start[story] + need);
    if (story >= story_start.size() || story_start[story] + need > stream.size()) {
      return absl::OutOfRangeError(absl::StrCat("TinyStories ran out after ", s, " samples"));
    }
    const size_t at = story_start[story];
    Sample sample;
    sample.name = absl::StrCat("tinystories-", s);
    sample.prompt.assign(stream.begin() + at, stream.begin() + at + lengths[s]);
    sample.continuation.assign(stream.begin() + at + lengths[s], stream.begin() + at + need);
    out.push_back(std::move(sample));
    // The next sample starts at a story past this one's tokens, plus a seeded skip.
    while (story < stories.size()) {
      tokenize_until(story, 0);
      if (story_start[story] >= at + need) break;
      ++story;
    }
    story += std::uniform_int_distribution<size_t>(0, 10)(rng);
  }
  return out;
}

absl::StatusOr<std::vector<Sample>> BrownSamples(const engine::Tokenizer& tokenizer,
                                                 const DatasetOptions& o) {
  RETURN_IF_ERROR(CheckOptions(o));
  ASSIGN_OR_RETURN(std::string text, ReadFile(o.data_dir + "/brown/brown_plain.txt"));
  std::vector<std::string> docs;
  std::istringstream in(text);
  std::string line, current;
  while (std::getline(in, line)) {
    if (line.rfind("### ", 0) == 0) {
      if (!current.empty()) docs.push_back(std::move(current));
      current.clear();
      continue;
    }
    current += line;
    current += '\n';
  }
  if (!current.empty()) docs.push_back(std::move(current));
  const std::vector<uint32_t> lengths = Lengths(o.samples, o.min_prompt, o.max_prompt, o.seed);
  std::mt19937_64 rng(o.seed * 104729 + 3);
  size_t doc = std::uniform_int_distribution<size_t>(0, docs.size() / 4)(rng);
  std::vector<Sample> out;
  for (uint32_t s = 0; s < o.samples; ++s) {
    const uint32_t need = lengths[s] + o.continuation;
    std::vector<uint32_t> ids = WithBos(tokenizer, {});
    const std::string first = absl::StrCat("brown-", s, " (doc ", doc);
    while (ids.size() < need && doc < docs.size()) {
      const std::vector<uint32_t> d = tokenizer.Encode(docs[doc++], false);
      ids.insert(ids.end(), d.begin(), d.end());
    }
    if (ids.size() < need) {
      return absl::OutOfRangeError(absl::StrCat("the Brown corpus ran out after ", s, " samples"));
    }
    Sample sample;
    sample.name = absl::StrCat(first, "..", doc - 1, ")");
    sample.prompt.assign(ids.begin(), ids.begin() + lengths[s]);
    sample.continuation.assign(ids.begin() + lengths[s], ids.begin() + need);
    out.push_back(std::move(sample));
  }
  return out;
}

absl::StatusOr<std::vector<Sample>> MultiNewsSamples(const engine::Tokenizer& tokenizer,
                                                     const DatasetOptions& o) {
  RETURN_IF_ERROR(CheckOptions(o));
  ASSIGN_OR_RETURN(std::vector<google::protobuf::Struct> rows,
                   ReadJsonLines(o.data_dir + "/longbench/multi_news.jsonl"));
  std::mt19937_64 rng(o.seed * 15485863 + 5);
  const size_t offset = std::uniform_int_distribution<size_t>(0, rows.size() - 1)(rng);
  std::vector<Sample> out;
  for (size_t k = 0; k < rows.size() && out.size() < o.samples; ++k) {
    const size_t i = (offset + k) % rows.size();
    std::vector<uint32_t> ids =
        WithBos(tokenizer, tokenizer.Encode(Field(rows[i], "context"), false));
    if (ids.size() < o.min_prompt + o.continuation || ids.size() > o.max_prompt + o.continuation) {
      continue;
    }
    Sample sample;
    sample.name = absl::StrCat("multi_news-", i);
    const size_t prompt = ids.size() - o.continuation;
    sample.prompt.assign(ids.begin(), ids.begin() + prompt);
    sample.continuation.assign(ids.begin() + prompt, ids.end());
    out.push_back(std::move(sample));
  }
  if (out.size() < o.samples) {
    return absl::OutOfRangeError(absl::StrCat("only ", out.size(), " multi_news documents have ",
                                              o.min_prompt, "-", o.max_prompt, " tokens"));
  }
  return out;
}

absl::StatusOr<std::vector<Sample>> RulerSamples(const engine::Tokenizer& tokenizer,
                                                 const DatasetOptions& o) {
  RETURN_IF_ERROR(CheckOptions(o));
  ASSIGN_OR_RETURN(std::vector<google::protobuf::Struct> rows,
                   ReadJsonLines(o.data_dir + "/ruler_4096/niah_multikey_3.jsonl"));
  std::vector<size_t> order(rows.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::mt19937_64 rng(o.seed * 32452843 + 7);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<Sample> out;
  for (size_t k = 0; k < order.size() && out.size() < o.samples; ++k) {
    const google::protobuf::Struct& row = rows[order[k]];
    Sample sample;
    sample.name = absl::StrCat("ruler-", order[k]);
    sample.answer = Field(row, "outputs");
    sample.prompt = WithBos(tokenizer, tokenizer.Encode(Field(row, "input"), false));
    sample.continuation = tokenizer.Encode(" " + sample.answer, false);
    if (sample.answer.empty() || sample.prompt.size() > o.max_prompt) continue;
    out.push_back(std::move(sample));
  }
  if (out.size() < o.samples) {
    return absl::OutOfRangeError(
        absl::StrCat("only ", out.size(), " RULER samples fit ", o.max_prompt, " prompt tokens"));
  }
  return out;
}

}  // namespace cachemgr::eval
