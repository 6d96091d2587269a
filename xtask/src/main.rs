//! Developer tasks: `cargo xtask build-ebpf | run | test | bench`.
//!
//! Each task provisions what it needs (apt packages, bpf-linker) when it is missing, so
//! the same two commands work on a fresh machine and in CI.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod build_ebpf;
mod provision;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Rebuild the committed eBPF object from source (installing its toolchain when
    /// missing and we are root): run it after changing forwarder-ebpf or forwarder-common.
    BuildEbpf,
    /// Fail unless the committed eBPF object is what its source builds to (CI).
    CheckEbpf,
    /// Build forwarder (release, with the kernel path when it can be built) and run it.
    Run {
        /// Arguments for forwarder, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests and the integration suite in both relay modes.
    Test {
        /// Run only the integration suite, inside a QEMU VM booting Debian's kernel of
        /// this series (only "6.1"); there, an argument naming a test binary selects
        /// it. See xtask/src/vm.rs.
        #[arg(long, value_name = "VERSION")]
        kernel: Option<String>,
        /// Extra arguments for the test harness (a test name filter, --nocapture, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure direct vs splice vs ebpf on loopback and print the table (with --tunnel:
    /// the reverse tunnel vs rathole and bore).
    Bench(bench::BenchArgs),
    /// Build the Debian package (cargo-deb) into target/debian/ and print its path.
    Deb,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => {
            let obj = build_ebpf::build_and_install()?;
            println!("{}", obj.display());
            Ok(())
        }
        Task::CheckEbpf => build_ebpf::check(),
        Task::Run { args } => {
            let bin = build_forwarder()?;
            let err = exec(Command::new(&bin).args(&args));
            bail!("cannot run {}: {err}", bin.display())
        }
        Task::Test {
            kernel: Some(version),
            args,
        } => vm::test(&version, &args),
        Task::Test { kernel: None, args } => test(&args),
        Task::Deb => {
            let deb = build_deb()?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Bench(args) => {
            let bin = build_forwarder()?;
            bench::run(&bin, args)
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds the release binary, which embeds the committed eBPF object (see
/// forwarder/build.rs). Returns the binary's path.
pub fn build_forwarder() -> Result<PathBuf> {
    let mut cargo = Command::new(cargo_bin());
    cargo
        .current_dir(workspace_root())
        .args(["build", "--release", "-p", "forwarder"]);
    run(&mut cargo)?;
    Ok(target_dir().join("release/forwarder"))
}

/// Cargo's target directory: $CARGO_TARGET_DIR (relative to the workspace, where the
/// builds run) or the workspace's target/.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || workspace_root().join("target"),
        |d| workspace_root().join(d),
    )
}

/// The .deb of the release binary (cargo-deb metadata in forwarder/Cargo.toml).
fn build_deb() -> Result<PathBuf> {
    let cargo_deb = provision::cargo_deb()?;
    build_forwarder()?;
    let out = Command::new(&cargo_deb)
        .current_dir(workspace_root())
        .env("CARGO", cargo_bin())
        .args(["-p", "forwarder", "--no-build", "--strip"])
        .output()
        .with_context(|| format!("cannot run {}", cargo_deb.display()))?;
    if !out.status.success() {
        bail!(
            "cargo-deb failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // cargo-deb prints the package's path last.
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    if !path.ends_with(".deb") || !Path::new(&path).is_file() {
        bail!("cargo-deb printed no package path: {:?}", out.stdout);
    }
    Ok(PathBuf::from(path))
}

fn test(extra: &[String]) -> Result<()> {
    provision::test_tools()?;
    let deb = build_deb()?;
    let bin = build_forwarder()?;
    let mut cargo = Command::new(cargo_bin());
    cargo
        .current_dir(workspace_root())
        .args([
            "test",
            "--no-fail-fast",
            "-p",
            "forwarder",
            "-p",
            "forwarder-tests",
            "--",
        ])
        .args(extra)
        .env("FORWARDER_BIN", &bin)
        .env("FORWARDER_DEB", &deb);
    // Most integration tests wait (a 65 s blackhole, grace periods, timeouts) far more
    // than they compute, and heavy ones run alone anyway (`forwarder_tests::heavy`), so
    // the harness's default of one test per core left these 2-core machines idle: the
    // tunnel suite took 141 s with 2 threads and 91 s with 4 (relay 80 -> 70 s, policy
    // 22 -> 12 s, metrics 15 -> 8 s).
    if std::env::var_os("RUST_TEST_THREADS").is_none() {
        cargo.env("RUST_TEST_THREADS", "4");
    }
    run(&mut cargo)
}

/// The cargo that invoked us (rustup's), not Debian's that the eBPF build uses.
pub fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn exec(cmd: &mut Command) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    cmd.exec()
}
