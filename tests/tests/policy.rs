//! Traffic policy through the real binary: balancing, health, ACL, schedule, per-source
//! limits, PROXY protocol against nginx. Each test runs on both relay paths.

use std::ffi::OsString;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use forwarder_tests::*;

#[path = "policy/support.rs"]
mod support;
use support::*;

/// The forwarder with one rule (`listen`, `mode` and `body`) from a config file, with
/// extra environment variables (the schedule's clock, say).
fn start(mode: Mode, listen: &str, body: &str, env: &[(&str, &str)]) -> Forwarder {
    let dir = TempDir::new("policy");
    let text = format!(
        "[[rule]]\nname = \"t\"\nlisten = \"{listen}\"\nmode = \"{}\"\n{body}\n",
        mode.as_str()
    );
    let path = dir.write("forwarder.toml", &text);
    let mut prefix: Vec<OsString> = Vec::new();
    if !env.is_empty() {
        prefix.push("/usr/bin/env".into());
        prefix.extend(env.iter().map(|(k, v)| OsString::from(format!("{k}={v}"))));
    }
    let fwd = Forwarder::spawn(
        &prefix,
        vec!["run".into(), "-c".into(), path.into()],
        1,
        Some(dir),
    );
    fwd.expect_mode(mode);
    fwd
}

fn local(mode: Mode, body: &str) -> Forwarder {
    start(mode, "127.0.0.1:0", body, &[])
}

fn wait_log(fwd: &Forwarder, needle: &str, timeout: Duration) -> bool {
    fwd.stderr
        .wait_for(timeout, |l| l.contains(needle))
        .is_some()
}

/// What `ask` sends first. The named server answers only after it: on the kernel path
/// the pair is set up before the server can send a byte, so its answer and FIN are
/// relayed by the kernel (a FIN already queued on the upstream socket when pairing
/// starts makes the pair fall back to splice).
const REQUEST: &[u8] = b"name?\n";

/// A server that answers every connection's request line with its own name and closes.
struct NamedServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _stop: StopOnDrop,
}

fn named_server(name: &'static str, listener: TcpListener) -> NamedServer {
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let stop = StopOnDrop::new(addr);
    let flag = stop.flag();
    let server = thread::spawn(move || {
        for conn in listener.incoming() {
            if flag.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(mut c) = conn {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                // Health checks and refused clients close without a request: no answer.
                if !read_request(&mut c) {
                    continue;
                }
                let _ = c.write_all(name.as_bytes());
                let _ = c.shutdown(Shutdown::Write);
                // Wait for the peer's close so our FIN is not turned into a reset.
                let _ = c.read(&mut [0u8; 16]);
            }
        }
    });
    NamedServer {
        addr,
        accepted,
        _stop: stop.thread(server),
    }
}

/// Reads `REQUEST` (bounded by the socket's read timeout and its length); false on
/// EOF, an error, or other bytes.
fn read_request(c: &mut TcpStream) -> bool {
    let mut got = [0u8; REQUEST.len()];
    c.read_exact(&mut got).is_ok() && got == REQUEST
}

fn local_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// A listener on a loopback address no other test uses (see `free_loopback_addr`).
fn own_listener() -> TcpListener {
    TcpListener::bind((free_loopback_addr().ip(), 0)).unwrap()
}

/// Connects from `source` (a 127.0.0.x address), sends `REQUEST` and reads the
/// upstream's name.
fn ask(fwd: SocketAddr, source: Option<IpAddr>) -> Result<String, String> {
    let mut s = connect_from(fwd, source).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(REQUEST).map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if out.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(out)
}

fn tally(answers: &[String], names: &[&str]) -> Vec<usize> {
    names
        .iter()
        .map(|n| answers.iter().filter(|a| a == n).count())
        .collect()
}

/// `GET /name` through the forwarder at `fwd`: the body (which upstream answered).
fn get_name(fwd: SocketAddr) -> String {
    let mut s = TcpStream::connect(fwd).unwrap();
    s.write_all(b"GET /name HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    read_response(&mut s)
}

fn upstream_list(servers: &[&NamedServer]) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    format!("[{}]", list.join(", "))
}

