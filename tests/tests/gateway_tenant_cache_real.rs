//! `kvroute gateway --isolate-tenant-caches` in front of a real agent: tenants never share
//! cached prefix blocks (the agent reports no cached tokens for another tenant's repeat of a
//! prompt), a tenant still shares with itself, and the gateway's routing hashes follow the salt
//! (its trace counts cached blocks only where that tenant's prefix is).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use http_body_util::BodyExt;
use kvroute_tests::{send_with, Agent, AgentOpts, Gateway};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_share_cached_blocks_but_each_shares_with_itself() {
    let agent = Agent::spawn(AgentOpts::default());
    let gw = Gateway::spawn(&[&agent], &["--isolate-tenant-caches"]).await;
    let prompt = "A long shared system prompt about tidal rivers and their estuaries. ".repeat(6);
    let ask = |tenant: &'static str, salt: Option<&'static str>| {
        let mut body =
            json!({"model": agent.model, "prompt": prompt, "max_tokens": 1, "temperature": 0});
        if let Some(s) = salt {
            body["cache_salt"] = json!(s);
        }
        let body = serde_json::to_vec(&body).unwrap();
        async move {
            let resp = send_with(
                gw.addr,
                "POST",
                "/v1/completions",
                &[("x-kvroute-tenant", tenant), ("x-kvroute-debug", "1")],
                body,
            )
            .await;
            assert_eq!(resp.status(), 200, "{tenant}");
            let trace: Value =
                serde_json::from_str(resp.headers()["x-kvroute-route"].to_str().unwrap()).unwrap();
            let v: Value =
                serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            // Cached there, or in flight to it: the agent's report of the first request's blocks
            // may reach the gateway after the second request is routed.
            let planned = trace["candidates"][0]["local_blocks"].as_u64().unwrap();
            (cached, planned)
        }
    };
    assert_eq!(
        ask("alpha", None).await,
        (0, 0),
        "first request: nothing cached"
    );
    let (cached, planned) = ask("alpha", None).await;
    assert!(cached > 0, "alpha shares with itself: {cached}");
    // The gateway counted the same prefix as there (its hashes carry the salt too).
    assert!(
        planned > 0 && planned * 16 <= cached + 16,
        "{planned} blocks vs {cached} tokens"
    );
    // Another tenant's identical prompt: no block of alpha's is shared, and the gateway knew.
    assert_eq!(
        ask("beta", None).await,
        (0, 0),
        "beta must not hit alpha's blocks"
    );
    assert!(ask("beta", None).await.0 > 0, "beta shares with itself");
    // A client's own salt still separates requests within a tenant.
    assert_eq!(ask("alpha", Some("session-7")).await.0, 0);
    assert!(ask("alpha", Some("session-7")).await.0 > 0);
}
