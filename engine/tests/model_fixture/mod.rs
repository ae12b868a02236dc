//! Shared helpers for the engine's real-model tests: where the default model and the llama.cpp
//! reference fixture are. A missing model or fixture fails the test with a message saying how to
//! get it — real-model tests never pass silently.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

pub const MODEL_FILE: &str = kvroute_engine::fetch::DEFAULT_MODEL_FILE;

/// The default model: `$KVROUTE_MODEL_PATH`, else the cache directory's copy.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KVROUTE_MODEL_PATH") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "KVROUTE_MODEL_PATH={} does not exist; run scripts/test.sh to fetch the default model",
            p.display()
        );
        return p;
    }
    let cache = kvroute_engine::fetch::cache_dir()
        .expect("neither KVROUTE_CACHE, XDG_CACHE_HOME nor HOME is set");
    let p = cache.join("models").join(MODEL_FILE);
    assert!(
        p.is_file(),
        "the default model is not at {}; run scripts/test.sh (its setup step fetches it) or set KVROUTE_MODEL_PATH",
        p.display()
    );
    p
}

/// The llama.cpp reference fixture, parsed.
pub fn fixture() -> serde_json::Value {
    let dir = std::env::var_os("KVROUTE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        });
    let path = dir.join("smollm2-reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the reference fixture {}: {e} (set KVROUTE_FIXTURES to its directory)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// Greedy generation of `n` tokens for one prompt on a runner of 16-token blocks (blocks
/// `0..` in order): returns the first step's logits and the tokens.
pub fn greedy(
    runner: &mut kvroute_engine::model::CpuRunner,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    use kvroute_engine::model::SeqInput;
    use kvroute_engine::sample::argmax;
    let table: Vec<u32> = (0..((prompt.len() + n) / 16 + 1) as u32).collect();
    let first = runner
        .step(&[SeqInput {
            tokens: prompt,
            start_pos: 0,
            block_table: &table,
            want_logits: true,
        }])
        .unwrap()
        .to_vec();
    let mut out = vec![argmax(&first)];
    while out.len() < n {
        let pos = prompt.len() + out.len() - 1;
        let tok = [*out.last().unwrap()];
        let l = runner
            .step(&[SeqInput {
                tokens: &tok,
                start_pos: pos,
                block_table: &table,
                want_logits: true,
            }])
            .unwrap();
        out.push(argmax(l));
    }
    (first, out)
}