relay_tests! {
    fn round_robin_and_weights(mode) {
        let (a, b, c) = (named_server("a", local_listener()), named_server("b", local_listener()), named_server("c", local_listener()));
        let fwd = local(mode, &format!("balance = \"round_robin\"\nupstream = {}", upstream_list(&[&a, &b, &c])));
        let answers: Vec<String> = (0..300).map(|_| ask(fwd.addr(), None).unwrap()).collect();
        let counts = tally(&answers, &["a", "b", "c"]);
        eprintln!("round_robin 300 connections: {counts:?}");
        assert!(counts.iter().all(|&n| (99..=101).contains(&n)), "{counts:?}");
        drop(fwd);

        let weighted = format!(
            "balance = \"round_robin\"\nupstream = [{{ addr = \"{}\", weight = 3 }}, \"{}\", \"{}\"]",
            a.addr, b.addr, c.addr
        );
        let fwd = local(mode, &weighted);
        let answers: Vec<String> = (0..300).map(|_| ask(fwd.addr(), None).unwrap()).collect();
        let counts = tally(&answers, &["a", "b", "c"]);
        eprintln!("weights 3:1:1, 300 connections: {counts:?}");
        assert!((179..=181).contains(&counts[0]) && (59..=61).contains(&counts[1]), "{counts:?}");
    }

    /// `least_conn` over short connections (all upstreams at 0 open, or nearly):
    /// the ties follow the weights, 3:1:1 of 300 (it spread them 1:1:1).
    fn least_conn_ties_follow_the_weights(mode) {
        let (a, b, c) = (named_server("a", local_listener()), named_server("b", local_listener()), named_server("c", local_listener()));
        let weighted = format!(
            "balance = \"least_conn\"\nupstream = [{{ addr = \"{}\", weight = 3 }}, \"{}\", \"{}\"]",
            a.addr, b.addr, c.addr
        );
        let fwd = local(mode, &weighted);
        // One at a time, each closed at the forwarder (its close line) before the next:
        // every pick is a tie at 0 open.
        let answers: Vec<String> = (0..300)
            .map(|i| {
                let answer = ask(fwd.addr(), None).unwrap();
                fwd.wait_close_lines(i + 1, Duration::from_secs(10));
                answer
            })
            .collect();
        let counts = tally(&answers, &["a", "b", "c"]);
        eprintln!("least_conn, weights 3:1:1, 300 connections: {counts:?}");
        assert!((175..=185).contains(&counts[0]) && counts[1..].iter().all(|n| (55..=65).contains(n)), "{counts:?}");
    }

    fn source_hash_sticky_and_consistent(mode) {
        // source_hash is a function of the source address and the upstream list (the
        // `addr` strings), so fixed upstream addresses make the assignment, and so its
        // spread, the same on every run. One loopback /16 per mode: both modes run at once.
        let net = match mode {
            Mode::Splice => 101,
            Mode::Ebpf => 102,
        };
        let server = |name: &'static str, host: u8| {
            let addr = SocketAddr::from(([127, net, 0, host], 24680));
            let listener = TcpListener::bind(addr).unwrap_or_else(|e| {
                panic!("bind {addr} (a fixed address of this test; is another run of it going on?): {e}")
            });
            named_server(name, listener)
        };
        let (a, b, c) = (server("a", 1), server("b", 2), server("c", 3));
        let names = ["a", "b", "c"];
        let addrs: Vec<String> = [&a, &b, &c].iter().map(|s| s.addr.to_string()).collect();
        let sources: Vec<IpAddr> = (2..42).map(|n| IpAddr::from([127, 0, 0, n])).collect();
        let expected: Vec<&str> = sources.iter().map(|&src| names[source_hash_pick(src, &addrs)]).collect();

        let fwd = local(mode, &format!("balance = \"source_hash\"\nupstream = {}", upstream_list(&[&a, &b, &c])));
        // Sticky: three rounds over all sources, each source always on the upstream the
        // hash gives it.
        for round in 0..3 {
            for (src, want) in sources.iter().zip(&expected) {
                let got = ask(fwd.addr(), Some(*src)).unwrap();
                assert_eq!(got, *want, "round {round}: {src} went to {got}, its hash says {want}");
            }
        }
        // Spread: every upstream gets at least 1/6 of the sources. For these addresses
        // the hash (std's DefaultHasher, SipHash-1-3, as of Rust 1.95) gives a/b/c [17, 10, 13] (splice)
        // and [17, 9, 14] (ebpf): certain, as both are fixed. Over random ports, 2% of
        // lists would give some upstream fewer than 7 of 40.
        let counts = tally(&expected.iter().map(|x| x.to_string()).collect::<Vec<_>>(), &names);
        eprintln!("source_hash, 40 sources over a/b/c: {counts:?}");
        assert!(counts.iter().all(|&n| n * 6 >= sources.len()), "uneven spread: {counts:?}");
        drop(fwd);

        // Without c, only c's sources move, each to its next best upstream.
        let fwd = local(mode, &format!("balance = \"source_hash\"\nupstream = {}", upstream_list(&[&a, &b])));
        for (src, first) in sources.iter().zip(&expected) {
            let now = ask(fwd.addr(), Some(*src)).unwrap();
            if *first == "c" {
                assert_eq!(now, names[source_hash_pick(*src, &addrs[..2])], "{src} left c for the wrong upstream");
            } else {
                assert_eq!(now, *first, "{src} moved from {first} although it stayed");
            }
        }
    }

    fn failover_with_health_checks(mode) {
        let a = named_server("a", local_listener());
        // On an address of its own: a port released on 127.0.0.1 can be another test's
        // listener before it is bound again (or while it should refuse).
        let b_listener = own_listener();
        let b_addr = b_listener.local_addr().unwrap();
        let b = named_server("b", b_listener);
        let fwd = local(mode, &format!("balance = \"round_robin\"\nupstream = {}\ncheck_interval = \"200ms\"\nrise = 2\nfall = 2", upstream_list(&[&a, &b])));
        for _ in 0..20 {
            ask(fwd.addr(), None).unwrap();
        }
        drop(b); // b's port now refuses
        let killed = Instant::now();
        let mut failures = 0;
        let mut answers = Vec::new();
        while killed.elapsed() < Duration::from_secs(2) {
            match ask(fwd.addr(), None) {
                Ok(x) => answers.push(x),
                Err(_) => failures += 1,
            }
        }
        assert!(wait_log(&fwd, "is DOWN", Duration::from_secs(3)), "b never marked down");
        assert_eq!(failures, 0, "clients saw a dead upstream while a healthy one existed");
        assert!(answers.iter().all(|x| x == "a"));
        // Back on the same port: up again after `rise` good checks.
        let b = named_server("b", TcpListener::bind(b_addr).unwrap());
        let back = Instant::now();
        assert!(wait_log(&fwd, "is UP", Duration::from_secs(5)), "b never came back");
        eprintln!("failover: {} connections during the outage, 0 failed; b back after {:?}", answers.len(), back.elapsed());
        let answers: Vec<String> = (0..20).map(|_| ask(fwd.addr(), None).unwrap()).collect();
        assert!(answers.iter().any(|x| x == "b"), "{answers:?}");
        drop(b);
    }

    fn access_lists_v4_and_v6(mode) {
        let up = named_server("up", local_listener());
        let fwd = local(mode, &format!("upstream = \"{}\"\nallow = [\"127.0.0.1/32\"]", up.addr));
        assert_eq!(ask(fwd.addr(), Some([127, 0, 0, 1].into())).unwrap(), "up");
        let before = up.accepted.load(Ordering::Relaxed);
        assert!(ask(fwd.addr(), Some([127, 0, 0, 2].into())).is_err(), "127.0.0.2 was served");
        thread::sleep(Duration::from_millis(200));
        assert_eq!(up.accepted.load(Ordering::Relaxed), before, "upstream saw a refused client");
        assert!(wait_log(&fwd, "reason=acl", Duration::from_secs(2)));

        let up6 = TcpListener::bind("[::1]:0").unwrap();
        let up6 = named_server("up6", up6);
        let allow = start(mode, "[::1]:0", &format!("upstream = \"{}\"\nallow = [\"::1/128\"]", up6.addr), &[]);
        assert_eq!(ask(allow.addr(), None).unwrap(), "up6");
        let mut deny = start(mode, "[::1]:0", &format!("upstream = \"{}\"\ndeny = [\"::1\"]", up6.addr), &[]);
        // Its only client is refused: no pair to check.
        deny.expect_pairs(0);
        let before = up6.accepted.load(Ordering::Relaxed);
        match TcpStream::connect(deny.addr()) {
            // The reset came before connect() had seen the handshake complete.
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "[::1] denied: connect: {e}"),
            Ok(s) => {
                let (ending, _) = wait_closed(&s, Duration::from_secs(2)).unwrap_or_else(|e| panic!("[::1] denied: not refused: {e}"));
                assert_eq!(ending, Ending::Reset, "[::1] denied: refused with a clean close");
            }
        }
        assert!(wait_log(&deny, "reason=acl", Duration::from_secs(2)), "no reason=acl line for [::1]");
        thread::sleep(Duration::from_millis(200));
        assert_eq!(up6.accepted.load(Ordering::Relaxed), before, "the upstream saw a denied client");
        deny.assert_running();

        // A v4 client of a dual-stack listener arrives as ::ffff:a.b.c.d: an entry
        // written in that form is its IPv4 entry (kept as IPv6 it never matched, and a
        // deny let the client in).
        let dual = start(mode, "[::]:0", &format!("upstream = \"{}\"\ndeny = [\"::ffff:127.0.0.2\"]", up.addr), &[]);
        let v4 = SocketAddr::from(([127, 0, 0, 1], dual.addr().port()));
        assert_eq!(ask(v4, Some([127, 0, 0, 1].into())).unwrap(), "up");
        let before = up.accepted.load(Ordering::Relaxed);
        assert!(ask(v4, Some([127, 0, 0, 2].into())).is_err(), "127.0.0.2, denied as ::ffff:127.0.0.2, was served");
        assert!(wait_log(&dual, "reason=acl", Duration::from_secs(2)), "no reason=acl line for ::ffff:127.0.0.2");
        thread::sleep(Duration::from_millis(200));
        assert_eq!(up.accepted.load(Ordering::Relaxed), before, "the upstream saw a denied client");
    }

    /// `backup = true` upstreams get clients only while every primary is down: none
    /// while the primary answers, all once its port refuses (passive detection, fall 1).
    fn backup_upstreams_only_when_the_primaries_are_down(mode) {
        // On an address of its own: its port must refuse once dropped, and one
        // released on 127.0.0.1 can be another test's listener by then.
        let a = named_server("a", own_listener());
        let b = named_server("b", local_listener());
        let fwd = local(mode, &format!("upstream = [\"{}\", {{ addr = \"{}\", backup = true }}]\nbalance = \"round_robin\"\nfall = 1", a.addr, b.addr));
        let answers: Vec<String> = (0..6).map(|_| ask(fwd.addr(), None).unwrap()).collect();
        assert!(answers.iter().all(|x| x == "a"), "the backup got clients while the primary answered: {answers:?}");
        assert_eq!(b.accepted.load(Ordering::Relaxed), 0);
        drop(a); // its port now refuses
        let answers: Vec<String> = (0..6).map(|_| ask(fwd.addr(), None).unwrap()).collect();
        assert!(answers.iter().all(|x| x == "b"), "with the primary down: {answers:?}");
        assert!(wait_log(&fwd, "is DOWN", Duration::from_secs(2)), "the primary never marked down");
    }

    /// `random` (power of two choices by load): 60 short clients one after another
    /// reach each of 3 upstreams (at equal load the pick is uniform: fewer than 5 of
    /// 60 is a 1-in-50,000 event).
    fn random_reaches_every_upstream(mode) {
        let (a, b, c) = (named_server("a", local_listener()), named_server("b", local_listener()), named_server("c", local_listener()));
        let fwd = local(mode, &format!("balance = \"random\"\nupstream = {}", upstream_list(&[&a, &b, &c])));
        let answers: Vec<String> = (0..60).map(|_| ask(fwd.addr(), None).unwrap()).collect();
        for name in ["a", "b", "c"] {
            let n = answers.iter().filter(|x| *x == name).count();
            assert!(n >= 5, "{name} got {n} of 60: {answers:?}");
        }
    }

    /// `deny` wins over `allow`: a client both name is refused, one only `allow`
    /// names is served.
    fn deny_wins_over_allow(mode) {
        let up = named_server("up", local_listener());
        let fwd = local(mode, &format!("upstream = \"{}\"\nallow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.2\"]", up.addr));
        assert_eq!(ask(fwd.addr(), Some([127, 0, 0, 1].into())).unwrap(), "up");
        let before = up.accepted.load(Ordering::Relaxed);
        assert!(ask(fwd.addr(), Some([127, 0, 0, 2].into())).is_err(), "127.0.0.2, allowed and denied, was served");
        assert!(wait_log(&fwd, "reason=acl", Duration::from_secs(2)));
        assert_eq!(up.accepted.load(Ordering::Relaxed), before, "the upstream saw a denied client");
    }

    /// `proxy_protocol_timeout` bounds the wait for a front balancer's header: a
    /// client that sends none is refused after it (1 s here, not the 5 s default),
    /// `reason=bad_proxy_header`, and no upstream connection is made.
    fn proxy_protocol_timeout_bounds_the_header_wait(mode) {
        let up = named_server("up", local_listener());
        let fwd = local(mode, &format!("upstream = \"{}\"\naccept_proxy_protocol = true\nproxy_protocol_timeout = \"1s\"", up.addr));
        fwd.expect_pairs(0);
        let s = TcpStream::connect(fwd.addr()).unwrap();
        let t0 = Instant::now();
        let (_, _) = wait_closed(&s, Duration::from_secs(4)).unwrap_or_else(|e| panic!("not closed within 4 s: {e}"));
        let waited = t0.elapsed();
        assert!(waited > Duration::from_millis(800) && waited < Duration::from_millis(2500), "closed after {waited:?}");
        assert!(wait_log(&fwd, "reason=bad_proxy_header", Duration::from_secs(2)));
        assert_eq!(up.accepted.load(Ordering::Relaxed), 0, "the upstream saw a client with no header");
    }

    fn schedule_with_injected_clock(mode) {
        let up = named_server("up", local_listener());
        let rule = format!("upstream = \"{}\"\nschedule = [\"Mon-Fri 09:00-17:00\"]\ntimezone = \"Europe/Berlin\"", up.addr);
        // 2026-11-23 is a Monday; 10:00 UTC is 11:00 in Berlin.
        let open = start(mode, "127.0.0.1:0", &rule, &[("FORWARDER_FAKE_NOW", "2026-11-23T10:00:00Z")]);
        assert_eq!(ask(open.addr(), None).unwrap(), "up");
        let closed = start(mode, "127.0.0.1:0", &rule, &[("FORWARDER_FAKE_NOW", "2026-11-28T10:00:00Z")]);
        // Closed all day: its only client is refused, no pair to check.
        closed.expect_pairs(0);
        assert!(ask(closed.addr(), None).is_err(), "served on a Saturday");
        assert!(wait_log(&closed, "reason=schedule", Duration::from_secs(2)));
        // The window is Berlin's (UTC+1 in November), not UTC's: the two hours where
        // they differ say so. 08:30 UTC is 09:30 in Berlin: open.
        let berlin_open = start(mode, "127.0.0.1:0", &rule, &[("FORWARDER_FAKE_NOW", "2026-11-23T08:30:00Z")]);
        assert_eq!(ask(berlin_open.addr(), None).unwrap(), "up", "09:30 in Berlin");
        // 16:30 UTC is 17:30 in Berlin: closed.
        let berlin_closed = start(mode, "127.0.0.1:0", &rule, &[("FORWARDER_FAKE_NOW", "2026-11-23T16:30:00Z")]);
        berlin_closed.expect_pairs(0);
        assert!(ask(berlin_closed.addr(), None).is_err(), "served at 17:30 in Berlin");
        assert!(wait_log(&berlin_closed, "reason=schedule", Duration::from_secs(2)));
        // With no timezone, UTC: 08:30 UTC is before 09:00.
        let utc = format!("upstream = \"{}\"\nschedule = [\"Mon-Fri 09:00-17:00\"]", up.addr);
        let utc_closed = start(mode, "127.0.0.1:0", &utc, &[("FORWARDER_FAKE_NOW", "2026-11-23T08:30:00Z")]);
        utc_closed.expect_pairs(0);
        assert!(ask(utc_closed.addr(), None).is_err(), "served at 08:30 UTC with no timezone");
        assert!(wait_log(&utc_closed, "reason=schedule", Duration::from_secs(2)));
    }

    /// The injected clock runs from the process start, as README says, not from the
    /// first client: started 1 s before the window closes, a first client 2 s later is
    /// refused (audit: it was served, the clock starting at its connect).
    fn injected_clock_runs_from_the_start(mode) {
        let up = named_server("up", local_listener());
        let rule = format!("upstream = \"{}\"\nschedule = [\"Mon 09:00-10:00\"]", up.addr);
        let fwd = start(mode, "127.0.0.1:0", &rule, &[("FORWARDER_FAKE_NOW", "2026-11-23T09:59:59Z")]);
        fwd.expect_pairs(0);
        thread::sleep(Duration::from_secs(2));
        assert!(ask(fwd.addr(), None).is_err(), "served at 10:00:01 by a Mon 09:00-10:00 schedule");
        assert!(wait_log(&fwd, "reason=schedule", Duration::from_secs(2)));
    }

    fn max_connection_duration(mode) {
        let echo_server = Server::echo();
        let echo = echo_server.addr();
        let fwd = local(mode, &format!("upstream = \"{echo}\"\nmax_connection_duration = \"1s\""));
        let mut s = TcpStream::connect(fwd.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 4];
        // Busy the whole time: the duration cap is not an idle timeout.
        let ended = loop {
            if let Err(e) = s.write_all(b"ping") {
                break Err(e.kind());
            }
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Err(e) => break Err(e.kind()),
                Ok(_) => thread::sleep(Duration::from_millis(50)),
            }
            assert!(started.elapsed() < Duration::from_secs(5), "never closed");
        };
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
        // Between two pings nothing is in flight: a clean close or, caught mid-ping,
        // a reset (relay::shutdown_grace_cut_resets_the_pair cuts a transfer).
        assert!(
            matches!(ended, Ok(()) | Err(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)),
            "the cut pair ended with {ended:?}"
        );
        assert!(wait_log(&fwd, "end=max_connection_duration", Duration::from_secs(2)));
    }

    /// `max_connection_duration` counts from the accept, as the close line's duration
    /// does: a client whose front balancer sends the PROXY header 1.3 s after connect,
    /// under a 1 s limit, is cut as soon as its pair would start (it was 1 s later,
    /// 2.3 s after connect, its echo served in between).
    fn max_connection_duration_counts_from_the_accept(mode) {
        let echo_server = Server::echo();
        let echo = echo_server.addr();
        let fwd = local(
            mode,
            &format!("upstream = \"{echo}\"\naccept_proxy_protocol = true\nmax_connection_duration = \"1s\""),
        );
        // Cut before its relay moved a byte: the pair took no path.
        fwd.expect_pairs(0);
        let mut s = TcpStream::connect(fwd.addr()).unwrap();
        let started = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        thread::sleep(Duration::from_millis(1300));
        s.write_all(b"PROXY TCP4 127.0.0.9 127.0.0.1 5555 80\r\nping").unwrap();
        let mut got = Vec::new();
        let ended = s.read_to_end(&mut got);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(2100), "cut {took:?} after connect; the limit is 1 s");
        assert!(got.is_empty(), "served {got:?} past the limit (ended {ended:?})");
        let line = fwd
            .stderr
            .wait_for(Duration::from_secs(3), |l| l.contains(" close "))
            .unwrap_or_else(|| panic!("no close line: {}", fwd.stderr.text()));
        assert!(line.contains("end=max_connection_duration"), "{line}");
        assert_eq!(field(&line, "path"), Some("none"), "{line}");
    }

    fn per_source_connection_limit(mode) {
        let echo_server = Server::echo();
        let echo = echo_server.addr();
        let fwd = local(mode, &format!("upstream = \"{echo}\"\nmax_connections_per_source = 2"));
        let src2 = Some(IpAddr::from([127, 0, 0, 2]));
        let mut held: Vec<TcpStream> = (0..2).map(|_| echo_once(fwd.addr(), src2).unwrap()).collect();
        let served = echo_server.accepted();

        // The third is accepted by the kernel, then refused by the forwarder at once: it
        // is closed (a reset) within 1 s, its bytes never echoed, the upstream never
        // connected. A client left waiting would still be open after 1 s.
        match connect_from(fwd.addr(), src2) {
            // The reset came before connect() had seen the handshake complete.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => eprintln!("third connection from 127.0.0.2: reset during connect"),
            Err(e) => panic!("third connection: connect: {e}"),
            Ok(third) => {
                // Fails if the reset is already in; the read after it then sees EOF.
                let reset_on_write = matches!((&third).write_all(b"hello"), Err(e) if e.kind() == ErrorKind::ConnectionReset);
                match wait_closed(&third, Duration::from_secs(1)) {
                    Ok((ending, after)) => {
                        eprintln!("third connection from 127.0.0.2: {ending:?} after {after:?} (reset on write: {reset_on_write})");
                        assert!(reset_on_write || ending == Ending::Reset, "third connection: refused with a clean close");
                    }
                    Err(e) => panic!("third connection from one source was not refused: {e}"),
                }
            }
        }
        let refused = |l: &str| l.contains(" refused rule=t client=127.0.0.2:") && l.contains(" reason=max_connections_per_source ");
        assert!(
            fwd.stderr.wait_for(Duration::from_secs(2), refused).is_some(),
            "no `refused rule=t client=127.0.0.2:... reason=max_connections_per_source` line"
        );
        assert_eq!(echo_server.accepted(), served, "the refused client reached the upstream");

        // Other sources are still served.
        for n in 3..6 {
            echo_once(fwd.addr(), Some(IpAddr::from([127, 0, 0, n]))).unwrap();
        }
        // Once one of the two held connections is over (its close line is logged just
        // before its slot is given back), the source is served again.
        let done = held.pop().unwrap();
        let closed = format!(" close rule=t client={} ", done.local_addr().unwrap());
        drop(done);
        assert!(
            fwd.stderr.wait_for(Duration::from_secs(5), |l| l.contains(&closed)).is_some(),
            "no close line for the held connection that closed"
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        let again = loop {
            match echo_once(fwd.addr(), src2) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => panic!("127.0.0.2 not served after one of its connections closed: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        drop((again, held));
    }

    fn per_source_rate_limit(mode) {
        let echo_server = Server::echo();
        let echo = echo_server.addr();
        let fwd = local(mode, &format!("upstream = \"{echo}\"\nrate_per_source = \"10/s\""));
        let src2 = Some(IpAddr::from([127, 0, 0, 2]));
        let started = Instant::now();
        let (mut served, mut refused) = (0, 0);
        // 2 s of attempts at ~50/s from one source: the bucket allows 10 + 10/s.
        let mut round = 0;
        while started.elapsed() < Duration::from_secs(2) {
            match echo_once(fwd.addr(), src2) {
                Ok(_) => served += 1,
                Err(_) => refused += 1,
            }
            // Another source, well under its own limit, is never affected.
            if round % 10 == 0 {
                echo_once(fwd.addr(), Some(IpAddr::from([127, 0, 0, 3]))).unwrap();
            }
            round += 1;
            thread::sleep(Duration::from_millis(20));
        }
        let expected = 10.0 + 10.0 * started.elapsed().as_secs_f64();
        eprintln!("rate_per_source 10/s: {served} served, {refused} refused in {:?} (bucket allows {expected:.1})", started.elapsed());
        assert!((served as f64) <= expected + 1.0 && (served as f64) >= expected - 3.0, "{served}");
    }

    /// `connect_from`: the upstream sees the rule's connections, and its health checks,
    /// come from that address (all of 127.0.0.0/8 is this host's).
    fn connect_from_picks_the_source_address(mode) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let up = {
            let seen = seen.clone();
            Server::start(LOCALHOST, move |s| {
                let ip = s.peer_addr().unwrap().ip();
                seen.lock().unwrap().push(ip);
                let _ = (&*s).write_all(ip.to_string().as_bytes());
                // Open until the client closes: on the kernel path a pair whose
                // upstream already closed is relayed by splice.
                let _ = (&*s).read(&mut [0u8; 1]);
            })
        };
        let body = format!("upstream = \"{}\"\nconnect_from = \"127.0.0.7\"\ncheck_interval = \"100ms\"", up.addr());
        let fwd = local(mode, &body);
        let mut s = TcpStream::connect(fwd.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = [0u8; 9];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"127.0.0.7", "the address the upstream saw");
        drop(s);
        // The client's connection and at least three checks.
        assert!(forwarder_tests::netns::wait_until(Duration::from_secs(5), || seen.lock().unwrap().len() >= 4));
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().all(|ip| ip.to_string() == "127.0.0.7"), "{seen:?}");
    }

    /// An upstream's `max_connections`: at the limit it is passed over, here to the
    /// backup, and used again once a connection to it ends; with nowhere to go, a
    /// client is closed at once (`end=connect_failed`), and no upstream is marked down.
    fn an_upstream_at_its_max_connections_is_passed_over(mode) {
        let (a, b) = (Server::greeting(b"A"), Server::greeting(b"B"));
        let greeted = |addr: SocketAddr| -> io::Result<(TcpStream, u8)> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut who = [0u8; 1];
            s.read_exact(&mut who)?;
            Ok((s, who[0]))
        };
        let body = format!("upstream = [{{ addr = \"{}\", max_connections = 2 }}, {{ addr = \"{}\", backup = true }}]", a.addr(), b.addr());
        let fwd = local(mode, &body);
        let mut held: Vec<(TcpStream, u8)> = (0..3).map(|_| greeted(fwd.addr()).unwrap()).collect();
        let who: Vec<u8> = held.iter().map(|(_, w)| *w).collect();
        assert_eq!(who, b"AAB", "the third client went past the full primary");
        drop(held.remove(0));
        assert_eq!(fwd.wait_close_lines(1, Duration::from_secs(5)).len(), 1);
        assert_eq!(greeted(fwd.addr()).unwrap().1, b'A', "a slot freed on the primary");
        // Alone and full: the client is closed, nothing is marked down.
        let body = format!("upstream = {{ addr = \"{}\", max_connections = 1 }}", a.addr());
        let alone = local(mode, &body);
        let (_first, w) = greeted(alone.addr()).unwrap();
        assert_eq!(w, b'A');
        let refused = greeted(alone.addr());
        assert!(refused.is_err(), "a second client of a full upstream was served");
        let close = alone.wait_close_lines(1, Duration::from_secs(5));
        assert_eq!(close.first().and_then(|l| field(l, "end")), Some("connect_failed"), "{close:?}");
        assert!(wait_log(&alone, "at their max_connections", Duration::from_secs(2)));
        assert!(!alone.log_lines().iter().any(|l| l.contains("is DOWN")), "{:?}", alone.log_lines());
    }

    fn proxy_protocol_from_haproxy_in_front(mode) {
        // HAProxy as the front balancer, with its v1 header and its v2 header carrying
        // TLVs (a unique id, a CRC32c of the header): our listener takes the client's
        // address from it and passes it on to nginx, which answers with what it was told.
        let nginx = Nginx::start();
        let upstream = format!("upstream = \"{}\"", nginx.addr);
        let fwd = local(mode, &format!("{upstream}\naccept_proxy_protocol = true\nproxy_protocol = \"v1\""));
        for send in ["send-proxy", "send-proxy-v2 proxy-v2-options unique-id,crc32c"] {
            let front = Haproxy::front(fwd.addr(), send);
            let mut s = TcpStream::connect(front.addr).unwrap();
            let me = s.local_addr().unwrap();
            // HTTP/1.1: nginx keeps its side open after the answer (one that closes
            // before the pair is made is relayed by splice on an ebpf rule).
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut s), format!("{}:{}", me.ip(), me.port()), "{send}");
        }
    }

    fn a_port_range_forwards_port_by_port(mode) {
        // The rule listens on three ports and names its upstream without a port: each
        // client goes to the port it came to, on the upstream's address. The ports are
        // found free on two addresses of the test's own.
        let (front, back) = (free_loopback_addr().ip(), free_loopback_addr().ip());
        let (base, servers) = (0..200u32)
            .find_map(|attempt| {
                let base = 20000 + ((std::process::id() * 7919 + attempt * 211) % 40000) as u16;
                let bound: Vec<TcpListener> = (0..3)
                    .map_while(|k| TcpListener::bind((back, base + k)).ok())
                    .collect();
                let free = (0..3).all(|k| TcpListener::bind((front, base + k)).is_ok());
                (bound.len() == 3 && free).then_some((base, bound))
            })
            .expect("three free ports in a row");
        let names = ["p0", "p1", "p2"];
        let _servers: Vec<NamedServer> = servers.into_iter().zip(names).map(|(l, n)| named_server(n, l)).collect();
        let listen = format!("{front}:{base}-{}", base + 2);
        let body = |idle: &str| format!("upstream = \"{back}\"\nidle_timeout = \"{idle}\"");
        let mut fwd = start(mode, &listen, &body("1h"), &[]);
        let listening = fwd.stderr.wait_for_n(3, Duration::from_secs(5), |l| l.contains("listening rule=t"));
        assert_eq!(listening.len(), 3, "one listening line per port");
        let port = |k: u16| SocketAddr::new(front, base + k);
        for round in 0..2 {
            for (k, name) in names.iter().enumerate() {
                assert_eq!(ask(port(k as u16), None).unwrap(), *name, "round {round}, port {}", base + k as u16);
            }
        }
        // A reload that changes the rule keeps its three sockets (binding any again
        // would fail: they are open), and the ports still go where they did.
        let text = format!("[[rule]]\nname = \"t\"\nlisten = \"{listen}\"\nmode = \"{}\"\n{}\n", mode.as_str(), body("2h"));
        let reloaded = fwd.reload(&text);
        assert!(reloaded.contains("reload ok") && reloaded.contains("changed=[t]"), "{reloaded}");
        for (k, name) in names.iter().enumerate() {
            assert_eq!(ask(port(k as u16), None).unwrap(), *name, "after the reload, port {}", base + k as u16);
        }
    }

    fn http_health_checks_follow_the_status(mode) {
        // python3 -m http.server upstreams accept every connection: only an HTTP check
        // tells that b has no /healthz (404). HTTP/1.1 keeps their side open after an
        // answer until the client closes (one that closes first is relayed by splice
        // on an ebpf rule).
        let (a_dir, b_dir) = (TempDir::new("check-a"), TempDir::new("check-b"));
        a_dir.write("healthz", "ok");
        a_dir.write("name", "a");
        b_dir.write("name", "b");
        let (_a, a, _) = python_http_server(a_dir.path(), &["--protocol", "HTTP/1.1"]);
        let (_b, b, b_log) = python_http_server(b_dir.path(), &["--protocol", "HTTP/1.1"]);
        let fwd = local(mode, &format!("balance = \"round_robin\"\nupstream = [\"{a}\", \"{b}\"]\ncheck_interval = \"100ms\"\ncheck_http = \"/healthz\"\nrise = 1\nfall = 1"));
        let down = format!("addr={b} is DOWN (check: GET /healthz answered HTTP 404 File not found)");
        assert!(wait_log(&fwd, &down, Duration::from_secs(5)), "no line {down:?}");
        // The check's request as b saw it: HTTP/1.1 with its Host header.
        assert!(b_log.wait_for(Duration::from_secs(2), |l| l.contains("\"GET /healthz HTTP/1.1\" 404")).is_some(), "b's log: {}", b_log.text());
        assert!(!fwd.stderr.text().contains(&format!("addr={a} is DOWN")), "a, which answers 200, went down");
        let names: Vec<String> = (0..6).map(|_| get_name(fwd.addr())).collect();
        assert!(names.iter().all(|n| n == "a"), "b served while down: {names:?}");
        // b gets its /healthz: up at the next check, and serves again.
        b_dir.write("healthz", "ok");
        let up = format!("addr={b} is UP (check)");
        assert!(wait_log(&fwd, &up, Duration::from_secs(5)), "no line {up:?}");
        let names: Vec<String> = (0..6).map(|_| get_name(fwd.addr())).collect();
        assert_eq!(tally(&names, &["a", "b"]), vec![3, 3], "{names:?}");
    }

    fn http_health_checks_send_a_local_proxy_header(mode) {
        // nginx wants a PROXY header on every connection and answers nothing without
        // one: a check on a rule that sends headers sends the spec's LOCAL (v2) or
        // UNKNOWN (v1) header first, and nginx answers it. The rule's second upstream
        // refuses connections: its DOWN line shows the checks ran.
        let nginx = Nginx::start();
        let check = "check_interval = \"100ms\"\ncheck_http = { path = \"/status\", host = \"health.example\", status = [200] }\nrise = 1\nfall = 1";
        let refusing = local_listener().local_addr().unwrap();
        for version in ["v1", "v2"] {
            let fwd = local(mode, &format!("upstream = [\"{}\", \"{refusing}\"]\nproxy_protocol = \"{version}\"\n{check}", nginx.addr));
            assert!(wait_log(&fwd, &format!("addr={refusing} is DOWN"), Duration::from_secs(5)), "{version}: no check ran");
            // Five more rounds of checks.
            thread::sleep(Duration::from_millis(500));
            let log = fwd.stderr.text();
            assert!(!log.contains(&format!("addr={} is DOWN", nginx.addr)), "{version}: nginx went down:\n{log}");
            // And clients still get their own address through.
            let mut s = TcpStream::connect(fwd.addr()).unwrap();
            let me = s.local_addr().unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut s), format!("{}:{}", me.ip(), me.port()), "{version}");
        }
        // Without the header, the same check fails: nginx closes without an answer.
        let fwd = local(mode, &format!("upstream = \"{}\"\n{check}", nginx.addr));
        let down = format!("addr={} is DOWN (check: GET /status: closed before an HTTP answer)", nginx.addr);
        assert!(wait_log(&fwd, &down, Duration::from_secs(5)), "no line {down:?}");
        fwd.expect_pairs(0);
    }

    fn proxy_protocol_to_nginx_and_from_a_client(mode) {
        let nginx = Nginx::start();
        for version in ["v1", "v2"] {
            let fwd = local(mode, &format!("upstream = \"{}\"\nproxy_protocol = \"{version}\"", nginx.addr));
            let mut s = TcpStream::connect(fwd.addr()).unwrap();
            let me = s.local_addr().unwrap();
            let body = http_get(&mut s);
            assert_eq!(body, format!("{}:{}", me.ip(), me.port()), "{version}");
        }
        // Our own listener accepting a header, passing the address on to nginx.
        let fwd = local(mode, &format!("upstream = \"{}\"\naccept_proxy_protocol = true\nproxy_protocol = \"v2\"", nginx.addr));
        // The header and the request in one write, as a balancer in front sends them:
        // the request is queued behind the header the forwarder read, and on the kernel
        // path the forwarder relays such a socket's queued bytes itself before pairing,
        // by splice (docs/ARCHITECTURE.md): no byte goes through userspace. HTTP/1.1
        // keeps nginx's side open after its answer: an HTTP/1.0 nginx can answer and
        // close before the pair is set up, and a closing upstream is relayed by splice.
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut s = TcpStream::connect(fwd.addr()).unwrap();
        s.write_all(&[&b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n"[..], request].concat()).unwrap();
        assert_eq!(read_response(&mut s), "203.0.113.7:4242");
        drop(s); // the pair ends (and logs its close line) once both sides have closed
        let close = fwd.wait_close_lines(1, Duration::from_secs(5));
        assert_eq!(close.len(), 1, "no close line");
        assert_eq!(field(&close[0], "userspace_bytes"), Some("0"), "{}", close[0]);
        assert_eq!(field(&close[0], "bytes_up"), Some(request.len().to_string().as_str()), "{}", close[0]);
        fwd.expect_userspace_at_most(0);
        // A malformed header closes the connection without reaching nginx.
        let mut s = TcpStream::connect(fwd.addr()).unwrap();
        s.write_all(b"PROXY TCP4 203.0.113.7 nonsense\r\nGET / HTTP/1.0\r\n\r\n").unwrap();
        refused_at_once(s, "a malformed v1 header");
        assert!(wait_log(&fwd, "reason=bad_proxy_header", Duration::from_secs(2)));
        // So does a v2 header whose TLV runs past the header's length (a 600-byte value
        // announced, none there): it was taken, its address used.
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0f".to_vec();
        v2.extend_from_slice(&[203, 0, 113, 7, 127, 0, 0, 1, 0x10, 0x92, 0, 80, 0xee, 0x02, 0x58]);
        // (The refused line is written at most once a second per rule.)
        thread::sleep(Duration::from_millis(1100));
        let mut s = TcpStream::connect(fwd.addr()).unwrap();
        s.write_all(&[&v2[..], b"GET / HTTP/1.0\r\n\r\n"].concat()).unwrap();
        refused_at_once(s, "a TLV past the header");
        let refused = fwd.stderr.wait_for_n(2, Duration::from_secs(2), |l| {
            as_text(l).contains("reason=bad_proxy_header")
        });
        assert_eq!(refused.len(), 2, "two bad headers, two refusals");
    }
}

/// The upstream of the pacing test: `D` asks it for `p`, `U` has it read to EOF and
/// answer `LEN SHA256` of what it read.
fn up_or_down(p: Payload) -> Server {
    Server::start(LOCALHOST, move |s| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut what = [0u8; 1];
        if (&*s).read_exact(&mut what).is_err() {
            return;
        }
        if what[0] == b'D' {
            let _ = p.write_to(&s, deadline);
        } else if let Ok(d) = read_digest(&s, deadline) {
            let _ = (&*s).write_all(format!("{} {}", d.len, hex(&d.sha)).as_bytes());
        }
        let _ = s.shutdown(Shutdown::Write);
        let _ = read_to_end(&s, usize::MAX, deadline);
    })
}

