"""Conversions between the cachemgr.v1 messages and the client's data types."""

import functools
from typing import List

import grpc
import numpy as np

from .errors import CacheManagerError
from .types import (DTYPES, LAYOUTS, ROPE_STYLES, Allocation, BlockCopy, ClientInfo,
                    CompressedLayer, CompressResult, FetchedLayer, LayerAllocation,
                    LayerBlockTable, LayerOccupancy, ModelSpec, ParkedLayer, Policy, PoolStats,
                    RopeConfig, SequenceInfo, SequenceSummary, Stats, StepOp, StepResult)
from .v1 import cachemgr_pb2 as pb

_ENUMS = {
    "schedule": ("BUDGET_SCHEDULE_", ("full", "uniform", "pyramid", "zigzag")),
    "scoring": ("SCORING_", ("window", "accumulated", "sinks_recent")),
    "normalization": ("WINDOW_NORMALIZATION_", ("literal", "sum")),
    "pooling": ("POOLING_", ("none", "avg", "max")),
    "gqa": ("GQA_MODE_", ("group_mean", "repeat")),
    "codebook_scope": ("CODEBOOK_SCOPE_", ("layer", "kv_head")),
    "codebook_search": ("CODEBOOK_SEARCH_", ("exact", "lsh")),
}
_OPTIONAL = ("beta", "zigzag_tau", "zigzag_min_fraction", "window", "pool_kernel", "sinks",
             "codebook", "theta_k", "theta_v", "codebook_only_if_smaller", "append_batch")


def _name(mapping, value, what):
    for k, v in mapping.items():
        if v == value:
            return k
    raise ValueError(f"unknown {what} {value}")


def model_to_proto(m: ModelSpec) -> pb.ModelSpec:
    for field, table, value in (("dtype", DTYPES, m.dtype), ("layout", LAYOUTS, m.layout),
                                ("rope.style", ROPE_STYLES, m.rope.style)):
        if value not in table:
            raise ValueError(f"model.{field} must be one of {sorted(table)} (got {value!r})")
    return pb.ModelSpec(
        name=m.name, num_layers=m.num_layers, num_q_heads=m.num_q_heads,
        num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, dtype=DTYPES[m.dtype],
        block_size=m.block_size, layout=LAYOUTS[m.layout],
        rope=pb.RopeConfig(style=ROPE_STYLES[m.rope.style], theta=m.rope.theta,
                           scaling_factor=m.rope.scaling_factor, rotary_dim=m.rope.rotary_dim))


def model_from_proto(p: pb.ModelSpec) -> ModelSpec:
    return ModelSpec(
        name=p.name, num_layers=p.num_layers, num_q_heads=p.num_q_heads,
        num_kv_heads=p.num_kv_heads, head_dim=p.head_dim, dtype=_name(DTYPES, p.dtype, "dtype"),
        block_size=p.block_size, layout=_name(LAYOUTS, p.layout, "layout"),
        rope=RopeConfig(style=_name(ROPE_STYLES, p.rope.style, "RoPE style"),
                        theta=p.rope.theta, scaling_factor=p.rope.scaling_factor,
                        rotary_dim=p.rope.rotary_dim))


def policy_to_proto(policy: Policy) -> pb.CompressionPolicy:
    p = pb.CompressionPolicy(preset=policy.preset)
    for field, (prefix, names) in _ENUMS.items():
        value = getattr(policy, field)
        if value is None:
            continue
        if value not in names:
            raise ValueError(f"policy.{field} must be one of {names} (got {value!r})")
        setattr(p, field, pb.DESCRIPTOR.enum_types_by_name[
            {"schedule": "BudgetSchedule", "scoring": "Scoring",
             "normalization": "WindowNormalization", "pooling": "Pooling", "gqa": "GqaMode",
             "codebook_scope": "CodebookScope", "codebook_search": "CodebookSearch"}[field]].values_by_name[
                 prefix + value.upper()].number)
    for field in _OPTIONAL:
        value = getattr(policy, field)
        if value is not None:
            setattr(p, field, value)
    return p


def allocation_from_proto(r: pb.AllocateResponse) -> Allocation:
    return Allocation(
        sequence_id=r.sequence_id, created=r.created, first_position=r.first_position,
        num_positions=r.num_positions,
        layers=[LayerAllocation(layer=l.layer, new_block_ids=list(l.new_block_ids),
                                slot_mapping=np.array(l.slot_mapping, dtype=np.int64),
                                num_tokens=l.num_tokens,
                                copies=[BlockCopy(c.src_block, c.dst_block) for c in l.copies])
                for l in r.layers])


# The slot mapping of a Step's layers without slot mappings: one shared, read-only empty array.
_NO_SLOTS = np.empty(0, dtype=np.int64)
_NO_SLOTS.flags.writeable = False


def _layers_from_proto(layers) -> list:
    return [LayerAllocation(l.layer, list(l.new_block_ids),
                            np.array(l.slot_mapping, dtype=np.int64) if l.slot_mapping
                            else _NO_SLOTS, l.num_tokens,
                            [BlockCopy(c.src_block, c.dst_block) for c in l.copies]
                            if l.copies else [])
            for l in layers]


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def step_results_from_proto(r: pb.StepResponse, num_layers: int) -> list:
    # Hundreds of results a step, most an OK whose fields the caller may never read: each keeps
    # its message and converts what is read (StepResult).
    out = []
    append = out.append
    for x in r.results:
        if x.code:
            append(StepResult(CacheManagerError(
                _CODES.get(x.code, grpc.StatusCode.UNKNOWN), x.message)))
        else:
            append(StepResult(None, x, num_layers, _layers_from_proto))
    return out


