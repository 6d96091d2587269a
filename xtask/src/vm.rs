//! `cargo xtask test --kernel VERSION [FILTER...]`: the integration suite (the
//! forwarder-tests binaries) inside a QEMU VM running Debian's kernel of that series, to
//! check the kernel path on a kernel other than the host's.
//!
//! The guest sees the host's root filesystem (9p, read-only, under a RAM overlay: see
//! xtask/vm/init), so the binaries and tools built and installed here run unchanged.
//! Each test binary gets its own VM boot (a few seconds). An argument that names a test
//! binary (`auto`, `relay`, ...) selects that binary; the other arguments go to the test
//! harness (a name filter, --nocapture, ...), and a filter skips the binaries with no
//! matching test (listed on the host, natively).
//!
//! Why TCG (full emulation) and not KVM: our development hosts are PVM nested hosts,
//! where /dev/kvm exists but a stock distribution kernel crawls (minutes in its
//! decompressor). TCG boots Debian's kernel in seconds and runs everything, just slowly:
//! the eBPF relay cases take ~10 minutes. VM_ACCEL=kvm (and VM_CPU=host) try KVM where
//! it works; VM_CPUS, VM_MEM, VM_TIMEOUT (per binary, s) and VM_VERBOSE=1 are the other
//! knobs (xtask/vm/boot.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::{provision, run, workspace_root};

/// The pinned kernel package, used when `apt-cache search` finds no newer one.
const PINNED_6_1: &str = "linux-image-6.1.0-57-amd64";

pub fn test(version: &str, extra: &[String]) -> Result<()> {
    if version != "6.1" {
        bail!("--kernel {version}: only 6.1 (Debian's LTS kernel) is supported");
    }
    let started = Instant::now();
    provision::vm_tools()?;
    provision::test_tools()?;
    let (vmlinuz, initrd, dir) = kernel(&newest_6_1()?)?;
    let deb = crate::build_deb()?;
    let bin = crate::build_forwarder()?;
    let mut tests = test_binaries()?;
    // Arguments naming test binaries select them; the rest is for the harness.
    let (picked, extra): (Vec<&String>, Vec<&String>) = extra
        .iter()
        .partition(|a| tests.iter().any(|(name, _)| name == *a));
    if !picked.is_empty() {
        tests.retain(|(name, _)| picked.contains(&name));
    }
    let boot = workspace_root().join("xtask/vm/boot.sh");

    let mut results = Vec::new();
    let mut uname = String::new();
    for (name, exe) in &tests {
        if !has_tests(exe, &extra) {
            results.push((name, "skipped (no test matches)".to_string()));
            continue;
        }
        eprintln!("\n===== {name} (in the VM) =====");
        let t = Instant::now();
        let run_dir = dir.join("runs").join(name);
        let mut cmd = Command::new(&boot);
        // cargo test runs a test binary in its package's directory: do the same.
        cmd.current_dir(workspace_root().join("tests"))
            .arg(&vmlinuz)
            .arg(&initrd)
            .arg(&run_dir)
            .arg("env")
            .arg(format!("FORWARDER_BIN={}", bin.display()))
            .arg(format!("FORWARDER_DEB={}", deb.display()));
        // The guest starts with an empty environment: pass on the knobs of the suite.
        for (k, v) in std::env::vars() {
            if k.starts_with("FORWARDER_TEST") || k.starts_with("RUST_") {
                cmd.arg(format!("{k}={v}"));
            }
        }
        let status = cmd
            .arg(exe)
            .arg("--test-threads=1")
            .args(&extra)
            .status()
            .with_context(|| format!("cannot start {}", boot.display()))?;
        let verdict = match status.code() {
            Some(0) => "ok".to_string(),
            Some(124) => "FAILED (VM timeout)".to_string(),
            Some(125) => "FAILED (the VM died)".to_string(),
            code => format!("FAILED (exit {code:?})"),
        };
        results.push((name, format!("{verdict} in {}", mins(t.elapsed()))));
        if let Ok(u) = std::fs::read_to_string(run_dir.join("uname")) {
            uname = u.trim().to_string();
        }
    }

    println!("\n===== integration suite in a VM =====");
    println!(
        "kernel: {} ({})",
        uname,
        if uname.is_empty() {
            "no VM booted"
        } else {
            "uname -r in the guest"
        }
    );
    for (name, verdict) in &results {
        println!("  {name:<14} {verdict}");
    }
    println!("total: {}", mins(started.elapsed()));
    let failed = results
        .iter()
        .filter(|(_, v)| v.starts_with("FAILED"))
        .count();
    if failed > 0 {
        bail!(
            "{failed} test binaries failed in the VM (console logs: {}/runs/*/console.log)",
            dir.display()
        );
    }
    Ok(())
}

