#include "cachemgr/cache_manager.h"

#include <fcntl.h>
#include <sys/random.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/cache_manager_state.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

namespace {

// 128 random bits as hex, from the kernel's CSPRNG: session tokens are bearer secrets.
std::string RandomToken() {
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

absl::Status CheckSequenceId(const std::string& id, const char* field) {
  if (!IsValidIdentifier(id, kMaxSequenceIdLength)) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must be 1-", kMaxSequenceIdLength,
                                                   " printable characters without spaces"));
  }
  return absl::OkStatus();
}

// Pools are per owner: one tenant never maps another's KV memory.
std::string PoolKey(const std::optional<uid_t>& owner, const std::string& model_name) {
  return absl::StrCat(owner.has_value() ? absl::StrCat("uid ", *owner) : std::string("local"), "/",
                      model_name);
}

std::string OwnerText(const std::optional<uid_t>& owner) {
  return owner.has_value() ? absl::StrCat("uid ", *owner) : std::string("TCP callers");
}

absl::Status OperatorCredentialRequired() {
  return absl::PermissionDeniedError(
      "a call without session_token acts on any client's sequences and needs the operator "
      "credential: send the contents of the daemon's --operator_token_file (default "
      "SOCKET.operator, readable by the daemon's user and root) as \"x-cachemgr-operator\" "
      "metadata, e.g. cachemgrctl --operator_token_file=FILE");
}

using cache_manager_internal::CeilDiv;
using cache_manager_internal::CheckNotBusy;

}  // namespace

absl::Status CacheManager::CheckClientCapsLocked(const std::optional<uid_t>& owner) const {
  if (clients_.size() >= options_.max_clients) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cachemgrd has ", clients_.size(), " clients attached, its limit (",
                     "--max_clients=", options_.max_clients, "): detach clients or raise it"));
  }
  uint32_t of_owner = 0;
  for (const auto& [token, client] : clients_) of_owner += client->owner == owner ? 1 : 0;
  if (of_owner >= options_.max_clients_per_uid) {
    return absl::ResourceExhaustedError(absl::StrCat(
        OwnerText(owner), " have ", of_owner, " clients attached, the limit per uid (",
        "--max_clients_per_uid=", options_.max_clients_per_uid, "): detach clients first"));
  }
  return absl::OkStatus();
}

CacheManager::CacheManager(CacheManagerOptions options, DeviceBackend* backend, const Clock* clock,
                           EventHub* events)
    : options_(options), backend_(backend), clock_(clock), events_(events) {}

CacheManager::~CacheManager() { Shutdown(); }

void CacheManager::PublishLocked(EventType type, const std::string& client_id,
                                 const std::string& sequence_id, const std::string& pool_id,
                                 std::string detail) {
  if (events_ == nullptr) return;
  Event e;
  e.type = type;
  e.client_id = client_id;
  e.sequence_id = sequence_id;
  e.pool_id = pool_id;
  e.detail = std::move(detail);
  events_->Publish(std::move(e));
}

