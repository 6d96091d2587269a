//! Operating the forwarder: systemd notifications (READY, RELOADING, STOPPING,
//! WATCHDOG), JSON logs, the privilege drop to `[global] user`, and the config check
//! of that user. Each test runs on both relay paths (`splice::NAME`, `ebpf::NAME`).

use std::ffi::OsString;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use forwarder_tests::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `[[rule]]` text for one rule on the relay path `mode`.
fn rule(name: &str, listen: &str, upstream: SocketAddr, mode: Mode, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\nmode = \"{}\"\n{extra}\n",
        mode.as_str()
    )
}

/// `forwarder run -c FILE ARGS...` under `prefix`, the config written into `dir`
/// (as `forwarder.toml`, so [`Forwarder::reload`] rewrites it), waiting for `rules`
/// listening lines.
fn start_in(
    dir: TempDir,
    prefix: &[&str],
    toml: &str,
    extra_args: &[&str],
    rules: usize,
) -> Forwarder {
    let path = dir.write("forwarder.toml", toml);
    let mut args: Vec<OsString> = vec!["run".into(), "-c".into(), path.into()];
    args.extend(extra_args.iter().map(OsString::from));
    let prefix: Vec<OsString> = prefix.iter().map(OsString::from).collect();
    Forwarder::spawn(&prefix, args, rules, Some(dir))
}

/// CLOCK_MONOTONIC now, in microseconds (what systemd's MONOTONIC_USEC= means).
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for clock_gettime to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// SIGTERM, then waits for the forwarder to exit; returns how it ended.
fn terminate(fwd: &mut Forwarder) -> String {
    fwd.proc.signal(libc::SIGTERM);
    let status = fwd.proc.wait_timeout(secs(15)).unwrap_or_else(|| {
        panic!(
            "forwarder still running 15 s after SIGTERM; stderr:\n{}",
            fwd.stderr.text()
        )
    });
    fwd.stderr.wait_eof(secs(5));
    describe_status(&status)
}

// ---------------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------------

/// The receiving end of NOTIFY_SOCKET: every datagram the forwarder sent, in order.
struct NotifySocket {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    /// A socket in the abstract namespace (`NOTIFY_SOCKET=@name`, sd_notify(3)).
    fn bind_abstract(name: &str) -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr)
            .unwrap_or_else(|e| panic!("bind abstract unix datagram @{name}: {e}"));
        NotifySocket {
            sock,
            seen: Vec::new(),
        }
    }

    fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path)
            .unwrap_or_else(|e| panic!("bind unix datagram {}: {e}", path.display()));
        NotifySocket {
            sock,
            seen: Vec::new(),
        }
    }

    /// The next datagram, or None once `deadline` passes.
    fn recv(&mut self, deadline: Instant) -> Option<String> {
        let mut buf = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        self.sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                Some(msg)
            }
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => None,
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Reads datagrams until one satisfies `pred` (skipping WATCHDOG=1 pings, which
    /// come at any time, and checking nothing else arrives in between); panics after
    /// `timeout`.
    fn expect(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        for _ in 0..10_000 {
            match self.recv(deadline) {
                Some(m) if pred(&m) => return m,
                Some(m) if is_watchdog(&m) => {}
                Some(m) => panic!(
                    "waiting for {what}, got the notification {m:?} (all so far: {:?})",
                    self.seen
                ),
                None => break,
            }
        }
        panic!(
            "no {what} notification within {timeout:?}; got {:?}",
            self.seen
        );
    }
}

fn is_watchdog(msg: &str) -> bool {
    msg.lines().all(|l| l == "WATCHDOG=1")
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

// ---------------------------------------------------------------------------------
// JSON logs
// ---------------------------------------------------------------------------------

/// Every stderr line as a JSON object with string timestamp, level and message.
fn json_objects(lines: &[String]) -> Vec<Map<String, Value>> {
    assert!(!lines.is_empty(), "no log lines at all");
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l:?}"));
            let Value::Object(obj) = v else {
                panic!("log line is JSON but not an object: {l:?}");
            };
            for key in ["timestamp", "level", "message"] {
                assert!(
                    obj.get(key).is_some_and(Value::is_string),
                    "log line without a string {key:?}: {l}"
                );
            }
            obj
        })
        .collect()
}

fn message(obj: &Map<String, Value>) -> &str {
    obj["message"].as_str().unwrap()
}

fn str_of<'a>(obj: &'a Map<String, Value>, key: &str) -> &'a str {
    obj.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string {key:?} in {}", Value::Object(obj.clone())))
}

