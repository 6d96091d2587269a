//! The few socket and epoll syscalls the sockmap relay needs, as safe functions.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The kernel's unique, never reused id of a socket: our map key.
pub fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

/// The fields of `struct tcp_info` we use.
#[derive(Debug, Clone, Copy)]
pub struct TcpCounters {
    pub state: u8,
    /// Payload bytes acknowledged by the peer (plus 1 for the SYN of a connect()).
    pub bytes_acked: u64,
    /// Payload bytes received (plus 1 once a FIN has been received).
    pub bytes_received: u64,
}

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LAST_ACK: u8 = 9;
pub const TCP_CLOSING: u8 = 11;

pub fn tcp_counters(fd: RawFd) -> io::Result<TcpCounters> {
    // struct tcp_info is 232+ bytes on 6.x; the offsets below are ABI-stable
    // (tcpi_bytes_acked at 120, tcpi_bytes_received at 128, since Linux 4.1).
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf and len are valid for writes of the sizes given.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    if len < 136 {
        return Err(io::Error::other(
            "tcp_info too short (kernel older than 4.1)",
        ));
    }
    let u64_at = |off: usize| u64::from_ne_bytes(buf[off..off + 8].try_into().unwrap());
    Ok(TcpCounters {
        state: buf[0],
        bytes_acked: u64_at(120),
        bytes_received: u64_at(128),
    })
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCINQ/SIOCOUTQ write one int.
    cvt(unsafe { libc::ioctl(fd, req, &mut v) })?;
    Ok(v.max(0) as u64)
}

