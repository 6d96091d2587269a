//! Harness for the forwarder's integration tests.
//!
//! Everything here drives the real binary and real peers on loopback only
//! (127.0.0.0/8 and [::1]) with ephemeral ports. Every loop is bounded by a deadline,
//! every child process is killed by PID and reaped by a guard's `Drop` (so also when a
//! test panics), and every server thread is woken and joined when its server is dropped.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub mod dumps;
pub mod netns;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const LOCALHOST6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// How long the forwarder gets to print its listening lines.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------
// Modes and the per-mode test macro
// ---------------------------------------------------------------------------------

/// The relay path a test runs the forwarder with (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Splice,
    Ebpf,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Splice => "splice",
            Mode::Ebpf => "ebpf",
        }
    }
}

/// A [`Forwarder::spawn`] prefix: the forwarder runs in a mount namespace of its own
/// (private: nothing leaks to the host's), after the shell command `mount` ran there.
pub fn in_mount_namespace(mount: &str) -> Vec<OsString> {
    let script = format!("{mount} && exec \"$0\" \"$@\"");
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Set to 1 to let the eBPF tests skip where they cannot run (not root). Without it
/// they fail: a suite that reports "ok" for a kernel path it never ran proves nothing.
pub const SKIP_EBPF_ENV: &str = "FORWARDER_TESTS_SKIP_EBPF";

/// Whether an eBPF test can run here. As root, always. Otherwise the test fails,
/// unless [`SKIP_EBPF_ENV`] asks for a skip (then it says so on stderr and returns false).
pub fn ebpf_can_run(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var(SKIP_EBPF_ENV).is_ok_and(|v| v == "1") {
        eprintln!("SKIP {test}: not root (eBPF needs CAP_BPF+CAP_NET_ADMIN), {SKIP_EBPF_ENV}=1");
        return false;
    }
    panic!(
        "{test}: the kernel path needs root (CAP_BPF + CAP_NET_ADMIN). Run the suite as root, \
         or set {SKIP_EBPF_ENV}=1 to skip the eBPF cases explicitly."
    );
}

/// Writes each relay test once and generates `splice::NAME` and `ebpf::NAME`.
///
/// ```ignore
/// relay_tests! {
///     fn bulk(mode) { let fwd = Forwarder::cli(mode, &[up.addr()]); ... }
/// }
/// ```
#[macro_export]
macro_rules! relay_tests {
    ($( $(#[$meta:meta])* fn $name:ident($mode:ident) $body:block )*) => {
        mod splice {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    let $mode = $crate::Mode::Splice;
                    $body
                }
            )*
        }
        mod ebpf {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    if !$crate::ebpf_can_run(concat!("ebpf::", stringify!($name))) {
                        return;
                    }
                    let $mode = $crate::Mode::Ebpf;
                    $body
                }
            )*
        }
    };
}

static LOAD: RwLock<()> = RwLock::new(());

/// For the heavy tests (bulk transfers, memory measurements, 1000 connections): runs
/// them alone, so they neither distort each other's figures (or be distorted by the
/// light tests' processes and buffers) nor overload the machine together.
pub fn heavy() -> RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

/// For every other test: runs alongside other light tests, never beside a heavy one.
pub fn light() -> RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

/// Raises this process's RLIMIT_NOFILE soft limit to the hard limit; returns it.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------------

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "forwarder-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------

/// The forwarder binary under test: `FORWARDER_BIN`, else the workspace's release
/// build, else its debug build.
pub fn forwarder_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FORWARDER_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("forwarder");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "no forwarder binary: set FORWARDER_BIN or run `cargo build --release -p forwarder` (looked in {})",
        target.display()
    );
}

/// A command whose child is SIGKILLed if the spawning thread dies without reaping it
/// (belt and braces: the guards below normally kill and reap it first).
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: prctl is async-signal-safe and touches nothing but this process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    cmd
}

/// Lines of a child's output, collected by a background thread as they arrive.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<LinesInner>, Condvar)>);

#[derive(Default)]
struct LinesInner {
    lines: Vec<String>,
    eof: bool,
}

impl Lines {
    /// Starts a thread that reads `r` to EOF, line by line.
    pub fn collect(r: impl Read + Send + 'static) -> Lines {
        let lines = Lines::default();
        let l = lines.clone();
        thread::Builder::new()
            .name("output-reader".into())
            .spawn(move || {
                let mut r = BufReader::new(r);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let s = String::from_utf8_lossy(&buf).trim_end().to_string();
                            let (m, cv) = &*l.0;
                            m.lock().unwrap().lines.push(s);
                            cv.notify_all();
                        }
                    }
                }
                let (m, cv) = &*l.0;
                m.lock().unwrap().eof = true;
                cv.notify_all();
            })
            .expect("spawn output reader");
        lines
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().lines.clone()
    }

    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    pub fn is_eof(&self) -> bool {
        self.0 .0.lock().unwrap().eof
    }

    /// Waits until `n` lines (counting from the first) satisfy `pred`; returns them,
    /// or fewer if `timeout` passes or the stream ends first.
    pub fn wait_for_n(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap();
        loop {
            let found: Vec<String> = g.lines.iter().filter(|l| pred(l)).cloned().collect();
            let now = Instant::now();
            if found.len() >= n || g.eof || now >= deadline {
                return found;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// The first line satisfying `pred`, waiting up to `timeout` for it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.wait_for_n(1, timeout, pred).into_iter().next()
    }

    pub fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap();
        while !g.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        true
    }
}

/// A child process that is killed (SIGKILL, by PID) and reaped when dropped.
pub struct ChildGuard {
    child: Child,
    name: String,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command, name: &str) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        ChildGuard {
            child,
            name: name.to_string(),
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `sig` unless the child has already been reaped (its PID may be reused then).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.try_status().is_none() {
            // SAFETY: kill(2) on a PID we spawned and have not reaped yet.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// The exit status if the child has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
            }
        }
        self.status
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills and reaps the child now; returns how it ended.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.try_status() {
            return s;
        }
        let _ = self.child.kill();
        let s = self.child.wait().expect("wait for killed child");
        self.status = Some(s);
        s
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if thread::panicking() {
                eprintln!("(killed {} pid {})", self.name, self.child.id());
            }
        }
    }
}

/// What a command run to completion printed and how it ended.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `cmd` to completion, killing it if it takes longer than `timeout`.
pub fn run_to_exit(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut guard = ChildGuard::spawn(cmd, &desc);
    let out = Lines::collect(guard.child_mut().stdout.take().unwrap());
    let err = Lines::collect(guard.child_mut().stderr.take().unwrap());
    let Some(status) = guard.wait_timeout(timeout) else {
        guard.kill();
        panic!(
            "{desc} did not exit within {timeout:?}; stderr:\n{}",
            err.text()
        );
    };
    out.wait_eof(Duration::from_secs(5));
    err.wait_eof(Duration::from_secs(5));
    Output {
        status,
        stdout: out.text(),
        stderr: err.text(),
    }
}

