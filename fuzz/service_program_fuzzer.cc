// Fuzzes sequences of calls on one daemon: the input is a small program, each step one RPC
// (through the in-process service, service_harness.h) or one thing a client or time does
// beside the RPCs (an engine writing the KV of the tokens it allocated; the clock advancing
// and the lease reaper running). The state starts as the harness's fixture.
//
// Oracles after every step, besides the sanitizers: CacheManager::CheckInvariants() and the
// stats add up; a failed call changed nothing; a successful one, and a KV write, changed no
// sequence it did not name (block tables and KV digests): no call on one sequence, by one
// client, moves or corrupts another's blocks.
#include <fuzzer/FuzzedDataProvider.h>
#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachemgr/host/memfd_region.h"
#include "cachemgr/service/proto_convert.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/service_harness.h"

namespace cachemgr::fuzz {
namespace {

constexpr size_t kMaxSteps = 48;
const char* const kSequences[] = {"s0", "s1", "c0", "c1", "t0", "a", "b", "c"};
// Block hashes: the fixture's stored ones (service_harness.h) and a few more.
const char* const kHashes[] = {"h0", "h1", "g0", "e0", "e1", "n0", "n1", "n2"};
const char* const kPresets[] = {"fullkv",    "streamingllm", "h2o",      "snapkv",
                                "pyramidkv", "pyramidinfer", "zigzagkv", "codebook",
                                "spindlekv", "bogus"};

// A client the program knows: its token and, once mapped, its pool memory (to write KV).
struct Client {
  std::string token;
  MemfdRegion pool;
  kernels::KvLayerLayout layout;
  std::vector<uint64_t> layer_offsets;
};

// The slots of a sequence's last Allocate, per layer, while writing them touches only that
// sequence (any later call naming it, or a fork of it, ends that).
struct LastAllocation {
  size_t client = 0;
  std::vector<std::vector<int64_t>> slots;
};

class Program {
 public:
  Program(const uint8_t* data, size_t size) : in_(data, size), h_(ServiceHarness::Get()) {}

  void Run() {
    h_.Reset();
    const PoolDescription& pool = h_.fixture_pool();
    for (int c = 0; c < kFixtureClients; ++c) {
      AddClient(h_.token(c));
      clients_.back().layout = pool.model.LayerLayout(pool.num_blocks);
      for (const LayerPlacement& l : pool.layers) clients_.back().layer_offsets.push_back(l.offset);
    }
    for (size_t step = 0; step < kMaxSteps && in_.remaining_bytes() > 0; ++step) Step();
  }

 private:
  // ---- the program's choices ----
  size_t ClientIndex() { return in_.ConsumeIntegralInRange<size_t>(0, clients_.size()); }
  // "" (an operator call) for the index one past the clients.
  std::string Token(size_t client) const {
    return client < clients_.size() ? clients_[client].token : std::string();
  }
  std::string SequenceId() {
    if (in_.ConsumeIntegralInRange<int>(0, 15) == 0) return in_.ConsumeRandomLengthString(300);
    return in_.PickValueInArray(kSequences);
  }
  std::vector<uint32_t> Layers() {
    std::vector<uint32_t> layers(in_.ConsumeIntegralInRange<size_t>(0, 3));
    for (uint32_t& l : layers) l = in_.ConsumeIntegralInRange<uint32_t>(0, 3);
    return layers;
  }
  // 0-4 hashes, now and then one of arbitrary bytes (too long, empty).
  std::vector<std::string> Hashes() {
    std::vector<std::string> hashes(in_.ConsumeIntegralInRange<size_t>(0, 4));
    for (std::string& h : hashes) {
      h = in_.ConsumeIntegralInRange<int>(0, 15) == 0 ? in_.ConsumeRandomLengthString(70)
                                                      : in_.PickValueInArray(kHashes);
    }
    return hashes;
  }
  uint32_t Count(uint32_t small_max) {
    return in_.ConsumeBool() ? in_.ConsumeIntegralInRange<uint32_t>(0, small_max)
                             : in_.ConsumeIntegral<uint32_t>();
  }

  void AddClient(const std::string& token) {
    Client c;
    c.token = token;
    clients_.push_back(std::move(c));
    MapPool(clients_.size() - 1);
  }