absl::StatusOr<AttachResult> CacheManager::Attach(const AttachParams& params,
                                                  const Caller& caller) {
  const std::optional<uid_t> owner = caller.owner();
  {
    // Refused before anything (the input buffer's descriptor) is spent on it.
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(CheckClientCapsLocked(owner));
  }
  if (!IsValidIdentifier(params.client_name, kMaxNameLength)) {
    return absl::InvalidArgumentError(absl::StrCat("client_name must be 1-", kMaxNameLength,
                                                   " printable characters without spaces"));
  }
  ModelSpec model = params.model;
  if (model.block_size == 0) model.block_size = options_.default_block_size;
  if (model.rope.scaling_factor == 0) model.rope.scaling_factor = 1.0;
  RETURN_IF_ERROR(ValidateModelSpec(model));
  uint64_t input_bytes = params.input_buffer_bytes;
  if (input_bytes == 0) {
    input_bytes = uint64_t{model.num_layers} * 64 * model.num_q_heads * model.head_dim * 4;
  }
  if (input_bytes > options_.max_input_buffer_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("input_buffer_bytes must be at most ",
                                                   options_.max_input_buffer_bytes, " (got ",
                                                   input_bytes, ")"));
  }
  // Created before any state changes, so a failure here changes nothing.
  ASSIGN_OR_RETURN(MemfdRegion input_buffer,
                   MemfdRegion::Create(absl::StrCat("cachemgr-input-", params.client_name),
                                       static_cast<size_t>(input_bytes)));

  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(CheckClientCapsLocked(owner));
  Pool* pool = nullptr;
  const std::string pool_key = PoolKey(owner, model.name);
  if (auto it = pools_.find(pool_key); it != pools_.end()) {
    pool = it->second.get();
    if (!(pool->model == model)) {
      return absl::FailedPreconditionError(
          absl::StrCat("model \"", model.name, "\" is attached as {", pool->model.Describe(),
                       "} but this request describes {", model.Describe(),
                       "}: use another model.name or the same description"));
    }
  } else {
    const uint64_t block_bytes_all_layers = model.BlockBytes() * model.num_layers;
    const uint64_t budget_left = options_.memory_budget_bytes - memory_used_bytes_;
    uint64_t num_blocks = params.num_blocks;
    if (num_blocks == 0) {
      num_blocks = std::min(options_.default_pool_bytes, budget_left) / block_bytes_all_layers;
      num_blocks = std::min<uint64_t>(num_blocks, UINT32_MAX / kMaxBlockSize);
      if (num_blocks == 0) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "memory budget has ", budget_left, " bytes left, less than one block (",
            block_bytes_all_layers, " bytes over all layers) of model \"", model.name, "\""));
      }
    } else if (num_blocks > UINT32_MAX / kMaxBlockSize) {
      return absl::InvalidArgumentError(absl::StrCat(
          "num_blocks must be at most ", UINT32_MAX / kMaxBlockSize, " (got ", num_blocks, ")"));
    } else if (num_blocks * block_bytes_all_layers > budget_left) {
      return absl::ResourceExhaustedError(
          absl::StrCat("num_blocks ", num_blocks, " needs ", num_blocks * block_bytes_all_layers,
                       " bytes but the memory budget has ", budget_left, " bytes left"));
    }
    auto created = std::make_unique<Pool>();
    created->pool_id = absl::StrCat(model.name, "-", next_pool_serial_);
    created->key = pool_key;
    created->owner = owner;
    created->model = model;
    created->num_blocks = static_cast<uint32_t>(num_blocks);
    ASSIGN_OR_RETURN(created->memory,
                     backend_->CreatePool(created->pool_id, model.LayerLayout(created->num_blocks),
                                          model.ElemType(), model.num_layers));
    for (const RegionInfo& r : created->memory->regions()) created->bytes += r.bytes;
    created->allocators.reserve(model.num_layers);
    for (uint32_t l = 0; l < model.num_layers; ++l) {
      created->allocators.emplace_back(created->num_blocks);
    }
    ++next_pool_serial_;
    memory_used_bytes_ += created->bytes;
    pool = created.get();
    pools_.emplace(pool_key, std::move(created));
    Log(LogLevel::kInfo, "pool created",
        {{"pool_id", pool->pool_id},
         {"model", model.Describe()},
         {"num_blocks", pool->num_blocks},
         {"bytes", pool->bytes}});
    PublishLocked(EventType::kPoolCreated, "", "", pool->pool_id,
                  absl::StrCat("num_blocks=", pool->num_blocks, " bytes=", pool->bytes));
  }

  auto client = std::make_unique<Client>();
  client->client_id = absl::StrCat("c", next_client_serial_++);
  client->client_name = params.client_name;
  client->session_token = RandomToken();
  client->owner = owner;
  client->pool = pool;
  client->lease_deadline = clock_->Now() + options_.lease_timeout;
  client->input_buffer = std::move(input_buffer);
  ++pool->clients;

  AttachResult result;
  result.client_id = client->client_id;
  result.session_token = client->session_token;
  result.heartbeat_interval = options_.heartbeat_interval;
  result.lease_timeout = options_.lease_timeout;
  PoolDescription& d = result.pool;
  d.pool_id = pool->pool_id;
  d.backend = backend_->kind();
  d.share_method = backend_->share_method();
  d.device = backend_->device_name();
  d.model = pool->model;
  d.num_blocks = pool->num_blocks;
  d.block_bytes = pool->model.BlockBytes();
  d.regions = pool->memory->regions();
  d.layers = pool->memory->layers();
  // The input buffer's descriptor follows the pool's own (memfd / VMM: one per region; legacy
  // CUDA IPC: none).
  result.input_buffer_region_index = static_cast<uint32_t>(pool->memory->ShareFds().size());
  result.input_buffer_bytes = input_bytes;

  Log(LogLevel::kInfo, "client attached",
      {{"client_id", client->client_id},
       {"client_name", client->client_name},
       {"pool_id", pool->pool_id},
       {"owner", OwnerText(owner)}});
  PublishLocked(EventType::kClientAttached, client->client_id, "", pool->pool_id,
                absl::StrCat("name=", client->client_name));
  clients_.emplace(client->session_token, std::move(client));
  return result;
}