/// A loopback address whose port was free a moment ago (for a listener the forwarder
/// binds itself, such as `metrics`). On an address of its own (127.101+.P.N), not
/// 127.0.0.1: there, a port bound and released can be taken meanwhile as the source
/// port of another test's connection, and the forwarder's bind fails (CI saw it for a
/// metrics address, "Address already in use").
pub fn free_loopback_addr() -> SocketAddr {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = Ipv4Addr::new(
        127,
        101 + (n / 250 % 50) as u8,
        (std::process::id() % 250) as u8 + 1,
        (n % 250) as u8 + 1,
    );
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// GET /metrics from `addr`: the exposition's text (the answer must be a 200).
pub fn metrics_text(addr: SocketAddr) -> String {
    let (status, body, err) = curl(&format!("http://{addr}/metrics"), &[]);
    assert_eq!(status, 200, "GET http://{addr}/metrics: {err}");
    String::from_utf8_lossy(&body).into_owned()
}

/// The value of the first series `name{labels...}` in exposition `text` that carries
/// every label in `labels` (each written `key="value"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        // A series without labels matches only when none are asked for.
        let labelled = rest.starts_with('{') && labels.iter().all(|lb| rest.contains(lb));
        (labelled || (rest.is_empty() && labels.is_empty())).then(|| value.parse().ok())?
    })
}