  // Maps the client's pool (and fills its input buffer with scores / queries).
  void MapPool(size_t index) {
    Client& c = clients_[index];
    absl::StatusOr<std::vector<UniqueFd>> fds = h_.manager().ShareFds(c.token);
    if (!fds.ok() || fds->size() != 2) return;
    struct stat st {};
    if (fstat((*fds)[0].get(), &st) != 0) return;
    absl::StatusOr<MemfdRegion> pool =
        MemfdRegion::Map(std::move((*fds)[0]), static_cast<size_t>(st.st_size));
    if (fstat((*fds)[1].get(), &st) != 0 || !pool.ok()) return;
    absl::StatusOr<MemfdRegion> input =
        MemfdRegion::Map(std::move((*fds)[1]), static_cast<size_t>(st.st_size));
    if (input.ok()) {
      auto* f = reinterpret_cast<float*>(input->data());
      for (size_t i = 0; i < input->size() / 4; ++i) f[i] = static_cast<float>(i % 17) / 17.0f;
    }
    c.pool = *std::move(pool);
  }

  // ---- one step ----
  void Step() {
    const std::map<std::string, std::string> before = h_.Sequences();
    const std::string state_before = h_.StateDigest();
    std::set<std::string> named;
    bool others_may_vanish = false;
    bool read_only = false;  // a successful call changes no sequence, named ones included
    grpc::Status status;
    const char* what = "";
    switch (in_.ConsumeIntegralInRange<int>(0, 17)) {
      case 0:
        what = "Attach";
        status = Attach();
        break;
      case 1: {
        what = "Heartbeat";
        v1::HeartbeatRequest r;
        r.set_session_token(Token(ClientIndex()));
        status = Call("Heartbeat", r);
        break;
      }
      case 2: {
        what = "Detach";
        v1::DetachRequest r;
        r.set_session_token(Token(ClientIndex()));
        status = Call("Detach", r);
        others_may_vanish = true;
        break;
      }
      case 3:
        what = "Allocate";
        status = Allocate(&named);
        break;
      case 4: {
        what = "Free";
        v1::FreeRequest r;
        r.set_session_token(Token(ClientIndex()));
        r.set_sequence_id(SequenceId());
        named.insert(r.sequence_id());
        status = Call("Free", r);
        break;
      }
      case 5: {
        what = "Fork";
        v1::ForkRequest r;
        r.set_session_token(Token(ClientIndex()));
        r.set_parent_sequence_id(SequenceId());
        r.set_child_sequence_id(SequenceId());
        named = {r.parent_sequence_id(), r.child_sequence_id()};
        status = Call("Fork", r);
        break;
      }
      case 6: {
        what = "GetSequence";
        v1::GetSequenceRequest r;
        r.set_session_token(Token(ClientIndex()));
        r.set_sequence_id(SequenceId());
        r.set_include_kv_digest(in_.ConsumeBool());
        status = Call("GetSequence", r);
        break;
      }
      case 7: {
        what = "ListSequences";
        v1::ListSequencesRequest r;
        r.set_session_token(Token(ClientIndex()));
        status = Call("ListSequences", r);
        break;
      }
      case 8:
        what = "Stats";
        status = Call("Stats", v1::StatsRequest());
        break;
      case 9:
        what = "Compress";
        status = Compress(&named);
        break;
      case 17: {
        what = "FinishCompress";
        v1::FinishCompressRequest r;
        r.set_session_token(Token(ClientIndex()));
        r.set_sequence_id(SequenceId());
        r.set_wait(in_.ConsumeBool());
        named.insert(r.sequence_id());
        status = Call("FinishCompress", r);
        h_.SettleBackground(r.sequence_id());
        break;
      }
      case 10:
      case 11: {
        const bool fetch = in_.ConsumeBool();
        what = fetch ? "Fetch" : "Park";
        v1::FetchRequest f;
        v1::ParkRequest p;
        const std::string token = Token(ClientIndex()), sequence = SequenceId();
        named.insert(sequence);
        const std::vector<uint32_t> layers = Layers();
        if (fetch) {
          f.set_session_token(token);
          f.set_sequence_id(sequence);
          for (uint32_t l : layers) f.add_layers(l);
          status = Call("Fetch", f);
        } else {
          p.set_session_token(token);
          p.set_sequence_id(sequence);
          for (uint32_t l : layers) p.add_layers(l);
          status = Call("Park", p);
        }
        break;
      }
      case 12: {
        what = "ExpireLeases";
        // Up to twice the lease: some clients expire, the reaper frees what they held.
        const auto lease = h_.options().lease_timeout;
        h_.clock().Advance(lease * in_.ConsumeIntegralInRange<int>(0, 200) / 100);
        h_.manager().ExpireLeases();
        others_may_vanish = true;
        break;
      }
      case 13:
        what = "WriteKv";
        WriteKv(&named);
        break;
      case 14: {
        what = "StorePrefix";
        v1::StorePrefixRequest r;
        r.set_session_token(Token(ClientIndex()));
        r.set_sequence_id(SequenceId());
        r.set_first_block(Count(4));
        for (const std::string& h : Hashes()) r.add_block_hashes(h);
        if (in_.ConsumeBool()) {  // held as codebooks
          r.mutable_codebook()->set_theta_k(in_.ConsumeFloatingPointInRange<float>(0.0f, 1.0f));
          r.mutable_codebook()->set_theta_v(in_.ConsumeFloatingPointInRange<float>(0.0f, 1.0f));
          if (in_.ConsumeBool()) r.mutable_codebook()->set_first_position(Count(64));
        }
        // Named so that its blocks, shared with the store now, are not written as its own.
        named.insert(r.sequence_id());
        read_only = true;
        std::string bytes;
        status = Call("StorePrefix", r, &bytes);
        v1::StorePrefixResponse response;
        if (status.ok()) {
          Check(response.ParseFromString(bytes) &&
                    uint64_t{response.stored()} + response.already_stored() ==
                        static_cast<uint64_t>(r.block_hashes_size()),
                "StorePrefix: stored + already_stored != hashes");
        }
        break;
      }
      case 15: {
        what = "MatchPrefix";
        v1::MatchPrefixRequest r;
        r.set_session_token(Token(ClientIndex()));
        for (const std::string& h : Hashes()) r.add_block_hashes(h);
        read_only = true;
        std::string bytes;
        status = Call("MatchPrefix", r, &bytes);
        v1::MatchPrefixResponse response;
        if (status.ok()) {
          Check(response.ParseFromString(bytes) &&
                    response.matched_blocks() <= static_cast<uint32_t>(r.block_hashes_size()),
                "MatchPrefix matched more hashes than it was given");
        }
        break;
      }
      case 16: {
        what = "LoadPrefix";
        v1::LoadPrefixRequest r;
        r.set_session_token(Token(ClientIndex()));
        r.set_sequence_id(SequenceId());
        for (const std::string& h : Hashes()) r.add_block_hashes(h);
        named.insert(r.sequence_id());
        std::string bytes;
        status = Call("LoadPrefix", r, &bytes);
        v1::LoadPrefixResponse response;
        if (status.ok()) {
          Check(response.ParseFromString(bytes), "LoadPrefix: unparseable response");
          Check(response.loaded_blocks() + uint64_t{response.corrupt_blocks()} <=
                    static_cast<uint64_t>(r.block_hashes_size()),
                "LoadPrefix: loaded + corrupt > hashes");
          // Engines write only the slots Allocate gave them (WriteKv): no stored block changes.
          Check(response.corrupt_blocks() == 0, "LoadPrefix found a stored block corrupt");
          Check(response.has_sequence() == (response.loaded_blocks() > 0),
                "LoadPrefix: a sequence exactly when it loaded blocks");
        }
        break;
      }
    }
    h_.CheckSane();
    // Any sequence the step named loses its "last allocation" (forks and compaction move rows).
    for (const std::string& id : named) {
      if (what != std::string("Allocate")) last_.erase(id);
    }
    if (others_may_vanish) last_.clear();
    if (!status.ok()) {
      Check(h_.StateDigest() == state_before,
            absl::StrCat("a failed ", what, " changed the daemon's state (", status.error_message(),
                         ")"));
      return;
    }
    const std::map<std::string, std::string> after = h_.Sequences();
    if (read_only) Check(after == before, absl::StrCat(what, " changed a sequence"));
    CheckOnlyNamedChanged(what, before, after, named, others_may_vanish);
    for (const auto& [id, sequence] : after) {
      Check(before.contains(id) || named.contains(id),
            absl::StrCat(what, " created sequence ", id, " it did not name"));
    }
  }