absl::StatusOr<CacheManager::Client*> CacheManager::FindClientLocked(const Caller& caller) {
  auto it = clients_.find(caller.session_token);
  if (!caller.has_session() || it == clients_.end()) {
    return absl::NotFoundError("session_token does not name an attached client");
  }
  Client* client = it->second.get();
  if (client->owner != caller.owner()) {
    // A token used by another uid was copied out of its owner's process: refuse it without
    // touching the session (no lease renewal, no expiry). Not NOT_FOUND: tokens are 128-bit
    // secrets nobody can guess, so confirming that a stolen one is real tells the thief
    // nothing useful, and the precise error helps an operator who runs tools under two users.
    Log(LogLevel::kWarning, "session token presented by another user",
        {{"client_id", client->client_id},
         {"owner", OwnerText(client->owner)},
         {"caller", OwnerText(caller.owner())},
         {"caller_pid", caller.peer.has_value() ? int64_t{caller.peer->pid} : int64_t{0}}});
    return absl::PermissionDeniedError(
        absl::StrCat("session_token belongs to a session attached by ", OwnerText(client->owner),
                     "; only the user that attached a session may use its token"));
  }
  const absl::Time now = clock_->Now();
  if (now >= client->lease_deadline) {
    RemoveClientLocked(caller.session_token, EventType::kClientExpired);
    return absl::NotFoundError(
        "session_token names a client whose lease expired; its blocks were released");
  }
  // Any authenticated call shows the client is alive.
  client->lease_deadline = now + options_.lease_timeout;
  return client;
}

absl::StatusOr<CacheManager::Sequence*> CacheManager::FindOwnedSequenceLocked(
    const Client& client, const std::string& sequence_id, const char* field) const {
  RETURN_IF_ERROR(CheckSequenceId(sequence_id, field));
  auto it = sequences_.find(sequence_id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat(field, " \"", sequence_id, "\" does not exist"));
  }
  if (it->second->owner != &client) {
    if (it->second->owner->owner != client.owner) {
      // Another tenant's sequence is invisible: answered as if it did not exist.
      return absl::NotFoundError(absl::StrCat(field, " \"", sequence_id, "\" does not exist"));
    }
    return absl::PermissionDeniedError(
        absl::StrCat(field, " \"", sequence_id, "\" belongs to another client"));
  }
  return it->second.get();
}

absl::StatusOr<CacheManager::Sequence*> CacheManager::FindSequenceForCallerLocked(
    const Caller& caller, const std::string& sequence_id) {
  if (!!caller.has_session()) {
    ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
    return FindOwnedSequenceLocked(*client, sequence_id, "sequence_id");
  }
  if (!caller.operator_credential) return OperatorCredentialRequired();
  RETURN_IF_ERROR(CheckSequenceId(sequence_id, "sequence_id"));
  auto it = sequences_.find(sequence_id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence_id \"", sequence_id, "\" does not exist"));
  }
  return it->second.get();
}

