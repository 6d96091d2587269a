//! Taking a socket off the verdict program (out of MEMBERS) under its socket lock.
//!
//! A plain map delete races with TCP: if another CPU is handing the socket an skb at
//! that moment (`tcp_read_skb` has unlinked it, the program is gone when
//! `sk_psock_verdict_recv` looks), the kernel counts the skb read and drops it. The
//! bytes are lost and the pair has to be reset (seen in CI: 62 KB gone when a pair left
//! the maps at the start of an upload). TCP hands over skbs only under the socket lock
//! (or defers them to the lock owner's backlog), so the delete is made by a TCP iterator
//! program, which the kernel runs on each socket with that lock held
//! (`bpf_iter_tcp_seq_show`). Userspace names the sockets in PARTING and reads the
//! iterator once; the program deletes each one and marks it done, or refuses one whose
//! passed bytes are not all consumed (checked under the lock, so exact).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use aya::programs::Iter;
use aya::Ebpf;
use forwarder_common::{PARTING_MAP, PART_ASKED, PART_DONE, PART_PROG, PART_REFUSED};

pub struct Parter {
    /// The iterator's link: each run creates an iterator from it.
    link: OwnedFd,
    parting: Mutex<HashMap<MapData, u64, u8>>,
    /// One run at a time. A run walks every bucket of TCP's established hash (262,144
    /// here: about 5 ms), so requests made while one runs share the next.
    runs: Mutex<()>,
}

impl Parter {
    /// Loads and links the iterator program. It needs the kernel's BTF (to name the
    /// TCP iterator): parsed here and dropped again.
    pub fn load(ebpf: &mut Ebpf) -> Result<Parter, String> {
        let parting = super::kernel::take(ebpf, PARTING_MAP)?;
        let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        let prog: &mut Iter = ebpf
            .program_mut(PART_PROG)
            .ok_or_else(|| format!("program {PART_PROG} missing from the object"))?
            .try_into()
            .map_err(|e| format!("program {PART_PROG}: {e}"))?;
        prog.load("tcp", &btf)
            .map_err(|e| format!("the kernel rejected the part program: {e:#}"))?;
        drop(btf);
        // Parsing it took ~20 MiB in many small allocations: give them back to the OS
        // rather than keep them in the heap for the life of the process.
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        let link = link_create(prog.fd().map_err(|e| e.to_string())?.as_fd().as_raw_fd())
            .map_err(|e| format!("cannot link the part program: {e}"))?;
        Ok(Parter {
            link,
            parting: Mutex::new(parting),
            runs: Mutex::new(()),
        })
    }

    /// Takes the sockets with these cookies (at most two) out of MEMBERS, each under
    /// its lock, and says what became of each: `Some(true)` parted, `Some(false)`
    /// refused (passed bytes to consume first), `None` not found among TCP's sockets
    /// (closed meanwhile). Blocks for a run of the iterator: call it off the runtime.
    pub fn part(&self, cookies: &[u64]) -> io::Result<[Option<bool>; 2]> {
        {
            let mut map = self.parting.lock().unwrap_or_else(|e| e.into_inner());
            for c in cookies {
                if let Err(e) = map.insert(c, PART_ASKED, 0) {
                    // Leave nothing asked that nobody waits for (a later run would
                    // part it behind its pair's back, and its entry would stay).
                    for c in cookies {
                        let _ = map.remove(c);
                    }
                    return Err(io::Error::other(e));
                }
            }
        }
        let run = {
            let _one = self.runs.lock().unwrap_or_else(|e| e.into_inner());
            // A run that started after we asked (while we waited) did ours too.
            let map = self.parting.lock().unwrap_or_else(|e| e.into_inner());
            let asked = cookies
                .iter()
                .any(|c| map.get(c, 0).ok() == Some(PART_ASKED));
            drop(map);
            if asked {
                let started = std::time::Instant::now();
                let run = self.run();
                tracing::debug!("ebpf: TCP iterator run took {:?}", started.elapsed());
                run
            } else {
                Ok(())
            }
        };
        let mut map = self.parting.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = [None; 2];
        for (o, c) in out.iter_mut().zip(cookies) {
            *o = match map.get(c, 0) {
                Ok(PART_DONE) => Some(true),
                Ok(PART_REFUSED) => Some(false),
                _ => None,
            };
            let _ = map.remove(c);
        }
        run.map(|()| out)
    }

    /// Runs the program over every TCP socket of this network namespace: it writes
    /// nothing, so reading to the end is the whole run.
    fn run(&self) -> io::Result<()> {
        let iter = iter_create(self.link.as_raw_fd())?;
        let mut buf = [0u8; 64];
        // The kernel stops a read after a million sockets (EAGAIN when it has nothing
        // to show) or for a signal; each read goes on from there.
        for _ in 0..1000 {
            // SAFETY: buf is valid for its length; the fd is ours.
            let n = unsafe { libc::read(iter.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => return Ok(()),
                n if n > 0 => continue,
                _ => {
                    let e = io::Error::last_os_error();
                    if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                        return Err(e);
                    }
                }
            }
        }
        Err(io::Error::other("the TCP iterator did not finish"))
    }
}

/// `bpf(BPF_LINK_CREATE)` for an iterator program (no target, no iterator options).
fn link_create(prog: i32) -> io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TRACE_ITER: u32 = 28;
    /// The BPF_LINK_CREATE member of `union bpf_attr`, up to its iterator fields.
    #[repr(C)]
    #[derive(Default)]
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
        prog_fd: prog as u32,
        attach_type: BPF_TRACE_ITER,
        ..Default::default()
    };
    bpf_fd(BPF_LINK_CREATE, &attr)
}

/// `bpf(BPF_ITER_CREATE)`: a readable iterator from the link.
fn iter_create(link: i32) -> io::Result<OwnedFd> {
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

fn bpf_fd<A>(cmd: libc::c_long, attr: &A) -> io::Result<OwnedFd> {
    let fd = super::sys::bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
