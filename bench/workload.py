#!/usr/bin/env python3
"""Routing-quality workload: shared-prefix conversations mixed with long and short requests,
sent concurrently as streaming completions through a kvroute gateway. Prints one JSON line:
completed, 429s, other errors, output tokens/s, TTFT p50/p99 (ms).

Usage: workload.py GATEWAY_URL [REQUESTS=200] [CONCURRENCY=32] [SEED=1] [MODEL]
MODEL defaults to the first model the gateway lists (GET /v1/models).
Sizes with the default model's tokenizer (SmolLM2): a conversation prefix is about 240 tokens, a
long prompt about 590, so every request fits an agent with a 32 MiB KV pool (1,456 tokens) and
a few of them fill it.
Standard library only.
"""
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request

url = sys.argv[1].rstrip("/")
n_requests = int(sys.argv[2]) if len(sys.argv) > 2 else 200
concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 32
rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
if len(sys.argv) > 5:
    model = sys.argv[5]
else:
    with urllib.request.urlopen(url + "/v1/models", timeout=60) as resp:
        model = json.load(resp)["data"][0]["id"]

# 8 "conversations", each a shared system/context prefix; turns add to them.
prefixes = [
    f"Conversation {c}: " + " ".join(f"context-{c}-{w}" for w in range(40)) for c in range(8)
]
jobs = []
for i in range(n_requests):
    kind = rng.random()
    if kind < 0.6:  # a turn of a shared-prefix conversation
        c = rng.randrange(len(prefixes))
        prompt = prefixes[c] + f" Question {i}: what next?"
        max_tokens = rng.choice([16, 32, 64])
    elif kind < 0.8:  # long, unshared
        prompt = " ".join(f"long-{i}-{w}" for w in range(100))
        max_tokens = 128
    else:  # short
        prompt = f"Short question {i}?"
        max_tokens = 8
    jobs.append((prompt, max_tokens))

lock = threading.Lock()
results = {"completed": 0, "rate_limited": 0, "errors": 0, "tokens": 0, "ttft": []}
next_job = [0]


def worker():
    while True:
        with lock:
            if next_job[0] >= len(jobs):
                return
            prompt, max_tokens = jobs[next_job[0]]
            next_job[0] += 1
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                           "stream": True, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        t0 = time.monotonic()
        first = None
        tokens = 0
        failed = False
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                for line in resp:
                    line = line.strip()
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        failed = True
                        break
                    if first is None:
                        first = time.monotonic() - t0
                    tokens += 1
        except urllib.error.HTTPError as e:
            with lock:
                if e.code == 429:
                    results["rate_limited"] += 1
                else:
                    results["errors"] += 1
            continue
        except Exception:
            failed = True
        with lock:
            if failed:
                results["errors"] += 1
            else:
                results["completed"] += 1
                results["tokens"] += tokens
                if first is not None:
                    results["ttft"].append(first)


start = time.monotonic()
threads = [threading.Thread(target=worker) for _ in range(concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - start
ttft = sorted(results["ttft"]) or [0.0]


def pct(q):
    return 1000 * ttft[min(len(ttft) - 1, int(q * (len(ttft) - 1)))]


print(json.dumps({
    "completed": results["completed"],
    "rate_limited": results["rate_limited"],
    "errors": results["errors"],
    "output_tokens_per_s": round(results["tokens"] / elapsed, 1),
    "ttft_p50_ms": round(pct(0.5), 1),
    "ttft_p99_ms": round(pct(0.99), 1),
    "seconds": round(elapsed, 1),
}))
