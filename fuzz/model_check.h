// Oracles on what the model loaders return, shared by the loader fuzz targets.
#pragma once

#include "tools/engine/checkpoint.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::fuzz {

// Encodes a few fixed texts (with and without BOS and special-token parsing) and decodes every
// id they produce and every id of the vocabulary (up to a bound). Aborts (Fail) when an encoded
// id (BOS included) is outside the vocabulary: the engine indexes its embeddings with them.
void ExerciseTokenizer(const engine::Tokenizer& tokenizer);

// Aborts (Fail) unless every weight of `ck` has the size its config implies (the engine's
// matmuls index them by those sizes).
void CheckCheckpointSizes(const engine::Checkpoint& ck);

}  // namespace cachemgr::fuzz
