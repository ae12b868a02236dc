#!/usr/bin/env python3
"""Load driver for OpenAI-compatible servers (bench/compare-llama-server.sh, issue 5).

N concurrent streaming clients (closed loop: each starts its next request when the previous one
ends) send R requests in all through the official `openai` Python client, to POST /v1/completions
with `stream: true`. Every request has a fixed prompt length and a fixed output length:

- the prompt is a list of token ids (both llama-server and kvroute take token-id prompts), so both
  servers get exactly --prompt-tokens tokens, identical between servers, distinct between requests
  (seeded random ids: no shared prefix, so prefix caching cannot help either server);
- the output is exactly --max-tokens tokens: `max_tokens` plus `ignore_eos` (and for llama-server
  also `n_predict`), greedy (temperature 0).

Prints one JSON object on stdout: completed and failed requests, wall time, completed requests/s,
output tokens/s, time to first token (TTFT) p50/p99, end-to-end latency p50/p99, time per output
token, and the prompt/output tokens per request the server reported. Progress goes to stderr.
Bounded: at most --requests requests and --deadline seconds in all (unfinished requests are
cancelled and counted as failed).

usage: load.py --base-url http://127.0.0.1:8080/v1 --server llama-server|kvroute
               [--clients 8] [--requests 32] [--prompt-tokens 128] [--max-tokens 64]
               [--model NAME] [--deadline 600] [--seed 1]
               [--wait-ready URL [--ready-timeout 180] [--server-pid PID]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
import urllib.error
import urllib.request


def quantile(xs: list[float], q: float) -> float | None:
    """Nearest-rank quantile (q in [0, 1]); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))
    return s[k]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_ready(url: str, timeout: float, pid: int = 0) -> None:
    """Polls `url` until it answers 200 (model loaded), or raises after `timeout` seconds, or as
    soon as the server process `pid` (when given) is gone."""
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        if pid and not alive(pid):
            raise SystemExit(f"error: the server (pid {pid}) exited before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    raise SystemExit(f"error: {url} not ready after {timeout:.0f} s (last: {last})")


def first_model(base_url: str) -> str:
    """The first id of GET /v1/models (the served model name), or 'default'."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=10) as r:
            data = json.load(r)
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        if ids and isinstance(ids[0], str):
            return ids[0]
    except (urllib.error.URLError, OSError, ValueError):
        pass
    return "default"


class Result:
    __slots__ = ("ok", "ttft", "latency", "out_tokens", "prompt_tokens", "error")

    def __init__(self):
        self.ok = False
        self.ttft = None
        self.latency = None
        self.out_tokens = 0
        self.prompt_tokens = None
        self.error = None


async def one(client, model: str, prompt: list[int], max_tokens: int, extra: dict) -> Result:
    res = Result()
    start = time.perf_counter()
    chunks = 0
    usage = None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            if getattr(chunk, "usage", None) is not None:
                usage = chunk.usage
            for c in chunk.choices or []:
                if c.text:
                    chunks += 1
                    if res.ttft is None:
                        res.ttft = time.perf_counter() - start
        res.latency = time.perf_counter() - start
        # The server's own count when it reports usage; else one token per text chunk (both
        # servers stream a chunk per token, except where a token is an incomplete UTF-8 piece).
        if usage is not None and usage.completion_tokens is not None:
            res.out_tokens = int(usage.completion_tokens)
            res.prompt_tokens = usage.prompt_tokens
        else:
            res.out_tokens = chunks
        res.ok = True
    except asyncio.CancelledError:
        res.error = "cancelled at the deadline"
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(a) -> dict:
    import openai  # from the venv the compare script makes; imported late for --help

    client = openai.AsyncOpenAI(base_url=a.base_url, api_key="unused", max_retries=0,
                                timeout=a.deadline)
    model = a.model or first_model(a.base_url)
    extra = {"ignore_eos": True}
    if a.server == "llama-server":
        extra["n_predict"] = a.max_tokens
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(a.token_lo, a.token_hi) for _ in range(a.prompt_tokens)]
               for _ in range(a.requests)]

    # Warm-up (not measured): one short request, so that lazy initialisation in either server
    # does not land in the first measured TTFT.
    w = await one(client, model, [rng.randrange(a.token_lo, a.token_hi) for _ in range(8)],
                  4, dict(extra, n_predict=4) if "n_predict" in extra else extra)
    if not w.ok:
        raise SystemExit(f"error: warm-up request to {a.base_url} failed: {w.error}")

    results: list[Result] = []
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    done = 0

    async def worker():
        nonlocal done
        while True:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = Result()
            try:
                r = await one(client, model, p, a.max_tokens, extra)
            finally:
                results.append(r)
            done += 1
            if r.error:
                print(f"[load] request failed: {r.error}", file=sys.stderr)
            if done % max(1, a.requests // 4) == 0:
                print(f"[load] {a.server}: {done}/{a.requests} done", file=sys.stderr)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(a.clients)]
    _, pending = await asyncio.wait(tasks, timeout=a.deadline)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()

    ok = [r for r in results if r.ok]
    # Requests that never started (deadline) count as failed too.
    failed = a.requests - len(ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    lats = [r.latency for r in ok if r.latency is not None]
    out_tokens = sum(r.out_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.out_tokens - 1) for r in ok
             if r.ttft is not None and r.latency is not None and r.out_tokens > 1]
    prompt_counts = sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None})
    out_counts = sorted({r.out_tokens for r in ok})
    errors = sorted({r.error for r in results if r.error})
    if pending:
        errors.insert(0, f"deadline of {a.deadline:.0f} s hit: {failed} requests unfinished or not sent")
    return {
        "server": a.server,
        "base_url": a.base_url,
        "model": model,
        "clients": a.clients,
        "requests": a.requests,
        "completed": len(ok),
        "failed": failed,
        "errors": errors[:5],
        "wall_s": wall,
        "req_per_s": len(ok) / wall if wall > 0 else None,
        "output_tok_per_s": out_tokens / wall if wall > 0 else None,
        "output_tokens": out_tokens,
        "ttft_p50_s": quantile(ttfts, 0.50),
        "ttft_p99_s": quantile(ttfts, 0.99),
        "latency_p50_s": quantile(lats, 0.50),
        "latency_p99_s": quantile(lats, 0.99),
        "tpot_mean_s": statistics.mean(tpots) if tpots else None,
        # What the server said it processed: shows that both got the same shape.
        "prompt_tokens_per_request": prompt_counts if len(prompt_counts) != 1 else prompt_counts[0],
        "output_tokens_per_request": out_counts if len(out_counts) != 1 else out_counts[0],
        "prompt_tokens": a.prompt_tokens,
        "max_tokens": a.max_tokens,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", required=True, help="for example http://127.0.0.1:8080/v1")
    p.add_argument("--server", required=True, choices=["llama-server", "kvroute"],
                   help="which extra request fields fix the output length")
    p.add_argument("--model", default="", help="model name (default: first of GET /v1/models)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=0, help="default: 4 per client")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--token-lo", type=int, default=1000,
                   help="prompt token ids are drawn from [token-lo, token-hi): ordinary tokens")
    p.add_argument("--token-hi", type=int, default=40000)
    p.add_argument("--wait-ready", default="", help="URL to poll for 200 before starting")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--server-pid", type=int, default=0,
                   help="stop waiting for readiness as soon as this process is gone")
    a = p.parse_args()
    if a.requests == 0:
        a.requests = 4 * a.clients
    for name in ("clients", "requests", "prompt_tokens", "max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (0 <= a.token_lo < a.token_hi):
        p.error("--token-lo must be below --token-hi")
    if a.deadline <= 0:
        p.error("--deadline must be positive")
    if a.wait_ready:
        wait_ready(a.wait_ready, a.ready_timeout, a.server_pid)
    out = asyncio.run(run(a))
    print(f"[load] {a.server}: {out['completed']}/{a.requests} completed in {out['wall_s']:.1f} s",
          file=sys.stderr)
    print(json.dumps(out), flush=True)
    return 0 if out["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
