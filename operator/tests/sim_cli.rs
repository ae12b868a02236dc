//! `kvroute sim` as a user runs it: the table on stdout, the JSON and SVG files, and clear errors for a
//! bad configuration or flag.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn kvroute() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvroute"))
}

const CONFIG: &str = r#"{
  "agents": {"count": 3, "gpu": "h100", "model": "llama-3.1-8b", "kv_blocks": 800},
  "workload": {
    "requests": 120,
    "arrival": {"poisson": {"rate": 6}},
    "prompt": {"median": 300, "sigma": 0.5, "max": 2000},
    "output": {"median": 60, "max": 200},
    "groups": {"count": 4, "prefix_tokens": 600}
  },
  "policies": ["kv", "round-robin", "least-requests"]
}"#;

#[test]
fn prints_a_line_per_policy_and_writes_the_json() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sim.json");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out_json = dir.path().join("out.json");
    let out_svg = dir.path().join("out.svg");
    let out = kvroute()
        .args(["sim", "--config"])
        .arg(&cfg)
        .arg("--json")
        .arg(&out_json)
        .arg("--svg")
        .arg(&out_svg)
        .args(["--policy", "kv,round-robin"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 agents × 800 KV blocks"), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("kv ")), "{stdout}");
    assert!(
        lines.iter().any(|l| l.starts_with("round-robin ")),
        "{stdout}"
    );
    // --policy replaced the configuration's list.
    assert!(
        !lines.iter().any(|l| l.starts_with("least-requests")),
        "{stdout}"
    );
    assert!(stdout.contains("× real time"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        assert_eq!(r["requests"], 120);
        assert_eq!(r["completed"], 120, "{r}");
        assert!(r["kv_timeline"].as_array().unwrap().len() > 2);
        let q = r["ttft_quantiles"].as_array().unwrap();
        assert_eq!(q.len(), 101);
        assert_eq!(q[50], r["ttft_p50_s"], "the median is the 50th of 101");
    }
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    // The picture: three panels with a line per policy, and both names in the legend.
    let svg = std::fs::read_to_string(&out_svg).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert_eq!(svg.matches("<polyline").count(), 6, "{svg}");
    assert!(svg.contains(">kv</text>") && svg.contains(">round-robin</text>"));
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sim.json");
    std::fs::write(&cfg, CONFIG).unwrap();
    let big = dir.path().join("big.json");
    std::fs::write(&big, " ".repeat(2 << 20)).unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"agents\": 3}").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--config".into(), "/nonexistent/x.json".into()],
            "/nonexistent/x.json",
        ),
        (
            vec!["--config".into(), big.display().to_string()],
            "more than",
        ),
        (
            vec!["--config".into(), bad.display().to_string()],
            "configuration",
        ),
        (
            vec![
                "--config".into(),
                cfg.display().to_string(),
                "--policy".into(),
                "fastest".into(),
            ],
            "unknown policy",
        ),
        (
            vec![
                "--config".into(),
                cfg.display().to_string(),
                "--seed=-1".into(),
            ],
            "--seed",
        ),
        (
            vec![
                "--config".into(),
                cfg.display().to_string(),
                "--policy".into(),
                "round-robin".into(),
                "--svg".into(),
                "/nonexistent/dir/out.svg".into(),
            ],
            "--svg /nonexistent/dir/out.svg",
        ),
        (vec![], "--config"),
    ];
    for (args, want) in cases {
        let out = kvroute().arg("sim").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