/// [`metric`] from a scrape of `/metrics` at `addr` now; panics (with the scrape) if
/// the series is not there.
pub fn scraped(addr: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let text = metrics_text(addr);
    metric(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
}

/// curl `url` with `args`; returns (HTTP status, body, curl's stderr).
pub fn curl(url: &str, args: &[&str]) -> (u16, Vec<u8>, String) {
    let dir = TempDir::new("curl");
    let body = dir.path().join("body");
    let mut c = command("curl");
    c.args(["-sS", "--max-time", "10", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(url);
    let o = run_to_exit(c, Duration::from_secs(20));
    assert_eq!(
        o.code(),
        Some(0),
        "curl {url} {args:?}: {} {}",
        o.stdout,
        o.stderr
    );
    let status = o
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl status {:?}", o.stdout));
    (status, std::fs::read(&body).unwrap_or_default(), o.stderr)
}

/// An upstream that reads one HTTP request head (to the blank line), answers 200
/// `raw` and waits for the client to close first; reports the request's raw bytes.
pub fn raw_http_recorder() -> (Server, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = Server::start(LOCALHOST, move |mut s| {
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Bounded: the server's 60 s read timeout, and 64 KiB at most.
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 * 1024 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        if req.is_empty() {
            let _ = tx.lock().unwrap().send(req);
            return;
        }
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nraw");
        // Our FIN only after the client's: its close travels on the pair's path.
        let _ = s.read(&mut buf);
        let _ = tx.lock().unwrap().send(req);
    });
    (server, rx)
}

/// `python3 -m http.server ARGS...` on a free loopback port serving `dir`; returns it
/// (killed on drop), its address, and its stderr (the access log).
pub fn python_http_server(dir: &Path, args: &[&str]) -> (ChildGuard, SocketAddr, Lines) {
    let mut py = command("python3");
    py.args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1"])
        .args(args)
        .arg("--directory")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut http = ChildGuard::spawn(py, "python3 -m http.server");
    let out = Lines::collect(http.child_mut().stdout.take().unwrap());
    let errs = Lines::collect(http.child_mut().stderr.take().unwrap());
    // Importing http.server takes seconds on a slow (emulated) machine.
    let line = out
        .wait_for(Duration::from_secs(30), |l| l.contains("Serving HTTP on"))
        .unwrap_or_else(|| panic!("http.server did not start: {}", errs.text()));
    let port: u16 = line
        .split(" port ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    (http, SocketAddr::from(([127, 0, 0, 1], port)), errs)
}

/// The forwarder binary as a `Command`, with logging at info.
pub fn forwarder_command() -> Command {
    let mut cmd = command(forwarder_bin());
    cmd.env("FORWARDER_LOG", "info");
    cmd
}

// ---------------------------------------------------------------------------------
// The forwarder under test
// ---------------------------------------------------------------------------------

/// One `listening ...` startup line, parsed.
#[derive(Debug, Clone)]
pub struct Listening {
    pub rule: String,
    pub addr: SocketAddr,
    /// The relay path the forwarder chose (`splice` / `ebpf`).
    pub mode: String,
    pub line: String,
}

/// The value of `key=` in a log line (up to the next space).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    Some(rest.split(' ').next().unwrap_or(rest))
}

/// A `--log-format json` line as the text line's `key=value` shape (`rule=` first
/// after the message), so [`field`] and the close-line checks read both formats;
/// other lines are returned as they are.
pub fn as_text(line: &str) -> String {
    let Some(serde_json::Value::Object(obj)) = line
        .starts_with('{')
        .then(|| serde_json::from_str(line).ok())
        .flatten()
    else {
        return line.to_string();
    };
    let plain = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let get = |k: &str| obj.get(k).map(plain).unwrap_or_default();
    let mut out = format!("{} {} {}", get("timestamp"), get("level"), get("message"));
    let skip = ["timestamp", "level", "message", "rule"];
    let rest = obj.iter().filter(|(k, _)| !skip.contains(&k.as_str()));
    for (k, v) in obj.get_key_value("rule").into_iter().chain(rest) {
        out.push_str(&format!(" {k}={}", plain(v).replace(' ', "_")));
    }
    out
}

fn parse_listening(line: &str) -> Option<Listening> {
    let line = &as_text(line);
    line.find("listening rule=")?;
    Some(Listening {
        rule: field(line, "rule")?.to_string(),
        addr: field(line, "listen")?.parse().ok()?,
        mode: field(line, "mode")?.to_string(),
        line: line.to_string(),
    })
}

/// A running forwarder: killed and reaped on drop; its stderr collected line by line.
pub struct Forwarder {
    pub proc: ChildGuard,
    pub stderr: Lines,
    pub listening: Vec<Listening>,
    paths: Mutex<PathCheck>,
    _dir: Option<TempDir>,
}

/// What the close lines must show about how a forwarder's pairs moved their bytes.
/// Checked when the [`Forwarder`] is dropped (unless the test already panicked), so
/// every test asserts it; tests loosen or tighten it with the `expect_*` methods.
///
/// By default every relayed pair's `path=` is exactly its rule's startup `mode=`
/// (an ebpf pair that fell back to splice, or left the maps, fails the test), it
/// moved no byte through userspace, and at least one pair started on that mode.
#[derive(Debug, Clone)]
struct PathCheck {
    /// Allowed `path=` values besides the rule's mode; `None`: only the mode.
    paths: Option<Vec<String>>,
    /// Per pair, the most `userspace_bytes=` may say.
    max_userspace: u64,
    /// Pairs that started on the rule's mode (`path=MODE` or `MODE>...`) at the least.
    min_pairs: usize,
    /// Close lines that must show a path other than the mode alone (`ebpf>splice`).
    min_moved: usize,
    /// The relay the test asked for (`--mode`, or [`Forwarder::expect_mode`] for a
    /// rule's `mode =` key): every rule must say it runs it. (Pairs are checked against
    /// their rule's own line: a rule that said splice where ebpf was asked for passed.)
    requested: Option<Mode>,
}

impl Default for PathCheck {
    fn default() -> Self {
        PathCheck {
            paths: None,
            max_userspace: 0,
            min_pairs: 1,
            min_moved: 0,
            requested: None,
        }
    }
}

impl Forwarder {
    /// `forwarder run --listen 127.0.0.1:0 --upstream U... --mode MODE`.
    pub fn cli(mode: Mode, upstreams: &[SocketAddr]) -> Forwarder {
        let ups: Vec<String> = upstreams.iter().map(|a| a.to_string()).collect();
        Self::cli_listen(mode, "127.0.0.1:0", &ups)
    }

    /// [`Forwarder::cli`] with one upstream, started under a wrapper command
    /// (`prlimit ... --`, `setpriv ... --`, `env ...`).
    pub fn cli_under(prefix: &[&str], mode: Mode, upstream: SocketAddr) -> Forwarder {
        let prefix: Vec<OsString> = prefix.iter().map(OsString::from).collect();
        let up = upstream.to_string();
        let args = [
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up,
            "--mode",
            mode.as_str(),
        ];
        let args = args.iter().map(OsString::from).collect();
        Self::spawn(&prefix, args, 1, None)
    }

    pub fn cli_listen(mode: Mode, listen: &str, upstreams: &[String]) -> Forwarder {
        let mut args: Vec<OsString> = vec!["run".into(), "--listen".into(), listen.into()];
        for u in upstreams {
            args.push("--upstream".into());
            args.push(u.into());
        }
        args.push("--mode".into());
        args.push(mode.as_str().into());
        Self::spawn(&[], args, 1, None)
    }

    /// `forwarder run --config FILE [--mode MODE]`, waiting for `rules` listening lines.
    pub fn config(mode: Option<Mode>, toml: &str, rules: usize) -> Forwarder {
        let dir = TempDir::new("config");
        let path = dir.write("forwarder.toml", toml);
        let mut args: Vec<OsString> = vec!["run".into(), "--config".into(), path.into()];
        if let Some(m) = mode {
            args.push("--mode".into());
            args.push(m.as_str().into());
        }
        Self::spawn(&[], args, rules, Some(dir))
    }

    /// Starts `prefix... forwarder args...` and waits for `rules` listening lines.
    /// Panics (with the forwarder's stderr) if it exits or stays silent instead.
    pub fn spawn(
        prefix: &[OsString],
        args: Vec<OsString>,
        rules: usize,
        dir: Option<TempDir>,
    ) -> Forwarder {
        Self::spawn_bin(prefix, &forwarder_bin(), args, rules, dir)
    }

    /// As [`Forwarder::spawn`], with the binary at `bin`.
    pub fn spawn_bin(
        prefix: &[OsString],
        bin: &Path,
        args: Vec<OsString>,
        rules: usize,
        dir: Option<TempDir>,
    ) -> Forwarder {
        let mut cmd = match prefix.split_first() {
            None => command(bin),
            Some((first, rest)) => {
                let mut c = command(first);
                c.args(rest).arg(bin);
                c
            }
        };
        // FORWARDER_TEST_LOG=info,forwarder=debug shows the relays' own statistics.
        let log = std::env::var("FORWARDER_TEST_LOG").unwrap_or_else(|_| "info".into());
        cmd.env("FORWARDER_LOG", log);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let desc = format!("{cmd:?}");
        let mut proc = ChildGuard::spawn(cmd, "forwarder");
        let stderr = Lines::collect(proc.child_mut().stderr.take().unwrap());
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let listening = loop {
            let found = stderr.wait_for_n(rules, Duration::from_millis(50), |l| {
                parse_listening(l).is_some()
            });
            if found.len() >= rules {
                break found
                    .iter()
                    .filter_map(|l| parse_listening(l))
                    .collect::<Vec<_>>();
            }
            if let Some(status) = proc.try_status() {
                stderr.wait_eof(Duration::from_secs(2));
                panic!(
                    "forwarder exited at startup with {status}: {desc}\nstderr:\n{}",
                    stderr.text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "forwarder printed {} of {rules} listening lines within {STARTUP_TIMEOUT:?}: {desc}\nstderr:\n{}",
                    found.len(),
                    stderr.text()
                );
            }
        };
        let requested = args
            .iter()
            .position(|a| a == "--mode")
            .and_then(|i| args.get(i + 1))
            .and_then(|m| {
                [Mode::Splice, Mode::Ebpf]
                    .into_iter()
                    .find(|k| m == k.as_str())
            });
        let paths = Mutex::new(PathCheck {
            requested,
            ..PathCheck::default()
        });
        Forwarder {
            proc,
            stderr,
            listening,
            paths,
            _dir: dir,
        }
    }

    /// Pairs may also end with one of these `path=` values (e.g. `ebpf>splice` for a
    /// bulk transfer that leaves the maps at the in-flight bound).
    pub fn expect_paths(&self, paths: &[&str]) -> &Self {
        self.paths.lock().unwrap().paths = Some(paths.iter().map(|p| p.to_string()).collect());
        self
    }

    /// Each pair may move up to `bytes` through the forwarder's own memory.
    pub fn expect_userspace_at_most(&self, bytes: u64) -> &Self {
        self.paths.lock().unwrap().max_userspace = bytes;
        self
    }

    /// At least `n` pairs must have started on the rule's mode by the time the test
    /// ends (0 for a test whose clients are all refused).
    pub fn expect_pairs(&self, n: usize) -> &Self {
        self.paths.lock().unwrap().min_pairs = n;
        self
    }

    /// At least `n` pairs must have switched paths (a `>` in `path=`).
    pub fn expect_moved(&self, n: usize) -> &Self {
        self.paths.lock().unwrap().min_moved = n;
        self
    }

    /// Every rule must run `mode` (its rules' `mode =` key: `--mode` is noted by itself).
    pub fn expect_mode(&self, mode: Mode) -> &Self {
        self.paths.lock().unwrap().requested = Some(mode);
        self
    }

    /// The rule's relay (`mode=` of its latest listening line, a reload may have
    /// started it again) for a close line.
    fn rule_mode(&self, close: &str) -> Option<String> {
        let rule = field(close, "rule")?;
        self.log_lines()
            .iter()
            .rev()
            .filter_map(|l| parse_listening(l))
            .find(|l| l.rule == rule)
            // A rewrite rule runs in splice mode on the copy path, which its pairs name.
            .map(|l| match l.line.contains("(path=copy)") {
                true => "copy".to_string(),
                false => l.mode,
            })
    }

    /// The config file given with `--config` (for tests that rewrite it and reload).
    pub fn config_path(&self) -> PathBuf {
        self._dir
            .as_ref()
            .expect("started with Forwarder::config")
            .path()
            .join("forwarder.toml")
    }

    /// Writes `toml` over the config file, sends SIGHUP and waits for the `reload`
    /// line that answers it; returns that line (as text).
    pub fn reload(&mut self, toml: &str) -> String {
        std::fs::write(self.config_path(), toml).expect("rewrite the config");
        self.sighup()
    }

    /// Sends SIGHUP and waits for the next `reload ok`/`reload failed` line.
    pub fn sighup(&mut self) -> String {
        let is_reload = |l: &str| {
            let t = as_text(l);
            t.contains(" reload ok") || t.contains(" reload failed")
        };
        let before = self
            .stderr
            .snapshot()
            .iter()
            .filter(|l| is_reload(l))
            .count();
        self.proc.signal(libc::SIGHUP);
        let seen = self
            .stderr
            .wait_for_n(before + 1, Duration::from_secs(10), is_reload);
        match seen.get(before) {
            Some(l) => as_text(l),
            None => panic!(
                "no reload line within 10 s of SIGHUP; stderr:\n{}",
                self.stderr.text()
            ),
        }
    }

    /// Asserts the [`PathCheck`] on the close lines logged so far (waiting up to 5 s
    /// for the pairs it requires). Runs on drop; call it earlier to check mid-test.
    pub fn check_paths(&self) {
        let check = self.paths.lock().unwrap().clone();
        if let Some(want) = check.requested {
            for l in self.log_lines().iter().filter_map(|l| parse_listening(l)) {
                // A rewrite rule runs the copy path, a tunnel rule splice with
                // retention, whatever the mode (their lines say so).
                let own_path = l.line.contains("(path=copy)")
                    || l.line.contains("tunnel: splice with retention");
                assert!(
                    own_path || l.mode == want.as_str(),
                    "the test asked for mode {}, the rule runs another: {}",
                    want.as_str(),
                    l.line
                );
            }
        }
        let relayed = |l: &str| l.contains(" close rule=") && field(l, "path") != Some("none");
        self.stderr.wait_for_n(
            check.min_pairs.max(check.min_moved),
            Duration::from_secs(5),
            |l| relayed(&as_text(l)),
        );
        let closes: Vec<String> = self
            .close_lines()
            .into_iter()
            .filter(|l| relayed(l))
            .collect();
        // The kernel path takes only established sockets (the check before pairing
        // says which state; the kernel's own refusal is EOPNOTSUPP): a peer that
        // closed between connect and pairing (a server that says its name
        // and hangs up, say). Such a pair is relayed by splice, and the forwarder says
        // so, once per pair: that many splice pairs are the ebpf rules' due.
        let mut peer_gone = self
            .log_lines()
            .iter()
            .filter(|l| {
                l.contains("cannot pair sockets")
                    && (l.contains("(os error 95)") || l.contains("socket in TCP state"))
            })
            .count();
        let mut moved = 0;
        let mut on_mode = 0;
        for l in &closes {
            let path = field(l, "path").unwrap_or_else(|| panic!("no path= in {l}"));
            let mode = self
                .rule_mode(l)
                .unwrap_or_else(|| panic!("close line of an unknown rule: {l}"));
            let fell_back = mode.as_str() == "ebpf" && path == "splice" && peer_gone > 0;
            peer_gone -= usize::from(fell_back);
            let allowed = path == mode.as_str()
                || fell_back
                || check
                    .paths
                    .as_ref()
                    .is_some_and(|p| p.iter().any(|a| a == path));
            assert!(
                allowed,
                "pair took path={path}, the rule runs mode={mode} (also allowed: {:?}): {l}",
                check.paths
            );
            moved += usize::from(path.contains('>'));
            on_mode += usize::from(path.split('>').next() == Some(mode.as_str()));
            let userspace: u64 = field(l, "userspace_bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no userspace_bytes= in {l}"));
            assert!(
                userspace <= check.max_userspace,
                "{userspace} bytes went through userspace, at most {} allowed: {l}",
                check.max_userspace
            );
        }
        assert!(
            on_mode >= check.min_pairs,
            "{on_mode} pair(s) started on their rule's mode, the test needs at least {}: {closes:#?}",
            check.min_pairs
        );
        assert!(
            moved >= check.min_moved,
            "{moved} pair(s) switched paths, at least {} expected: {closes:#?}",
            check.min_moved
        );
    }

    /// The address of the first (or only) rule.
    pub fn addr(&self) -> SocketAddr {
        self.listening[0].addr
    }

    pub fn rule_addr(&self, rule: &str) -> SocketAddr {
        self.listening
            .iter()
            .find(|l| l.rule == rule)
            .unwrap_or_else(|| panic!("no listening line for rule {rule}: {:?}", self.listening))
            .addr
    }

    /// Asserts every rule runs on the relay path `mode` asked for.
    pub fn assert_mode(&self, mode: Mode) {
        for l in &self.listening {
            assert_eq!(l.mode, mode.as_str(), "wrong relay path: {}", l.line);
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Every line logged so far (JSON lines as text, see [`as_text`]).
    pub fn log_lines(&self) -> Vec<String> {
        self.stderr.snapshot().iter().map(|l| as_text(l)).collect()
    }

    /// `close ...` lines logged so far.
    pub fn close_lines(&self) -> Vec<String> {
        self.log_lines()
            .into_iter()
            .filter(|l| l.contains(" close rule="))
            .collect()
    }

    /// Waits for `n` close lines; returns those seen (maybe fewer on timeout).
    pub fn wait_close_lines(&self, n: usize, timeout: Duration) -> Vec<String> {
        self.stderr
            .wait_for_n(n, timeout, |l| as_text(l).contains(" close rule="))
            .iter()
            .map(|l| as_text(l))
            .collect()
    }

    /// Panics unless the forwarder is still running.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.proc.try_status() {
            panic!(
                "forwarder exited unexpectedly with {s}; stderr:\n{}",
                self.stderr.text()
            );
        }
    }

    /// utime + stime of the forwarder process, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid())
    }

    pub fn context_switches(&self) -> u64 {
        proc_context_switches(self.pid())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // The path check is the test's last assertion: run it while the forwarder still
        // logs, and fail the test with it (after the usual clean-up) if it does not hold.
        let failed_check = if thread::panicking() {
            None
        } else {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.check_paths())).err()
        };
        self.proc.kill();
        // FORWARDER_TEST_DUMP=FILE keeps every forwarder's whole stderr, for debugging.
        if let Some(path) = std::env::var_os("FORWARDER_TEST_DUMP") {
            let text = self.stderr.snapshot().join("\n") + "\n";
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = std::io::Write::write_all(&mut f, text.as_bytes());
            }
        }
        if thread::panicking() || failed_check.is_some() {
            let lines = self.stderr.snapshot();
            let skip = lines.len().saturating_sub(60);
            // What went wrong is often older than the tail (CI once showed 60 lines of
            // healthy close lines and not the one pair that failed): warnings, errors and
            // close lines that did not end `closed` come first.
            // Read as text, so `--log-format json` lines are picked out the same way.
            let notable: Vec<String> = lines[..skip]
                .iter()
                .map(|l| as_text(l))
                .filter(|l| {
                    (l.contains(" WARN ") || l.contains(" ERROR "))
                        || (l.contains(" close rule=") && field(l, "end") != Some("closed"))
                })
                .collect();
            if !notable.is_empty() {
                eprintln!(
                    "---- forwarder stderr: earlier warnings, errors and unusual ends ({} of them, first 40) ----",
                    notable.len()
                );
                for l in notable.iter().take(40) {
                    eprintln!("{l}");
                }
            }
            eprintln!(
                "---- forwarder stderr (last {} lines) ----",
                lines.len() - skip
            );
            for l in &lines[skip..] {
                eprintln!("{l}");
            }
        }
        if let Some(e) = failed_check {
            std::panic::resume_unwind(e);
        }
    }
}