/// `p` down from [`up_or_down`] through `fwd`, then up: how long each took, every
/// byte checked.
fn down_then_up(fwd: SocketAddr, p: Payload) -> [Duration; 2] {
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = connect(fwd);
    let t0 = Instant::now();
    (&s).write_all(b"D").unwrap();
    let got = read_digest(&s, deadline).expect("the download");
    let down = t0.elapsed();
    assert_eq!(got, Digested::of(&p), "downloaded bytes");
    let s = connect(fwd);
    let t0 = Instant::now();
    (&s).write_all(b"U").unwrap();
    p.write_to(&s, deadline).expect("the upload");
    s.shutdown(Shutdown::Write).unwrap();
    let answer = read_to_end(&s, 256, deadline).expect("the upstream's answer");
    let up = t0.elapsed();
    let want = format!("{} {}", p.len, hex(&p.sha256()));
    assert_eq!(String::from_utf8_lossy(&answer), want, "uploaded bytes");
    [down, up]
}

/// `download_rate` and `upload_rate` (nginx's proxy_download_rate/proxy_upload_rate):
/// after a second's worth at once, a direction moves at its rate and the other is not
/// held back, on splice and on a rewrite rule's copy path; `auto` runs a paced rule on
/// splice, which paces.
#[test]
fn rates_pace_each_direction() {
    const RATE: u64 = 1024 * 1024;
    let p = Payload::new(51, 3 * RATE);
    let up = up_or_down(p);
    // The first second's worth goes at once: the other two take two seconds, less the
    // read's quantum the bucket waits for (a fiftieth of a second).
    let paced = Duration::from_millis(1900);
    // The third also after an inspection prelude (a pattern the first byte rules out),
    // the last on a rewrite rule's copy path (a match the payload never has), each way.
    let never =
        "rewrite = [{ direction = \"to_client\", match = 'never-in-a-payload', replace = \"x\" }]";
    for (key, d, extra) in [
        ("download_rate", 0, ""),
        ("upload_rate", 1, ""),
        ("download_rate", 0, "deny_pattern = ['^X']"),
        ("download_rate", 0, never),
        ("upload_rate", 1, never),
    ] {
        let fwd = local(
            Mode::Splice,
            &format!("upstream = \"{}\"\n{key} = {RATE}\n{extra}", up.addr()),
        );
        // The prelude reads (at most) its window of the upload through our memory; the
        // copy path reads everything there.
        fwd.expect_userspace_at_most(match extra {
            "" => 0,
            e if e == never => 8 * RATE,
            _ => 4096,
        });
        let times = down_then_up(fwd.addr(), p);
        eprintln!("{key}: down {:?}, up {:?}", times[0], times[1]);
        assert!(
            times[d] >= paced,
            "{key}: 3 MiB at 1 MiB/s took {:?}",
            times[d]
        );
        assert!(times[d] < Duration::from_secs(10), "{key}: {:?}", times[d]);
        assert!(
            times[1 - d] * 2 < times[d],
            "{key}: the other direction was held back: {times:?}"
        );
    }
    // `auto`, paced: on splice, and saying why.
    let dir = TempDir::new("policy");
    let text = format!("[[rule]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nmode = \"auto\"\nupstream = \"{}\"\ndownload_rate = {RATE}\n", up.addr());
    let path = dir.write("forwarder.toml", &text);
    let fwd = Forwarder::spawn(
        &[],
        vec!["run".into(), "-c".into(), path.into()],
        1,
        Some(dir),
    );
    assert!(
        wait_log(
            &fwd,
            "mode=splice (auto: upload_rate/download_rate",
            Duration::from_secs(5)
        ),
        "{}",
        fwd.stderr.text()
    );
    let [down, _] = down_then_up(fwd.addr(), p);
    assert!(down >= paced, "auto: 3 MiB at 1 MiB/s took {down:?}");
}

