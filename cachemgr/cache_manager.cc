#include "cachemgr/cache_manager.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachemgr/backend/sharded_pool_memory.h"
#include "cachemgr/cache_manager_state.h"
#include "cachemgr/reply_size.h"
#include "cachemgr/util/checked_math.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/quote.h"
#include "cachemgr/util/secret_file.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {

namespace {

// Session tokens are "<boot id>.<secret>"; the boot id is 16 lowercase hex digits.
constexpr char kBootIdSeparator = '.';
constexpr size_t kBootIdLength = 16;

// The boot id a token claims, if it has the token format (empty otherwise). Only a well-formed
// id is returned, so error messages never echo arbitrary caller bytes.
absl::string_view TokenBootId(absl::string_view token) {
  if (token.size() <= kBootIdLength || token[kBootIdLength] != kBootIdSeparator) return {};
  const absl::string_view id = token.substr(0, kBootIdLength);
  for (const char c : id) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return {};
  }
  return id;
}

// Pools are per owner: one tenant never maps another's KV memory.
std::string PoolKey(const std::optional<uid_t>& owner, const std::string& model_name) {
  return absl::StrCat(owner.has_value() ? absl::StrCat("uid ", *owner) : std::string("local"), "/",
                      model_name);
}

// INVALID_ARGUMENT naming the group.* field that is malformed or does not fit `model`.
absl::Status ValidateGroup(const GroupMembership& group, const ModelSpec& model) {
  if (!IsValidIdentifier(group.name, kMaxNameLength)) {
    return absl::InvalidArgumentError(absl::StrCat("group.name must be 1-", kMaxNameLength,
                                                   " printable characters without spaces"));
  }
  if (group.size == 0 || group.size > kMaxGroupSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("group.size must be in [1, ", kMaxGroupSize, "] (got ", group.size, ")"));
  }
  if (group.rank >= group.size) {
    return absl::InvalidArgumentError(absl::StrCat("group.rank must be below group.size ",
                                                   group.size, " (got ", group.rank, ")"));
  }
  if (model.num_kv_heads % group.size != 0 || model.num_q_heads % group.size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group.size ", group.size, " must divide model.num_kv_heads (", model.num_kv_heads,
        ") and model.num_q_heads (", model.num_q_heads, "): each rank holds an equal share"));
  }
  return absl::OkStatus();
}

// What one rank of a group of `size` holds of `model`: its share of the heads.
ModelSpec ShardModel(const ModelSpec& model, uint32_t size) {
  ModelSpec shard = model;
  shard.num_q_heads /= size;
  shard.num_kv_heads /= size;
  return shard;
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
using cache_manager_internal::CheckSequenceId;
using cache_manager_internal::MutexUnlock;

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
    : CacheManager(options, std::vector<DeviceBackend*>{backend}, clock, events) {}

CacheManager::CacheManager(CacheManagerOptions options, std::vector<DeviceBackend*> backends,
                           const Clock* clock, EventHub* events)
    : options_(options),
      boot_id_(RandomHex(kBootIdLength / 2)),
      quarantine_(std::max(options.quarantine, options.lease_timeout)),
      backends_(std::move(backends)),
      clock_(clock),
      events_(events),
      background_(std::make_unique<WorkerPool>(1)) {}

absl::StatusOr<DeviceBackend*> CacheManager::FindBackend(const std::string& device,
                                                         const std::string& field) const {
  if (device.empty()) return backends_.front();
  for (DeviceBackend* b : backends_) {
    if (b->device_name() == device) return b;
  }
  std::vector<std::string> names;
  for (const DeviceBackend* b : backends_) names.push_back(b->device_name());
  return absl::InvalidArgumentError(absl::StrCat(field, " ", QuoteForMessage(device),
                                                 " is not a device of this cachemgrd (it has ",
                                                 absl::StrJoin(names, ", "), ")"));
}

CacheManager::~CacheManager() {
  // Background Compresses stop before their next layer; their thread is joined before the state
  // their last step locks goes.
  BeginShutdown();
  background_.reset();
  Shutdown();
}

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

namespace {

uint64_t PageBytes() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)); }

// What a pool of `num_blocks` blocks costs the budget.
struct PoolCharge {
  uint64_t memory = 0;       // DeviceBackend::PoolBytes
  uint64_t bookkeeping = 0;  // kBookkeepingBytesPerBlockLayer per block and layer
  uint64_t total = 0;
};

// The memory of a new pool: on its device's backend, or for a group one shard per rank (each
// holding its share of the heads, on the rank's device) behind a ShardedPoolMemory.
absl::StatusOr<std::unique_ptr<PoolMemory>> CreatePoolMemory(
    const std::vector<DeviceBackend*>& rank_backends, const std::string& pool_id,
    const ModelSpec& model, uint32_t num_blocks) {
  const uint32_t group_size = static_cast<uint32_t>(rank_backends.size());
  if (group_size == 1) {
    return rank_backends[0]->CreatePool(pool_id, model.LayerLayout(num_blocks), model.ElemType(),
                                        model.num_layers);
  }
  const ModelSpec shard = ShardModel(model, group_size);
  std::vector<std::unique_ptr<PoolMemory>> shards;
  for (uint32_t r = 0; r < group_size; ++r) {
    ASSIGN_OR_RETURN(std::unique_ptr<PoolMemory> memory,
                     rank_backends[r]->CreatePool(absl::StrCat(pool_id, "-rank", r),
                                                  shard.LayerLayout(num_blocks), model.ElemType(),
                                                  model.num_layers));
    shards.push_back(std::move(memory));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ShardedPoolMemory> sharded,
                   ShardedPoolMemory::Create(std::move(shards)));
  return std::unique_ptr<PoolMemory>(std::move(sharded));
}

// INVALID_ARGUMENT naming num_blocks when a size overflows.
absl::StatusOr<PoolCharge> PlanCharge(const std::vector<DeviceBackend*>& rank_backends,
                                      const ModelSpec& model, uint32_t num_blocks) {
  PoolCharge c;
  RETURN_IF_ERROR(model.LayerBytes(num_blocks).status());
  // A group's ranks each hold a shard (on the rank's device); one set of allocators serves them
  // all.
  const uint32_t group_size = static_cast<uint32_t>(rank_backends.size());
  const kernels::KvLayerLayout shard = ShardModel(model, group_size).LayerLayout(num_blocks);
  std::optional<uint64_t> memory = 0;
  for (const DeviceBackend* backend : rank_backends) {
    ASSIGN_OR_RETURN(const uint64_t shard_bytes, backend->PoolBytes(shard, model.num_layers));
    memory = memory.has_value() ? CheckedAdd(*memory, shard_bytes) : std::nullopt;
  }
  const std::optional<uint64_t> bookkeeping =
      CheckedProduct({num_blocks, model.num_layers, kBookkeepingBytesPerBlockLayer});
  const std::optional<uint64_t> total = memory.has_value() && bookkeeping.has_value()
                                            ? CheckedAdd(*memory, *bookkeeping)
                                            : std::nullopt;
  if (memory.has_value()) c.memory = *memory;
  if (!total.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_blocks ", num_blocks, " makes a pool larger than 2^64 bytes"));
  }
  c.bookkeeping = *bookkeeping;
  c.total = *total;
  return c;
}

}  // namespace

