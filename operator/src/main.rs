//! `kvroute`: thin entry point; everything testable lives in the library.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("kvroute: no subcommands yet")
}
