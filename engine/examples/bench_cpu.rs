//! Quick engine throughput check on a GGUF model:
//! `cargo run --release -p kvroute-engine --example bench_cpu -- MODEL.gguf [prompt gen batch threads]`.
use kvroute_engine::bench::{run, BenchConfig};
use kvroute_engine::config::ModelConfig;
use kvroute_engine::gguf::Gguf;
use kvroute_engine::model::Model;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: bench_cpu MODEL.gguf [prompt gen batch threads]")?;
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let g = Gguf::open(path)?;
    let cfg = ModelConfig::from_gguf(&g)?;
    let model = Arc::new(Model::new(Arc::new(g), cfg)?);
    let batches = args.get(4).cloned().unwrap_or_else(|| "1".into());
    for batch in batches.split(',').filter_map(|b| b.parse::<usize>().ok()) {
        let r = run(
            model.clone(),
            BenchConfig {
                prompt_tokens: num(2, 128),
                gen_tokens: num(3, 64),
                batch,
                threads: num(5, 0),
                kv_cache_dtype: Default::default(),
            },
        )?;
        println!(
            "batch {batch}: prefill {:.1} tok/s ({:.1} per CPU-s), decode {:.1} tok/s ({:.1} per CPU-s), peak RSS {} MiB ({})",
            r.prefill_tok_s,
            (batch * num(2, 128)) as f64 / r.prefill_cpu_secs,
            r.decode_tok_s,
            (batch * num(3, 64)) as f64 / r.decode_cpu_secs,
            r.peak_rss_bytes >> 20,
            model.isa().name()
        );
    }
    Ok(())
}