absl::Status CacheManager::ChargeLocked(uint64_t bytes, const std::string& what) {
  // memory_used_bytes_ <= budget always holds, so `left` cannot wrap.
  uint64_t left = options_.memory_budget_bytes - memory_used_bytes_;
  if (bytes > left && EvictForBudgetLocked(bytes - left)) {
    left = options_.memory_budget_bytes - memory_used_bytes_;
  }
  if (bytes > left) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " needs ", bytes, " bytes but the memory budget has ", left, " of ",
                     options_.memory_budget_bytes, " bytes left"));
  }
  memory_used_bytes_ += bytes;
  return absl::OkStatus();
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
  // A group of one is no group.
  uint32_t group_size = 1, rank = 0;
  std::string group_name;
  if (params.group.has_value()) {
    RETURN_IF_ERROR(ValidateGroup(*params.group, model));
    if (params.group->size > 1) {
      group_size = params.group->size;
      rank = params.group->rank;
      group_name = params.group->name;
    }
  }
  // The device of each rank's memory: the group's list, or `device` for every rank.
  std::vector<DeviceBackend*> rank_backends;
  const bool devices_named = params.group.has_value() && !params.group->devices.empty();
  if (devices_named) {
    if (params.group->devices.size() != params.group->size) {
      return absl::InvalidArgumentError(
          absl::StrCat("group.devices names ", params.group->devices.size(),
                       " devices for group.size ", params.group->size, ": one per rank, or none"));
    }
    for (uint32_t r = 0; r < params.group->size; ++r) {
      ASSIGN_OR_RETURN(DeviceBackend * b, FindBackend(params.group->devices[r],
                                                      absl::StrCat("group.devices[", r, "]")));
      rank_backends.push_back(b);
    }
    if (!params.device.empty() && params.device != params.group->devices[rank]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device ", QuoteForMessage(params.device), " differs from group.devices[", rank, "] ",
          QuoteForMessage(params.group->devices[rank]), ": leave one of them empty"));
    }
    if (group_size == 1) rank_backends.resize(1);  // a group of one is no group
  } else {
    ASSIGN_OR_RETURN(DeviceBackend * b, FindBackend(params.device, "device"));
    rank_backends.assign(group_size, b);
  }
  uint64_t input_bytes = params.input_buffer_bytes;
  if (input_bytes == 0) {
    // At most 1024 * 64 * 4096 * 1024 * 4 = 2^40 for a validated model.
    input_bytes =
        CheckedProduct({model.num_layers, 64, model.num_q_heads / group_size, model.head_dim, 4})
            .value();
  }
  if (input_bytes > options_.max_input_buffer_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input_buffer_bytes must be at most ", options_.max_input_buffer_bytes, " (got ",
        input_bytes, params.input_buffer_bytes == 0 ? ", the default for this model" : "", ")"));
  }
  const uint64_t input_charge = CheckedRoundUp(input_bytes, PageBytes()).value();
  if (params.num_blocks > UINT32_MAX / kMaxBlockSize) {
    return absl::InvalidArgumentError(absl::StrCat("num_blocks must be at most ",
                                                   UINT32_MAX / kMaxBlockSize, " (got ",
                                                   params.num_blocks, ")"));
  }
  // Created before any state changes, so a failure here changes nothing.
  ASSIGN_OR_RETURN(MemfdRegion input_buffer,
                   MemfdRegion::Create(absl::StrCat("cachemgr-input-", params.client_name),
                                       static_cast<size_t>(input_bytes)));

  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(CheckClientCapsLocked(owner));
  // A group's pool is its own (model, group and device names have no spaces); a model has a
  // pool on each device it is attached on.
  const std::string pool_key =
      group_name.empty()
          ? absl::StrCat(PoolKey(owner, model.name), " on ", rank_backends[0]->device_name())
          : absl::StrCat(PoolKey(owner, model.name), " group ", group_name);
  while (true) {
    auto it = pools_.find(pool_key);
    if (it != pools_.end() && it->second->building) {
      // Another Attach is creating this pool outside the lock: wait (without the lock) until
      // it committed or gave up, then look again.
      const std::string building_id = it->second->pool_id;
      auto done = [this, &pool_key, &building_id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        auto found = pools_.find(pool_key);
        return found == pools_.end() || found->second->pool_id != building_id ||
               !found->second->building;
      };
      mu_.Await(absl::Condition(&done));
      continue;
    }
    if (it != pools_.end()) {
      Pool& pool = *it->second;
      if (!(pool.model == model) && pool.clients == 0 && !pool.prefixes.empty()) {
        // Only a cache holds it: the new description takes the name (released at once unless
        // quarantined blocks keep it, which the message below then says).
        ReclaimIdlePoolLocked(pool, "an Attach described its model otherwise");
        continue;
      }
      if (!(pool.model == model)) {
        // Name the fields, not the other tenant's values.
        return absl::FailedPreconditionError(
            absl::StrCat("model.name ", QuoteForMessage(model.name),
                         " is attached with another description (differing: ",
                         absl::StrJoin(pool.model.DifferingFields(model), ", "),
                         "): use another model.name or the same description",
                         pool.clients > 0 ? ""
                                          : " (the pool has no client; it is held until its "
                                            "quarantined blocks are released)"));
      }
      if (pool.group_size != group_size) {
        return absl::FailedPreconditionError(
            absl::StrCat("group.size ", group_size, " differs from the ", pool.group_size,
                         " of group.name ", QuoteForMessage(group_name),
                         " as attached: every rank of a group names the same size"));
      }
      if (group_size > 1 && (devices_named || !params.device.empty()) &&
          (devices_named ? pool.rank_backends != rank_backends
                         : pool.rank_backends[rank] != rank_backends[rank])) {
        return absl::FailedPreconditionError(absl::StrCat(
            devices_named ? "group.devices differ" : "device differs", " from where group.name ",
            QuoteForMessage(group_name), " keeps its shards: name the same devices, or none"));
      }
      if (group_size > 1 && pool.ranks[rank] != nullptr) {
        return absl::AlreadyExistsError(
            absl::StrCat("group.rank ", rank, " of group.name ", QuoteForMessage(group_name),
                         " is attached (client ", pool.ranks[rank]->client_id,
                         "): detach it first, or wait for its lease to expire"));
      }
      // Other idle pools may give way; the one being joined never does.
      ReclaimIdlePoolsLocked(input_charge, &pool);
      RETURN_IF_ERROR(ChargeLocked(input_charge, "input_buffer_bytes"));
      pool.last_used = clock_->Now();
      return AddClientLocked(pool, owner, params.client_name, rank, std::move(input_buffer),
                             input_bytes, input_charge);
    }

    // A new pool: size it, charge it (with the input buffer), create it outside the lock. Pools
    // that only their stored prefixes keep give way first.
    {
      uint64_t wanted = options_.default_pool_bytes;
      if (params.num_blocks != 0) {
        ASSIGN_OR_RETURN(const PoolCharge planned,
                         PlanCharge(rank_backends, model, params.num_blocks));
        wanted = planned.total;
      }
      ReclaimIdlePoolsLocked(CheckedAdd(wanted, input_charge).value_or(UINT64_MAX));
    }
    const uint64_t left = options_.memory_budget_bytes - memory_used_bytes_;
    uint32_t num_blocks = params.num_blocks;
    PoolCharge charge;
    if (num_blocks == 0) {
      if (input_charge > left) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "input_buffer_bytes needs ", input_charge, " bytes but the memory budget has ", left,
            " of ", options_.memory_budget_bytes, " bytes left"));
      }
      const uint64_t target = std::min(options_.default_pool_bytes, left - input_charge);
      // Bytes of one block over all layers, bookkeeping included (at most 2^45 + 2^14).
      const uint64_t per_block =
          model.BlockBytes() * model.num_layers + kBookkeepingBytesPerBlockLayer * model.num_layers;
      uint64_t n = std::min<uint64_t>(target / per_block, UINT32_MAX / kMaxBlockSize);
      while (n > 0) {
        ASSIGN_OR_RETURN(charge, PlanCharge(rank_backends, model, static_cast<uint32_t>(n)));
        if (charge.total <= target) break;
        // Page or granularity rounding pushed it over: drop the blocks the excess covers.
        n -=
            std::min(n, std::max<uint64_t>(1, (charge.total - target + per_block - 1) / per_block));
      }
      if (n == 0) {
        return absl::ResourceExhaustedError(
            absl::StrCat("memory budget has ", left, " bytes left, less than one block (",
                         per_block, " bytes over all layers, bookkeeping included) of model.name ",
                         QuoteForMessage(model.name), " beside the input buffer's ", input_charge));
      }
      num_blocks = static_cast<uint32_t>(n);
    } else {
      ASSIGN_OR_RETURN(charge, PlanCharge(rank_backends, model, num_blocks));
    }
    const std::optional<uint64_t> needed = CheckedAdd(charge.total, input_charge);
    if (!needed.has_value() || *needed > left) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "num_blocks ", num_blocks, " needs ", charge.total, " bytes (", charge.memory,
          " of pool memory, ", charge.bookkeeping, " of bookkeeping) and input_buffer_bytes ",
          input_charge, ", but the memory budget has ", left, " of ", options_.memory_budget_bytes,
          " bytes left"));
    }
    memory_used_bytes_ += *needed;

    auto pending = std::make_unique<Pool>();
    Pool* pool = pending.get();
    pool->pool_id = absl::StrCat(model.name, "-", next_pool_serial_++);
    pool->key = pool_key;
    pool->owner = owner;
    pool->model = model;
    pool->group_name = group_name;
    pool->group_size = group_size;
    if (group_size > 1) pool->ranks.assign(group_size, nullptr);
    pool->rank_backends = rank_backends;
    pool->num_blocks = num_blocks;
    pool->bytes = charge.memory;
    pool->bookkeeping_bytes = charge.bookkeeping;
    pool->building = true;
    pool->building_input_charge = input_charge;
    pool->last_used = clock_->Now();
    pools_.emplace(pool_key, std::move(pending));
    ++builds_in_flight_;
    // Only this call changes a building pool, and Shutdown waits for builds, so `pool` stays
    // valid across the unlocked section.
    absl::StatusOr<std::unique_ptr<PoolMemory>> memory;
    std::vector<BlockAllocator> allocators;
    {
      MutexUnlock unlocked(&mu_);
      memory = CreatePoolMemory(rank_backends, pool->pool_id, model, num_blocks);
      if (memory.ok()) {
        allocators.reserve(model.num_layers);
        for (uint32_t l = 0; l < model.num_layers; ++l) allocators.emplace_back(num_blocks);
      }
    }
    --builds_in_flight_;
    pool->building_input_charge = 0;  // the client's own charge from here on (or given back)
    absl::Status built = memory.status();
    uint64_t actual = 0;
    if (built.ok()) {
      for (const RegionInfo& r : (*memory)->regions()) actual += r.bytes;
      if (actual != pool->bytes) {
        // The backend's PoolBytes was off: account what it really allocated.
        Log(LogLevel::kWarning, "pool size differs from its plan",
            {{"pool_id", pool->pool_id}, {"planned", pool->bytes}, {"allocated", actual}});
        if (actual > pool->bytes) {
          built = ChargeLocked(actual - pool->bytes, "num_blocks");
        } else {
          memory_used_bytes_ -= pool->bytes - actual;
        }
        if (built.ok()) pool->bytes = actual;
      }
    }
    if (!built.ok()) {
      memory_used_bytes_ -= pool->bytes + pool->bookkeeping_bytes + input_charge;
      pools_.erase(pool_key);
      return built;
    }
    pool->memory = *std::move(memory);
    pool->allocators = std::move(allocators);
    pool->building = false;
    Log(LogLevel::kInfo, "pool created",
        {{"pool_id", pool->pool_id},
         {"model", model.Describe()},
         {"num_blocks", pool->num_blocks},
         {"bytes", pool->bytes},
         {"bookkeeping_bytes", pool->bookkeeping_bytes}});
    PublishLocked(EventType::kPoolCreated, "", "", pool->pool_id,
                  absl::StrCat("num_blocks=", pool->num_blocks, " bytes=", pool->bytes));
    return AddClientLocked(*pool, owner, params.client_name, rank, std::move(input_buffer),
                           input_bytes, input_charge);
  }
}