/// The forwarder closes `s` (a reset or an empty EOF) within 1 s, having sent nothing:
/// a read that timed out (a forwarder still waiting for more header) is a failure too.
fn refused_at_once(mut s: TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: not closed within 1 s ({e})"),
    }
    assert!(out.is_empty(), "{what}: {}", String::from_utf8_lossy(&out));
}

/// A splice forwarder to `upstream` whose /etc/hosts is `hosts` (bind-mounted in a
/// mount namespace of its own): host names resolve as the test says.
fn forwarder_with_hosts(hosts: &std::path::Path, upstream: &str) -> Forwarder {
    let prefix = in_mount_namespace(&format!("mount --bind {} /etc/hosts", hosts.display()));
    let args = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--mode",
        "splice",
    ];
    Forwarder::spawn(&prefix, args.iter().map(OsString::from).collect(), 1, None)
}

/// An upstream named by a host name with two addresses, the first refusing: the
/// client is served by the second, and the forwarder says the first failed (the client
/// waited for it: `connect_timeout` where it is blackholed; nothing was said) and names
/// the address that answered in the close line. The name comes from a hosts file
/// bind-mounted over /etc/hosts in a mount namespace of the forwarder's own.
#[test]
fn a_names_failed_address_is_said() {
    let up = named_server("up", local_listener());
    let port = up.addr.port();
    let dir = TempDir::new("hosts");
    // ::1 first (getaddrinfo sorts loopback IPv6 before IPv4); nothing listens there.
    let hosts = dir.write(
        "hosts",
        "::1 two-addresses.test\n127.0.0.1 two-addresses.test\n",
    );
    let fwd = forwarder_with_hosts(&hosts, &format!("two-addresses.test:{port}"));
    assert_eq!(ask(fwd.addr(), None).unwrap(), "up");
    let failed = fwd.stderr.wait_for_n(1, Duration::from_secs(5), |l| {
        as_text(l).contains(" address failed: ")
    });
    let line = failed
        .first()
        .map(|l| as_text(l))
        .unwrap_or_else(|| panic!("no `address failed` line:\n{}", fwd.stderr.text()));
    assert!(
        line.contains(&format!("upstream=two-addresses.test:{port}"))
            && line.contains(&format!("[::1]:{port}")),
        "{line}"
    );
    let close = fwd.wait_close_lines(1, Duration::from_secs(5));
    assert_eq!(
        field(&close[0], "upstream"),
        Some(up.addr.to_string().as_str()),
        "{}",
        close[0]
    );
}