def step_ops_to_proto(ops) -> list:
    """The ops' messages. Allocations, frees and forks are cached by their fields (a scheduler
    sends the same ops step after step, and the messages are only ever copied into requests;
    keyed by a tuple, whose hash and comparison are the interpreter's, not the dataclass's); a
    lookup's is built each time (its hashes are many and seldom sent twice)."""
    cached = _cached_step_op_to_proto
    return [cached(op.kind, op.sequence_id, op.child_sequence_id, op.num_new_tokens)
            if op.kind != "match_prefix" else
            pb.StepOp(match_prefix=pb.StepMatchPrefix(block_hashes=list(op.block_hashes)))
            for op in ops]


@functools.lru_cache(maxsize=1 << 16)
def _cached_step_op_to_proto(kind: str, sequence_id: str, child_sequence_id: str,
                             num_new_tokens: int) -> pb.StepOp:
    if kind == "allocate":
        return pb.StepOp(allocate=pb.StepAllocate(sequence_id=sequence_id,
                                                  num_new_tokens=num_new_tokens))
    if kind == "free":
        return pb.StepOp(free=sequence_id)
    if kind == "fork":
        return pb.StepOp(fork=pb.StepFork(parent_sequence_id=sequence_id,
                                          child_sequence_id=child_sequence_id))
    raise ValueError(f"StepOp.kind must be allocate, free, fork or match_prefix (got {kind!r})")


def sequence_from_proto(s: pb.SequenceInfo) -> SequenceInfo:
    return SequenceInfo(
        sequence_id=s.sequence_id, owner_client_id=s.owner_client_id,
        num_positions=s.num_positions,
        layers=[LayerBlockTable(l.layer, l.num_tokens, list(l.block_ids), l.kv_digest,
                                l.codebook, l.parked, l.key_codebook_size,
                                l.value_codebook_size, l.arena_bytes)
                for l in s.layers],
        parent_sequence_id=s.parent_sequence_id, compressed=s.compressed,
        compression_policy=s.compression_policy, kept_per_layer=list(s.kept_per_layer),
        busy=s.busy, compress_pending=s.compress_pending, compress_ready=s.compress_ready,
        compress_error=s.compress_error)


def summaries_from_proto(r: pb.ListSequencesResponse) -> List[SequenceSummary]:
    return [SequenceSummary(s.sequence_id, s.owner_client_id, s.owner_client_name,
                            s.num_positions, s.num_blocks) for s in r.sequences]


def _positions(values, model: ModelSpec) -> np.ndarray:
    a = np.array(values, dtype=np.uint32)
    return a.reshape(model.num_kv_heads, -1) if a.size else a


def compress_result_from_proto(r: pb.CompressResponse, model: ModelSpec) -> CompressResult:
    return CompressResult(
        layers=[CompressedLayer(
            layer=l.layer, context_ratio=l.context_ratio, kept_per_head=l.kept_per_head,
            num_tokens=l.num_tokens, block_ids=list(l.block_ids),
            kept_positions=_positions(l.kept_positions, model), codebook=l.codebook,
            key_codebook_size=l.key_codebook_size, value_codebook_size=l.value_codebook_size,
            bytes_held=l.bytes_held, eq15_ratio=l.eq15_ratio) for l in r.layers],
        bytes_before=r.bytes_before, bytes_after=r.bytes_after, honest_ratio=r.honest_ratio,
        eq15_ratio=r.eq15_ratio, reserve_ratio=r.reserve_ratio,
        blocks_released=r.blocks_released, pending=r.pending, rows_appended=r.rows_appended)


def fetched_from_proto(r: pb.FetchResponse, model: ModelSpec) -> List[FetchedLayer]:
    return [FetchedLayer(l.layer, l.num_tokens, list(l.block_ids), _positions(l.positions, model),
                         l.new_blocks) for l in r.layers]


def parked_from_proto(r: pb.ParkResponse) -> List[ParkedLayer]:
    return [ParkedLayer(l.layer, l.num_tokens, l.rows_appended, l.matched, l.queued,
                        l.batch_coded, l.new_entries, l.key_codebook_size,
                        l.value_codebook_size, l.queued_total, l.arena_bytes, l.blocks_released)
            for l in r.layers]


def stats_from_proto(r: pb.StatsResponse) -> Stats:
    return Stats(
        pools=[PoolStats(p.pool_id, p.model_name, pb.Backend.Name(p.backend), p.device, p.bytes,
                         p.clients,
                         [LayerOccupancy(l.layer, l.capacity_blocks, l.used_blocks,
                                         l.free_blocks, l.shared_blocks, l.quarantined_blocks)
                          for l in p.layers], p.prefix_entries, p.prefix_only_blocks,
                         p.prefix_bytes, p.prefix_codebook_layers, p.prefix_codebook_bytes,
                         p.group_name, p.group_size or 1, p.group_ranks_attached)
               for p in r.pools],
        clients=[ClientInfo(c.client_id, c.client_name, c.pool_id, c.sequences,
                            c.lease_remaining_ms, c.group_rank) for c in r.clients],
        num_sequences=r.num_sequences, uptime_ms=r.uptime_ms, version=r.version,
        memory_used_bytes=r.memory_used_bytes,
        prefix={f.name: getattr(r.prefix, f.name) for f in r.prefix.DESCRIPTOR.fields})