fn u64_of(obj: &Map<String, Value>, key: &str) -> u64 {
    obj.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no u64 {key:?} in {}", Value::Object(obj.clone())))
}

fn string_array(obj: &Map<String, Value>, key: &str) -> Vec<String> {
    let arr = obj
        .get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no array {key:?} in {}", Value::Object(obj.clone())));
    arr.iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{key:?} holds a non-string: {v}"))
                .to_string()
        })
        .collect()
}

/// The one object whose message is `msg` (and which satisfies `pred`).
fn find_msg<'a>(
    objs: &'a [Map<String, Value>],
    msg: &str,
    pred: impl Fn(&Map<String, Value>) -> bool,
) -> &'a Map<String, Value> {
    objs.iter()
        .find(|o| message(o) == msg && pred(o))
        .unwrap_or_else(|| {
            let all: Vec<String> = objs
                .iter()
                .map(|o| Value::Object(o.clone()).to_string())
                .collect();
            panic!("no {msg:?} line among:\n{}", all.join("\n"))
        })
}

/// An echo server, and a forwarder logging JSON with one rule `echo` in front of it.
fn json_echo_forwarder(mode: Mode, tag: &str) -> (Server, Forwarder) {
    let echo = Server::echo();
    let toml = rule("echo", "127.0.0.1:0", echo.addr(), mode, "");
    let fwd = start_in(TempDir::new(tag), &[], &toml, &["--log-format", "json"], 1);
    fwd.assert_mode(mode);
    (echo, fwd)
}

/// The close line of a forwarder's one connection, once it is logged; the forwarder
/// is stopped (exit 0) first.
fn only_close_then_stop(fwd: &mut Forwarder) -> Map<String, Value> {
    fwd.wait_close_lines(1, secs(10));
    assert_eq!(terminate(fwd), "exit 0");
    let objs = json_objects(&fwd.stderr.snapshot());
    find_msg(&objs, "close", |_| true).clone()
}

/// Checks the text close line's shape: `close rule=R client=A upstream=U bytes_up=N
/// bytes_down=N duration=X.XXXs path=MODE userspace_bytes=0 end=closed`.
fn assert_text_close_line(line: &str, rule: &str, upstream: SocketAddr, bytes: u64, mode: Mode) {
    let rest = line
        .split_once(" close ")
        .unwrap_or_else(|| panic!("no ' close ' in {line:?}"))
        .1;
    let fields: Vec<(&str, &str)> = rest
        .split(' ')
        .map(|kv| {
            kv.split_once('=')
                .unwrap_or_else(|| panic!("{kv:?} is not key=value in {line:?}"))
        })
        .collect();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    let want = [
        "rule",
        "client",
        "upstream",
        "bytes_up",
        "bytes_down",
        "duration",
        "path",
        "userspace_bytes",
        "end",
    ];
    assert_eq!(keys, want, "close line fields: {line:?}");
    let v = |k: &str| fields.iter().find(|(key, _)| *key == k).unwrap().1;
    assert_eq!(v("rule"), rule, "{line}");
    let client: SocketAddr = v("client")
        .parse()
        .unwrap_or_else(|e| panic!("client= is not an address ({e}): {line}"));
    assert!(client.ip().is_loopback(), "{line}");
    assert_eq!(v("upstream"), upstream.to_string(), "{line}");
    assert_eq!(v("bytes_up"), bytes.to_string(), "{line}");
    assert_eq!(v("bytes_down"), bytes.to_string(), "{line}");
    let d = v("duration");
    let num = d
        .strip_suffix('s')
        .unwrap_or_else(|| panic!("duration without 's': {line}"));
    let (int, frac) = num
        .split_once('.')
        .unwrap_or_else(|| panic!("duration without decimals: {line}"));
    assert!(
        !int.is_empty()
            && int.chars().all(|c| c.is_ascii_digit())
            && frac.len() == 3
            && frac.chars().all(|c| c.is_ascii_digit()),
        "duration is not X.XXXs: {line}"
    );
    assert_eq!(v("path"), mode.as_str(), "{line}");
    assert_eq!(v("userspace_bytes"), "0", "{line}");
    assert_eq!(v("end"), "closed", "{line}");
}

// ---------------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------------

