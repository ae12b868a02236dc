//! Fetches (or finds) the default model and prints its path: `cargo run -p kvroute-engine
//! --example fetch_default [CACHE_DIR]`. Shows what `engine::fetch` reports while it works.

use kvroute_engine::fetch::{self, ModelRef, Progress};
use std::path::PathBuf;

struct Stderr;

impl Progress for Stderr {
    fn stage(&self, name: &str) {
        eprintln!("== {name}");
    }
    fn message(&self, line: &str) {
        eprintln!("   {line}");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => fetch::cache_dir()?,
    };
    let model = fetch::resolve(&ModelRef::Default, &cache, &Stderr)?;
    println!("{}", model.path.display());
    Ok(())
}