/// Bytes in the send queue not yet acknowledged (SIOCOUTQ).
pub fn outq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Bytes received and not yet read (SIOCINQ; up to the urgent mark when one is ahead,
/// and a FIN not counted); meaningless once in a sockmap.
pub fn inq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Whether the next byte to read is TCP urgent data (SIOCATMARK, from
/// <linux/sockios.h>; the libc crate lacks it). An ioctl that takes no lock.
pub fn at_urgent_mark(fd: RawFd) -> bool {
    const SIOCATMARK: libc::c_ulong = 0x8905;
    ioctl_int(fd, SIOCATMARK).is_ok_and(|at| at != 0)
}

/// What pairing needs to know of a socket, read in one go: its state, the bytes ever
/// queued into it for sending, and what it received.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub state: u8,
    /// bytes_acked + SIOCOUTQ (see [`bytes_sent_into`]).
    pub sent_into: u64,
    /// Payload bytes received (a FIN not counted), and how many of those are unread.
    /// In TCP_CLOSE a FIN is assumed: a socket reset without one reads one short.
    pub data: u64,
    pub unread: u64,
}

impl Snapshot {
    /// A socket nothing was read from or written into, from its tcp_info alone: no
    /// byte was read before pairing, and nothing is queued for sending (SIOCOUTQ 0),
    /// but `bytes_acked` may count the SYN (1 on a connected socket, 0 on an accepted
    /// one: measured, and off by one in every close line when taken as 0).
    pub fn untouched(t: TcpCounters) -> Snapshot {
        Snapshot {
            state: t.state,
            sent_into: t.bytes_acked,
            data: 0,
            unread: 0,
        }
    }

    /// Bytes someone read from the socket before it reached us.
    pub fn read_before(&self) -> u64 {
        self.data.saturating_sub(self.unread)
    }
}

/// One [`Snapshot`]: tcp_info counts a received FIN as one byte and SIOCINQ does not,
/// and segments and ACKs may land between the calls, so tcp_info is read around
/// SIOCINQ and SIOCOUTQ until both its receive and its acked counters stand still. (An
/// ACK between bytes_acked and SIOCOUTQ made `sent_into`, a baseline, too small, and
/// every later count of the bytes sent into the socket too large: a close line's
/// bytes_up 28,702 over, in CI, for a socket we had just written 60 KiB into.)
pub fn snapshot(fd: RawFd) -> io::Result<Snapshot> {
    for _ in 0..10 {
        let before = tcp_counters(fd)?;
        let unread = inq(fd)?;
        let queued = outq(fd)?;
        let after = tcp_counters(fd)?;
        if before.bytes_received == after.bytes_received && before.bytes_acked == after.bytes_acked
        {
            let fin = fin_received(after.state) as u64;
            return Ok(Snapshot {
                state: after.state,
                sent_into: before.bytes_acked + queued,
                data: after.bytes_received.saturating_sub(fin),
                unread,
            });
        }
    }
    Err(io::Error::other("tcp counters kept moving"))
}

/// Whether a socket in this TCP state has received its peer's FIN (or was closed):
/// nothing more arrives on it.
pub fn fin_received(state: u8) -> bool {
    matches!(
        state,
        TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_CLOSE
    )
}

/// SO_RCVLOWAT. TCP hands a socket's bytes to its data_ready callback, and so to our
/// verdict program, only once this many are queued (or the receive buffer is under
/// pressure, the window is tiny, or a FIN came).
pub fn set_rcvlowat(fd: RawFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: the value is a c_int of the size given.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Total bytes ever queued into the socket for sending: bytes_acked + SIOCOUTQ, with
/// tcp_info read around SIOCOUTQ until no ACK landed between them (an ACK there makes
/// the sum too small; the pair's handoff to splice counts on from it). After 10 tries,
/// the last sum: an underestimate.
pub fn bytes_sent_into(fd: RawFd) -> io::Result<u64> {
    let mut acked = tcp_counters(fd)?.bytes_acked;
    for _ in 0..10 {
        let queued = outq(fd)?;
        let after = tcp_counters(fd)?.bytes_acked;
        if after == acked {
            return Ok(acked + queued);
        }
        acked = after;
    }
    Ok(acked + outq(fd)?)
}

/// Pending socket error (SO_ERROR), which reading clears.
pub fn take_error(fd: RawFd) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

pub fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send_with(fd, buf, 0)
}

/// As urgent data (MSG_OOB): TCP marks the last byte sent urgent.
pub fn send_urgent(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send_with(fd, buf, libc::MSG_OOB)
}

fn send_with(fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// An epoll instance of our own, so we can ask for exactly the events we want
/// (tokio's registration always includes EPOLLIN, which sockmap raises spuriously).
pub struct Epoll(OwnedFd);

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; on success we own the returned fd.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid epoll_event; both fds are open.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Most events one [`Epoll::poll`] returns.
    pub const BATCH: usize = 64;

    /// Non-blocking: the events ready now (at most [`Epoll::BATCH`]), as (token, events).
    pub fn poll(&self, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        out.clear();
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; Self::BATCH];
        // SAFETY: evs is valid for BATCH entries.
        let n = unsafe {
            libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), Self::BATCH as i32, 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        out.extend(evs[..n as usize].iter().map(|e| (e.u64, e.events)));
        Ok(())
    }
}

/// bpf(2) with `attr`, a `#[repr(C)]` prefix of `union bpf_attr` for `cmd` (the
/// kernel zero-extends it), for a command that only reads it. Returns what the call
/// returned: a new fd for some commands.
pub fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // The kernel does not write `attr` for such commands.
    bpf_call(cmd, (attr as *const A).cast_mut())
}

/// [`bpf`] for a command that writes results back into `attr` (the batched map calls'
/// `count`).
pub fn bpf_mut<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    bpf_call(cmd, attr)
}

