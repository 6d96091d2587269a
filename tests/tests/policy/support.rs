//! Peers the policy tests need beyond the harness: clients from chosen source
//! addresses, nginx speaking PROXY protocol, HAProxy sending it.

use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use forwarder_tests::{ChildGuard, TempDir};

/// Stops an accept loop thread: sets its flag, wakes it with a connection, and waits
/// for it to end (so its listener is closed and the port refuses when this returns).
pub struct StopOnDrop(SocketAddr, Arc<AtomicBool>, Option<thread::JoinHandle<()>>);

impl StopOnDrop {
    pub fn new(addr: SocketAddr) -> StopOnDrop {
        StopOnDrop(addr, Arc::new(AtomicBool::new(false)), None)
    }
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.1.clone()
    }
    /// The accept loop's thread, to wait for.
    pub fn thread(mut self, t: thread::JoinHandle<()>) -> StopOnDrop {
        self.2 = Some(t);
        self
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.1.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.0, Duration::from_secs(1));
        // The loop may be serving a client (reads time out after 5 s) before it takes
        // the wake-up connection: waited for that long, and a little more.
        let deadline = Instant::now() + Duration::from_secs(7);
        while let Some(t) = self.2.take() {
            if t.is_finished() {
                let _ = t.join();
            } else if Instant::now() < deadline {
                self.2 = Some(t);
                thread::sleep(Duration::from_millis(5));
            } else if !thread::panicking() {
                panic!("the server on {} did not stop within 7 s", self.0);
            }
        }
    }
}

pub fn connect_from(to: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(src) = source else {
        return TcpStream::connect_timeout(&to, Duration::from_secs(5));
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(sock.into())
}

/// Connects, checks one echo round trip, and returns the open stream.
pub fn echo_once(to: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, String> {
    let mut s = connect_from(to, source).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"hello").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
    if &buf != b"hello" {
        return Err(format!("echo returned {buf:?}"));
    }
    Ok(s)
}

/// Sends a GET and returns the body (the connection is closed by the server).
pub fn http_get(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

/// Reads one HTTP response on a connection the server keeps open (HTTP/1.1): the
/// head up to the blank line, then `Content-Length` bytes of body, which it returns.
/// Bounded: 5 s per read, 64 KiB in all.
pub fn read_response(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no Content-Length in {head}"));
            let body = end + 4;
            if got.len() >= body + len {
                return String::from_utf8_lossy(&got[body..body + len]).into_owned();
            }
        }
        assert!(got.len() < 64 * 1024, "response too long");
        let n = s.read(&mut buf).expect("reading the response");
        let partial = String::from_utf8_lossy(&got);
        assert!(n > 0, "closed before the whole response: {partial}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Debian's nginx answering `$proxy_protocol_addr:$proxy_protocol_port`.
pub struct Nginx {
    pub addr: SocketAddr,
    _child: ChildGuard,
    _dir: TempDir,
}

impl Nginx {
    /// Starts nginx; panics if it is not installed or does not start (the test it
    /// serves must fail, not pass without it).
    pub fn start() -> Nginx {
        let bin = installed("nginx");
        let dir = TempDir::new("nginx");
        // An address of its own: a port released on 127.0.0.1 can be another test's
        // before nginx binds it, and the readiness check below would find that one.
        let addr = forwarder_tests::free_loopback_addr();
        let d = dir.path().display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen {addr} proxy_protocol;\n\
                 location / {{ default_type text/plain; return 200 \"$proxy_protocol_addr:$proxy_protocol_port\"; }} }} }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        // With PDEATHSIG: nginx goes with a test process that dies hard.
        let mut cmd = forwarder_tests::command(bin);
        cmd.arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap());
        let child = started(cmd, "nginx", addr, &dir, &["stderr", "error.log"]);
        Nginx {
            addr,
            _child: child,
            _dir: dir,
        }
    }
}

/// HAProxy as a front balancer: `mode tcp` to `to`, sending each connection's PROXY
/// header the way `server_options` says (`send-proxy`, `send-proxy-v2 ...`).
pub struct Haproxy {
    pub addr: SocketAddr,
    _child: ChildGuard,
    _dir: TempDir,
}

impl Haproxy {
    /// Starts haproxy; panics if it is not installed or does not start.
    pub fn front(to: SocketAddr, server_options: &str) -> Haproxy {
        let bin = installed("haproxy");
        let dir = TempDir::new("haproxy");
        let addr = forwarder_tests::free_loopback_addr();
        let conf = [
            "global\n  maxconn 64".to_string(),
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10s".into(),
            "  timeout server 10s".into(),
            format!("listen front\n  bind {addr}\n  server s {to} {server_options}"),
            // What `proxy-v2-options unique-id` sends.
            "  unique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt\n".into(),
        ]
        .join("\n");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, conf).unwrap();
        // -db: in the foreground, so PDEATHSIG and the guard reach it.
        let mut cmd = forwarder_tests::command(bin);
        cmd.arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap());
        let child = started(cmd, "haproxy", addr, &dir, &["stderr"]);
        Haproxy {
            addr,
            _child: child,
            _dir: dir,
        }
    }
}

/// The path of Debian's `/usr/sbin/NAME` (or `/usr/bin/NAME`); panics if neither
/// exists: the test it serves must fail, not pass without it.
fn installed(name: &str) -> String {
    [format!("/usr/sbin/{name}"), format!("/usr/bin/{name}")]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("{name} is not installed (/usr/sbin/{name}): `cargo xtask test` installs it, or `apt-get install {name}`")
        })
}

/// Spawns `cmd` (a server named `what`) and waits up to 10 s until it accepts on
/// `addr`; panics with its `logs` (files in `dir`) if it exits or never listens.
fn started(cmd: Command, what: &str, addr: SocketAddr, dir: &TempDir, logs: &[&str]) -> ChildGuard {
    let mut child = ChildGuard::spawn(cmd, what);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        let why = match child.try_status() {
            Some(status) => format!("it exited: {status}"),
            None if Instant::now() >= deadline => "still not listening after 10 s".into(),
            None => {
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let mut msg = format!("{what} did not start on {addr}: {why}");
        for f in logs {
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
            msg += &format!("; {f}:\n{text}");
        }
        panic!("{msg}");
    }
    child
}

/// The upstream (index into `upstreams`, the config's `addr` strings, all of weight 1)
/// that `balance = "source_hash"` picks for `client`: the lowest weighted rendezvous
/// score, computed exactly as `score` in forwarder/src/policy/balance.rs does.
pub fn source_hash_pick(client: IpAddr, upstreams: &[String]) -> usize {
    let score = |addr: &String| {
        let mut h = std::hash::DefaultHasher::new();
        client.to_canonical().hash(&mut h);
        addr.hash(&mut h);
        let u = ((h.finish() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        -u.ln()
    };
    (0..upstreams.len())
        .min_by(|&a, &b| score(&upstreams[a]).total_cmp(&score(&upstreams[b])))
        .expect("at least one upstream")
}