/// `id ARGS... nobody`, trimmed; panics with a clear message without a `nobody`.
fn id_nobody(args: &[&str]) -> String {
    let mut cmd = command("id");
    cmd.args(args).arg("nobody");
    let o = run_to_exit(cmd, secs(10));
    assert_eq!(
        o.code(),
        Some(0),
        "this test needs a user `nobody` on the machine: `id {} nobody` failed: {}",
        args.join(" "),
        o.stderr
    );
    o.stdout.trim().to_string()
}

/// CAP_BPF (39) | CAP_NET_ADMIN (12) | CAP_NET_BIND_SERVICE (10).
const KEPT_CAPS: &str = "0000008000001400";

/// Checks /proc/PID/task/*/status of every thread: all uids 65534, all gids `gid`,
/// supplementary groups only nobody's, CapEff = CapPrm = [`KEPT_CAPS`], CapAmb 0.
fn assert_dropped(pid: i32, gid: &str, groups: &[String]) -> usize {
    let dir = format!("/proc/{pid}/task");
    let mut threads = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}")) {
        let path = entry.unwrap().path().join("status");
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        threads += 1;
        let get = |key: &str| -> Vec<&str> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {}:\n{status}", path.display()))
                .split_whitespace()
                .collect()
        };
        let ctx = format!("{}:\n{status}", path.display());
        assert_eq!(get("Uid:"), vec!["65534"; 4], "{ctx}");
        assert_eq!(get("Gid:"), vec![gid; 4], "{ctx}");
        for g in get("Groups:") {
            assert!(
                groups.iter().any(|n| n == g),
                "supplementary group {g} is not one of nobody's {groups:?}: {ctx}"
            );
        }
        assert_eq!(get("CapEff:"), vec![KEPT_CAPS], "{ctx}");
        assert_eq!(get("CapPrm:"), vec![KEPT_CAPS], "{ctx}");
        assert_eq!(get("CapAmb:"), vec!["0000000000000000"], "{ctx}");
    }
    assert!(threads >= 1, "no thread status readable under {dir}");
    threads
}

/// Serialises the port-80 probe and the reload that binds it between the tests of
/// this file (the splice and ebpf cases run in parallel and would pick the same address).
static PORT_80: Mutex<()> = Mutex::new(());

/// A loopback address whose port 80 is free right now (127.0.0.77, else .78, ...),
/// not one of `taken`.
fn free_port_80(taken: &[SocketAddr]) -> SocketAddr {
    for last in 77..=120u8 {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 80);
        if !taken.contains(&addr) && TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("port 80 is busy on every address 127.0.0.77-127.0.0.120");
}

