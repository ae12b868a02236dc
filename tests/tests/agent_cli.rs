//! The by-hand subcommands with the default model: `tokenize` prints the reference token ids
//! (llama.cpp's, from the fixture) as a JSON array; `run` prints a greedy continuation that
//! starts like llama.cpp's; `bench` completes its synthetic requests and reports as JSON.
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
