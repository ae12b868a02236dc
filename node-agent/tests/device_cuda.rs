#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kvroute-agent serve --device cuda` where CUDA cannot run (no driver here; no visible GPU
//! anywhere, since the test hides them): the real binary exits non-zero at start with a message
//! that names the flag and the cause, and never panics. Built with `--features cuda` it is the
//! driver/GPU probe that refuses; without the feature, the build itself.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Generous: the process should exit at once; this only turns a hang into a failure.
const GUARD: Duration = Duration::from_secs(120);

#[test]
fn device_cuda_without_a_usable_gpu_exits_nonzero_with_a_clear_message() {
    let child = Command::new(env!("CARGO_BIN_EXE_kvroute-agent"))
        .args([
            "serve",
            "--device",
            "cuda",
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--model",
            "default",
        ])
        .env("CUDA_VISIBLE_DEVICES", "")
        .env_remove("KVROUTE_DEVICE")
        .env_remove("KVROUTE_KV_MEMORY")
        .env_remove("KVROUTE_GPU_MEMORY_UTILIZATION")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kvroute-agent");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(GUARD) {
        Ok(r) => r.expect("wait for kvroute-agent"),
        Err(_) => {
            // Still running: it did not refuse to start. Stop it and fail.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("kvroute-agent serve --device cuda was still running after {GUARD:?}");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("kvroute-agent: error: --device \"cuda\": "),
        "{stderr}"
    );
    if cfg!(feature = "cuda") {
        #[cfg(feature = "cuda")]
        if !kvroute_engine::cuda::driver_present() {
            assert!(
                stderr.contains("no CUDA driver found (libcuda.so)"),
                "{stderr}"
            );
        }
    } else {
        assert!(stderr.contains("--features cuda"), "{stderr}");
    }
}