fn mins(d: Duration) -> String {
    format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
}

/// The newest non-cloud, non-rt `linux-image-6.1.0-N-amd64` apt knows, else the pinned one.
fn newest_6_1() -> Result<String> {
    let search = || -> Result<Option<(u32, String)>> {
        let out = Command::new("apt-cache")
            .args([
                "search",
                "--names-only",
                r"^linux-image-6\.1\.0-[0-9]+-amd64$",
            ])
            .output()
            .context("cannot run apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|p| {
                let abi = p
                    .strip_prefix("linux-image-6.1.0-")?
                    .strip_suffix("-amd64")?;
                Some((abi.parse().ok()?, p.to_string()))
            })
            .max())
    };
    let mut found = search()?;
    if found.is_none() && provision::is_root() {
        // A fresh host may have no package lists yet.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        found = search()?;
    }
    Ok(found.map_or_else(|| PINNED_6_1.to_string(), |(_, p)| p))
}

/// The kernel package downloaded and extracted, and the initramfs built, into
/// ~/.cache/forwarder-tools/kernel-RELEASE/ once. Returns (vmlinuz, initrd, that dir).
fn kernel(pkg: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let release = pkg.trim_start_matches("linux-image-");
    let dir = provision::tools_dir().join(format!("kernel-{release}"));
    let tree = dir.join("tree");
    let vmlinuz = tree.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        eprintln!("xtask: downloading {pkg} into {}", dir.display());
        let dl = dir.join("download");
        let _ = std::fs::remove_dir_all(&dl);
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(&dl)?;
        let mut apt = Command::new("apt-get");
        if provision::is_root() {
            // apt's sandbox user cannot write into root's home: it warns, then does it as root.
            apt.args(["-o", "APT::Sandbox::User=root"]);
        }
        run(apt.current_dir(&dl).args(["download", "-qq", pkg]))?;
        let deb = std::fs::read_dir(&dl)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        std::fs::remove_dir_all(&dl)?;
        if !vmlinuz.is_file() {
            bail!("{pkg} has no {}", vmlinuz.display());
        }
    }
    // Rebuilt when its scripts change, so an edit to the init takes effect.
    let initrd = dir.join("initrd.gz");
    let scripts = workspace_root().join("xtask/vm");
    let built = mtime(&initrd);
    if ["init", "build-initramfs.sh"]
        .iter()
        .any(|s| mtime(&scripts.join(s)) >= built)
    {
        eprintln!("xtask: building {}", initrd.display());
        run(Command::new(scripts.join("build-initramfs.sh"))
            .arg(&tree)
            .arg(&initrd))?;
    }
    Ok((vmlinuz, initrd, dir))
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The integration test binaries, built (debug, like `cargo test`): (target name, path).
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new(crate::cargo_bin())
        .current_dir(workspace_root())
        .args([
            "test",
            "-p",
            "forwarder-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // With JSON output, the compiler's warnings and errors come as messages too.
        if let Some(text) = msg["message"]["rendered"].as_str() {
            eprint!("{text}");
        }
        let target = &msg["target"];
        // Only the tests/*.rs targets: the library's own unit tests are not the suite.
        if msg["reason"] == "compiler-artifact" && target["kind"][0] == "test" {
            if let Some(exe) = msg["executable"].as_str() {
                let name = target["name"].as_str().unwrap_or("?").to_string();
                bins.push((name, PathBuf::from(exe)));
            }
        }
    }
    if !out.status.success() {
        bail!("building the test binaries failed: {}", out.status);
    }
    if bins.is_empty() {
        bail!("cargo test --no-run reported no integration test binaries");
    }
    bins.sort();
    Ok(bins)
}

/// Whether the binary has a test the filter selects (asked on the host, in a second;
/// when unsure, yes).
fn has_tests(exe: &Path, extra: &[&String]) -> bool {
    if extra.is_empty() {
        return true;
    }
    match Command::new(exe)
        .args(extra)
        .args(["--list", "--format", "terse"])
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.ends_with(": test")),
        _ => true,
    }
}
