//! The kernel path (and splice beside it) under the conditions issue 13 found untested:
//! a PROXY header sharing a segment with the payload, forced SK_PASS, leaving for
//! splice while FINs arrive, fd exhaustion while pairing, a pair the maps refuse,
//! resets mid-transfer (and while a pair leaves the maps), an IPv4 listener in front of
//! an IPv6 upstream.
//!
//! Behaviour that must hold on both paths is written once (`splice::NAME`,
//! `ebpf::NAME`); what only the kernel path has is in `ebpf_only::NAME` (root only,
//! like every eBPF test). Every byte is checked by sha256 in both directions, FINs
//! included, and every pair's close line by its `path=` and `userspace_bytes=`.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use forwarder_tests::*;

#[path = "kernel_path/support.rs"]
mod support;
use support::*;

relay_tests! {
    /// A PROXY v1 header and the payload in ONE write: the forwarder's header parser
    /// reads part of an skb, and the rest of it (and whatever follows) must reach the
    /// upstream exactly once. On 6.18 the kernel path hands a partly read skb to the
    /// program whole (the header would be sent on twice), so the forwarder relays the
    /// bytes queued behind the header itself before pairing (`relay_partly_read`, by
    /// splice: none through its memory), up to PARTLY_READ_MAX (64 KiB); a socket with
    /// more queued goes to splice.
    fn proxy_header_and_payload_in_one_segment(mode) {
        let _load = light();
        let (up, rx) = digest_echo(LOCALHOST);
        let fwd = Forwarder::config(Some(mode), &rule("pp", up.addr(), "accept_proxy_protocol = true"), 1);
        fwd.assert_mode(mode);
        const PARTLY_READ_MAX: u64 = 64 * KIB;
        let sizes = [1u64, 60 * KIB + 3, 256 * KIB + 5];
        // Nothing goes through our memory on either path: the bytes queued behind the
        // header are spliced, and the program's own SK_PASS needs 4 x inflight_limit
        // (16 MiB) in flight, far more than any payload here. The two payloads that fit
        // run on the kernel path; the largest goes to splice unless it drained in time.
        // (Larger payloads: see proxy_header_then_bulk_echo.)
        fwd.expect_userspace_at_most(0)
            .expect_paths(&["splice"])
            .expect_pairs(2);
        for (i, &len) in sizes.iter().enumerate() {
            let p = Payload::new(1300 + i as u64, len);
            let src: SocketAddr = format!("192.0.2.{}:{}", 10 + i, 40_000 + i).parse().unwrap();
            let header = format!(
                "PROXY TCP4 {} {} {} {}\r\n",
                src.ip(),
                fwd.addr().ip(),
                src.port(),
                fwd.addr().port()
            );
            let mut bytes = header.into_bytes();
            bytes.extend(p.to_vec());
            let s = connect(fwd.addr());
            // The whole echo comes back before the client shuts its write side: its FIN
            // reaching the forwarder before pairing would make the sockmap refuse the
            // socket (ebpf_only::unpairable_client_falls_back_to_splice covers that).
            let (echoed, first_write) = one_write_then_half_close(&s, &bytes, p, Instant::now() + secs(30))
                .unwrap_or_else(|e| panic!("{len} bytes behind a PROXY header: {e}"));
            let want = Digested::of(&p);
            assert!(
                echoed.intact && matches!(echoed.end, End::Eof) && echoed.digest() == want,
                "{len} bytes: the echo (download direction) differs or did not end in EOF: {echoed:?}"
            );
            let upstream_got = rx
                .recv_timeout(secs(10))
                .expect("upstream saw no EOF: the client's FIN was not passed on")
                .expect("upstream read");
            assert_eq!(upstream_got, want, "{len} bytes: the upstream got different bytes");
            // The pair is known by the address the header names.
            let l = wait_close_of(&fwd, "pp", src, secs(5));
            assert_eq!(num(&l, "bytes_up"), len, "{l}");
            assert_eq!(num(&l, "bytes_down"), len, "{l}");
            assert_eq!(field(&l, "end"), Some("closed"), "{l}");
            let fits = len <= PARTLY_READ_MAX;
            if fits {
                assert_eq!(field(&l, "path"), Some(mode.as_str()), "{l}");
            }
            let userspace = num(&l, "userspace_bytes");
            println!(
                "{mode:?}: {len} bytes behind the header (first write took {first_write} of {}): userspace_bytes={userspace}",
                bytes.len()
            );
            assert_eq!(userspace, 0, "{l}");
        }
    }

    /// A PROXY header followed at once by a bulk upload (64 MiB, one write) to an
    /// upstream that answers while it reads (an echo), the way a front balancer with
    /// send-proxy forwards an upload. Everything the client sends without a pause is
    /// behind the header, and the forwarder must keep both directions moving while it
    /// relays those bytes. 8 runs, sha256 both ways, half-close passed on.
    fn proxy_header_then_bulk_echo(mode) {
        let _load = heavy();
        const RUNS: u64 = 8;
        let (up, rx) = digest_echo(LOCALHOST);
        let fwd = Forwarder::config(Some(mode), &rule("pp", up.addr(), "accept_proxy_protocol = true"), 1);
        fwd.assert_mode(mode);
        if mode == Mode::Ebpf {
            // Bytes queued behind the header must be relayed by us before the client
            // socket may run the program (a partly read skb would be handed to it
            // whole); a client that keeps sending goes to splice instead (path=splice,
            // at most PARTLY_READ_MAX spliced first); one that drained may leave the
            // maps at the in-flight bound. Only bytes the program passes (far past the
            // in-flight bound) go through our memory, each at most once, so at most
            // both directions of a pair.
            fwd.expect_paths(&["ebpf>splice", "splice"])
                .expect_pairs(0)
                .expect_userspace_at_most(2 * (64 * MIB + RUNS));
        } else {
            fwd.expect_pairs(RUNS as usize);
        }
        for i in 0..RUNS {
            let p = Payload::new(1_400 + i, 64 * MIB + i);
            let src: SocketAddr = format!("192.0.2.20:{}", 41_000 + i).parse().unwrap();
            let header = format!("PROXY TCP4 {} {} {} {}\r\n", src.ip(), fwd.addr().ip(), src.port(), fwd.addr().port());
            let mut bytes = header.into_bytes();
            bytes.extend(p.to_vec());
            let s = connect(fwd.addr());
            let start = Instant::now();
            let (echoed, _) = one_write_then_half_close(&s, &bytes, p, Instant::now() + secs(10))
                .unwrap_or_else(|e| panic!("run {i}: {e}"));
            let took = start.elapsed();
            let want = Digested::of(&p);
            assert!(
                echoed.intact && matches!(echoed.end, End::Eof) && echoed.digest() == want,
                "run {i}: after {took:.2?} the echo stalled or differs: got {} of {} bytes, {:?}",
                echoed.got, p.len, echoed.end
            );
            let upstream_got = rx.recv_timeout(secs(10)).expect("upstream saw no EOF").expect("upstream read");
            assert_eq!(upstream_got, want, "run {i}: upload");
            let l = wait_close_of(&fwd, "pp", src, secs(5));
            println!("{mode:?} run {i}: {took:.2?}: {l}");
            assert_eq!(field(&l, "end"), Some("closed"), "{l}");
            assert_eq!(num(&l, "bytes_up"), p.len, "{l}");
            assert_eq!(num(&l, "bytes_down"), p.len, "{l}");
        }
    }

    /// A request and its FIN, then a 64 MiB answer: on the kernel path the answer
    /// leaves for splice at the in-flight bound like any bulk stream. (A direction done
    /// with its FIN kept the pair from leaving: past the bound the rest came through
    /// our recv/send, 4-17 MB of 32, on `path=ebpf`.) The upstream's own FIN goes only
    /// once the client has every byte: a FIN pending on the answer's direction while
    /// the program passes bytes (a forwarder kept off the CPU past 4 x inflight_limit)
    /// is another case, which ends on the kernel path, exact (CI saw it once in about
    /// 30 runs when the FIN followed the answer at once). sha256 both ways, FINs
    /// included.
    fn bulk_answer_after_a_half_closed_request_leaves_the_kernel_path(mode) {
        let _load = heavy();
        let answer = Payload::new(4_242, 64 * MIB + 3);
        // Paced, so that a forwarder kept off the CPU for a while still sees the bound
        // reached before the program's cap (4 x inflight_limit, 16 MiB: 125 ms of the
        // answer) and has answer left to move once it has caught up. Written at once,
        // the answer reached the cap while the forwarder of the binary's first test was
        // starting, all 48 MiB past it came through our recv/send and the pair ended on
        // `path=ebpf` (seen once, 4 test threads as in CI; a 50 ms SIGSTOP of the
        // forwarder as the answer starts did it 1 run in 11, and paced, 12 runs of 50
        // and 200 ms stops all left the kernel path).
        const ANSWER_RATE: u64 = 128 * MIB;
        let (tx, rx) = mpsc::channel::<(Vec<u8>, io::Result<()>)>();
        let (asked_tx, asked_rx) = mpsc::channel::<()>();
        let (fin_tx, fin_rx) = mpsc::channel::<()>();
        let (tx, asked_tx, fin_rx) = (Mutex::new(tx), Mutex::new(asked_tx), Mutex::new(fin_rx));
        let up = Server::start(LOCALHOST, move |mut s| {
            let mut request = vec![0u8; 10];
            let _ = s.set_read_timeout(Some(secs(30)));
            let read = std::io::Read::read_exact(&mut s, &mut request)
                .inspect(|()| {
                    let _ = asked_tx.lock().unwrap().send(());
                })
                .and_then(|()| std::io::Read::read_to_end(&mut s, &mut request));
            let deadline = Instant::now() + secs(60);
            let wrote = read.and_then(|_| answer.write_paced(&s, deadline, Some(ANSWER_RATE)));
            // Our FIN once the client has it all (or the test gave up).
            let _ = fin_rx.lock().unwrap().recv_timeout(secs(60));
            let _ = tx.lock().unwrap().send((request, wrote));
        });
        let fwd = Forwarder::cli(mode, &[up.addr()]);
        fwd.assert_mode(mode);
        if mode == Mode::Ebpf {
            fwd.expect_paths(&["ebpf>splice"]).expect_moved(1);
            // Bytes the program passes while the forwarder is starved (past 4 x
            // inflight_limit) come through us, each at most once.
            fwd.expect_userspace_at_most(answer.len);
        }
        let c = connect(fwd.addr());
        (&c).write_all(b"GET /big\r\n").unwrap();
        // The FIN once the request is through: a FIN there before the pair is made
        // keeps it off the kernel path.
        asked_rx.recv_timeout(secs(10)).expect("the upstream got no request");
        c.shutdown(std::net::Shutdown::Write).unwrap();
        // The answer must outrun its reader for the bound to be reached: a client that
        // reads as fast as the kernel redirects keeps nothing in flight, and the pair
        // rightly stays (a hunt saw all 64 MiB go through `path=ebpf` in 61 ms, 1 run in
        // 2). Not reading for 300 ms fills the client's buffers; what comes after waits
        // in the redirect queue, past the bound.
        thread::sleep(Duration::from_millis(300));
        let read = AtomicU64::new(0);
        let got = thread::scope(|scope| {
            let reader = scope.spawn(|| read_digest_counted(&c, Instant::now() + secs(60), &read));
            let until = Instant::now() + secs(60);
            while read.load(Ordering::SeqCst) < answer.len && Instant::now() < until && !reader.is_finished() {
                thread::sleep(Duration::from_millis(2));
            }
            let _ = fin_tx.send(());
            reader.join().unwrap()
        })
        .expect("the answer");
        let (request, wrote) = rx.recv_timeout(secs(10)).expect("the upstream did not report");
        assert_eq!(request, b"GET /big\r\n", "the request at the upstream");
        wrote.expect("the upstream's answer");
        assert!(got == Digested::of(&answer), "the answer arrived changed: {got:?}");
        let closes = fwd.wait_close_lines(1, secs(10));
        let l = closes.first().unwrap_or_else(|| panic!("no close line: {}", fwd.stderr.text()));
        assert_eq!(field(l, "end"), Some("closed"), "{l}");
        assert_eq!((num(l, "bytes_up"), num(l, "bytes_down")), (10, answer.len), "{l}");
    }

    /// Both directions at full speed at once (2-12 MiB each way), each side shutting its
    /// write side after its last byte, with in-flight bounds small enough that pairs
    /// leave the maps for splice, now and then while the FINs arrive. 64 rounds of two
    /// pairs (one per bound); every pair ends sha256-exact both ways, or reset on both
    /// sides (the forwarder's own checks refuse to go on with counts it cannot trust),
    /// never cut or corrupted with a clean close. Resets are counted and bounded.
    fn leave_for_splice_during_fin_bidirectional(mode) {
        let _load = heavy();
        // 64: on a host where most pairs relay through us past the program's cap
        // (SK_PASS) rather than leave, 32 rounds now and then had no pair leave with a
        // FIN seen (1 run in about 15 here; 7-20 handoffs of 64 pairs in the others).
        const ROUNDS: u64 = 64;
        fn down(seed: u64) -> Payload {
            Payload::new(seed ^ 0xD0_0000, 2 * MIB + (seed * 1_299_709) % (10 * MIB) + seed % 7)
        }
        let (up, rx) = duplex_server(down);
        let toml = rule("tight", up.addr(), "inflight_limit = 65536")
            + &rule("loose", up.addr(), "inflight_limit = 1048576");
        // The debug lines of the sockmap relay say when a pair hands off with a FIN seen.
        let fwd = spawn_config_with_log(mode, &toml, 2, "forwarder::relay::ebpf=debug");
        fwd.assert_mode(mode);
        let total = (2 * ROUNDS) as usize;
        fwd.expect_pairs(total);
        if mode == Mode::Ebpf {
            // Pairs start on the kernel path and leave at a quarter of the bound.
            fwd.expect_paths(&["ebpf>splice"]).expect_moved(1);
            // Past 4 x inflight_limit the program passes bytes to us (SK_PASS) and we
            // relay them; each byte at most once, so at most both payloads of a pair
            // (12 MiB + 6 B each way at most).
            fwd.expect_userspace_at_most(2 * (12 * MIB + 6));
        }
        let (tight, loose) = (fwd.rule_addr("tight"), fwd.rule_addr("loose"));
        let start = Instant::now();
        let mut failures = Vec::new();
        let mut clients = Vec::new();
        for round in 0..ROUNDS {
            let results: Vec<(&str, Payload, io::Result<ClientSide>)> = thread::scope(|t| {
                let runs: Vec<_> = [("tight", tight), ("loose", loose)]
                    .into_iter()
                    .enumerate()
                    .map(|(k, (name, addr))| {
                        let seed = 30_000 + round * 2 + k as u64;
                        let p = Payload::new(seed, 2 * MIB + (seed * 7_919 * KIB) % (10 * MIB) + seed % 5);
                        t.spawn(move || (name, p, duplex(addr, p, Instant::now() + secs(30))))
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            for (name, p, r) in results {
                let c = r.unwrap_or_else(|e| panic!("round {round}: connect: {e}"));
                clients.push((name, p, c));
            }
        }
        let took = start.elapsed();
        let mut servers = std::collections::HashMap::new();
        for _ in 0..total {
            let s = rx.recv_timeout(secs(10)).expect("a server connection did not report");
            servers.insert(s.seed, s);
        }
        let closes = fwd.wait_close_lines(total, secs(10));
        let mut resets = Vec::new();
        for (name, p, c) in &clients {
            let server = servers.get(&Some(p.seed));
            let close = close_of(&closes, name, c.local);
            let want_down = Digested::of(&down(p.seed));
            let exact = matches!(&c.read, Ok(d) if *d == want_down)
                && c.wrote.is_ok()
                && matches!(server, Some(ServerSide { read: Ok(d), wrote: Ok(()), .. }) if *d == Digested::of(p))
                && close.is_some_and(|l| field(l, "end") == Some("closed")
                    && num(l, "bytes_up") == p.len
                    && num(l, "bytes_down") == want_down.len);
            if exact {
                continue;
            }
            // Not exact: it must be a reset that both ends saw, or that the end still
            // using the connection saw while the other had already got every byte it
            // was due and written all of its own (a server done with the pair before
            // the forwarder reset it reads nothing more, and so sees nothing: seen in
            // CI when the duplication guard reset a pair's download after its upload
            // had ended exactly). (A client whose writer met the reset first reads a
            // plain EOF after it: the reset is then in `wrote`.)
            let client_reset = matches!(&c.read, Err(e) if is_reset(e))
                || matches!(&c.wrote, Err(e) if e.to_string().contains("reset") || e.to_string().contains("Broken pipe"));
            let server_reset = matches!(server, Some(ServerSide { read: Err(_), .. }) | Some(ServerSide { wrote: Err(_), .. }));
            let client_done = matches!(&c.read, Ok(d) if *d == want_down) && c.wrote.is_ok();
            let server_done = matches!(server, Some(ServerSide { read: Ok(d), wrote: Ok(()), .. }) if *d == Digested::of(p));
            let logged = close.is_some_and(|l| field(l, "end") != Some("closed"));
            let seen = (client_reset && (server_reset || server_done))
                || (server_reset && client_done);
            if seen && logged {
                resets.push(format!("seed {}: {}", p.seed, close.unwrap_or_default()));
            } else {
                failures.push(format!(
                    "seed {} from {}: CUT OR CORRUPTED without a reset seen by each end not done with it: client read {:?} wrote {:?}; upstream {server:?}; close {close:?}",
                    p.seed, c.local, c.read, c.wrote
                ));
            }
        }
        println!("{} of {total} pairs reset by the forwarder: {resets:#?}", resets.len());
        assert!(resets.len() <= total / 10, "{} of {total} pairs reset: {resets:#?}", resets.len());
        let stats = path_stats(&closes);
        let fin_handoffs = fwd
            .log_lines()
            .iter()
            .filter(|l| l.contains("ebpf: handoff") && l.contains("fin=true"))
            .count();
        println!(
            "{mode:?}: {total} pairs in {took:.2?}: paths {:?}, moved {}, SK_PASS (userspace_bytes>0) {} pairs / {} bytes, handoffs with a FIN seen: {fin_handoffs}",
            stats.by_path, stats.moved, stats.via_userspace, stats.userspace_bytes
        );
        assert!(failures.is_empty(), "{} failure(s): {failures:#?}", failures.len());
        if mode == Mode::Ebpf {
            assert!(
                closes.iter().any(|l| field(l, "path") == Some("ebpf>splice")),
                "no pair left the kernel path: {closes:#?}"
            );
            // 7-20 of 64 pairs here: the case the name promises happened.
            assert!(fin_handoffs > 0, "no pair left the kernel path with a FIN already seen");
            // Every socket of a pair that left parted under its socket lock (or once
            // closed): a plain map delete races the verdict, which then drops an skb.
            let logs = fwd.log_lines();
            let parted = |how: &str| logs.iter().filter(|l| l.contains("ebpf: ") && l.contains(" parted ") && l.contains(how)).count();
            let (all, unlocked) = (parted(""), parted("without the socket lock"));
            println!("sockets parted: {all}, without their lock: {unlocked}");
            assert_eq!(unlocked, 0, "sockets parted without their lock");
            assert!(all >= 2 * stats.moved, "{all} parts for {} pairs that left", stats.moved);
        }
    }

    /// Out of fds around pairing (RLIMIT_NOFILE lowered on the running forwarder with
    /// `prlimit --pid`). With room for just the two sockets of one more pair, each new
    /// client is accepted and connected; pairing itself needs no other fd on either path
    /// (the kernel path's shared epoll set, splice's pooled pipes), so it is usually
    /// served, and one that fails for want of an fd anyway (a pipe the pool did not
    /// have) must be refused with a reset, never cut with a clean EOF. (Named for what
    /// it checks: it was `emfile_while_pairing`, although pairing no longer needs an fd
    /// it could fail to get.) With no room at all, accept fails (logged) and clients wait in the
    /// backlog. Nobody gets a wrong byte or a clean EOF on a cut stream, pairs already
    /// open are unaffected (they still echo, and finish with clean half-closes), the
    /// forwarder does not spin or exit, and once fds are free again the waiting
    /// clients are served and so is everyone after.
    fn out_of_fds_around_pairing(mode) {
        let _load = heavy();
        let up = Server::echo();
        // Started under a modest limit (the forwarder may raise it at startup); the
        // limit that matters is set on the running process below.
        let mut fwd = Forwarder::cli_under(&[prlimit_bin(), "--nofile=1024:1024", "--"], mode, up.addr());
        fwd.assert_mode(mode);
        // The 1 MiB echoes at the end may outrun the redirect worker and leave the maps
        // at the in-flight bound (a quarter of 4 MiB).
        fwd.expect_paths(&["ebpf>splice"]);
        // Out of fds, a splice direction that needs a pipe and cannot make one copies
        // through a buffer of ours (README, "fd exhaustion"), counted in
        // `userspace_bytes`: any pair here may, up to all it moves (its payload, at
        // most 1 MiB + 3 each way, and the ping). Seen: a held pair's "still held"
        // ping, 24 bytes, when its thread's pool had no pipe left.
        fwd.expect_userspace_at_most(2 * (MIB + 4));
        let pid = fwd.pid();
        const HELD: usize = 6;
        let held: Vec<TcpStream> = (0..HELD)
            .map(|i| {
                let s = connect(fwd.addr());
                ping(&s, format!("held {i}").as_bytes(), secs(5)).expect("echo before the limit");
                s
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        let before = open_fds(pid).len();

        // 1. Room for the client's socket and the upstream's, nothing more. Neither path
        // needs more fds for a pair (the kernel path watches it in a shared epoll set;
        // splice takes pipes only while bytes wait, from its per-thread pool first), so
        // its clients may well be served; any that are not must be reset.
        let limit = leave_free_fds(pid, 2);
        println!("{mode:?}: {before} fds open with {HELD} pairs; RLIMIT_NOFILE now {limit}");
        let mut pairing_failed = 0;
        for i in 0..3u64 {
            let p = Payload::new(4_000 + i, 4 * KIB);
            let s = match try_connect(fwd.addr()) {
                Ok(s) => s,
                Err(e) => {
                    // Accepted and refused (reset) before connect() even returned.
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "client {i}: connect: {e}");
                    println!("  client {i}: reset while connecting");
                    pairing_failed += 1;
                    continue;
                }
            };
            let local = s.local_addr().unwrap();
            if let Err(e) = (&s).write_all(&p.to_vec()) {
                // Refused before the write got through: a reset is the right answer.
                assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "client {i}: write: {e}");
                let l = wait_close_of(&fwd, &fwd.listening[0].rule, local, secs(5));
                println!("  client {i}: reset while writing: {l}");
                assert!(
                    l.contains("Too many open files") && field(&l, "path") == Some(mode.as_str()),
                    "client {i}: refused, but not for want of fds while pairing: {l}"
                );
                pairing_failed += 1;
                continue;
            }
            // No FIN before the echo: a client half-closed before pairing is one the
            // sockmap refuses (it then runs on splice, see ebpf_only::unpairable_*).
            let mut r = read_checked(&s, p, Some(p.len), Instant::now() + secs(5));
            if matches!(r.end, End::Count) {
                let _ = s.shutdown(std::net::Shutdown::Write);
                let rest = read_checked(&s, Payload::new(0, 0), None, Instant::now() + secs(5));
                r.intact &= rest.got == 0;
                r.end = rest.end;
            }
            let l = wait_close_of(&fwd, &fwd.listening[0].rule, local, secs(5));
            println!("  client {i}: got {} of {} bytes, then {:?}: {l}", r.got, p.len, r.end);
            assert!(r.intact, "client {i}: wrong bytes while out of fds: {r:?}");
            if matches!(r.end, End::Eof) && r.got == p.len {
                assert_eq!(field(&l, "end"), Some("closed"), "client {i} served: {l}");
                continue;
            }
            // Not served: the client must learn it from a reset. A clean EOF after a
            // short echo would be a silently truncated stream.
            assert!(
                r.is_reset(),
                "client {i}: its pair failed ({l}) but the client saw {:?} after {} of {} bytes, not a reset",
                r.end,
                r.got,
                p.len
            );
            assert!(
                l.contains("Too many open files") && field(&l, "path") == Some(mode.as_str()),
                "client {i}: refused, but not for want of fds while pairing: {l}"
            );
            pairing_failed += 1;
        }
        println!("  {pairing_failed} of 3 pairs failed for want of fds while pairing");

        // 2. No room at all: accept itself fails; clients wait in the backlog.
        leave_free_fds(pid, 0);
        let waiting: Vec<_> = (0..4u64)
            .map(|i| {
                let addr = fwd.addr();
                thread::spawn(move || {
                    let p = Payload::new(4_100 + i, 256 * KIB + i);
                    let s = connect(addr);
                    let local = s.local_addr().unwrap();
                    let got = paired_exchange(&s, p, KIB, Instant::now() + secs(20));
                    (p, local, got)
                })
            })
            .collect();
        let warn = fwd
            .stderr
            .wait_for(secs(5), |l| l.contains("accept rule=") && l.contains("Too many open files"))
            .unwrap_or_else(|| panic!("no accept failure logged with no fd left:\n{}", fwd.stderr.text()));
        println!("  {warn}");
        let cpu_before = fwd.cpu_seconds();
        thread::sleep(secs(1));
        let busy = fwd.cpu_seconds() - cpu_before;
        println!("  out of fds: forwarder used {busy:.3} CPU s in 1 s");
        assert!(busy < 0.1, "forwarder used {busy:.3} CPU s/s while out of fds: spinning");
        fwd.assert_running();
        for (i, s) in held.iter().enumerate() {
            ping(s, format!("still held {i}").as_bytes(), secs(5))
                .unwrap_or_else(|e| panic!("held pair {i} hurt by fd exhaustion: {e}"));
        }

        // 3. The held pairs finish, fds still short: all clients shut their write sides
        // at once, and each gets the upstream's clean EOF back (pairs in flight are
        // unaffected). That frees their fds, with the limit unchanged.
        let held_locals: Vec<SocketAddr> = held.iter().map(|s| s.local_addr().unwrap()).collect();
        for s in &held {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        for (i, s) in held.iter().enumerate() {
            let r = read_checked(s, Payload::new(0, 0), None, Instant::now() + secs(5));
            assert!(
                matches!(r.end, End::Eof) && r.got == 0,
                "held pair {i}: its half-close came back as {:?} (after {} bytes), not a clean EOF",
                r.end,
                r.got
            );
        }
        drop(held);
        for (i, local) in held_locals.iter().enumerate() {
            let l = wait_close_of(&fwd, &fwd.listening[0].rule, *local, secs(5));
            assert_eq!(field(&l, "end"), Some("closed"), "held pair {i} did not end cleanly: {l}");
        }
        for w in waiting {
            let (p, local, got) = w.join().unwrap();
            assert!(
                got.intact && matches!(got.end, End::Eof) && got.digest() == Digested::of(&p),
                "client {local} that waited out the fd shortage: {got:?}"
            );
        }
        for round in 0..3u64 {
            let payloads: Vec<Payload> = (0..4).map(|i| Payload::new(4_200 + round * 4 + i, MIB + i)).collect();
            drive_echo_clients(fwd.addr(), &payloads, Instant::now() + secs(20))
                .unwrap_or_else(|e| panic!("after the shortage, round {round}: {e}"));
        }
        fwd.assert_running();
        let closes = fwd.close_lines();
        let stats = path_stats(&closes);
        println!("  close lines: paths {:?}, ends {:?}", stats.by_path, stats.by_end);
        for l in closes.iter().filter(|l| field(l, "end") != Some("closed")) {
            println!("  {l}");
        }
    }

    /// A reset in the middle of a bulk transfer, from either side. The client resets
    /// after 16 of 64 MiB: the upstream sees ECONNRESET within 2 s and the close line
    /// says client_reset. The upstream resets after at most 8 MiB: the client sees
    /// ECONNRESET (not EOF) within 2 s, after an intact prefix. After each, the next
    /// transfer is exact.
    fn reset_mid_transfer(mode) {
        let _load = heavy();
        const BIG: u64 = 64 * MIB;
        const CLIENT_CUT: u64 = 16 * MIB;
        const UPSTREAM_CUT: u64 = 8 * MIB;
        let big = Payload::new(6_400, BIG);
        let full = Payload::new(6_401, 16 * MIB + 3);
        let (tx, rx) = mpsc::channel::<(u8, io::Result<()>, Instant)>();
        let up = Server::start(LOCALHOST, move |s| {
            let Ok(cmd) = read_exact_timeout(&s, 1, secs(10)) else { return };
            let deadline = Instant::now() + secs(30);
            match cmd[0] {
                // Send 64 MiB, then wait for the client's EOF; report the first error.
                b'S' => {
                    let r = big.write_to(&s, deadline).and_then(|()| {
                        read_to_end(&s, usize::MAX, deadline).map(|_| ())
                    });
                    let _ = tx.send((b'S', r, Instant::now()));
                }
                // Send 8 MiB, then reset.
                b'R' => {
                    let r = Payload::new(big.seed, UPSTREAM_CUT).write_to(&s, deadline);
                    socket2::SockRef::from(&*s).set_linger(Some(Duration::ZERO)).unwrap();
                    let _ = tx.send((b'R', r, Instant::now()));
                    drop(s);
                }
                // A whole transfer: send, FIN, read to the client's EOF.
                _ => {
                    let r = full.write_to(&s, deadline).and_then(|()| {
                        s.shutdown(std::net::Shutdown::Write)?;
                        read_to_end(&s, usize::MAX, deadline).map(|_| ())
                    });
                    let _ = tx.send((b'F', r, Instant::now()));
                }
            }
        });
        // Transfers of 16 and 64 MiB under CPU hogs: with the default inflight_limit
        // (4 MiB) the program's last resort, SK_PASS past 4 x inflight_limit in flight,
        // is what a starved forwarder does by design (seen once in CI: the last 3 bytes
        // of the 16 MiB + 3 transfer, all of it redirected before the kernel's redirect
        // worker ran). This test is about resets: a bound of 32 MiB puts SK_PASS out of
        // reach (4 x 32 MiB > 64 MiB), so userspace_bytes stays 0 (the default check)
        // by design, not by luck. SK_PASS itself: forced_sk_pass_exact_or_reset.
        let fwd = Forwarder::config(Some(mode), &rule("reset", up.addr(), "inflight_limit = 33554432"), 1);
        fwd.assert_mode(mode);
        fwd.expect_pairs(4);
        if mode == Mode::Ebpf {
            // A bulk download may leave the maps at a quarter of the bound (8 MiB in
            // flight).
            fwd.expect_paths(&["ebpf>splice"]);
        }
        let exact_transfer = |what: &str| {
            let s = connect(fwd.addr());
            (&s).write_all(b"F").unwrap();
            let r = read_checked(&s, full, None, Instant::now() + secs(20));
            assert!(r.intact && r.got == full.len && matches!(r.end, End::Eof), "{what}: {r:?}");
            drop(s);
            let (cmd, res, _) = rx.recv_timeout(secs(10)).expect("upstream report");
            assert_eq!(cmd, b'F');
            res.unwrap_or_else(|e| panic!("{what}: upstream: {e}"));
        };

        // The client resets mid-download.
        let s = connect(fwd.addr());
        let local = s.local_addr().unwrap();
        (&s).write_all(b"S").unwrap();
        let r = read_checked(&s, big, Some(CLIENT_CUT), Instant::now() + secs(20));
        assert!(r.intact && matches!(r.end, End::Count), "download before the reset: {r:?}");
        let reset_at = reset(s);
        let (cmd, res, when) = rx.recv_timeout(secs(5)).expect("the upstream saw nothing of the reset");
        assert_eq!(cmd, b'S');
        let after = when.duration_since(reset_at);
        match &res {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("upstream got {other:?} instead of ECONNRESET"),
        }
        assert!(after < secs(2), "the client's reset reached the upstream after {after:?}");
        let l = wait_close_of(&fwd, &fwd.listening[0].rule, local, secs(5));
        println!("{mode:?}: client reset, upstream saw it after {after:.2?}: {l}");
        assert!(field(&l, "end").is_some_and(|e| e.starts_with("client_reset")), "{l}");
        exact_transfer("after the client's reset");

        // The upstream resets mid-download.
        let s = connect(fwd.addr());
        let local = s.local_addr().unwrap();
        (&s).write_all(b"R").unwrap();
        let r = read_checked(&s, big, None, Instant::now() + secs(20));
        let (cmd, sent, reset_at) = rx.recv_timeout(secs(10)).expect("upstream report");
        assert_eq!(cmd, b'R');
        sent.expect("upstream sent its 8 MiB");
        println!(
            "{mode:?}: upstream reset after {UPSTREAM_CUT} bytes; the client got {} and {:?} {:.2?} after",
            r.got,
            r.end,
            r.at.saturating_duration_since(reset_at)
        );
        assert!(r.intact && r.got <= UPSTREAM_CUT, "client got {r:?}");
        assert!(r.is_reset(), "the upstream's reset reached the client as {:?}, not ECONNRESET", r.end);
        assert!(
            matches!(&r.end, End::Error(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{:?}",
            r.end
        );
        let after = r.at.saturating_duration_since(reset_at);
        assert!(after < secs(2), "the upstream's reset reached the client after {after:?}");
        let l = wait_close_of(&fwd, &fwd.listening[0].rule, local, secs(5));
        println!("  {l}");
        assert!(field(&l, "end").is_some_and(|e| e.starts_with("upstream_reset")), "{l}");
        exact_transfer("after the upstream's reset");
    }

    /// The upstream sends 8 MiB and resets, 300 times over, to a client that starts
    /// reading 2 ms late. On the kernel path such a pair is often leaving the maps (its
    /// in-flight bound reached) when the reset lands. A reset socket is in TCP_CLOSE like one
    /// closed after a FIN, and leaving once took its counters for a byte-count error
    /// (`end=upstream_error (after leaving the sockmap ...)`: before the fix this test
    /// failed 3 runs in 4, at pair 32, 77 and 127).
    /// Every pair must end as `upstream_reset`, its client with an intact prefix and
    /// then ECONNRESET.
    fn upstream_reset_while_leaving_the_maps(mode) {
        let _load = heavy();
        const SENT: u64 = 8 * MIB;
        const PAIRS: usize = 300;
        let p = Payload::new(6_500, SENT);
        let up = Server::start(LOCALHOST, move |s| {
            if read_exact_timeout(&s, 1, secs(10)).is_err() {
                return;
            }
            let _ = p.write_to(&s, Instant::now() + secs(30));
            socket2::SockRef::from(&*s).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
        });
        // The debug lines of the sockmap relay say when a pair's sockets part.
        let fwd = spawn_config_with_log(mode, &rule("r", up.addr(), ""), 1, "forwarder::relay::ebpf=debug");
        fwd.assert_mode(mode);
        fwd.expect_pairs(PAIRS);
        if mode == Mode::Ebpf {
            fwd.expect_paths(&["ebpf>splice"]);
        }
        for i in 0..PAIRS {
            let s = connect(fwd.addr());
            let local = s.local_addr().unwrap();
            (&s).write_all(b"R").unwrap();
            // A moment for bytes to pile up in flight, as behind a slower reader.
            thread::sleep(Duration::from_millis(2));
            let r = read_checked(&s, p, None, Instant::now() + secs(20));
            if !(r.intact && r.got <= SENT) {
                // What the forwarder did with this pair (path, counts, end), if it has
                // said yet; the harness prints its log's tail (the relay's debug lines,
                // on in this test) as the test fails.
                let l = await_close_of(&fwd, &fwd.listening[0].rule, local, secs(5));
                panic!(
                    "pair {i}: {r:?}\n{}\nclose line: {}",
                    r.first_bad.as_deref().unwrap_or(""),
                    l.as_deref().unwrap_or("none within 5 s")
                );
            }
            assert!(
                matches!(&r.end, End::Error(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "pair {i}: the upstream's reset reached the client as {:?}",
                r.end
            );
            let l = wait_close_of(&fwd, &fwd.listening[0].rule, local, secs(5));
            assert!(field(&l, "end").is_some_and(|e| e.starts_with("upstream_reset")), "pair {i}: {l}");
        }
        let stats = path_stats(&fwd.close_lines());
        let parted = fwd.log_lines().iter().filter(|l| l.contains("ebpf: ") && l.contains(" parted ")).count();
        println!("{mode:?}: paths {:?}; sockets parted (pairs leaving) {parted}", stats.by_path);
        if mode == Mode::Ebpf {
            // Pairs were leaving when their resets landed, or the race was never run.
            assert!(parted > 0, "no pair began to leave the maps");
        }
    }

    /// Listening on 127.0.0.1, forwarding to an upstream on [::1]: the two sockets of a
    /// pair are of different families. sha256 both ways, half-close passed on.
    fn ipv4_listener_ipv6_upstream(mode) {
        let _load = light();
        let (up, rx) = digest_echo(LOCALHOST6);
        let fwd = Forwarder::cli_listen(mode, "127.0.0.1:0", &[up.addr().to_string()]);
        fwd.assert_mode(mode);
        assert!(fwd.addr().is_ipv4(), "{}", fwd.listening[0].line);
        // Nothing goes through our memory on either path (the default bound, 0), and on
        // the kernel path the pairs stay in the maps: less than the 1 MiB at which a
        // pair leaves them (a quarter of the default inflight_limit) is ever in flight.
        fwd.expect_pairs(2);
        for (seed, len) in [(7_001u64, 5u64), (7_002, 600 * KIB + 1)] {
            let p = Payload::new(seed, len);
            let s = connect(fwd.addr());
            let local = s.local_addr().unwrap();
            let got = paired_exchange(&s, p, KIB, Instant::now() + secs(20));
            assert!(
                got.intact && matches!(got.end, End::Eof) && got.digest() == Digested::of(&p),
                "download direction: {got:?}"
            );
            let upstream_got = rx
                .recv_timeout(secs(5))
                .expect("the upstream saw no EOF: the client's FIN was not passed on")
                .expect("upstream read");
            assert_eq!(upstream_got, Digested::of(&p), "upload direction");
            let l = wait_close_of(&fwd, &fwd.listening[0].rule, local, secs(5));
            assert_eq!(field(&l, "upstream"), Some(up.addr().to_string().as_str()), "{l}");
            assert!(up.addr().ip() == IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
            assert_eq!(field(&l, "path"), Some(mode.as_str()), "{l}");
            assert_eq!(field(&l, "end"), Some("closed"), "{l}");
            assert_eq!(num(&l, "bytes_up"), len, "{l}");
            assert_eq!(num(&l, "bytes_down"), len, "{l}");
            assert_eq!(num(&l, "userspace_bytes"), 0, "{l}");
        }
    }
}

/// Starts the forwarder on `toml` with `extra_log` added to its log filter.
fn spawn_config_with_log(mode: Mode, toml: &str, rules: usize, extra_log: &str) -> Forwarder {
    let dir = TempDir::new("kernel-path");
    let path = dir.write("forwarder.toml", toml);
    let log = std::env::var("FORWARDER_TEST_LOG").unwrap_or_else(|_| "info".into());
    let prefix: Vec<OsString> = vec![
        "/usr/bin/env".into(),
        format!("FORWARDER_LOG={log},{extra_log}").into(),
    ];
    let args: Vec<OsString> = vec![
        "run".into(),
        "--config".into(),
        path.into(),
        "--mode".into(),
        mode.as_str().into(),
    ];
    Forwarder::spawn_bin(&prefix, &forwarder_bin(), args, rules, Some(dir))
}

/// Tests only the kernel path has (root only).
mod ebpf_only {
    use super::*;

    /// An echo upstream that starts 300 ms late, behind an ebpf forwarder whose parts
    /// take 300 ms (the test hook `FORWARDER_TEST_PART_DELAY_MS`), with `env` besides.
    fn leaving_with_a_backlog(env: &[&str]) -> (Server, Forwarder) {
        let up = Server::start(LOCALHOST, |s| {
            thread::sleep(Duration::from_millis(300));
            let _ = echo_stream(&s);
        });
        let mut prefix = vec!["env", "FORWARDER_TEST_PART_DELAY_MS=300"];
        prefix.extend_from_slice(env);
        let fwd = Forwarder::cli_under(&prefix, Mode::Ebpf, up.addr());
        fwd.assert_mode(Mode::Ebpf);
        (up, fwd)
    }

    /// A pair leaving the maps while the redirect worker still owes the upstream's
    /// send queue megabytes, with an upstream that reads only while it can write (an
    /// echo): the upstream's own bytes must go on to the client meanwhile, or the echo
    /// stops reading and those megabytes never drain. The echo starts 300 ms late, so
    /// the client's 96 MiB and its FIN are all redirected before it reads; the test
    /// hook `FORWARDER_TEST_PART_DELAY_MS=300` stretches the part the way a loaded
    /// host's slow walk does. Before the fix this deadlocked every time (the upstream
    /// socket's receive queue full, its psock's queue stuck); seen without the hook in
    /// about 1 of 20 runs of a 32 MiB echo beside the relay suite.
    #[test]
    fn leaving_while_the_upstream_echoes_a_backlog() {
        if !ebpf_can_run("ebpf_only::leaving_while_the_upstream_echoes_a_backlog") {
            return;
        }
        let _load = heavy();
        let (_up, fwd) = leaving_with_a_backlog(&[]);
        fwd.expect_paths(&["ebpf>splice"])
            .expect_userspace_at_most(0);
        let p = Payload::new(96_001, 96 * MIB);
        drive_echo_clients(fwd.addr(), &[p], Instant::now() + secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
        let closes = fwd.wait_close_lines(1, secs(10));
        assert_eq!(field(&closes[0], "end"), Some("closed"), "{}", closes[0]);
    }

    /// The same leaving with no pipe for the drain (the test hook
    /// `FORWARDER_TEST_DRAIN_WITHOUT_PIPE`, as when the process is out of fds): the
    /// upstream's bytes go on to the client through a buffer of ours, exactly, and the
    /// close line counts them as userspace bytes.
    #[test]
    fn leaving_without_a_pipe_for_the_drain() {
        if !ebpf_can_run("ebpf_only::leaving_without_a_pipe_for_the_drain") {
            return;
        }
        let _load = heavy();
        let (_up, fwd) = leaving_with_a_backlog(&["FORWARDER_TEST_DRAIN_WITHOUT_PIPE=1"]);
        let p = Payload::new(96_002, 96 * MIB);
        fwd.expect_paths(&["ebpf>splice"])
            .expect_userspace_at_most(p.len);
        drive_echo_clients(fwd.addr(), &[p], Instant::now() + secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
        let closes = fwd.wait_close_lines(1, secs(10));
        assert_eq!(field(&closes[0], "end"), Some("closed"), "{}", closes[0]);
        let userspace: u64 = field(&closes[0], "userspace_bytes")
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(
            userspace > 0,
            "nothing went through the drain's buffer: {}",
            closes[0]
        );
    }

    /// `inflight_limit = 65536`: the program redirects at most 256 KiB not yet taken
    /// by the peer socket and passes the rest to us (SK_PASS), and the pair leaves for
    /// splice at 16 KiB. 200 bidirectional transfers of 1-2 MiB each way, 8 at a time:
    /// each must end sha256-exact both ways with end=closed, or as a reset that both
    /// the close line and an endpoint see. Never a stream that ends cleanly with a
    /// wrong or missing byte.
    #[test]
    fn forced_sk_pass_exact_or_reset() {
        if !ebpf_can_run("ebpf_only::forced_sk_pass_exact_or_reset") {
            return;
        }
        let _load = heavy();
        const RUNS: u64 = 200;
        const CONCURRENT: usize = 8;
        fn down(seed: u64) -> Payload {
            Payload::new(seed ^ 0xD0_0000, MIB + (seed * 104_729) % MIB)
        }
        let (up, rx) = duplex_server(down);
        let fwd = Forwarder::config(
            Some(Mode::Ebpf),
            &rule("pass", up.addr(), "inflight_limit = 65536"),
            1,
        );
        fwd.assert_mode(Mode::Ebpf);
        // Every byte passed to us is relayed once (a duplicate resets the pair instead),
        // so at most both payloads of a pair: 2 x (2 MiB - 1).
        fwd.expect_paths(&["ebpf>splice"])
            .expect_pairs(RUNS as usize)
            .expect_userspace_at_most(2 * (2 * MIB - 1));
        let next = AtomicU64::new(0);
        let results = Mutex::new(Vec::new());
        let start = Instant::now();
        let stop_starting = start + secs(45);
        thread::scope(|t| {
            for _ in 0..CONCURRENT {
                t.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= RUNS || Instant::now() > stop_starting {
                        break;
                    }
                    let p = Payload::new(20_000 + i, MIB + (i * 7_919 * 131) % MIB);
                    let r = duplex(fwd.addr(), p, Instant::now() + secs(30));
                    results.lock().unwrap().push((p, r));
                });
            }
        });
        let took = start.elapsed();
        let results = results.into_inner().unwrap();
        assert_eq!(
            results.len() as u64,
            RUNS,
            "only {} transfers in {took:?}",
            results.len()
        );
        let mut servers = std::collections::HashMap::new();
        for _ in 0..RUNS {
            let s = rx
                .recv_timeout(secs(10))
                .expect("a server connection did not report");
            servers.insert(s.seed, s);
        }
        let closes = fwd.wait_close_lines(RUNS as usize, secs(10));
        let (mut exact, mut resets, mut client_saw, mut server_saw) = (0, 0, 0, 0);
        let mut failures = Vec::new();
        for (p, r) in &results {
            let c = match r {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("seed {}: connect: {e}", p.seed));
                    continue;
                }
            };
            let d = down(p.seed);
            let srv = servers.get(&Some(p.seed));
            let Some(l) = close_of(&closes, "pass", c.local) else {
                failures.push(format!("seed {}: no close line for {}", p.seed, c.local));
                continue;
            };
            // A clean EOF vouches for every byte before it, whatever happened later.
            if let Ok(got) = &c.read {
                if *got != Digested::of(&d) {
                    failures.push(format!(
                        "seed {}: client read a clean EOF after wrong bytes: {got} (want {}): {l}",
                        p.seed,
                        Digested::of(&d)
                    ));
                }
            }
            if let Some(ServerSide { read: Ok(got), .. }) = srv {
                if *got != Digested::of(p) {
                    failures.push(format!("seed {}: upstream read a clean EOF after wrong bytes: {got} (want {}): {l}", p.seed, Digested::of(p)));
                }
            }
            // Errors must be resets, not stalls (a read timing out is a hang).
            let client_err: Vec<&io::Error> = [c.read.as_ref().err(), c.wrote.as_ref().err()]
                .into_iter()
                .flatten()
                .collect();
            let server_err: Vec<&io::Error> = match srv {
                Some(s) => [s.read.as_ref().err(), s.wrote.as_ref().err()]
                    .into_iter()
                    .flatten()
                    .collect(),
                None => Vec::new(),
            };
            for e in client_err.iter().chain(&server_err) {
                if !is_reset(e) {
                    failures.push(format!(
                        "seed {}: error that is not a reset: {e} ({:?}): {l}",
                        p.seed,
                        e.kind()
                    ));
                }
            }
            if field(l, "end") == Some("closed") {
                exact += 1;
                let clean = c.read.is_ok()
                    && c.wrote.is_ok()
                    && matches!(
                        srv,
                        Some(ServerSide {
                            read: Ok(_),
                            wrote: Ok(()),
                            ..
                        })
                    );
                if !clean || num(l, "bytes_up") != p.len || num(l, "bytes_down") != d.len {
                    failures.push(format!(
                        "seed {}: end=closed but client {c:?} upstream {srv:?}: {l}",
                        p.seed
                    ));
                }
            } else {
                resets += 1;
                client_saw += usize::from(!client_err.is_empty());
                server_saw += usize::from(!server_err.is_empty());
                let end = field(l, "end").unwrap_or("");
                if !(end.ends_with("_reset")
                    || end.ends_with("_error")
                    || end.ends_with("_broken_pipe"))
                {
                    failures.push(format!("seed {}: unexpected end: {l}", p.seed));
                }
                // The reset reached at least one endpoint (each side whose stream was
                // cut saw an error: a clean EOF would have been caught above).
                if client_err.is_empty() && server_err.is_empty() {
                    failures.push(format!(
                        "seed {}: the close line says {end} but neither endpoint saw a reset: {l}",
                        p.seed
                    ));
                }
                println!(
                    "  reset: client saw {:?}, upstream saw {:?}: {l}",
                    client_err, server_err
                );
            }
        }
        let stats = path_stats(&closes);
        println!(
            "{RUNS} transfers in {took:.2?}: {exact} exact, {resets} reset (client saw it {client_saw}x, upstream {server_saw}x); paths {:?}; SK_PASS (userspace_bytes>0): {} pairs, {} bytes",
            stats.by_path, stats.via_userspace, stats.userspace_bytes
        );
        let moved_bytes: u64 = closes
            .iter()
            .map(|l| num(l, "bytes_up") + num(l, "bytes_down"))
            .sum();
        println!(
            "  through userspace: {} of {moved_bytes} bytes ({:.0}%); e.g. {:?}",
            stats.userspace_bytes,
            100.0 * stats.userspace_bytes as f64 / moved_bytes.max(1) as f64,
            closes.iter().take(2).collect::<Vec<_>>()
        );
        if let Some(dups) = fwd
            .log_lines()
            .iter()
            .find(|l| l.contains("duplicated") || l.contains("more than TCP received"))
        {
            println!("  first duplication line: {dups}");
        }
        assert!(
            failures.is_empty(),
            "{} failure(s): {failures:#?}",
            failures.len()
        );
        assert!(
            stats.via_userspace > 0,
            "no pair went through SK_PASS: the test did not test it"
        );
        // A close line's own consistency: what went through us is part of what moved.
        for l in &closes {
            assert!(
                num(l, "userspace_bytes") <= num(l, "bytes_up") + num(l, "bytes_down"),
                "{l}"
            );
        }
    }

    /// A pair the maps refuse runs on splice, losing nothing. MAX_PAIRS (65536) is a
    /// compile-time constant of the program and of userspace, too many pairs to open
    /// here (and no setting lowers it); a client socket that is no longer ESTABLISHED
    /// takes the same fallback (the sockmap only takes established sockets). With
    /// max_connections = 1 a second client waits in the backlog, sends its payload and
    /// its FIN there, and is paired only then. Twice: a plain client, and one behind a
    /// PROXY header (whose payload the forwarder relays itself before pairing).
    #[test]
    fn unpairable_client_falls_back_to_splice() {
        if !ebpf_can_run("ebpf_only::unpairable_client_falls_back_to_splice") {
            return;
        }
        let _load = light();
        let (up, rx) = digest_echo(LOCALHOST);
        let toml = rule("plain", up.addr(), "max_connections = 1")
            + &rule(
                "proxied",
                up.addr(),
                "max_connections = 1\naccept_proxy_protocol = true",
            );
        let fwd = Forwarder::config(Some(Mode::Ebpf), &toml, 2);
        fwd.assert_mode(Mode::Ebpf);
        // Small enough for the socket buffers of a connection nobody accepted yet.
        let p = Payload::new(5_001, 40 * KIB + 3);
        // The refused pairs run on splice. Neither moves a byte through our memory:
        // the proxied one's payload, all of it queued behind the header when the
        // header is read, is spliced by relay_partly_read before the maps refuse it.
        fwd.expect_paths(&["splice"])
            .expect_pairs(2)
            .expect_userspace_at_most(0);
        for (name, src) in [("plain", None), ("proxied", Some("192.0.2.50:41000"))] {
            let addr = fwd.rule_addr(name);
            let header = |src: &str| {
                let src: SocketAddr = src.parse().unwrap();
                format!(
                    "PROXY TCP4 {} {} {} {}\r\n",
                    src.ip(),
                    addr.ip(),
                    src.port(),
                    addr.port()
                )
            };
            let first = connect(addr);
            if src.is_some() {
                (&first)
                    .write_all(header("192.0.2.49:41000").as_bytes())
                    .unwrap();
            }
            ping(&first, b"first", secs(5)).expect("first client");
            let second = connect(addr);
            let mut bytes = src.map(header).unwrap_or_default().into_bytes();
            bytes.extend(p.to_vec());
            (&second).write_all(&bytes).unwrap();
            second.shutdown(std::net::Shutdown::Write).unwrap();
            thread::sleep(Duration::from_millis(200));
            // The first leaves; the second is accepted, half-closed already.
            let first_id = match src {
                Some(_) => "192.0.2.49:41000".parse().unwrap(),
                None => first.local_addr().unwrap(),
            };
            first.shutdown(std::net::Shutdown::Write).unwrap();
            let r = read_checked(&first, Payload::new(0, 0), None, Instant::now() + secs(5));
            assert!(
                matches!(r.end, End::Eof) && r.got == 0,
                "{name}: first client: {r:?}"
            );
            drop(first);
            let second_id = match src {
                Some(s) => s.parse().unwrap(),
                None => second.local_addr().unwrap(),
            };
            let r = read_checked(&second, p, None, Instant::now() + secs(10));
            assert!(
                r.intact && r.digest() == Digested::of(&p) && matches!(r.end, End::Eof),
                "{name}: second client: {r:?}"
            );
            // Each upstream connection reports when its handler ends, which need not be
            // in the clients' order: the first's handler may be preempted between its
            // shutdown (the EOF the first client read) and its report while the second
            // connection runs to its end (seen beside CPU hogs).
            let mut reports = Server::reports(&rx, 2, secs(5));
            reports.sort_by_key(|d| d.len);
            assert_eq!(reports[0].len, 5, "{name}: first upload (\"first\")");
            assert_eq!(reports[1], Digested::of(&p), "{name}: upload");
            let l1 = wait_close_of(&fwd, name, first_id, secs(5));
            let l2 = wait_close_of(&fwd, name, second_id, secs(5));
            println!("{name}:\n  {l1}\n  {l2}");
            assert_eq!(field(&l1, "path"), Some("ebpf"), "{l1}");
            assert_eq!(field(&l2, "path"), Some("splice"), "{l2}");
            assert_eq!(field(&l2, "end"), Some("closed"), "{l2}");
            assert_eq!(num(&l2, "bytes_down"), p.len, "{l2}");
            assert_eq!(num(&l2, "bytes_up"), p.len, "{name}: bytes_up: {l2}");
            assert_eq!(
                num(&l2, "userspace_bytes"),
                0,
                "{name}: userspace_bytes: {l2}"
            );
        }
        let warns: Vec<String> = fwd
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("cannot pair sockets"))
            .collect();
        println!("{warns:#?}");
        assert_eq!(warns.len(), 2, "one warning per refused pair: {warns:#?}");
        // Each names its client, as the pair's close line does.
        assert!(
            warns
                .iter()
                .all(|w| w.contains("client socket in TCP state") && field(w, "client").is_some()),
            "{warns:#?}"
        );
    }
}
