#!/usr/bin/env python3
"""Several gateway replicas in front of the same agents (issue 12): preemptions and completed
requests for 1, 2 and 4 `kvroute gateway` processes under `--policy kv` and `--policy
round-robin`, on agents that start requests optimistically (`--optimistic-admission`, vLLM's
way: the gateway alone keeps them from over-filling) and on default agents (a request starts
only when its whole future fits).

For every combination: two fresh `kvroute-agent serve` processes on the default model (1 thread
each, `--kv-memory` small so the burst overfills them), N fresh gateways, then BURST requests
at once (each a short prompt growing to exactly two KV blocks with `ignore_eos`), sent round-robin
across the gateways. Prints one line per combination: completed (200), 429s, other answers,
seconds, the agents' preemptions (`vllm:num_preemptions_total`) and the gateways' no-room
re-routes (`kvroute_gateway_no_room_total`). A benchmark, not a test: nothing is asserted.

usage: bench/gateways.py [--burst 200] [--kv-memory 8MiB] [--gateways 1,2,4]
                         [--policies kv,round-robin] [--admission optimistic,whole-future]
                         [--no-build]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return 0, ""


def wait_for(url: str, procs: list[subprocess.Popen], seconds: float = 300) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if get(url, 2)[0] == 200:
            return
        for p in procs:
            if p.poll() is not None:
                sys.exit(f"a process exited while starting (rc {p.returncode}): {p.args}")
        time.sleep(0.1)
    sys.exit(f"{url} not ready after {seconds:.0f} s")


def metric_sum(url: str, name: str) -> float:
    _, text = get(url)
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except OSError:
        return 0


def instruction_set() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return platform.machine()
    for isa, flag in (("avx512vnni", "avx512_vnni"), ("avx512f", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return isa
    return platform.machine()


def run(args, admission: str, policy: str, n: int) -> dict:
    procs: list[subprocess.Popen] = []
    try:
        agents = []
        for i in range(2):
            http, grpc = free_port(), free_port()
            cmd = [
                os.path.join(REL, "kvroute-agent"), "serve", "--model", "default",
                "--http", f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc}",
                "--kv-memory", args.kv_memory, "--threads", "1", "--block-size", "8",
                "--agent-id", f"bench-{i}", "--device", "cpu",
            ]
            if admission == "optimistic":
                cmd.append("--optimistic-admission")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            agents.append((http, grpc))
        for http, _ in agents:
            wait_for(f"http://127.0.0.1:{http}/ready", procs)
        _, info = get(f"http://127.0.0.1:{agents[0][0]}/v1/models")
        model = json.loads(info)["data"][0]["id"]
        gws = []
        for _ in range(n):
            port = free_port()
            cmd = [os.path.join(REL, "kvroute"), "gateway", "--auth", "off", "--listen", f"127.0.0.1:{port}",
                   "--policy", policy, "--max-queue", "1024", "--queue-timeout", "120s"]
            for http, grpc in agents:
                cmd += ["--agent", f"http://127.0.0.1:{http},grpc://127.0.0.1:{grpc}"]
            env = dict(os.environ, RUST_LOG="warn")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
            gws.append(port)
        for port in gws:
            wait_for(f"http://127.0.0.1:{port}/ready", procs)
        # Prompts "Item i: a" are under one block of 8; 12 output tokens make two blocks.
        bodies = [
            (f"http://127.0.0.1:{gws[i % n]}/v1/completions",
             {"model": model, "prompt": f"Item {i}: a", "max_tokens": 12,
              "temperature": 0, "ignore_eos": True})
            for i in range(args.burst)
        ]
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.burst) as pool:
            codes = list(pool.map(lambda b: post(*b), bodies))
        seconds = time.time() - t0
        pre = sum(metric_sum(f"http://127.0.0.1:{h}/metrics", "vllm:num_preemptions_total")
                  for h, _ in agents)
        no_room = sum(metric_sum(f"http://127.0.0.1:{p}/metrics", "kvroute_gateway_no_room_total")
                      for p in gws)
        return {
            "completed": codes.count(200),
            "429": codes.count(429),
            "other": len(codes) - codes.count(200) - codes.count(429),
            "seconds": round(seconds, 1),
            "preemptions": int(pre),
            "no_room": int(no_room),
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--kv-memory", default="8MiB")
    ap.add_argument("--gateways", default="1,2,4")
    ap.add_argument("--policies", default="kv,round-robin")
    ap.add_argument("--admission", default="optimistic,whole-future")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.burst <= 2000:
        sys.exit("--burst must be in 1..=2000")
    try:
        counts = [int(x) for x in args.gateways.split(",")]
    except ValueError:
        sys.exit(f"--gateways is a comma-separated list of counts, not {args.gateways!r}")
    if any(not 1 <= c <= 16 for c in counts):
        sys.exit("gateway counts must be in 1..=16")
    admissions = args.admission.split(",")
    if any(a not in ("optimistic", "whole-future") for a in admissions):
        sys.exit("--admission takes optimistic and/or whole-future")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "kvroute-agent",
                        "-p", "kvroute-operator"], cwd=ROOT, check=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"{instruction_set()}, burst {args.burst}, --kv-memory {args.kv_memory} per agent, 2 agents")
    print(f"{'agents':<13} {'policy':<12} {'gateways':>8} {'completed':>9} {'429':>5} {'other':>5} "
          f"{'seconds':>7} {'preemptions':>11} {'no-room':>7}")
    for admission in admissions:
        for policy in args.policies.split(","):
            for n in counts:
                r = run(args, admission, policy, n)
                print(f"{admission:<13} {policy:<12} {n:>8} {r['completed']:>9} {r['429']:>5} "
                      f"{r['other']:>5} {r['seconds']:>7} {r['preemptions']:>11} {r['no_room']:>7}",
                      flush=True)


if __name__ == "__main__":
    main()