absl::StatusOr<absl::Duration> CacheManager::Heartbeat(const Caller& caller) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  return client->lease_deadline - clock_->Now();
}

absl::StatusOr<DetachResult> CacheManager::Detach(const Caller& caller) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(FindClientLocked(caller).status());
  return RemoveClientLocked(caller.session_token, EventType::kClientDetached);
}

uint64_t CacheManager::ReleaseSequenceLocked(Sequence& seq) {
  Pool* pool = seq.owner->pool;
  uint64_t released = 0;
  for (uint32_t l = 0; l < seq.layers.size(); ++l) {
    for (uint32_t b : seq.layers[l].blocks) released += pool->allocators[l].Release(b) ? 1 : 0;
    seq.layers[l].blocks.clear();
  }
  return released;
}

DetachResult CacheManager::RemoveClientLocked(const std::string& token, EventType why) {
  auto it = clients_.find(token);
  Client* client = it->second.get();
  DetachResult result;
  for (const std::string& id : client->sequences) {
    auto seq_it = sequences_.find(id);
    result.blocks_released += ReleaseSequenceLocked(*seq_it->second);
    sequences_.erase(seq_it);
    ++result.sequences_freed;
  }
  Pool* pool = client->pool;
  const std::string client_id = client->client_id;
  const bool expired = why == EventType::kClientExpired;
  Log(expired ? LogLevel::kWarning : LogLevel::kInfo,
      expired ? "client lease expired" : "client detached",
      {{"client_id", client_id},
       {"sequences_freed", result.sequences_freed},
       {"blocks_released", result.blocks_released}});
  PublishLocked(why, client_id, "", pool->pool_id,
                absl::StrCat("sequences_freed=", result.sequences_freed,
                             " blocks_released=", result.blocks_released));
  clients_.erase(it);
  if (--pool->clients == 0) {
    // No client means no sequence: the memory can go back.
    memory_used_bytes_ -= pool->bytes;
    Log(LogLevel::kInfo, "pool released", {{"pool_id", pool->pool_id}, {"bytes", pool->bytes}});
    PublishLocked(EventType::kPoolReleased, "", "", pool->pool_id,
                  absl::StrCat("bytes=", pool->bytes));
    const std::string key = pool->key;
    pools_.erase(key);
  }
  return result;
}