bool CacheManager::SharesSequences(const Client& a, const Client& b) {
  return &a == &b || (a.pool == b.pool && a.pool->group_size > 1);
}

const PoolMemory& CacheManager::RankMemory(const Pool& pool, uint32_t rank) {
  if (pool.group_size == 1) return *pool.memory;
  return static_cast<const ShardedPoolMemory&>(*pool.memory).shard(rank);
}

AttachResult CacheManager::AddClientLocked(Pool& pool, const std::optional<uid_t>& owner,
                                           const std::string& client_name, uint32_t rank,
                                           MemfdRegion input_buffer, uint64_t input_bytes,
                                           uint64_t input_charge) {
  auto client = std::make_unique<Client>();
  client->client_id = absl::StrCat("c", next_client_serial_++);
  client->client_name = client_name;
  // Session tokens are bearer secrets: 128 bits from the kernel's CSPRNG.
  client->session_token = boot_id_ + kBootIdSeparator + RandomHex(16);
  client->owner = owner;
  client->pool = &pool;
  client->rank = rank;
  if (pool.group_size > 1) pool.ranks[rank] = client.get();
  client->lease_deadline = clock_->Now() + options_.lease_timeout;
  client->input_buffer = std::make_shared<const MemfdRegion>(std::move(input_buffer));
  client->input_charge = input_charge;
  ++pool.clients;

  AttachResult result;
  result.client_id = client->client_id;
  result.session_token = client->session_token;
  result.boot_id = boot_id_;
  result.heartbeat_interval = options_.heartbeat_interval;
  result.lease_timeout = options_.lease_timeout;
  PoolDescription& d = result.pool;
  d.pool_id = pool.pool_id;
  const DeviceBackend& backend = *pool.rank_backends[rank];
  d.backend = backend.kind();
  d.share_method = backend.share_method();
  d.device = backend.device_name();
  // A group member maps its rank's shard.
  const PoolMemory& memory = RankMemory(pool, rank);
  d.model = ShardModel(pool.model, pool.group_size);
  d.group_name = pool.group_name;
  d.group_rank = rank;
  d.group_size = pool.group_size;
  d.num_blocks = pool.num_blocks;
  d.block_bytes = d.model.BlockBytes();
  d.regions = memory.regions();
  d.layers = memory.layers();
  // The input buffer's descriptor follows the pool's own (memfd / VMM: one per region; legacy
  // CUDA IPC: none).
  result.input_buffer_region_index = static_cast<uint32_t>(memory.ShareFds().size());
  result.input_buffer_bytes = input_bytes;

  Log(LogLevel::kInfo, "client attached",
      {{"client_id", client->client_id},
       {"client_name", client->client_name},
       {"pool_id", pool.pool_id},
       {"group_rank", rank},
       {"owner", OwnerText(owner)}});
  PublishLocked(EventType::kClientAttached, client->client_id, "", pool.pool_id,
                absl::StrCat("name=", client->client_name));
  clients_.emplace(client->session_token, std::move(client));
  return result;
}

