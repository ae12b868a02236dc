#!/usr/bin/env python3
"""Writes a Hugging Face tokenizer folder for inference-perf from the default model's GGUF, and
checks that it gives the same token ids as the agent's own tokenizer.

  tokenizer.py --gguf FILE --out DIR --agent-bin PATH

inference-perf sizes its prompts with a Hugging Face tokenizer, and no hub is reachable here, so
the tokenizer comes from the GGUF the agents load (transformers converts GGUF vocabularies; it needs
the `gguf` package). Exits non-zero when the ids differ from `kvroute-agent tokenize`: prompt
lengths would then be wrong by an unknown amount.

Run with the bench venv's python (transformers, gguf).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

# Plain prose, digits and punctuation, non-ASCII, and the kind of text inference-perf generates
# (random vocabulary pieces glued together).
SAMPLES = [
    "The capital of France is",
    "Hello world, héllo 123 ✓ — naïve café; 4,096 tokens!\n\tnew line",
    " context-3-17 Question 42: what next? ## def f(x): return x**2",
]


def agent_ids(agent_bin: str, text: str) -> list[int]:
    out = subprocess.run([agent_bin, "tokenize", "--model", "default", text], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def build(gguf: str, out: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoTokenizer

    # transformers refuses any GGUF read without torch installed, although reading only the
    # metadata (vocabulary, merges, config: what a tokenizer needs) never touches torch. Torch is
    # gigabytes; pretend it is there for this metadata-only read.
    gguf_utils.is_torch_available = lambda: True
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf)),
                                        gguf_file=os.path.basename(gguf))
    tok.save_pretrained(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--agent-bin", required=True)
    a = p.parse_args()
    if not os.path.exists(os.path.join(a.out, "tokenizer.json")):
        tmp = a.out + ".tmp"
        build(a.gguf, tmp)
        os.replace(tmp, a.out)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.out)
    # Text like inference-perf's: random ids decoded to a string (what the agent receives).
    rng = random.Random(7)
    samples = SAMPLES + [tok.decode([rng.randrange(1000, 40000) for _ in range(200)])]
    bad = 0
    for s in samples:
        # The agent adds BOS only where the GGUF says so (add_bos: false for SmolLM2), so plain
        # encode() with special tokens must agree with it.
        hf = tok(s).input_ids
        ag = agent_ids(a.agent_bin, s)
        if hf != ag:
            bad += 1
            print(f"tokenizer mismatch on {s!r}:\n  hf    {hf}\n  agent {ag}", file=sys.stderr)
    if bad:
        print(f"error: the tokenizer in {a.out} disagrees with kvroute-agent on {bad} of "
              f"{len(samples)} strings; delete the folder to rebuild it", file=sys.stderr)
        return 1
    print(f"tokenizer {a.out}: ids identical to kvroute-agent tokenize on {len(samples)} strings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