/// Describes an exit status for assertions ("exit 1", "signal 9").
pub fn describe_status(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{s}"),
    }
}

/// utime + stime of `pid` from /proc/PID/stat, in seconds.
pub fn proc_cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f[11].parse().unwrap();
    let stime: u64 = f[12].parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (utime + stime) as f64 / hz
}

/// Context switches (voluntary and not) of every thread of `pid`, from each
/// /proc/PID/task/TID/status: how often the process ran at all.
pub fn proc_context_switches(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// VmRSS of `pid` from /proc/PID/status, in bytes (0 if unreadable).
pub fn proc_rss(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Memory the kernel holds for all TCP sockets (/proc/net/sockstat `TCP: ... mem N`,
/// in pages), in bytes.
pub fn tcp_socket_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("MemAvailable:") {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap();
            return kb * 1024;
        }
    }
    panic!("no MemAvailable in /proc/meminfo");
}

// ---------------------------------------------------------------------------------
// Payloads and hashes
// ---------------------------------------------------------------------------------

pub type Sha = [u8; 32];

/// Incremental SHA-256. ring's assembly keeps it fast in unoptimised test builds
/// (a pure-Rust hash runs at a few tens of MB/s at opt-level 0).
#[derive(Clone)]
pub struct Hasher(ring::digest::Context);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Sha {
        self.0.finish().as_ref().try_into().expect("32-byte digest")
    }
}