absl::StatusOr<CacheManager::Client*> CacheManager::FindClientLocked(const Caller& caller) {
  auto it = clients_.find(caller.session_token);
  if (!caller.has_session() || it == clients_.end()) {
    if (const absl::string_view boot = TokenBootId(caller.session_token);
        !boot.empty() && boot != boot_id_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "session_token is from an earlier cachemgrd (boot ", boot, "; this is boot ", boot_id_,
          "): that session, its sequences and its blocks are gone; re-attach"));
    }
    return absl::NotFoundError("session_token does not name an attached client");
  }
  Client* client = it->second.get();
  if (!caller.peer_daemon && client->owner != caller.owner()) {
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
  // Judged by when the call arrived: one that waited behind others is not blamed for the wait.
  const absl::Time now = clock_->Now();
  const absl::Time at =
      caller.arrival == absl::InfinitePast() ? now : std::min(caller.arrival, now);
  if (at >= client->lease_deadline) {
    RemoveClientLocked(caller.session_token, EventType::kClientExpired);
    return absl::NotFoundError(
        "session_token names a client whose lease expired; its blocks were released");
  }
  // Any authenticated call shows the client is alive (a late-processed call never shortens it).
  client->lease_deadline = std::max(client->lease_deadline, at + options_.lease_timeout);
  return client;
}

absl::StatusOr<CacheManager::Sequence*> CacheManager::FindOwnedSequenceLocked(
    const Client& client, const std::string& sequence_id, const char* field) const {
  RETURN_IF_ERROR(CheckSequenceId(sequence_id, field));
  auto it = sequences_.find(sequence_id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(
        absl::StrCat(field, " ", QuoteForMessage(sequence_id), " does not exist"));
  }
  if (!SharesSequences(client, *it->second->owner)) {
    if (it->second->owner->owner != client.owner) {
      // Another tenant's sequence is invisible: answered as if it did not exist.
      return absl::NotFoundError(
          absl::StrCat(field, " ", QuoteForMessage(sequence_id), " does not exist"));
    }
    return absl::PermissionDeniedError(
        absl::StrCat(field, " ", QuoteForMessage(sequence_id), " belongs to another client"));
  }
  return it->second.get();
}

