//! `cargo xtask bench`: direct vs splice vs ebpf on loopback.

use std::path::Path;

use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Short runs for smoke testing (CI).
    #[arg(long)]
    pub quick: bool,
}

pub fn run(_forwarder: &Path, _args: BenchArgs) -> Result<()> {
    anyhow::bail!("bench is not implemented yet")
}
