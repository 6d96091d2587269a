//! Peers and checks the kernel-path tests need beyond the harness: servers that hash
//! what they receive while sending, clients that check every byte as it arrives, and
//! helpers to read close lines and a process's file descriptors.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use forwarder_tests::*;

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `[[rule]]` text for one rule listening on 127.0.0.1 (an ephemeral port).
pub fn rule(name: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}\n"
    )
}

/// The number after `key=` in a log line.
pub fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line}"))
}

/// The close line of the pair of rule `rule` whose client connected from `client`
/// (a client port may be reused towards another rule's listener).
pub fn close_of<'a>(closes: &'a [String], rule: &str, client: SocketAddr) -> Option<&'a str> {
    let c = client.to_string();
    closes
        .iter()
        .find(|l| field(l, "rule") == Some(rule) && field(l, "client") == Some(c.as_str()))
        .map(String::as_str)
}

/// The close line of the pair of rule `rule` whose client is `client`, waiting up to
/// `timeout` for it.
pub fn await_close_of(
    fwd: &Forwarder,
    rule: &str,
    client: SocketAddr,
    timeout: Duration,
) -> Option<String> {
    let c = client.to_string();
    fwd.stderr.wait_for(timeout, |l| {
        l.contains(" close rule=")
            && field(l, "rule") == Some(rule)
            && field(l, "client") == Some(c.as_str())
    })
}

/// [`await_close_of`], which must come.
pub fn wait_close_of(fwd: &Forwarder, rule: &str, client: SocketAddr, timeout: Duration) -> String {
    await_close_of(fwd, rule, client, timeout).unwrap_or_else(|| {
        panic!(
            "no close line for rule {rule} client {client} within {timeout:?}; close lines: {:#?}",
            fwd.close_lines()
        )
    })
}

/// What the close lines of a run say about the paths the pairs took.
#[derive(Debug, Default)]
pub struct PathStats {
    pub pairs: usize,
    pub by_path: BTreeMap<String, usize>,
    /// Pairs whose `path=` has a `>`: they left the kernel path.
    pub moved: usize,
    /// Pairs with `userspace_bytes > 0` (SK_PASS, or bytes relayed before pairing).
    pub via_userspace: usize,
    pub userspace_bytes: u64,
    pub by_end: BTreeMap<String, usize>,
}

