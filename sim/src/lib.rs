//! `kvroute sim`: a discrete-event simulator that runs kvroute's **real** routing pipeline and
//! admission queue (`kvroute-routing`) in front of simulated agents, each running the **real**
//! KV block manager and scheduler (`kvroute-engine`'s `sched`), with a step-time model in
//! place of the model's forward pass.
//!
//! - [`config`]: the JSON configuration, checked once;
//! - [`workload`]: arrivals, lengths, shared prefixes, sessions, trace replay;
//! - [`step`]: step-time models (GPU roofline, CPU measured);
//! - [`run`]: the event loop (agents, gateways, reports on their way);
//! - [`summary`]: goodput, percentiles, the table and the JSON;
//! - [`plot`]: the SVG of the JSON (KV use, queue, TTFT distribution per policy).
//!
//! See docs/sim.md.

pub mod config;
pub mod plot;
pub mod run;
pub mod step;
pub mod summary;
pub mod workload;

use serde_json::{json, Value};

pub use config::{Resolved, SimConfig};
pub use summary::Summary;

/// Peak resident memory of this process in bytes (Linux; 0 elsewhere).
pub use kvroute_engine::bench::peak_rss_bytes;

/// Runs every policy of `r` in turn; `progress` is told of each policy's result.
pub fn run_all(
    r: &Resolved,
    mut progress: impl FnMut(&Summary),
) -> Result<(Vec<Summary>, Value), String> {
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for &p in &r.policies {
        let result = run::run(r, p)?;
        let s = Summary::of(&result, &r.cfg.slo);
        progress(&s);
        runs.push(s.to_json(&result));
        rows.push(s);
    }
    let json = json!({
        "agents": r.cfg.agents.count,
        "kv_blocks_per_agent": r.kv_blocks,
        "gateways": r.cfg.gateways.replicas,
        "seed": r.cfg.seed,
        "slo": {"ttft_s": r.cfg.slo.ttft_s, "tpot_s": r.cfg.slo.tpot_s},
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
    });
    Ok((rows, json))
}
