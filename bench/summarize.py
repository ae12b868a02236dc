#!/usr/bin/env python3
"""Summarizes the raw outputs of bench/compare-llamacpp.sh and bench/compare-llama-server.sh.

Standard library only (it runs with whatever python3 is on the machine, before any venv exists).

  summarize.py engine DIR   DIR holds llamacpp-rN.jsonl (llama-batched-bench --output-format
                            jsonl) and kvroute-rN.jsonl (kvroute-agent bench --json), N = round.
  summarize.py server DIR   DIR holds llama-server-rN.json and kvroute-rN.json (bench/load.py).

Both also read DIR/meta.txt ("key: value" lines: machine, date, load, commands) and print it
under the table. Prints Markdown (ready for the README); `--json` prints one JSON object instead.
A missing kvroute side is not an error: the llama.cpp figures are printed alone, with a note
saying why there is no ratio.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys


def read_json_lines(path: str) -> list[dict]:
    """Every line of `path` that parses as a JSON object; anything else (logs) is skipped."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
    except OSError:
        pass
    return out


def round_of(path: str) -> int:
    m = re.search(r"-r(\d+)\.jsonl?$", path)
    return int(m.group(1)) if m else 0


def files(d: str, prefix: str, ext: str) -> list[str]:
    return sorted(glob.glob(os.path.join(d, f"{prefix}-r*.{ext}")), key=round_of)


