//! Relay behaviour, written once and run in both relay modes: `splice::NAME` and
//! `ebpf::NAME` (the latter only as root, where it runs with `--mode ebpf`).

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use forwarder_tests::netns::{NetNs, Proc};
use forwarder_tests::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// What the kernel program redirects before it passes bytes to us: 4 x the default
/// inflight_limit (4 MiB) in flight. Only what a direction moves beyond it can ever
/// go through the forwarder's memory.
const PROGRAM_CAP: u64 = 16 * MIB;
/// The largest skb the program is handed, with room: GSO skbs on loopback are 64 KiB,
/// and TCP coalesces queued ones up to 17 page fragments of up to 32 KiB.
const MAX_SKB: u64 = MIB;

/// Bytes of a `len`-byte direction that may reach userspace on the kernel path. The
/// program passes the first skb that would cross its cap and, to keep order, every
/// later byte of that direction, so all but the first `PROGRAM_CAP - MAX_SKB` bytes
/// may. (Reached only if the forwarder, or the kernel's redirect worker, is starved
/// of CPU while a bulk transfer runs: the pair leaves for splice at a sixteenth of the
/// cap when it sees the worker fall behind.)
fn past_cap(len: u64) -> u64 {
    len.saturating_sub(PROGRAM_CAP - MAX_SKB)
}

/// A bulk transfer on the kernel path may outrun the kernel's redirect worker and
/// leave the maps for splice at its in-flight bound, and the bytes of each direction
/// (`lens`) past the program's cap may go through userspace (see [`past_cap`]).
fn allow_bulk_escape(fwd: &Forwarder, lens: &[u64]) {
    fwd.expect_paths(&["ebpf>splice"])
        .expect_userspace_at_most(lens.iter().map(|&l| past_cap(l)).sum());
}

/// `[[rule]]` text for one rule.
fn rule(name: &str, upstream: SocketAddr, extra: &str) -> String {
    format!("[[rule]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}\n")
}

/// A forwarder limited to 64 fds, started under `wrapper` too. As root it would raise
/// even the hard limit (up to fs.nr_open): without CAP_SYS_RESOURCE it cannot, and 64
/// is what it gets.
fn forwarder_with_64_fds(mode: Mode, upstream: SocketAddr, wrapper: &[&str]) -> Forwarder {
    Forwarder::cli_under(&fd_limit_64(wrapper), mode, upstream)
}

/// [`forwarder_with_64_fds`] with a config file of one rule.
fn config_with_64_fds(mode: Mode, toml: &str) -> Forwarder {
    let dir = TempDir::new("config");
    let path = dir.write("forwarder.toml", toml);
    let args = vec![
        "run".into(),
        "--config".into(),
        path.into(),
        "--mode".into(),
        mode.as_str().into(),
    ];
    let prefix: Vec<OsString> = fd_limit_64(&[]).into_iter().map(OsString::from).collect();
    Forwarder::spawn(&prefix, args, 1, Some(dir))
}

/// Out of fds for 2 s ([`fill_fds`]), neither the active checks (every 200 ms, fall
/// 2) of `fwd`'s one rule nor the waiting clients' connects blame the upstream: it is
/// not marked DOWN, and no connect says its name cannot be resolved.
fn checks_out_of_fds_say_nothing(mode: Mode, fwd: &Forwarder) {
    fwd.assert_mode(mode);
    fwd.expect_paths(&["splice"]).expect_userspace_at_most(2);
    let (held, waiting) = fill_fds(fwd);
    thread::sleep(secs(2));
    let log = fwd.stderr.text();
    assert!(
        !log.contains(" is DOWN"),
        "a check out of fds marked the upstream down: {log}"
    );
    assert!(
        !log.contains("cannot resolve"),
        "our fd shortage blamed on the name: {log}"
    );
    // The client that waited for an fd is served once one comes free, not failed.
    drop(held);
    let answer = read_exact_timeout(&waiting, 1, secs(4));
    let log = fwd.stderr.text();
    assert!(
        matches!(&answer, Ok(got) if got == b"h") && !log.contains("end=connect_failed"),
        "the waiting client was not served ({answer:?}): {log}"
    );
}

/// [`checks_out_of_fds_say_nothing`] for a rule whose upstream `addr` is written as
/// `written` (an interface-scoped address, a name).
fn checks_out_of_fds_say_nothing_of(mode: Mode, addr: SocketAddr, written: &str) {
    let toml = rule("r", addr, "check_interval = \"200ms\"\nfall = 2").replace(
        &format!("upstream = \"{addr}\""),
        &format!("upstream = \"{written}\""),
    );
    assert!(toml.contains(written), "{toml}");
    let fwd = config_with_64_fds(mode, &toml);
    checks_out_of_fds_say_nothing(mode, &fwd);
}

fn fd_limit_64<'a>(wrapper: &[&'a str]) -> Vec<&'a str> {
    let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("prlimit (util-linux) is required");
    let mut prefix = vec![
        prlimit,
        "--nofile=64:64",
        "--",
        "setpriv",
        "--inh-caps=-sys_resource",
        "--bounding-set=-sys_resource",
        "--",
    ];
    prefix.extend_from_slice(wrapper);
    prefix
}

/// Answers a first byte `A` with `A` and an echo; anything else with `bulk`, then
/// waits for the client's EOF (the server's read timeout bounds it).
fn echo_or_bulk(bulk: Payload) -> Server {
    echo_or_bulk_pausing(bulk, Duration::ZERO)
}

/// [`echo_or_bulk`] whose echo, once the first bytes after the `A` arrive, leaves
/// them unread for `pause` before it echoes: the pair's bytes pile up in flight.
fn echo_or_bulk_pausing(bulk: Payload, pause: Duration) -> Server {
    Server::start(LOCALHOST, move |c| {
        let mut first = [0u8; 1];
        if (&*c).read_exact(&mut first).is_err() {
            return;
        }
        if &first == b"A" {
            let _ = (&*c).write_all(b"A").and_then(|()| {
                if !pause.is_zero() && c.peek(&mut [0u8; 1])? > 0 {
                    thread::sleep(pause);
                }
                echo_stream(&c)
            });
        } else {
            let _ = (&*c).write_all(&bulk.to_vec());
            let _ = (&*c).read(&mut [0u8; 1]);
        }
    })
}

/// Starts downloads from an [`echo_or_bulk`] server through `fwd` whose clients read
/// only the first byte, until one is not served within 1 s (the forwarder is out of
/// fds) or 40 were; returns them all, the unserved one last.
fn stall_downloads(fwd: &Forwarder) -> Vec<TcpStream> {
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let s = connect(fwd.addr());
        (&s).write_all(b"F").unwrap();
        let served = read_exact_timeout(&s, 1, secs(1)).is_ok();
        stalled.push(s);
        if !served {
            break;
        }
    }
    stalled
}

/// Echoes `p` over `pair` (which has moved one byte each way) within `timeout`, closes
/// it, and returns its close line once it says every byte moved.
fn echo_then_close(fwd: &Forwarder, pair: TcpStream, p: Payload, timeout: Duration) -> String {
    echo_then_close_by(fwd, pair, p, timeout, exchange)
}

/// [`echo_then_close`] with the echo made by `echo` (as [`exchange`]).
fn echo_then_close_by(
    fwd: &Forwarder,
    pair: TcpStream,
    p: Payload,
    timeout: Duration,
    echo: fn(&TcpStream, Payload, Instant) -> io::Result<Digested>,
) -> String {
    let got = echo(&pair, p, Instant::now() + timeout)
        .unwrap_or_else(|e| panic!("the pair, out of fds: {e}: {}", fwd.stderr.text()));
    assert_eq!(got, Digested::of(&p), "echoed bytes differ");
    let port = pair.local_addr().unwrap().port().to_string();
    drop(pair);
    let line = fwd
        .stderr
        .wait_for(secs(5), |l| {
            l.contains(" close ")
                && field(l, "client").is_some_and(|c| c.ends_with(&format!(":{port}")))
        })
        .unwrap_or_else(|| panic!("no close line for the pair: {}", fwd.stderr.text()));
    let want = (p.len + 1).to_string();
    assert!(
        field(&line, "bytes_up") == Some(want.as_str())
            && field(&line, "bytes_down") == Some(want.as_str()),
        "{line}"
    );
    line
}

/// [`exchange`], writing the first 8 MiB at 64 KiB a millisecond (at most), then the
/// rest at once: a burst that outruns how soon a busy forwarder looks at its pair
/// would reach the kernel program's cap first (see the test that uses it).
fn exchange_paced_start(s: &TcpStream, p: Payload, deadline: Instant) -> io::Result<Digested> {
    const CHUNK: usize = 64 * KIB as usize;
    const PACED: usize = 8 * MIB as usize;
    exchange_by(s, deadline, move |s| {
        let bytes = p.to_vec();
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            let mut w = s;
            w.write_all(chunk)?;
            if i * CHUNK < PACED {
                thread::sleep(Duration::from_millis(1));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "writing the echo"));
            }
        }
        Ok(())
    })
}

/// Opens idle echo pairs through `fwd` (each checked with a round trip) until one is
/// not answered within 200 ms and the forwarder holds all its 64 fds. Returns the
/// pairs and the client left waiting.
fn fill_fds(fwd: &Forwarder) -> (Vec<TcpStream>, TcpStream) {
    let mut held = Vec::new();
    for _ in 0..64 {
        let s = connect(fwd.addr());
        if ping(&s, b"h", Duration::from_millis(200)).is_err() {
            let fds = std::fs::read_dir(format!("/proc/{}/fd", fwd.pid())).map_or(0, |d| d.count());
            if fds >= 64 {
                return (held, s);
            }
        }
        held.push(s);
    }
    panic!(
        "64 pairs through a forwarder limited to 64 fds: {}",
        fwd.stderr.text()
    );
}

/// Writes to `s` until the path behind it is full (writes have blocked for 300 ms), for
/// at most `limit`; returns the bytes written. Leaves `s` blocking.
fn write_until_blocked(s: &TcpStream, limit: Duration) -> u64 {
    match write_until_blocked_or_cut(s, limit) {
        (written, None) => written,
        (written, Some(e)) => panic!("write after {written} bytes: {e}"),
    }
}

/// [`write_until_blocked`], for a pair a timer may cut first: the write's error, if it
/// failed before the path was full, is returned with the bytes written until then.
fn write_until_blocked_or_cut(s: &TcpStream, limit: Duration) -> (u64, Option<io::Error>) {
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 64 * KIB as usize];
    let (start, mut written, mut blocked_since) = (Instant::now(), 0u64, None);
    let mut failed = None;
    while start.elapsed() < limit {
        match (&*s).write(&chunk) {
            Ok(n) => {
                written += n as u64;
                blocked_since = None;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(300) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    s.set_nonblocking(false).unwrap();
    (written, failed)
}

/// Reads `s` to its end: the bytes read, and how it ended (Ok: a clean EOF).
fn read_to_end_of(s: &TcpStream, timeout: Duration) -> (u64, Result<(), io::ErrorKind>) {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 256 * KIB as usize];
    let mut got = 0;
    loop {
        if let Err(e) = set_read_deadline(s, deadline) {
            return (got, Err(e.kind()));
        }
        match (&*s).read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (got, Err(e.kind())),
        }
    }
}

/// Pairs cut by `max_connection_duration` per round of `cut_mid_stream_loses_nothing`.
const PAIRS: usize = 64;

/// One round of `cut_mid_stream_loses_nothing`: a pair per seed, each upstream
/// reporting on `reports`; returns how many closed cleanly on both ends (each checked).
fn cut_round(
    fwd: &Forwarder,
    reports: &mpsc::Receiver<(u64, (u64, Ending))>,
    seeds: std::ops::Range<u64>,
) -> usize {
    // Staggered, so the cuts fall at different points of the 1 ms cycle.
    let clients: Vec<_> = seeds
        .map(|seed| {
            let addr = fwd.addr();
            let t = thread::spawn(move || {
                let mut c = connect(addr);
                c.write_all(&seed.to_le_bytes()).unwrap();
                read_checked(&c, Payload::new(seed, u64::MAX), secs(15))
            });
            thread::sleep(Duration::from_millis(7));
            (seed, t)
        })
        .collect();
    let mut ups = std::collections::HashMap::new();
    for _ in 0..clients.len() {
        let (seed, report) = reports
            .recv_timeout(secs(20))
            .expect("an upstream's report");
        ups.insert(seed, report);
    }
    let mut clean = 0;
    for (seed, t) in clients {
        let (got, ended) = t.join().unwrap();
        let (acked, up_ended) = ups[&seed];
        assert!(
            got >= 64 * KIB,
            "pair {seed}: only {got} bytes before the cut"
        );
        if (ended, up_ended) == (Ending::Eof, Ending::Eof) {
            clean += 1;
            assert_eq!(
                got, acked,
                "pair {seed}: a clean close after {got} bytes of the {acked} the forwarder acked"
            );
        }
    }
    clean
}

