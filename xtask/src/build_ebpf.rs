//! Builds forwarder-ebpf for bpfel-unknown-none with Debian's toolchain.
//!
//! rustup's stable compiler has no `core` for the BPF target and nothing can be
//! downloaded for it here, so the kernel crate is built by Debian's `/usr/bin/cargo` +
//! `/usr/bin/rustc` (1.96, LLVM 22, prebuilt BPF `core`) and linked by bpf-linker.
//! It gets its own target directory so the two cargos never share locks or
//! fingerprints with the userspace build.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{provision, run, workspace_root};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const TARGET: &str = "bpfel-unknown-none";

/// Returns the path of the built eBPF object.
pub fn build() -> Result<PathBuf> {
    let linker = provision::ebpf_toolchain()?;
    for tool in [DEBIAN_CARGO, DEBIAN_RUSTC] {
        if !std::path::Path::new(tool).is_file() {
            bail!("{tool} is missing: install the Debian packages cargo-web and rustc-web");
        }
    }
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let linker = linker
        .to_str()
        .context("bpf-linker path is not UTF-8")?
        .replace('"', "\\\"");
    let mut cargo = Command::new(DEBIAN_CARGO);
    cargo
        .current_dir(&root)
        // Whatever rustup/cargo set for us must not leak into Debian's cargo.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTUP_TOOLCHAIN")
        // aya-ebpf needs one unstable feature; naming the crate (not `1`) keeps
        // aya-build from asking for -Z build-std.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .args(["--config", &format!("build.rustc=\"{DEBIAN_RUSTC}\"")])
        .args([
            "--config",
            &format!("target.{TARGET}.linker=\"{linker}\""),
        ])
        .args([
            "--config",
            &format!(
                "target.{TARGET}.rustflags=[\"--cfg=bpf_target_arch=\\\"x86_64\\\"\",\"-Cdebuginfo=2\",\"-Clink-arg=--btf\"]"
            ),
        ])
        .args(["build", "-p", "forwarder-ebpf", "--bins", "--release", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    run(&mut cargo).context("building the eBPF program (forwarder-ebpf)")?;
    let obj = target_dir.join(TARGET).join("release/forwarder");
    if !obj.is_file() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}