fn bpf_call<A>(cmd: libc::c_long, attr: *mut A) -> io::Result<libc::c_long> {
    // SAFETY: attr points at a fully initialised prefix of union bpf_attr and the size
    // passed is its size; the kernel writes into it only for commands that return
    // results there, which callers pass through `bpf_mut`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, std::mem::size_of::<A>() as u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The BPF_MAP_*_BATCH member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

impl BatchAttr {
    /// A batch of `keys` (u64) in `map`, with `values` (null for deletes), BPF_ANY.
    fn new(map: RawFd, keys: &[u64], values: *const u8) -> BatchAttr {
        BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values as u64,
            count: keys.len() as u32,
            map_fd: map as u32,
            elem_flags: 0,
            flags: 0,
        }
    }
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Puts `values[i]` under `keys[i]` in the hash map `map` (u64 keys), in one bpf(2)
/// call (5.6+). All or an error; on an error some leading elements may be set.
pub fn map_update_batch<V: Copy>(map: RawFd, keys: &[u64], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr::new(map, keys, values.as_ptr().cast());
    bpf_mut(BPF_MAP_UPDATE_BATCH, &mut attr).map(drop)
}

/// Deletes `keys` from the hash map `map` (u64 keys) with batched bpf(2) calls (5.6+):
/// one call, plus one more past each key the map does not hold (skipped). On any other
/// error, returns the keys not yet deleted with it.
pub fn map_delete_batch(map: RawFd, keys: &[u64]) -> Result<(), (&[u64], io::Error)> {
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr::new(map, rest, std::ptr::null());
        let Err(e) = bpf_mut(BPF_MAP_DELETE_BATCH, &mut attr) else {
            return Ok(());
        };
        // `count` is how many went before the failing key (not set on EFAULT).
        let done = match e.raw_os_error() {
            Some(libc::EFAULT) => 0,
            _ => (attr.count as usize).min(rest.len()),
        };
        if e.raw_os_error() != Some(libc::ENOENT) || done == rest.len() {
            return Err((&rest[done..], e));
        }
        rest = &rest[done + 1..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash map of u64 -> u64, or None where this process may not create one.
    fn hash_map() -> Option<OwnedFd> {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let attr = CreateAttr {
            map_type: 1, // BPF_MAP_TYPE_HASH
            key_size: 8,
            value_size: 8,
            max_entries: 16,
            map_flags: 0,
        };
        match bpf(0, &attr) {
            // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
            Ok(fd) => Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
            // SAFETY: geteuid has no preconditions.
            Err(e) if unsafe { libc::geteuid() } != 0 => {
                eprintln!("skipped: bpf(BPF_MAP_CREATE) needs root here ({e})");
                None
            }
            Err(e) => panic!("bpf(BPF_MAP_CREATE) failed as root: {e}"),
        }
    }

    fn lookup(map: RawFd, key: u64) -> Option<u64> {
        #[repr(C)]
        struct ElemAttr {
            map_fd: u32,
            pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut value = 0u64;
        let attr = ElemAttr {
            map_fd: map as u32,
            pad: 0,
            key: &key as *const u64 as u64,
            value: &mut value as *mut u64 as u64,
            flags: 0,
        };
        bpf(1, &attr).ok().map(|_| value) // BPF_MAP_LOOKUP_ELEM
    }

    /// The batched calls set and delete exactly the keys given, and a key the map does
    /// not hold stops nothing (a pair that failed halfway retires keys never set).
    #[test]
    fn batched_map_calls_skip_missing_keys() {
        let Some(map) = hash_map() else { return };
        let map = map.as_raw_fd();
        map_update_batch(map, &[1, 2, 3, 4], &[10u64, 20, 30, 40]).unwrap();
        assert_eq!(
            [1, 2, 3, 4].map(|k| lookup(map, k)),
            [Some(10), Some(20), Some(30), Some(40)]
        );
        map_delete_batch(map, &[1, 99, 98, 3, 97]).unwrap();
        assert_eq!(
            [1, 2, 3, 4].map(|k| lookup(map, k)),
            [None, Some(20), None, Some(40)]
        );
        map_delete_batch(map, &[2, 4]).unwrap();
        map_delete_batch(map, &[5, 6]).unwrap();
        assert_eq!([2, 4].map(|k| lookup(map, k)), [None, None]);
    }
}
