// The named policy presets, one file each. Every preset is only a PolicyConfig: a choice of
// budget schedule, scoring, GQA handling and codebook (see compress.h); PresetPolicy() looks
// them up by name. Reserve ratio / byte target are per call, not part of a preset.
#pragma once

#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {

PolicyConfig FullKvPreset();        // "fullkv": keep everything, plain
PolicyConfig StreamingLlmPreset();  // "streamingllm": sinks + recent
PolicyConfig H2oPreset();           // "h2o": accumulated attention + recent window
PolicyConfig SnapKvPreset();        // "snapkv": pooled window scores, uniform (the default)
PolicyConfig PyramidKvPreset();     // "pyramidkv": SnapKV selection, pyramid budgets
PolicyConfig PyramidInferPreset();  // "pyramidinfer": eq. 3 group-mean scores, pyramid budgets
PolicyConfig ZigZagKvPreset();      // "zigzagkv": SnapKV selection, layer-uncertainty budgets
PolicyConfig CodebookOnlyPreset();  // "codebook": full budget + codebook (paper Table 5)
PolicyConfig SpindleKvPreset();     // "spindlekv": pyramid eviction + codebook

}  // namespace cachemgr::compress