pub fn sha256(data: &[u8]) -> Sha {
    let mut h = Hasher::new();
    h.update(data);
    h.finish()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Bytes of random material that payload blocks are cut from.
const TABLE_LEN: usize = 4 << 20;
/// Payloads are made of blocks of this size, each unique to (seed, block index).
const BLOCK: u64 = 4096;
const HEADER: usize = 16;

fn table() -> &'static [u8] {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![0u8; TABLE_LEN];
        for (i, c) in t.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&splitmix64(i as u64).to_le_bytes());
        }
        t
    })
}

/// A deterministic pseudo-random byte stream: byte `i` of seed `s` is always the same,
/// so senders and checkers can generate any part of it without storing it.
///
/// Block `b` (4 KiB) starts with a 16-byte header holding the seed and `b`, followed
/// by random bytes cut from a shared table at an offset derived from both; so every
/// block is distinct (a lost, duplicated or reordered block changes the sha256) and
/// generating is a memcpy, fast even in unoptimised test builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub seed: u64,
    pub len: u64,
}

impl Payload {
    pub fn new(seed: u64, len: u64) -> Payload {
        Payload { seed, len }
    }

    /// Fills `buf` with the bytes starting at `offset` (ignores `len`).
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let table = table();
        let key = splitmix64(self.seed ^ 0x5EED_F00D);
        let mut pos = offset;
        let mut i = 0;
        while i < buf.len() {
            let b = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(buf.len() - i);
            let mut header = [0u8; HEADER];
            header[..8].copy_from_slice(&self.seed.to_le_bytes());
            header[8..].copy_from_slice(&b.to_le_bytes());
            let start = (splitmix64(key ^ b) % (TABLE_LEN as u64 - BLOCK)) as usize;
            let block = &table[start..start + BLOCK as usize];
            let out = &mut buf[i..i + n];
            let mut k = 0;
            if within < HEADER {
                let h = (HEADER - within).min(n);
                out[..h].copy_from_slice(&header[within..within + h]);
                k = h;
            }
            out[k..].copy_from_slice(&block[within + k..within + n]);
            i += n;
            pos += n as u64;
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len as usize];
        self.fill(0, &mut v);
        v
    }

    pub fn sha256(&self) -> Sha {
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 256 * KIB as usize];
        let mut off = 0;
        while off < self.len {
            let n = (self.len - off).min(buf.len() as u64) as usize;
            self.fill(off, &mut buf[..n]);
            h.update(&buf[..n]);
            off += n as u64;
        }
        h.finish()
    }

    /// Writes the whole payload to `w` in 256 KiB chunks, giving up at `deadline`.
    pub fn write_to(&self, w: &TcpStream, deadline: Instant) -> io::Result<()> {
        self.write_paced(w, deadline, None)
    }

    /// Like `write_to`, at most `bytes_per_sec` when given.
    pub fn write_paced(
        &self,
        w: &TcpStream,
        deadline: Instant,
        bytes_per_sec: Option<u64>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * KIB as usize];
        let mut off = 0;
        let started = Instant::now();
        while off < self.len {
            if let Some(rate) = bytes_per_sec {
                let due = started + Duration::from_secs_f64(off as f64 / rate as f64);
                thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            let n = (self.len - off).min(buf.len() as u64) as usize;
            self.fill(off, &mut buf[..n]);
            set_write_deadline(w, deadline)?;
            let mut w = w;
            w.write_all(&buf[..n]).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("writing payload at byte {off} of {}: {e}", self.len),
                )
            })?;
            off += n as u64;
        }
        Ok(())
    }
}

/// Hash and count of a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digested {
    pub len: u64,
    pub sha: Sha,
}

impl Digested {
    pub fn of(p: &Payload) -> Digested {
        Digested {
            len: p.len,
            sha: p.sha256(),
        }
    }
}

impl std::fmt::Display for Digested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes sha256 {}", self.len, hex(&self.sha))
    }
}

