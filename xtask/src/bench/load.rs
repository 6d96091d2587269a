//! The client side: bulk streams, ping-pong latency, connection rate, idle connections.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::servers::{IdleHolder, BULK_BUF, CMD_CLOSE_AFTER, CMD_DOWNLOAD, CMD_UPLOAD, MSG};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// client -> server
    Upload,
    /// server -> client
    Download,
}

/// CPU counters read at the edges of a measurement window.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSnap {
    /// The forwarder's utime + stime, ticks (None without a forwarder).
    pub forwarder: Option<u64>,
    /// Whole-machine non-idle time, ticks.
    pub machine: u64,
}

pub struct BulkResult {
    pub bytes: u64,
    pub secs: f64,
    pub forwarder_ticks: Option<u64>,
    pub machine_ticks: u64,
}

/// `streams` parallel connections move data one way for `dur` after `warmup`; counts the
/// bytes that arrived at the receiving end inside the window.
pub fn bulk(
    addr: SocketAddr,
    dir: Direction,
    streams: usize,
    warmup: Duration,
    dur: Duration,
    sunk: &AtomicU64,
    snap: &dyn Fn() -> Result<CpuSnap>,
) -> Result<BulkResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..streams {
        let mut c = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        c.set_nodelay(true)?;
        c.write_all(&[match dir {
            Direction::Upload => CMD_UPLOAD,
            Direction::Download => CMD_DOWNLOAD,
        }])?;
        conns.push(c);
    }
    let mut handles = Vec::new();
    for mut c in conns {
        let stop = stop.clone();
        let received = received.clone();
        handles.push(thread::spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0xa5u8; BULK_BUF];
            match dir {
                Direction::Upload => {
                    while !stop.load(Ordering::Relaxed) {
                        c.write_all(&buf)?;
                    }
                    let _ = c.shutdown(std::net::Shutdown::Write);
                }
                Direction::Download => {
                    while !stop.load(Ordering::Relaxed) {
                        let n = c.read(&mut buf)?;
                        if n == 0 {
                            return Err(ErrorKind::UnexpectedEof.into());
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        }));
    }
    let counter = || match dir {
        Direction::Upload => sunk.load(Ordering::Relaxed),
        Direction::Download => received.load(Ordering::Relaxed),
    };
    thread::sleep(warmup);
    let (b0, c0, t0) = (counter(), snap(), Instant::now());
    thread::sleep(dur);
    let (b1, c1, t1) = (counter(), snap(), Instant::now());
    stop.store(true, Ordering::Relaxed);
    let mut failed = None;
    for h in handles {
        if let Err(e) = h.join().expect("bulk client panicked") {
            failed.get_or_insert(e);
        }
    }
    let (c0, c1) = (c0?, c1?);
    if let Some(e) = failed {
        bail!("bulk {dir:?} x{streams}: a stream failed: {e}");
    }
    Ok(BulkResult {
        bytes: b1 - b0,
        secs: (t1 - t0).as_secs_f64(),
        forwarder_ticks: match (c0.forwarder, c1.forwarder) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        machine_ticks: c1.machine - c0.machine,
    })
}

