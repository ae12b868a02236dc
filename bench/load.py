"""Load driver for OpenAI-compatible servers: N concurrent streaming clients, fixed prompt and
output lengths (ignore_eos), greedy. Prints one JSON line: completed requests/s, output tokens/s,
time to first token p50/p99.

usage: load.py BASE_URL MODEL --concurrency N --requests R --prompt-words P --max-tokens M
"""
import argparse
import asyncio
import json
import statistics
import sys
import time

import openai


async def one(client, model, prompt, max_tokens, ttfts, counts):
    start = time.perf_counter()
    first = None
    chunks = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            if first is None:
                first = time.perf_counter()
    if first is not None:
        ttfts.append(first - start)
    counts.append(chunks)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("model")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    client = openai.AsyncOpenAI(base_url=a.base_url, api_key="unused", max_retries=0, timeout=3600)
    # Every request gets a distinct prompt of the same length, so prefix caching cannot help.
    prompts = [f"Request {i}: " + "the quick brown fox jumps over the lazy dog " * (a.prompt_words // 9)
               for i in range(a.requests)]
    ttfts, counts = [], []
    queue = asyncio.Queue()
    for pr in prompts:
        queue.put_nowait(pr)

    async def worker():
        while not queue.empty():
            pr = queue.get_nowait()
            await one(client, a.model, pr, a.max_tokens, ttfts, counts)

    # Warm-up request (not measured).
    await one(client, a.model, "warm up", 4, [], [])
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    wall = time.perf_counter() - t0
    ttfts.sort()
    q = lambda f: ttfts[min(len(ttfts) - 1, int(f * len(ttfts)))] if ttfts else float("nan")
    out = {
        "completed": len(counts),
        "wall_s": wall,
        "req_per_s": len(counts) / wall,
        # ignore_eos: each request yields exactly max_tokens tokens.
        "output_tok_per_s": len(counts) * a.max_tokens / wall,
        "text_chunks_per_request": statistics.mean(counts) if counts else 0,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p99_s": q(0.99),
    }
    json.dump(out, sys.stdout)
    print()


asyncio.run(main())