absl::StatusOr<AllocateResult> CacheManager::Allocate(const Caller& caller,
                                                      const std::string& sequence_id,
                                                      uint32_t num_new_tokens) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  RETURN_IF_ERROR(CheckSequenceId(sequence_id, "sequence_id"));
  if (num_new_tokens == 0 || num_new_tokens > options_.max_tokens_per_allocate) {
    return absl::InvalidArgumentError(absl::StrCat("num_new_tokens must be in [1, ",
                                                   options_.max_tokens_per_allocate, "] (got ",
                                                   num_new_tokens, ")"));
  }
  Sequence* seq = nullptr;
  if (auto it = sequences_.find(sequence_id); it != sequences_.end()) {
    if (it->second->owner != client) {
      return absl::PermissionDeniedError(
          absl::StrCat("sequence_id \"", sequence_id, "\" belongs to another client"));
    }
    seq = it->second.get();
    RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
    for (uint32_t l = 0; l < seq->layers.size(); ++l) {
      if (seq->layers[l].parked) {
        return absl::FailedPreconditionError(
            absl::StrCat("sequence_id \"", sequence_id, "\" has codebook layer ", l,
                         " parked in the arena: Fetch it before appending tokens"));
      }
    }
  }
  Pool& pool = *client->pool;
  const uint32_t bs = pool.model.block_size;
  const uint32_t num_layers = pool.model.num_layers;

  // Plan every layer before touching anything, so failure changes nothing.
  struct LayerPlan {
    bool copy_tail = false;
    uint32_t new_blocks = 0;
  };
  std::vector<LayerPlan> plan(num_layers);
  for (uint32_t l = 0; l < num_layers; ++l) {
    const uint32_t tokens = seq ? seq->layers[l].num_tokens : 0;
    const size_t have = seq ? seq->layers[l].blocks.size() : 0;
    const uint64_t after = uint64_t{tokens} + num_new_tokens;
    if (after > uint64_t{pool.num_blocks} * bs) {
      return absl::ResourceExhaustedError(
          absl::StrCat("num_new_tokens ", num_new_tokens, " would give layer ", l, " ", after,
                       " tokens, more than the whole pool holds (", pool.num_blocks, " blocks of ",
                       bs, " tokens)"));
    }
    plan[l].copy_tail =
        seq && tokens % bs != 0 && pool.allocators[l].refcount(seq->layers[l].blocks.back()) > 1;
    plan[l].new_blocks = CeilDiv(after, bs) - static_cast<uint32_t>(have);
    const uint32_t needed = plan[l].new_blocks + (plan[l].copy_tail ? 1 : 0);
    if (needed > pool.allocators[l].num_free()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "layer ", l, " needs ", needed, " blocks for num_new_tokens=", num_new_tokens, " but ",
          pool.allocators[l].num_free(), " of ", pool.num_blocks, " are free"));
    }
  }

  AllocateResult result;
  if (seq == nullptr) {
    auto created = std::make_unique<Sequence>();
    created->serial = next_sequence_serial_++;
    created->sequence_id = sequence_id;
    created->owner = client;
    created->layers.resize(num_layers);
    seq = created.get();
    sequences_.emplace(sequence_id, std::move(created));
    client->sequences.push_back(sequence_id);
    result.created = true;
  }
  result.first_position = seq->num_positions;
  result.layers.resize(num_layers);
  uint64_t total_new_blocks = 0;
  for (uint32_t l = 0; l < num_layers; ++l) {
    Sequence::LayerTable& table = seq->layers[l];
    LayerAllocationResult& out = result.layers[l];
    BlockAllocator& alloc = pool.allocators[l];
    if (plan[l].copy_tail) {
      const uint32_t src = table.blocks.back();
      const uint32_t dst = alloc.Allocate(1).value()[0];  // planned above
      const kernels::BlockCopyPair pair{src, dst};
      if (absl::Status s = pool.memory->CopyBlocks(l, {&pair, 1}); !s.ok()) {
        // The plan validated ids, so this is a backend fault; keep the state consistent.
        alloc.Release(dst);
        Log(LogLevel::kError, "copy-on-write failed", {{"error", s.ToString()}});
        return absl::InternalError(
            absl::StrCat("copy-on-write of layer ", l, " failed: ", s.message()));
      }
      alloc.Release(src);
      table.blocks.back() = dst;
      out.copies.push_back(pair);
    }
    if (plan[l].new_blocks > 0) {
      out.new_block_ids = alloc.Allocate(plan[l].new_blocks).value();  // planned above
      table.blocks.insert(table.blocks.end(), out.new_block_ids.begin(), out.new_block_ids.end());
      total_new_blocks += plan[l].new_blocks;
    }
    out.slot_mapping.resize(num_new_tokens);
    for (uint32_t i = 0; i < num_new_tokens; ++i) {
      const uint32_t t = table.num_tokens + i;
      out.slot_mapping[i] = int64_t{table.blocks[t / bs]} * bs + t % bs;
    }
    table.num_tokens += num_new_tokens;
    out.num_tokens = table.num_tokens;
  }
  seq->num_positions += num_new_tokens;
  result.num_positions = seq->num_positions;
  PublishLocked(EventType::kSequenceAllocated, client->client_id, sequence_id, pool.pool_id,
                absl::StrCat("new_tokens=", num_new_tokens, " new_blocks=", total_new_blocks,
                             " positions=", seq->num_positions));
  return result;
}

