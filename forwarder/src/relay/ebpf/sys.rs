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

/// Bytes received and not yet read (SIOCINQ); meaningless once in a sockmap.
pub fn inq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
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
    /// Bytes someone read from the socket before it reached us.
    pub fn read_before(&self) -> u64 {
        self.data.saturating_sub(self.unread)
    }
}

/// One [`Snapshot`]: tcp_info counts a received FIN as one byte and SIOCINQ does not,
/// and segments may land between the calls, so tcp_info is read around SIOCINQ and
/// SIOCOUTQ until the receive counter stands still. bytes_acked is read before
/// SIOCOUTQ, so concurrent ACKs can only make `sent_into` an underestimate.
pub fn snapshot(fd: RawFd) -> io::Result<Snapshot> {
    for _ in 0..10 {
        let before = tcp_counters(fd)?;
        let unread = inq(fd)?;
        let queued = outq(fd)?;
        let after = tcp_counters(fd)?;
        if before.bytes_received == after.bytes_received {
            let fin = matches!(
                after.state,
                TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_CLOSE
            ) as u64;
            return Ok(Snapshot {
                state: after.state,
                sent_into: before.bytes_acked + queued,
                data: after.bytes_received.saturating_sub(fin),
                unread,
            });
        }
    }
    Err(io::Error::other("receive counters kept moving"))
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

/// Total bytes ever queued into the socket for sending: bytes_acked + SIOCOUTQ.
/// tcp_info is read first, so concurrent ACKs can only make this an underestimate.
pub fn bytes_sent_into(fd: RawFd) -> io::Result<u64> {
    let acked = tcp_counters(fd)?.bytes_acked;
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
    loop {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
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

    /// Non-blocking: the events ready now, as (token, events).
    pub fn poll(&self, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        out.clear();
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: evs is valid for 64 entries.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 64, 0) };
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
