#include "tools/engine/checkpoint.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <initializer_list>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"
#include "tools/engine/gguf_file.h"

namespace cachemgr::engine {
namespace {

absl::Status CheckConfig(const LlamaConfig& c, const std::string& path) {
  if (c.dim == 0 || c.hidden_dim == 0 || c.num_layers == 0 || c.num_heads == 0 ||
      c.num_kv_heads == 0 || c.vocab_size == 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": a model dimension is 0"));
  }
  if (c.dim % c.num_heads != 0 || c.num_heads % c.num_kv_heads != 0 || c.head_dim() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": dim ", c.dim, ", ", c.num_heads, " heads and ", c.num_kv_heads,
                     " KV heads do not make even heads of whole GQA groups"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Checkpoint> LoadLlama2c(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  int32_t header[7];
  if (!in.read(reinterpret_cast<char*>(header), sizeof(header))) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": shorter than the llama2.c header"));
  }
  for (int i = 0; i < 7; ++i) {
    // Counts up to 2^24; only vocab_size (field 5) may be negative, which means the classifier
    // is stored separately.
    const int32_t v = header[i];
    if (v == 0 || v > (1 << 24) || v < -(1 << 24) || (v < 0 && i != 5)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a llama2.c checkpoint header"));
    }
  }
  Checkpoint ck;
  ck.source = path;
  LlamaConfig& c = ck.config;
  c.dim = static_cast<uint32_t>(header[0]);
  c.hidden_dim = static_cast<uint32_t>(header[1]);
  c.num_layers = static_cast<uint32_t>(header[2]);
  c.num_heads = static_cast<uint32_t>(header[3]);
  c.num_kv_heads = static_cast<uint32_t>(header[4]);
  const bool shared_classifier = header[5] > 0;
  c.vocab_size = static_cast<uint32_t>(shared_classifier ? header[5] : -header[5]);
  c.max_seq_len = static_cast<uint32_t>(header[6]);
  RETURN_IF_ERROR(CheckConfig(c, path));
  const uint64_t d = c.dim, hd = c.head_dim(), kv = uint64_t{c.num_kv_heads} * hd,
                 q = uint64_t{c.num_heads} * hd, h = c.hidden_dim, L = c.num_layers;
  // The file's size in bytes, as the header describes it; the products can exceed 64 bits (a
  // header of valid-looking counts), and a wrapped sum must not pass for the file's size.
  uint64_t described = sizeof(header);
  bool overflow = false;
  auto add_floats = [&](std::initializer_list<uint64_t> factors) {
    uint64_t n = 4;
    for (uint64_t f : factors) overflow |= __builtin_mul_overflow(n, f, &n);
    overflow |= __builtin_add_overflow(described, n, &described);
  };
  add_floats({c.vocab_size, d});    // token_embedding
  add_floats({L, d});               // attn_norm
  add_floats({L, d, q});            // wq
  add_floats({2, L, d, kv});        // wk, wv
  add_floats({L, q, d});            // wo
  add_floats({L, d});               // ffn_norm
  add_floats({3, L, h, d});         // w1, w2, w3
  add_floats({d});                  // final_norm
  add_floats({c.max_seq_len, hd});  // freq_cis (unused)
  if (!shared_classifier) add_floats({c.vocab_size, d});
  in.seekg(0, std::ios::end);
  const uint64_t bytes = static_cast<uint64_t>(in.tellg());
  if (overflow) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": its header describes more than 2^64 bytes of weights"));
  }
  if (bytes != described) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", bytes, " bytes, but its header ", "describes ", described));
  }
  in.seekg(sizeof(header));
  auto read = [&](std::vector<float>& out, uint64_t n) {
    out.resize(n);
    in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(n * 4));
  };
  // llama2.c stores each kind for every layer at once.
  auto read_layers = [&](std::vector<float> LayerWeights::*field, uint64_t per_layer) {
    ck.weights.layers.resize(L);
    for (uint32_t l = 0; l < L; ++l) read(ck.weights.layers[l].*field, per_layer);
  };
  read(ck.weights.token_embedding, uint64_t{c.vocab_size} * d);
  read_layers(&LayerWeights::attn_norm, d);
  read_layers(&LayerWeights::wq, q * d);
  read_layers(&LayerWeights::wk, kv * d);
  read_layers(&LayerWeights::wv, kv * d);
  read_layers(&LayerWeights::wo, d * q);
  read_layers(&LayerWeights::ffn_norm, d);
  read_layers(&LayerWeights::w_gate, h * d);
  read_layers(&LayerWeights::w_down, d * h);
  read_layers(&LayerWeights::w_up, h * d);
  read(ck.weights.final_norm, d);
  in.seekg(static_cast<std::streamoff>(uint64_t{c.max_seq_len} * hd * 4), std::ios::cur);
  if (!shared_classifier) read(ck.weights.output, uint64_t{c.vocab_size} * d);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(path, ": read failed"));
  return ck;
}