absl::StatusOr<uint64_t> CacheManager::Free(const Caller& caller, const std::string& sequence_id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Sequence * seq, FindSequenceForCallerLocked(caller, sequence_id));
  Client* owner = seq->owner;
  const uint64_t released = ReleaseSequenceLocked(*seq);
  std::erase(owner->sequences, sequence_id);
  sequences_.erase(sequence_id);
  PublishLocked(
      EventType::kSequenceFreed, owner->client_id, sequence_id, owner->pool->pool_id,
      absl::StrCat("blocks_released=", released, !caller.has_session() ? " by=operator" : ""));
  return released;
}

absl::StatusOr<SequenceSnapshot> CacheManager::Fork(const Caller& caller,
                                                    const std::string& parent_sequence_id,
                                                    const std::string& child_sequence_id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  ASSIGN_OR_RETURN(Sequence * parent,
                   FindOwnedSequenceLocked(*client, parent_sequence_id, "parent_sequence_id"));
  RETURN_IF_ERROR(CheckNotBusy(parent_sequence_id, parent->busy));
  RETURN_IF_ERROR(CheckSequenceId(child_sequence_id, "child_sequence_id"));
  if (sequences_.contains(child_sequence_id)) {
    return absl::AlreadyExistsError(
        absl::StrCat("child_sequence_id \"", child_sequence_id, "\" already exists"));
  }
  auto child = std::make_unique<Sequence>();
  child->serial = next_sequence_serial_++;
  child->sequence_id = child_sequence_id;
  child->owner = client;
  child->parent_sequence_id = parent_sequence_id;
  child->num_positions = parent->num_positions;
  child->layers = parent->layers;
  child->compression = parent->compression;
  Pool& pool = *client->pool;
  for (uint32_t l = 0; l < child->layers.size(); ++l) {
    for (uint32_t b : child->layers[l].blocks) pool.allocators[l].AddRef(b);
  }
  SequenceSnapshot snapshot = SnapshotLocked(*child);
  client->sequences.push_back(child_sequence_id);
  sequences_.emplace(child_sequence_id, std::move(child));
  PublishLocked(EventType::kSequenceForked, client->client_id, child_sequence_id, pool.pool_id,
                absl::StrCat("parent=", parent_sequence_id));
  return snapshot;
}

SequenceSnapshot CacheManager::SnapshotLocked(const Sequence& seq) const {
  SequenceSnapshot s;
  s.sequence_id = seq.sequence_id;
  s.owner_client_id = seq.owner->client_id;
  s.parent_sequence_id = seq.parent_sequence_id;
  s.num_positions = seq.num_positions;
  if (seq.busy != nullptr) s.busy = seq.busy;
  s.layers.reserve(seq.layers.size());
  for (uint32_t l = 0; l < seq.layers.size(); ++l) {
    const Sequence::LayerTable& t = seq.layers[l];
    LayerTableSnapshot layer{t.num_tokens, t.blocks, std::nullopt};
    layer.parked = t.parked;
    if (seq.compression != nullptr && seq.compression->layers[l].coded != nullptr) {
      const compress::CodedLayer& coded = *seq.compression->layers[l].coded;
      layer.codebook = true;
      layer.key_codebook_size = coded.key_entries();
      layer.value_codebook_size = coded.value_entries();
      layer.arena_bytes = coded.bytes();
    }
    s.layers.push_back(std::move(layer));
  }
  if (seq.compression != nullptr) {
    s.compressed = true;
    s.compression_policy = seq.compression->policy_name;
    for (const auto& l : seq.compression->layers) s.kept_per_layer.push_back(l.rows);
  }
  return s;
}

CacheManager::Sequence* CacheManager::FindSerialLocked(const std::string& sequence_id,
                                                       uint64_t serial) {
  auto it = sequences_.find(sequence_id);
  if (it == sequences_.end() || it->second->serial != serial) return nullptr;
  return it->second.get();
}