pub fn path_stats(closes: &[String]) -> PathStats {
    let mut s = PathStats::default();
    for l in closes {
        let path = field(l, "path").unwrap_or("?").to_string();
        if path == "none" {
            continue;
        }
        s.pairs += 1;
        s.moved += usize::from(path.contains('>'));
        *s.by_path.entry(path).or_default() += 1;
        let u = field(l, "userspace_bytes")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        s.via_userspace += usize::from(u > 0);
        s.userspace_bytes += u;
        *s.by_end
            .entry(field(l, "end").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    s
}

/// Errors that are a peer's reset showing, as opposed to a stall or a local failure.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

// ---------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------

/// Echoes every byte back while hashing what it received; at EOF shuts its write side
/// (after the last echoed byte) and reports the digest, or the error that ended it.
/// The client's echo checks the download direction, the report the upload direction.
pub fn digest_echo(ip: IpAddr) -> (Server, mpsc::Receiver<io::Result<Digested>>) {
    let (tx, rx) = mpsc::channel();
    let server = Server::start(ip, move |s| {
        let _ = tx.send(echo_hashing(&s, Instant::now() + secs(60)));
    });
    (server, rx)
}

fn echo_hashing(s: &TcpStream, deadline: Instant) -> io::Result<Digested> {
    let (mut r, mut w) = (s, s);
    let mut h = Hasher::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 64 * KIB as usize];
    loop {
        set_read_deadline(s, deadline)?;
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        len += n as u64;
        set_write_deadline(s, deadline)?;
        w.write_all(&buf[..n])?;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(Digested {
        len,
        sha: h.finish(),
    })
}

/// What a [`duplex_server`] connection saw.
#[derive(Debug)]
pub struct ServerSide {
    /// The seed of the client's payload (from its first block's header), if it came.
    pub seed: Option<u64>,
    /// The client's bytes, read to EOF, or the error that ended the read.
    pub read: io::Result<Digested>,
    /// Whether our download was written whole (and our write side shut after it).
    pub wrote: io::Result<()>,
}

/// Both directions at once: reads the seed of the client's payload from its first 16
/// bytes (every [`Payload`] block starts with its seed and index), then sends
/// `down(seed)` while reading the rest, shuts its write side after its last byte, and
/// reports what it got.
pub fn duplex_server(down: fn(u64) -> Payload) -> (Server, mpsc::Receiver<ServerSide>) {
    let (tx, rx) = mpsc::channel();
    let server = Server::start(LOCALHOST, move |s| {
        let deadline = Instant::now() + secs(60);
        let head = match read_exact_timeout(&s, 16, secs(60)) {
            Ok(h) => h,
            Err(e) => {
                let _ = tx.send(ServerSide {
                    seed: None,
                    read: Err(e),
                    wrote: Ok(()),
                });
                return;
            }
        };
        let seed = u64::from_le_bytes(head[..8].try_into().unwrap());
        let d = down(seed);
        let s: &TcpStream = &s;
        let (read, wrote) = thread::scope(|t| {
            let writer = t.spawn(move || -> io::Result<()> {
                d.write_to(s, deadline)?;
                s.shutdown(Shutdown::Write)
            });
            let mut h = Hasher::new();
            h.update(&head);
            let read = read_digest_from(s, h, 16, deadline);
            if read.is_err() {
                // Unblock the writer so the scope can end.
                let _ = s.shutdown(Shutdown::Both);
            }
            (read, writer.join().expect("server writer panicked"))
        });
        let _ = tx.send(ServerSide {
            seed: Some(seed),
            read,
            wrote,
        });
    });
    (server, rx)
}

// ---------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------

/// What a [`duplex`] client saw.
#[derive(Debug)]
pub struct ClientSide {
    pub local: SocketAddr,
    /// Whether the upload was written whole and the write side shut after it.
    pub wrote: io::Result<()>,
    /// The download, read to EOF, or the error that ended it.
    pub read: io::Result<Digested>,
}

/// Connects from 127.70.X.Y, an address of the payload seed's own (X.Y its low 16
/// bits): the close line's `client=` then names this transfer alone. From 127.0.0.1 a
/// test of 200 transfers reused client ports, and an earlier transfer's close line
/// was checked against a later one's payload (hunt: 4 "wrong counts" in one run).
fn connect_from_seed(addr: SocketAddr, seed: u64) -> io::Result<TcpStream> {
    let source = std::net::Ipv4Addr::new(127, 70, (seed >> 8) as u8, seed as u8);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(source.into(), 0).into())?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects, sends `up` (shutting the write side after its last byte) while reading
/// the other direction to EOF.
pub fn duplex(addr: SocketAddr, up: Payload, deadline: Instant) -> io::Result<ClientSide> {
    let s = connect_from_seed(addr, up.seed)?;
    let local = s.local_addr()?;
    let s = &s;
    let (wrote, read) = thread::scope(|t| {
        let writer = t.spawn(move || -> io::Result<()> {
            up.write_to(s, deadline)?;
            s.shutdown(Shutdown::Write)
        });
        let read = read_digest(s, deadline);
        if read.is_err() {
            let _ = s.shutdown(Shutdown::Both);
        }
        (writer.join().expect("client writer panicked"), read)
    });
    Ok(ClientSide { local, wrote, read })
}

/// Writes `bytes` with ONE write(2) (a blocking socket takes it all at once) while
/// reading the echo of its last `p.len` bytes (checked against `p`); then shuts the
/// write side and reads to EOF. Returns what came back (the echo and anything after
/// it up to EOF) and how much the one write took.
pub fn one_write_then_half_close(
    s: &TcpStream,
    bytes: &[u8],
    p: Payload,
    deadline: Instant,
) -> io::Result<(Checked, usize)> {
    let (echo, first) = thread::scope(|t| {
        let writer = t.spawn(move || -> io::Result<usize> {
            set_write_deadline(s, deadline)?;
            let mut w = s;
            let first = w.write(bytes)?;
            w.write_all(&bytes[first..])?;
            Ok(first)
        });
        let echo = read_checked(s, p, Some(p.len), deadline);
        if !matches!(echo.end, End::Count) {
            let _ = s.shutdown(Shutdown::Both);
        }
        (echo, writer.join().expect("writer panicked"))
    });
    if !matches!(echo.end, End::Count) {
        // The echo stalled or broke: that is the finding (the writer's error, if any,
        // only follows from our shutdown).
        return Ok((echo, first.unwrap_or(0)));
    }
    let first = first?;
    s.shutdown(Shutdown::Write)?;
    // Nothing more may come: the upstream's FIN, passed on, is all.
    let rest = read_checked(s, Payload::new(0, 0), None, deadline);
    let mut all = echo;
    all.intact &= rest.intact && rest.got == 0;
    all.got += rest.got;
    all.end = rest.end;
    all.at = rest.at;
    Ok((all, first))
}

/// How a [`read_checked`] ended.
#[derive(Debug)]
pub enum End {
    /// Stopped after the number of bytes asked for.
    Count,
    Eof,
    Error(io::Error),
}

/// What [`read_checked`] got.
#[derive(Debug)]
pub struct Checked {
    pub got: u64,
    /// sha256 of the bytes received.
    pub sha: Sha,
    /// Every byte received so far is the payload's byte at that offset.
    pub intact: bool,
    /// Where the first wrong byte arrived and what came there (see [`describe_bad`]).
    pub first_bad: Option<String>,
    pub end: End,
    pub at: Instant,
}

impl Checked {
    /// What was received, as a digest to compare with [`Digested::of`].
    pub fn digest(&self) -> Digested {
        Digested {
            len: self.got,
            sha: self.sha,
        }
    }

    pub fn is_reset(&self) -> bool {
        matches!(&self.end, End::Error(e) if is_reset(e))
    }
}

/// Reads until `stop_after` bytes (if given), EOF, an error or `deadline`, checking
/// every byte against `p` as it arrives: a prefix of `p` must arrive, nothing else.
pub fn read_checked(
    s: &TcpStream,
    p: Payload,
    stop_after: Option<u64>,
    deadline: Instant,
) -> Checked {
    let mut r = CheckedReader::new(p);
    let end = r.read(s, stop_after, deadline);
    r.finish(end)
}

/// The state of a [`read_checked`] that may go on over several calls.
struct CheckedReader {
    p: Payload,
    got: u64,
    intact: bool,
    h: Hasher,
    buf: Vec<u8>,
    want: Vec<u8>,
    /// The offset of the first wrong byte, and what arrived from there (up to
    /// [`BAD_KEPT`] bytes).
    bad: Option<(u64, Vec<u8>)>,
}

/// How much of the stream from its first wrong byte a [`CheckedReader`] keeps: enough
/// to meet two payload block headers.
const BAD_KEPT: usize = 3 * 4096;

impl CheckedReader {
    fn new(p: Payload) -> CheckedReader {
        CheckedReader {
            p,
            got: 0,
            intact: true,
            h: Hasher::new(),
            buf: vec![0u8; 256 * KIB as usize],
            want: vec![0u8; 256 * KIB as usize],
            bad: None,
        }
    }

    /// Reads on until `stop_after` bytes in all (if given), EOF, an error or `deadline`.
    fn read(&mut self, s: &TcpStream, stop_after: Option<u64>, deadline: Instant) -> End {
        let mut r = s;
        loop {
            let room = match stop_after {
                Some(n) if self.got >= n => return End::Count,
                Some(n) => (n - self.got).min(self.buf.len() as u64) as usize,
                None => self.buf.len(),
            };
            if let Err(e) = set_read_deadline(s, deadline) {
                return End::Error(e);
            }
            match r.read(&mut self.buf[..room]) {
                Ok(0) => return End::Eof,
                Ok(n) => {
                    let expect = (self.p.len.saturating_sub(self.got)).min(n as u64) as usize;
                    self.p.fill(self.got, &mut self.want[..expect]);
                    let mut from = 0;
                    if self.intact && (expect < n || self.buf[..n] != self.want[..n]) {
                        self.intact = false;
                        from = (0..n)
                            .find(|&i| i >= expect || self.buf[i] != self.want[i])
                            .unwrap_or(0);
                        self.bad = Some((self.got + from as u64, Vec::new()));
                    }
                    if let Some((_, kept)) = &mut self.bad {
                        let take = (n - from).min(BAD_KEPT - kept.len());
                        kept.extend_from_slice(&self.buf[from..from + take]);
                    }
                    self.h.update(&self.buf[..n]);
                    self.got += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return End::Error(e),
            }
        }
    }

    fn finish(self, end: End) -> Checked {
        Checked {
            got: self.got,
            sha: self.h.finish(),
            intact: self.intact,
            first_bad: self.bad.map(|(at, kept)| describe_bad(self.p, at, &kept)),
            end,
            at: Instant::now(),
        }
    }
}

/// What arrived at offset `at`, the first wrong byte of a stream that should be `p`:
/// the payload is made of 4 KiB blocks, each opening with a header of the seed and the
/// block's number, so the next header in `kept` tells which payload offset the stream
/// went on from (bytes skipped or repeated), or that what came was no payload at all.
fn describe_bad(p: Payload, at: u64, kept: &[u8]) -> String {
    let seed = p.seed.to_le_bytes();
    let head: String = kept.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let mut expected = [0u8; 16];
    p.fill(at, &mut expected);
    let expected: String = expected.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = format!("first wrong byte at offset {at}: got {head}.., expected {expected}..");
    let header = kept.windows(16).position(|w| w[..8] == seed);
    match header {
        Some(i) => {
            let block = u64::from_le_bytes(kept[i + 8..i + 16].try_into().unwrap());
            let stream_at = at + i as u64;
            let payload_at = block * 4096;
            let shift = payload_at as i128 - stream_at as i128;
            let what = match shift {
                0 => "in step with the stream (the bytes before it were wrong)".to_string(),
                s if s > 0 => format!("{s} bytes skipped"),
                s => format!("{} bytes repeated", -s),
            };
            out += &format!("; the next block header, at stream offset {stream_at}, is block {block} (payload offset {payload_at}): {what}");
        }
        None => {
            out += &format!("; no block header in the {} bytes kept", kept.len());
            // Another stream's bytes? A header of any payload: a small seed (high 4
            // bytes zero) and block number (high 5 bytes zero), which random bytes
            // match once in 2^72.
            let looks = |w: &[u8]| w[4..8] == [0; 4] && w[11..16] == [0; 5];
            let foreign = kept.windows(16).position(looks).map(|mut i| {
                // Windows up to 2 bytes before a header match too (a small seed's
                // zeros): the header is the last of the run.
                while kept.get(i + 1..i + 17).is_some_and(looks) {
                    i += 1;
                }
                i
            });
            if let Some(i) = foreign {
                let other = u64::from_le_bytes(kept[i..i + 8].try_into().unwrap());
                let block = u64::from_le_bytes(kept[i + 8..i + 16].try_into().unwrap());
                out += &format!(
                    "; at stream offset {} a header of payload seed {other}, block {block} (payload offset {}): another stream's bytes",
                    at + i as u64,
                    block * 4096
                );
            }
        }
    }
    out + &origins(p, at, kept)
}

/// Where the bytes in `kept` (the stream from offset `at`) came from, piece by piece:
/// each run that is a stretch of `p` is named by its payload offset (the longest such
/// stretch: the payload's 4 KiB blocks share a random table, so a short window can occur
/// more than once), and bytes that are no stretch of `p` (another stream's, or memory
/// that was never a stream's) as from no payload offset. Bytes skipped or repeated, or
/// pieces put in the wrong order, show as runs whose shift changes; a copy of the table
/// shows as pieces that end where a block's header should be.
fn origins(p: Payload, at: u64, kept: &[u8]) -> String {
    // A run must match this many bytes to be placed: random bytes match 16 once in 2^128.
    const MIN_RUN: usize = 16;
    const PIECES: usize = 12;
    // Larger payloads would take long (and hundreds of MB) to index; most read back
    // here are 8-32 MiB.
    if p.len > 32 * MIB {
        return String::new();
    }
    let all = p.to_vec();
    // Every 8-byte-aligned 8-byte word of the payload: a run of 16 bytes holds at least
    // one, at one of 8 alignments.
    let mut index: std::collections::HashMap<[u8; 8], Vec<usize>> = Default::default();
    for (k, word) in all.chunks_exact(8).enumerate() {
        index
            .entry(word.try_into().unwrap())
            .or_default()
            .push(k * 8);
    }
    let longest_at = |i: usize| -> Option<(usize, usize)> {
        (0..8)
            .filter_map(|d| kept.get(i + d..i + d + 8))
            .enumerate()
            .flat_map(|(d, word)| {
                let starts = index.get(word).map(|v| v.as_slice()).unwrap_or(&[]);
                starts.iter().filter(move |&&o| o >= d).map(move |&o| o - d)
            })
            .map(|o| {
                let n = kept[i..]
                    .iter()
                    .zip(&all[o..])
                    .take_while(|(a, b)| a == b)
                    .count();
                (o, n)
            })
            .filter(|&(_, n)| n >= MIN_RUN)
            .max_by_key(|&(_, n)| n)
    };
    let mut out = String::from("; where the bytes kept came from:");
    let (mut i, mut nowhere, mut pieces) = (0usize, 0usize, 0usize);
    while i < kept.len() && pieces < PIECES {
        match longest_at(i) {
            Some((o, n)) => {
                if nowhere > 0 {
                    out += &format!(" {nowhere} bytes from no payload offset;");
                    nowhere = 0;
                    pieces += 1;
                }
                let shift = o as i128 - (at + i as u64) as i128;
                out += &format!(" {n} bytes from payload offset {o} (shift {shift:+});");
                i += n;
                pieces += 1;
            }
            None => {
                nowhere += 1;
                i += 1;
            }
        }
    }
    if nowhere > 0 {
        out += &format!(" {nowhere} bytes from no payload offset;");
    }
    out
}

/// Echoes `p` through `s` with the write side shut after its last byte, like
/// [`exchange`], but its first `head` bytes make a round trip first: the pair is set
/// up (on the kernel path, in the maps) before the client's FIN can reach the
/// forwarder. A client half-closed before pairing is one the sockmap refuses, and that
/// pair would run on splice. Every echoed byte is checked against `p`.
pub fn paired_exchange(s: &TcpStream, p: Payload, head: u64, deadline: Instant) -> Checked {
    let head = head.min(p.len);
    let mut r = CheckedReader::new(p);
    let mut first = vec![0u8; head as usize];
    p.fill(0, &mut first);
    if let Err(e) = set_write_deadline(s, deadline).and_then(|()| (&*s).write_all(&first)) {
        return r.finish(End::Error(e));
    }
    let end = r.read(s, Some(head), deadline);
    if !matches!(end, End::Count) {
        return r.finish(end);
    }
    let (end, wrote) = thread::scope(|t| {
        let writer = t.spawn(move || -> io::Result<()> {
            let mut buf = vec![0u8; 256 * KIB as usize];
            let mut off = head;
            while off < p.len {
                let n = (p.len - off).min(buf.len() as u64) as usize;
                p.fill(off, &mut buf[..n]);
                set_write_deadline(s, deadline)?;
                (&*s).write_all(&buf[..n])?;
                off += n as u64;
            }
            s.shutdown(Shutdown::Write)
        });
        let end = r.read(s, None, deadline);
        if !matches!(end, End::Eof) {
            let _ = s.shutdown(Shutdown::Both);
        }
        (end, writer.join().expect("writer panicked"))
    });
    match (end, wrote) {
        (End::Eof, Err(e)) => r.finish(End::Error(e)),
        (end, _) => r.finish(end),
    }
}

/// Closes `s` with a reset (SO_LINGER 0); returns when.
pub fn reset(s: TcpStream) -> Instant {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    let at = Instant::now();
    drop(s);
    at
}

// ---------------------------------------------------------------------------------
// File descriptors
// ---------------------------------------------------------------------------------

pub fn prlimit_bin() -> &'static str {
    ["/usr/bin/prlimit", "/bin/prlimit"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("prlimit (util-linux) is required")
}

/// The fd numbers `pid` has open.
pub fn open_fds(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Sets RLIMIT_NOFILE of the running process `pid` (soft and hard) so that exactly
/// `free` more descriptors can be opened; returns the limit. The kernel hands out the
/// lowest free number and refuses numbers at or above the limit.
pub fn leave_free_fds(pid: i32, free: usize) -> u64 {
    let open = open_fds(pid);
    let mut n = 0i32;
    let mut left = free;
    loop {
        if open.binary_search(&n).is_err() {
            if left == 0 {
                break;
            }
            left -= 1;
        }
        n += 1;
    }
    let limit = n as u64;
    let mut cmd = command(prlimit_bin());
    cmd.args([
        OsString::from("--pid"),
        pid.to_string().into(),
        format!("--nofile={limit}:{limit}").into(),
    ]);
    let o = run_to_exit(cmd, secs(10));
    assert_eq!(o.code(), Some(0), "prlimit --pid failed: {}", o.stderr);
    limit
}

/// [`read_checked`] says where a stream first went wrong and how: 1,000 bytes skipped
/// at offset 10,000, then 500 repeated (the checker itself, over a real loopback
/// connection).
#[test]
fn read_checked_names_skipped_and_repeated_bytes() {
    let p = Payload::new(42, 64 * KIB);
    for (cut, resume, what) in [
        (10_000u64, 11_000u64, "1000 bytes skipped"),
        (10_000, 9_500, "500 bytes repeated"),
    ] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let writer = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let all = p.to_vec();
            s.write_all(&all[..cut as usize]).unwrap();
            s.write_all(&all[resume as usize..]).unwrap();
        });
        let s = TcpStream::connect(addr).unwrap();
        let r = read_checked(&s, p, None, Instant::now() + Duration::from_secs(10));
        writer.join().unwrap();
        let bad = r.first_bad.expect("a wrong byte was sent");
        assert!(
            !r.intact && bad.starts_with(&format!("first wrong byte at offset {cut}")),
            "{bad}"
        );
        assert!(bad.contains(what), "{bad}");
        // The kept bytes (12 KiB) are placed: all of them, from where the writer resumed.
        let origin = format!(
            "12288 bytes from payload offset {resume} (shift {:+})",
            resume as i64 - cut as i64
        );
        assert!(bad.contains(&origin), "{bad}");
    }
    // Another payload's bytes in the stream: named by their seed.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let writer = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&p.to_vec()[..10_000]).unwrap();
        s.write_all(&Payload::new(77, 64 * KIB).to_vec()[100..20_000])
            .unwrap();
    });
    let s = TcpStream::connect(addr).unwrap();
    let r = read_checked(&s, p, None, Instant::now() + Duration::from_secs(10));
    writer.join().unwrap();
    let bad = r.first_bad.expect("a wrong byte was sent");
    assert!(
        bad.contains("a header of payload seed 77, block 1 (payload offset 4096)"),
        "{bad}"
    );
}
