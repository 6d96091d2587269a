//! Peers the policy tests need beyond the harness: clients from chosen source
//! addresses, nginx speaking PROXY protocol.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use forwarder_tests::{ChildGuard, TempDir};

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
    _child: ChildGuard,
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
        let dir = TempDir::new("nginx");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{port} proxy_protocol;\n\
                 location / {{ default_type text/plain; return 200 \"$proxy_protocol_addr:$proxy_protocol_port\"; }} }} }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = ChildGuard::spawn(cmd, "nginx");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            thread::sleep(Duration::from_millis(50));
        }
        Some(Nginx {
            addr,
            _child: child,
            _dir: dir,
        })
    }
}
