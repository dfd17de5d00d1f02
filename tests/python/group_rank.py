"""One rank of a tensor-parallel engine, for test_groups.py: a separate client process that
attaches to the daemon at argv[1] as rank argv[3] of the group argv[2] of argv[4] ranks
(model: group_model(argv[5])), prints {"event": "attached", ...} and follows commands on stdin,
one per line, answering each with one JSON line:
  write SEQ SEED TOKENS   writes its heads' share of sequence_data(SEED, TOKENS) into SEQ's rows
                          (the block tables as the daemon reports them) and its share of the
                          window queries into its input buffer
  read SEQ                its heads of SEQ's resident rows: {"keys": [...], "values": [...]}
                          per layer (float lists), for the test to compare with an unsharded copy
  detach                  detaches and exits"""

import json
import sys

import numpy as np

import cachemgr

LAYERS, Q_HEADS, KV_HEADS, DIM, QUERIES = 3, 8, 4, 8, 4


def group_model(dtype):
    return cachemgr.ModelSpec(name="tp", num_layers=LAYERS, num_q_heads=Q_HEADS,
                              num_kv_heads=KV_HEADS, head_dim=DIM, dtype=dtype, block_size=4)


def sequence_data(seed, tokens):
    """The whole model's rows [L][tokens, H_kv, D] (tokens of a head share a direction, so
    codebooks merge some) and window queries [L, QUERIES, H_q, D]."""
    rng = np.random.default_rng(seed)
    base = np.where(np.arange(tokens) % 3 == 0, 1.0, 0.2)[:, None, None] * (
        np.arange(KV_HEADS)[None, :, None] + np.arange(DIM)[None, None, :] + 1.0)
    keys = [base + 0.05 * rng.standard_normal((tokens, KV_HEADS, DIM)) for _ in range(LAYERS)]
    values = [base - 0.05 * rng.standard_normal((tokens, KV_HEADS, DIM)) for _ in range(LAYERS)]
    queries = rng.standard_normal((LAYERS, QUERIES, Q_HEADS, DIM)).astype(np.float32)
    return keys, values, queries


def write_share(session, sequence_id, seed, tokens):
    """Writes the heads `session` holds (all of them for an unsharded session)."""
    keys, values, queries = sequence_data(seed, tokens)
    hkv, hq = session.model.num_kv_heads, session.model.num_q_heads
    k0, q0 = session.group_rank * hkv, session.group_rank * hq
    info = session.get_sequence(sequence_id)
    bs = session.model.block_size
    for layer in range(LAYERS):
        table = np.asarray(info.layers[layer].block_ids, dtype=np.int64)
        rows = np.arange(tokens)
        slots = table[rows // bs] * bs + rows % bs
        session.pool.write(layer, slots, keys[layer][:, k0:k0 + hkv].astype(session.pool.dtype),
                           values[layer][:, k0:k0 + hkv].astype(session.pool.dtype))
    session.write_inputs(queries=queries[:, :, q0:q0 + hq])


def read_rows(session, sequence_id):
    info = session.get_sequence(sequence_id)
    out = []
    for layer in range(LAYERS):
        t = info.layers[layer]
        if t.parked:
            out.append(None)
            continue
        k, v = session.pool.read(layer, t.block_ids, t.num_tokens)
        out.append({"keys": k.astype(np.float32).ravel().tolist(),
                    "values": v.astype(np.float32).ravel().tolist()})
    return out


def main():
    socket, group, rank, size, dtype = sys.argv[1:]
    session = cachemgr.Session.attach(socket, f"rank{rank}", group_model(dtype),
                                      num_blocks=64, group=(group, int(rank), int(size)))
    print(json.dumps({"event": "attached", "pool_id": session.pool_id,
                      "group_rank": session.group_rank, "group_size": session.group_size,
                      "kv_heads": session.model.num_kv_heads}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "write":
            write_share(session, command[1], int(command[2]), int(command[3]))
            print(json.dumps({"event": "written"}), flush=True)
        elif command[0] == "read":
            print(json.dumps({"event": "rows", "layers": read_rows(session, command[1])}),
                  flush=True)
        elif command[0] == "detach":
            session.detach()
            print(json.dumps({"event": "detached"}), flush=True)
            return


if __name__ == "__main__":
    main()