absl::StatusOr<Checkpoint> LoadGguf(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path));
  ASSIGN_OR_RETURN(std::string arch, file->GetString("general.architecture"));
  if (arch != "llama") {
    return absl::UnimplementedError(
        absl::StrCat(path, ": general.architecture \"", arch, "\" is not llama"));
  }
  Checkpoint ck;
  ck.source = path;
  LlamaConfig& c = ck.config;
  auto get = [&](const char* key, uint32_t* out) -> absl::Status {
    ASSIGN_OR_RETURN(double v, file->GetNumber(key));
    // Checked as a double: converting one outside uint32 would be undefined.
    if (!(v >= 0 && v <= UINT32_MAX) || v != static_cast<double>(static_cast<uint32_t>(v))) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", key, " is ", v, ", not a count"));
    }
    *out = static_cast<uint32_t>(v);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(get("llama.embedding_length", &c.dim));
  RETURN_IF_ERROR(get("llama.feed_forward_length", &c.hidden_dim));
  RETURN_IF_ERROR(get("llama.block_count", &c.num_layers));
  RETURN_IF_ERROR(get("llama.attention.head_count", &c.num_heads));
  c.num_kv_heads = c.num_heads;
  if (file->Find("llama.attention.head_count_kv") != nullptr) {
    RETURN_IF_ERROR(get("llama.attention.head_count_kv", &c.num_kv_heads));
  }
  RETURN_IF_ERROR(get("llama.context_length", &c.max_seq_len));
  if (absl::StatusOr<double> theta = file->GetNumber("llama.rope.freq_base"); theta.ok()) {
    c.rope_theta = *theta;
  }
  if (absl::StatusOr<double> eps = file->GetNumber("llama.attention.layer_norm_rms_epsilon");
      eps.ok()) {
    c.rms_eps = static_cast<float>(*eps);
  }
  const GgufFile::Tensor* embd = file->FindTensor("token_embd.weight");
  if (embd == nullptr || embd->dims.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no 2-D token_embd.weight"));
  }
  if (embd->dims[1] > UINT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": token_embd.weight has ", embd->dims[1], " rows"));
  }
  c.vocab_size = static_cast<uint32_t>(embd->dims[1]);
  RETURN_IF_ERROR(CheckConfig(c, path));
  if (absl::StatusOr<double> n = file->GetNumber("llama.rope.dimension_count");
      n.ok() && *n != c.head_dim()) {
    return absl::UnimplementedError(absl::StrCat(path, ": partial RoPE (", *n, " of ", c.head_dim(),
                                                 " dims) is not supported"));
  }
  // Every layer has 9 tensors: a block count the file cannot back is refused before the layers
  // are allocated.
  if (c.num_layers > file->tensors().size() / 9) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": llama.block_count ", c.num_layers,
                                                   " but only ", file->tensors().size(),
                                                   " tensors"));
  }
  const uint64_t d = c.dim, hd = c.head_dim(), kv = uint64_t{c.num_kv_heads} * hd,
                 q = uint64_t{c.num_heads} * hd, h = c.hidden_dim;
  LlamaWeights& w = ck.weights;
  ASSIGN_OR_RETURN(w.token_embedding, file->ReadFloat("token_embd.weight", {d, c.vocab_size}));
  ASSIGN_OR_RETURN(w.final_norm, file->ReadFloat("output_norm.weight", {d}));
  if (file->FindTensor("output.weight") != nullptr) {
    ASSIGN_OR_RETURN(w.output, file->ReadFloat("output.weight", {d, c.vocab_size}));
  }
  w.layers.resize(c.num_layers);
  for (uint32_t l = 0; l < c.num_layers; ++l) {
    LayerWeights& lw = w.layers[l];
    const std::string p = absl::StrCat("blk.", l, ".");
    ASSIGN_OR_RETURN(lw.attn_norm, file->ReadFloat(p + "attn_norm.weight", {d}));
    ASSIGN_OR_RETURN(lw.wq, file->ReadFloat(p + "attn_q.weight", {d, q}));
    ASSIGN_OR_RETURN(lw.wk, file->ReadFloat(p + "attn_k.weight", {d, kv}));
    ASSIGN_OR_RETURN(lw.wv, file->ReadFloat(p + "attn_v.weight", {d, kv}));
    ASSIGN_OR_RETURN(lw.wo, file->ReadFloat(p + "attn_output.weight", {q, d}));
    ASSIGN_OR_RETURN(lw.ffn_norm, file->ReadFloat(p + "ffn_norm.weight", {d}));
    ASSIGN_OR_RETURN(lw.w_gate, file->ReadFloat(p + "ffn_gate.weight", {d, h}));
    ASSIGN_OR_RETURN(lw.w_down, file->ReadFloat(p + "ffn_down.weight", {h, d}));
    ASSIGN_OR_RETURN(lw.w_up, file->ReadFloat(p + "ffn_up.weight", {d, h}));
  }
  return ck;
}

namespace {

// Rows of each head: interleaved (2i, 2i+1) -> half-split (i, i + head_dim / 2).
void PermuteHeads(std::vector<float>& w, uint32_t heads, uint32_t head_dim, uint32_t cols) {
  std::vector<float> out(w.size());
  const uint32_t half = head_dim / 2;
  for (uint32_t hh = 0; hh < heads; ++hh) {
    for (uint32_t i = 0; i < half; ++i) {
      const size_t base = size_t{hh} * head_dim;
      std::memcpy(&out[(base + i) * cols], &w[(base + 2 * i) * cols], cols * 4);
      std::memcpy(&out[(base + half + i) * cols], &w[(base + 2 * i + 1) * cols], cols * 4);
    }
  }
  w = std::move(out);
}

}  // namespace

void ToHalfSplit(Checkpoint& checkpoint) {
  LlamaConfig& c = checkpoint.config;
  if (c.rope_style == RopeStyle::kHalfSplit) return;
  for (LayerWeights& lw : checkpoint.weights.layers) {
    PermuteHeads(lw.wq, c.num_heads, c.head_dim(), c.dim);
    PermuteHeads(lw.wk, c.num_kv_heads, c.head_dim(), c.dim);
  }
  c.rope_style = RopeStyle::kHalfSplit;
}

}  // namespace cachemgr::engine