  template <typename Request>
  grpc::Status Call(const char* method, const Request& request, std::string* response = nullptr) {
    bool as_operator = false;
    if constexpr (requires { request.session_token(); }) {
      as_operator = request.session_token().empty();
    }
    return h_.CallUnary(method, request.SerializeAsString(), response, as_operator);
  }

  grpc::Status Attach() {
    v1::AttachRequest r;
    r.set_client_name(absl::StrCat("p", clients_.size()));
    v1::ModelSpec* m = r.mutable_model();
    m->set_name(in_.PickValueInArray({"fuzz-model", "m1", "m2"}));
    if (m->name() == "fuzz-model" && in_.ConsumeBool()) {
      m->set_num_layers(2);
      m->set_num_q_heads(4);
      m->set_num_kv_heads(2);
      m->set_head_dim(8);
      m->set_dtype(v1::DTYPE_FP32);
      m->set_block_size(4);
      m->set_layout(v1::CACHE_LAYOUT_FLASH_ATTN);
      m->mutable_rope()->set_style(v1::ROPE_STYLE_INTERLEAVED);
      m->mutable_rope()->set_theta(10000);
    } else {
      m->set_num_layers(in_.ConsumeIntegralInRange<uint32_t>(0, 3));
      m->set_num_kv_heads(in_.ConsumeIntegralInRange<uint32_t>(1, 2));
      m->set_num_q_heads(m->num_kv_heads() * in_.ConsumeIntegralInRange<uint32_t>(1, 2));
      m->set_head_dim(2 * in_.ConsumeIntegralInRange<uint32_t>(0, 8));
      m->set_dtype(static_cast<v1::DType>(in_.ConsumeIntegralInRange<int>(0, 3)));
      m->set_block_size(in_.ConsumeIntegralInRange<uint32_t>(0, 8));
      m->set_layout(static_cast<v1::CacheLayout>(in_.ConsumeIntegralInRange<int>(0, 2)));
      m->mutable_rope()->set_style(
          static_cast<v1::RopeStyle>(in_.ConsumeIntegralInRange<int>(0, 3)));
      m->mutable_rope()->set_theta(in_.ConsumeBool() ? 10000.0 : 0.0);
    }
    r.set_num_blocks(Count(64));
    r.set_input_buffer_bytes(in_.ConsumeBool() ? 0 : Count(1 << 16));
    std::string bytes;
    grpc::Status status = Call("Attach", r, &bytes);
    v1::AttachResponse response;
    if (status.ok() && response.ParseFromString(bytes)) {
      AddClient(response.session_token());
      Client& c = clients_.back();
      absl::StatusOr<ModelSpec> model = ModelSpecFromProto(response.pool().model());
      if (model.ok()) c.layout = model->LayerLayout(response.pool().num_blocks());
      for (const v1::LayerPool& l : response.pool().layers()) c.layer_offsets.push_back(l.offset());
    }
    return status;
  }

