//! Traffic policy through the real binary: balancing, health, ACL, schedule, per-source
//! limits, PROXY protocol against nginx. Each test runs on both relay paths.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
    Forwarder::spawn(
        &prefix,
        vec!["run".into(), "-c".into(), path.into()],
        1,
        Some(dir),
    )
}

fn local(mode: Mode, body: &str) -> Forwarder {
    start(mode, "127.0.0.1:0", body, &[])
}

fn wait_log(fwd: &Forwarder, needle: &str, timeout: Duration) -> bool {
    fwd.stderr
        .wait_for(timeout, |l| l.contains(needle))
        .is_some()
}

/// A server that answers every connection with its own name and closes.
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
    thread::spawn(move || {
        for conn in listener.incoming() {
            if flag.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(mut c) = conn {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = c.write_all(name.as_bytes());
                let _ = c.shutdown(Shutdown::Write);
                // Wait for the peer's close so our FIN is not turned into a reset.
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = c.read(&mut [0u8; 16]);
            }
        }
    });
    NamedServer {
        addr,
        accepted,
        _stop: stop,
    }
}

fn local_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Connects from `source` (a 127.0.0.x address) and reads the upstream's name.
fn ask(fwd: SocketAddr, source: Option<IpAddr>) -> Result<String, String> {
    let mut s = connect_from(fwd, source).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
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

    fn source_hash_sticky_and_consistent(mode) {
        let (a, b, c) = (named_server("a", local_listener()), named_server("b", local_listener()), named_server("c", local_listener()));
        let sources: Vec<IpAddr> = (2..42).map(|n| IpAddr::from([127, 0, 0, n])).collect();
        let fwd = local(mode, &format!("balance = \"source_hash\"\nupstream = {}", upstream_list(&[&a, &b, &c])));
        let mut first = Vec::new();
        for &src in &sources {
            let answers: Vec<String> = (0..3).map(|_| ask(fwd.addr(), Some(src)).unwrap()).collect();
            assert!(answers.iter().all(|x| *x == answers[0]), "{src} not sticky: {answers:?}");
            first.push(answers[0].clone());
        }
        eprintln!("source_hash, 40 sources over a/b/c: {:?}", tally(&first, &["a", "b", "c"]));
        drop(fwd);
        // Without c, only c's sources move.
        let fwd = local(mode, &format!("balance = \"source_hash\"\nupstream = {}", upstream_list(&[&a, &b])));
        for (i, &src) in sources.iter().enumerate() {
            let now = ask(fwd.addr(), Some(src)).unwrap();
            if first[i] != "c" {
                assert_eq!(now, first[i], "{src} moved from {} although it stayed", first[i]);
            }
        }
    }

    fn failover_with_health_checks(mode) {
        let a = named_server("a", local_listener());
        let b_listener = local_listener();
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
        let deny = start(mode, "[::1]:0", &format!("upstream = \"{}\"\ndeny = [\"::1\"]", up6.addr), &[]);
        let before = up6.accepted.load(Ordering::Relaxed);
        assert!(ask(deny.addr(), None).is_err());
        thread::sleep(Duration::from_millis(200));
        assert_eq!(up6.accepted.load(Ordering::Relaxed), before);
    }

    fn schedule_with_injected_clock(mode) {
        let up = named_server("up", local_listener());
        let rule = format!("upstream = \"{}\"\nschedule = [\"Mon-Fri 09:00-17:00\"]\ntimezone = \"Europe/Berlin\"", up.addr);
        // 2026-11-23 is a Monday; 10:00 UTC is 11:00 in Berlin.
        let open = start(mode, "127.0.0.1:0", &rule, &[("FORWARDER_FAKE_NOW", "2026-11-23T10:00:00Z")]);
        assert_eq!(ask(open.addr(), None).unwrap(), "up");
        let closed = start(mode, "127.0.0.1:0", &rule, &[("FORWARDER_FAKE_NOW", "2026-11-28T10:00:00Z")]);
        assert!(ask(closed.addr(), None).is_err(), "served on a Saturday");
        assert!(wait_log(&closed, "reason=schedule", Duration::from_secs(2)));
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
        loop {
            if s.write_all(b"ping").is_err() {
                break;
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => thread::sleep(Duration::from_millis(50)),
            }
            assert!(started.elapsed() < Duration::from_secs(5), "never closed");
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
        assert!(wait_log(&fwd, "end=max_connection_duration", Duration::from_secs(2)));
    }

    fn per_source_connection_limit(mode) {
        let echo_server = Server::echo();
        let echo = echo_server.addr();
        let fwd = local(mode, &format!("upstream = \"{echo}\"\nmax_connections_per_source = 2"));
        let src2 = Some(IpAddr::from([127, 0, 0, 2]));
        let held: Vec<TcpStream> = (0..2).map(|_| echo_once(fwd.addr(), src2).unwrap()).collect();
        assert!(echo_once(fwd.addr(), src2).is_err(), "third connection from one source was served");
        // Other sources are still served.
        for n in 3..6 {
            echo_once(fwd.addr(), Some(IpAddr::from([127, 0, 0, n]))).unwrap();
        }
        drop(held);
        thread::sleep(Duration::from_millis(300));
        echo_once(fwd.addr(), src2).unwrap();
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

    fn proxy_protocol_to_nginx_and_from_a_client(mode) {
        let Some(nginx) = Nginx::start() else { return };
        for version in ["v1", "v2"] {
            let fwd = local(mode, &format!("upstream = \"{}\"\nproxy_protocol = \"{version}\"", nginx.addr));
            let mut s = TcpStream::connect(fwd.addr()).unwrap();
            let me = s.local_addr().unwrap();
            let body = http_get(&mut s);
            assert_eq!(body, format!("{}:{}", me.ip(), me.port()), "{version}");
        }
        // Our own listener accepting a header, passing the address on to nginx.
        let fwd = local(mode, &format!("upstream = \"{}\"\naccept_proxy_protocol = true\nproxy_protocol = \"v2\"", nginx.addr));
        let mut s = TcpStream::connect(fwd.addr()).unwrap();
        s.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n").unwrap();
        assert_eq!(http_get(&mut s), "203.0.113.7:4242");
        // A malformed header closes the connection without reaching nginx.
        let mut s = TcpStream::connect(fwd.addr()).unwrap();
        s.write_all(b"PROXY TCP4 203.0.113.7 nonsense\r\nGET / HTTP/1.0\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        assert!(wait_log(&fwd, "reason=bad_proxy_header", Duration::from_secs(2)));
    }
}