/// An upstream's host name is resolved at every connect (README: "DNS changes are
/// followed"): the name moves from one server to another (the hosts file, bind-mounted
/// over /etc/hosts in a mount namespace of the forwarder's own, rewritten in place), and
/// the next client reaches the new address, with no reload; each close line names the
/// address it reached.
#[test]
fn an_upstream_name_follows_dns_changes() {
    let first = named_server("first", TcpListener::bind("127.63.0.1:0").unwrap());
    let port = first.addr.port();
    let second = named_server("second", TcpListener::bind(("127.63.0.2", port)).unwrap());
    let dir = TempDir::new("hosts");
    let hosts = dir.write("hosts", "127.63.0.1 moving.test\n");
    let fwd = forwarder_with_hosts(&hosts, &format!("moving.test:{port}"));
    for _ in 0..2 {
        assert_eq!(ask(fwd.addr(), None).unwrap(), "first");
    }
    // In place (same inode): the bind mount shows the file, not the name.
    std::fs::write(&hosts, "127.63.0.2 moving.test\n").unwrap();
    for _ in 0..2 {
        assert_eq!(ask(fwd.addr(), None).unwrap(), "second");
    }
    let closes = fwd.wait_close_lines(4, Duration::from_secs(5));
    let mut reached: Vec<_> = closes
        .iter()
        .map(|l| field(l, "upstream").unwrap_or("?"))
        .collect();
    reached.sort();
    let (a, b) = (first.addr.to_string(), second.addr.to_string());
    assert_eq!(reached, [&a, &a, &b, &b], "{closes:#?}");
    assert_eq!(
        (
            first.accepted.load(Ordering::Relaxed),
            second.accepted.load(Ordering::Relaxed)
        ),
        (2, 2)
    );
}