absl::StatusOr<CacheManager::Sequence*> CacheManager::FindSequenceForCallerLocked(
    const Caller& caller, const std::string& sequence_id) {
  if (caller.has_session()) {
    ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
    return FindOwnedSequenceLocked(*client, sequence_id, "sequence_id");
  }
  if (!caller.operator_credential) return OperatorCredentialRequired();
  RETURN_IF_ERROR(CheckSequenceId(sequence_id, "sequence_id"));
  auto it = sequences_.find(sequence_id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(
        absl::StrCat("sequence_id ", QuoteForMessage(sequence_id), " does not exist"));
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

uint64_t CacheManager::ReleaseSequenceLocked(Sequence& seq,
                                             std::optional<absl::Time> quarantine_until) {
  Pool* pool = seq.owner->pool;
  uint64_t released = EndBackgroundLocked(seq, quarantine_until);
  for (uint32_t l = 0; l < seq.layers.size(); ++l) {
    BlockAllocator& alloc = pool->allocators[l];
    for (uint32_t b : seq.layers[l].blocks) {
      const bool last = quarantine_until.has_value()
                            ? alloc.ReleaseToQuarantine(b, *quarantine_until)
                            : alloc.Release(b);
      released += last ? 1 : 0;
    }
    seq.layers[l].blocks.clear();
  }
  memory_used_bytes_ -= seq.charge;
  seq.charge = 0;
  return released;
}

DetachResult CacheManager::RemoveClientLocked(const std::string& token, EventType why) {
  auto it = clients_.find(token);
  Client* client = it->second.get();
  const bool expired = why == EventType::kClientExpired;
  // An expired client may be stalled with the pool mapped: its blocks wait out the quarantine.
  const std::optional<absl::Time> quarantine_until =
      expired ? std::optional<absl::Time>(clock_->Now() + quarantine_) : std::nullopt;
  DetachResult result;
  for (const std::string& id : client->sequences) {
    auto seq_it = sequences_.find(id);
    result.blocks_released += ReleaseSequenceLocked(*seq_it->second, quarantine_until);
    sequences_.erase(seq_it);
    ++result.sequences_freed;
  }
  Pool* pool = client->pool;
  if (quarantine_until.has_value()) {
    pool->stalled_writers_until = std::max(pool->stalled_writers_until, *quarantine_until);
  }
  const std::string client_id = client->client_id;
  memory_used_bytes_ -= client->input_charge;
  Log(expired ? LogLevel::kWarning : LogLevel::kInfo,
      expired ? "client lease expired" : "client detached",
      {{"client_id", client_id},
       {"sequences_freed", result.sequences_freed},
       {"blocks_released", result.blocks_released}});
  PublishLocked(why, client_id, "", pool->pool_id,
                absl::StrCat("sequences_freed=", result.sequences_freed,
                             " blocks_released=", result.blocks_released));
  if (pool->group_size > 1) pool->ranks[client->rank] = nullptr;
  clients_.erase(it);
  --pool->clients;
  MaybeReleasePoolLocked(pool->key);
  return result;
}

void CacheManager::MaybeReleasePoolLocked(const std::string& pool_key) {
  auto it = pools_.find(pool_key);
  if (it == pools_.end()) return;
  Pool* pool = it->second.get();
  if (pool->building || pool->clients > 0 || !pool->prefixes.empty()) return;
  // No client means no sequence; quarantined blocks still hold the memory.
  for (const BlockAllocator& a : pool->allocators) {
    if (a.num_quarantined() > 0) return;
  }
  memory_used_bytes_ -= pool->bytes + pool->bookkeeping_bytes;
  Log(LogLevel::kInfo, "pool released", {{"pool_id", pool->pool_id}, {"bytes", pool->bytes}});
  PublishLocked(EventType::kPoolReleased, "", "", pool->pool_id,
                absl::StrCat("bytes=", pool->bytes));
  pools_.erase(it);
}

absl::Status CacheManager::CheckReplyBytes(uint64_t bytes, const std::string& what) const {
  if (bytes <= options_.max_reply_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      what, " would make a reply of ", bytes, " bytes, more than the daemon's limit of ",
      options_.max_reply_bytes, " (--max_reply_bytes)"));
}

absl::StatusOr<AllocateResult> CacheManager::Allocate(const Caller& caller,
                                                      const std::string& sequence_id,
                                                      uint32_t num_new_tokens) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  return AllocateLocked(*client, sequence_id, num_new_tokens, /*slot_mapping=*/true);
}