relay_tests! {
    /// NOTIFY_SOCKET: READY=1 once listening, WATCHDOG=1 every half of WATCHDOG_USEC,
    /// RELOADING=1 + MONOTONIC_USEC then READY=1 around a reload, STOPPING=1 on SIGTERM.
    fn sd_notify_ready_reloading_stopping_watchdog(mode) {
        let _g = light();
        let echo = Server::echo();
        let dir = TempDir::new("notify");
        let sock_path = dir.path().join("notify.sock");
        let mut notify = NotifySocket::bind(&sock_path);
        let toml = rule("t", "127.0.0.1:0", echo.addr(), mode, "");
        let env_notify = format!("NOTIFY_SOCKET={}", sock_path.display());
        let mut fwd = start_in(
            dir,
            &["/usr/bin/env", &env_notify, "WATCHDOG_USEC=400000"],
            &toml,
            &[],
            1,
        );
        fwd.assert_mode(mode);

        // The listening line exists: READY=1 must be the first notification.
        let first = notify
            .recv(Instant::now() + secs(5))
            .unwrap_or_else(|| panic!("no notification within 5 s of the listening line"));
        assert!(has_line(&first, "READY=1"), "first notification: {first:?}");

        // WATCHDOG_USEC=400000: a WATCHDOG=1 every 200 ms.
        let window = Instant::now() + Duration::from_millis(1500);
        let mut pings = 0;
        for _ in 0..1000 {
            match notify.recv(window) {
                Some(m) => {
                    assert!(is_watchdog(&m), "unexpected notification while idle: {m:?}");
                    pings += 1;
                }
                None => break,
            }
        }
        assert!(
            (2..=15).contains(&pings),
            "{pings} WATCHDOG=1 in 1.5 s with WATCHDOG_USEC=400000 (want about 7): {:?}",
            notify.seen
        );

        // One real transfer, so the close-line check has a pair to judge.
        echo_check_paired(fwd.addr(), Payload::new(31, 200 * KIB), secs(20));

        // Reload with the same file: RELOADING=1 + MONOTONIC_USEC, then READY=1.
        let before = monotonic_usec();
        let line = fwd.reload(&toml);
        assert!(line.contains("reload ok"), "reload: {line}");
        let reloading = notify.expect("RELOADING=1", secs(5), |m| has_line(m, "RELOADING=1"));
        let after = monotonic_usec();
        let usec: u64 = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {reloading:?}"))
            .parse()
            .unwrap_or_else(|e| panic!("MONOTONIC_USEC is not a number ({e}): {reloading:?}"));
        assert!(
            usec <= after && usec + 10_000_000 >= before,
            "MONOTONIC_USEC={usec}, CLOCK_MONOTONIC was {before} before SIGHUP and {after} after"
        );
        assert!(
            usec >= before,
            "MONOTONIC_USEC={usec} is earlier than the SIGHUP (CLOCK_MONOTONIC {before})"
        );
        notify.expect("READY=1 after the reload", secs(5), |m| has_line(m, "READY=1"));

        // SIGTERM: STOPPING=1, then a clean exit.
        fwd.proc.signal(libc::SIGTERM);
        notify.expect("STOPPING=1", secs(5), |m| has_line(m, "STOPPING=1"));
        let status = fwd.proc.wait_timeout(secs(15)).unwrap_or_else(|| {
            panic!("still running 15 s after SIGTERM; stderr:\n{}", fwd.stderr.text())
        });
        assert_eq!(
            describe_status(&status),
            "exit 0",
            "exit after SIGTERM; stderr:\n{}",
            fwd.stderr.text()
        );
        fwd.stderr.wait_eof(secs(5));
    }

    /// Every log line is a JSON object with `--log-format json` and with
    /// `[global] log_format = "json"`; close, listening, refused, reload and upstream
    /// health lines carry their fields with JSON types. The default text close line
    /// keeps its shape.
    fn json_logs_parse(mode) {
        let _g = light();
        let echo = Server::echo();
        let (_reserved, dead) = refused_port(LOCALHOST);
        let rules = rule("echo", "127.0.0.1:0", echo.addr(), mode, "")
            + &rule("denied", "127.0.0.1:0", echo.addr(), mode, "deny = [\"127.0.0.0/8\"]")
            + &rule("down", "127.0.0.1:0", dead, mode, "check_interval = \"200ms\"\nfall = 1")
            + &rule("dead", "127.0.0.1:0", dead, mode, "");
        let global = "[global]\nlog_format = \"json\"\n\n";
        for (how, toml, args) in [
            ("--log-format json", rules.clone(), &["--log-format", "json"][..]),
            ("[global] log_format", format!("{global}{rules}"), &[][..]),
        ] {
            let mut fwd = start_in(TempDir::new("json"), &[], &toml, args, 4);
            fwd.assert_mode(mode);

            let p = Payload::new(57, 150 * KIB + 3);
            echo_check_paired(fwd.rule_addr("echo"), p, secs(20));
            let closes = fwd.wait_close_lines(1, secs(10));
            assert_eq!(closes.len(), 1, "{how}: close lines {closes:?}");

            // A refused client: reset at once, logged with its reason.
            // (The reset may already come back as the connect's own result.)
            match TcpStream::connect_timeout(&fwd.rule_addr("denied"), secs(5)) {
                Ok(s) => {
                    wait_closed(&s, secs(5))
                        .unwrap_or_else(|e| panic!("{how}: denied client: {e}"));
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                Err(e) => panic!("{how}: connect to the denied rule: {e}"),
            }
            fwd.stderr
                .wait_for(secs(5), |l| as_text(l).contains(" refused rule=denied"))
                .unwrap_or_else(|| panic!("{how}: no refused line: {}", fwd.stderr.text()));
            fwd.stderr
                .wait_for(secs(5), |l| as_text(l).contains(" upstream is DOWN rule=down"))
                .unwrap_or_else(|| panic!("{how}: no upstream DOWN line: {}", fwd.stderr.text()));
            // An upstream that refuses: the client is closed, the connect failure logged.
            let s = TcpStream::connect_timeout(&fwd.rule_addr("dead"), secs(5))
                .unwrap_or_else(|e| panic!("{how}: connect to the dead rule: {e}"));
            let dead_client = s.local_addr().unwrap();
            let _ = wait_closed(&s, secs(5));
            fwd.stderr
                .wait_for(secs(5), |l| as_text(l).contains(" close rule=dead "))
                .unwrap_or_else(|| panic!("{how}: no close line of dead: {}", fwd.stderr.text()));

            // A good reload (one rule added) and a failed one (an unknown key).
            let added = format!("{toml}{}", rule("extra", "127.0.0.1:0", echo.addr(), mode, ""));
            let ok = fwd.reload(&added);
            assert!(ok.contains(" reload ok"), "{how}: {ok}");
            let bad = format!("{added}bogus_key = 1\n");
            let failed = fwd.reload(&bad);
            assert!(failed.contains(" reload failed"), "{how}: {failed}");

            let exit = terminate(&mut fwd);
            assert_eq!(exit, "exit 0", "{how}: exit after SIGTERM");

            let lines = fwd.stderr.snapshot();
            let objs = json_objects(&lines);

            let close = find_msg(&objs, "close", |o| o.get("rule") == Some(&"echo".into()));
            assert_eq!(str_of(close, "rule"), "echo");
            let client: SocketAddr = str_of(close, "client").parse().expect("client address");
            assert!(client.ip().is_loopback(), "{how}: client {client}");
            assert_eq!(str_of(close, "upstream"), echo.addr().to_string(), "{how}");
            // The paired echo moves a 1-byte round trip, then the payload, each way.
            assert_eq!(u64_of(close, "bytes_up"), p.len + 1, "{how}: bytes_up");
            assert_eq!(u64_of(close, "bytes_down"), p.len + 1, "{how}: bytes_down");
            let d = close
                .get("duration_s")
                .and_then(Value::as_f64)
                .unwrap_or_else(|| panic!("{how}: no numeric duration_s in {close:?}"));
            assert!((0.0..60.0).contains(&d), "{how}: duration_s {d}");
            assert_eq!(str_of(close, "path"), mode.as_str(), "{how}");
            assert_eq!(str_of(close, "end"), "closed", "{how}");
            assert_eq!(u64_of(close, "userspace_bytes"), 0, "{how}");

            let failed = find_msg(&objs, "connect failed", |_| true);
            assert_eq!(str_of(failed, "rule"), "dead", "{how}");
            assert_eq!(str_of(failed, "client"), dead_client.to_string(), "{how}");
            assert_eq!(str_of(failed, "upstream"), dead.to_string(), "{how}");
            assert!(str_of(failed, "error").contains("refused"), "{how}: {failed:?}");

            let listening: Vec<_> = objs.iter().filter(|o| message(o) == "listening").collect();
            let names: Vec<&str> = listening.iter().map(|o| str_of(o, "rule")).collect();
            assert_eq!(names, ["echo", "denied", "down", "dead", "extra"], "{how}: listening lines");
            for l in &listening {
                let addr: SocketAddr = str_of(l, "listen").parse().expect("listen address");
                assert!(addr.ip().is_loopback() && addr.port() != 0, "{how}: {l:?}");
                assert_eq!(str_of(l, "mode"), mode.as_str(), "{how}: {l:?}");
            }

            let refused = find_msg(&objs, "refused", |_| true);
            assert_eq!(str_of(refused, "rule"), "denied", "{how}");
            assert_eq!(str_of(refused, "reason"), "acl", "{how}");

            let down = find_msg(&objs, "upstream is DOWN", |_| true);
            assert_eq!(str_of(down, "rule"), "down", "{how}");
            assert_eq!(str_of(down, "addr"), dead.to_string(), "{how}");
            assert_eq!(str_of(down, "state"), "DOWN", "{how}");

            let ok = find_msg(&objs, "reload ok", |_| true);
            assert_eq!(string_array(ok, "added"), ["extra"], "{how}: added");
            assert!(string_array(ok, "removed").is_empty(), "{how}: removed");
            assert!(string_array(ok, "changed").is_empty(), "{how}: changed");
            assert_eq!(u64_of(ok, "unchanged"), 4, "{how}: unchanged");

            let failed = find_msg(&objs, "reload failed", |_| true);
            let error = str_of(failed, "error");
            assert!(
                error.contains("rule[4].bogus_key"),
                "{how}: the reload error does not name the key: {error:?}"
            );
        }

        // The default text format: one connection's close line keeps its shape.
        let fwd = Forwarder::config(None, &rule("t", "127.0.0.1:0", echo.addr(), mode, ""), 1);
        fwd.assert_mode(mode);
        let p = Payload::new(58, 64 * KIB + 1);
        echo_check_paired(fwd.addr(), p, secs(20));
        let closes = fwd.wait_close_lines(1, secs(10));
        assert_eq!(closes.len(), 1, "close lines {closes:?}");
        let raw = fwd.stderr.snapshot();
        assert!(
            raw.iter().all(|l| !l.starts_with('{')),
            "JSON lines in the default text format: {raw:#?}"
        );
        assert_text_close_line(&closes[0], "t", echo.addr(), p.len + 1, mode);
    }

    /// `[global] user = "nobody"`: every thread runs as nobody with only CAP_BPF,
    /// CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, the kernel path still works, and a
    /// reload can add a listener on port 80. The kernel program was loaded before the
    /// drop, in full: neither of the fallbacks that a load without CAP_PERFMON takes
    /// (the plain verdict, the plain delete) is announced.
    fn privilege_drop_keeps_kernel_path(mode) {
        let _g = light();
        let gid = id_nobody(&["-g"]);
        let groups: Vec<String> = id_nobody(&["-G"]).split_whitespace().map(String::from).collect();
        let echo = Server::echo();
        let dir = TempDir::new("privdrop");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let toml = format!(
            "[global]\nuser = \"nobody\"\n\n{}",
            rule("echo", "127.0.0.1:0", echo.addr(), mode, "")
        );
        let mut fwd = start_in(dir, &[], &toml, &[], 1);
        fwd.assert_mode(mode);
        // The forwarder re-reads it as nobody on reload.
        let config = fwd.config_path();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

        assert_dropped(fwd.pid(), &gid, &groups);
        assert!(
            fwd.log_lines().iter().any(|l| l.contains(" privileges: running as user=nobody")),
            "no privileges line: {}",
            fwd.stderr.text()
        );
        for weaker in ["the verdict cannot trim", "with a plain delete"] {
            assert!(
                !fwd.log_lines().iter().any(|l| l.contains(weaker)),
                "the kernel program loaded after the drop, without CAP_PERFMON: {}",
                fwd.stderr.text()
            );
        }

        for seed in 0..3 {
            echo_check_paired(fwd.addr(), Payload::new(100 + seed, 300 * KIB + seed), secs(20));
        }
        let closes = fwd.wait_close_lines(3, secs(10));
        assert_eq!(closes.len(), 3, "close lines {closes:?}");

        // A reload as nobody re-reads the file and binds port 80 (CAP_NET_BIND_SERVICE).
        // Another program may take the address between the probe and the reload: then
        // the reload fails (address in use, the running config unchanged); try the next.
        let port80 = PORT_80.lock().unwrap_or_else(|e| e.into_inner());
        let mut tried = Vec::new();
        let web = loop {
            let web = free_port_80(&tried);
            let toml2 = format!("{toml}{}", rule("web", &web.to_string(), echo.addr(), mode, ""));
            let line = fwd.reload(&toml2);
            if line.contains(" reload ok: added=[web]") {
                break web;
            }
            assert!(
                line.contains(" reload failed") && line.contains("in use") && tried.len() < 5,
                "reload as nobody adding {web}: {line}"
            );
            tried.push(web);
        };
        assert_eq!(
            std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
            0o644,
            "config file mode after the rewrite"
        );
        let listening = fwd
            .stderr
            .wait_for(secs(5), |l| as_text(l).contains(" listening rule=web "))
            .map(|l| as_text(&l))
            .unwrap_or_else(|| panic!("no listening line for web: {}", fwd.stderr.text()));
        assert_eq!(field(&listening, "listen"), Some(web.to_string().as_str()), "{listening}");
        assert_eq!(field(&listening, "mode"), Some(mode.as_str()), "{listening}");
        drop(port80);
        echo_check_paired(web, Payload::new(200, 250 * KIB), secs(20));
        echo_check_paired(fwd.addr(), Payload::new(201, 10 * KIB), secs(20));
        let closes = fwd.wait_close_lines(5, secs(10));
        assert_eq!(closes.len(), 5, "close lines {closes:?}");
        assert!(
            closes.iter().any(|l| field(l, "rule") == Some("web")),
            "no close line of web: {closes:?}"
        );
        // `group` cannot change while running either: a reload changing only it is
        // applied with one warning, naming global.group (not global.user), and the
        // process keeps its group.
        let web_rule = rule("web", &web.to_string(), echo.addr(), mode, "");
        let regrouped = toml.replacen("user = \"nobody\"\n", "user = \"nobody\"\ngroup = \"daemon\"\n", 1);
        let line = fwd.reload(&format!("{regrouped}{web_rule}"));
        assert!(line.contains(" reload ok: "), "reload changing global.group: {line}");
        let kept: Vec<String> = fwd
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("cannot change while running"))
            .collect();
        assert!(
            kept.len() == 1 && kept[0].contains(" reload: global.group cannot change while running"),
            "want one warning, naming global.group: {kept:?}"
        );
        // Still nobody, on every thread, after the reloads.
        assert_dropped(fwd.pid(), &gid, &groups);
        fwd.assert_running();
    }

    /// Token files only root may read, as an administrator keeps them: read at
    /// startup, before the drop; a reload (as nobody, who cannot read them) keeps the
    /// tokens read then and says so, instead of failing every time.
    fn reload_after_the_drop_keeps_root_only_tokens(mode) {
        let _g = light();
        let echo = Server::echo();
        let dir = TempDir::new("privdrop-tokens");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let secrets = TempDir::new("root-only");
        let (auth, tunnel) = (secrets.write("auth.token", "s3cret\n"), secrets.write("tunnel.token", "t0ken\n"));
        for f in [&auth, &tunnel] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let toml = |timeout: &str| {
            format!(
                "[global]\nuser = \"nobody\"\n\n[tunnel_server]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\n{}",
                tunnel.display(),
                rule(
                    "echo",
                    "127.0.0.1:0",
                    echo.addr(),
                    mode,
                    &format!(
                        "connect_timeout = \"{timeout}\"\nhttp_auth = {{ header = \"X-Auth\", token_file = \"{}\" }}",
                        auth.display()
                    )
                )
            )
        };
        let mut fwd = start_in(dir, &[], &toml("5s"), &[], 1);
        // The request's head goes through the inspection prelude (checked, header cut).
        fwd.expect_userspace_at_most(18).expect_paths(&["splice"]);
        let config = fwd.config_path();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let line = fwd.reload(&toml("6s"));
        assert!(line.contains(" reload ok: ") && line.contains("changed=[echo]"), "{line}");
        for f in [&auth, &tunnel] {
            let kept = format!("{}: Permission denied", f.display());
            assert!(fwd.log_lines().iter().any(|l| l.contains(" WARN ") && l.contains(&kept)), "no warning for {}: {}", f.display(), fwd.stderr.text());
        }
        // The kept token still lets a request through (the echo shows it without the header).
        let s = connect(fwd.addr());
        std::io::Write::write_all(&mut &s, b"GET / HTTP/1.1\r\nX-Auth: s3cret\r\n\r\n").unwrap();
        let back = read_exact_timeout(&s, 18, secs(10)).expect("the request's echo");
        assert_eq!(back, b"GET / HTTP/1.1\r\n\r\n");
        fwd.assert_running();
    }

    /// An unknown `[global] user` is a config error `check` names.
    fn unknown_user_is_a_config_error(mode) {
        let _g = light();
        let dir = TempDir::new("nouser");
        let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let path = dir.write(
            "forwarder.toml",
            &format!(
                "[global]\nuser = \"no-such-user-xyz\"\n\n{}",
                rule("t", "127.0.0.1:0", upstream, mode, "")
            ),
        );
        let mut cmd = forwarder_command();
        cmd.args(["check", "-c"]).arg(&path);
        let o = run_to_exit(cmd, secs(20));
        let text = format!("{}{}", o.stdout, o.stderr);
        assert_eq!(o.code(), Some(2), "forwarder check: {text}");
        assert!(text.contains("global.user"), "check does not name global.user: {text}");
        assert!(text.contains("no-such-user-xyz"), "check does not name the user: {text}");
    }

    /// In JSON, a reset's close line says `end: "client_reset"` alone, with the error
    /// in `detail` (the text line keeps `end=client_reset (Connection reset by peer
    /// ...)`): a consumer compares `end`, as the field list has it. The bytes
    /// moved before the reset are counted.
    fn json_close_end_is_the_kind_alone(mode) {
        let _g = light();
        let (_echo, mut fwd) = json_echo_forwarder(mode, "jsonrst");
        let s = connect(fwd.rule_addr("echo"));
        ping(&s, b"hello", secs(10)).expect("echo");
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER");
        drop(s);
        let close = &only_close_then_stop(&mut fwd);
        assert_eq!(str_of(close, "end"), "client_reset", "{close:?}");
        assert!(str_of(close, "detail").contains("reset"), "{close:?}");
        assert_eq!(u64_of(close, "bytes_up"), 5, "{close:?}");
        assert_eq!(u64_of(close, "bytes_down"), 5, "{close:?}");
    }

    /// The close line's duration is the pair's life, from accept to close: a client
    /// that holds its connection 1.5 s between a message each way and another gets a
    /// duration of at least that hold and at most what the client measured from before
    /// its connect to the close line (each less or plus 1 ms for rounding). The
    /// connection comes a second after the start, so a duration counted from the
    /// process's epoch (where the start time is kept, in µs) rather than from the
    /// accept fails.
    fn close_duration_is_the_pairs_life(mode) {
        let _g = light();
        let (_echo, mut fwd) = json_echo_forwarder(mode, "jsondur");
        std::thread::sleep(secs(1));
        let t0 = Instant::now();
        let s = connect(fwd.rule_addr("echo"));
        ping(&s, b"first", secs(10)).expect("echo");
        // The pair was accepted before this echo came back.
        let hold = secs(1) + Duration::from_millis(500);
        std::thread::sleep(hold);
        ping(&s, b"last", secs(10)).expect("echo");
        drop(s);
        fwd.wait_close_lines(1, secs(10));
        let client_life = t0.elapsed().as_secs_f64();
        let close = &only_close_then_stop(&mut fwd);
        assert_eq!(str_of(close, "end"), "closed", "{close:?}");
        let d = close
            .get("duration_s")
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("no numeric duration_s in {close:?}"));
        assert!(
            d >= hold.as_secs_f64() - 0.001 && d <= client_life + 0.001,
            "duration_s {d} for a connection held {hold:?} (the client saw {client_life:.3} s)"
        );
    }

    /// With `--log-format json`, even a config error that stops the start is one JSON
    /// object (exit 2), naming the key.
    fn json_startup_error_is_json(mode) {
        let _g = light();
        let dir = TempDir::new("badjson");
        let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let path = dir.write(
            "forwarder.toml",
            &format!("{}bogus_key = 1\n", rule("t", "127.0.0.1:0", upstream, mode, "")),
        );
        let mut cmd = forwarder_command();
        cmd.args(["run", "--log-format", "json", "-c"]).arg(&path);
        let o = run_to_exit(cmd, secs(20));
        assert_eq!(o.code(), Some(2), "stderr: {}", o.stderr);
        let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one JSON line expected: {}", o.stderr);
        let v: serde_json::Value = serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", lines[0]));
        assert_eq!(v["level"], "ERROR", "{v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(msg.contains("bogus_key"), "the error does not name the key: {msg}");
    }
}

