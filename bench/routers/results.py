#!/usr/bin/env python3
"""Measurements of bench/routers.sh: agent counters, one result row per run, the tables.

  results.py scrape URL...                 the agents' counters now, as one JSON object
  results.py row --report DIR --before F --after F --router R --workload W --round N
               [--decisions F]             one JSON row: inference-perf's summary + agent deltas
                                           (+ where a kvroute gateway put prompts it had cached)
  results.py failed --router R --workload W --round N --error TEXT
                                           a row for a run that produced no report
  results.py table ROWS.jsonl              per workload: medians over rounds, then the raw rows
  results.py ready KIND URL WORKERS PID TIMEOUT
                                           waits until a router routes to WORKERS agents

Standard library only: it runs with the system python3.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time
import urllib.error
import urllib.request

# bench/load.py (the project's load generator) owns the process check shared by both.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from load import alive  # noqa: E402

# Agent counters (node-agent/src/metrics.rs). Prefix-cache counters count prompt tokens.
COUNTERS = {
    "queries": "vllm:prefix_cache_queries_total",
    "hits": "vllm:prefix_cache_hits_total",
    "preemptions": "vllm:num_preemptions_total",
    "requests": "kvroute_requests_received_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
}
LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def scrape(urls: list[str]) -> dict:
    """{url: {counter: value}, ...} plus `num_gpu_blocks` (the pool size the agent reports)."""
    out = {}
    for u in urls:
        text = get(u.rstrip("/") + "/metrics").decode()
        vals = {k: 0.0 for k in COUNTERS}
        for line in text.splitlines():
            m = LINE.match(line)
            if not m:
                continue
            name, labels, value = m.groups()
            for k, metric in COUNTERS.items():
                if name == metric:
                    vals[k] += float(value)
            if name == "vllm:cache_config_info" and labels:
                b = re.search(r'num_gpu_blocks="(\d+)"', labels)
                if b:
                    vals["num_gpu_blocks"] = int(b.group(1))
        out[u] = vals
    return out


def num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def cpu_arg(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def row(args: dict) -> dict:
    rep = args["report"]
    with open(os.path.join(rep, "summary_lifecycle_metrics.json")) as f:
        s = json.load(f)
    with open(args["before"]) as f:
        before = json.load(f)
    with open(args["after"]) as f:
        after = json.load(f)
    ok = s.get("successes") or {}
    lat = ok.get("latency") or {}
    thr = ok.get("throughput") or {}
    gp = ok.get("goodput_metrics") or {}
    fail = s.get("failures") or {}
    ttft = lat.get("time_to_first_token") or {}
    tpot = lat.get("time_per_output_token") or {}

    delta = {}
    per_agent_requests = []
    for u in after:
        d = {k: after[u].get(k, 0) - before.get(u, {}).get(k, 0) for k in COUNTERS}
        per_agent_requests.append(int(d["requests"]))
        for k, v in d.items():
            delta[k] = delta.get(k, 0) + v
    labels = fail.get("by_label") or {}
    return {
        "type": "run",
        "router": args["router"],
        "workload": args["workload"],
        "round": int(args["round"]),
        "completed": int(ok.get("count") or 0),
        "failed": int(fail.get("count") or 0),
        "failure_labels": {k: (v.get("count") if isinstance(v, dict) else v) for k, v in labels.items()},
        "wall_s": num(s.get("benchmark_time_seconds")),
        "output_tok_per_s": num(thr.get("output_tokens_per_sec")),
        "req_per_s": num(thr.get("requests_per_sec")),
        "goodput_req_per_s": num(gp.get("request_goodput")),
        "goodput_pct": num(gp.get("goodput_percentage")),
        "ttft_p50_s": num(ttft.get("median")),
        "ttft_p99_s": num(ttft.get("p99")),
        "tpot_p50_s": num(tpot.get("median")),
        "tpot_p99_s": num(tpot.get("p99")),
        "prompt_tokens": (ok.get("prompt_tokens") or {}).get("total"),
        "output_tokens": (ok.get("output_tokens") or {}).get("total"),
        # Agent side, deltas over the measured run only.
        "prefix_hit_rate": (delta["hits"] / delta["queries"]) if delta.get("queries") else None,
        "prefix_hit_tokens": int(delta.get("hits", 0)),
        "prefix_query_tokens": int(delta.get("queries", 0)),
        "preemptions": int(delta.get("preemptions", 0)),
        "agent_requests": per_agent_requests,
        "num_gpu_blocks": [after[u].get("num_gpu_blocks") for u in after],
        # CPU seconds the router and the two agents spent during the measured run: on a small
        # machine the router's share is taken from the agents.
        "router_cpu_s": cpu_arg(args.get("router_cpu")),
        "agent_cpu_s": cpu_arg(args.get("agent_cpu")),
        "locality": locality(args["decisions"]) if args.get("decisions") else None,
    }


def locality(path: str) -> dict | None:
    """Of a kvroute gateway's routed requests (its /dashboard/decisions, every candidate traced):
    how many had part of their prompt cached or in flight on some agent, how many of those went to
    an agent holding less of it than another candidate did ("moved"; nothing of it: "cold"), and
    the cost term that decided each move. None when the file is missing or not a decision log."""
    try:
        with open(path) as f:
            decisions = json.load(f).get("decisions") or []
    except (OSError, ValueError, AttributeError):
        return None
    out = {"routed": 0, "with_prefix": 0, "moved": 0, "cold": 0, "moved_by": {}}
    for d in decisions:
        if not isinstance(d, dict) or d.get("outcome") != "routed":
            continue
        route = d.get("route")
        if not isinstance(route, dict):
            continue
        cands = [c for c in route.get("candidates") or [] if isinstance(c, dict)]
        chosen = [c for c in cands if c.get("agent") == route.get("agent")]
        if not chosen:
            continue
        out["routed"] += 1
        best = max(int(c.get("local_blocks") or 0) for c in cands)
        mine = int(chosen[0].get("local_blocks") or 0)
        if best == 0:
            continue
        out["with_prefix"] += 1
        if mine < best:
            out["moved"] += 1
            out["cold"] += mine == 0
            term = (route.get("deciding") or {}).get("term") or "?"
            out["moved_by"][term] = out["moved_by"].get(term, 0) + 1
    return out


# --- tables -------------------------------------------------------------------------------------

COLUMNS = [
    # (header, key, format)
    ("out tok/s", "output_tok_per_s", "{:.1f}"),
    ("goodput r/s", "goodput_req_per_s", "{:.3f}"),
    ("TTFT p50", "ttft_p50_s", "{:.2f}s"),
    ("TTFT p99", "ttft_p99_s", "{:.2f}s"),
    ("TPOT p50", "tpot_p50_s", "{:.0f}ms", 1000),
    ("hit rate", "prefix_hit_rate", "{:.1%}"),
    ("preempt", "preemptions", "{:.0f}"),
    ("router CPU", "router_cpu_s", "{:.1f}s"),
    ("agents CPU", "agent_cpu_s", "{:.1f}s"),
    ("ok", "completed", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
]


def fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return spec.format(value * scale)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def split(r: dict) -> str:
    return "/".join(str(n) for n in r.get("agent_requests") or []) or "-"


def table(path: str) -> None:
    rows, meta = [], {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r.get("type") == "meta":
                    meta = r
                else:
                    rows.append(r)
    slo = meta.get("slo") or {}
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    routers = list(dict.fromkeys(r["router"] for r in rows))
    heads = ["router", "runs"] + [c[0] for c in COLUMNS] + ["split"]
    for w in workloads:
        print()
        desc = (meta.get("workloads") or {}).get(w, "")
        if meta.get("requests"):
            desc += f"; this run: --requests {meta['requests']}"
        print(f"## {w}" + (f"  ({desc})" if desc else ""))
        print(f"medians over rounds; goodput = requests/s with TTFT <= {slo.get('ttft', '?')} s "
              f"and TPOT <= {1000 * slo['tpot']:.0f} ms; hit rate and preemptions from the agents' "
              "/metrics; split = requests per agent (last round)" if slo else "medians over rounds")
        lines = []
        for rt in routers:
            rs = [r for r in rows if r["workload"] == w and r["router"] == rt]
            if not rs:
                continue
            good = [r for r in rs if not r.get("error")]
            cells = [rt, f"{len(good)}/{len(rs)}"]
            for c in COLUMNS:
                cells.append(fmt(median([r.get(c[1]) for r in good]), c[2], *(c[3:] or [1.0])))
            cells.append(split(good[-1]) if good else "-")
            lines.append(cells)
        print_table(heads, lines)
        print(f"raw rows ({w}):")
        raw_heads = ["round", "router"] + [c[0] for c in COLUMNS] + ["split", "wall", "note"]
        raw = []
        for r in sorted((r for r in rows if r["workload"] == w), key=lambda r: (r["round"], r.get("seq", 0))):
            cells = [str(r["round"]), r["router"]]
            for c in COLUMNS:
                cells.append(fmt(r.get(c[1]), c[2], *(c[3:] or [1.0])))
            cells += [split(r), fmt(r.get("wall_s"), "{:.0f}s"), note(r)]
            raw.append(cells)
        print_table(raw_heads, raw, indent="  ")


def note(r: dict) -> str:
    if r.get("error"):
        return "ERROR: " + r["error"][:80]
    labels = r.get("failure_labels") or {}
    return ", ".join(f"{k}={v}" for k, v in labels.items())


def print_table(heads: list[str], lines: list[list[str]], indent: str = "") -> None:
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(heads)]
    def out(cells):
        parts = [cells[0].ljust(widths[0])] if heads[0] != "round" else [cells[0].rjust(widths[0])]
        for i in range(1, len(cells)):
            if heads[i] in ("router", "note", "split"):
                parts.append(cells[i].ljust(widths[i]))
            else:
                parts.append(cells[i].rjust(widths[i]))
        print(indent + "  ".join(parts).rstrip())
    out(heads)
    for l in lines:
        out(l)


# --- readiness ----------------------------------------------------------------------------------

def routable(kind: str, url: str) -> int:
    """How many agents the router would route to now."""
    if kind == "kvroute":
        st = json.loads(get(url + "/dashboard/state"))
        return sum(1 for a in st.get("agents", []) if a.get("eligible"))
    # sglang-router, smg and vllm-router all answer /readiness the same way.
    st = json.loads(get(url + "/readiness"))
    return int(st.get("healthy_workers") or 0)


def ready(kind: str, url: str, workers: int, pid: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        if not alive(pid):
            print(f"error: the router (pid {pid}) exited before it was ready", file=sys.stderr)
            return 1
        try:
            n = routable(kind, url)
            if n >= workers:
                # /v1/models through the router too: that is what the first request needs.
                get(url + "/v1/models")
                return 0
            last = f"{n} of {workers} agents routable"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.3)
    print(f"error: router at {url} not ready after {timeout:.0f} s ({last})", file=sys.stderr)
    return 1


def cpu_seconds(pids: list[str]) -> float:
    """User + system CPU seconds of the given processes (all threads), 0 for one that is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{int(pid)}/stat") as f:
                # Fields after the command name, which is in parentheses and may hold spaces.
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def kv(argv: list[str]) -> dict:
    if len(argv) % 2:
        raise SystemExit(f"error: expected --key value pairs, got {argv}")
    return {argv[i].lstrip("-"): argv[i + 1] for i in range(0, len(argv), 2)}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(sys.argv) > 1 else 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "scrape":
        print(json.dumps(scrape(rest)))
    elif cmd == "row":
        a = kv(rest)
        r = row(a)
        r["seq"] = int(a.get("seq", 0))
        print(json.dumps(r))
    elif cmd == "failed":
        a = kv(rest)
        print(json.dumps({"type": "run", "router": a["router"], "workload": a["workload"],
                          "round": int(a["round"]), "seq": int(a.get("seq", 0)),
                          "error": a["error"], "completed": 0, "failed": None}))
    elif cmd == "cpu":
        print(f"{cpu_seconds(rest):.2f}")
    elif cmd == "table":
        table(rest[0])
    elif cmd == "ready":
        kind, url, workers, pid, timeout = rest
        return ready(kind, url.rstrip("/"), int(workers), int(pid), float(timeout))
    else:
        print(f"error: unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
