//! `kvroute-agent serve` refuses bad flags and environment values at start: non-zero exit, and
//! the message names the flag and the bad value. Runs the real binary; needs no model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvroute_tests::run_agent;

fn refused(args: &[&str], env: &[(&str, &str)], flag: &str, value: &str) {
    let mut cmd = std::process::Command::new(kvroute_tests::bin("kvroute-agent"));
    cmd.args(args).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} {env:?} was accepted");
    assert!(
        stderr.contains(flag),
        "{args:?}: stderr does not name {flag}: {stderr}"
    );
    assert!(
        stderr.contains(value),
        "{args:?}: stderr does not show {value}: {stderr}"
    );
}

#[test]
fn bad_flags_name_flag_and_value() {
    refused(
        &["serve", "--kv-memory", "lots"],
        &[],
        "--kv-memory",
        "lots",
    );
    refused(
        &["serve", "--kv-memory", "12XB"],
        &[],
        "--kv-memory",
        "12XB",
    );
    refused(
        &["serve", "--http", "localhost"],
        &[],
        "--http",
        "localhost",
    );
    refused(&["serve", "--block-size", "0"], &[], "--block-size", "0");
    refused(
        &["serve", "--max-body-bytes", "huge"],
        &[],
        "--max-body-bytes",
        "huge",
    );
    refused(
        &["serve", "--drain-timeout", "1y"],
        &[],
        "--drain-timeout",
        "1y",
    );
    refused(&["serve", "--device", "tpu"], &[], "--device", "tpu");
    refused(
        &[
            "serve",
            "--device",
            "cpu",
            "--gpu-memory-utilization",
            "0.9",
        ],
        &[],
        "--gpu-memory-utilization",
        "0.9",
    );
}

#[test]
fn bad_environment_values_name_the_flag() {
    refused(
        &["serve"],
        &[("KVROUTE_KV_MEMORY", "-1GiB")],
        "--kv-memory",
        "-1GiB",
    );
    refused(&["serve"], &[("KVROUTE_GRPC", "9001")], "--grpc", "9001");
    refused(
        &["serve"],
        &[("KVROUTE_MAX_NUM_SEQS", "many")],
        "--max-num-seqs",
        "many",
    );
}

#[test]
fn cuda_on_a_build_without_cuda_is_a_clear_start_error() {
    let out = run_agent(&[
        "serve",
        "--device",
        "cuda",
        "--http",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // This crate is built without the `cuda` feature in the default test build.
    assert!(!out.status.success());
    assert!(
        stderr.contains("--device") && stderr.contains("CUDA"),
        "{stderr}"
    );
}

#[test]
fn help_lists_the_subcommands() {
    let out = run_agent(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["serve", "run", "tokenize", "bench"] {
        assert!(text.contains(sub), "{text}");
    }
}

#[test]
fn a_missing_model_file_stops_the_agent_with_the_flag_named() {
    let out = run_agent(&[
        "serve",
        "--model",
        "/nonexistent/model.gguf",
        "--http",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--model \"/nonexistent/model.gguf\""),
        "{stderr}"
    );
}