  grpc::Status Allocate(std::set<std::string>* named) {
    v1::AllocateRequest r;
    const size_t client = ClientIndex();
    r.set_session_token(Token(client));
    r.set_sequence_id(SequenceId());
    r.set_num_new_tokens(in_.ConsumeBool() ? in_.ConsumeIntegralInRange<uint32_t>(0, 40)
                                           : Count(5000));
    named->insert(r.sequence_id());
    std::string bytes;
    grpc::Status status = Call("Allocate", r, &bytes);
    v1::AllocateResponse response;
    if (status.ok() && response.ParseFromString(bytes) && client < clients_.size()) {
      LastAllocation& last = last_[r.sequence_id()];
      last.client = client;
      last.slots.clear();
      for (const v1::LayerAllocation& l : response.layers()) {
        last.slots.emplace_back(l.slot_mapping().begin(), l.slot_mapping().end());
      }
    } else {
      last_.erase(r.sequence_id());
    }
    return status;
  }

  grpc::Status Compress(std::set<std::string>* named) {
    v1::CompressRequest r;
    r.set_session_token(Token(ClientIndex()));
    r.set_sequence_id(SequenceId());
    named->insert(r.sequence_id());
    v1::CompressionPolicy* p = r.mutable_policy();
    p->set_preset(in_.PickValueInArray(kPresets));
    if (in_.ConsumeBool()) p->set_window(in_.ConsumeIntegralInRange<uint32_t>(0, 16));
    if (in_.ConsumeBool()) p->set_sinks(in_.ConsumeIntegralInRange<uint32_t>(0, 8));
    if (in_.ConsumeBool()) p->set_codebook(in_.ConsumeBool());
    if (in_.ConsumeBool()) p->set_theta_k(in_.ConsumeFloatingPointInRange<float>(-1.0f, 1.5f));
    if (in_.ConsumeBool()) p->set_append_batch(in_.ConsumeIntegralInRange<uint32_t>(0, 8));
    if (in_.ConsumeBool())
      p->set_schedule(static_cast<v1::BudgetSchedule>(in_.ConsumeIntegralInRange<int>(0, 5)));
    if (in_.ConsumeBool())
      p->set_gqa(static_cast<v1::GqaMode>(in_.ConsumeIntegralInRange<int>(0, 3)));
    const double ratio =
        in_.ConsumeBool() ? in_.ConsumeProbability<double>() : in_.ConsumeFloatingPoint<double>();
    if (in_.ConsumeBool()) {
      r.set_reserve_ratio(ratio);
    } else {
      r.set_byte_ratio(ratio);
    }
    r.set_input(static_cast<v1::InputSource>(in_.ConsumeIntegralInRange<int>(0, 4)));
    r.set_num_queries(in_.ConsumeIntegralInRange<uint32_t>(0, 8));
    r.set_background(in_.ConsumeBool());
    const grpc::Status status = Call("Compress", r);
    // A background work's end changes the sequence (ready, or its failure): before the next
    // snapshot, so that only calls change what the checks compare.
    h_.SettleBackground(r.sequence_id());
    return status;
  }

