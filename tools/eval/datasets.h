// Evaluation samples from the texts in a data directory, tokenized for one model: a prompt to
// prefill (and compress) and what follows it (teacher-forced), or for retrieval tasks the
// expected answer. The directory holds tinystories/, brown/, longbench/ and ruler_4096/ (file
// names below); the repository's testdata/text has excerpts of each, testdata/README.md says
// where the full texts come from.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::eval {

struct Sample {
  std::string name;                    // e.g. "tinystories-7", "ruler-12"
  std::vector<uint32_t> prompt;        // starts with BOS when the vocabulary adds one
  std::vector<uint32_t> continuation;  // teacher-forced after the prompt (retrieval: the answer)
  std::string answer;                  // retrieval tasks: the exact value to generate
};

struct DatasetOptions {
  std::string data_dir;  // holds tinystories/, brown/, longbench/, ruler_4096/
  uint32_t samples = 8;
  uint64_t seed = 1;
  uint32_t min_prompt = 256;  // tokens (TinyStories, Brown)
  uint32_t max_prompt = 448;
  uint32_t continuation = 64;  // tokens after the prompt
};

// TinyStories (tinystories/tiny_stories_train_head.txt): the stories as one token stream, each
// after BOS (as the model was trained); each sample starts at a story picked by `seed`, takes a
// prompt length drawn from [min_prompt, max_prompt] (so it spans several stories) and the
// `continuation` tokens after it. Samples do not overlap.
absl::StatusOr<std::vector<Sample>> TinyStoriesSamples(const engine::Tokenizer& tokenizer,
                                                       const DatasetOptions& options);

// Brown corpus (brown/brown_plain.txt): documents ("### caNN") concatenated in corpus order until
// the prompt length (drawn from [min_prompt, max_prompt], distinct documents per sample) plus the
// continuation is reached.
absl::StatusOr<std::vector<Sample>> BrownSamples(const engine::Tokenizer& tokenizer,
                                                 const DatasetOptions& options);

// LongBench multi_news (longbench/multi_news.jsonl): the documents ("context") of samples whose
// tokenized length lies in [min_prompt + continuation, max_prompt + continuation], in file order
// from a seeded offset; the prompt is the document's first part, the continuation its next tokens.
absl::StatusOr<std::vector<Sample>> MultiNewsSamples(const engine::Tokenizer& tokenizer,
                                                     const DatasetOptions& options);

// RULER needle-in-a-haystack (ruler_4096/niah_multikey_3.jsonl): the task text as the prompt, the
// expected uuid as answer (its tokens as the continuation). Samples picked by `seed`.
absl::StatusOr<std::vector<Sample>> RulerSamples(const engine::Tokenizer& tokenizer,
                                                 const DatasetOptions& options);

}  // namespace cachemgr::eval