def num(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def pick(obj: dict, exact: list[str], must: list[str], any_of: list[str]) -> float | None:
    """A numeric field of `obj`: the first of `exact` present, else the first key that contains
    every word of `must` and one of `any_of` (the kvroute JSON schema is owned by another crate;
    this keeps the summary working across small renames such as prefill_tok_s / prefill_tok_per_s).
    """
    for k in exact:
        if k in obj and num(obj[k]) is not None:
            return num(obj[k])
    for k, v in obj.items():
        kl = k.lower()
        if all(w in kl for w in must) and any(w in kl for w in any_of) and num(v) is not None:
            return num(v)
    return None


RATE = ["tok_s", "tok_per_s", "tokens_per_s", "per_s", "tps", "/s"]


def kvroute_row(obj: dict) -> dict | None:
    batch = pick(obj, ["batch", "batch_size", "pl", "n_seqs", "sequences"], [], [])
    prefill = pick(obj, ["prefill_tok_s", "prefill_tok_per_s", "prefill_tokens_per_s"],
                   ["prefill"], RATE)
    decode = pick(obj, ["decode_tok_s", "decode_tok_per_s", "decode_tokens_per_s"],
                  ["decode"], RATE)
    if batch is None or (prefill is None and decode is None):
        return None
    rss = pick(obj, ["peak_rss_bytes"], ["rss", "bytes"], [""])
    if rss is None:
        mib = pick(obj, ["peak_rss_mib"], ["rss", "mib"], [""])
        rss = mib * 1024 * 1024 if mib is not None else None
    return {"batch": int(batch), "prefill": prefill, "decode": decode, "rss": rss}


def llama_row(obj: dict) -> dict | None:
    if "speed_pp" not in obj or "pl" not in obj:
        return None
    return {"batch": int(obj["pl"]), "prefill": num(obj.get("speed_pp")),
            "decode": num(obj.get("speed_tg")), "rss": None,
            "pp": obj.get("pp"), "tg": obj.get("tg"), "flash_attn": obj.get("flash_attn"),
            "n_threads": obj.get("n_threads")}


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def read_meta(d: str) -> list[tuple[str, str]]:
    out = []
    try:
        with open(os.path.join(d, "meta.txt"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if ":" in line:
                    k, v = line.rstrip("\n").split(":", 1)
                    out.append((k.strip(), v.strip()))
    except OSError:
        pass
    return out


def collect(d: str, prefix: str, ext: str, parse) -> dict[int, list[dict]]:
    """batch size -> one row per round (in round order)."""
    per_batch: dict[int, list[dict]] = {}
    for path in files(d, prefix, ext):
        r = round_of(path)
        for obj in read_json_lines(path):
            row = parse(obj)
            if row is not None:
                row["round"] = r
                per_batch.setdefault(row["batch"], []).append(row)
    return per_batch


def engine(d: str, as_json: bool, note: str) -> int:
    llama = collect(d, "llamacpp", "jsonl", llama_row)
    kv = collect(d, "kvroute", "jsonl", kvroute_row)
    if not llama and not kv:
        print(f"error: no results in {d} (expected llamacpp-rN.jsonl / kvroute-rN.jsonl)",
              file=sys.stderr)
        return 1
    batches = sorted(set(llama) | set(kv))
    rows = []
    for b in batches:
        lr, kr = llama.get(b, []), kv.get(b, [])
        row = {
            "batch": b,
            "rounds_llamacpp": len(lr),
            "rounds_kvroute": len(kr),
            "llamacpp_prefill": median([x["prefill"] for x in lr]),
            "llamacpp_decode": median([x["decode"] for x in lr]),
            "kvroute_prefill": median([x["prefill"] for x in kr]),
            "kvroute_decode": median([x["decode"] for x in kr]),
            "kvroute_peak_rss_mib": (lambda m: m / 1048576 if m is not None else None)(
                median([x["rss"] for x in kr])),
            "raw_llamacpp_prefill": [x["prefill"] for x in lr],
            "raw_llamacpp_decode": [x["decode"] for x in lr],
            "raw_kvroute_prefill": [x["prefill"] for x in kr],
            "raw_kvroute_decode": [x["decode"] for x in kr],
        }
        row["ratio_prefill"] = ratio(row["kvroute_prefill"], row["llamacpp_prefill"])
        row["ratio_decode"] = ratio(row["kvroute_decode"], row["llamacpp_decode"])
        rows.append(row)
    meta = read_meta(d)
    if as_json:
        print(json.dumps({"rows": rows, "meta": dict(meta), "kvroute_present": bool(kv)}))
        return 0

    print("## kvroute vs llama.cpp (llama-batched-bench): medians over rounds\n")
    if not kv:
        print("> **kvroute figures missing**: " + (note or "no `kvroute-agent bench` output")
              + ". llama.cpp's own figures only; no ratios.\n")
    print("| batch | prefill tok/s kvroute | prefill tok/s llama.cpp | prefill ratio "
          "| decode tok/s kvroute | decode tok/s llama.cpp | decode ratio | kvroute peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {fmt(r['kvroute_prefill'])} | {fmt(r['llamacpp_prefill'])} "
              f"| {fmt_ratio(r['ratio_prefill'])} | {fmt(r['kvroute_decode'])} "
              f"| {fmt(r['llamacpp_decode'])} | {fmt_ratio(r['ratio_decode'])} "
              f"| {fmt(r['kvroute_peak_rss_mib'])} |")
    print("\nRatios are kvroute / llama.cpp (above 1.00× means kvroute is faster). "
          "Prefill tok/s counts every prompt token of the batch; decode tok/s is summed over "
          "the batch's sequences.\n")
    print("Raw per-round figures (tok/s, in round order):\n")
    for r in rows:
        def seq(xs):
            return ", ".join(fmt(x) for x in xs) or "—"
        print(f"- batch {r['batch']}: llama.cpp prefill [{seq(r['raw_llamacpp_prefill'])}] "
              f"decode [{seq(r['raw_llamacpp_decode'])}]; kvroute prefill "
              f"[{seq(r['raw_kvroute_prefill'])}] decode [{seq(r['raw_kvroute_decode'])}]")
    print_meta(meta)
    return 0


SERVER_FIELDS = [
    # key, label, digits, higher is better
    ("req_per_s", "completed requests/s", 2, True),
    ("output_tok_per_s", "output tokens/s", 1, True),
    ("ttft_p50_s", "TTFT p50 (ms)", 0, False),
    ("ttft_p99_s", "TTFT p99 (ms)", 0, False),
]


def server(d: str, as_json: bool, note: str) -> int:
    sides = {}
    for name, prefix in (("kvroute", "kvroute"), ("llama-server", "llama-server")):
        runs = []
        for path in files(d, prefix, "json"):
            objs = read_json_lines(path)
            if objs:
                obj = objs[-1]
                obj["round"] = round_of(path)
                runs.append(obj)
        sides[name] = runs
    if not sides["kvroute"] and not sides["llama-server"]:
        print(f"error: no results in {d} (expected llama-server-rN.json / kvroute-rN.json)",
              file=sys.stderr)
        return 1
    med = {}
    for name, runs in sides.items():
        med[name] = {k: median([num(r.get(k)) for r in runs]) for k, *_ in SERVER_FIELDS}
        med[name]["completed"] = sum(int(r.get("completed", 0)) for r in runs)
        med[name]["failed"] = sum(int(r.get("failed", 0)) for r in runs)
        med[name]["rounds"] = len(runs)
    meta = read_meta(d)
    if as_json:
        print(json.dumps({"medians": med, "runs": sides, "meta": dict(meta)}))
        return 0

    print("## kvroute-agent serve vs llama-server: medians over rounds\n")
    if not sides["kvroute"]:
        print("> **kvroute figures missing**: " + (note or "no `kvroute-agent serve` run")
              + ". llama-server's own figures only; no ratios.\n")
    print("| figure | kvroute | llama-server | kvroute / llama-server |")
    print("|---|---:|---:|---:|")
    for key, label, digits, _ in SERVER_FIELDS:
        scale = 1000.0 if key.endswith("_s") and key.startswith("ttft") else 1.0
        a, b = med["kvroute"][key], med["llama-server"][key]
        print(f"| {label} | {fmt(a * scale if a is not None else None, digits)} "
              f"| {fmt(b * scale if b is not None else None, digits)} "
              f"| {fmt_ratio(ratio(a, b))} |")
    print("\nRatios are kvroute / llama-server: above 1.00× is better for requests/s and "
          "tokens/s, below 1.00× is better for TTFT.\n")
    print("Raw per-round figures:\n")
    for name, runs in sides.items():
        for r in runs:
            print(f"- {name} round {r['round']}: completed {r.get('completed')} "
                  f"failed {r.get('failed', 0)} in {fmt(num(r.get('wall_s')), 2)} s, "
                  f"{fmt(num(r.get('req_per_s')), 2)} req/s, "
                  f"{fmt(num(r.get('output_tok_per_s')))} output tok/s, TTFT p50 "
                  f"{fmt(_ms(r.get('ttft_p50_s')), 0)} ms p99 {fmt(_ms(r.get('ttft_p99_s')), 0)} ms, "
                  f"prompt tokens/request {r.get('prompt_tokens_per_request', '—')}, "
                  f"output tokens/request {r.get('output_tokens_per_request', '—')}")
    print_meta(meta)
    return 0


def _ms(v) -> float | None:
    x = num(v)
    return None if x is None else x * 1000.0


def print_meta(meta: list[tuple[str, str]]) -> None:
    if not meta:
        return
    print("\nRun:\n")
    for k, v in meta:
        print(f"- {k}: {v}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["engine", "server"])
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="one JSON object instead of Markdown")
    p.add_argument("--note", default="", help="why the kvroute side may be missing")
    a = p.parse_args()
    if a.kind == "engine":
        return engine(a.dir, a.json, a.note)
    return server(a.dir, a.json, a.note)


if __name__ == "__main__":
    sys.exit(main())
