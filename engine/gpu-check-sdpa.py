"""PyTorch's scaled_dot_product_attention on kvroute's decode-bandwidth shape, K/V contiguous.

Run by engine/gpu-check.sh: 64 sequences x 4,096 tokens, 8 KV heads (32 query heads, GQA 4),
head_dim 128, bf16, one query token per sequence, the L2 cache flushed before each run. Writes
sdpa.json into --out. `--dry-run` checks the arguments and stops before importing torch.
"""
import argparse
import json
import os
import sys

SEQS, CTX, KV_HEADS, GQA, HEAD_DIM = 64, 4096, 8, 4, 128


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        print("sdpa: dry run: stopping before torch/the GPU")
        return 0
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("sdpa: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(SEQS, KV_HEADS * GQA, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(SEQS, KV_HEADS, CTX, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(SEQS, KV_HEADS, CTX, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
    kv_bytes = 2 * k.numel() * k.element_size()
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    flush = torch.empty(max(2 * l2, 256 << 20), dtype=torch.uint8, device=dev)

    def timed(fn):
        times = []
        for i in range(23):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            if i >= 3:
                times.append(a.elapsed_time(b))
        times.sort()
        return times[len(times) // 2]

    results = {}
    backends = [("default", None)]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends += [
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ]
    except Exception as e:  # older torch: default only
        results["backend_selection"] = f"unavailable: {e}"
    for name, backend in backends:
        def run():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            if backend is None:
                ms = timed(run)
            else:
                with sdpa_kernel(backend):
                    ms = timed(run)
            results[name] = {"ms_median": ms, "kv_bytes_per_s": kv_bytes / (ms / 1e3)}
            print(f"sdpa {name}: {ms:.3f} ms, {kv_bytes / (ms / 1e3) / 1e12:.2f} TB/s of K/V")
        except Exception as e:
            results[name] = {"error": str(e).splitlines()[0][:300]}
            print(f"sdpa {name}: not available ({results[name]['error']})")
    timed_ok = {n: r for n, r in results.items() if isinstance(r, dict) and "ms_median" in r}
    best = min(timed_ok.items(), key=lambda kv: kv[1]["ms_median"]) if timed_ok else (None, {})
    out = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev),
        "shape": {"seqs": SEQS, "context": CTX, "kv_heads": KV_HEADS, "query_heads": KV_HEADS * GQA,
                  "head_dim": HEAD_DIM, "dtype": "bf16", "layout": "contiguous [seq, head, token, dim]"},
        "kv_bytes": kv_bytes,
        "results": results,
        "best_backend": best[0],
        "best_ms": best[1].get("ms_median"),
    }
    with open(os.path.join(args.out, "sdpa.json"), "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