absl::StatusOr<AllocateResult> CacheManager::AllocateLocked(Client& client_ref,
                                                            const std::string& sequence_id,
                                                            uint32_t num_new_tokens,
                                                            bool slot_mapping) {
  Client* client = &client_ref;
  RETURN_IF_ERROR(CheckSequenceId(sequence_id, "sequence_id"));
  if (num_new_tokens == 0 || num_new_tokens > options_.max_tokens_per_allocate) {
    return absl::InvalidArgumentError(absl::StrCat("num_new_tokens must be in [1, ",
                                                   options_.max_tokens_per_allocate, "] (got ",
                                                   num_new_tokens, ")"));
  }
  Pool& pool = *client->pool;
  const uint32_t bs = pool.model.block_size;
  const uint32_t num_layers = pool.model.num_layers;
  // The reply lists a slot per token per layer: refuse one no client could receive before
  // anything is allocated.
  auto reply_bytes = [&](uint64_t tokens) {
    return reply_size::AllocateReplyBytes(num_layers, tokens, pool.num_blocks, bs);
  };
  if (slot_mapping && reply_bytes(num_new_tokens) > options_.max_reply_bytes) {
    uint32_t lo = 0, hi = num_new_tokens;  // reply_bytes(lo) fits (or lo == 0), hi does not
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      (reply_bytes(mid) <= options_.max_reply_bytes ? lo : hi) = mid;
    }
    return absl::ResourceExhaustedError(absl::StrCat(
        "num_new_tokens ", num_new_tokens, " would make a reply of ", reply_bytes(num_new_tokens),
        " bytes on this ", num_layers, "-layer pool, more than the daemon's limit of ",
        options_.max_reply_bytes, " (--max_reply_bytes): this pool accepts at most ", lo,
        " tokens per Allocate"));
  }
  Sequence* seq = nullptr;
  if (auto it = sequences_.find(sequence_id); it != sequences_.end()) {
    if (!SharesSequences(*client, *it->second->owner)) {
      return absl::PermissionDeniedError(
          absl::StrCat("sequence_id ", QuoteForMessage(sequence_id), " belongs to another client"));
    }
    seq = it->second.get();
    RETURN_IF_ERROR(CheckNotBusy(sequence_id, seq->busy));
    for (uint32_t l = 0; l < seq->layers.size(); ++l) {
      if (seq->layers[l].parked) {
        return absl::FailedPreconditionError(
            absl::StrCat("sequence_id ", QuoteForMessage(sequence_id), " has codebook layer ", l,
                         " parked in the arena: Fetch it before appending tokens"));
      }
    }
  }

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
  }
  std::vector<uint32_t> needed(num_layers);
  for (uint32_t l = 0; l < num_layers; ++l) {
    needed[l] = plan[l].new_blocks + (plan[l].copy_tail ? 1 : 0);
  }
  // Charged before any eviction, so that a refusal of the charge evicts nothing.
  uint64_t new_sequence_charge = 0;
  if (seq == nullptr) {
    new_sequence_charge = SequenceChargeBytes(sequence_id, num_layers, /*duplicated_entries=*/0);
    RETURN_IF_ERROR(ChargeLocked(new_sequence_charge,
                                 absl::StrCat("sequence_id ", QuoteForMessage(sequence_id))));
  }
  MakeRoomLocked(pool, needed);  // evicts stored prefixes only if that is enough
  for (uint32_t l = 0; l < num_layers; ++l) {
    if (needed[l] > pool.allocators[l].num_free()) {
      memory_used_bytes_ -= new_sequence_charge;
      return absl::ResourceExhaustedError(absl::StrCat(
          "layer ", l, " needs ", needed[l], " blocks for num_new_tokens=", num_new_tokens, " but ",
          pool.allocators[l].num_free(), " of ", pool.num_blocks, " are free"));
    }
  }

  AllocateResult result;
  if (seq == nullptr) {
    auto created = std::make_unique<Sequence>();
    created->charge = new_sequence_charge;
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
    if (slot_mapping) {
      out.slot_mapping.resize(num_new_tokens);
      for (uint32_t i = 0; i < num_new_tokens; ++i) {
        const uint32_t t = table.num_tokens + i;
        out.slot_mapping[i] = int64_t{table.blocks[t / bs]} * bs + t % bs;
      }
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
  return FreeLocked(*seq, /*by_operator=*/!caller.has_session());
}

uint64_t CacheManager::FreeLocked(Sequence& seq, bool by_operator) {
  Client* owner = seq.owner;
  const std::string sequence_id = seq.sequence_id;
  // The owner gives its own sequence up; an operator takes it from a client that may still be
  // writing to its blocks, so those wait out the quarantine.
  const std::optional<absl::Time> quarantine_until =
      by_operator ? std::optional<absl::Time>(clock_->Now() + quarantine_) : std::nullopt;
  const uint64_t released = ReleaseSequenceLocked(seq, quarantine_until);
  std::erase(owner->sequences, sequence_id);
  sequences_.erase(sequence_id);
  PublishLocked(EventType::kSequenceFreed, owner->client_id, sequence_id, owner->pool->pool_id,
                absl::StrCat("blocks_released=", released, by_operator ? " by=operator" : ""));
  return released;
}

absl::StatusOr<SequenceSnapshot> CacheManager::Fork(const Caller& caller,
                                                    const std::string& parent_sequence_id,
                                                    const std::string& child_sequence_id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  ASSIGN_OR_RETURN(Sequence * child,
                   ForkLocked(*client, parent_sequence_id, child_sequence_id, /*reply=*/true));
  return SnapshotLocked(*child);
}

absl::StatusOr<CacheManager::Sequence*> CacheManager::ForkLocked(
    Client& client_ref, const std::string& parent_sequence_id, const std::string& child_sequence_id,
    bool reply) {
  Client* client = &client_ref;
  ASSIGN_OR_RETURN(Sequence * parent,
                   FindOwnedSequenceLocked(*client, parent_sequence_id, "parent_sequence_id"));
  RETURN_IF_ERROR(CheckNotBusy(parent_sequence_id, parent->busy));
  RETURN_IF_ERROR(CheckSequenceId(child_sequence_id, "child_sequence_id"));
  if (sequences_.contains(child_sequence_id)) {
    return absl::AlreadyExistsError(
        absl::StrCat("child_sequence_id ", QuoteForMessage(child_sequence_id), " already exists"));
  }
  if (reply) {
    std::vector<reply_size::LayerCounts> counts;
    for (const auto& t : parent->layers) counts.push_back({t.blocks.size(), 0});
    RETURN_IF_ERROR(CheckReplyBytes(
        reply_size::SequenceReplyBytes(counts, client->pool->num_blocks),
        absl::StrCat("Fork of parent_sequence_id ", QuoteForMessage(parent_sequence_id))));
  }
  uint64_t entries = 0;
  for (const auto& t : parent->layers) entries += t.blocks.size();
  const uint64_t charge =
      SequenceChargeBytes(child_sequence_id, static_cast<uint32_t>(parent->layers.size()), entries);
  RETURN_IF_ERROR(ChargeLocked(
      charge, absl::StrCat("Fork's child_sequence_id ", QuoteForMessage(child_sequence_id))));
  auto child = std::make_unique<Sequence>();
  child->charge = charge;
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
  Sequence* made = child.get();
  client->sequences.push_back(child_sequence_id);
  sequences_.emplace(child_sequence_id, std::move(child));
  PublishLocked(EventType::kSequenceForked, client->client_id, child_sequence_id, pool.pool_id,
                absl::StrCat("parent=", parent_sequence_id));
  return made;
}

SequenceSnapshot CacheManager::SnapshotLocked(const Sequence& seq) const {
  SequenceSnapshot s;
  s.sequence_id = seq.sequence_id;
  s.owner_client_id = seq.owner->client_id;
  s.parent_sequence_id = seq.parent_sequence_id;
  s.num_positions = seq.num_positions;
  if (seq.busy != nullptr) s.busy = seq.busy;
  s.compress_pending = seq.background != nullptr;
  s.compress_ready = s.compress_pending && seq.background->done.HasBeenNotified();
  if (!seq.compress_error.ok()) s.compress_error = seq.compress_error.ToString();
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
      return absl::NotFoundError(
          absl::StrCat("sequence_id ", QuoteForMessage(sequence_id), " does not exist"));
    }
    seq = it->second.get();
  } else {
    ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
    ASSIGN_OR_RETURN(seq, FindOwnedSequenceLocked(*client, sequence_id, "sequence_id"));
  }
  {
    std::vector<reply_size::LayerCounts> counts;
    for (const auto& t : seq->layers) counts.push_back({t.blocks.size(), 0});
    RETURN_IF_ERROR(
        CheckReplyBytes(reply_size::SequenceReplyBytes(counts, seq->owner->pool->num_blocks),
                        absl::StrCat("GetSequence of sequence_id ", QuoteForMessage(sequence_id))));
  }
  SequenceSnapshot snapshot = SnapshotLocked(*seq);
  if (!include_kv_digest) return snapshot;

  // The digests read every row: gigabytes for a long sequence of a deep model, so outside the
  // lock, from the snapshot's tables (the pool's memory kept alive meanwhile). A call that
  // changed the sequence meanwhile (or freed it) makes the digests moot: ABORTED, retry.
  const std::shared_ptr<const PoolMemory> memory = seq->owner->pool->memory;
  const uint64_t serial = seq->serial;
  absl::Status read = absl::OkStatus();
  {
    MutexUnlock unlocked(&mu_);
    for (uint32_t l = 0; l < snapshot.layers.size() && read.ok(); ++l) {
      const LayerTableSnapshot& t = snapshot.layers[l];
      absl::StatusOr<uint64_t> digest =
          memory->DigestLayer(l, t.block_ids, t.parked ? 0 : t.num_tokens, KvDigest::kFnv1a64);
      if (digest.ok()) {
        snapshot.layers[l].kv_digest = *digest;
      } else {
        read = digest.status();
      }
    }
  }
  RETURN_IF_ERROR(read);
  const Sequence* current = FindSerialLocked(sequence_id, serial);
  bool unchanged = current != nullptr && current->layers.size() == snapshot.layers.size();
  for (uint32_t l = 0; unchanged && l < snapshot.layers.size(); ++l) {
    unchanged = current->layers[l].blocks == snapshot.layers[l].block_ids &&
                current->layers[l].num_tokens == snapshot.layers[l].num_tokens &&
                current->layers[l].parked == snapshot.layers[l].parked;
  }
  if (!unchanged) {
    return absl::AbortedError(absl::StrCat("sequence_id ", QuoteForMessage(sequence_id),
                                           " changed while its KV was read for the digest; retry"));
  }
  return snapshot;
}