/// `NOTIFY_SOCKET=@name` is a socket in the abstract namespace (sd_notify(3)), as
/// some service managers and containers set it: READY=1 and STOPPING=1 reach it.
#[test]
fn sd_notify_abstract_socket() {
    let _g = light();
    let echo = Server::echo();
    let name = format!("forwarder-test-notify-{}", std::process::id());
    let mut notify = NotifySocket::bind_abstract(&name);
    let toml = rule("t", "127.0.0.1:0", echo.addr(), Mode::Splice, "");
    let env_notify = format!("NOTIFY_SOCKET=@{name}");
    let mut fwd = start_in(
        TempDir::new("notify-abstract"),
        &["/usr/bin/env", &env_notify],
        &toml,
        &[],
        1,
    );
    fwd.expect_pairs(0);
    notify.expect("READY=1", secs(5), |m| has_line(m, "READY=1"));
    assert_eq!(terminate(&mut fwd), "exit 0");
    notify.expect("STOPPING=1", secs(5), |m| has_line(m, "STOPPING=1"));
}

/// A `NOTIFY_SOCKET` nobody listens on (the manager went away) does not stop the
/// service, and is warned of once, not on every watchdog ping (here every 50 ms).
#[test]
fn sd_notify_unreachable_socket_warns_once() {
    let _g = light();
    let echo = Server::echo();
    let dir = TempDir::new("notify-gone");
    let gone = dir.path().join("no-such-socket");
    let env_notify = format!("NOTIFY_SOCKET={}", gone.display());
    let toml = rule("t", "127.0.0.1:0", echo.addr(), Mode::Splice, "");
    let mut fwd = start_in(
        dir,
        &["/usr/bin/env", &env_notify, "WATCHDOG_USEC=100000"],
        &toml,
        &[],
        1,
    );
    // READY=1 and about 20 watchdog pings fail meanwhile.
    std::thread::sleep(secs(1));
    echo_check_paired(fwd.addr(), Payload::new(5, 16 * KIB), secs(10));
    let warned: Vec<String> = fwd
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("systemd: cannot notify"))
        .collect();
    assert_eq!(warned.len(), 1, "want one warning: {warned:#?}");
    assert_eq!(terminate(&mut fwd), "exit 0");
}
