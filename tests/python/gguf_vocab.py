"""Reads the tokenizer metadata of a GGUF file (tokens, merges, token types) with no dependency
beyond the standard library, for tests that build a reference tokenizer from it."""

import struct

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}


def read_metadata(path):
    with open(path, "rb") as f:
        def u32():
            return struct.unpack("<I", f.read(4))[0]

        def u64():
            return struct.unpack("<Q", f.read(8))[0]

        def string():
            return f.read(u64()).decode("utf-8", "replace")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                elem, n = u32(), u64()
                return [value(elem) for _ in range(n)]
            fmt = _SCALARS[kind]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        assert f.read(4) == b"GGUF"
        u32()  # version
        u64()  # tensors
        meta = {}
        for _ in range(u64()):
            key = string()
            meta[key] = value(u32())
        return meta
