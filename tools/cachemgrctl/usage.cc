// The usage text and error reporting shared by the subcommands.
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachemgr/compress/compress.h"
#include "tools/cachemgrctl/commands.h"

namespace cachemgr::ctl {

std::string UsageText() {
  return absl::StrCat(
      R"(usage: cachemgrctl <command> [--flag=value ...]

Commands on a running cachemgrd:
  health     is it serving? (exit 1 if not); version and uptime
  stats      pools: occupancy per device, per pool and per layer; arena bytes
  clients    attached clients and their leases
  sequences  every client's sequences
  sequence   one sequence's per-layer block tables and compression state
  watch      the event stream, live
  free       free any client's sequence
  peers      the daemon's peers (--peers) and what its probes last saw of each
  compress --sequence=ID   compress a sequence in the daemon by hand
Offline (no daemon):
  compress   run a compression policy on KV tensors in .npy files
  codebook   build the similarity codebook (SpindleKV Algorithm 1) of a set of vectors
  help       this text

Daemon commands share these flags:
  --socket=PATH        the daemon's Unix socket (default $CACHEMGR_SOCKET, else
                       /run/cachemgr/cachemgr.sock)
  --address=HOST:PORT  TCP instead, with --token_file=FILE (the bearer token)
  --tls                TCP over TLS (implied by the next three), verified with the system's
                       roots or --tls_ca_file=FILE (PEM)
  --tls_cert_file=FILE --tls_key_file=FILE   this client's certificate for mutual TLS
  --operator_token_file=FILE   the operator credential (default: SOCKET.operator when
                       readable). Without it, stats/clients/sequences show only this user's
                       clients and sequences, and free, compress, watch and peers are refused
  --timeout=SECONDS    per-call deadline (default 10)
  --json               proto3 JSON (field names as in proto/cachemgr/v1/cachemgr.proto)
                       instead of tables; watch prints one JSON object per line

cachemgrctl sequence --id=ID [--digest] [--all_blocks]
    --digest            also the daemon's FNV-1a digest of each layer's KV bytes
    --all_blocks        list every block id (default: the first 12)
cachemgrctl watch [--types=T1,T2] [--count=N] [--for=SECONDS]
    --types             event types (e.g. sequence_allocated,client_expired); default all
    --count             exit after N events; --for: after SECONDS (default: until shutdown)
cachemgrctl free --sequence=ID
cachemgrctl compress --sequence=ID [--policy=NAME] [--reserve_ratio=R | --byte_ratio=R]
                     [--sinks=N] [--theta_k=T] [--theta_v=T]
    Operator calls read no inputs: only policies that need no scores work (fullkv,
    streamingllm, codebook); the others are INVALID_ARGUMENT. Default --reserve_ratio=0.2.

cachemgrctl compress --keys=K.npy --values=V.npy (--queries=Q.npy | --scores=S.npy)
                     --out=DIR [flags]
  Inputs (.npy, little-endian, C order; float32 or float16 unless noted):
    --keys=K.npy        [num_layers, num_tokens, num_kv_heads, head_dim], post-RoPE
    --values=V.npy      [num_layers, num_tokens, num_kv_heads, head_dim]
    --queries=Q.npy     [num_layers, num_queries, num_q_heads, head_dim], post-RoPE: the
                        observation-window queries (the last num_queries positions)
    --scores=S.npy      [num_layers, num_q_heads, num_tokens]: precomputed attention column
                        sums, instead of --queries
    --positions=P.npy   [num_tokens] int32/int64 RoPE positions (default 0..num_tokens-1)
    Queries or scores are required unless the policy needs none (fullkv, streamingllm,
    codebook).
  Policy:
    --policy=NAME       preset (default )",
      compress::kDefaultPreset, R"(), one of:
                        )",
      absl::StrJoin(compress::PresetNames(), ", "), R"(
    overrides of the preset's stages:
    --schedule=full|uniform|pyramid|zigzag   --beta=B   --zigzag_tau=T
    --zigzag_min_fraction=F   --scoring=window|accumulated|sinks_recent   --window=W
    --normalization=literal|sum   --pooling=none|avg|max   --pool_kernel=K   --sinks=N
    --gqa=mean|repeat   --codebook=true|false   --theta_k=T   --theta_v=T
    --codebook_scope=layer|kv_head   --codebook_only_if_smaller=true|false
    --codebook_search=lsh|exact
  Target (one of; default --reserve_ratio=0.2):
    --reserve_ratio=R   fraction of tokens kept on average (paper's r)
    --byte_ratio=R      honest bytes held / full KV bytes, met within 1%
  Model:
    --num_q_heads=H     query heads (default: from --queries or --scores; else required)
    --rope=interleaved|half_split|none   RoPE layout of K (required when the policy builds
                        codebooks, which work on pre-RoPE K)
    --rope_theta=10000  --rope_scaling=1  --rotary_dim=0 (0 = head_dim)
    --elem_bytes=2      bytes per stored element, for the byte accounting (1, 2 or 4)
  Outputs in DIR (previous cachemgrctl outputs there are replaced):
    stats.json                    policy, target, bytes, ratios, per-layer summary
    layer<L>_kept.npy             uint32 [num_kv_heads, kept_per_head] token indices
    for layers stored as codebooks, X in {k, v} (k: pre-RoPE keys):
    layer<L>_X_codebook.npy       float32 [entries, head_dim] unit vectors
    layer<L>_X_refs.npy           uint32 [num_kv_heads * kept_per_head]
    layer<L>_X_magnitudes.npy     float32 [num_kv_heads * kept_per_head]
    layer<L>_X_offsets.npy        uint32 [parts + 1]: entry ranges of the codebook parts

cachemgrctl codebook --vectors=X.npy --theta=T --out=DIR
    --vectors=X.npy     float32 (or float16) [n, dim]
    --theta=T           cosine threshold in (0, 1]
  Writes DIR/entries.npy (float32 [entries, dim]), DIR/refs.npy (uint32 [n]) and
  DIR/magnitudes.npy (float32 [n]).

Exit status: 0 success, 1 failure (unreadable input, bad shapes, compression error, an error
status from the daemon, printed as CODE: message), 2 usage error. See docs/OFFLINE.md and
docs/OPERATIONS.md.
)");
}

int ReportError(const std::string& command, const std::string& message, int code) {
  std::fprintf(stderr, "cachemgrctl %s: %s\n", command.c_str(), message.c_str());
  if (code == kExitUsage) std::fputs("run 'cachemgrctl help' for usage\n", stderr);
  return code;
}

}  // namespace cachemgr::ctl