/// Writes `p` in 4 KiB messages, one a millisecond, until the peer closes or
/// `timeout`; returns the bytes the peer's TCP acknowledged and how it closed: `Eof`
/// if its FIN came first (checked before each write), else `Reset`.
fn streamed_until_closed(s: &TcpStream, p: Payload, timeout: Duration) -> (u64, Ending) {
    let deadline = Instant::now() + timeout;
    let mut msg = vec![0u8; 4 * KIB as usize];
    let mut off = 0;
    let ended = loop {
        let mut b = [0u8; 1];
        // SAFETY: a valid fd and buffer; MSG_PEEK leaves the byte where it is.
        let r = unsafe {
            libc::recv(
                s.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match r {
            0 => break Ending::Eof,
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock => {}
            _ => break Ending::Reset,
        }
        assert!(Instant::now() < deadline, "the stream was never cut");
        p.fill(off, &mut msg);
        if (&*s).write_all(&msg).is_err() {
            break Ending::Reset;
        }
        off += msg.len() as u64;
        thread::sleep(Duration::from_millis(1));
    };
    (tcp_bytes_acked(s), ended)
}

/// tcp_info's `tcpi_bytes_acked` (at byte 120 since Linux 4.1).
fn tcp_bytes_acked(s: &TcpStream) -> u64 {
    let mut info = [0u8; 232];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a valid fd, buffer and length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert!(
        r == 0 && len >= 128,
        "TCP_INFO: {}",
        io::Error::last_os_error()
    );
    u64::from_ne_bytes(info[120..128].try_into().unwrap())
}

/// Reads until EOF or a reset (or `timeout`), checking every byte against `p`'s
/// prefix; returns how many came and how the stream ended.
fn read_checked(s: &TcpStream, p: Payload, timeout: Duration) -> (u64, Ending) {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * KIB as usize];
    let mut want = vec![0u8; buf.len()];
    let mut got = 0;
    loop {
        set_read_deadline(s, deadline).expect("the stream was never cut");
        match (&*s).read(&mut buf) {
            Ok(0) => return (got, Ending::Eof),
            Ok(n) => {
                p.fill(got, &mut want[..n]);
                assert!(
                    buf[..n] == want[..n],
                    "bytes {got}..{} differ from what was sent",
                    got + n as u64
                );
                got += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (got, Ending::Reset),
            Err(e) => panic!("after {got} bytes: {e}"),
        }
    }
}

/// Parses an answer-after-EOF server's reply.
fn parse_answer(reply: &[u8]) -> Digested {
    let text = std::str::from_utf8(reply).expect("utf-8 answer");
    let (sha, len) = text
        .trim_end()
        .split_once(' ')
        .unwrap_or_else(|| panic!("bad answer {text:?}"));
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&sha[2 * i..2 * i + 2], 16).expect("hex");
    }
    Digested {
        len: len.parse().expect("count"),
        sha: out,
    }
}

/// Sends `p`, shuts the write side right after the last byte, then reads the answer
/// the server sends only after EOF.
fn half_close_upload(addr: SocketAddr, p: Payload, timeout: Duration) -> Digested {
    let deadline = Instant::now() + timeout;
    let s = connect(addr);
    p.write_to(&s, deadline)
        .unwrap_or_else(|e| panic!("upload: {e}"));
    s.shutdown(Shutdown::Write).expect("shutdown write");
    let reply = read_to_end(&s, 1024, deadline).expect("read answer after EOF");
    parse_answer(&reply)
}

