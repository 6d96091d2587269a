//! What the policy tests need beyond std: the forwarder under a config, peers, nginx.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub fn forwarder_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FORWARDER_BIN") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    ["target/release/forwarder", "target/debug/forwarder"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.exists())
        .expect("no forwarder binary: run `cargo xtask test` or set FORWARDER_BIN")
}

/// Why the eBPF variants cannot run here, if they cannot.
pub fn ebpf_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (eBPF needs CAP_BPF + CAP_NET_ADMIN)".into());
    }
    None
}

/// A running forwarder with one rule; killed and reaped on drop.
pub struct Forwarder {
    pub addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Forwarder {
    pub fn with_config(mode: &str, rule_body: &str, env: &[(&str, &str)]) -> Forwarder {
        Self::with_config_listen(mode, "127.0.0.1:0", rule_body, env)
    }

    pub fn with_config_listen(
        mode: &str,
        listen: &str,
        rule_body: &str,
        env: &[(&str, &str)],
    ) -> Forwarder {
        let dir = TempDir::new();
        let path = dir.0.join("forwarder.toml");
        let text = format!(
            "[[rule]]\nname = \"t\"\nlisten = \"{listen}\"\nmode = \"{mode}\"\n{rule_body}\n"
        );
        std::fs::write(&path, text).unwrap();
        let mut child = Command::new(forwarder_bin())
            .args(["run", "-c"])
            .arg(&path)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forwarder");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("listen="))
                {
                    let _ = tx.send(a.parse::<SocketAddr>().ok());
                }
                lines.lock().unwrap().push(line);
            }
            let _ = tx.send(None);
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(a)) => a,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("forwarder did not start: {:?}", log.lock().unwrap());
            }
        };
        Forwarder {
            addr,
            child,
            log,
            _dir: dir,
        }
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("log so far: {:#?}", self.log.lock().unwrap());
        false
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "forwarder-policy-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops an accept loop thread: sets its flag and wakes it with a connection.
pub struct StopOnDrop(SocketAddr, Arc<AtomicBool>);

impl StopOnDrop {
    pub fn new(addr: SocketAddr) -> StopOnDrop {
        StopOnDrop(addr, Arc::new(AtomicBool::new(false)))
    }
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.1.clone()
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.1.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.0, Duration::from_secs(1));
        // Give the thread time to drop the listener so the port refuses.
        thread::sleep(Duration::from_millis(50));
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

/// An echo server for the whole test process.
pub fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for mut c in l.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    if c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
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

/// Debian's nginx answering `$proxy_protocol_addr:$proxy_protocol_port`.
pub struct Nginx {
    pub addr: SocketAddr,
    child: Child,
    _dir: TempDir,
}

impl Nginx {
    pub fn start() -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            eprintln!("SKIP: nginx is not installed (cargo xtask test installs it)");
            return None;
        };
        let dir = TempDir::new();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.0.display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{port} proxy_protocol;\n\
                 location / {{ default_type text/plain; return 200 \"$proxy_protocol_addr:$proxy_protocol_port\"; }} }} }}\n"
        );
        std::fs::write(dir.0.join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(dir.0.join("nginx.conf"))
            .args(["-p"])
            .arg(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            thread::sleep(Duration::from_millis(50));
        }
        Some(Nginx {
            addr,
            child,
            _dir: dir,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
