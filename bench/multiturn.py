#!/usr/bin/env python3
"""Multi-turn conversations through an OpenAI-compatible server (bench/host-tier.sh, issue 18).

C conversations run side by side; each sends T turns one after another. Turn k's prompt is the
conversation's own system text, then every earlier question and the answer the server gave to
it, then question k: what a chat client resends, so turn k's prompt starts with turn k-1's
prompt and answer, and the server can reuse that prefix if it still caches it. Requests are
streaming `/v1/completions` through the official `openai` client, greedy, `ignore_eos`, exactly
--max-tokens output tokens.

Prints one JSON object: completed and failed requests, wall time, output tokens/s, TTFT p50/p99
(all turns, and turns after the first), and the prompt tokens the server reported. Progress on
stderr.

usage: multiturn.py --base-url http://127.0.0.1:8080/v1 [--conversations 32] [--turns 6]
                    [--system-words 48] [--question-words 30] [--max-tokens 16] [--model NAME]
                    [--deadline 900] [--seed 1] [--show-agents]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

WORDS = (
    "river mountain copper lantern orchard silver window harbor meadow candle thunder garden "
    "pepper violet marble falcon ember canyon willow saddle crystal anchor bramble velvet "
    "compass granite meadowlark pillow timber saffron beacon cobalt thistle quarry lagoon "
    "juniper ferris oyster parsley hollow walnut tundra glacier mosaic cinder harvest prairie "
    "nectar pebble quill rustle spindle tangle umber vessel wicker yonder zephyr"
).split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def conversation(client, a, i: int, out: dict) -> None:
    rng = random.Random(a.seed * 1_000_003 + i)
    history = f"Conversation {i}. {text(rng, a.system_words)}\n"
    for turn in range(a.turns):
        prompt = history + f"Q: {text(rng, a.question_words)}\nA:"
        t0 = time.monotonic()
        first = None
        answer = []
        usage = None
        try:
            raw = await client.completions.with_raw_response.create(
                model=a.model,
                prompt=prompt,
                max_tokens=a.max_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            agent = raw.headers.get("x-kvroute-agent", "?")
            stream = raw.parse()
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    if first is None:
                        first = time.monotonic() - t0
                    answer.append(chunk.choices[0].text)
                if chunk.usage is not None:
                    usage = chunk.usage
        except Exception as e:  # a failed turn ends its conversation
            out["failed"] += 1
            print(f"conversation {i} turn {turn}: {type(e).__name__}: {e}", file=sys.stderr)
            return
        out["completed"] += 1
        if first is not None:
            out["ttft"].append(first)
            if turn > 0:
                out["ttft_later"].append(first)
        if usage is not None:
            out["prompt_tokens"] += usage.prompt_tokens
            out["output_tokens"] += usage.completion_tokens
        if a.show_agents:
            details = getattr(usage, "prompt_tokens_details", None) if usage else None
            cached = getattr(details, "cached_tokens", None) if details else None
            print(f"conversation {i} turn {turn}: agent {agent}, prompt "
                  f"{getattr(usage, 'prompt_tokens', '?')} tokens, cached {cached}", file=sys.stderr)
        history = prompt + "".join(answer) + "\n"


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-words", type=int, default=48)
    p.add_argument("--question-words", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--show-agents", action="store_true",
                   help="print each turn's agent (the gateway's x-kvroute-agent) and cached tokens on stderr")
    a = p.parse_args()
    for name in ("conversations", "turns", "max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.system_words < 0 or a.question_words < 1:
        p.error("--system-words must be >= 0 and --question-words >= 1")
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=a.base_url, api_key="none", timeout=a.deadline, max_retries=0)
    out = {"completed": 0, "failed": 0, "ttft": [], "ttft_later": [], "prompt_tokens": 0,
           "output_tokens": 0}
    t0 = time.monotonic()
    tasks = [asyncio.create_task(conversation(client, a, i, out)) for i in range(a.conversations)]
    done, pending = await asyncio.wait(tasks, timeout=a.deadline)
    for t in pending:
        t.cancel()
    wall = time.monotonic() - t0
    out["failed"] += a.conversations * a.turns - out["completed"] - out["failed"]
    print(json.dumps({
        "completed": out["completed"],
        "failed": out["failed"],
        "wall_s": round(wall, 2),
        "output_tok_s": round(out["output_tokens"] / wall, 2) if wall > 0 else 0,
        "ttft_p50_s": pct(out["ttft"], 50),
        "ttft_p99_s": pct(out["ttft"], 99),
        "ttft_later_turns_p50_s": pct(out["ttft_later"], 50),
        "prompt_tokens": out["prompt_tokens"],
        "output_tokens": out["output_tokens"],
    }))


if __name__ == "__main__":
    asyncio.run(main())