// ---------------------------------------------------------------------------------
// Socket helpers with timeouts
// ---------------------------------------------------------------------------------

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let now = Instant::now();
    if now >= deadline {
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
    } else {
        Ok((deadline - now).max(Duration::from_millis(1)))
    }
}

pub fn set_read_deadline(s: &TcpStream, deadline: Instant) -> io::Result<()> {
    s.set_read_timeout(Some(remaining(deadline)?))
}

pub fn set_write_deadline(s: &TcpStream, deadline: Instant) -> io::Result<()> {
    s.set_write_timeout(Some(remaining(deadline)?))
}

/// Connects with a 5 s timeout; the stream gets 30 s read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads to EOF, hashing; fails at `deadline`.
pub fn read_digest(s: &TcpStream, deadline: Instant) -> io::Result<Digested> {
    read_digest_from(s, Hasher::new(), 0, deadline)
}

/// [`read_digest`] continuing a hash `h` over `len` bytes already read.
pub fn read_digest_from(
    s: &TcpStream,
    h: Hasher,
    len: u64,
    deadline: Instant,
) -> io::Result<Digested> {
    read_digest_counting(s, h, len, deadline, None)
}

/// [`read_digest`], adding every byte read to `counter` as it arrives (progress).
pub fn read_digest_counted(
    s: &TcpStream,
    deadline: Instant,
    counter: &std::sync::atomic::AtomicU64,
) -> io::Result<Digested> {
    read_digest_counting(s, Hasher::new(), 0, deadline, Some(counter))
}

fn read_digest_counting(
    s: &TcpStream,
    mut h: Hasher,
    mut len: u64,
    deadline: Instant,
    counter: Option<&std::sync::atomic::AtomicU64>,
) -> io::Result<Digested> {
    let mut s = s;
    let mut buf = vec![0u8; 256 * KIB as usize];
    loop {
        set_read_deadline(s, deadline)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                len += n as u64;
                if let Some(c) = counter {
                    c.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("reading after {len} bytes: {e}"),
                ))
            }
        }
    }
    Ok(Digested {
        len,
        sha: h.finish(),
    })
}

/// Reads to EOF into memory (at most `limit` bytes); fails at `deadline`.
pub fn read_to_end(s: &TcpStream, limit: usize, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut s = s;
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        set_read_deadline(s, deadline)?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > limit {
                    return Err(io::Error::other(format!("more than {limit} bytes")));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads exactly `n` bytes within `timeout`.
pub fn read_exact_timeout(s: &TcpStream, n: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let mut s = s;
    let deadline = Instant::now() + timeout;
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        set_read_deadline(s, deadline)?;
        match s.read(&mut out[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {got} of {n} bytes"),
                ))
            }
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// How a connection ended as seen by a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Eof,
    Reset,
}

/// Waits up to `timeout` for the peer to end the connection, without sending anything.
/// Returns how it ended and after how long; Err if it did not end or sent data.
pub fn wait_closed(s: &TcpStream, timeout: Duration) -> Result<(Ending, Duration), String> {
    let mut s = s;
    let start = Instant::now();
    let deadline = start + timeout;
    let mut buf = [0u8; 4096];
    loop {
        if set_read_deadline(s, deadline).is_err() {
            return Err(format!("still open after {timeout:?}"));
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok((Ending::Eof, start.elapsed())),
            Ok(n) => return Err(format!("got {n} unexpected bytes")),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Ok((Ending::Reset, start.elapsed()))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if Instant::now() >= deadline {
                    return Err(format!("still open after {timeout:?}"));
                }
            }
            Err(e) => return Err(format!("unexpected error {e} ({:?})", e.kind())),
        }
    }
}

/// Connects to `addr` and waits up to `timeout` for the peer to end the connection
/// unasked: how it ended. A reset can beat connect() back to the client on loopback
/// (accepted, passed on and reset before the client's thread runs again): connect()
/// then returns it, and that is the reset.
pub fn connect_and_wait_closed(addr: SocketAddr, timeout: Duration) -> Result<Ending, String> {
    match try_connect(addr) {
        Ok(c) => wait_closed(&c, timeout).map(|(how, _)| how),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(Ending::Reset),
        Err(e) => Err(format!("connect: {e}")),
    }
}

/// Sends `p` on a second thread (then shuts the write side) while reading to EOF here.
/// Returns the digest of what came back.
pub fn exchange(s: &TcpStream, p: Payload, deadline: Instant) -> io::Result<Digested> {
    exchange_by(s, deadline, move |s| p.write_to(s, deadline))
}

/// [`exchange`] with the sending done by `write` (before the write side is shut).
pub fn exchange_by(
    s: &TcpStream,
    deadline: Instant,
    write: impl FnOnce(&TcpStream) -> io::Result<()> + Send,
) -> io::Result<Digested> {
    thread::scope(|scope| {
        let writer = scope.spawn(move || -> io::Result<()> {
            write(s)?;
            s.shutdown(Shutdown::Write)
        });
        let read = read_digest(s, deadline);
        if read.is_err() {
            // Unblock the writer so the scope can end.
            let _ = s.shutdown(Shutdown::Both);
        }
        let wrote = writer.join().expect("writer thread panicked");
        let got = read?;
        wrote?;
        Ok(got)
    })
}

/// Connects to `addr`, echoes `p` through it and checks the bytes that come back.
/// A FIN that reaches the forwarder before it paired the sockets makes an ebpf pair
/// fall back to splice (a socket that got its FIN cannot join a sockmap), so for a
/// kernel-path test use [`echo_check_paired`].
pub fn echo_check(addr: SocketAddr, p: Payload, timeout: Duration) {
    let s = connect(addr);
    let got = exchange(&s, p, Instant::now() + timeout)
        .unwrap_or_else(|e| panic!("echo of {} bytes via {addr}: {e}", p.len));
    assert_eq!(got, Digested::of(&p), "echoed bytes differ");
}

/// [`echo_check`] after a one-byte round trip (`!`), which the forwarder can only
/// answer once the pair is relayed: the payload and its FIN then surely travel on
/// the pair's path, not on a fallback. The pair moves `p.len + 1` bytes each way.
pub fn echo_check_paired(addr: SocketAddr, p: Payload, timeout: Duration) {
    let s = connect(addr);
    ping(&s, b"!", timeout).unwrap_or_else(|e| panic!("first round trip via {addr}: {e}"));
    let got = exchange(&s, p, Instant::now() + timeout)
        .unwrap_or_else(|e| panic!("echo of {} bytes via {addr}: {e}", p.len));
    assert_eq!(got, Digested::of(&p), "echoed bytes differ");
}

/// One small request/response through an echo server.
pub fn ping(s: &TcpStream, msg: &[u8], timeout: Duration) -> io::Result<()> {
    let mut s = s;
    s.write_all(msg)?;
    let got = read_exact_timeout(s, msg.len(), timeout)?;
    if got != msg {
        return Err(io::Error::other(format!(
            "echo mismatch: sent {msg:?}, got {got:?}"
        )));
    }
    Ok(())
}

