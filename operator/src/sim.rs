//! `kvroute sim`: runs a simulation configuration (see `kvroute-sim` and docs/sim.md) and prints
//! one table line per policy; `--json` writes every figure and the KV-use timelines, `--svg` a
//! picture of them.

use std::path::PathBuf;

/// `kvroute sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// The configuration (JSON; see docs/sim.md and bench/sim/).
    #[arg(long)]
    pub config: PathBuf,
    /// Also write the full results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also draw them as an SVG here: KV use and queued requests over time, and the TTFT
    /// distribution, one line per policy.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Run only these policies (comma-separated), whatever the configuration lists.
    #[arg(long, value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Override the configuration's seed.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Runs `args`; the table goes to stdout line by line as each policy finishes.
pub fn run(args: &SimArgs) -> anyhow::Result<()> {
    let text = read_config(&args.config)?;
    let mut cfg = kvroute_sim::SimConfig::parse(&text).map_err(anyhow::Error::msg)?;
    if !args.policy.is_empty() {
        cfg.policies = args.policy.clone();
    }
    if let Some(seed) = args.seed {
        cfg.seed = seed;
    }
    let base = args
        .config
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let resolved = cfg.resolve(&base).map_err(anyhow::Error::msg)?;
    println!(
        "{} agents × {} KV blocks, {} gateway(s), seed {}",
        resolved.cfg.agents.count,
        resolved.kv_blocks,
        resolved.cfg.gateways.replicas,
        resolved.cfg.seed
    );
    let mut printed_head = false;
    let (rows, json) = kvroute_sim::run_all(&resolved, |s| {
        let t = kvroute_sim::summary::table(std::slice::from_ref(s));
        let mut lines = t.lines();
        let head = lines.next().unwrap_or_default();
        if !printed_head {
            println!("{head}");
            printed_head = true;
        }
        for l in lines {
            println!(
                "{l}   [{:.1} s simulated in {:.1} s: {:.0}× real time]",
                s.sim_s,
                s.wall_s,
                s.sim_s / s.wall_s.max(1e-9)
            );
        }
    })
    .map_err(anyhow::Error::msg)?;
    println!(
        "peak memory {:.0} MiB; decisions: {}",
        kvroute_sim::peak_rss_bytes() as f64 / (1 << 20) as f64,
        rows.iter()
            .map(|r| format!("{} mean {:.1} µs", r.policy, r.decision_mean_us))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .map_err(|e| anyhow::anyhow!("--json {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let svg = kvroute_sim::plot::svg(&json).map_err(anyhow::Error::msg)?;
        std::fs::write(path, svg).map_err(|e| anyhow::anyhow!("--svg {}: {e}", path.display()))?;
    }
    Ok(())
}

fn read_config(path: &std::path::Path) -> anyhow::Result<String> {
    let meta =
        std::fs::metadata(path).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
    if meta.len() > kvroute_sim::config::MAX_CONFIG_BYTES {
        anyhow::bail!(
            "--config {}: {} bytes, more than the {} a configuration may have",
            path.display(),
            meta.len(),
            kvroute_sim::config::MAX_CONFIG_BYTES
        );
    }
    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))
}
