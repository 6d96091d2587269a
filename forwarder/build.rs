//! Embeds the kernel program: by default the object committed in
//! `forwarder-ebpf/prebuilt/` (so a plain `cargo build` on any distro, with rustup's
//! stable toolchain, has the kernel path); `FORWARDER_EBPF_OBJ=FILE` embeds another
//! object, `FORWARDER_EBPF_OBJ=none` builds splice-only. `cargo xtask build-ebpf`
//! rebuilds the committed object from source; `cargo xtask check-ebpf` (CI) fails when
//! it no longer matches the source.
//!
//! Also sets `FORWARDER_LONG_VERSION` for `--version`: whether the kernel path is built
//! in, and the sha256 of the eBPF sources the object was built from; and links the
//! binary with packed relative relocations where its glibc can load them.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_ebpf)");
    println!("cargo::rerun-if-env-changed=FORWARDER_EBPF_OBJ");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let prebuilt = manifest.join("../forwarder-ebpf/prebuilt");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("forwarder-ebpf.o");
    let version = env!("CARGO_PKG_VERSION");

    let requested = std::env::var("FORWARDER_EBPF_OBJ")
        .ok()
        .filter(|s| !s.is_empty());
    let (obj, source) = match requested.as_deref() {
        Some("none") => (None, String::new()),
        Some(path) => (Some(PathBuf::from(path)), "a custom object".to_string()),
        None => {
            let source_file = prebuilt.join("forwarder.bpf.source");
            println!("cargo::rerun-if-changed={}", source_file.display());
            let source = std::fs::read_to_string(&source_file)
                .map(|s| format!("eBPF source {}", s.trim()))
                .unwrap_or_else(|_| "eBPF source unknown".into());
            (Some(prebuilt.join("forwarder.bpf.o")), source)
        }
    };
    let embedded = obj.is_some_and(|obj| embed(&obj, &dest));
    if !embedded {
        let _ = std::fs::remove_file(&dest);
    }
    let long = if embedded {
        format!("{version} (kernel path built in, {source})")
    } else {
        format!("{version} (kernel path not built in: splice only)")
    };
    println!("cargo::rustc-env=FORWARDER_LONG_VERSION={long}");
    pack_relative_relocs();
}

/// Links the binary with DT_RELR ("packed relative relocations") where the glibc it is
/// built against can load it (2.36 and later): the PIE's 1.2 MB of relocation records
/// shrink to 21 KB, and its RSS at start by as much (8.8 to 7.6 MiB on splice). An
/// older glibc's loader would refuse such a binary ("version `GLIBC_ABI_DT_RELR' not
/// found"), so a native build there, or a cross build, links as before.
fn pack_relative_relocs() {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_ENV") != "gnu" || var("TARGET") != var("HOST") {
        return;
    }
    let glibc = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "glibc 2.36"
    let version: Vec<u32> = glibc
        .trim()
        .trim_start_matches("glibc ")
        .split('.')
        .map_while(|p| p.parse().ok())
        .collect();
    if version.len() >= 2 && (version[0], version[1]) >= (2, 36) {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

fn embed(obj: &Path, dest: &Path) -> bool {
    println!("cargo::rerun-if-changed={}", obj.display());
    if !obj.is_file() {
        println!(
            "cargo::warning=eBPF object {} is missing: building splice-only",
            obj.display()
        );
        return false;
    }
    std::fs::copy(obj, dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", obj.display(), dest.display()));
    println!("cargo::rustc-cfg=has_ebpf");
    true
}