/// Binds a TCP socket without listening: connecting to its port is refused, and the
/// port stays reserved for as long as the socket lives.
pub fn refused_port(ip: IpAddr) -> (socket2::Socket, SocketAddr) {
    let addr = SocketAddr::new(ip, 0);
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.bind(&addr.into()).unwrap();
    let local = s.local_addr().unwrap().as_socket().unwrap();
    (s, local)
}

// ---------------------------------------------------------------------------------
// Upstream servers
// ---------------------------------------------------------------------------------

type Handler = Arc<dyn Fn(Conn) + Send + Sync + 'static>;
/// Accepted sockets (weakly: a handler dropping its `Conn` really closes the socket)
/// and their handler threads.
type Conns = Arc<Mutex<Vec<(Weak<TcpStream>, JoinHandle<()>)>>>;

/// An accepted connection as a server handler gets it. Dropping it closes the socket
/// (the server only keeps a weak reference, to shut it down when the server is dropped).
pub struct Conn(Arc<TcpStream>);

impl std::ops::Deref for Conn {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::os::fd::AsFd for Conn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A TCP server on loopback running `handler` on a thread per connection. Dropping it
/// stops accepting, shuts every accepted socket down and joins every thread.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    conns: Conns,
    accepted: Arc<AtomicUsize>,
}

impl Server {
    pub fn start(ip: IpAddr, handler: impl Fn(Conn) + Send + Sync + 'static) -> Server {
        Self::start_at(SocketAddr::new(ip, 0), handler)
    }

    /// Like [`Server::start`], on `addr` (a link-local address needs its scope).
    pub fn start_at(addr: SocketAddr, handler: impl Fn(Conn) + Send + Sync + 'static) -> Server {
        let handler: Handler = Arc::new(handler);
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        sock.set_reuse_address(true).unwrap();
        sock.bind(&addr.into())
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        sock.listen(4096).unwrap();
        let listener: TcpListener = sock.into();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, conns, accepted) = (stop.clone(), conns.clone(), accepted.clone());
            thread::Builder::new()
                .name(format!("server-{addr}"))
                .spawn(move || accept_loop(listener, handler, stop, conns, accepted))
                .expect("spawn acceptor")
        };
        Server {
            addr,
            stop,
            acceptor: Some(acceptor),
            conns,
            accepted,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Echoes every byte; on EOF shuts its write side and closes.
    pub fn echo() -> Server {
        Self::echo_on(LOCALHOST)
    }

    pub fn echo_on(ip: IpAddr) -> Server {
        Server::start(ip, |s| {
            let _ = echo_stream(&s);
        })
    }

    /// Sends `greeting` as soon as a client connects, then echoes.
    pub fn greeting(greeting: &'static [u8]) -> Server {
        Server::start(LOCALHOST, move |mut s| {
            if s.write_all(greeting).is_ok() {
                let _ = echo_stream(&s);
            }
        })
    }

    /// Reads to EOF, then answers `"<sha256 hex> <byte count>\n"` and closes.
    /// Each digest is also reported on the returned channel.
    pub fn answer_after_eof() -> (Server, mpsc::Receiver<io::Result<Digested>>) {
        let (tx, rx) = mpsc::channel();
        let server = Server::start(LOCALHOST, move |mut s| {
            let r = read_digest(&s, Instant::now() + Duration::from_secs(120));
            if let Ok(d) = &r {
                let _ = s.write_all(format!("{} {}\n", hex(&d.sha), d.len).as_bytes());
                let _ = s.shutdown(Shutdown::Write);
            }
            let _ = tx.send(r);
        });
        (server, rx)
    }

    /// Reads to EOF and reports the digest (or the error) on the returned channel.
    pub fn recorder() -> (Server, mpsc::Receiver<io::Result<Digested>>) {
        let (tx, rx) = mpsc::channel();
        let server = Server::start(LOCALHOST, move |s| {
            let r = read_digest(&s, Instant::now() + Duration::from_secs(120));
            let _ = tx.send(r);
        });
        (server, rx)
    }

    /// The next `n` reports of a [`Server::recorder`], in the order they came: each
    /// connection's handler reports when it ends, which need not be the clients' order.
    /// Panics when one does not come within `each` or its read failed.
    pub fn reports(
        rx: &mpsc::Receiver<io::Result<Digested>>,
        n: usize,
        each: Duration,
    ) -> Vec<Digested> {
        (0..n)
            .map(|i| {
                rx.recv_timeout(each)
                    .unwrap_or_else(|_| panic!("upstream connection report {} of {n}", i + 1))
                    .unwrap_or_else(|e| panic!("upstream read {} of {n}: {e}", i + 1))
            })
            .collect()
    }

    /// Sends `p` to every client, shuts its write side, then waits for the client's EOF.
    pub fn source(p: Payload) -> Server {
        Server::start(LOCALHOST, move |s| {
            let deadline = Instant::now() + Duration::from_secs(120);
            if p.write_to(&s, deadline).is_ok() {
                let _ = s.shutdown(Shutdown::Write);
                let _ = read_to_end(&s, usize::MAX, deadline);
            }
        })
    }
}

/// Echoes until EOF (then shuts the write side) or an error.
pub fn echo_stream(s: &TcpStream) -> io::Result<()> {
    let mut s = s;
    let mut buf = vec![0u8; 64 * KIB as usize];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return s.shutdown(Shutdown::Write),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        s.write_all(&buf[..n])?;
    }
}

