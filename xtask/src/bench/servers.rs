//! The upstream side, in-process: a bulk sink/source, an echo server and an idle holder,
//! each on its own loopback port so one relay rule can point at each (the HTTP origin is
//! an nginx: see http.rs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};

/// Bytes per read and write in the bulk tests.
pub const BULK_BUF: usize = 256 * 1024;
/// Size of a request and of a response in the latency and connection-rate tests.
pub const MSG: usize = 64;
/// First byte of a bulk connection: the client uploads, the server sinks.
pub const CMD_UPLOAD: u8 = b'U';
/// First byte of a bulk connection: the server sends until the client goes away.
pub const CMD_DOWNLOAD: u8 = b'D';
/// First byte of an echo request after which the server closes (connection-rate test);
/// any other first byte keeps the connection open for the next request.
pub const CMD_CLOSE_AFTER: u8 = b'C';

const BACKLOG: i32 = 4096;
const ECHO_THREADS: usize = 8;

#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub bulk: SocketAddr,
    pub echo: SocketAddr,
    pub idle: SocketAddr,
    /// The HTTP origin (an nginx the bench starts), when it could be started.
    pub http: Option<SocketAddr>,
}

impl Addrs {
    /// (rule name, address) of every server a relay forwards to.
    pub fn rules(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut v = vec![
            ("bulk", self.bulk),
            ("echo", self.echo),
            ("idle", self.idle),
        ];
        v.extend(self.http.map(|a| ("http", a)));
        v
    }

    pub fn set(&mut self, rule: &str, addr: SocketAddr) {
        match rule {
            "bulk" => self.bulk = addr,
            "echo" => self.echo = addr,
            "idle" => self.idle = addr,
            "http" => self.http = Some(addr),
            _ => {}
        }
    }
}

pub struct Servers {
    pub addrs: Addrs,
    /// Bytes the bulk sink received (upload tests).
    pub sunk: Arc<AtomicU64>,
    pub idle: Arc<IdleHolder>,
}

/// How long the idle server waits for a connection's first byte.
const IDLE_BYTE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Accepts connections, answers their first byte with one byte and then keeps them open,
/// reading nothing more.
#[derive(Default)]
pub struct IdleHolder {
    /// Connections that passed their byte each way and are held.
    pub accepted: AtomicUsize,
    /// Connections whose first byte did not arrive in time (or that closed first).
    pub failed: AtomicUsize,
    held: Mutex<Vec<TcpStream>>,
}

impl IdleHolder {
    /// Closes every held connection (server side first, so the TIME_WAIT states land on
    /// the fixed server port instead of using up ephemeral ports) and resets the count.
    pub fn close_all(&self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        drop(held);
        self.accepted.store(0, Ordering::SeqCst);
        self.failed.store(0, Ordering::SeqCst);
    }
}

pub fn start() -> Result<Servers> {
    let sunk = Arc::new(AtomicU64::new(0));
    let idle = Arc::new(IdleHolder::default());

    let bulk = listen()?;
    let bulk_addr = bulk.local_addr()?;
    let s = sunk.clone();
    thread::Builder::new()
        .name("bench-bulk-accept".into())
        .spawn(move || {
            for conn in bulk.incoming().flatten() {
                let s = s.clone();
                let _ = thread::Builder::new()
                    .name("bench-bulk".into())
                    .spawn(move || bulk_conn(conn, &s));
            }
        })?;

    let echo = listen()?;
    let echo_addr = echo.local_addr()?;
    for _ in 0..ECHO_THREADS {
        let l = echo.try_clone()?;
        thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || loop {
                if let Ok((conn, _)) = l.accept() {
                    echo_conn(conn);
                }
            })?;
    }

    let idle_l = listen()?;
    let idle_addr = idle_l.local_addr()?;
    let h = idle.clone();
    thread::Builder::new()
        .name("bench-idle".into())
        .spawn(move || {
            for mut conn in idle_l.incoming().flatten() {
                // One byte each way, then silence: the pair has carried data (a relay
                // may set up per-pair state, such as pipes, only then).
                let mut b = [0u8; 1];
                let _ = conn.set_read_timeout(Some(IDLE_BYTE_WAIT));
                if conn.read_exact(&mut b).is_err() || conn.write_all(&b).is_err() {
                    h.failed.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                h.held.lock().unwrap().push(conn);
                h.accepted.fetch_add(1, Ordering::SeqCst);
            }
        })?;

    Ok(Servers {
        addrs: Addrs {
            bulk: bulk_addr,
            echo: echo_addr,
            idle: idle_addr,
            http: None,
        },
        sunk,
        idle,
    })
}

/// A loopback listener with a deep accept queue (std's is 128).
fn listen() -> Result<TcpListener> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback listener")?;
    // Calling listen() again on a listening socket just changes its backlog.
    // SAFETY: a valid, listening socket fd.
    unsafe { libc::listen(l.as_raw_fd(), BACKLOG) };
    Ok(l)
}

fn bulk_conn(mut conn: TcpStream, sunk: &AtomicU64) {
    let _ = conn.set_nodelay(true);
    let mut cmd = [0u8; 1];
    if conn.read_exact(&mut cmd).is_err() {
        return;
    }
    let mut buf = vec![0u8; BULK_BUF];
    match cmd[0] {
        CMD_UPLOAD => loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    sunk.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        },
        CMD_DOWNLOAD => {
            buf.fill(0x5a);
            while conn.write_all(&buf).is_ok() {}
        }
        _ => {}
    }
}

fn echo_conn(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; MSG];
    while conn.read_exact(&mut buf).is_ok() {
        if conn.write_all(&buf).is_err() || buf[0] == CMD_CLOSE_AFTER {
            return;
        }
    }
}
