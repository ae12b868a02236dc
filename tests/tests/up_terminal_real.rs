//! `kvroute up` on a real terminal: a pseudo-terminal (what tmux or an ssh session gives a
//! program) of 100 columns holds its stdout and stderr. It shows the model check's progress bar
//! (`--model default` on a cache folder of its own, when the tests' model is the default one),
//! the agents' load bar, and
//! a status block redrawn in place (cursor moved back over it, none of its lines wider than the
//! terminal)
//! with each agent's KV blocks from the gateway; no log line reaches the terminal; SIGTERM stops it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvroute_tests::{bin, model_arg};

const COLUMNS: u16 = 100;

/// A pseudo-terminal pair of `COLUMNS` × 40.
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: COLUMNS,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two file descriptors into the ints we pass and reads the winsize;
    // the name and termios pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// A cache folder of its own holding the default model without the mark of an earlier check,
/// so `kvroute up --model default` checks it (with a bar) and starts its agents on it. `None`
/// when the model the tests serve is not the default model's file.
fn fresh_cache() -> Option<std::path::PathBuf> {
    let model = std::path::PathBuf::from(model_arg());
    if model.file_name()? != kvroute_engine::fetch::DEFAULT_MODEL_FILE {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("kvroute-up-terminal-{}", std::process::id()));
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let copy = models.join(kvroute_engine::fetch::DEFAULT_MODEL_FILE);
    if std::fs::hard_link(&model, &copy).is_err() {
        std::fs::copy(&model, &copy).unwrap();
    }
    Some(dir)
}

/// Text drawn on the terminal, without escape sequences (what a reader would see, lines of
/// every redraw kept).
fn visible(raw: &str) -> Vec<String> {
    let mut out = Vec::new();
    // The terminal turns each "\n" into "\r\n".
    for line in raw.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        let mut s = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                // CSI: ESC [ params final-byte
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            } else if c == '\r' {
                s.clear();
            } else {
                s.push(c);
            }
        }
        out.push(s);
    }
    out
}

#[test]
fn up_on_a_terminal_draws_progress_and_a_status_block_in_place() {
    let (master, slave) = pty();
    let cache = fresh_cache();
    let mut cmd = Command::new(bin("kvroute"));
    cmd.args(["up", "--agents", "2", "--listen", "127.0.0.1:0"])
        .args(["--kv-memory", "64MiB"]);
    match &cache {
        Some(dir) => cmd.args(["--model", "default"]).env("KVROUTE_CACHE", dir),
        None => cmd.args(["--model", &model_arg()]),
    };
    let mut child = kvroute_tests::KillOnDrop(
        cmd.env("KVROUTE_AGENT_BIN", bin("kvroute-agent"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap(),
    );
    // The command holds the terminal's other side too: drop it, so the reader sees the end.
    drop(cmd);
    let raw = Arc::new(Mutex::new(Vec::<u8>::new()));
    let reader = {
        let raw = raw.clone();
        // SAFETY: a duplicate of the master descriptor, owned by this File alone.
        let mut file = unsafe { std::fs::File::from_raw_fd(libc::dup(master.as_raw_fd())) };
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every holder of the terminal's other side is gone.
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 {
                    break;
                }
                raw.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&raw.lock().unwrap()).into_owned();
    // Up, and the block redrawn with both agents' KV blocks.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = text();
        // (An idle block is not redrawn: one KV line each is all there is to wait for.)
        if t.contains("READY http://")
            && t.contains("agent-1  ready    KV")
            && t.contains("agent-2  ready    KV")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kvroute up did not come up on the terminal:\n{t}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "kvroute up exited:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    kvroute_tests::sigterm(child.id());
    let status = child.wait().unwrap();
    drop(master);
    let _ = reader.join();
    assert!(status.success(), "kvroute up exited with {status}");
    let raw = text();
    let lines = visible(&raw);

    // In place: the block is redrawn by moving the cursor back over it.
    assert!(
        raw.contains("\x1b[") && raw.contains("F\r\x1b[J"),
        "no in-place redraw:\n{raw:?}"
    );
    // The agents' load bar, full once both are ready.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("agents   2/2 ready [====")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("agents   0/2 ready") || l.starts_with("agents   1/2 ready")),
        "the load bar never showed agents still loading: {lines:#?}"
    );
    // Each agent's KV blocks, as the gateway sees them.
    for agent in ["agent-1", "agent-2"] {
        assert!(
            lines.iter().any(
                |l| l.starts_with(&format!("{agent}  ready    KV 0/")) && l.contains(" used [")
            ),
            "{agent}: {lines:#?}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("gateway  http://")),
        "{lines:#?}"
    );
    if let Some(dir) = &cache {
        // The model was checked here, with a bar, before the agents started.
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("model    verifying cached model") && l.contains("MiB")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("model    ready  ")
                    && l.contains(dir.to_str().unwrap_or("?"))),
            "{lines:#?}"
        );
    }
    // Nothing wider than the terminal (a wrapped line would break the redraw), and no log line.
    let block = ["model ", "agents ", "agent-", "gateway "];
    for l in &lines {
        assert!(
            !block.iter().any(|b| l.starts_with(b)) || l.chars().count() < usize::from(COLUMNS),
            "{l:?} is wider than the terminal"
        );
        assert!(
            !l.contains(" INFO ") && !l.contains("WARN"),
            "log on the terminal: {l}"
        );
    }
    assert!(lines.iter().any(|l| l == "stopped"), "{lines:#?}");
    if let Some(dir) = cache {
        let _ = std::fs::remove_dir_all(dir);
    }
}
