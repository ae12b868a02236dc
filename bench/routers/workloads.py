#!/usr/bin/env python3
"""The workloads of bench/routers.sh, as inference-perf configurations.

  workloads.py list                       names, one a line
  workloads.py config NAME [options]      prints an inference-perf YAML config on stdout

Every workload sends streaming `/v1/completions` with `ignore_eos` (inference-perf's default for
the vllm server type; the agent honours it), so every request produces exactly its output length
and the routers are compared on the same token counts. Closed loop: inference-perf's `concurrent`
load type keeps CONCURRENCY requests in flight.

Sizes are in tokens of the default model (SmolLM2) and are chosen so that every request fits one
agent with a 32 MiB KV pool: 91 blocks of 16 = 1,456 tokens, which is also the agent's
max_model_len (it clamps to the pool). A request longer than that could never run.

Standard library only (runs before the bench venv exists; emits YAML-compatible JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

# Every workload: (description, builder). A builder gets the requests count (0 = its default) and
# returns (data section, requests, concurrency).
POOL_TOKENS = 1456


def shared_prefix(groups: int, prefix: int, question: int, output: int, default_requests: int,
                  concurrency: int):
    def build(requests: int, seed: int):
        n = requests or default_requests
        per_group = max(1, math.ceil(n / groups))
        assert prefix + question + output <= POOL_TOKENS
        data = {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": groups,
                "num_prompts_per_group": per_group,
                "system_prompt_len": prefix,
                "question_len": question,
                "output_len": output,
                "seed": seed,
            },
        }
        return data, n, concurrency
    return build


def multi_turn(conversations: int, prefix: int, question: int, output: int, default_turns: int):
    # inference-perf's multi-turn mode (shared_prefix + enable_multi_turn_chat): each conversation
    # is one user session; turn 0 is prefix + question, turn k sends the whole previous turn (its
    # prompt and the answer) and then prefix + question again, so the prompt grows by
    # prefix + question + output every turn and the previous turn is always a cached prefix.
    # (Measured: 105, 242, 380 prompt tokens for 64 + 40 and 32 out; re-tokenizing the joined text
    # moves a boundary token or two, hence the margin.)
    def build(requests: int, seed: int):
        turns = max(1, math.ceil(requests / conversations)) if requests else default_turns
        longest = prefix + question + (turns - 1) * (prefix + question + output) + output + 16
        if longest > POOL_TOKENS:
            raise SystemExit(
                f"error: multi-turn with {turns} turns needs {longest} tokens per request, more than "
                f"the {POOL_TOKENS}-token KV pool; ask for at most "
                f"{conversations * ((POOL_TOKENS - prefix - question - output - 16) // (prefix + question + output) + 1)} requests")
        data = {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": conversations,
                "num_prompts_per_group": 1,
                "system_prompt_len": prefix,
                "question_len": question,
                "output_len": output,
                "seed": seed,
                "enable_multi_turn_chat": True,
            },
        }
        # Turns of one conversation run one after another; conversations run side by side.
        return data, conversations * turns, conversations
    return build


def random_lengths(lo: int, hi: int, output: int, default_requests: int, concurrency: int):
    def build(requests: int, seed: int):
        n = requests or default_requests
        assert hi + output <= POOL_TOKENS
        fixed = lo == hi
        data = {
            "type": "random",
            "input_distribution": {
                "min": lo, "max": hi, "mean": (lo + hi) / 2,
                "std_dev": 0 if fixed else (hi - lo) / math.sqrt(12),
                "type": "fixed" if fixed else "uniform", "total_count": n,
            },
            "output_distribution": {
                "min": output, "max": output, "mean": output, "std_dev": 0, "type": "fixed",
                "total_count": n,
            },
        }
        return data, n, concurrency
    return build


WORKLOADS = {
    # (a) the reference setting: 8 groups x (240-token system prompt + 40-token question).
    "shared-prefix": ("8 groups x 240-token prefix + 40-token question, 32 out, 64 req, 16 concurrent",
                      shared_prefix(8, 240, 40, 32, 64, 16)),
    # (a') fewer, longer prefixes: each group's prefix is a third of a pool, so where a group lands
    # matters more and two groups on one agent already crowd it.
    "shared-prefix-long": ("4 groups x 480-token prefix + 40-token question, 32 out, 64 req, 16 concurrent",
                           shared_prefix(4, 480, 40, 32, 64, 16)),
    # (b) growing conversations: 8 x 6 turns, longest turn about 785 + 32 tokens.
    "multi-turn": ("8 conversations x 6 turns, each turn resends the last turn + answer, 32 out",
                   multi_turn(8, 64, 40, 32, 6)),
    # (c) nothing to share: prefix-aware routing can only lose here.
    "no-sharing": ("random distinct prompts of 280 tokens, 32 out, 64 req, 16 concurrent",
                   random_lengths(280, 280, 32, 64, 16)),
    # (d) very different lengths: a 900-token prompt takes 57 of an agent's 91 blocks, so a router
    # that counts requests rather than tokens overloads one agent.
    "mixed-long": ("random prompts of 50..900 tokens (uniform), 32 out, 64 req, 16 concurrent",
                   random_lengths(50, 900, 32, 64, 16)),
}


def config(a) -> dict:
    _, build = WORKLOADS[a.workload]
    data, requests, concurrency = build(a.requests, a.seed)
    if a.concurrency:
        concurrency = a.concurrency
    goodput = {"ttft": a.slo_ttft, "tpot": a.slo_tpot}
    return {
        "api": {"type": "completion", "streaming": True},
        "data": data,
        "load": {
            "type": "concurrent",
            "stages": [{"num_requests": requests, "concurrency_level": concurrency}],
            # One sender process: the machine is small, and multi-turn sessions live in-process.
            "num_workers": 1,
            "worker_max_concurrency": max(concurrency, 1),
            "request_timeout": a.request_timeout,
            "base_seed": a.seed,
            "stage_teardown_grace_seconds": 5,
        },
        "server": {
            "type": "vllm",
            "model_name": a.model,
            "base_url": a.base_url,
            "ignore_eos": True,
        },
        "tokenizer": {"pretrained_model_name_or_path": a.tokenizer, "load_timeout": 120},
        "report": {
            "request_lifecycle": {
                "summary": True, "per_stage": False, "per_request": True,
                # The agent reports usage in the last chunk; its count is the one that is exact.
                "use_server_output_tokens": True,
                "percentiles": [50, 90, 99],
            },
            "prometheus": None,
            "goodput": {"constraints": goodput},
        },
        "storage": {"local_storage": {"path": a.report_dir}},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    c = sub.add_parser("config")
    c.add_argument("workload", choices=sorted(WORKLOADS))
    c.add_argument("--base-url", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder")
    c.add_argument("--report-dir", required=True)
    c.add_argument("--requests", type=int, default=0, help="0: the workload's own count")
    c.add_argument("--concurrency", type=int, default=0, help="0: the workload's own")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--slo-ttft", type=float, default=2.0)
    c.add_argument("--slo-tpot", type=float, default=0.1)
    c.add_argument("--request-timeout", type=float, default=900.0)
    a = p.parse_args()
    if a.cmd == "list":
        for name, (desc, _) in WORKLOADS.items():
            print(f"{name}\t{desc}")
        return 0
    if a.requests < 0 or a.concurrency < 0:
        p.error("--requests and --concurrency must not be negative")
    # JSON is YAML: no PyYAML needed here.
    json.dump(config(a), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
