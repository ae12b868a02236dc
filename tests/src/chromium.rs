//! Headless Chromium for dashboard tests (`scripts/test.d/40-chromium.sh` installs it). Shared
//! by this crate's tests and `operator/tests/gateway_dashboard.rs` (included there by path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// `$KVROUTE_CHROMIUM`, else `chromium` (or `chromium-browser`, `google-chrome`) on `PATH`.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("KVROUTE_CHROMIUM") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("no chromium found: run scripts/test.sh (scripts/test.d/40-chromium.sh installs it) or set KVROUTE_CHROMIUM");
}

/// Runs headless Chromium (1280×720, 5 s of virtual time for the page's scripts) with `extra`
/// flags on `url`, its profile in a new folder under `scratch`; returns its stdout. Killed
/// after 120 s.
pub fn run_chromium(url: &str, extra: &[&str], scratch: &Path) -> String {
    let profile = scratch.join(format!(
        "chromium-profile-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&profile).unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--window-size=1280,720",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read stdout on a thread so a stuck browser is killed instead of hanging the test.
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let mut waited = Duration::ZERO;
    while child.try_wait().unwrap().is_none() {
        if waited > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("chromium did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
        waited += Duration::from_millis(100);
    }
    let _ = std::fs::remove_dir_all(&profile);
    reader.join().unwrap()
}
