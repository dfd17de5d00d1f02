// fuzz_seed_corpus DIR: writes the generated seeds of every fuzz target into DIR/<target>/
// (scripts/fuzz.sh seeds runs it into fuzz/corpus/). Small valid inputs that reach deep code,
// plus a few edge cases; crashing inputs found later are added to the corpus by hand, beside
// these, and are not generated here.
#include <sys/stat.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/npy.h"
#include "cachemgr/v1/cachemgr.pb.h"
#include "tests/tools/engine/gguf_writer.h"
#include "tools/engine/checkpoint.h"
#include "tools/engine/gguf_file.h"
#include "tools/engine/tokenizer.h"

namespace cachemgr::fuzz {
namespace {

std::string g_root;

// The seeds that should load must load: a seed the parser refuses only reaches its first check.
void MustLoad(const absl::Status& status, const std::string& what) {
  if (status.ok()) return;
  std::fprintf(stderr, "seed %s does not load: %s\n", what.c_str(), status.ToString().c_str());
  std::exit(1);
}

void Put(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string dir = absl::StrCat(g_root, "/", target);
  mkdir(dir.c_str(), 0755);
  std::ofstream(absl::StrCat(dir, "/", name), std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void Put(const std::string& target, const std::string& name,
         const google::protobuf::Message& message) {
  Put(target, name, message.SerializeAsString());
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

template <typename T>
void Append(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}

// ---- config ---------------------------------------------------------------------------------

void ConfigSeeds() {
  Put("config", "shipped.conf", ReadFile(CACHEMGR_SOURCE_DIR "/deploy/cachemgrd.conf"));
  Put("config", "tcp.conf",
      "socket = /tmp/a.sock\ntcp_address = 127.0.0.1:5000\ntcp_token_file = x\n");
  Put("config", "flags-override",
      std::string("socket = /tmp/a.sock\nmemory_budget = 512M\n") + '\0' +
          "--memory_budget=2G\n--noreflection\n--lease_timeout_ms=500\n"
          "--heartbeat_interval_ms=100\n--log_level=debug\n--socket\n/tmp/b.sock");
  Put("config", "help", std::string(1, '\0') + "--help");
  Put("config", "bad-line", "socket = /tmp/a.sock\nnot a setting\n");
  Put("config", "limits",
      "default_pool_bytes = 1T\nmemory_budget = 16777215T\nworker_threads = 256\n"
      "compress_threads = 0\nshutdown_grace_ms = 600000\ndefault_block_size = 1024\n"
      "max_tokens_per_allocate = 4294967295\nbackend = cuda\ncuda_share = ipc_handle\n");
}

// ---- .npy -----------------------------------------------------------------------------------

void NpySeeds() {
  const std::string tmp = absl::StrCat(g_root, "/.npy.tmp");
  auto put = [&](const std::string& name, const NpyArray& array) {
    MustLoad(WriteNpy(tmp, array), name);
    Put("npy", name, ReadFile(tmp));
    MustLoad(ReadNpy(tmp).status(), name);
    std::remove(tmp.c_str());
  };
  put("f4-2x3.npy", NpyFromFloat32({1, 2, 3, 4, 5, 6}, {2, 3}));
  put("u4-4.npy", NpyFromUint32({1, 2, 3, 4}, {4}));
  put("i4-scalar.npy", NpyFromInt32({-7}, {}));
  put("f4-empty.npy", NpyFromFloat32({}, {0, 5}));
  NpyArray half;
  half.dtype = "<f2";
  half.shape = {3};
  half.data = {0x00, 0x3c, 0x00, 0x7c, 0x01, 0x00};  // 1, inf, a subnormal
  put("f2-3.npy", half);
  NpyArray wide;
  wide.dtype = "<i8";
  wide.shape = {1, 1, 2};
  wide.data.assign(16, 0xff);
  put("i8-1x1x2.npy", wide);
  // A hand-written v2.0 header with Python 2 longs.
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1L, 2L), }";
  while ((12 + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::string v2("\x93NUMPY\x02\x00", 8);
  Append(v2, static_cast<uint32_t>(header.size()));
  v2 += header;
  Append(v2, 1.0f);
  Append(v2, 2.0f);
  Put("npy", "v2-longs.npy", v2);
}

// ---- GGUF -----------------------------------------------------------------------------------

std::vector<uint8_t> Floats(size_t n, float scale) {
  std::vector<uint8_t> out(n * 4);
  for (size_t i = 0; i < n; ++i) {
    const float v = scale * static_cast<float>(static_cast<int>(i % 7) - 3);
    std::memcpy(out.data() + 4 * i, &v, 4);
  }
  return out;
}

// A Llama of dim 8, 2 heads (1 KV head), hidden 16, 1 layer, vocabulary `vocab`; tensors F32
// except where `quantized` puts ffn weights in q8_0/q4_0/f16/bf16.
void TinyLlama(engine::testing::GgufWriter& w, uint64_t vocab, bool quantized, bool tied) {
  const uint64_t d = 8, h = 32, q = 8, kv = 4;
  w.String("general.architecture", "llama");
  w.Uint32("llama.embedding_length", d);
  w.Uint32("llama.feed_forward_length", h);
  w.Uint32("llama.block_count", 1);
  w.Uint32("llama.attention.head_count", 2);
  w.Uint32("llama.attention.head_count_kv", 1);
  w.Uint32("llama.context_length", 64);
  w.Float32("llama.rope.freq_base", 10000.0f);
  w.Float32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.Uint32("llama.rope.dimension_count", 4);
  w.Tensor("token_embd.weight", {d, vocab}, 0, Floats(d * vocab, 0.1f));
  w.Tensor("output_norm.weight", {d}, 0, Floats(d, 1.0f));
  if (!tied) w.Tensor("output.weight", {d, vocab}, 0, Floats(d * vocab, 0.2f));
  w.Tensor("blk.0.attn_norm.weight", {d}, 0, Floats(d, 1.0f));
  w.Tensor("blk.0.attn_q.weight", {d, q}, 0, Floats(d * q, 0.1f));
  w.Tensor("blk.0.attn_k.weight", {d, kv}, 0, Floats(d * kv, 0.1f));
  w.Tensor("blk.0.attn_v.weight", {d, kv}, 0, Floats(d * kv, 0.1f));
  w.Tensor("blk.0.attn_output.weight", {q, d}, 0, Floats(q * d, 0.1f));
  w.Tensor("blk.0.ffn_norm.weight", {d}, 0, Floats(d, 1.0f));
  if (quantized) {
    // 256 elements each: 8 blocks of 32.
    std::vector<uint8_t> q8(8 * 34, 0x11), q4(8 * 18, 0x37), f16(256 * 2, 0x3c), bf16(256 * 2);
    for (size_t i = 0; i < bf16.size(); i += 2) bf16[i + 1] = 0x3f;
    w.Tensor("blk.0.ffn_gate.weight", {d, h}, 8, q8);
    w.Tensor("blk.0.ffn_down.weight", {h, d}, 2, q4);
    w.Tensor("blk.0.ffn_up.weight", {d, h}, 1, f16);
    w.Tensor("extra.bf16", {256}, 30, bf16);
    w.Tensor("extra.q4_1", {32}, 3, std::vector<uint8_t>(20, 0x21));
  } else {
    w.Tensor("blk.0.ffn_gate.weight", {d, h}, 0, Floats(d * h, 0.1f));
    w.Tensor("blk.0.ffn_down.weight", {h, d}, 0, Floats(h * d, 0.1f));
    w.Tensor("blk.0.ffn_up.weight", {d, h}, 0, Floats(d * h, 0.1f));
  }
}

std::string GgufBytes(const engine::testing::GgufWriter& w) {
  const std::string tmp = absl::StrCat(g_root, "/.gguf.tmp");
  w.Write(tmp);
  std::string bytes = ReadFile(tmp);
  std::remove(tmp.c_str());
  return bytes;
}

void CheckGguf(const std::string& name) {
  const std::string path = absl::StrCat(g_root, "/gguf/", name);
  MustLoad(engine::LoadGguf(path).status(), path);
  auto file = engine::GgufFile::Open(path);
  MustLoad(file.status(), path);
  MustLoad(engine::TokenizerFromGguf(**file).status(), path);
}

void GgufSeeds() {
  {
    // SentencePiece vocabulary ("llama"), F32 tensors, separate classifier.
    engine::testing::GgufWriter w;
    const std::vector<std::string> tokens = {"<unk>",
                                             "<s>",
                                             "</s>",
                                             "<0x0A>",
                                             "\xe2\x96\x81",
                                             "a",
                                             "b",
                                             "ab",
                                             "\xe2\x96\x81"
                                             "a",
                                             "<0x41>",
                                             "<|im_start|>",
                                             "c"};
    TinyLlama(w, tokens.size(), /*quantized=*/false, /*tied=*/false);
    w.String("tokenizer.ggml.model", "llama");
    w.Strings("tokenizer.ggml.tokens", tokens);
    w.Floats("tokenizer.ggml.scores", {0, 0, 0, -1, -2, -3, -3, -1, -1.5f, -4, 0, -3});
    w.Int32s("tokenizer.ggml.token_type", {2, 3, 3, 6, 1, 1, 1, 1, 1, 6, 4, 1});
    w.Uint32("tokenizer.ggml.bos_token_id", 1);
    w.Uint32("tokenizer.ggml.eos_token_id", 2);
    w.Bool("tokenizer.ggml.add_space_prefix", true);
    Put("gguf", "llama-spm-f32.gguf", GgufBytes(w));
    CheckGguf("llama-spm-f32.gguf");
  }
  {
    // GPT-2 byte-level vocabulary (smollm pre-tokenizer), quantized tensors, tied classifier.
    engine::testing::GgufWriter w;
    const std::vector<std::string> tokens = {"<|endoftext|>",
                                             "<|im_start|>",
                                             "h",
                                             "e",
                                             "l",
                                             "o",
                                             "\xc4\xa0",
                                             "w",
                                             "1",
                                             "'",
                                             "s",
                                             "he",
                                             "ll",
                                             "hell",
                                             "hello",
                                             "\xc4\xa0"
                                             "w"};
    TinyLlama(w, tokens.size(), /*quantized=*/true, /*tied=*/true);
    w.String("tokenizer.ggml.model", "gpt2");
    w.String("tokenizer.ggml.pre", "smollm");
    w.Strings("tokenizer.ggml.tokens", tokens);
    w.Strings("tokenizer.ggml.merges", {"h e", "l l", "he ll", "hell o", "\xc4\xa0 w"});
    std::vector<int32_t> types(tokens.size(), 1);
    types[0] = types[1] = 3;
    w.Int32s("tokenizer.ggml.token_type", types);
    w.Uint32("tokenizer.ggml.bos_token_id", 1);
    w.Uint32("tokenizer.ggml.eos_token_id", 0);
    w.Bool("tokenizer.ggml.add_bos_token", false);
    w.Uint32("general.alignment", 64);
    Put("gguf", "llama-gpt2-quantized.gguf", GgufBytes(w));
    CheckGguf("llama-gpt2-quantized.gguf");
  }
  {
    engine::testing::GgufWriter w;
    w.String("general.architecture", "llama");
    w.Tensor("w", {3, 2}, 0, Floats(6, 1.0f));
    Put("gguf", "v2-minimal.gguf", [&] {
      const std::string tmp = absl::StrCat(g_root, "/.gguf.tmp");
      w.Write(tmp, 0, /*version=*/2);
      std::string bytes = ReadFile(tmp);
      std::remove(tmp.c_str());
      return bytes;
    }());
  }
}

// ---- llama2.c -------------------------------------------------------------------------------

// dim 8, hidden 16, 1 layer, 2 heads, 1 KV head, vocabulary `vocab` (negative: separate
// classifier), seq_len 4.
std::string Llama2c(int32_t vocab) {
  const int32_t header[7] = {8, 16, 1, 2, 1, vocab, 4};
  std::string out(reinterpret_cast<const char*>(header), sizeof(header));
  const uint64_t d = 8, h = 16, hd = 4, q = 8, kv = 4, v = static_cast<uint64_t>(std::abs(vocab));
  const uint64_t floats = v * d + d + d * q + 2 * d * kv + q * d + d + 2 * h * d + d * h + d +
                          4 * hd + (vocab < 0 ? v * d : 0);
  for (uint64_t i = 0; i < floats; ++i) Append(out, 0.01f * static_cast<float>(i % 13));
  return out;
}

void Llama2cSeeds() {
  Put("llama2c_checkpoint", "shared-classifier.bin", Llama2c(8));
  Put("llama2c_checkpoint", "own-classifier.bin", Llama2c(-8));
  // The tokenizer: uint16 vocabulary size, then llama2.c's format.
  const std::vector<std::string> pieces = {"<unk>", "<s>", "</s>", " ",      "a",
                                           "b",     "ab",  " a",   "<0x41>", "\xc3\xa9"};
  std::string tok;
  Append(tok, static_cast<uint16_t>(pieces.size()));
  Append(tok, int32_t{6});  // max_token_length
  for (size_t i = 0; i < pieces.size(); ++i) {
    Append(tok, -static_cast<float>(i));
    Append(tok, static_cast<int32_t>(pieces[i].size()));
    tok += pieces[i];
  }
  Put("llama2c_tokenizer", "ten-tokens.bin", tok);
  for (const char* name : {"shared-classifier.bin", "own-classifier.bin"}) {
    const std::string path = absl::StrCat(g_root, "/llama2c_checkpoint/", name);
    MustLoad(engine::LoadLlama2c(path).status(), path);
  }
  const std::string tokenizer = absl::StrCat(g_root, "/.tokenizer.tmp");
  std::ofstream(tokenizer, std::ios::binary).write(tok.data() + 2, tok.size() - 2);
  MustLoad(engine::LoadLlama2cTokenizer(tokenizer, pieces.size()).status(), "ten-tokens.bin");
  std::remove(tokenizer.c_str());
}

// ---- inputs of the parsers' regression tests (tests/tools/engine, tests/cachemgr/util) --------

void RegressionSeeds() {
  auto llama2c = [](std::vector<int32_t> header, size_t floats) {
    std::string out(reinterpret_cast<const char*>(header.data()), header.size() * 4);
    return out + std::string(floats * 4, '\0');
  };
  Put("llama2c_checkpoint", "regress-size-wraps",
      llama2c({1 << 24, 1 << 24, 4681, 1 << 22, 1 << 22, 16767853, 1}, 4));
  Put("llama2c_checkpoint", "regress-negative-counts",
      llama2c({-(1 << 24), -(1 << 24), 9399, 1 << 23, 1 << 23, 16758417, 1}, 510));
  {
    std::string tok;
    Append(tok, uint16_t{4});
    Append(tok, INT32_MAX);
    Append(tok, 0.0f);
    Append(tok, INT32_MAX);  // a piece of 2^31 - 1 bytes
    tok += "abc";
    Put("llama2c_tokenizer", "regress-long-piece", tok);
  }
  auto gguf = [](const char* name, auto&& fill) {
    engine::testing::GgufWriter w;
    fill(w);
    Put("gguf", name, GgufBytes(w));
  };
  gguf("regress-offset-wraps", [](auto& w) { w.TensorAt("far", {4}, 0, ~uint64_t{0} - 63); });
  gguf("regress-alignment-huge", [](auto& w) {
    w.Float64("general.alignment", 1e300);
    w.Tensor("w", {2}, 0, Floats(2, 1.0f));
  });
  gguf("regress-elements-wrap", [](auto& w) {
    w.Tensor("wrap", {uint64_t{1} << 32, uint64_t{1} << 32}, 0, {});
  });
  gguf("regress-token-type-beyond", [](auto& w) {
    w.String("tokenizer.ggml.model", "llama");
    w.Strings("tokenizer.ggml.tokens", {"a", "b", "c"});
    w.Floats("tokenizer.ggml.scores", {0, -1, -2});
    w.Int32s("tokenizer.ggml.token_type", {1, 1, 1, 3});
  });
  gguf("regress-bos-beyond", [](auto& w) {
    w.String("tokenizer.ggml.model", "gpt2");
    w.Strings("tokenizer.ggml.tokens", {"a", "b", "c"});
    w.Strings("tokenizer.ggml.merges", {"a b"});
    w.Float32("tokenizer.ggml.bos_token_id", 1e30f);
  });
  gguf("regress-block-count", [](auto& w) {
    TinyLlama(w, 4, /*quantized=*/false, /*tied=*/true);
    w.Uint32("llama.block_count", 4000000000u);
  });
}

// ---- RPC requests ---------------------------------------------------------------------------
// Tokens "0" / "1" stand for the fixture's clients; sequences s0, s1, c0, c1 (client 0) and
// t0 (client 1) exist (fuzz/service_harness.h).

v1::ModelSpec FixtureModel() {
  v1::ModelSpec m;
  m.set_name("fuzz-model");
  m.set_num_layers(2);
  m.set_num_q_heads(4);
  m.set_num_kv_heads(2);
  m.set_head_dim(8);
  m.set_dtype(v1::DTYPE_FP32);
  m.set_block_size(4);
  m.set_layout(v1::CACHE_LAYOUT_FLASH_ATTN);
  m.mutable_rope()->set_style(v1::ROPE_STYLE_INTERLEAVED);
  m.mutable_rope()->set_theta(10000);
  return m;
}

void RpcSeeds() {
  {
    v1::AttachRequest r;
    r.set_client_name("engine-2");
    *r.mutable_model() = FixtureModel();
    Put("rpc_attach", "join-fixture-pool", r);
    r.mutable_model()->set_name("other");
    r.mutable_model()->set_block_size(0);
    r.mutable_model()->set_dtype(v1::DTYPE_BF16);
    r.mutable_model()->set_layout(v1::CACHE_LAYOUT_FLASHINFER);
    r.mutable_model()->mutable_rope()->set_style(v1::ROPE_STYLE_HALF_SPLIT);
    r.mutable_model()->mutable_rope()->set_theta(500000);
    r.set_num_blocks(16);
    r.set_input_buffer_bytes(4096);
    Put("rpc_attach", "new-pool", r);
    r.set_num_blocks(0);
    Put("rpc_attach", "default-pool-size", r);
    *r.mutable_model() = FixtureModel();
    r.mutable_model()->set_head_dim(16);
    Put("rpc_attach", "model-mismatch", r);
  }
  for (const char* token : {"0", "1", "bogus"}) {
    v1::HeartbeatRequest h;
    h.set_session_token(token);
    Put("rpc_heartbeat", absl::StrCat("token-", token), h);
    v1::DetachRequest d;
    d.set_session_token(token);
    Put("rpc_detach", absl::StrCat("token-", token), d);
    v1::ListSequencesRequest l;
    l.set_session_token(token);
    Put("rpc_list_sequences", absl::StrCat("token-", token), l);
  }
  Put("rpc_list_sequences", "operator", v1::ListSequencesRequest());
  Put("rpc_stats", "empty", v1::StatsRequest());
  {
    struct A {
      const char* name;
      const char* token;
      const char* sequence;
      uint32_t tokens;
    };
    for (const A& a :
         {A{"extend", "0", "s0", 5}, A{"new", "0", "n0", 17}, A{"cow-tail", "0", "s1", 1},
          A{"other-client", "1", "s0", 1}, A{"parked", "0", "c0", 1}, A{"fetched", "0", "c1", 3},
          A{"whole-pool", "1", "t1", 256}}) {
      v1::AllocateRequest r;
      r.set_session_token(a.token);
      r.set_sequence_id(a.sequence);
      r.set_num_new_tokens(a.tokens);
      Put("rpc_allocate", a.name, r);
    }
  }
  for (const auto& [name, token, sequence] :
       std::vector<std::tuple<std::string, std::string, std::string>>{{"own", "0", "s0"},
                                                                      {"fork", "0", "s1"},
                                                                      {"operator", "", "t0"},
                                                                      {"other-client", "1", "s0"},
                                                                      {"compressed", "0", "c1"}}) {
    v1::FreeRequest f;
    f.set_session_token(token);
    f.set_sequence_id(sequence);
    Put("rpc_free", name, f);
    v1::GetSequenceRequest g;
    g.set_session_token(token);
    g.set_sequence_id(sequence);
    g.set_include_kv_digest(true);
    Put("rpc_get_sequence", name, g);
  }
  {
    // A scheduler step over the fixture's sequences: appends (one copying a shared tail), a
    // fork, a free, failures in between; and one asking for slot mappings.
    v1::StepRequest step;
    step.set_session_token("0");
    auto allocate = [&](const char* id, uint32_t n) {
      v1::StepAllocate* a = step.add_ops()->mutable_allocate();
      a->set_sequence_id(id);
      a->set_num_new_tokens(n);
    };
    allocate("s0", 1);
    allocate("s1", 1);
    v1::StepFork* fork = step.add_ops()->mutable_fork();
    fork->set_parent_sequence_id("s0");
    fork->set_child_sequence_id("k0");
    allocate("k0", 2);
    step.add_ops()->set_free("s1");
    allocate("n0", 0);
    allocate("c0", 1);
    allocate("n1", 9);
    // Prefix lookups: the fixture stored "h0", "h1" (PrefixSeeds); a hit, a partial one, a bad
    // hash.
    for (const std::vector<std::string>& hashes :
         std::vector<std::vector<std::string>>{{"h0", "h1"}, {"h0", "zz", "h1"}, {""}}) {
      v1::StepMatchPrefix* m = step.add_ops()->mutable_match_prefix();
      for (const std::string& h : hashes) m->add_block_hashes(h);
    }
    Put("rpc_step", "decode", step);
    step.set_include_slot_mapping(true);
    Put("rpc_step", "slots", step);
    step.set_session_token("1");
    Put("rpc_step", "other-client", step);
  }
  for (const auto& [name, parent, child] :
       std::vector<std::tuple<std::string, std::string, std::string>>{{"plain", "s0", "k0"},
                                                                      {"compressed", "c1", "k1"},
                                                                      {"exists", "s0", "s1"},
                                                                      {"parked", "c0", "k2"}}) {
    v1::ForkRequest f;
    f.set_session_token("0");
    f.set_parent_sequence_id(parent);
    f.set_child_sequence_id(child);
    Put("rpc_fork", name, f);
  }
  {
    struct C {
      const char* name;
      const char* token;
      const char* sequence;
      const char* preset;
      v1::InputSource input;
      double ratio;
      bool bytes;
    };
    for (const C& c :
         {C{"snapkv-scores", "0", "s0", "snapkv", v1::INPUT_SOURCE_SCORES, 0.5, false},
          C{"codebook-fork", "0", "s1", "codebook", v1::INPUT_SOURCE_NONE, 1.0, false},
          C{"fullkv-operator", "", "t0", "fullkv", v1::INPUT_SOURCE_NONE, 1.0, false},
          C{"spindlekv-queries", "0", "s0", "spindlekv", v1::INPUT_SOURCE_WINDOW_QUERIES, 0.4,
            true},
          C{"h2o-scores", "0", "s1", "h2o", v1::INPUT_SOURCE_SCORES, 0.3, false},
          C{"pyramidkv", "0", "s0", "pyramidkv", v1::INPUT_SOURCE_SCORES, 0.5, false},
          C{"zigzagkv", "1", "t0", "zigzagkv", v1::INPUT_SOURCE_SCORES, 0.5, false},
          C{"streamingllm", "1", "t0", "streamingllm", v1::INPUT_SOURCE_NONE, 0.5, false},
          C{"already", "0", "c0", "snapkv", v1::INPUT_SOURCE_SCORES, 0.5, false}}) {
      v1::CompressRequest r;
      r.set_session_token(c.token);
      r.set_sequence_id(c.sequence);
      r.mutable_policy()->set_preset(c.preset);
      r.mutable_policy()->set_window(2);
      r.set_input(c.input);
      if (c.input == v1::INPUT_SOURCE_WINDOW_QUERIES) r.set_num_queries(2);
      if (c.bytes) {
        r.set_byte_ratio(c.ratio);
      } else {
        r.set_reserve_ratio(c.ratio);
      }
      Put("rpc_compress", c.name, r);
    }
    v1::CompressRequest background;
    background.set_session_token("0");
    background.set_sequence_id("s1");
    background.mutable_policy()->set_preset("snapkv");
    background.set_input(v1::INPUT_SOURCE_SCORES);
    background.set_reserve_ratio(0.5);
    background.set_background(true);
    Put("rpc_compress", "background", background);
  }
  for (const auto& [name, token, sequence, wait] :
       std::vector<std::tuple<std::string, std::string, std::string, bool>>{
           {"apply-appended", "0", "b0", true},
           {"apply-no-wait", "0", "b0", false},
           {"none-pending", "0", "s0", true},
           {"compressed", "0", "c0", true},
           {"other-client", "1", "b0", true},
           {"operator", "", "b0", true}}) {
    v1::FinishCompressRequest r;
    r.set_session_token(token);
    r.set_sequence_id(sequence);
    r.set_wait(wait);
    Put("rpc_finish_compress", name, r);
  }
  for (const auto& [name, sequence, layers] :
       std::vector<std::tuple<std::string, std::string, std::vector<uint32_t>>>{
           {"all-parked", "c0", {}},
           {"one-layer", "c0", {1}},
           {"twice", "c1", {0, 0}},
           {"resident", "c1", {}},
           {"plain", "s0", {}}}) {
    v1::FetchRequest f;
    f.set_session_token("0");
    f.set_sequence_id(sequence);
    for (uint32_t l : layers) f.add_layers(l);
    Put("rpc_fetch", name, f);
    v1::ParkRequest p;
    p.set_session_token("0");
    p.set_sequence_id(sequence);
    for (uint32_t l : layers) p.add_layers(l);
    Put("rpc_park", name, p);
  }
  {
    Put("rpc_watch", "all", v1::WatchRequest());
    v1::WatchRequest w;
    w.add_types(v1::EVENT_TYPE_SEQUENCE_ALLOCATED);
    Put("rpc_watch", "allocated", w);
    w.clear_types();
    w.add_types(v1::EVENT_TYPE_SEQUENCE_FREED);
    w.add_types(v1::EVENT_TYPE_POOL_CREATED);
    Put("rpc_watch", "freed-created", w);
    w.add_types(static_cast<v1::EventType>(99));
    Put("rpc_watch", "unknown-type", w);
  }
}

// Prefix store requests: the fixture stored "h0", "h1" (s0), "g0" (t0) and "e0", "e1" (a freed
// sequence's blocks).
void PrefixSeeds() {
  const std::string long_hash(65, 'x');
  struct S {
    const char* name;
    const char* token;
    const char* sequence;
    uint32_t first_block;
    std::vector<std::string> hashes;
  };
  for (const S& s :
       {S{"already-stored", "0", "s0", 0, {"h0", "h1"}}, S{"new-tail", "0", "s1", 2, {"s1-2"}},
        S{"repeated", "0", "s1", 0, {"r", "r", "r"}}, S{"other-client", "1", "t0", 0, {"t"}},
        S{"not-full", "0", "s0", 2, {"x"}}, S{"compressed", "0", "c1", 0, {"x"}},
        S{"others-sequence", "1", "s0", 0, {"x"}}, S{"no-hashes", "0", "s0", 0, {}},
        S{"long-hash", "0", "s0", 0, {"a", long_hash}}, S{"operator", "", "s0", 0, {"x"}}}) {
    v1::StorePrefixRequest r;
    r.set_session_token(s.token);
    r.set_sequence_id(s.sequence);
    r.set_first_block(s.first_block);
    for (const std::string& h : s.hashes) r.add_block_hashes(h);
    Put("rpc_store_prefix", s.name, r);
  }
  // Entries held as codebooks: the fixture's KV, thresholds in and out of range, a position.
  for (auto [name, theta_k, theta_v, position] :
       {std::tuple{"codebook", 0.0f, 0.0f, int64_t{-1}},
        std::tuple{"codebook-thetas", 0.5f, 1.0f, int64_t{4}},
        std::tuple{"codebook-bad-theta", 1.5f, -1.0f, int64_t{-1}},
        std::tuple{"codebook-far-position", 0.0f, 0.0f, int64_t{0xfffffff0}}}) {
    v1::StorePrefixRequest r;
    r.set_session_token("0");
    r.set_sequence_id("s1");
    r.set_first_block(0);
    r.add_block_hashes(std::string("cb-") + name);
    r.mutable_codebook()->set_theta_k(theta_k);
    r.mutable_codebook()->set_theta_v(theta_v);
    if (position >= 0) r.mutable_codebook()->set_first_position(position);
    Put("rpc_store_prefix", name, r);
  }
  struct L {
    const char* name;
    const char* token;
    const char* sequence;
    std::vector<std::string> hashes;
  };
  for (const L& l :
       {L{"chain", "0", "n0", {"h0", "h1", "h2"}}, L{"other-client", "1", "n0", {"h0", "h1"}},
        L{"store-only", "0", "n0", {"e0", "e1"}}, L{"gap", "0", "n0", {"h0", "zz", "h1"}},
        L{"miss", "1", "n0", {"zz"}}, L{"exists", "0", "s0", {"h0"}},
        L{"repeated", "0", "n0", {"g0", "g0"}}, L{"no-hashes", "0", "n0", {}},
        L{"long-hash", "0", "n0", {long_hash}}, L{"bad-id", "0", "has space", {"h0"}},
        L{"operator", "", "n0", {"h0"}}}) {
    v1::MatchPrefixRequest m;
    m.set_session_token(l.token);
    for (const std::string& h : l.hashes) m.add_block_hashes(h);
    Put("rpc_match_prefix", l.name, m);
    v1::LoadPrefixRequest r;
    r.set_session_token(l.token);
    r.set_sequence_id(l.sequence);
    for (const std::string& h : l.hashes) r.add_block_hashes(h);
    Put("rpc_load_prefix", l.name, r);
  }
}

// Programs (fuzz/service_program_fuzzer.cc) are read by FuzzedDataProvider, whose choices do not
// map to bytes a person would write: a few pseudo-random programs of different lengths.
void ProgramSeeds() {
  uint64_t state = 0x2545F4914F6CDD1Dull;
  for (size_t length : {32, 96, 256, 640}) {
    std::string program;
    for (size_t i = 0; i < length; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      program.push_back(static_cast<char>(state >> 56));
    }
    Put("service_program", absl::StrCat("random-", length), program);
  }
}

}  // namespace
}  // namespace cachemgr::fuzz

namespace cachemgr::fuzz {

// The fast path target's input: requests as [method][2-byte length][payload], or 0xff and a
// raw stream (fast_path_fuzzer.cc).
std::string FastRequest(uint8_t method, const std::string& payload) {
  std::string out(1, static_cast<char>(method));
  out.push_back(static_cast<char>(payload.size() & 0xff));
  out.push_back(static_cast<char>(payload.size() >> 8));
  return out + payload;
}

void FastPathSeeds() {
  for (const char* token : {"0", "1"}) {
    v1::HeartbeatRequest beat;
    beat.set_session_token(token);
    v1::AllocateRequest allocate;
    allocate.set_session_token(token);
    allocate.set_sequence_id("s0");
    allocate.set_num_new_tokens(3);
    v1::FreeRequest free;
    free.set_session_token(token);
    free.set_sequence_id("s1");
    v1::ForkRequest fork;
    fork.set_session_token(token);
    fork.set_parent_sequence_id("c1");
    fork.set_child_sequence_id("k1");
    v1::StepRequest step;
    step.set_session_token(token);
    v1::StepAllocate* a = step.add_ops()->mutable_allocate();
    a->set_sequence_id("k1");
    a->set_num_new_tokens(5);
    step.add_ops()->set_free("c0");
    step.set_include_slot_mapping(true);
    Put("fast_path", std::string("calls-") + token,
        FastRequest(1, beat.SerializeAsString()) + FastRequest(2, allocate.SerializeAsString()) +
            FastRequest(3, free.SerializeAsString()) + FastRequest(4, fork.SerializeAsString()) +
            FastRequest(5, step.SerializeAsString()));
  }
  // A method that names nothing, bytes that do not parse, a request without a token.
  Put("fast_path", "refusals",
      FastRequest(9, "x") + FastRequest(2, std::string("\x08\xff\xff", 3)) + FastRequest(5, ""));
  // Raw streams: a frame over the limit, an empty frame, a frame cut off.
  Put("fast_path", "raw-over-limit", std::string("\xff\xff\xff\xff\x7f\x02", 6));
  Put("fast_path", "raw-empty", std::string("\xff\x00\x00\x00\x00", 5));
  Put("fast_path", "raw-cut", std::string("\xff\x10\x00\x00\x00\x01\x0a", 7));
}

}  // namespace cachemgr::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  cachemgr::fuzz::g_root = argv[1];
  mkdir(argv[1], 0755);
  cachemgr::fuzz::ConfigSeeds();
  cachemgr::fuzz::NpySeeds();
  cachemgr::fuzz::GgufSeeds();
  cachemgr::fuzz::Llama2cSeeds();
  cachemgr::fuzz::RegressionSeeds();
  cachemgr::fuzz::RpcSeeds();
  cachemgr::fuzz::PrefixSeeds();
  cachemgr::fuzz::ProgramSeeds();
  cachemgr::fuzz::FastPathSeeds();
  return 0;
}