uint64_t CacheManager::SequenceChargeBytes(const std::string& sequence_id, uint32_t num_layers,
                                           uint64_t duplicated_entries) {
  // The Sequence and its hash-map slot, its id twice (key and member, heap-allocated when long),
  // one LayerTable per layer, and a Fork child's copies of its parent's block-table entries. All
  // factors are bounded (ids <= 256 bytes, layers <= 1024, entries <= layers * num_blocks).
  constexpr uint64_t kPerSequence = sizeof(Sequence) + 64;
  return kPerSequence + 2 * uint64_t{sequence_id.size()} +
         uint64_t{num_layers} * sizeof(Sequence::LayerTable) +
         duplicated_entries * sizeof(uint32_t);
}

absl::StatusOr<CacheManager::SequencePage> CacheManager::ListSequencesPage(
    const Caller& caller, const std::string& page_token, uint32_t page_size) {
  if (!page_token.empty()) RETURN_IF_ERROR(CheckSequenceId(page_token, "page_token"));
  if (page_size > kMaxListPageSize) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be at most ", kMaxListPageSize,
                                                   " (got ", page_size, "; 0 means ",
                                                   kDefaultListPageSize, ")"));
  }
  const size_t limit = page_size == 0 ? kDefaultListPageSize : page_size;
  ASSIGN_OR_RETURN(std::vector<SequenceSummary> all, ListSequences(caller));
  auto first = page_token.empty()
                   ? all.begin()
                   : std::upper_bound(all.begin(), all.end(), page_token,
                                      [](const std::string& token, const SequenceSummary& s) {
                                        return token < s.sequence_id;
                                      });
  SequencePage page;
  const size_t left = static_cast<size_t>(all.end() - first);
  const size_t n = std::min(limit, left);
  page.sequences.assign(std::make_move_iterator(first), std::make_move_iterator(first + n));
  if (n < left) page.next_page_token = page.sequences.back().sequence_id;
  return page;
}

absl::StatusOr<std::vector<SequenceSummary>> CacheManager::ListSequences(const Caller& caller) {
  absl::MutexLock lock(&mu_);
  const Client* only = nullptr;
  if (caller.has_session()) {
    ASSIGN_OR_RETURN(only, FindClientLocked(caller));
  }
  std::vector<SequenceSummary> out;
  // Without a session: the operator lists every sequence, anyone else those of their own uid.
  const bool all_owners = only == nullptr && caller.operator_credential;
  const std::optional<uid_t> owner = caller.owner();
  for (const auto& [id, seq] : sequences_) {
    if (only != nullptr && !SharesSequences(*only, *seq->owner)) continue;
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
  s.memory_budget_bytes = options_.memory_budget_bytes;
  if (all_owners) s.prefix = prefix_counters_;  // daemon-wide: the operator's only
  for (const auto& [id, seq] : sequences_) {
    s.num_sequences += all_owners || seq->owner->owner == owner ? 1 : 0;
    s.sequence_bytes += seq->charge;
  }
  for (const auto& [key, pool] : pools_) {
    if (pool->building) continue;
    if (!all_owners && pool->owner != owner) continue;
    PoolSnapshot p;
    p.pool_id = pool->pool_id;
    p.model_name = pool->model.name;
    p.backend = pool->rank_backends[0]->kind();
    // A group's ranks may sit on several devices: each named once, rank order.
    std::vector<std::string> devices;
    for (const DeviceBackend* b : pool->rank_backends) {
      if (std::find(devices.begin(), devices.end(), b->device_name()) == devices.end()) {
        devices.push_back(b->device_name());
      }
    }
    p.device = absl::StrJoin(devices, ",");
    p.group_name = pool->group_name;
    p.group_size = pool->group_size;
    for (const Client* c : pool->ranks) p.group_ranks_attached += c != nullptr ? 1 : 0;
    p.bytes = pool->bytes;
    p.bookkeeping_bytes = pool->bookkeeping_bytes;
    p.clients = pool->clients;
    for (const BlockAllocator& a : pool->allocators) {
      p.layers.push_back(
          {a.capacity(), a.num_used(), a.num_free(), a.num_shared(), a.num_quarantined()});
    }
    p.prefix_entries = static_cast<uint32_t>(pool->prefixes.size());
    p.prefix_bytes = pool->prefixes.charge_bytes();
    // A block only the store holds has as many references as entries naming it (two hashes
    // may name one block).
    absl::flat_hash_map<uint64_t, uint32_t> store_refs;  // (layer << 32 | block) -> entries
    for (const PrefixStore::Entry& e : pool->prefixes.lru_order()) {
      for (uint32_t l = 0; l < e.blocks.size(); ++l) {
        if (e.blocks[l] != PrefixStore::kCodedLayer) ++store_refs[uint64_t{l} << 32 | e.blocks[l]];
      }
    }
    p.prefix_codebook_layers = pool->prefixes.coded_layers();
    p.prefix_codebook_bytes = pool->prefixes.coded_bytes();
    for (const auto& [key, refs] : store_refs) {
      const uint32_t l = static_cast<uint32_t>(key >> 32), b = static_cast<uint32_t>(key);
      p.prefix_only_blocks += pool->allocators[l].refcount(b) == refs ? 1 : 0;
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
    s.input_buffer_bytes += client->input_charge;
    if (!all_owners && client->owner != owner) continue;
    s.clients.push_back({client->client_id, client->client_name, client->pool->pool_id,
                         static_cast<uint32_t>(client->sequences.size()),
                         std::max(absl::ZeroDuration(), client->lease_deadline - now),
                         client->rank});
  }
  std::sort(s.clients.begin(), s.clients.end(),
            [](const auto& a, const auto& b) { return a.client_id < b.client_id; });
  return s;
}

absl::StatusOr<std::vector<UniqueFd>> CacheManager::ShareFds(const Caller& caller) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Client * client, FindClientLocked(caller));
  std::vector<UniqueFd> fds;
  for (int fd : RankMemory(*client->pool, client->rank).ShareFds()) {
    // Duplicates so the descriptors stay valid even if the pool is released before sending.
    UniqueFd dup(fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (!dup.valid()) return absl::InternalError("dup of a pool descriptor failed");
    fds.push_back(std::move(dup));
  }
  UniqueFd input(fcntl(client->input_buffer->fd(), F_DUPFD_CLOEXEC, 0));
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
  // Quarantines that ended free their blocks; a pool held only by them goes.
  std::vector<std::string> drained;
  for (const auto& [name, pool] : pools_) {
    uint32_t freed = 0;
    for (BlockAllocator& a : pool->allocators) freed += a.EndQuarantine(now);
    if (freed > 0) {
      Log(LogLevel::kInfo, "quarantine ended", {{"pool_id", pool->pool_id}, {"blocks", freed}});
      drained.push_back(name);
    }
  }
  for (const std::string& name : drained) MaybeReleasePoolLocked(name);
  return expired_ids;
}

void CacheManager::BeginShutdown() { shutting_down_.store(true); }

void CacheManager::Shutdown() {
  absl::MutexLock lock(&mu_);
  auto no_builds = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return builds_in_flight_ == 0; };
  mu_.Await(absl::Condition(&no_builds));
  std::vector<std::string> tokens;
  for (const auto& [token, client] : clients_) tokens.push_back(token);
  for (const std::string& token : tokens) RemoveClientLocked(token, EventType::kClientDetached);
  // Pools held only by quarantined blocks or stored prefixes: nobody can write to them once the
  // daemon is gone.
  for (const auto& [name, pool] : pools_) {
    memory_used_bytes_ -= pool->bytes + pool->bookkeeping_bytes + pool->prefixes.charge_bytes();
    Log(LogLevel::kInfo, "pool released", {{"pool_id", pool->pool_id}, {"bytes", pool->bytes}});
    PublishLocked(EventType::kPoolReleased, "", "", pool->pool_id,
                  absl::StrCat("bytes=", pool->bytes));
  }
  pools_.clear();
}

