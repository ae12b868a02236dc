//! The by-hand subcommands with the default model: `tokenize` prints the reference token ids
//! (llama.cpp's, from the fixture) as a JSON array; `run` prints a greedy continuation that
//! starts like llama.cpp's; `bench` reports prefill/decode speed per batch size (issue 4's shape,
//! what `bench/compare-llamacpp.sh` reads) or, with `--requests`, completes synthetic requests
//! through the engine; its bad flags are refused with the flag named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvroute_tests::{fixture, model_arg, run_agent};

#[test]
fn tokenize_matches_the_reference_ids() {
    let f = fixture();
    let cases = f["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let model = model_arg();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let mut args = vec!["tokenize", "--model", &model];
        if c["special"] == false {
            args.push("--no-special");
        }
        args.push("--");
        args.push(text);
        let out = run_agent(&args);
        assert!(
            out.status.success(),
            "{text:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: Vec<u64> = serde_json::from_slice(&out.stdout).unwrap();
        let want: Vec<u64> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids, want, "{text:?}");
    }
}

#[test]
fn run_prints_the_greedy_continuation() {
    let f = fixture();
    let g = &f["generate"][0];
    let model = model_arg();
    let out = run_agent(&[
        "run",
        "--model",
        &model,
        "--device",
        "cpu",
        "--prompt",
        g["prompt"].as_str().unwrap(),
        "--max-tokens",
        "4",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    // `run` ends the text with one newline; the rest is the 4-token greedy continuation, which
    // must be where llama.cpp's 32-token one starts.
    let generated = text.strip_suffix('\n').unwrap_or(&text);
    let reference = g["greedy_text"].as_str().unwrap();
    assert!(
        generated.len() > 2 && reference.starts_with(generated),
        "{generated:?} is not a prefix of {reference:?}"
    );
    assert!(stderr.contains("completion_tokens=4"), "{stderr}");
}

#[test]
fn bench_reports_every_request() {
    let model = model_arg();
    let out = run_agent(&[
        "bench",
        "--model",
        &model,
        "--device",
        "cpu",
        "--requests",
        "3",
        "--concurrency",
        "2",
        "--prompt-tokens",
        "8",
        "--output-tokens",
        "4",
        "--kv-memory",
        "32MiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["completed"], 3);
    assert!(v["output_tok_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["ttft_p50_s"].as_f64().unwrap() <= v["ttft_p99_s"].as_f64().unwrap());
}

#[test]
fn bench_reports_one_json_line_per_batch_size() {
    let model = model_arg();
    let out = run_agent(&[
        "bench",
        "--model",
        &model,
        "--device",
        "cpu",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--batch",
        "1,3",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (v, batch) in lines.iter().zip([1, 3]) {
        assert_eq!(v["batch"], batch);
        assert_eq!(v["prompt_tokens"], 16);
        assert_eq!(v["gen_tokens"], 4);
        for k in [
            "prefill_tok_s",
            "decode_tok_s",
            "prefill_secs",
            "decode_secs",
        ] {
            assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
        }
        // The default model's weights alone are ~94 MB (memory-mapped, read in full).
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 50 << 20, "{v}");
    }
}

#[test]
fn bench_refuses_bad_flags_naming_them() {
    let model = model_arg();
    for (args, flag) in [
        (&["--batch", "1,x"][..], "--batch"),
        (&["--batch", "0"][..], "--batch"),
        (&["--batch", ""][..], "--batch"),
        (&["--batch", "99999999999999999999"][..], "--batch"),
        (
            &["--batch", "1024", "--prompt-tokens", "128"][..],
            "--batch",
        ),
        (&["--prompt-tokens", "0"][..], "--prompt-tokens"),
        (&["--prompt-tokens=-3"][..], "--prompt-tokens"),
        (&["--threads", "0"][..], "--threads"),
        (&["--threads", "many"][..], "--threads"),
        (&["--prompt-tokens", "9000", "--batch", "1"][..], "context"),
    ] {
        let mut all = vec!["bench", "--model", &model, "--device", "cpu"];
        all.extend_from_slice(args);
        let out = run_agent(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
