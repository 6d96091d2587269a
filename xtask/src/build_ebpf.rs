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

use sha2::{Digest, Sha256};

use crate::{provision, run, workspace_root};

/// The committed object and the hash of the sources it was built from.
const PREBUILT_DIR: &str = "forwarder-ebpf/prebuilt";
const PREBUILT_OBJ: &str = "forwarder.bpf.o";
const PREBUILT_SOURCE: &str = "forwarder.bpf.source";
/// What the object is built from (everything else in them is generated or prebuilt).
const SOURCE_DIRS: &[&str] = &["forwarder-ebpf", "forwarder-common"];

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const TARGET: &str = "bpfel-unknown-none";

/// `cargo xtask build-ebpf`: builds the object from source and commits-to-be it as
/// the one `forwarder/build.rs` embeds. Returns its path.
pub fn build_and_install() -> Result<PathBuf> {
    let obj = build()?;
    let dir = workspace_root().join(PREBUILT_DIR);
    std::fs::create_dir_all(&dir)?;
    let dest = dir.join(PREBUILT_OBJ);
    std::fs::copy(&obj, &dest).with_context(|| format!("cannot copy to {}", dest.display()))?;
    std::fs::write(
        dir.join(PREBUILT_SOURCE),
        format!("sha256:{}\n", source_hash()?),
    )?;
    Ok(dest)
}

/// `cargo xtask check-ebpf` (CI): rebuilds the object from source and fails unless the
/// committed one is the same program built from the same sources. The bytes differ
/// from machine to machine (debug info holds the checkout's path), so the programs
/// are compared as `llvm-objdump -d -r` prints them: every instruction, its raw bytes
/// and its relocations (map references).
pub fn check() -> Result<()> {
    let root = workspace_root();
    let dir = root.join(PREBUILT_DIR);
    let recorded = std::fs::read_to_string(dir.join(PREBUILT_SOURCE)).unwrap_or_default();
    let current = format!("sha256:{}", source_hash()?);
    let stale = "the committed eBPF object is stale: run `cargo xtask build-ebpf` and commit forwarder-ebpf/prebuilt/";
    if recorded.trim() != current {
        bail!(
            "{stale} (it was built from {}, the sources are {current})",
            recorded.trim()
        );
    }
    let built = disassemble(&build()?)?;
    let committed = disassemble(&dir.join(PREBUILT_OBJ))?;
    if built != committed {
        let first = built
            .lines()
            .zip(committed.lines())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("\n  built:     {a}\n  committed: {b}"))
            .unwrap_or_default();
        bail!("{stale}: the program built from source differs{first}");
    }
    eprintln!("xtask: the committed eBPF object matches its source ({current})");
    Ok(())
}

fn disassemble(obj: &std::path::Path) -> Result<String> {
    let out = Command::new("llvm-objdump-22")
        .args(["-d", "-r"])
        .arg(obj)
        .output()
        .context("cannot run llvm-objdump-22 (Debian package llvm-22)")?;
    if !out.status.success() {
        bail!(
            "llvm-objdump-22 {} failed: {}",
            obj.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The first lines name the file; the program starts after them.
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .lines()
        .skip_while(|l| !l.starts_with("Disassembly"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// sha256 over the eBPF sources: every file under [`SOURCE_DIRS`] but the prebuilt
/// object itself, by path in sorted order.
fn source_hash() -> Result<String> {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        collect(&root.join(dir), &mut files)?;
    }
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap_or(&f);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(std::fs::read(&f)?);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn collect(dir: &std::path::Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name == "prebuilt" || name == "target" || name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// Builds the eBPF object from source; returns its path (under target/ebpf).
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