absl::Status CacheManager::CheckInvariants() const {
  absl::MutexLock lock(&mu_);
  uint64_t bytes = 0;
  for (const auto& [token, client] : clients_) bytes += client->input_charge;
  for (const auto& [id, seq] : sequences_) {
    const uint64_t least = SequenceChargeBytes(id, static_cast<uint32_t>(seq->layers.size()), 0);
    if (seq->charge < least) {
      return absl::InternalError(absl::StrCat("sequence ", id, " is charged ", seq->charge,
                                              " bytes, less than its bookkeeping ", least));
    }
    bytes += seq->charge;
  }
  absl::flat_hash_map<const Client*, uint32_t> background;
  for (const auto& [id, seq] : sequences_) background[seq->owner] += seq->background ? 1 : 0;
  for (const auto& [token, client] : clients_) {
    const uint32_t want = background.contains(client.get()) ? background[client.get()] : 0;
    if (client->background_compresses != want) {
      return absl::InternalError(
          absl::StrCat("client ", client->client_id, " counts ", client->background_compresses,
                       " background Compresses but its sequences have ", want));
    }
  }
  for (const auto& [name, pool] : pools_) {
    bytes += pool->bytes + pool->bookkeeping_bytes + pool->building_input_charge +
             pool->prefixes.charge_bytes();
    const uint64_t bookkeeping =
        uint64_t{pool->num_blocks} * pool->model.num_layers * kBookkeepingBytesPerBlockLayer;
    if (pool->bookkeeping_bytes != bookkeeping) {
      return absl::InternalError(absl::StrCat("pool ", pool->pool_id, " charges ",
                                              pool->bookkeeping_bytes, " bytes of bookkeeping for ",
                                              bookkeeping));
    }
    if (pool->building) continue;
    uint64_t region_bytes = 0;
    for (const RegionInfo& r : pool->memory->regions()) region_bytes += r.bytes;
    if (region_bytes != pool->bytes) {
      return absl::InternalError(absl::StrCat("pool ", pool->pool_id, " charges ", pool->bytes,
                                              " bytes but its regions hold ", region_bytes));
    }
    uint64_t quarantined = 0;
    for (const BlockAllocator& a : pool->allocators) quarantined += a.num_quarantined();
    if (pool->clients == 0 && quarantined == 0 && pool->prefixes.empty()) {
      return absl::InternalError(absl::StrCat("pool ", pool->pool_id,
                                              " has no client, no quarantined block and no "
                                              "stored prefix but was not released"));
    }
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
      if (seq->background != nullptr) {
        for (uint32_t l = 0; l < seq->background->pinned.size(); ++l) {
          for (uint32_t b : seq->background->pinned[l]) ++refs[l][b];
        }
      }
    }
    uint64_t prefix_charge = 0;
    for (const PrefixStore::Entry& e : pool->prefixes.lru_order()) {
      uint64_t coded_bytes = 0;
      bool coded_match = e.coded.empty() || e.coded.size() == e.blocks.size();
      for (uint32_t l = 0; l < e.coded.size() && coded_match; ++l) {
        coded_match = (e.coded[l] != nullptr) == (e.blocks[l] == PrefixStore::kCodedLayer);
        coded_bytes += e.coded[l] != nullptr ? e.coded[l]->bytes() : 0;
      }
      if (e.blocks.size() != pool->model.num_layers || e.digests.size() != e.blocks.size() ||
          !coded_match ||
          e.charge !=
              PrefixStore::ChargeBytes(e.hash.size(), pool->model.num_layers, !e.coded.empty()) +
                  coded_bytes ||
          pool->prefixes.Find(e.hash) != &e) {
        return absl::InternalError(
            absl::StrCat("pool ", pool->pool_id, " has a malformed stored prefix entry"));
      }
      for (uint32_t l = 0; l < e.blocks.size(); ++l) {
        if (e.blocks[l] == PrefixStore::kCodedLayer) continue;
        if (e.blocks[l] >= pool->num_blocks) {
          return absl::InternalError(absl::StrCat("pool ", pool->pool_id,
                                                  " has a stored prefix naming block ", e.blocks[l],
                                                  " of layer ", l));
        }
        ++refs[l][e.blocks[l]];
      }
      prefix_charge += e.charge;
    }
    if (prefix_charge != pool->prefixes.charge_bytes()) {
      return absl::InternalError(absl::StrCat("pool ", pool->pool_id, "'s stored prefixes charge ",
                                              prefix_charge, " bytes but the store counts ",
                                              pool->prefixes.charge_bytes()));
    }
    for (uint32_t l = 0; l < pool->allocators.size(); ++l) {
      RETURN_IF_ERROR(pool->allocators[l].CheckInvariants());
      for (uint32_t b = 0; b < pool->num_blocks; ++b) {
        if (refs[l][b] != pool->allocators[l].refcount(b)) {
          return absl::InternalError(
              absl::StrCat("pool ", pool->pool_id, " layer ", l, " block ", b, " has refcount ",
                           pool->allocators[l].refcount(b), " but ", refs[l][b],
                           " sequences and stored prefixes reference it"));
        }
      }
    }
  }
  if (bytes != memory_used_bytes_) {
    return absl::InternalError(absl::StrCat("pools, sequences and input buffers hold ", bytes,
                                            " bytes but the budget counts ", memory_used_bytes_));
  }
  if (memory_used_bytes_ > options_.memory_budget_bytes) {
    return absl::InternalError(absl::StrCat("the budget counts ", memory_used_bytes_,
                                            " bytes, more than its ",
                                            options_.memory_budget_bytes));
  }
  return absl::OkStatus();
}

}  // namespace cachemgr
