//! The README's run command for real: `kvroute up --agents 2` starts two real `kvroute-agent`
//! processes with the default model and the gateway; the official `openai` client talks to the
//! gateway (completions and chat, plain and streamed, greedy), the answers come from the model
//! (the greedy completion starts with llama.cpp's first token), and SIGTERM stops the whole tree.
//! Its stdout is a pipe, so its status block comes as plain lines (`up_terminal_real` has the
//! terminal). Its dashboard after that load is checked in headless Chromium against `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvroute_tests::{bin, fixture, model_arg, run_py};

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// `kvroute up`'s dashboard after the client's requests, in headless Chromium: the history's
/// last sample counts the answered requests `/metrics` counts, the page draws a KV line per
/// agent and lists every decision `/dashboard/decisions` has, and a screenshot is taken.
fn dashboard_under_load(rt: &tokio::runtime::Runtime, url: &str) {
    let gw: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let text = |path: &str| rt.block_on(kvroute_tests::try_get_text(gw, path)).unwrap();
    let answered = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("kvroute_gateway_requests_total{") && l.contains("status=\"200\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (ok, sample) = loop {
        let ok = answered(&text("/metrics"));
        let h: serde_json::Value = serde_json::from_str(&text("/dashboard/history")).unwrap();
        let last = h["samples"].as_array().and_then(|s| s.last()).cloned();
        if let Some(last) = last.filter(|l| l["ok"].as_f64() == Some(ok)) {
            break (ok, last);
        }
        assert!(
            Instant::now() < deadline,
            "no history sample counts {ok} answered: {h}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        ok >= 4.0,
        "the client's four generations were answered: {ok}"
    );
    assert_eq!(
        sample["agents"].as_array().map(Vec::len),
        Some(2),
        "{sample}"
    );
    let log: serde_json::Value = serde_json::from_str(&text("/dashboard/decisions")).unwrap();
    let decisions = log["decisions"].as_array().unwrap();
    // The client's four generations, routed, and its request for a model nobody serves,
    // refused (`/metrics` counts its model list among the answered too).
    let routed = decisions
        .iter()
        .filter(|d| d["outcome"] == "routed")
        .count();
    assert_eq!(routed, 4, "{log}");
    assert!(
        decisions
            .iter()
            .any(|d| d["outcome"] == "rejected" && d["status"] == 404 && d["route"].is_null()),
        "{log}"
    );

    let scratch = std::env::temp_dir();
    let page = format!("{url}/dashboard");
    let dom = kvroute_tests::chromium::run_chromium(&page, &["--dump-dom"], &scratch);
    for agent in ["agent-1", "agent-2"] {
        assert!(
            dom.contains(&format!("class=\"series\" data-name=\"{agent}\"")),
            "no KV line for {agent}: {dom}"
        );
    }
    assert!(
        dom.contains(&format!("data-decisions=\"{}\"", decisions.len())),
        "{dom}"
    );
    let shot = scratch.join(format!("kvroute-up-dashboard-{}.png", std::process::id()));
    let arg = format!("--screenshot={}", shot.display());
    kvroute_tests::chromium::run_chromium(&page, &[&arg], &scratch);
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let _ = std::fs::remove_file(&shot);
}

#[test]
fn up_with_real_agents_serves_the_openai_client_and_stops_cleanly() {
    let mut child = kvroute_tests::KillOnDrop(
        Command::new(bin("kvroute"))
            .args(["up", "--agents", "2", "--listen", "127.0.0.1:0"])
            .args(["--model", &model_arg(), "--kv-memory", "128MiB"])
            .env("KVROUTE_AGENT_BIN", bin("kvroute-agent"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Read the terminal's other stream as it comes (the logs belong in files, not there).
    let mut err_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err_pipe, &mut s);
        s
    });
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut log_dir = None;
    let mut printed = Vec::new();
    let (mut pids, mut url, mut model) = (Vec::new(), None, None);
    let mut agent_urls = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        printed.push(line.clone());
        if let Some(d) = line.strip_prefix("logs: ") {
            log_dir = Some(std::path::PathBuf::from(d));
        }
        if let Some(rest) = line.strip_prefix("agent ") {
            agent_urls.extend(
                rest.split_whitespace()
                    .find(|w| w.starts_with("http://"))
                    .map(str::to_string),
            );
            pids.push(
                rest.split_whitespace()
                    .nth(2)
                    .unwrap()
                    .parse::<u32>()
                    .unwrap(),
            );
        }
        if let Some(rest) = line.strip_prefix("kvroute is up: ") {
            model = rest.split('"').nth(1).map(str::to_string);
        }
        if let Some(u) = line.strip_prefix("READY ") {
            url = Some(u.to_string());
            break;
        }
    }
    let url = url.expect("kvroute up printed READY");
    // Not a terminal: the status block comes as plain lines, one per change, no escape codes.
    assert!(printed.iter().all(|l| !l.contains('\x1b')), "{printed:?}");
    for want in [
        "agents: 2/2 ready",
        "agent-1: ready http://",
        "agent-2: ready http://",
    ] {
        assert_eq!(
            printed.iter().filter(|l| l.starts_with(want)).count(),
            1,
            "{want:?} once in {printed:#?}"
        );
    }
    let model = model.expect("kvroute up printed the served model name");
    assert_eq!(pids.len(), 2);

    let reference = &fixture()["generate"][0];
    let prompt = reference["prompt"].as_str().unwrap();
    let out = run_py(
        "openai_roundtrip.py",
        &[&format!("{url}/v1"), &model, prompt, "12"],
    );
    assert_eq!(out["models"], serde_json::json!([model]), "{out}");
    let text = out["completion"]["text"].as_str().unwrap();
    assert_eq!(out["completion"]["completion_tokens"], 12, "{out}");
    // llama.cpp's greedy continuation of this prompt starts with " Paris".
    let expected = reference["greedy_text"].as_str().unwrap();
    let first_word: String = expected.chars().take(6).collect();
    assert!(
        text.starts_with(&first_word),
        "completion {text:?} through the gateway does not start like llama.cpp's {first_word:?}"
    );
    assert_eq!(out["completion_stream"]["text"], out["completion"]["text"]);
    assert_eq!(out["completion_stream"]["completion_tokens"], 12);
    assert!(!out["chat"]["text"].as_str().unwrap().is_empty(), "{out}");
    assert_eq!(out["chat_stream"]["text"], out["chat"]["text"]);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    dashboard_under_load(&rt, &url);

    // The agents serve only this run's gateway: straight to one, no token, 401.
    assert_eq!(agent_urls.len(), 2, "{agent_urls:?}");
    let addr: std::net::SocketAddr = agent_urls[0].trim_start_matches("http://").parse().unwrap();
    let body =
        serde_json::to_vec(&serde_json::json!({"model": model, "prompt": "Hi", "max_tokens": 1}))
            .unwrap();
    let (status, _) = rt.block_on(kvroute_tests::call(addr, "POST", "/v1/completions", body));
    assert_eq!(
        status, 401,
        "an agent of kvroute up answered a caller without its token"
    );

    // SIGTERM to `kvroute up` stops the gateway and both agents.
    kvroute_tests::sigterm(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "kvroute up exited with {status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        pids.iter().all(|&p| !alive(p)),
        "agents still running after kvroute up exited: {pids:?}"
    );

    // A calm terminal: kvroute up's own lines only; every process's log in the run folder.
    let stderr = stderr.join().unwrap();
    assert!(
        !stderr.contains(" INFO ") && !stderr.contains("kvroute_agent"),
        "logs on the terminal:\n{stderr}"
    );
    assert!(printed.iter().all(|l| !l.contains(" INFO ")), "{printed:?}");
    let dir = log_dir.expect("kvroute up names its log folder");
    for agent in ["agent-1", "agent-2"] {
        let log = std::fs::read_to_string(dir.join(format!("{agent}.log"))).unwrap();
        assert!(log.contains("kvroute-agent ready"), "{agent}.log:\n{log}");
    }
    let gw_log = std::fs::read_to_string(dir.join("gateway.log")).unwrap();
    assert!(
        gw_log.contains("API keys are off"),
        "gateway.log:\n{gw_log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