  // An engine writing the K and V rows of the tokens a sequence's last Allocate gave it.
  void WriteKv(std::set<std::string>* named) {
    if (last_.empty()) return;
    auto it = last_.begin();
    std::advance(it, in_.ConsumeIntegralInRange<size_t>(0, last_.size() - 1));
    named->insert(it->first);
    Client& c = clients_[it->second.client];
    if (c.pool.data() == nullptr || c.layer_offsets.size() < it->second.slots.size() ||
        c.layout.elem_bytes == 0) {
      return;
    }
    const uint8_t seed = in_.ConsumeIntegral<uint8_t>();
    for (size_t l = 0; l < it->second.slots.size(); ++l) {
      for (int64_t slot : it->second.slots[l]) {
        Check(slot >= 0 &&
                  static_cast<uint64_t>(slot) < uint64_t{c.layout.num_blocks} * c.layout.block_size,
              absl::StrCat("Allocate gave slot ", slot, " outside the pool"));
        for (auto plane : {kernels::KvPlane::kKey, kernels::KvPlane::kValue}) {
          const size_t offset = c.layer_offsets[l] + c.layout.slot_offset(plane, slot);
          Check(offset + c.layout.token_bytes() <= c.pool.size(),
                "a slot's row lies outside the pool region");
          WriteRow(c.pool.data() + offset, c.layout, seed + static_cast<uint32_t>(slot));
        }
      }
    }
  }

  // One token row of finite values (1 <= |x| < 2 for the 16-bit types).
  static void WriteRow(std::byte* row, const kernels::KvLayerLayout& layout, uint32_t seed) {
    const size_t n = size_t{layout.num_kv_heads} * layout.head_dim;
    for (size_t i = 0; i < n; ++i) {
      const uint32_t h = (seed * 2654435761u) ^ static_cast<uint32_t>(i * 40503u);
      if (layout.elem_bytes == 4) {
        const float v = static_cast<float>(h % 2001) / 1000.0f - 1.0f;
        std::memcpy(row + 4 * i, &v, 4);
      } else {
        // fp16 1.x or bf16 1.x, depending on the pool: both are finite either way.
        const uint16_t v = static_cast<uint16_t>(0x3C00 | (h & 0x3FF));
        std::memcpy(row + 2 * i, &v, 2);
      }
    }
  }

  FuzzedDataProvider in_;
  ServiceHarness& h_;
  std::vector<Client> clients_;
  std::map<std::string, LastAllocation> last_;
};

}  // namespace
}  // namespace cachemgr::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cachemgr::fuzz::Program(data, size).Run();
  cachemgr::fuzz::ServiceHarness::Get().Clear();
  return 0;
}
