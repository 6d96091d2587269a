//! Installs what the build and the tests need, idempotently, saying what it does.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;

use anyhow::{bail, Context, Result};

use crate::run;

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const EBPF_APT: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
];
const TEST_APT: &[&str] = &[
    "curl",
    "python3",
    "iproute2",
    // nft: drop rules inside test namespaces (the raw-socket client's RSTs).
    "nftables",
    "procps",
    "nginx",
    // A front balancer sending PROXY headers (v1, v2 with TLVs) to our listener.
    "haproxy",
    "util-linux",
    // promtool and a real Prometheus server for the metrics tests.
    "prometheus",
];

/// Tools the integration tests start as real peers.
pub fn test_tools() -> Result<()> {
    apt_install(TEST_APT)
}

/// QEMU and what xtask/vm/build-initramfs.sh needs, for `cargo xtask test --kernel`.
pub fn vm_tools() -> Result<()> {
    apt_install(&["qemu-system-x86", "busybox-static", "kmod", "cpio"])
}

/// Debian's BPF-capable rustc and LLVM 22, then bpf-linker built against them.
/// Returns the bpf-linker binary.
pub fn ebpf_toolchain() -> Result<PathBuf> {
    apt_install(EBPF_APT)?;
    cargo_tool(
        "bpf-linker",
        BPF_LINKER_VERSION,
        &["--no-default-features", "--features", "llvm-22"],
        &[("LLVM_PREFIX", "/usr/lib/llvm-22")],
    )
}

pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// cargo-deb, for `cargo xtask deb`. Returns the binary.
pub fn cargo_deb() -> Result<PathBuf> {
    apt_install(&["dpkg-dev"])?;
    cargo_tool("cargo-deb", CARGO_DEB_VERSION, &[], &[])
}

/// `cargo install NAME --version VERSION --locked` into the tools dir, once.
fn cargo_tool(name: &str, version: &str, args: &[&str], env: &[(&str, &str)]) -> Result<PathBuf> {
    let root = tools_dir().join(format!("{name}-{version}"));
    let bin = root.join("bin").join(name);
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building {name} {version} into {} (a few minutes, once)",
        root.display()
    );
    let started = std::time::Instant::now();
    let mut cargo = Command::new(crate::cargo_bin());
    cargo
        .envs(env.iter().copied())
        .args(["install", name, "--version", version, "--locked"])
        .args(args)
        .arg("--root")
        .arg(&root);
    run(&mut cargo).with_context(|| format!("building {name}"))?;
    eprintln!(
        "xtask: {name} built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}

/// Where built tools live between runs: outside the work tree, so fresh clones reuse them.
pub fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FORWARDER_TOOLS_DIR") {
        return d.into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".cache/forwarder-tools")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!("missing Debian packages {missing:?}: run `sudo apt-get update && sudo {line}`");
    }
    static UPDATE: Once = Once::new();
    UPDATE.call_once(|| {
        eprintln!("xtask: apt-get update");
        let _ = run(Command::new("apt-get").args(["update", "-qq"]));
    });
    eprintln!("xtask: {line}");
    let started = std::time::Instant::now();
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))?;
    eprintln!(
        "xtask: installed {missing:?} in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Packages `cargo xtask bench` needs for its peers (nginx stream, HAProxy) and its HTTP
/// client (wrk); the bench goes on without them, saying why.
pub fn bench_tools(pkgs: &[&str]) -> Result<()> {
    apt_install(pkgs)
}