absl::StatusOr<SequenceSnapshot> CacheManager::GetSequence(const Caller& caller,
                                                           const std::string& sequence_id,
                                                           bool include_kv_digest) {
  absl::MutexLock lock(&mu_);
  const Sequence* seq = nullptr;
  if (!caller.has_session()) {
    // Without a session: the operator sees every sequence, anyone else those of their own uid.
    RETURN_IF_ERROR(CheckSequenceId(sequence_id, "sequence_id"));
    auto it = sequences_.find(sequence_id);
    if (it == sequences_.end() ||
        (!caller.operator_credential && it->second->owner->owner != caller.owner())) {
      return absl::NotFoundError(absl::StrCat("sequence_id \"", sequence_id, "\" does not exist"));
    }
    seq = it->second.get();
  } else {
    ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
    ASSIGN_OR_RETURN(seq, FindOwnedSequenceLocked(*client, sequence_id, "sequence_id"));
  }
  SequenceSnapshot snapshot = SnapshotLocked(*seq);
  if (include_kv_digest) {
    const PoolMemory& memory = *seq->owner->pool->memory;
    for (uint32_t l = 0; l < seq->layers.size(); ++l) {
      const auto& t = seq->layers[l];
      ASSIGN_OR_RETURN(snapshot.layers[l].kv_digest,
                       memory.DigestLayer(l, t.blocks, t.parked ? 0 : t.num_tokens));
    }
  }
  return snapshot;
}

absl::StatusOr<std::vector<SequenceSummary>> CacheManager::ListSequences(const Caller& caller) {
  absl::MutexLock lock(&mu_);
  const Client* only = nullptr;
  if (!!caller.has_session()) {
    ASSIGN_OR_RETURN(only, FindClientLocked(caller));
  }
  std::vector<SequenceSummary> out;
  // Without a session: the operator lists every sequence, anyone else those of their own uid.
  const bool all_owners = only == nullptr && caller.operator_credential;
  const std::optional<uid_t> owner = caller.owner();
  for (const auto& [id, seq] : sequences_) {
    if (only != nullptr && seq->owner != only) continue;
    if (only == nullptr && !all_owners && seq->owner->owner != owner) continue;
    SequenceSummary s;
    s.sequence_id = id;
    s.owner_client_id = seq->owner->client_id;
    s.owner_client_name = seq->owner->client_name;
    s.num_positions = seq->num_positions;
    for (const auto& t : seq->layers) s.num_blocks += t.blocks.size();
    out.push_back(std::move(s));
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.sequence_id < b.sequence_id; });
  return out;
}

StatsSnapshot CacheManager::Stats() const {
  Caller all;
  all.operator_credential = true;
  return Stats(all);
}

StatsSnapshot CacheManager::Stats(const Caller& caller) const {
  absl::MutexLock lock(&mu_);
  const bool all_owners = caller.operator_credential;
  const std::optional<uid_t> owner = caller.owner();
  StatsSnapshot s;
  s.memory_used_bytes = memory_used_bytes_;
  for (const auto& [id, seq] : sequences_) {
    s.num_sequences += all_owners || seq->owner->owner == owner ? 1 : 0;
  }
  for (const auto& [key, pool] : pools_) {
    if (!all_owners && pool->owner != owner) continue;
    PoolSnapshot p;
    p.pool_id = pool->pool_id;
    p.model_name = pool->model.name;
    p.backend = backend_->kind();
    p.device = backend_->device_name();
    p.bytes = pool->bytes;
    p.clients = pool->clients;
    for (const BlockAllocator& a : pool->allocators) {
      p.layers.push_back({a.capacity(), a.num_used(), a.num_free(), a.num_shared()});
    }
    for (const auto& [id, seq] : sequences_) {
      if (seq->owner->pool != pool.get() || seq->compression == nullptr) continue;
      ++p.compressed_sequences;
      for (const auto& l : seq->compression->layers) {
        if (l.coded != nullptr) p.arena_bytes += l.coded->bytes();
      }
    }
    s.pools.push_back(std::move(p));
  }
  std::sort(s.pools.begin(), s.pools.end(),
            [](const auto& a, const auto& b) { return a.pool_id < b.pool_id; });
  const absl::Time now = clock_->Now();
  for (const auto& [token, client] : clients_) {
    if (!all_owners && client->owner != owner) continue;
    s.clients.push_back({client->client_id, client->client_name, client->pool->pool_id,
                         static_cast<uint32_t>(client->sequences.size()),
                         std::max(absl::ZeroDuration(), client->lease_deadline - now)});
  }
  std::sort(s.clients.begin(), s.clients.end(),
            [](const auto& a, const auto& b) { return a.client_id < b.client_id; });
  return s;
}

