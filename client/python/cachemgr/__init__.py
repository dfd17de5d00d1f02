"""Python client of cachemgrd, the KV-cache manager sidecar.

    import cachemgr
    model = cachemgr.ModelSpec("llama-3-8b", num_layers=32, num_q_heads=32, num_kv_heads=8,
                               head_dim=128, dtype="bf16")
    with cachemgr.Session.attach("/run/cachemgr/cachemgr.sock", "engine-0", model) as s:
        alloc = s.allocate("req-17", 512)
        s.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)   # zero copy into the pool
        s.compress("req-17", cachemgr.Policy("spindlekv"), byte_ratio=0.3, queries=q)
        s.fetch("req-17")

See Session, HostPool, Policy, and cachemgr.integrations.vllm for the vLLM v1 connector.
"""

from .errors import CacheManagerError
from .pool import HostPool, bf16_to_float32, float32_to_bf16
from .session import Session, SessionEvent, TlsOptions, list_all_sequences, stats
from .types import (Allocation, CompressResult, FetchedLayer, LoadedPrefix, ModelSpec, ParkedLayer,
                    Policy, PrefixCodebook, RopeConfig, SequenceInfo, SequenceSummary, Stats,
                    StepOp, StepResult, StoredPrefix, TransferResult)

__all__ = [
    "Allocation", "CacheManagerError", "CompressResult", "FetchedLayer", "HostPool",
    "LoadedPrefix", "ModelSpec", "ParkedLayer", "Policy", "PrefixCodebook", "RopeConfig",
    "SequenceInfo", "SequenceSummary", "Session", "SessionEvent", "Stats", "StepOp", "StepResult",
    "StoredPrefix", "TlsOptions", "TransferResult", "bf16_to_float32", "float32_to_bf16",
    "list_all_sequences", "stats",
]