/// One connection, `count` 64-byte ping-pongs after `warmup` untimed ones. Returns the
/// round-trip times in microseconds, sorted.
pub fn ping_pong(addr: SocketAddr, warmup: usize, count: usize) -> Result<Vec<f64>> {
    let mut c = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let req = [b'P'; MSG];
    let mut resp = [0u8; MSG];
    let mut rtts = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        c.write_all(&req)?;
        c.read_exact(&mut resp).context("ping-pong read")?;
        if i >= warmup {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

/// The value below which a fraction `q` of the sorted samples lie (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub struct ConnRate {
    pub per_sec: f64,
    /// Connections that completed.
    pub ok: u64,
    pub errors: u64,
}

/// `threads` clients each loop on: connect, send 64 B, read 64 B, read the server's
/// close, close. The server closes first, so no client port sits in TIME_WAIT.
pub fn conn_rate(addr: SocketAddr, threads: usize, dur: Duration) -> Result<ConnRate> {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let barrier = barrier.clone();
        let stop = stop.clone();
        handles.push(thread::spawn(move || {
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut first_error = None;
            barrier.wait();
            while !stop.load(Ordering::Relaxed) {
                match one_conn(addr) {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            (ok, errors, first_error)
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut errors, mut first_error) = (0, 0, None);
    for h in handles {
        let (o, e, f) = h.join().expect("conn-rate client panicked");
        ok += o;
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if let Some(e) = first_error {
        eprintln!("bench:   connection rate: {errors} failed, first: {e}");
    }
    if ok == 0 {
        bail!("connection rate: no connection succeeded");
    }
    Ok(ConnRate {
        per_sec: ok as f64 / secs,
        ok,
        errors,
    })
}

fn one_conn(addr: SocketAddr) -> std::io::Result<()> {
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(&[CMD_CLOSE_AFTER; MSG])?;
    let mut buf = [0u8; MSG];
    c.read_exact(&mut buf)?;
    // Wait for the server's close so it, not us, ends up in TIME_WAIT.
    match c.read(&mut buf)? {
        0 => Ok(()),
        _ => Err(std::io::Error::other("unexpected bytes after the response")),
    }
}

pub struct IdleResult {
    /// Pairs that carried their byte each way.
    pub conns: usize,
    /// Pairs that did not (the byte did not arrive either way in time).
    pub failed: usize,
    /// How long opening them (and the byte each way) took.
    pub open_secs: f64,
    /// The relay's RSS and fds (before, after).
    pub relay_rss_kib: Option<(u64, u64)>,
    pub relay_fds: Option<(u64, u64)>,
    pub slab_active: Option<(u64, u64)>,
    /// Per slab cache (before, after), for the breakdown.
    pub slab_caches: Option<(BTreeMap<String, u64>, BTreeMap<String, u64>)>,
    pub slab_meminfo_kib: (u64, u64),
}

/// The client ends of the idle connections.
pub struct IdleConns {
    clients: Vec<TcpStream>,
}

impl IdleConns {
    pub fn close(self, holder: &IdleHolder) {
        holder.close_all();
        // Let the closes reach the clients (and the relay) before ours go out.
        thread::sleep(Duration::from_millis(100));
        drop(self.clients);
    }
}

/// What the relay holds: RSS (KiB) and open fds, summed over its processes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelayMem {
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
}

/// How many connections the client may be ahead of the server's accepts.
const AHEAD: usize = 64;

/// Opens `n` connections that each carry one byte each way (the client sends, the idle
/// server answers) and then nothing, waits until the idle server holds all of them, then
/// reads memory and fds (before and after). The caller closes them with
/// `IdleConns::close`.
pub fn idle(
    addr: SocketAddr,
    holder: &IdleHolder,
    n: usize,
    relay: &mut dyn FnMut() -> RelayMem,
) -> Result<(IdleResult, IdleConns)> {
    holder.close_all();
    let settle = Duration::from_millis(300);
    thread::sleep(settle);
    let caches0 = super::procfs::slab_by_cache();
    let meminfo0 = super::procfs::meminfo_kib("Slab")?;
    let m0 = relay();

    let mut conns = IdleConns {
        clients: Vec::with_capacity(n),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = || holder.accepted.load(Ordering::SeqCst) + holder.failed.load(Ordering::SeqCst);
    let wait_done = |want: usize| -> Result<()> {
        while done() < want {
            if Instant::now() > deadline {
                bail!(
                    "idle: server got only {} of {want} connections in time",
                    holder.accepted.load(Ordering::SeqCst)
                );
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    };
    let t0 = Instant::now();
    let mut client_failed = 0usize;
    let result = (|| -> Result<()> {
        for i in 0..n {
            let mut c = TcpStream::connect(addr)
                .with_context(|| format!("idle: connection {} of {n} to {addr}", i + 1))?;
            if c.write_all(b"i").is_err() {
                client_failed += 1;
            }
            conns.clients.push(c);
            // Stay close behind the far end's accepts: an accept queue that overflows
            // (a relay's backlog may be as short as 128) costs a 1 s SYN retransmit.
            if i >= AHEAD {
                wait_done(i - AHEAD)?;
            }
        }
        wait_done(n)?;
        // The answers: each client end reads its byte back.
        let mut b = [0u8; 1];
        for c in &mut conns.clients {
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            if Instant::now() > deadline || c.read_exact(&mut b).is_err() {
                client_failed += 1;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        conns.close(holder);
        return Err(e);
    }
    let open_secs = t0.elapsed().as_secs_f64();
    let server_failed = holder.failed.load(Ordering::SeqCst);
    let accepted = holder.accepted.load(Ordering::SeqCst);
    thread::sleep(settle);
    // Slab first: listing /proc/PID/fd allocates proc inodes and dentries per fd.
    let caches1 = super::procfs::slab_by_cache();
    let meminfo1 = super::procfs::meminfo_kib("Slab")?;
    let m1 = relay();
    if accepted == 0 {
        conns.close(holder);
        bail!("idle: no connection carried its byte each way");
    }
    Ok((
        IdleResult {
            conns: accepted,
            failed: server_failed.max(client_failed),
            open_secs,
            relay_rss_kib: m0.rss_kib.zip(m1.rss_kib),
            relay_fds: m0.fds.zip(m1.fds),
            slab_active: caches0
                .as_ref()
                .zip(caches1.as_ref())
                .map(|(a, b)| (a.values().sum(), b.values().sum())),
            slab_caches: caches0.zip(caches1),
            slab_meminfo_kib: (meminfo0, meminfo1),
        },
        conns,
    ))
}