fn accept_loop(
    listener: TcpListener,
    handler: Handler,
    stop: Arc<AtomicBool>,
    conns: Conns,
    accepted: Arc<AtomicUsize>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a 50 ms timeout bounds each wait.
        unsafe {
            libc::poll(&mut pfd, 1, 50);
        }
        // Bounded: the backlog is finite and each accept takes one entry from it.
        for _ in 0..4096 {
            match listener.accept() {
                Ok((s, _)) => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
                    let s = Arc::new(s);
                    let weak = Arc::downgrade(&s);
                    let h = handler.clone();
                    match thread::Builder::new()
                        .name("server-conn".into())
                        .stack_size(256 * 1024)
                        .spawn(move || h(Conn(s)))
                    {
                        Ok(j) => conns.lock().unwrap().push((weak, j)),
                        Err(e) => eprintln!("server: cannot spawn a connection thread: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("server: accept failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        // Reap finished connection threads so long-running servers stay small.
        let mut c = conns.lock().unwrap();
        if c.len() > 64 {
            let mut i = 0;
            while i < c.len() {
                if c[i].1.is_finished() {
                    let (_, j) = c.swap_remove(i);
                    let _ = j.join();
                } else {
                    i += 1;
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        for (s, _) in &conns {
            if let Some(s) = s.upgrade() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        for (_, j) in conns {
            let _ = j.join();
        }
    }
}

// ---------------------------------------------------------------------------------
// Many concurrent clients, one poll loop
// ---------------------------------------------------------------------------------

struct EchoClient {
    s: TcpStream,
    p: Payload,
    chunk: Vec<u8>,
    chunk_pos: usize,
    sent: u64,
    write_done: bool,
    recv: Hasher,
    received: u64,
    eof: bool,
}

/// Connects one client per payload to `addr` (all open at once), then in a single
/// poll loop sends each its payload (shutting the write side after it) and reads the
/// echo back to EOF. Checks every echo's length and sha256 against its payload.
pub fn drive_echo_clients(
    addr: SocketAddr,
    payloads: &[Payload],
    deadline: Instant,
) -> Result<(), String> {
    drive_echo(addr, payloads, false, deadline)
}

/// [`drive_echo_clients`], each client first making a one-byte round trip (`!`) so
/// that its payload and FIN travel on the pair's own path (see [`echo_check_paired`]).
pub fn drive_paired_echo_clients(
    addr: SocketAddr,
    payloads: &[Payload],
    deadline: Instant,
) -> Result<(), String> {
    drive_echo(addr, payloads, true, deadline)
}

fn drive_echo(
    addr: SocketAddr,
    payloads: &[Payload],
    paired: bool,
    deadline: Instant,
) -> Result<(), String> {
    let mut clients = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.iter().enumerate() {
        let s = try_connect(addr).map_err(|e| format!("connect #{i} to {addr}: {e}"))?;
        if paired {
            let left = deadline.saturating_duration_since(Instant::now());
            ping(&s, b"!", left).map_err(|e| format!("first round trip of #{i}: {e}"))?;
        }
        s.set_nonblocking(true).unwrap();
        clients.push(EchoClient {
            s,
            p: *p,
            chunk: Vec::new(),
            chunk_pos: 0,
            sent: 0,
            write_done: false,
            recv: Hasher::new(),
            received: 0,
            eof: false,
        });
    }
    let mut buf = vec![0u8; 64 * KIB as usize];
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(clients.len());
    let mut idx: Vec<usize> = Vec::with_capacity(clients.len());
    loop {
        pfds.clear();
        idx.clear();
        for (i, c) in clients.iter().enumerate() {
            if c.eof {
                continue;
            }
            let mut events = libc::POLLIN;
            if !c.write_done {
                events |= libc::POLLOUT;
            }
            pfds.push(libc::pollfd {
                fd: c.s.as_raw_fd(),
                events,
                revents: 0,
            });
            idx.push(i);
        }
        if pfds.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let stuck: Vec<String> = clients
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.eof)
                .take(5)
                .map(|(i, c)| format!("#{i}: sent {}/{} received {}", c.sent, c.p.len, c.received))
                .collect();
            return Err(format!(
                "{} of {} clients unfinished at the deadline, e.g. {stuck:?}",
                pfds.len(),
                clients.len()
            ));
        }
        // SAFETY: pfds is a valid array of pollfd; 100 ms bounds each wait.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if n <= 0 {
            continue;
        }
        for (k, pfd) in pfds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let i = idx[k];
            let c = &mut clients[i];
            if pfd.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 && !c.write_done {
                // Bounded: each pass either writes bytes or stops.
                for _ in 0..64 {
                    if c.chunk_pos == c.chunk.len() {
                        if c.sent == c.p.len {
                            c.s.shutdown(Shutdown::Write)
                                .map_err(|e| format!("client #{i}: shutdown: {e}"))?;
                            c.write_done = true;
                            c.chunk = Vec::new();
                            break;
                        }
                        let n = (c.p.len - c.sent).min(16 * KIB) as usize;
                        c.chunk.resize(n, 0);
                        c.p.fill(c.sent, &mut c.chunk);
                        c.chunk_pos = 0;
                    }
                    match c.s.write(&c.chunk[c.chunk_pos..]) {
                        Ok(n) => {
                            c.chunk_pos += n;
                            c.sent += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(format!(
                                "client #{i}: write after {} of {} bytes: {e}",
                                c.sent, c.p.len
                            ))
                        }
                    }
                }
            }
            if pfd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                for _ in 0..64 {
                    match c.s.read(&mut buf) {
                        Ok(0) => {
                            c.eof = true;
                            break;
                        }
                        Ok(n) => {
                            c.recv.update(&buf[..n]);
                            c.received += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(format!(
                                "client #{i}: read after {} of {} bytes: {e}",
                                c.received, c.p.len
                            ))
                        }
                    }
                }
            }
        }
    }
    let mut bad = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let got = Digested {
            len: c.received,
            sha: c.recv.finish(),
        };
        let want = Digested::of(&c.p);
        if got != want {
            bad.push(format!("#{i} (seed {}): got {got}, want {want}", c.p.seed));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} echoes differ: {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        ))
    }
}

/// TCP urgent data through a forwarder: the client's side of the exchange is
/// [`Urgent::send`] (`abc`, an urgent `X` with MSG_OOB, then [`Urgent::TAIL`] bytes in
/// one write, and no FIN), the upstream's is [`Urgent::server`], which reports what it
/// read once every normal byte is there (or after 10 s), then what came after that up
/// to EOF.
pub struct Urgent;

impl Urgent {
    pub const TAIL: usize = 256 * 1024;

    /// The normal bytes: what a reader that is not SO_OOBINLINE gets.
    pub fn normal() -> Vec<u8> {
        b"abc"
            .iter()
            .copied()
            .chain((0..Self::TAIL).map(|i| b'a' + (i % 26) as u8))
            .collect()
    }

    pub fn server() -> (Server, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let want = Self::normal().len();
        let up = Server::start(IpAddr::from([127, 0, 0, 1]), move |s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            // The kernel path delivers the urgent byte inline: not counted.
            while got.iter().filter(|&&b| b != b'X').count() < want {
                match (&*s).read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let tx = tx.lock().unwrap().clone();
            let _ = tx.send(got);
            let mut rest = Vec::new();
            let _ = tx.send(match (&*s).read_to_end(&mut rest) {
                Ok(_) => rest,
                Err(e) => format!("read error: {e}").into_bytes(),
            });
        });
        (up, rx)
    }

    pub fn send(s: &TcpStream) {
        let tail = &Self::normal()[3..];
        (&*s).write_all(b"abc").unwrap();
        thread::sleep(Duration::from_millis(50));
        // SAFETY: send on an open socket from a valid one-byte buffer.
        let sent = unsafe { libc::send(s.as_raw_fd(), b"X".as_ptr().cast(), 1, libc::MSG_OOB) };
        assert_eq!(sent, 1, "send(MSG_OOB): {}", io::Error::last_os_error());
        thread::sleep(Duration::from_millis(50));
        (&*s).write_all(tail).unwrap();
    }
}