relay_tests! {
    /// A browser-like download: curl through the forwarder from `python3 -m http.server`.
    fn http_download_with_curl(mode) {
        let _load = light();
        let dir = TempDir::new("www");
        let file = Payload::new(7, 20 * MIB + 12345);
        std::fs::write(dir.path().join("blob.bin"), file.to_vec()).unwrap();
        let (_http, upstream, _log) = python_http_server(dir.path(), &[]);

        let fwd = Forwarder::cli(mode, &[upstream]);
        fwd.assert_mode(mode);
        // The response's headers come with the file.
        allow_bulk_escape(&fwd, &[file.len + 1024]);
        let saved = dir.path().join("downloaded.bin");
        let index = dir.path().join("index.html");
        let mut curl = command("curl");
        curl.args(["-sS", "--fail", "--max-time", "60", "-w", "%{http_code} %{size_download}\\n"])
            .arg(format!("http://{}/", fwd.addr()))
            .arg("-o")
            .arg(&index)
            .arg(format!("http://{}/blob.bin", fwd.addr()))
            .arg("-o")
            .arg(&saved);
        let o = run_to_exit(curl, secs(90));
        assert_eq!(o.code(), Some(0), "curl failed: {} {}", o.stdout, o.stderr);
        let listing = std::fs::read_to_string(&index).unwrap();
        assert!(listing.contains("blob.bin"), "directory listing: {listing}");
        let got = std::fs::read(&saved).unwrap();
        assert_eq!(got.len() as u64, file.len, "downloaded size");
        assert_eq!(hex(&sha256(&got)), hex(&file.sha256()), "downloaded sha256");
        let closes = fwd.wait_close_lines(2, secs(5));
        assert!(closes.len() >= 2, "close lines: {closes:?}");
        assert!(
            closes.iter().any(|l| field(l, "bytes_down")
                .and_then(|b| b.parse::<u64>().ok())
                .is_some_and(|b| b > file.len)),
            "no close line counts the download: {closes:?}"
        );
    }

    /// 256 MiB upload; the client shuts its write side right after its last byte and
    /// the server answers (sha256 of what it got) only after EOF.
    fn bulk_upload_256mib_half_close(mode) {
        let _load = heavy();
        let (up, rx) = Server::answer_after_eof();
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        allow_bulk_escape(&fwd, &[256 * MIB]);
        let p = Payload::new(256, 256 * MIB);
        let start = Instant::now();
        let answer = half_close_upload(fwd.addr(), p, secs(90));
        let took = start.elapsed();
        let want = Digested::of(&p);
        assert_eq!(answer, want, "server got different bytes");
        let server_side = rx.recv_timeout(secs(5)).expect("server result").expect("server read");
        assert_eq!(server_side, want);
        println!("256 MiB upload in {took:.2?} ({:.0} MiB/s)", 256.0 / took.as_secs_f64());
        let close = fwd.wait_close_lines(1, secs(5));
        assert!(
            close.first().is_some_and(|l| field(l, "bytes_up") == Some(&p.len.to_string())
                && field(l, "end") == Some("closed")),
            "close line: {close:?}"
        );
    }

    /// 256 MiB download: the server sends, then closes; the client hashes.
    fn bulk_download_256mib(mode) {
        let _load = heavy();
        let p = Payload::new(512, 256 * MIB);
        let up = Server::source(p);
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        allow_bulk_escape(&fwd, &[256 * MIB]);
        let s = connect(fwd.addr());
        let start = Instant::now();
        let got = read_digest(&s, Instant::now() + secs(90)).expect("download");
        let took = start.elapsed();
        drop(s);
        assert_eq!(got, Digested::of(&p), "downloaded bytes differ");
        println!("256 MiB download in {took:.2?} ({:.0} MiB/s)", 256.0 / took.as_secs_f64());
    }

    /// 0, 1 and 65537 bytes through an echo server, each checked by sha256, after a
    /// first one-byte round trip so that even the 0-byte payload's lone FIN travels
    /// on the pair's path (on ebpf: the FIN-only skb the program must drop).
    fn payload_sizes_0_1_65537(mode) {
        let _load = light();
        let up = Server::echo();
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        for (i, len) in [0u64, 1, 65537].into_iter().enumerate() {
            echo_check_paired(fwd.addr(), Payload::new(100 + i as u64, len), secs(20));
        }
        let closes = fwd.wait_close_lines(3, secs(5));
        assert_eq!(closes.len(), 3, "{closes:?}");
        for (l, len) in closes.iter().zip([1u64, 2, 65538]) {
            assert_eq!(field(l, "bytes_up"), Some(len.to_string().as_str()), "{l}");
            assert_eq!(field(l, "bytes_down"), Some(len.to_string().as_str()), "{l}");
        }
    }

    /// 200 connections open at once, each echoing its own data (distinct seed and size).
    fn concurrent_200_distinct_echo(mode) {
        let _load = light();
        let up = Server::echo();
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        let payloads: Vec<Payload> = (0..200)
            .map(|i| Payload::new(10_000 + i, 1000 + i * 1531))
            .collect();
        drive_paired_echo_clients(fwd.addr(), &payloads, Instant::now() + secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(up.accepted(), 200);
    }

    /// A pipe that runs out of slots before bytes: the upstream reads nothing for a
    /// second while the client sends 4 MiB (which fills the pair's buffers and pipe),
    /// then 1,000 one-byte segments with sendfile(2), each byte from a page of its own,
    /// so each stays a fragment of its own in the forwarder's socket and takes a pipe
    /// slot of its own. The forwarder's reads then stop at 256 slots with bytes still
    /// in the socket; such a read must not count as the socket drained, or those bytes
    /// would wait for an event that never comes (the client sends nothing more until
    /// it has its echo). Every byte comes back, in order, before the client's FIN.
    fn a_pipe_out_of_slots_is_not_a_drained_socket(mode) {
        let _load = light();
        const PAGE: usize = 4096;
        const TINY: usize = 1000;
        let up = Server::start(LOCALHOST, |s| {
            thread::sleep(secs(1));
            let _ = echo_stream(&s);
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        // Bulk first: the kernel path may leave for splice at its in-flight bound.
        allow_bulk_escape(&fwd, &[4 * MIB, 4 * MIB]);
        let dir = TempDir::new("pages");
        let pages = Payload::new(41, (TINY * PAGE) as u64).to_vec();
        let path = dir.path().join("pages.bin");
        std::fs::write(&path, &pages).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let blob = Payload::new(40, 4 * MIB).to_vec();
        let mut want = blob.clone();
        want.extend((0..TINY).map(|k| pages[k * PAGE]));

        let s = connect(fwd.addr());
        s.set_nodelay(true).unwrap();
        let reader = {
            let s = s.try_clone().unwrap();
            let total = want.len();
            thread::spawn(move || read_exact_timeout(&s, total, secs(30)))
        };
        (&s).write_all(&blob).expect("bulk write");
        for k in 0..TINY {
            let mut off = (k * PAGE) as libc::off_t;
            // SAFETY: both fds are open for the call; `off` is ours.
            let n = unsafe { libc::sendfile(s.as_raw_fd(), file.as_raw_fd(), &mut off, 1) };
            assert_eq!(n, 1, "sendfile #{k}: {}", io::Error::last_os_error());
        }
        let got = reader
            .join()
            .expect("reader")
            .unwrap_or_else(|e| panic!("the echo of all {} bytes, before the client's FIN: {e}", want.len()));
        assert!(got == want, "the echo differs from what was sent");
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(wait_closed(&s, secs(5)).map(|e| e.0), Ok(Ending::Eof));
        let closes = fwd.wait_close_lines(1, secs(5));
        assert!(closes.len() == 1 && field(&closes[0], "end") == Some("closed"), "{closes:#?}");
    }

    /// The client sends a request and shuts its write side; the server answers only
    /// after it sees EOF. The server says `+` first and the client waits for it, so
    /// the pair is relayed before the request (even an empty one: a FIN alone) leaves
    /// the client: on ebpf a FIN that came before pairing would make it fall back.
    fn half_close_request_response(mode) {
        let _load = light();
        let up = Server::start(LOCALHOST, |mut s| {
            let _ = s.write_all(b"+");
            if let Ok(d) = read_digest(&s, Instant::now() + secs(20)) {
                let _ = s.write_all(format!("{} {}\n", hex(&d.sha), d.len).as_bytes());
                let _ = s.shutdown(Shutdown::Write);
            }
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        for (seed, len) in [(1u64, 0u64), (2, 5), (3, 300 * KIB)] {
            let p = Payload::new(seed, len);
            let deadline = Instant::now() + secs(20);
            let s = connect(fwd.addr());
            let hello = read_exact_timeout(&s, 1, secs(5)).expect("server's +");
            assert_eq!(hello, b"+");
            p.write_to(&s, deadline).expect("request");
            s.shutdown(Shutdown::Write).expect("shutdown write");
            let reply = read_to_end(&s, 1024, deadline).expect("answer after EOF");
            assert_eq!(parse_answer(&reply), Digested::of(&p), "request of {len} bytes");
        }
        let closes = fwd.wait_close_lines(3, secs(5));
        assert!(closes.iter().all(|l| field(l, "end") == Some("closed")), "{closes:#?}");
    }

    /// The upstream speaks first: its greeting reaches a client that has sent nothing.
    fn server_speaks_first(mode) {
        let _load = light();
        const HELLO: &[u8] = b"220 upstream ready, you have not said anything yet\r\n";
        let up = Server::greeting(HELLO);
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        for _ in 0..5 {
            let s = connect(fwd.addr());
            let got = read_exact_timeout(&s, HELLO.len(), secs(3)).expect("greeting");
            assert_eq!(got, HELLO);
            ping(&s, b"EHLO test\r\n", secs(3)).expect("echo after greeting");
            s.shutdown(Shutdown::Write).unwrap();
            assert_eq!(wait_closed(&s, secs(3)).map(|e| e.0), Ok(Ending::Eof));
        }
    }

    /// TCP urgent data (telnet's and FTP's ABOR send it): the client sends `abc`, an
    /// urgent `X` (MSG_OOB), then 256 KiB in one write, and waits. splice stops at the
    /// urgent mark for good: the upstream got `abc` and nothing more, and at the
    /// client's FIN the stream was cut there and passed on as a clean close. Now the
    /// upstream reads every normal byte before the client closes, then EOF: without
    /// the `X` on splice (passed on as urgent, as a direct connection has it), inline
    /// on the kernel path (the program redirects skbs whole, urgent byte and all).
    fn urgent_byte_does_not_cut_the_stream(mode) {
        let _load = light();
        let want = Urgent::normal();
        let (up, rx) = Urgent::server();
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        // splice reads the urgent byte and what follows the mark with recv, once:
        // through our memory. The kernel path redirects it all (no byte in userspace).
        if mode == Mode::Splice {
            fwd.expect_userspace_at_most(Urgent::TAIL as u64 + 1);
        }
        for round in 0..3 {
            let s = connect(fwd.addr());
            Urgent::send(&s);
            let got = rx.recv_timeout(secs(15)).expect("the upstream never reported");
            let plain: Vec<u8> = got.iter().copied().filter(|&b| b != b'X').collect();
            assert!(
                plain == want,
                "round {round}: before the client's FIN the upstream got {} bytes ({:?}...), want abc + {} bytes",
                got.len(),
                String::from_utf8_lossy(&got[..got.len().min(16)]),
                Urgent::TAIL
            );
            if mode == Mode::Splice {
                assert_eq!(got.len(), want.len(), "round {round}: the urgent byte came inline on splice");
            }
            s.shutdown(Shutdown::Write).unwrap();
            let rest = rx.recv_timeout(secs(15)).expect("the upstream saw no EOF");
            assert!(rest.is_empty(), "round {round}: after the FIN: {:?}", String::from_utf8_lossy(&rest));
        }
        let closes = fwd.wait_close_lines(3, secs(5));
        assert!(
            closes.len() == 3 && closes.iter().all(|l| field(l, "end") == Some("closed")),
            "{closes:#?}"
        );
        // The urgent byte counts as one of the bytes relayed, on both paths (splice
        // left it out).
        for l in &closes {
            assert_eq!(field(l, "bytes_up"), Some((want.len() + 1).to_string().as_str()), "{l}");
        }
    }

    /// The only upstream refuses: each client is closed promptly; the forwarder lives on.
    fn upstream_refused(mode) {
        let _load = light();
        let (_reserved, dead) = refused_port(LOCALHOST);
        let mut fwd = Forwarder::cli(mode, &[dead]);
        fwd.assert_mode(mode);
        // No pair is ever relayed: every client ends at connect.
        fwd.expect_pairs(0);
        for i in 0..4 {
            let mut s = connect(fwd.addr());
            let _ = s.write_all(b"anyone there?");
            let (how, after) = wait_closed(&s, secs(3))
                .unwrap_or_else(|e| panic!("client #{i} not closed: {e}"));
            assert!(after < secs(2), "client #{i} closed ({how:?}) only after {after:?}");
        }
        // Each client was handled (accepted, tried, closed, logged) by the forwarder
        // itself, the last one after three failures: the accept loop is alive. (A bare
        // connect would prove nothing: the kernel's backlog completes it.)
        let closes = fwd.wait_close_lines(4, secs(3));
        assert_eq!(closes.len(), 4, "{closes:?}");
        assert!(closes.iter().all(|l| l.contains("end=connect_failed") && field(l, "path") == Some("none")), "{closes:?}");
        fwd.assert_running();
    }

    /// Out of file descriptors (hard limit 64): clients beyond what fits are closed or
    /// wait, the forwarder neither spins nor exits, and serves again once fds free up.
    fn survives_fd_exhaustion(mode) {
        let _load = light();
        let up = Server::echo();
        let mut fwd = forwarder_with_64_fds(mode, up.addr(), &[]);
        fwd.assert_mode(mode);
        // Clients left waiting in the backlog are closed by the test before they are
        // paired: those fall back to splice. The recovery echo must be on the mode. A
        // pair out of fds for a pipe copies through our memory (its byte each way; the
        // recovery echo's 64 KiB if fds are still short).
        fwd.expect_paths(&["splice"]).expect_userspace_at_most(2 * (64 * KIB + 1));
        // Each pair costs at least two fds: 60 pairs cannot all fit. The kernel's
        // backlog completes every connect; what the forwarder cannot take waits there.
        let mut held = Vec::new();
        for i in 0..60 {
            let s = TcpStream::connect_timeout(&fwd.addr(), secs(2))
                .unwrap_or_else(|e| panic!("connect #{i} failed (the backlog holds 4096): {e}"));
            (&s).write_all(b"x").expect("write");
            held.push(s);
        }
        // Count the clients served (their byte echoed) and those left unserved: two
        // looks at each (100 ms), as waiting clients are served when the newest half
        // of them give up, 1 s into the shortage (one look saw none served, in CI:
        // those served were ones it had already looked at).
        let mut served = 0;
        let mut answered = vec![false; held.len()];
        for _ in 0..2 {
            for (s, answered) in held.iter().zip(&mut answered) {
                s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                if !*answered && matches!((&*s).read(&mut [0u8; 1]), Ok(1)) {
                    *answered = true;
                    served += 1;
                }
            }
        }
        assert!(served > 0, "no client was served at all");
        assert!(served < held.len(), "all {} clients were served: the fd limit was never reached", held.len());
        fwd.stderr
            .wait_for(secs(3), |l| l.contains("Too many open files"))
            .unwrap_or_else(|| panic!("no EMFILE in the log ({served} of 60 served): {}", fwd.stderr.text()));
        fwd.assert_running();
        assert!(
            !fwd.log_lines().iter().any(|l| l.contains(" is DOWN")),
            "running out of fds marked the upstream down: {}",
            fwd.stderr.text()
        );
        let cpu_before = fwd.cpu_seconds();
        thread::sleep(secs(1));
        let busy = fwd.cpu_seconds() - cpu_before;
        // Backing off on EMFILE costs a wake-up per 100 ms; a spin would use the core.
        assert!(busy < 0.05, "forwarder used {busy:.3} CPU s in 1 s while out of fds: spinning");
        println!("{served} of 60 clients served while out of fds; {busy:.3} CPU s in 1 s");
        // A client accepted with the last fd waits for one for its upstream, up to
        // connect_timeout (5 s), as those in the backlog wait: it is not dropped at
        // once, and the upstream is not blamed for our EMFILE. (Here the held pairs
        // keep every fd, so such a client's wait ends after connect_timeout.) Only when
        // the waiting clients hold every fd themselves do the newest half give theirs up,
        // so that an older one is served (before, a burst of waiters could starve
        // every client until connect_timeout: "no client was served at all").
        let mut gave_up = Vec::new();
        for l in fwd.log_lines() {
            if l.contains("WARN connect ") {
                assert!(l.contains("ours, not the upstream's"), "the upstream blamed for our EMFILE: {l}");
                if l.contains("the newest half gave theirs up") {
                    gave_up.push(field(&l, "client").unwrap().to_string());
                }
            }
            if l.contains("end=connect_failed") && !gave_up.iter().any(|c| field(&l, "client") == Some(c)) {
                let waited: f64 = field(&l, "duration").and_then(|d| d.trim_end_matches('s').parse().ok()).unwrap();
                assert!(waited >= 4.5, "a client dropped after {waited} s, not connect_timeout: {l}");
            }
        }
        drop(held);
        // Recovered: new clients are served in full.
        let deadline = Instant::now() + secs(10);
        loop {
            let r = std::panic::catch_unwind(|| echo_check_paired(fwd.addr(), Payload::new(77, 64 * KIB), secs(3)));
            if r.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "not serving again after fds were freed");
            thread::sleep(Duration::from_millis(200));
        }
        fwd.assert_running();
    }

    /// A burst out of fds: clients that queued together (the forwarder stopped) are
    /// accepted until the fds run out, and each then waits for one for its upstream.
    /// Then they hold every fd there is, and none comes free: after 1 s the newest
    /// gives its up and an older one is served, instead of all waiting out
    /// connect_timeout (5 s) with none served (CI: 0 of 60). Nothing is blamed on the
    /// upstream.
    fn a_burst_out_of_fds_still_serves(mode) {
        let _load = light();
        let up = Server::echo();
        // On one core (one worker thread) the accept loop takes the whole backlog
        // before any client's task runs: the burst is certain, not a race.
        let mut fwd = forwarder_with_64_fds(mode, up.addr(), &["taskset", "-c", "0"]);
        fwd.assert_mode(mode);
        // Clients still waiting are closed by the test before they are paired. A
        // pair out of fds for a pipe copies its byte each way through our memory.
        fwd.expect_paths(&["splice"]).expect_userspace_at_most(2);
        // SAFETY: kill(2) on the forwarder we started (stopped and continued).
        unsafe { libc::kill(fwd.pid(), libc::SIGSTOP) };
        let clients: Vec<TcpStream> = (0..60).map(|_| connect(fwd.addr())).collect();
        for c in &clients {
            (&*c).write_all(b"x").expect("write");
            c.set_nonblocking(true).unwrap();
        }
        // SAFETY: as above.
        unsafe { libc::kill(fwd.pid(), libc::SIGCONT) };
        // Before, none was served until connect_timeout (5 s).
        let deadline = Instant::now() + Duration::from_millis(4000);
        let mut served = 0;
        while served == 0 && Instant::now() < deadline {
            served = clients.iter().filter(|c| matches!((&**c).read(&mut [0u8; 1]), Ok(1))).count();
            thread::sleep(Duration::from_millis(20));
        }
        let log = fwd.stderr.text();
        assert!(served > 0, "no client of 60 served within 4 s of the burst: {log}");
        fwd.stderr
            .wait_for(secs(3), |l| l.contains("Too many open files"))
            .unwrap_or_else(|| panic!("the burst never ran out of fds: {}", fwd.stderr.text()));
        for l in fwd.log_lines().iter().filter(|l| l.contains("WARN connect ")) {
            assert!(l.contains("ours, not the upstream's"), "the upstream blamed for our EMFILE: {l}");
        }
        println!("{mode:?}: {served} of 60 served within 4 s");
        fwd.assert_running();
    }

    /// Clients waiting for an fd are served as pairs end, none given up while fds keep
    /// coming free: out of fds, a burst of 4 queues behind a waiting client while the
    /// held pairs end one every 300 ms. (The newest waiter used to give its fd up after
    /// 100 ms without a waiter served: audit, a client reset that room was coming for.)
    fn waiting_clients_are_served_as_pairs_end(mode) {
        let _load = light();
        let up = Server::echo();
        let fwd = forwarder_with_64_fds(mode, up.addr(), &[]);
        fwd.assert_mode(mode);
        fwd.expect_paths(&["splice"]).expect_userspace_at_most(2);
        let (mut held, first) = fill_fds(&fwd);
        // SAFETY: kill(2) on the forwarder we started (stopped and continued).
        unsafe { libc::kill(fwd.pid(), libc::SIGSTOP) };
        let mut waiting = vec![first];
        waiting.extend((0..4).map(|_| connect(fwd.addr())));
        // SAFETY: as above.
        unsafe { libc::kill(fwd.pid(), libc::SIGCONT) };
        // The first one's `h` is still to be answered; the others ask with a `w`.
        let waiters: Vec<_> = waiting
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                thread::spawn(move || match i {
                    0 => read_exact_timeout(&s, 1, secs(4)).and_then(|got| {
                        (got == b"h").then_some(()).ok_or_else(|| io::Error::other(format!("got {got:?}")))
                    }),
                    _ => ping(&s, b"w", secs(4)),
                })
            })
            .collect();
        for s in held.drain(..6) {
            drop(s);
            thread::sleep(Duration::from_millis(300));
        }
        for (i, w) in waiters.into_iter().enumerate() {
            let served = w.join().expect("waiter thread");
            assert!(served.is_ok(), "waiting client {i} not served: {served:?}: {}", fwd.stderr.text());
        }
        assert!(!fwd.stderr.text().contains("gave theirs up"), "a waiter gave up: {}", fwd.stderr.text());
    }

    /// Active checks that fail for want of our own fds say nothing of the upstream:
    /// out of fds for 2 s (checks every 200 ms, fall 2), it is not marked DOWN, and the
    /// client left waiting is served once fds come free. (Before, every upstream was,
    /// backups too: audit.)
    fn checks_out_of_fds_mark_no_upstream_down(mode) {
        let _load = light();
        let up = Server::echo();
        let fwd = config_with_64_fds(mode, &rule("r", up.addr(), "check_interval = \"200ms\"\nfall = 2"));
        checks_out_of_fds_say_nothing(mode, &fwd);
    }

    /// The same for an upstream written with an interface name (`[::1%lo]:PORT`): the
    /// name's lookup opens a socket, so out of fds it fails too, and that is ours as
    /// well. (Before the review's fix the waiting clients' connects fell back to DNS
    /// and were failed as "cannot resolve", the upstream's fault; after it, glibc's
    /// if_nametoindex still said ENOENT out of fds, so checks marked the upstream DOWN
    /// and the waiting client ended `connect_failed`: CI.)
    fn out_of_fds_a_scoped_upstream_is_not_blamed(mode) {
        let _load = light();
        let up = Server::echo_on(LOCALHOST6);
        checks_out_of_fds_say_nothing_of(mode, up.addr(), &format!("[::1%lo]:{}", up.addr().port()));
    }

    /// And for an upstream given by name (`localhost:PORT`): out of fds, the resolver
    /// fails with EMFILE too (getaddrinfo's EAI_SYSTEM), which is ours, not the name's.
    fn out_of_fds_a_named_upstream_is_not_blamed(mode) {
        let _load = light();
        let up = Server::echo();
        checks_out_of_fds_say_nothing_of(mode, up.addr(), &format!("localhost:{}", up.addr().port()));
    }

    /// An established pair goes on when the process runs out of fds: on splice a
    /// direction that cannot have a pipe copies through a buffer of ours meanwhile
    /// (before, it waited a second for one and the pair ended `client_error (Too many
    /// open files)`); on the kernel path it needs none. Stalled downloads hold every
    /// pipe (8 MiB their clients do not read) and fill the fds; then the pair echoes
    /// 256 KiB with a half-close, sha256 both ways.
    fn an_established_pair_survives_running_out_of_fds(mode) {
        let _load = light();
        let up = echo_or_bulk(Payload::new(93, 8 * MIB));
        let fwd = forwarder_with_64_fds(mode, up.addr(), &[]);
        fwd.assert_mode(mode);
        // Stalled downloads leave the maps at the bound; once out of fds they, and
        // the pair, may copy through our memory (at most what their clients took).
        fwd.expect_paths(&["ebpf>splice", "splice"]).expect_userspace_at_most(9 * MIB);
        let pair = connect(fwd.addr());
        ping(&pair, b"A", secs(3)).expect("the pair's first round trip");
        let stalled = stall_downloads(&fwd);
        assert!(
            !stalled.is_empty() && stalled.len() < 40,
            "{} stalled downloads never ran the fds out: {}",
            stalled.len(),
            fwd.stderr.text()
        );
        fwd.stderr
            .wait_for(secs(3), |l| l.contains("Too many open files"))
            .unwrap_or_else(|| panic!("not out of fds after {} stalled downloads: {}", stalled.len(), fwd.stderr.text()));
        // Established pairs never end for fds: not the stalled ones either (on the
        // kernel path their leaving failed when it could not have a pipe).
        let closes = fwd.close_lines();
        assert!(closes.is_empty(), "pairs ended while out of fds: {closes:#?}");
        let p = Payload::new(94, 256 * KIB + 1);
        let line = echo_then_close(&fwd, pair, p, secs(20));
        let userspace: u64 = field(&line, "userspace_bytes").and_then(|v| v.parse().ok()).unwrap();
        match mode {
            // Proof that no pipe was had: the bytes crossed our memory.
            Mode::Splice => assert!(userspace > 0, "the pair had pipes: not out of fds? {line}"),
            Mode::Ebpf => assert!(field(&line, "path") == Some("ebpf"), "{line}"),
        }
        drop(stalled);
    }

    /// A pair that moves to splice while the process is out of fds goes on exactly, and
    /// no other pair ends for it: stalled downloads take every fd (as in
    /// `an_established_pair_survives_running_out_of_fds`), then a 16 MiB echo with
    /// `inflight_limit = 2097152` leaves the maps at 512 KiB in flight and goes on
    /// through buffers of ours (`splice::NoPipe`). Whether its leaving's drain found a
    /// pooled pipe is up to timing; `ebpf_only::leaving_without_a_pipe_for_the_drain`
    /// forces the case. The echo holds its first bytes unread for 300 ms, so they pile
    /// up in flight, and the client writes its first 8 MiB at 64 KiB a millisecond: the
    /// pair reaches the in-flight bound about 100 ms before the program's cap (4 x the
    /// limit) at the least, however busy the host. Sent at once, the burst could pass the
    /// cap first (once in CI, on a 2-CPU host running four tests): the pair was then
    /// copied through the program's last resort instead of leaving, path=ebpf, every
    /// byte still exact. (At 65536 the cap was 256 KiB: one run in eight.)
    fn a_pair_leaving_the_maps_out_of_fds_loses_nothing(mode) {
        let _load = light();
        let up = echo_or_bulk_pausing(Payload::new(96, 8 * MIB), Duration::from_millis(300));
        let fwd = config_with_64_fds(mode, &rule("tight", up.addr(), "inflight_limit = 2097152"));
        fwd.assert_mode(mode);
        let p = Payload::new(95, 16 * MIB);
        // Through buffers of ours: at most the whole echo, both ways.
        fwd.expect_paths(&["ebpf>splice"]).expect_userspace_at_most(2 * p.len);
        let pair = connect(fwd.addr());
        ping(&pair, b"A", secs(3)).expect("the pair's first round trip");
        let stalled = stall_downloads(&fwd);
        let ran_out = stalled.len() < 40;
        assert!(ran_out, "40 stalled downloads never ran the fds out: {}", fwd.stderr.text());
        let line = echo_then_close_by(&fwd, pair, p, secs(60), exchange_paced_start);
        // The stalled downloads are all still there.
        let closes = fwd.close_lines();
        assert_eq!(closes.len(), 1, "pairs ended while out of fds: {closes:#?}");
        assert_eq!(field(&line, "end"), Some("closed"), "{line}");
        let userspace: u64 = field(&line, "userspace_bytes").and_then(|v| v.parse().ok()).unwrap();
        // Proof that it ran without pipes: bytes crossed our memory.
        assert!(userspace > 0, "the pair had pipes: not out of fds? {line}");
        if mode == Mode::Ebpf {
            assert_eq!(field(&line, "path"), Some("ebpf>splice"), "{line}");
        }
        drop(stalled);
    }

    /// A reader that stops costs no CPU: 20 clients that read nothing while their
    /// upstreams send 8 MiB each (a paused download) leave their pairs stalled, bytes
    /// queued. On the kernel path such a pair stands at the in-flight bound, leaving the
    /// maps, and used to look at its counters every 1 ms for as long as the reader
    /// stayed away: 0.4-0.5 CPU s in 3 s for 20 pairs (audit), now under 0.1; on
    /// splice none. The bytes are then exact once the readers read.
    fn a_stalled_reader_costs_no_cpu(mode) {
        let _load = heavy();
        const PAIRS: usize = 20;
        let p = Payload::new(91, 8 * MIB);
        let up = Server::start(LOCALHOST, move |c| {
            let _ = (&*c).write_all(&p.to_vec());
            let _ = c.shutdown(Shutdown::Write);
            // Held until the client's EOF (the server's 60 s read timeout bounds it).
            let _ = (&*c).read(&mut [0u8; 1]);
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        // Stalled pairs leave the maps at the bound, and go on in splice.
        fwd.expect_paths(&["ebpf>splice", "ebpf"]);
        let clients: Vec<TcpStream> = (0..PAIRS).map(|_| connect(fwd.addr())).collect();
        // Settle: the queues fill and the pairs reach the bound.
        thread::sleep(secs(2));
        let before = fwd.cpu_seconds();
        thread::sleep(secs(3));
        let busy = fwd.cpu_seconds() - before;
        println!("{mode:?}: {PAIRS} stalled pairs took {busy:.3} CPU s in 3 s");
        assert!(busy < 0.2, "{PAIRS} stalled pairs took {busy:.3} CPU s in 3 s: polling");
        for (i, c) in clients.iter().enumerate() {
            let got = read_to_end(c, p.len as usize + 1, Instant::now() + secs(30))
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert!(got == p.to_vec(), "client {i}: {} bytes, not the {} sent", got.len(), p.len);
        }
    }

    /// The forwarder takes every fd it may: with CAP_SYS_RESOURCE it raises
    /// RLIMIT_NOFILE's hard limit to fs.nr_open (a host whose hard limit is low does
    /// not cap it); without it (this sandbox drops it even for root) it raises the
    /// soft limit to the hard one and says why in a debug line.
    fn raises_fd_limit(mode) {
        let _load = light();
        let up = Server::echo();
        let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("prlimit (util-linux) is required");
        let prefix = [prlimit, "--nofile=1024:4096", "--", "/usr/bin/env", "FORWARDER_LOG=info,forwarder=debug"];
        let fwd = Forwarder::cli_under(&prefix, mode, up.addr());
        fwd.assert_mode(mode);
        echo_check_paired(fwd.addr(), Payload::new(78, 4 * KIB), secs(5));
        let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap().trim().parse().unwrap();
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", fwd.pid())).unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
        let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        // CAP_SYS_RESOURCE is bit 24 of the effective set, which the forwarder inherits.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
        let can_raise_hard = u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0;
        if can_raise_hard {
            assert_eq!(nums, vec![nr_open, nr_open], "{line}");
        } else {
            assert_eq!(nums, vec![4096, 4096], "{line}");
            assert!(
                fwd.stderr.wait_for(secs(1), |l| l.contains("cannot raise RLIMIT_NOFILE's hard limit")).is_some(),
                "no line saying why the hard limit stayed"
            );
        }
        println!("CAP_SYS_RESOURCE: {can_raise_hard}; {line}");
    }

    /// Failover: the first upstream refuses, the second is used.
    fn upstream_failover(mode) {
        let _load = light();
        let (_reserved, dead) = refused_port(LOCALHOST);
        let up = Server::echo();
        let fwd = Forwarder::cli(mode, &[dead, up.addr()]);
        fwd.assert_mode(mode);
        for i in 0..3 {
            echo_check_paired(fwd.addr(), Payload::new(40 + i, 100 * KIB), secs(10));
        }
        let closes = fwd.wait_close_lines(3, secs(5));
        assert_eq!(closes.len(), 3, "{closes:?}");
        for l in &closes {
            assert_eq!(field(l, "upstream"), Some(up.addr().to_string().as_str()), "{l}");
            assert_eq!(field(l, "end"), Some("closed"), "{l}");
        }
    }

    /// The client resets (SO_LINGER 0 + close): the upstream's read fails with
    /// ECONNRESET promptly.
    fn rst_from_client_reaches_upstream(mode) {
        let _load = light();
        let (tx, rx) = mpsc::channel::<(std::io::Result<usize>, Instant)>();
        let up = Server::start(LOCALHOST, move |mut s| {
            let mut buf = [0u8; 1024];
            let _ = s.set_read_timeout(Some(secs(10)));
            // First the hello, then whatever the next read brings.
            for _ in 0..2 {
                let r = s.read(&mut buf);
                let _ = tx.send((r, Instant::now()));
            }
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        let mut c = connect(fwd.addr());
        c.write_all(b"hello").unwrap();
        let (first, _) = rx.recv_timeout(secs(5)).expect("upstream got nothing");
        assert_eq!(first.expect("first read"), 5);
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        let reset_at = Instant::now();
        drop(c);
        let (second, when) = rx.recv_timeout(secs(5)).expect("upstream read did not end");
        let after = when.duration_since(reset_at);
        match second {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("upstream read gave {other:?} instead of ECONNRESET"),
        }
        assert!(after < secs(2), "reset reached the upstream after {after:?}");
        let close = fwd.wait_close_lines(1, secs(3));
        assert!(close.first().is_some_and(|l| l.contains("end=client_")), "{close:?}");
    }

    /// The upstream resets: the client sees a reset (not an EOF) promptly.
    fn rst_from_upstream_reaches_client(mode) {
        let _load = light();
        let (tx, rx) = mpsc::channel::<Instant>();
        let up = Server::start(LOCALHOST, move |mut s| {
            let mut buf = [0u8; 5];
            if s.read_exact(&mut buf).is_ok() {
                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                let _ = tx.send(Instant::now());
                drop(s);
            }
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        let mut c = connect(fwd.addr());
        c.write_all(b"hello").unwrap();
        let (how, _) = wait_closed(&c, secs(5)).expect("client not closed");
        let reset_at = rx.recv_timeout(secs(1)).expect("upstream did not reset");
        let after = reset_at.elapsed();
        assert!(after < secs(2), "client saw {how:?} {after:?} after the upstream reset");
        assert_eq!(how, Ending::Reset, "the upstream's reset reached the client as {how:?}");
        let close = fwd.wait_close_lines(1, secs(3));
        assert!(close.first().is_some_and(|l| l.contains("end=upstream_")), "{close:?}");
    }

    /// An upstream that resets each connection as soon as it accepts it: every client
    /// is reset too, and its close line says `upstream_reset`. A reset that came
    /// before the forwarder saw its connect complete was taken for a failed connect,
    /// and the client got a clean, empty EOF (`end=connect_failed`): 6 to 15 of 30
    /// (audit).
    fn upstream_reset_on_accept_resets_the_client(mode) {
        let _load = light();
        let up = Server::start(LOCALHOST, |s| {
            socket2::SockRef::from(&*s).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        // No pair is ever relayed: each ends before (or as) its relay starts.
        fwd.expect_pairs(0);
        const CLIENTS: usize = 30;
        for i in 0..CLIENTS {
            // (The reset can beat connect() back: CI saw it once in 30 x 2.)
            let how = connect_and_wait_closed(fwd.addr(), secs(5)).unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(how, Ending::Reset, "client {i}: the upstream's reset reached it as {how:?}");
        }
        let close = fwd.wait_close_lines(CLIENTS, secs(5));
        assert_eq!(close.len(), CLIENTS, "{close:#?}");
        for l in &close {
            assert!(field(l, "end").is_some_and(|e| e.starts_with("upstream_reset")), "{l}");
        }
    }

    /// A pair that resets after one direction's FIN was passed on counts the bytes
    /// that moved, not the FIN (which takes a sequence number of its own in TCP's
    /// counters): the client says 1 byte, the upstream answers 2 bytes and FIN, the
    /// client adds 2 and resets; then the client says 3 bytes and FIN, the upstream
    /// answers 2 and resets.
    fn reset_after_a_half_close_counts_bytes_not_the_fin(mode) {
        let _load = light();
        let reset = |s: &TcpStream| socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)).unwrap();
        let (got_tx, got_rx) = mpsc::channel::<Vec<u8>>();
        let fin_down = Server::start(LOCALHOST, move |mut s| {
            let mut buf = [0u8; 3];
            let _ = s.set_read_timeout(Some(secs(10)));
            // The first byte up before the FIN down: a FIN there before the pair is
            // made keeps it off the kernel path.
            if s.read_exact(&mut buf[..1]).is_err() {
                return;
            }
            s.write_all(b"hi").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            if s.read_exact(&mut buf[1..]).is_ok() {
                let _ = got_tx.send(buf.to_vec());
            }
            // Then the client's reset.
            let _ = s.read(&mut buf);
        });
        let (answered_tx, answered_rx) = mpsc::channel::<()>();
        let (seen_tx, seen_rx) = mpsc::channel::<()>();
        let seen_rx = Mutex::new(seen_rx);
        let (abc_tx, abc_rx) = mpsc::channel::<()>();
        let fin_up = Server::start(LOCALHOST, move |mut s| {
            let mut got = vec![0u8; 3];
            let _ = s.set_read_timeout(Some(secs(10)));
            if s.read_exact(&mut got).is_err() {
                return;
            }
            let _ = abc_tx.send(());
            if s.read_to_end(&mut got).is_ok() && got == b"abc" {
                s.write_all(b"ok").unwrap();
                let _ = answered_tx.send(());
                // Reset only once the client has the 2 bytes: an RST drops what is unsent.
                if seen_rx.lock().unwrap().recv_timeout(secs(10)).is_ok() {
                    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                }
            }
        });
        // Download FIN, then the client resets.
        let fwd = Forwarder::cli(mode, &[fin_down.addr()]);
        fwd.assert_mode(mode);
        let mut c = connect(fwd.addr());
        c.set_read_timeout(Some(secs(10))).unwrap();
        c.write_all(b"a").unwrap();
        let mut down = Vec::new();
        c.read_to_end(&mut down).expect("the upstream's 2 bytes and FIN");
        assert_eq!(down, b"hi");
        c.write_all(b"bc").unwrap();
        assert_eq!(got_rx.recv_timeout(secs(10)).expect("the upstream got nothing"), b"abc");
        reset(&c);
        drop(c);
        let close = fwd.wait_close_lines(1, secs(5));
        let l = close.first().unwrap_or_else(|| panic!("no close line: {}", fwd.stderr.text()));
        assert!(field(l, "end").is_some_and(|e| e.starts_with("client_reset")), "{l}");
        assert_eq!((field(l, "bytes_up"), field(l, "bytes_down")), (Some("3"), Some("2")), "{l}");

        // Upload FIN, then the upstream resets.
        let fwd = Forwarder::cli(mode, &[fin_up.addr()]);
        fwd.assert_mode(mode);
        let mut c = connect(fwd.addr());
        c.set_read_timeout(Some(secs(10))).unwrap();
        c.write_all(b"abc").unwrap();
        // The FIN after the bytes arrived: a FIN there before the pair is made keeps it
        // off the kernel path.
        abc_rx.recv_timeout(secs(10)).expect("the upstream got nothing");
        c.shutdown(Shutdown::Write).unwrap();
        answered_rx.recv_timeout(secs(10)).expect("the upstream did not answer");
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).expect("the upstream's 2 bytes");
        assert_eq!(&buf, b"ok");
        seen_tx.send(()).unwrap();
        let (how, _) = wait_closed(&c, secs(5)).expect("client not closed");
        assert_eq!(how, Ending::Reset, "the upstream's reset reached the client as {how:?}");
        let close = fwd.wait_close_lines(1, secs(5));
        let l = close.first().unwrap_or_else(|| panic!("no close line: {}", fwd.stderr.text()));
        assert!(field(l, "end").is_some_and(|e| e.starts_with("upstream_reset")), "{l}");
        assert_eq!((field(l, "bytes_up"), field(l, "bytes_down")), (Some("3"), Some("2")), "{l}");
    }

    /// idle_timeout = 1s: an idle connection is closed within ~3 s; one that sends a
    /// byte every 200 ms is not.
    fn idle_timeout(mode) {
        let _load = light();
        let up = Server::echo();
        let fwd = Forwarder::config(
            Some(mode),
            &format!("[defaults]\nidle_timeout = \"1s\"\n{}", rule("idle", up.addr(), "")),
            1,
        );
        fwd.assert_mode(mode);
        // A pair that keeps talking, every `gap`, is never cut; returns its ping count.
        let talk = |gap: Duration| -> Result<u32, String> {
            let s = connect(fwd.addr());
            let end = Instant::now() + Duration::from_millis(3500);
            let mut n = 0;
            while Instant::now() < end {
                ping(&s, b"k", secs(1)).map_err(|e| format!("after {n} pings: {e}"))?;
                n += 1;
                thread::sleep(gap);
            }
            Ok(n)
        };
        let (often, sparse) = thread::scope(|scope| {
            let often = scope.spawn(|| talk(Duration::from_millis(200)));
            // Close to the timeout: counters that lag must not cut this pair.
            let sparse = scope.spawn(|| talk(Duration::from_millis(750)));
            let idle = connect(fwd.addr());
            ping(&idle, b"first and last", secs(2)).expect("idle conn works at first");
            let (how, after) = wait_closed(&idle, secs(4)).expect("idle connection not closed");
            assert!(after >= Duration::from_millis(800), "closed too early ({after:?})");
            assert!(after <= secs(3), "closed ({how:?}) only after {after:?}");
            (often.join().unwrap(), sparse.join().unwrap())
        });
        let pings = often.expect("active connection was cut");
        assert!(pings >= 10, "only {pings} pings");
        let pings = sparse.expect("connection talking every 750 ms was cut");
        assert!(pings >= 4, "only {pings} pings every 750 ms");
        let closes = fwd.wait_close_lines(1, secs(2));
        assert!(closes.first().is_some_and(|l| l.contains("end=idle_timeout")), "{closes:?}");
    }

    /// idle_timeout on a stalled pair (its reader stopped reading: nothing moves, bytes
    /// wait on the way) ends it like an idle one, on both paths, and with a reset on
    /// both sides: neither may take a cut stream for a complete one. Both directions.
    /// The writer fills the path as fast as it can; a slow one may still be writing
    /// when the timeout comes (what the forwarder has taken from it is not movement:
    /// no byte reaches the stalled reader), and then its write is what meets the reset.
    /// (The kernel path's buffers take 30-75 MB here: at 57 MB/s, a loaded host's
    /// writer was still at it 1.3 s on.)
    fn idle_timeout_resets_a_stalled_pair(mode) {
        let _load = light();
        let upstreams = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fwd = Forwarder::config(
            Some(mode),
            &format!("[defaults]\nidle_timeout = \"1s\"\n{}", rule("stall", upstreams.local_addr().unwrap(), "")),
            1,
        );
        fwd.assert_mode(mode);
        // A stalled bulk pair may have left the kernel path at its in-flight bound.
        fwd.expect_paths(&["ebpf>splice"]);
        for (n, upload) in [(1, true), (2, false)] {
            let what = if upload { "upload" } else { "download" };
            let client = connect(fwd.addr());
            upstreams.set_nonblocking(false).unwrap();
            let (upstream, _) = upstreams.accept().unwrap();
            let (writer, reader) = if upload { (&client, &upstream) } else { (&upstream, &client) };
            let (written, cut) = write_until_blocked_or_cut(writer, secs(20));
            assert!(written > 0, "{what}: nothing written");
            // The timeout, its counters' lag and the bookkeeping: well within 6 s.
            let closes = fwd.wait_close_lines(n, secs(6));
            let close = closes.get(n - 1).unwrap_or_else(|| {
                panic!("{what}: the stalled pair was not ended 6 s after it stalled:\n{}", fwd.stderr.text())
            });
            assert_eq!(field(close, "end"), Some("idle_timeout"), "{what}: {close}");
            let (got, ended) = read_to_end_of(reader, secs(10));
            assert!(got < written, "{what}: the reader got all {written} bytes: nothing was cut");
            assert_eq!(
                ended,
                Err(io::ErrorKind::ConnectionReset),
                "{what}: the reader got {got} of {written} bytes, then this ending"
            );
            // The writer's side: its failed write, or else its next read, meets the reset.
            let writer_saw = match cut {
                Some(e) => e.kind(),
                None => read_to_end_of(writer, secs(10)).1.err().unwrap_or(io::ErrorKind::UnexpectedEof),
            };
            assert!(
                matches!(writer_saw, io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe),
                "{what}: the writer, after {written} bytes, saw {writer_saw:?}, not a reset"
            );
        }
        // A cut is no fault of the kernel's: no ERROR line (the look after a cut once
        // read the counters tcp_disconnect had zeroed as bytes handed over twice).
        let errors: Vec<String> = fwd.log_lines().into_iter().filter(|l| l.contains(" ERROR ")).collect();
        assert!(errors.is_empty(), "{errors:#?}");
    }

    /// max_connections = 2 on the rule: a third client waits (connected, unserved)
    /// until one of the first two closes.
    fn max_connections_per_rule(mode) {
        let _load = light();
        let up = Server::echo();
        let fwd = Forwarder::config(Some(mode), &rule("lim", up.addr(), "max_connections = 2"), 1);
        fwd.assert_mode(mode);
        let addr = fwd.addr();
        let c1 = connect(addr);
        ping(&c1, b"one", secs(3)).unwrap();
        let c2 = connect(addr);
        ping(&c2, b"two", secs(3)).unwrap();
        let mut c3 = connect(addr);
        c3.write_all(b"three").unwrap();
        let early = read_exact_timeout(&c3, 5, Duration::from_millis(1500));
        assert!(early.as_ref().is_err_and(is_timeout), "third client was served: {early:?}");
        assert_eq!(up.accepted(), 2);
        drop(c1);
        let got = read_exact_timeout(&c3, 5, secs(5)).expect("third client served after a close");
        assert_eq!(got, b"three");
        ping(&c2, b"two again", secs(3)).unwrap();
    }

    /// global max_connections = 2 across two rules: a third client on either rule waits
    /// until a connection of the other rule closes.
    fn max_connections_global(mode) {
        let _load = light();
        let up = Server::echo();
        let toml = format!(
            "[global]\nmax_connections = 2\n{}{}",
            rule("a", up.addr(), ""),
            rule("b", up.addr(), "")
        );
        let fwd = Forwarder::config(Some(mode), &toml, 2);
        fwd.assert_mode(mode);
        let (a, b) = (fwd.rule_addr("a"), fwd.rule_addr("b"));
        let c1 = connect(a);
        ping(&c1, b"one", secs(3)).unwrap();
        let c2 = connect(b);
        ping(&c2, b"two", secs(3)).unwrap();
        let mut c3 = connect(a);
        c3.write_all(b"three").unwrap();
        let early = read_exact_timeout(&c3, 5, Duration::from_millis(1500));
        assert!(early.as_ref().is_err_and(is_timeout), "third client was served: {early:?}");
        drop(c2);
        let got = read_exact_timeout(&c3, 5, secs(5)).expect("third client served after a close");
        assert_eq!(got, b"three");
        ping(&c1, b"one again", secs(3)).unwrap();
    }

    /// global max_connections = 1 across two rules: with nothing else open, a client
    /// is served on either rule, again and again. (An accept loop that holds a global
    /// slot while it merely waits for clients starves the other rule.)
    fn max_connections_global_idle_rule_holds_no_slot(mode) {
        let _load = light();
        let up = Server::echo();
        let toml = format!(
            "[global]\nmax_connections = 1\n{}{}",
            rule("a", up.addr(), ""),
            rule("b", up.addr(), "")
        );
        let fwd = Forwarder::config(Some(mode), &toml, 2);
        fwd.assert_mode(mode);
        for (i, r) in ["a", "a", "b", "a", "b", "b"].into_iter().enumerate() {
            let c = connect(fwd.rule_addr(r));
            ping(&c, b"hello", secs(3)).unwrap_or_else(|e| {
                panic!("client #{i} on rule {r} not served with no other connection open: {e}")
            });
            c.shutdown(Shutdown::Write).unwrap();
            wait_closed(&c, secs(3)).expect("closed");
            // Its slot is free once the forwarder has logged the close.
            assert_eq!(fwd.wait_close_lines(i + 1, secs(3)).len(), i + 1);
        }
    }

    /// The upstream reads nothing for 5 s while the client writes as fast as it can:
    /// the client's writes stall once the buffers on the path are full (nothing more
    /// is accepted in the last 2 s), memory stays flat; then the upstream reads
    /// everything and it is intact. On the kernel path the pair must have left the
    /// maps for splice (the in-flight bound), which is what stops the client.
    fn slow_reader_bounded_memory(mode) {
        let _load = heavy();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Mutex::new(gate_rx);
        let (res_tx, res_rx) = mpsc::channel();
        let up = Server::start(LOCALHOST, move |s| {
            // Read nothing until the test opens the gate.
            let _ = gate.lock().unwrap().recv_timeout(secs(30));
            let _ = res_tx.send(read_digest(&s, Instant::now() + secs(60)));
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        if mode == Mode::Ebpf {
            fwd.expect_paths(&["ebpf>splice"]).expect_moved(1);
        }
        let mut s = connect(fwd.addr());
        let p = Payload::new(77, u64::MAX);
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 256 * KIB as usize];
        let mut written = 0u64;
        let mut blocked = 0u32;
        // MemAvailable is system-wide, so other processes move it too: compare medians
        // (before the writes, and over the last 2 s, when every buffer on the path is
        // full) instead of single samples.
        let median = |mut v: Vec<u64>| -> u64 {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let mut baseline = Vec::new();
        for _ in 0..5 {
            baseline.push(mem_available());
            thread::sleep(Duration::from_millis(50));
        }
        let before = median(baseline);
        let rss_before = proc_rss(fwd.pid());
        let mut late_mem = Vec::new();
        let mut lowest = before;
        s.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
        let start = Instant::now();
        let end = start + secs(5);
        let mut buffered_at_1s = None;
        let mut buffered_at_3s = None;
        while Instant::now() < end {
            p.fill(written, &mut buf);
            match s.write(&buf) {
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    written += n as u64;
                }
                Err(e) if is_timeout(&e) => blocked += 1,
                Err(e) => panic!("write after {written} bytes: {e}"),
            }
            let m = mem_available();
            lowest = lowest.min(m);
            if start.elapsed() >= secs(3) {
                late_mem.push(m);
            }
            if buffered_at_1s.is_none() && start.elapsed() >= secs(1) {
                buffered_at_1s = Some(written);
            }
            if buffered_at_3s.is_none() && start.elapsed() >= secs(3) {
                buffered_at_3s = Some(written);
            }
        }
        let late = written - buffered_at_3s.expect("ran 5 s");
        // Only bytes beyond the program's cap could ever be passed to us.
        fwd.expect_userspace_at_most(past_cap(written));
        let fell = before.saturating_sub(median(late_mem));
        let rss_grew = proc_rss(fwd.pid()).saturating_sub(rss_before);
        let mib = |b: u64| b as f64 / MIB as f64;
        println!(
            "slow reader: client wrote {:.1} MiB in 5 s ({:.1} MiB after 1 s, {:.2} MiB in the last 2 s), {blocked} writes timed out; \
             MemAvailable fell by {:.1} MiB (median; {:.1} MiB at the lowest sample); \
             forwarder RSS grew {:.1} MiB; TCP socket memory now {:.1} MiB (system-wide)",
            mib(written),
            mib(buffered_at_1s.unwrap_or(0)),
            mib(late),
            mib(fell),
            mib(before.saturating_sub(lowest)),
            mib(rss_grew),
            mib(tcp_socket_memory()),
        );
        // Every buffer on the path fills within the first second at loopback speed;
        // from then on the upstream's closed window must stop the client.
        assert!(late < MIB, "the client could still write {late} bytes in the last 2 s: not stalled");
        assert!(written < 64 * MIB, "{written} bytes accepted while the upstream read nothing");
        assert!(fell < 128 * MIB, "MemAvailable fell by {fell} bytes");
        // What waits is in the kernel (socket buffers, pipes), never in our memory: the
        // RSS grew by 0.0 MiB in runs on both paths.
        assert!(rss_grew < 8 * MIB, "forwarder RSS grew by {rss_grew} bytes");
        // Now let the upstream read everything.
        gate_tx.send(()).unwrap();
        s.set_write_timeout(Some(secs(30))).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let want = Digested { len: written, sha: hasher.finish() };
        let got = res_rx.recv_timeout(secs(60)).expect("upstream result").expect("upstream read");
        assert_eq!(got, want, "upstream got different bytes");
    }

    /// SIGTERM while a transfer is in flight: it completes intact, new connections are
    /// refused from the signal on, and the forwarder exits 0.
    fn sigterm_drains_inflight_transfer(mode) {
        let _load = light();
        let p = Payload::new(99, 48 * MIB);
        let up = Server::source(p);
        let mut fwd = Forwarder::config(
            Some(mode),
            &format!("[global]\nshutdown_grace = \"10s\"\n{}", rule("drain", up.addr(), "")),
            1,
        );
        fwd.assert_mode(mode);
        allow_bulk_escape(&fwd, &[48 * MIB]);
        let addr = fwd.addr();
        let progress = Arc::new(AtomicU64::new(0));
        let result = thread::scope(|scope| {
            let reader = scope.spawn(|| -> std::io::Result<Digested> {
                // Read at ~40 MiB/s so the transfer spans the signal.
                let mut s = connect(addr);
                let deadline = Instant::now() + secs(30);
                let mut h = Hasher::new();
                let mut len = 0u64;
                let mut buf = vec![0u8; 256 * KIB as usize];
                loop {
                    set_read_deadline(&s, deadline)?;
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    len += n as u64;
                    progress.store(len, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(6));
                }
                Ok(Digested { len, sha: h.finish() })
            });
            let wait_until = Instant::now() + secs(10);
            while progress.load(Ordering::SeqCst) < 4 * MIB && Instant::now() < wait_until {
                thread::sleep(Duration::from_millis(5));
            }
            let at_signal = progress.load(Ordering::SeqCst);
            assert!(at_signal >= 4 * MIB, "transfer did not start");
            fwd.proc.signal(libc::SIGTERM);
            let signalled = Instant::now();
            // The signal is handled asynchronously: from the moment the forwarder says
            // it stopped accepting, every new connection must be refused.
            fwd.stderr
                .wait_for(secs(3), |l| l.contains("shutdown: stopped accepting"))
                .expect("no shutdown line within 3 s of SIGTERM");
            let refused = match std::net::TcpStream::connect_timeout(&addr, secs(1)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(signalled.elapsed()),
                other => panic!("connect after the shutdown line: {other:?}"),
            };
            let refused = refused.expect("new connections still accepted 3 s after SIGTERM");
            assert!(
                progress.load(Ordering::SeqCst) < p.len,
                "transfer finished before the refusal check; nothing was in flight"
            );
            println!("SIGTERM at {at_signal} bytes; refusing new connections after {refused:?}");
            reader.join().unwrap()
        });
        let got = result.expect("in-flight transfer failed");
        assert_eq!(got, Digested::of(&p), "in-flight transfer damaged");
        assert_eq!(up.accepted(), 1, "the upstream saw connections made after SIGTERM");
        let status = fwd.proc.wait_timeout(secs(12)).expect("forwarder did not exit after draining");
        assert_eq!(status.code(), Some(0), "exit {}", describe_status(&status));
        let closes = fwd.close_lines();
        assert!(closes.iter().any(|l| l.contains("end=closed")
            && field(l, "bytes_down") == Some(p.len.to_string().as_str())), "{closes:?}");
    }

    /// A download still running when the shutdown grace ends is cut with a reset on
    /// both sides: the client must not read a clean EOF on a stream cut short. A pair
    /// with nothing in flight then is closed cleanly.
    fn shutdown_grace_cut_resets_the_pair(mode) {
        let _load = light();
        let up = Server::source(Payload::new(98, 256 * MIB));
        let echo = Server::echo();
        let mut fwd = Forwarder::config(
            Some(mode),
            &format!(
                "[global]\nshutdown_grace = \"1s\"\n{}{}",
                rule("cut", up.addr(), ""),
                rule("quiet", echo.addr(), "")
            ),
            2,
        );
        fwd.assert_mode(mode);
        allow_bulk_escape(&fwd, &[256 * MIB]);
        let quiet = connect(fwd.rule_addr("quiet"));
        ping(&quiet, b"nothing in flight after this", secs(5)).unwrap();
        let c = connect(fwd.rule_addr("cut"));
        // Some of the download, then the client stops reading: the rest waits in the
        // buffers on the way (the upstream cannot finish before the grace ends).
        read_exact_timeout(&c, MIB as usize, secs(10)).expect("the download's first MiB");
        fwd.proc.signal(libc::SIGTERM);
        let status = fwd.proc.wait_timeout(secs(10)).expect("forwarder did not exit after the grace");
        assert_eq!(status.code(), Some(0), "exit {}", describe_status(&status));
        // What was buffered for the client may still be read; then a reset, not an EOF.
        let (rest, ended) = read_to_end_of(&c, secs(30));
        let got = MIB + rest;
        assert!(got < 256 * MIB, "the whole download arrived: nothing was cut");
        assert_eq!(ended, Err(std::io::ErrorKind::ConnectionReset), "after {got} bytes");
        let (ending, _) = wait_closed(&quiet, secs(5)).expect("the quiet pair's close");
        assert_eq!(ending, Ending::Eof, "the quiet pair");
        let closes = fwd.close_lines();
        assert_eq!(closes.iter().filter(|l| field(l, "end") == Some("shutdown")).count(), 2, "{closes:?}");
    }

    /// Pairs cut by `max_connection_duration` while their upstreams stream 4 KiB every
    /// millisecond: each ends in a reset, or in a clean FIN to both ends, and then every
    /// byte the forwarder's TCP acknowledged from the upstream reached the client, in
    /// order (a reset told the upstream; a FIN told it nothing was lost). On the kernel
    /// path bytes the program had taken from TCP were dropped at close, with a FIN,
    /// in about 1 pair in 25 (see `CutCheck` in relay/ebpf/pair.rs); 64 pairs make
    /// that show in nearly every run.
    fn cut_mid_stream_loses_nothing(mode) {
        let _load = light();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let up = Server::start(LOCALHOST, move |mut s| {
            let mut id = [0u8; 8];
            if s.read_exact(&mut id).is_err() {
                return;
            }
            let seed = u64::from_le_bytes(id);
            let report = streamed_until_closed(&s, Payload::new(seed, u64::MAX), secs(15));
            let _ = tx.lock().unwrap().send((seed, report));
        });
        let fwd = Forwarder::config(
            Some(mode),
            &rule("cut", up.addr(), "max_connection_duration = \"1s\""),
            1,
        );
        fwd.assert_mode(mode);
        // A client slowed by a loaded host lets the pair reach the in-flight bound and
        // leave the maps before its cut (seen in CI): its cut is then splice's, checked
        // the same. Most are cut on the kernel path (asserted below).
        fwd.expect_paths(&["ebpf>splice"]);
        // Rounds until one has a clean close to check (not vacuous): most cuts fall
        // between two messages, but on a loaded host the last one is often unacked.
        let mut rounds = 0;
        let mut clean = 0;
        while clean == 0 {
            assert!(rounds < 3, "no pair closed cleanly in {rounds} rounds of {PAIRS}");
            let seeds = rounds * PAIRS as u64..(rounds + 1) * PAIRS as u64;
            clean = cut_round(&fwd, &rx, seeds);
            rounds += 1;
            println!("{clean} of {PAIRS} pairs closed cleanly, the rest reset");
        }
        let n = rounds as usize * PAIRS;
        fwd.wait_close_lines(n, secs(5));
        let closes = fwd.close_lines();
        let cut = closes
            .iter()
            .filter(|l| field(l, "end") == Some("max_connection_duration"))
            .count();
        assert_eq!(cut, n, "{closes:?}");
        let on_mode = closes.iter().filter(|l| field(l, "path") == Some(mode.as_str())).count();
        assert!(on_mode * 4 >= n, "only {on_mode} of {n} pairs were cut on {mode:?}: {closes:?}");
    }

    /// A second signal during the drain exits at once, even with connections open.
    fn second_signal_exits_at_once(mode) {
        let _load = light();
        let up = Server::echo();
        let mut fwd = Forwarder::config(
            Some(mode),
            &format!("[global]\nshutdown_grace = \"60s\"\n{}", rule("twice", up.addr(), "")),
            1,
        );
        fwd.assert_mode(mode);
        // One pair served and closed before the signals (its close line is checked).
        echo_check_paired(fwd.addr(), Payload::new(61, 100 * KIB), secs(10));
        fwd.wait_close_lines(1, secs(3));
        let c = connect(fwd.addr());
        ping(&c, b"open", secs(3)).unwrap();
        fwd.proc.signal(libc::SIGTERM);
        fwd.stderr
            .wait_for(secs(5), |l| l.contains("shutdown"))
            .expect("no shutdown line after SIGTERM");
        // The open connection keeps the forwarder draining.
        assert!(fwd.proc.wait_timeout(Duration::from_millis(500)).is_none(), "exited without draining");
        ping(&c, b"still served while draining", secs(3)).unwrap();
        fwd.proc.signal(libc::SIGINT);
        let t = Instant::now();
        let status = fwd.proc.wait_timeout(secs(3)).expect("second signal did not end the forwarder");
        let took = t.elapsed();
        println!("second signal: {} after {took:.2?}", describe_status(&status));
        // A requested stop, not a crash: exit 0, and well before the 60 s grace.
        assert_eq!(status.code(), Some(0), "exit {}", describe_status(&status));
        assert!(took < secs(2), "second signal took {took:?}");
        assert!(fwd.stderr.wait_for(secs(1), |l| l.contains("second signal, exiting now")).is_some());
        // The open connection was closed by the exit.
        wait_closed(&c, secs(3)).expect("open connection not closed by the exit");
    }

    /// What the second signal cuts is cut as at the grace's end: an upload in flight
    /// reaches its upstream as a reset (the process's exit alone closes a socket with
    /// nothing unread with a FIN, and the cut upload read as complete), and every pair
    /// it ends gets its close line.
    fn second_signal_resets_and_logs_what_it_cuts(mode) {
        let _load = light();
        let echo = Server::echo();
        let upstreams = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut fwd = Forwarder::config(
            Some(mode),
            &format!(
                "[global]\nshutdown_grace = \"60s\"\n{}{}",
                rule("quiet", echo.addr(), ""),
                rule("stuck", upstreams.local_addr().unwrap(), "")
            ),
            2,
        );
        fwd.assert_mode(mode);
        fwd.expect_paths(&["ebpf>splice"]);
        let quiet = connect(fwd.rule_addr("quiet"));
        ping(&quiet, b"open, nothing in flight", secs(3)).unwrap();
        let client = connect(fwd.rule_addr("stuck"));
        let (upstream, _) = upstreams.accept().unwrap();
        // The upstream reads nothing: the upload waits on the way.
        let written = write_until_blocked(&client, secs(20));
        fwd.proc.signal(libc::SIGTERM);
        fwd.stderr
            .wait_for(secs(5), |l| l.contains("shutdown: stopped accepting"))
            .expect("no shutdown line after SIGTERM");
        fwd.proc.signal(libc::SIGTERM);
        let status = fwd.proc.wait_timeout(secs(3)).expect("second signal did not end the forwarder");
        assert_eq!(status.code(), Some(0), "exit {}", describe_status(&status));
        let (got, ended) = read_to_end_of(&upstream, secs(10));
        assert!(got < written, "the upstream got all {written} bytes: nothing was cut");
        assert_eq!(
            ended,
            Err(io::ErrorKind::ConnectionReset),
            "the upstream got {got} of {written} bytes, then this ending"
        );
        let (ending, _) = wait_closed(&quiet, secs(3)).expect("the quiet pair's close");
        assert_eq!(ending, Ending::Eof, "the quiet pair, with nothing in flight");
        fwd.stderr.wait_eof(secs(5));
        let closes = fwd.close_lines();
        for rule in ["quiet", "stuck"] {
            assert!(
                closes.iter().any(|l| field(l, "rule") == Some(rule) && field(l, "end") == Some("shutdown")),
                "no end=shutdown close line for {rule}: {closes:#?}"
            );
        }
    }

    /// Half-close 20 times: 4 MiB up, write side shut right after the last byte, the
    /// server's answer (after EOF) names exactly those bytes.
    fn half_close_repeated_20x4mib(mode) {
        let _load = light();
        let (up, _rx) = Server::answer_after_eof();
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        // A bulk transfer may outrun the kernel's redirect worker and leave the maps for
        // splice at its in-flight bound; it never needs to move a byte through us.
        fwd.expect_paths(&["ebpf>splice"]);
        for i in 0..20 {
            let p = Payload::new(2000 + i, 4 * MIB + i);
            let got = half_close_upload(fwd.addr(), p, secs(20));
            assert_eq!(got, Digested::of(&p), "round {i}");
        }
    }

    /// close() right after write(), 20 times: the server still receives every byte.
    fn close_right_after_write_20x4mib(mode) {
        let _load = light();
        let (up, rx) = Server::recorder();
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        // A bulk transfer may outrun the kernel's redirect worker and leave the maps for
        // splice at its in-flight bound; it never needs to move a byte through us.
        fwd.expect_paths(&["ebpf>splice"]);
        for i in 0..20 {
            let p = Payload::new(3000 + i, 4 * MIB + 3 * i);
            let s = connect(fwd.addr());
            p.write_to(&s, Instant::now() + secs(20)).expect("write");
            drop(s);
            let got = rx
                .recv_timeout(secs(20))
                .unwrap_or_else(|_| panic!("round {i}: server saw no EOF"))
                .unwrap_or_else(|e| panic!("round {i}: server read failed: {e}"));
            assert_eq!(got, Digested::of(&p), "round {i}");
        }
    }

    /// Both directions at full speed at once, each side shutting its write side when
    /// its last byte is out (which FIN comes first varies): 4 pairs at a time, 4
    /// rounds, 32 MiB each way, sha256 both ways. On the kernel path this once lost
    /// megabytes: the first FIN, redirected alone, disabled the other socket's psock.
    fn simultaneous_bidirectional_4x4x32mib(mode) {
        let _load = heavy();
        const LEN: u64 = 32 * MIB;
        let down = Payload::new(4100, LEN);
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let up = Server::start(LOCALHOST, move |s| {
            let deadline = Instant::now() + secs(60);
            let got = thread::scope(|t| {
                t.spawn(|| {
                    if down.write_to(&s, deadline).is_ok() {
                        let _ = s.shutdown(Shutdown::Write);
                    }
                });
                read_digest(&s, deadline)
            });
            let _ = tx.lock().unwrap().send(got);
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        // Each client uploads 32 MiB + i (i < 4) and downloads 32 MiB.
        allow_bulk_escape(&fwd, &[LEN + 3, LEN]);
        for round in 0..4u64 {
            let results: Vec<(Payload, io::Result<Digested>)> = thread::scope(|t| {
                let clients: Vec<_> = (0..4u64)
                    .map(|i| {
                        let p = Payload::new(4200 + round * 4 + i, LEN + i);
                        let addr = fwd.addr();
                        t.spawn(move || {
                            let deadline = Instant::now() + secs(60);
                            let s = connect(addr);
                            let got = thread::scope(|t2| {
                                t2.spawn(|| {
                                    p.write_to(&s, deadline).expect("upload");
                                    s.shutdown(Shutdown::Write).expect("shutdown write");
                                });
                                read_digest(&s, deadline)
                            });
                            (p, got)
                        })
                    })
                    .collect();
                clients.into_iter().map(|c| c.join().unwrap()).collect()
            });
            let mut uploads = Server::reports(&rx, 4, secs(60));
            for (p, got) in results {
                let got = got.unwrap_or_else(|e| panic!("round {round}: download: {e}"));
                assert_eq!(got, Digested::of(&down), "round {round}: download");
                let want = Digested::of(&p);
                let pos = uploads.iter().position(|d| *d == want).unwrap_or_else(|| {
                    panic!("round {round}: upload of {want} not received intact; server got {uploads:?}")
                });
                uploads.remove(pos);
            }
        }
    }

    /// 1,000 connection pairs open at once, 1 MiB each way per pair, sha256 checked.
    fn thousand_concurrent_pairs_1mib(mode) {
        let _load = heavy();
        let nofile = raise_nofile();
        assert!(nofile >= 4000, "RLIMIT_NOFILE {nofile} is too low for 1000 pairs");
        let up = Server::echo();
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        // A bulk transfer may outrun the kernel's redirect worker and leave the maps for
        // splice at its in-flight bound; it never needs to move a byte through us.
        fwd.expect_paths(&["ebpf>splice"]);
        let payloads: Vec<Payload> = (0..1000).map(|i| Payload::new(50_000 + i, MIB)).collect();
        let start = Instant::now();
        drive_paired_echo_clients(fwd.addr(), &payloads, Instant::now() + secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        println!("1000 x 1 MiB echoed in {:.2?}", start.elapsed());
        assert_eq!(up.accepted(), 1000);
        let closes = fwd.wait_close_lines(1000, secs(10));
        assert_eq!(closes.len(), 1000);
        assert!(closes.iter().all(|l| l.contains("end=closed")), "{:?}",
            closes.iter().find(|l| !l.contains("end=closed")));
    }

    /// Idle pairs cost nothing: as many as this host's fd limit allows (10,000, or
    /// fewer: the hard RLIMIT_NOFILE here is 20,000 and cannot be raised without
    /// CAP_SYS_RESOURCE), each having said one thing each way, then silence. Over 3 s
    /// the forwarder uses no CPU (splice: an idle pair wakes nobody; ebpf: a quiet pair
    /// sleeps until the program wakes it; sockmap's spurious EPOLLIN must not make it
    /// spin either), holds its two sockets and no more fds (the kernel path watches
    /// every pair in one shared epoll set), and every pair still answers afterwards.
    fn idle_pairs_do_not_spin(mode) {
        let _load = heavy();
        let nofile = raise_nofile();
        // Both ends of a pair live in this process (client and echo server); the
        // forwarder holds up to 3 fds a pair.
        let n = 10_000.min((nofile as usize).saturating_sub(500) / 3);
        assert!(n >= 1000, "RLIMIT_NOFILE {nofile} is too low for this test");
        let up = Server::echo();
        let toml = format!(
            "[global]\nmax_connections = 20000\n{}",
            rule("idle", up.addr(), "max_connections = 20000")
        );
        let fwd = Forwarder::config(Some(mode), &toml, 1);
        fwd.assert_mode(mode);
        let fds = |pid: i32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let (fds_before, rss_before) = (fds(fwd.pid()), proc_rss(fwd.pid()));
        let conns: Vec<TcpStream> = (0..n)
            .map(|i| {
                let s = connect(fwd.addr());
                ping(&s, b"!", secs(10)).unwrap_or_else(|e| panic!("pair {i}: {e}"));
                s
            })
            .collect();
        // Let the control loops go quiet first.
        thread::sleep(Duration::from_millis(1000));
        let before = fwd.cpu_seconds();
        thread::sleep(secs(3));
        let used = fwd.cpu_seconds() - before;
        let fds_per_pair = (fds(fwd.pid()) - fds_before) as f64 / n as f64;
        let rss_per_pair = proc_rss(fwd.pid()).saturating_sub(rss_before) / n as u64;
        println!(
            "{n} idle pairs: forwarder used {used:.3} CPU s in 3 s ({:.2}% of a core), {fds_per_pair:.2} fds and {rss_per_pair} B of RSS a pair",
            used / 3.0 * 100.0
        );
        // 1% of a core for 10,000 pairs; a pool of empty pipes (at most 128) on top.
        assert!(used < 0.03, "{used:.3} CPU seconds in 3 s with {n} idle pairs");
        assert!(fds_per_pair <= 2.1, "{fds_per_pair:.2} fds per idle pair");
        // Measured here 1,969 B (splice) and 1,983 B (ebpf), the issue's 2 KiB; the
        // ebpf pair was 2.5 KB before its future lost a dead copy of its state, and
        // 4.4-5.4 KB before the pair state was slimmed. 2.25 KiB catches a return to
        // either without failing on allocator noise.
        assert!(rss_per_pair <= 2 * KIB + KIB / 4, "{rss_per_pair} B of RSS per idle pair");
        for (i, s) in conns.iter().enumerate().step_by(97) {
            ping(s, format!("still there {i}").as_bytes(), secs(10)).expect("echo after idle");
        }
    }

    /// A process whose pairs are all gone sleeps: no thread of it runs for 3 s (a
    /// periodic task would show as context switches). The kernel path's lost-wake-up
    /// check ticked once a second with no pair at all before it learned to wait for one.
    fn no_pairs_no_wakeups(mode) {
        let _load = light();
        let up = Server::echo();
        let fwd = Forwarder::cli_listen(mode, "127.0.0.1:0", &[up.addr().to_string()]);
        fwd.assert_mode(mode);
        {
            let s = connect(fwd.addr());
            ping(&s, b"one pair, then none", secs(10)).expect("echo");
        }
        assert_eq!(fwd.wait_close_lines(1, secs(10)).len(), 1, "no close line");
        // Whatever the pair's end set in motion (a last tick, a stored wake-up) is over
        // well within this.
        thread::sleep(Duration::from_millis(1500));
        let before = fwd.context_switches();
        thread::sleep(secs(3));
        let woke = fwd.context_switches() - before;
        println!("{mode:?}: {woke} context switches in 3 s with no pair");
        // Measured 0 in every mode (8-9 in 4 s on the kernel path before).
        assert!(woke <= 1, "{woke} context switches in 3 s with no pair: something ticks");
    }

    /// A retransmitted segment that overlaps bytes the forwarder already received, as a
    /// lossy link makes a sender send, reaches the upstream once: a raw-socket client
    /// (tests/overlap_client.py) sends 40,000 bytes as four segments: the second repeats
    /// 10,000 bytes of the first, the last repeats the third (10,000 bytes) with a FIN,
    /// the only new thing in it. TCP queues such segments whole, and the
    /// kernel path is handed whole skbs (`tcp_read_skb`): its program must cut the head
    /// off (CI saw 65,176 bytes reach a peer twice this way on loopback).
    fn overlapping_retransmit_reaches_upstream_once(mode) {
        let _load = light();
        let ns = NetNs::new();
        // The kernel knows no socket for the raw client's port and would reset the
        // connection on the forwarder's SYN-ACK.
        ns.nft_rule("output", &["tcp", "sport", "40000", "tcp", "flags", "rst", "drop"]);
        let (up, got) = ns.run(Server::recorder);
        let args: Vec<OsString> = ["run", "--listen", "127.0.0.1:4000", "--upstream", &up.addr().to_string(), "--mode", mode.as_str()]
            .iter()
            .map(OsString::from)
            .collect();
        let fwd = Proc::spawn("forwarder", &args, Some(&ns), &[("FORWARDER_LOG", "info,forwarder=debug")], None);
        fwd.expect_line("listening", secs(10), |l| l.contains(" listening "));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/overlap_client.py");
        let sent = ns.exec("python3", &[script, "127.0.0.1", "4000", "40000"]);
        let sha = sent.trim().rsplit(' ').next().unwrap_or_default().to_string();
        assert!(sent.starts_with("sent 40000 bytes, overlap 20000, sha256 "), "client: {sent}");
        let upstream = got.recv_timeout(secs(10)).expect("upstream got nothing").expect("upstream read");
        assert_eq!((upstream.len, hex(&upstream.sha)), (40000, sha), "what the upstream received");
        let close = fwd.expect_line("close", secs(5), |l| l.contains(" close "));
        assert_eq!(field(&close, "path"), Some(mode.as_str()), "{close}");
        assert_eq!(field(&close, "bytes_up"), Some("40000"), "{close}");
        if mode == Mode::Ebpf {
            // The bytes went through the program (none through userspace), which cut
            // exactly the repeated head, every segment's sequence number read.
            assert_eq!(field(&close, "userspace_bytes"), Some("0"), "{close}");
            // (The other pair is the startup probe's.)
            let done = fwd.matching(|l| l.contains("ebpf pair done"));
            assert!(
                done.iter().any(|l| l.contains("up redirected=40000 passed=0 trimmed=20000 untrimmed=0 seq_unknown=0,")),
                "{done:?}"
            );
        }
    }

    /// A lossy link costs no byte: with 2% of the TCP packets that reach the forwarder
    /// dropped (the client's and the upstream's, so every socket of the pair sees
    /// retransmits), four 32 MiB echoes come back exact, half-close included. On the
    /// kernel path the in-flight bound is raised so the pairs stay there throughout.
    fn lossy_link_costs_no_byte(mode) {
        // 128 MiB each way: a bulk test, run alone like the others.
        let _load = heavy();
        let ns = NetNs::new();
        let drop = ["iifname", &ns.ns_if, "meta", "l4proto", "tcp", "numgen", "random", "mod", "100", "<", "2", "counter", "drop"];
        ns.nft_rule("input", &drop);
        let up = Server::echo_on(std::net::IpAddr::V4(ns.host_ip()));
        let listen = SocketAddr::new(std::net::IpAddr::V4(ns.ns_ip()), 4000);
        let dir = TempDir::new("lossy");
        let toml = format!(
            "[defaults]\nmode = \"{}\"\ninflight_limit = 1073741824\n[[rule]]\nlisten = \"{listen}\"\nupstream = \"{}\"\n",
            mode.as_str(),
            up.addr()
        );
        let config = dir.write("forwarder.toml", &toml);
        let args: Vec<OsString> = vec!["run".into(), "--config".into(), config.into()];
        let fwd = Proc::spawn("forwarder", &args, Some(&ns), &[], Some(dir));
        fwd.expect_line("listening", secs(10), |l| l.contains(" listening "));
        for seed in 0..4 {
            echo_check_paired(listen, Payload::new(seed, 32 * MIB), secs(60));
        }
        let closes = fwd.wait_close_lines(4, secs(5));
        assert_eq!(closes.len(), 4, "{closes:?}");
        for l in &closes {
            assert_eq!(field(l, "path"), Some(mode.as_str()), "{l}");
            assert_eq!(field(l, "end"), Some("closed"), "{l}");
            assert_eq!(field(l, "userspace_bytes"), Some("0"), "{l}");
        }
        let counted = ns.exec("nft", &["list", "chain", "inet", "t", "input"]);
        let dropped: u64 = counted
            .split("counter packets ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        println!("{mode:?}: {dropped} packets dropped");
        assert!(dropped > 0, "the link lost nothing: {counted}");
    }

    /// IPv6 link-local addresses scoped by interface name, as `ip addr` shows them
    /// (`[fe80::77%IF]:PORT`), for the listener and the upstream: a 1 MiB echo through
    /// them is exact both ways, half-close included. (std parses only a numeric scope,
    /// and the name was refused as "not an IPv6 address in brackets".) Inside a
    /// namespace of the test's own, on its veth.
    fn link_local_by_interface_name(mode) {
        let _load = light();
        let ns = NetNs::new();
        ns.exec("ip", &["addr", "add", "fe80::77/64", "dev", &ns.ns_if, "nodad"]);
        let index: u32 = ns
            .exec("cat", &[&format!("/sys/class/net/{}/ifindex", ns.ns_if)])
            .trim()
            .parse()
            .expect("the veth's index");
        let scoped = |port| SocketAddr::V6(std::net::SocketAddrV6::new("fe80::77".parse().unwrap(), port, 0, index));
        let up = ns.run(|| {
            Server::start_at(scoped(0), |s| {
                let _ = echo_stream(&s);
            })
        });
        let by_name = |port: u16| format!("[fe80::77%{}]:{port}", ns.ns_if);
        let args: Vec<OsString> = ["run", "--listen", &by_name(4000), "--upstream", &by_name(up.addr().port()), "--mode", mode.as_str()]
            .iter()
            .map(OsString::from)
            .collect();
        let fwd = Proc::spawn("forwarder", &args, Some(&ns), &[], None);
        let listening = fwd.expect_line("listening", secs(10), |l| l.contains(" listening "));
        assert!(listening.contains(&format!("%{index}]:4000")), "{listening}");
        ns.run(|| echo_check_paired(scoped(4000), Payload::new(77, MIB), secs(20)));
        let close = fwd.expect_line("close", secs(5), |l| l.contains(" close "));
        assert_eq!(field(&close, "end"), Some("closed"), "{close}");
        let bytes = |k| field(&close, k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // The payload, plus the byte each way that checks the pair is made.
        assert_eq!((bytes("bytes_up"), bytes("bytes_down")), (MIB + 1, MIB + 1), "{close}");
        assert_eq!(field(&close, "path"), Some(mode.as_str()), "{close}");
    }

    /// `tcp_keepalive` ends a pair whose peer went silent for good, on either side, and
    /// resets the other side; a pair without it (and with `idle_timeout = "0s"`)
    /// outlives the same outage and carries bytes after it. The dead peers sit in a
    /// namespace that drops every packet in and out (nftables): an upstream, and a
    /// client. (Not `blackhole()`: a probe dropped by our own qdisc is local congestion
    /// to TCP, which tries again every 500 ms and never counts it.)
    fn tcp_keepalive_ends_pairs_with_a_dead_peer(mode) {
        let _load = light();
        let ns = NetNs::new();
        let far = ns.run(|| Server::echo_on(std::net::IpAddr::V4(ns.ns_ip())));
        let near = Server::echo();
        let (far, near, host) = (far.addr(), near.addr(), ns.host_ip());
        let rules = [
            ("dead_upstream", "127.0.0.1:0".to_string(), far, "tcp_keepalive = \"1s\"\n"),
            ("no_keepalive", "127.0.0.1:0".to_string(), far, ""),
            ("dead_client", format!("{host}:0"), near, "tcp_keepalive = \"1s\"\n"),
        ];
        let mut toml = "[defaults]\nidle_timeout = \"0s\"\n".to_string();
        for (name, listen, upstream, extra) in &rules {
            toml += &format!("[[rule]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n{extra}");
        }
        let fwd = Forwarder::config(Some(mode), &toml, rules.len());
        let round_trip = |s: &TcpStream, seed: u64| ping(s, &Payload::new(seed, 4096).to_vec(), secs(10));
        let dead_upstream = TcpStream::connect(fwd.rule_addr("dead_upstream")).unwrap();
        let no_keepalive = TcpStream::connect(fwd.rule_addr("no_keepalive")).unwrap();
        let dead_client_at = fwd.rule_addr("dead_client");
        let dead_client = ns.run(|| TcpStream::connect(dead_client_at)).unwrap();
        for (i, s) in [&dead_upstream, &no_keepalive, &dead_client].into_iter().enumerate() {
            round_trip(s, i as u64).unwrap();
        }
        // From the last packet: the rules below take a moment (a probe answered then
        // only moves the end later).
        let cut = Instant::now();
        ns.nft_rule("input", &["drop"]);
        ns.nft_rule("output", &["drop"]);
        // Idle 1 s, then 4 probes a second apart: about 5 s.
        let ended = fwd.wait_close_lines(2, secs(15));
        let took = cut.elapsed();
        println!("{mode:?}: keepalive ended {} pairs in {took:?}: {ended:?}", ended.len());
        let end_of = |rule: &str| {
            let line = ended.iter().find(|l| field(l, "rule") == Some(rule));
            line.and_then(|l| field(l, "end")).map(str::to_string)
        };
        assert_eq!(end_of("dead_upstream").as_deref(), Some("upstream_timed_out"), "{ended:?}");
        assert_eq!(end_of("dead_client").as_deref(), Some("client_timed_out"), "{ended:?}");
        assert!(took >= secs(4), "ended before the probes could have failed: {took:?}");
        // The dead upstream's client was reset, not given a clean EOF.
        let mut byte = [0u8; 1];
        dead_upstream.set_read_timeout(Some(secs(10))).unwrap();
        let got = (&dead_upstream).read(&mut byte);
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "the client of a dead upstream read {got:?}"
        );
        thread::sleep(secs(1));
        ns.exec("nft", &["delete", "table", "inet", "t"]);
        // The pair without keepalive is still there, both ways.
        round_trip(&no_keepalive, 7).unwrap();
        assert_eq!(fwd.close_lines().len(), 2, "{:?}", fwd.close_lines());
        drop(no_keepalive);
        let all = fwd.wait_close_lines(3, secs(5));
        let last = all.iter().find(|l| field(l, "rule") == Some("no_keepalive"));
        assert_eq!(last.and_then(|l| field(l, "end")), Some("closed"), "{all:?}");
    }

    /// IPv6: listen on [::1], forward to an upstream on [::1].
    fn ipv6_loopback(mode) {
        let _load = light();
        let up = Server::echo_on(LOCALHOST6);
        let fwd = Forwarder::cli_listen(mode, "[::1]:0", &[up.addr().to_string()]);
        fwd.assert_mode(mode);
        // 3 MiB at full speed can reach the in-flight bound (a quarter of 4 MiB) and
        // leave the maps; under the program's cap nothing goes through userspace.
        fwd.expect_paths(&["ebpf>splice"]);
        assert!(fwd.addr().is_ipv6(), "{}", fwd.listening[0].line);
        echo_check_paired(fwd.addr(), Payload::new(6, 3 * MIB + 1), secs(20));
        let close = fwd.wait_close_lines(1, secs(3));
        assert!(close.first().is_some_and(|l| field(l, "client").is_some_and(|c| c.starts_with("[::1]:"))
            && field(l, "upstream") == Some(up.addr().to_string().as_str())), "{close:?}");
    }
}
