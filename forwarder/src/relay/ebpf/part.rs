//! Taking a socket out of MEMBERS (the verdict program's map) under its socket lock.
//!
//! Removing a socket from a sockmap from userspace does not take the socket's lock.
//! A verdict already running for it on another CPU (TCP hands skbs over under that
//! lock, in softirq) can then find the program gone: the kernel drops that skb after
//! TCP counted it read (`sk_psock_verdict_recv`'s default verdict). SO_RCVLOWAT keeps
//! TCP from handing skbs over while a socket parts, but not at a FIN, under memory
//! pressure or with a nearly closed window: CI saw the last 3 bytes and the FIN of a
//! 1 MiB transfer lost that way (the pair was reset, as the unread check in
//! `leave_map` demands).
//!
//! The `part_locked` program is a TCP iterator: the kernel runs it for each TCP
//! socket of the namespace with `lock_sock` held, and it removes the sockets listed in
//! PARTING. While the lock is held no verdict of that socket can run, and TCP queues
//! what arrives meanwhile for the restored plain `sk_data_ready`.
//!
//! The cost is a walk over the namespace's TCP sockets, once per socket that parts:
//! only pairs leaving the kernel path for splice part (plus the rare pairing that
//! fails halfway).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use aya::programs::Iter;
use aya::{Btf, Ebpf};
use forwarder_common::{PARTING_ASKED, PARTING_DONE, PARTING_MAP, PART_PROG};

/// PARTING's key for how many listed sockets the walk has still to meet (no socket
/// has cookie 0).
const LEFT: &u64 = &0;

pub struct LockedPart {
    parting: Mutex<HashMap<MapData, u64, u32>>,
    /// The iterator's link: each run is a fresh iterator fd made from it.
    link: OwnedFd,
}

/// Whether the effective set allows tracing programs (CAP_PERFMON, or CAP_SYS_ADMIN,
/// which covers it).
fn has_perfmon() -> bool {
    use super::kernel::has_cap;
    has_cap(caps::Capability::CAP_PERFMON) || has_cap(caps::Capability::CAP_SYS_ADMIN)
}

/// Why the parting iterator cannot run here, and what it would need.
pub struct Unavailable {
    pub why: String,
    pub needs: &'static str,
}

impl LockedPart {
    /// Loads `part_locked` (it needs the kernel's BTF to find the TCP iterator; the
    /// parsed BTF is dropped right after).
    pub fn load(ebpf: &mut Ebpf) -> Result<LockedPart, Unavailable> {
        // A tracing program: the kernel loads it only for a process with CAP_PERFMON,
        // and only where it has BPF iterators over TCP sockets.
        let perfmon = |why: String| Unavailable {
            why,
            needs: if has_perfmon() {
                "a kernel with BPF iterators over TCP sockets (5.9 or later)"
            } else {
                "CAP_PERFMON"
            },
        };
        let parting: HashMap<MapData, u64, u32> =
            super::kernel::take(ebpf, PARTING_MAP).map_err(perfmon)?;
        let btf = Btf::from_sys_fs().map_err(|e| Unavailable {
            why: format!("kernel BTF: {e}"),
            needs: "the kernel's BTF (a kernel built with CONFIG_DEBUG_INFO_BTF=y)",
        })?;
        let prog: &mut Iter = ebpf
            .program_mut(PART_PROG)
            .ok_or_else(|| perfmon(format!("program {PART_PROG} missing from the object")))?
            .try_into()
            .map_err(|e| perfmon(format!("program {PART_PROG}: {e}")))?;
        let loaded = prog.load("tcp", &btf);
        drop(btf);
        // The parsed BTF was ~20 MiB of small allocations: hand them back, or the
        // process keeps them as RSS for its whole life (loaded or not).
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        loaded.map_err(|e| perfmon(format!("the kernel rejected {PART_PROG}: {e:#}")))?;
        let prog_fd = prog
            .fd()
            .map_err(|e| perfmon(e.to_string()))?
            .as_fd()
            .as_raw_fd();
        let link = link_create_iter(prog_fd).map_err(|e| perfmon(format!("iterator link: {e}")))?;
        Ok(LockedPart {
            parting: Mutex::new(parting),
            link,
        })
    }

    /// Parts the sockets with these cookies under their locks, in one walk. Returns
    /// for each whether the iterator met it: it does not meet a socket no longer
    /// hashed (closed: it receives nothing more, so parting it without the lock is
    /// safe).
    pub fn part(&self, cookies: &[u64]) -> io::Result<Vec<bool>> {
        let mut parting = self.parting.lock().unwrap_or_else(|e| e.into_inner());
        for c in cookies {
            if let Err(e) = parting.insert(c, PARTING_ASKED, 0) {
                // Leave nothing listed that a later walk would part unasked.
                for c in cookies {
                    let _ = parting.remove(c);
                }
                return Err(io::Error::other(e));
            }
        }
        let ran = parting
            .insert(LEFT, cookies.len() as u32, 0)
            .map_err(io::Error::other)
            .and_then(|()| self.run(&parting));
        let _ = parting.remove(LEFT);
        let done = cookies
            .iter()
            .map(|c| {
                let done = parting.get(c, 0).ok() == Some(PARTING_DONE);
                let _ = parting.remove(c);
                done
            })
            .collect();
        ran.map(|()| done)
    }

    /// One walk of the iterator: it writes nothing, so reading to EOF is the walk. It
    /// stops early (EAGAIN) once the last listed socket is met.
    fn run(&self, parting: &HashMap<MapData, u64, u32>) -> io::Result<()> {
        let iter = iter_create(self.link.as_raw_fd())?;
        let mut buf = [0u8; 64];
        // The kernel also stops a read after a million sockets with EAGAIN (nothing
        // written yet), and the next read goes on from there.
        for _ in 0..1024 {
            // SAFETY: buf is valid for writes of its length; iter is an open fd.
            let n = unsafe { libc::read(iter.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                return Ok(());
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                    return Err(e);
                }
                if parting.get(LEFT, 0).ok() == Some(0) {
                    return Ok(());
                }
            }
        }
        Err(io::Error::other("the TCP iterator did not finish"))
    }
}

/// `bpf(BPF_LINK_CREATE)` for an iterator program (aya 0.14 keeps its own link's fd
/// private, and a fresh iterator is made from the link for every run).
fn link_create_iter(prog_fd: RawFd) -> io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TRACE_ITER: u32 = 28;
    /// The BPF_LINK_CREATE member of `union bpf_attr` (include/uapi/linux/bpf.h),
    /// with no iterator parameters (the TCP iterator takes none).
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        iter_info: u64,
        iter_info_len: u32,
        _pad: u32,
    }
    let attr = LinkCreateAttr {
        prog_fd: prog_fd as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_ITER,
        flags: 0,
        iter_info: 0,
        iter_info_len: 0,
        _pad: 0,
    };
    bpf_fd(BPF_LINK_CREATE, &attr)
}

/// `bpf(BPF_ITER_CREATE)`: a new run of the iterator behind `link`.
fn iter_create(link: RawFd) -> io::Result<OwnedFd> {
    const BPF_ITER_CREATE: libc::c_long = 33;
    #[repr(C)]
    struct IterCreateAttr {
        link_fd: u32,
        flags: u32,
    }
    bpf_fd(
        BPF_ITER_CREATE,
        &IterCreateAttr {
            link_fd: link as u32,
            flags: 0,
        },
    )
}

/// A bpf(2) command that returns a new fd.
fn bpf_fd<A>(cmd: libc::c_long, attr: &A) -> io::Result<OwnedFd> {
    let fd = super::sys::bpf(cmd, attr)?;
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
