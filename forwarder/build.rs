//! Embeds the eBPF object when `FORWARDER_EBPF_OBJ` names one (`cargo xtask` sets it).
//!
//! Without it the binary is built splice-only and says so at startup: userspace must
//! build with plain `cargo build` on rustup's stable toolchain, which cannot build the
//! kernel program.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_ebpf)");
    println!("cargo::rerun-if-env-changed=FORWARDER_EBPF_OBJ");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("forwarder-ebpf.o");
    let Some(obj) = std::env::var_os("FORWARDER_EBPF_OBJ").filter(|s| !s.is_empty()) else {
        let _ = std::fs::remove_file(&dest);
        return;
    };
    let obj = Path::new(&obj);
    println!("cargo::rerun-if-changed={}", obj.display());
    if !obj.is_file() {
        println!(
            "cargo::warning=FORWARDER_EBPF_OBJ={} is not a file: building splice-only",
            obj.display()
        );
        let _ = std::fs::remove_file(&dest);
        return;
    }
    std::fs::copy(obj, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", obj.display(), dest.display()));
    println!("cargo::rustc-cfg=has_ebpf");
}