absl::StatusOr<std::vector<UniqueFd>> CacheManager::ShareFds(const Caller& caller) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  std::vector<UniqueFd> fds;
  for (int fd : client->pool->memory->ShareFds()) {
    // Duplicates so the descriptors stay valid even if the pool is released before sending.
    UniqueFd dup(fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (!dup.valid()) return absl::InternalError("dup of a pool descriptor failed");
    fds.push_back(std::move(dup));
  }
  UniqueFd input(fcntl(client->input_buffer.fd(), F_DUPFD_CLOEXEC, 0));
  if (!input.valid()) return absl::InternalError("dup of the input buffer descriptor failed");
  fds.push_back(std::move(input));
  return fds;
}

std::vector<std::string> CacheManager::ExpireLeases() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_->Now();
  std::vector<std::string> expired_tokens, expired_ids;
  for (const auto& [token, client] : clients_) {
    if (now >= client->lease_deadline) expired_tokens.push_back(token);
  }
  for (const std::string& token : expired_tokens) {
    expired_ids.push_back(clients_.at(token)->client_id);
    RemoveClientLocked(token, EventType::kClientExpired);
  }
  return expired_ids;
}

void CacheManager::Shutdown() {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> tokens;
  for (const auto& [token, client] : clients_) tokens.push_back(token);
  for (const std::string& token : tokens) RemoveClientLocked(token, EventType::kClientDetached);
}

absl::Status CacheManager::CheckInvariants() const {
  absl::MutexLock lock(&mu_);
  uint64_t bytes = 0;
  for (const auto& [name, pool] : pools_) {
    bytes += pool->bytes;
    std::vector<std::vector<uint32_t>> refs(pool->allocators.size(),
                                            std::vector<uint32_t>(pool->num_blocks, 0));
    for (const auto& [id, seq] : sequences_) {
      if (seq->owner->pool != pool.get()) continue;
      for (uint32_t l = 0; l < seq->layers.size(); ++l) {
        const auto& t = seq->layers[l];
        const uint32_t want = t.parked ? 0 : CeilDiv(t.num_tokens, pool->model.block_size);
        if (t.parked &&
            (seq->compression == nullptr || seq->compression->layers[l].coded == nullptr)) {
          return absl::InternalError(
              absl::StrCat("sequence ", id, " layer ", l, " is parked but not a codebook layer"));
        }
        if (t.blocks.size() != want) {
          return absl::InternalError(absl::StrCat("sequence ", id, " layer ", l, " holds ",
                                                  t.blocks.size(), " blocks for ", t.num_tokens,
                                                  " tokens"));
        }
        for (uint32_t b : t.blocks) ++refs[l][b];
      }
    }
    for (uint32_t l = 0; l < pool->allocators.size(); ++l) {
      RETURN_IF_ERROR(pool->allocators[l].CheckInvariants());
      for (uint32_t b = 0; b < pool->num_blocks; ++b) {
        if (refs[l][b] != pool->allocators[l].refcount(b)) {
          return absl::InternalError(absl::StrCat(
              "pool ", pool->pool_id, " layer ", l, " block ", b, " has refcount ",
              pool->allocators[l].refcount(b), " but ", refs[l][b], " sequences reference it"));
        }
      }
    }
  }
  if (bytes != memory_used_bytes_) {
    return absl::InternalError(
        absl::StrCat("pools hold ", bytes, " bytes but the budget counts ", memory_used_bytes_));
  }
  return absl::OkStatus();
}

}  // namespace cachemgr
