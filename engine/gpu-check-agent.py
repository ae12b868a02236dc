#!/usr/bin/env python3
"""Decode tokens/s through a running kvroute-agent (the whole engine: scheduler, KV manager,
sampling, HTTP streaming), at several batch sizes. Standard library only.

  gpu-check-agent.py --url http://127.0.0.1:PORT --out agent_e2e.json [--batches 1,16,64]
  gpu-check-agent.py --dry-run      checks the window arithmetic on made-up timestamps

For batch B it sends B streaming /v1/completions requests at once (the same 128-token prompt
shape per request, greedy, ignore_eos, max_tokens fixed) and records when each token arrives.
Steady decode speed is counted in the window where all B requests are decoding: from the moment
the last one got its first token to the moment the first one got its last token; tokens that
arrive in that window divided by its length. Whole-run throughput (all tokens / wall time,
prefill included) is reported beside it.
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def stream_one(url, body, out, idx):
    """POSTs one streaming completion; out[idx] = dict(t0, times, usage, error)."""
    u = urllib.parse.urlparse(url)
    rec = {"t0": time.monotonic(), "times": [], "usage": None, "error": None}
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
        else:
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.monotonic()
                ev = json.loads(data)
                if ev.get("usage"):
                    rec["usage"] = ev["usage"]
                for ch in ev.get("choices") or []:
                    if ch.get("text"):
                        rec["times"].append(now)
        conn.close()
    except Exception as e:  # reported in the JSON, never hidden
        rec["error"] = repr(e)
    out[idx] = rec


def window_rate(recs):
    """(tokens in the all-decoding window, window seconds) from per-request arrival times."""
    firsts = [r["times"][0] for r in recs if r["times"]]
    lasts = [r["times"][-1] for r in recs if r["times"]]
    if len(firsts) != len(recs) or not recs:
        return 0, 0.0
    lo, hi = max(firsts), min(lasts)
    if hi <= lo:
        return 0, 0.0
    n = sum(1 for r in recs for t in r["times"] if lo < t <= hi)
    return n, hi - lo


def run_batch(url, model, batch, prompt_len, max_tokens, vocab):
    recs = [None] * batch
    threads = []
    for i in range(batch):
        # Different prompts per request (no prefix-cache hits), ids well inside the vocabulary.
        prompt = [(1000 + 7919 * (i * prompt_len + j)) % (vocab - 1000) + 500 for j in range(prompt_len)]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        threads.append(threading.Thread(target=stream_one, args=(url, body, recs, i)))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    errors = [r["error"] for r in recs if r["error"]]
    tokens = sum((r["usage"] or {}).get("completion_tokens", len(r["times"])) for r in recs)
    n, secs = window_rate(recs)
    ttft = sorted(r["times"][0] - r["t0"] for r in recs if r["times"])
    return {
        "batch": batch,
        "prompt_tokens": prompt_len,
        "max_tokens": max_tokens,
        "completion_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall if wall > 0 else None,
        "decode_window_tokens": n,
        "decode_window_s": secs,
        "decode_tok_s": n / secs if secs > 0 else None,
        "ttft_median_s": ttft[len(ttft) // 2] if ttft else None,
        "errors": errors[:5],
        "failed_requests": len(errors),
    }


def get(url, path):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read().decode()
    conn.close()
    return r.status, body


def dry_run():
    mk = lambda ts: {"t0": 0.0, "times": ts, "usage": None, "error": None}
    # Two requests: all decoding from 2.0 (second one's first token) to 4.0 (first one's last).
    recs = [mk([1.0, 2.0, 3.0, 4.0]), mk([2.0, 2.5, 3.5, 4.5, 5.0])]
    n, secs = window_rate(recs)
    assert (n, secs) == (4, 2.0), (n, secs)  # 3.0, 4.0 and 2.5, 3.5
    assert window_rate([mk([1.0]), mk([])]) == (0, 0.0)
    print("gpu-check-agent: dry run ok (window arithmetic)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--out")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    if a.dry_run:
        dry_run()
        return 0
    status, body = get(a.url, "/v1/kvroute/model")
    info = json.loads(body) if status == 200 else {}
    info = {k: info.get(k) for k in ("model", "block_size", "block_bytes", "max_model_len")}
    status, body = get(a.url, "/v1/models")
    model = json.loads(body)["data"][0]["id"]
    vocab = 49152
    result = {"url": a.url, "model": model, "model_info": info, "runs": []}
    # One short warm-up request (kernel caches, first cuBLAS call).
    run_batch(a.url, model, 1, 16, 8, vocab)
    for b in [int(x) for x in a.batches.split(",")]:
        r = run_batch(a.url, model, b, a.prompt_tokens, a.max_tokens, vocab)
        print(f"agent e2e batch {b}: decode {r['decode_tok_s'] or 0:.0f} tok/s in the all-decoding window, "
              f"{r['throughput_tok_s'] or 0:.0f} tok/s overall ({r['failed_requests']} failed)", flush=True)
        result["runs"].append(r)
    status, metrics = get(a.url, "/metrics")
    result["metrics"] = {l.split()[0]: l.split()[-1] for l in metrics.splitlines()
                         if l.startswith("kvroute_kv_blocks") and len(l.split()) >= 2}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.out}")
    return 1 if any(r["failed_requests"] for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
