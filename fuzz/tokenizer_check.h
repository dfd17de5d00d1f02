// Exercises a loaded tokenizer the way the engine uses it, for the loader fuzz targets.
#pragma once

#include "tools/engine/tokenizer.h"

namespace cachemgr::fuzz {

// Encodes a few fixed texts (with and without BOS and special-token parsing) and decodes every
// id they produce and every id of the vocabulary (up to a bound). Aborts (Fail) when an encoded
// id (BOS included) is outside the vocabulary: the engine indexes its embeddings with them.
void ExerciseTokenizer(const engine::Tokenizer& tokenizer);

}  // namespace cachemgr::fuzz
