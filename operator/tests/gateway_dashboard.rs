//! The dashboard in a real browser: headless Chromium loads `/dashboard` from a gateway in front
//! of two stub agents; the rendered DOM (after the page's script ran) must show each agent's KV
//! blocks and the admission queue. A screenshot is kept under the target dir
//! (`target/tmp/gateway-dashboard.png`). Chromium comes from `scripts/test.d/40-chromium.sh`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use support::stub::{StubAgent, StubConfig};
use support::*;

#[path = "../../tests/src/chromium.rs"]
mod chromium;

fn run_chromium(url: &str, extra: &[&str]) -> String {
    chromium::run_chromium(url, extra, Path::new(env!("CARGO_TARGET_TMPDIR")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_agents_blocks_and_queue_in_chromium() {
    let a = StubAgent::start(StubConfig {
        agent_id: "east-1".into(),
        total_blocks: 777,
        ..StubConfig::default()
    })
    .await;
    let b = StubAgent::start(StubConfig {
        agent_id: "west-2".into(),
        total_blocks: 555,
        ..StubConfig::default()
    })
    .await;
    let gw = gateway(&[&a, &b], |c| c.queue_timeout = Duration::from_secs(120)).await;
    a.state.with(|i| i.free = 100);
    b.state.with(|i| i.free = 0);
    let router = gw.gateway.router.clone();
    wait_until("gateway sees the new usage", || {
        let s = router.agents();
        s.iter().any(|x| x.free_blocks == 100) && s.iter().any(|x| x.free_blocks == 0)
    })
    .await;
    // A small request is served (east-1 has the room): the decision log has it.
    let (status, _, body) = post(
        &client(),
        gw.addr,
        "/v1/completions",
        &completion("hello there", 1, false),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A request too big for east-1's free blocks waits in the queue while the page renders.
    let c = client();
    let addr = gw.addr;
    // ~3,200 tokens = 200 blocks.
    let prompt = "q".repeat(16 * 3 * 200);
    let waiting = tokio::spawn(async move {
        post(
            &c,
            addr,
            "/v1/completions",
            &completion(&prompt, 1, false),
            &[("x-kvroute-tenant", "tenant-blue")],
        )
        .await
    });
    wait_until("request queued", || router.queue().depth == 1).await;
    // Three history samples (one a second) with the queue and the usage in them.
    let hist_url = format!("http://{}/dashboard/history", gw.addr);
    let mut samples = Vec::new();
    for _ in 0..100 {
        let (_, body) = get(&client(), &hist_url).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        samples = v["samples"].as_array().cloned().unwrap_or_default();
        let with_agents = samples
            .iter()
            .filter(|s| s["agents"].as_array().is_some_and(|a| a.len() == 2))
            .count();
        if with_agents >= 3 && samples.last().unwrap()["queue_depth"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(samples.len() >= 3, "{samples:?}");
    let last = samples.last().unwrap();
    assert_eq!(last["queue_depth"], 1, "as /metrics says: {last}");
    let east = last["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == "east-1")
        .unwrap();
    assert_eq!(
        (east["used"].as_u64(), east["free"].as_u64()),
        (Some(677), Some(100))
    );
    let metrics = get(&client(), &format!("http://{}/metrics", gw.addr))
        .await
        .1;
    assert!(
        metrics.contains("kvroute_gateway_queue_depth 1"),
        "{metrics}"
    );

    let url = format!("http://{}/dashboard", gw.addr);
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || run_chromium(&url, &["--dump-dom"])
    })
    .await
    .unwrap();
    assert!(dom.contains("data-agent=\"east-1\""), "{dom}");
    assert!(dom.contains("data-agent=\"west-2\""), "{dom}");
    assert!(
        dom.contains("used 677 / cached 0 / free 100 of 777 blocks"),
        "{dom}"
    );
    assert!(
        dom.contains("used 555 / cached 0 / free 0 of 555 blocks"),
        "{dom}"
    );
    assert!(dom.contains("tenant-blue"), "queue shown: {dom}");
    assert!(dom.contains("<span id=\"qdepth\">1</span>"), "{dom}");
    // The page's script ran and refreshed the view from /dashboard/state.
    assert!(dom.contains("data-updated=\""), "script did not run: {dom}");
    // And listed the one decision so far from /dashboard/decisions: east-1, the only agent
    // with room, picked over west-2, each with its score.
    let (_, log) = get(
        &client(),
        &format!("http://{}/dashboard/decisions", gw.addr),
    )
    .await;
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(log["decisions"].as_array().map(Vec::len), Some(1), "{log}");
    assert_eq!(log["decisions"][0]["route"]["agent"], "east-1", "{log}");
    assert!(dom.contains("data-decisions=\"1\""), "{dom}");
    let rows = dom.split("id=\"decision-rows\">").nth(1).unwrap_or("");
    assert!(rows.contains("200 routed</td><td>east-1</td>"), "{rows}");
    for c in log["decisions"][0]["route"]["candidates"]
        .as_array()
        .unwrap()
    {
        let li = format!(
            "<li>{}: score {},",
            c["agent"].as_str().unwrap(),
            c["score"]
        );
        assert!(rows.contains(&li), "{li} not in {rows}");
    }
    // And drew the history: one line per agent, and the queue's.
    for name in ["east-1", "west-2", "queue"] {
        let at = dom
            .find(&format!("class=\"series\" data-name=\"{name}\""))
            .unwrap_or_else(|| panic!("no {name} line: {dom}"));
        let points: usize = dom[at..]
            .split("data-points=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(points >= 3, "{name}: {points} points");
    }

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gateway-dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    // Tall enough for the queue and the decision log below the charts.
    tokio::task::spawn_blocking(move || run_chromium(&url, &[&arg, "--window-size=1280,1150"]))
        .await
        .unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert!(png.len() > 10_000, "screenshot suspiciously small");

    // Free the room: the queued request is served.
    a.state.with(|i| i.free = 777);
    let (status, _, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
}
