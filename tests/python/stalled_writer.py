"""A client process for test_resilience.py: attaches with heartbeats, takes the whole pool (one
sequence of 16 tokens, 4 blocks of 4 per layer), writes it, prints
{"event": "attached", "blocks": [...]} (layer 0's blocks), and waits for a line on stdin. Session
events print as {"event": "lost" | "ready", "generation": G, "status": "CODE: message"} when
they happen. On "write" it stores 7s through the numpy views it took before (a writer that
checked its lease before it stalled), then prints {"event": "after_stall", "lease_ok": B,
"revoked": B, "call": "CODE: message" or "OK"} (a get_sequence made then) and detaches."""

import json
import sys
import threading

import numpy as np

import cachemgr

_say = threading.Lock()


def say(**fields):
    """One whole line per record, even when the heartbeat thread reports an event meanwhile."""
    with _say:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def on_event(e):
    say(event=e.kind, generation=e.generation,
        status=f"{e.error.code.name}: {e.error.message}" if e.error else "")


def main():
    socket, model_name = sys.argv[1:]
    model = cachemgr.ModelSpec(name=model_name, num_layers=2, num_q_heads=4, num_kv_heads=2,
                               head_dim=8, dtype="fp16", block_size=4)
    s = cachemgr.Session.attach(socket, "stalled", model, num_blocks=4, on_event=on_event)
    alloc = s.allocate("seq", 16)
    views = [s.pool.key_cache(l) for l in range(2)] + [s.pool.value_cache(l) for l in range(2)]
    for v in views:
        v[...] = np.float16(1.0)
    say(event="attached", blocks=[int(b) for b in alloc.layers[0].new_block_ids])
    if sys.stdin.readline().strip() != "write":
        return 2
    for v in views:
        v[...] = np.float16(7.0)
    result = dict(event="after_stall", lease_ok=s.lease_ok,
                  revoked=s.mapping_revoked_at is not None)
    try:
        s.get_sequence("seq")
        result["call"] = "OK"
    except cachemgr.CacheManagerError as e:
        result["call"] = f"{e.code.name}: {e.message}"
    say(**result)
    s.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
