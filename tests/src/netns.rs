//! A network namespace joined to the root namespace by a veth pair, for tests that
//! fault a link for real (blackhole, reset, address change), and a generic process
//! guard for forwarders started with any arguments (in the root namespace or in one
//! of these).
//!
//! Everything created here is removed by `Drop` (also when a test panics): the veth
//! pair, the namespace, the qdiscs that blackhole the link, the processes. Names are
//! unique per test process and test (`fwdt-<pid>-<n>`), so tests run in parallel.

use std::ffi::OsString;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::{as_text, command, forwarder_bin, run_to_exit, ChildGuard, Lines, TempDir};

/// Runs `program args...` to completion (10 s at most); panics unless it succeeds.
pub fn sh(program: &str, args: &[&str]) -> String {
    let mut cmd = command(program);
    cmd.args(args);
    let o = run_to_exit(cmd, Duration::from_secs(10));
    assert!(
        o.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        o.status,
        o.stdout,
        o.stderr
    );
    o.stdout
}

/// Runs `program args...`, ignoring how it ends (for clean-up).
fn sh_quiet(program: &str, args: &[&str]) {
    let mut cmd = command(program);
    cmd.args(args);
    let _ = run_to_exit(cmd, Duration::from_secs(10));
}

/// Subnets in use by this process (10.201.X.0/29, X is the index).
static SUBNETS: Mutex<[bool; 256]> = Mutex::new([false; 256]);

/// Picks a free 10.201.X.0/29: not used by another namespace of this process, nor
/// by any address of the root namespace (another test process).
fn take_subnet() -> u8 {
    let mut used = SUBNETS.lock().unwrap_or_else(|e| e.into_inner());
    let addrs = sh("ip", &["-o", "-4", "addr", "show"]);
    let start = (std::process::id() as usize * 37) % 250;
    for k in 0..250 {
        let x = (start + k) % 250 + 1;
        if used[x] || addrs.contains(&format!("10.201.{x}.")) {
            continue;
        }
        used[x] = true;
        return x as u8;
    }
    panic!("no free 10.201.X.0/29 subnet for a test namespace");
}

fn release_subnet(x: u8) {
    SUBNETS.lock().unwrap_or_else(|e| e.into_inner())[x as usize] = false;
}

/// A network namespace `fwdt-<pid>-<n>` with loopback up, joined to the root
/// namespace by a veth pair on 10.201.X.0/29: `.1` on the root side ([`NetNs::host_ip`]),
/// `.2` inside ([`NetNs::ns_ip`], which [`NetNs::move_ns_addr`] can change).
pub struct NetNs {
    pub name: String,
    /// The veth end in the root namespace.
    pub host_if: String,
    /// The veth end inside the namespace.
    pub ns_if: String,
    pub subnet: u8,
    ns_ip: Mutex<Ipv4Addr>,
    /// `/run/netns/NAME`, for setns(2).
    fd: Option<File>,
    created_ns: bool,
    created_link: bool,
}

impl NetNs {
    pub fn new() -> NetNs {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet = take_subnet();
        let mut ns = NetNs {
            name: format!("fwdt-{pid}-{n}"),
            // At most 15 characters: "fh" + 7-digit pid + "x" + counter.
            host_if: format!("fh{pid}x{n}"),
            ns_if: format!("fn{pid}x{n}"),
            subnet,
            ns_ip: Mutex::new(Ipv4Addr::new(10, 201, subnet, 2)),
            fd: None,
            created_ns: false,
            created_link: false,
        };
        // A namespace or veth of these names can only be a leftover of a test process
        // that had our PID and was killed before its Drop ran: ours to remove.
        if std::path::Path::new(&format!("/run/netns/{}", ns.name)).exists() {
            sh_quiet("ip", &["netns", "del", &ns.name]);
        }
        if std::path::Path::new(&format!("/sys/class/net/{}", ns.host_if)).exists() {
            sh_quiet("ip", &["link", "del", &ns.host_if]);
        }
        // From here on, Drop removes whatever was made if a step fails.
        sh("ip", &["netns", "add", &ns.name]);
        ns.created_ns = true;
        sh(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.ns_if,
            ],
        );
        ns.created_link = true;
        sh("ip", &["link", "set", &ns.ns_if, "netns", &ns.name]);
        let host = format!("{}/29", ns.host_ip());
        sh("ip", &["addr", "add", &host, "dev", &ns.host_if]);
        sh("ip", &["link", "set", &ns.host_if, "up"]);
        let inside = format!("{}/29", ns.ns_ip());
        sh(
            "ip",
            &["-n", &ns.name, "addr", "add", &inside, "dev", &ns.ns_if],
        );
        sh("ip", &["-n", &ns.name, "link", "set", &ns.ns_if, "up"]);
        sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        let path = format!("/run/netns/{}", ns.name);
        ns.fd = Some(File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}")));
        ns
    }

    /// The root namespace's address on the veth (10.201.X.1).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.subnet, 1)
    }

    /// The namespace's current address on the veth (10.201.X.2 at first).
    pub fn ns_ip(&self) -> Ipv4Addr {
        *self.ns_ip.lock().unwrap()
    }

    fn raw_fd(&self) -> i32 {
        self.fd.as_ref().expect("namespace open").as_raw_fd()
    }

    /// Makes `cmd` run inside the namespace (setns(2) in the child before exec).
    pub fn enter(&self, cmd: &mut Command) {
        let fd = self.raw_fd();
        // SAFETY: setns is a plain syscall, async-signal-safe; the fd stays open
        // (owned by self) until the spawn that uses it returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs `f` on a thread that has joined the namespace: sockets it creates (a
    /// listener, and every connection that listener accepts) live in the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.raw_fd();
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only, with a namespace fd we own.
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread inside the namespace panicked")
        })
    }

    /// Runs `program args...` inside the namespace to completion; panics on failure.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Adds nftables chain `chain` of table `inet t` inside the namespace, on netfilter
    /// hook `chain` ("input" or "output"), with one rule (`nft add rule` words). The
    /// namespace's ruleset goes with it.
    pub fn nft_rule(&self, chain: &str, rule: &[&str]) {
        self.exec("nft", &["add", "table", "inet", "t"]);
        let spec = format!("{{ type filter hook {chain} priority 0; }}");
        self.exec("nft", &["add", "chain", "inet", "t", chain, &spec]);
        let mut all = vec!["add", "rule", "inet", "t", chain];
        all.extend_from_slice(rule);
        self.exec("nft", &all);
    }

    /// Drops every packet both ways on the veth (a pfifo of length 0 on both ends);
    /// the link comes back when the guard is restored or dropped.
    pub fn blackhole(&self) -> Blackhole<'_> {
        let mut b = Blackhole {
            ns: self,
            host: false,
            inside: false,
        };
        sh(
            "tc",
            &[
                "qdisc",
                "add",
                "dev",
                &self.host_if,
                "root",
                "pfifo",
                "limit",
                "0",
            ],
        );
        b.host = true;
        self.exec(
            "tc",
            &[
                "qdisc",
                "add",
                "dev",
                &self.ns_if,
                "root",
                "pfifo",
                "limit",
                "0",
            ],
        );
        b.inside = true;
        b
    }

    /// Aborts (`ss -K`, which sends a reset to the peer) every TCP socket inside the
    /// namespace connected to `host_ip():port`; returns how many it killed.
    pub fn kill_sockets_to(&self, port: u16) -> usize {
        let out = self.exec(
            "ss",
            &[
                "-K",
                "-t",
                "-n",
                "-H",
                "dst",
                &self.host_ip().to_string(),
                "dport",
                "=",
                &format!(":{port}"),
            ],
        );
        out.lines().filter(|l| !l.trim().is_empty()).count()
    }

    /// Replaces the namespace's veth address with 10.201.X.`last` (so its sockets
    /// connect from a new source address; the old address's sockets go dead).
    pub fn move_ns_addr(&self, last: u8) -> Ipv4Addr {
        let mut ip = self.ns_ip.lock().unwrap();
        let old = format!("{}/29", *ip);
        let new = Ipv4Addr::new(10, 201, self.subnet, last);
        sh(
            "ip",
            &["-n", &self.name, "addr", "del", &old, "dev", &self.ns_if],
        );
        sh(
            "ip",
            &[
                "-n",
                &self.name,
                "addr",
                "add",
                &format!("{new}/29"),
                "dev",
                &self.ns_if,
            ],
        );
        *ip = new;
        new
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.fd = None;
        if self.created_link {
            // Deleting one end deletes the pair (and its qdiscs).
            sh_quiet("ip", &["link", "del", &self.host_if]);
        }
        if self.created_ns {
            sh_quiet("ip", &["netns", "del", &self.name]);
        }
        release_subnet(self.subnet);
    }
}

/// A blackholed veth pair (see [`NetNs::blackhole`]); dropping it restores the link.
pub struct Blackhole<'a> {
    ns: &'a NetNs,
    host: bool,
    inside: bool,
}

impl Blackhole<'_> {
    /// Lets packets through again.
    pub fn restore(mut self) {
        self.remove(true);
    }

    fn remove(&mut self, strict: bool) {
        if self.host {
            self.host = false;
            let args = ["qdisc", "del", "dev", &self.ns.host_if, "root"];
            if strict {
                sh("tc", &args);
            } else {
                sh_quiet("tc", &args);
            }
        }
        if self.inside {
            self.inside = false;
            let args = [
                "netns",
                "exec",
                &self.ns.name,
                "tc",
                "qdisc",
                "del",
                "dev",
                &self.ns.ns_if,
                "root",
            ];
            if strict {
                sh("ip", &args);
            } else {
                sh_quiet("ip", &args);
            }
        }
    }
}

impl Drop for Blackhole<'_> {
    fn drop(&mut self) {
        self.remove(false);
    }
}

// ---------------------------------------------------------------------------------
// A forwarder process with any arguments
// ---------------------------------------------------------------------------------

/// A forwarder started with arbitrary arguments (`run -c ...`, `agent ...`), maybe
/// inside a [`NetNs`]. It is killed and reaped on drop; its stderr is collected, and
/// printed (the last lines, under its label) when the test panics.
pub struct Proc {
    pub proc: ChildGuard,
    pub stderr: Lines,
    pub label: String,
    _dir: Option<TempDir>,
}

impl Proc {
    /// Starts `forwarder ARGS...` with `FORWARDER_LOG` at info (or
    /// `FORWARDER_TEST_LOG`) and `env` added, inside `ns` if given. Does not wait.
    pub fn spawn(
        label: &str,
        args: &[OsString],
        ns: Option<&NetNs>,
        env: &[(&str, &str)],
        dir: Option<TempDir>,
    ) -> Proc {
        let mut cmd = command(forwarder_bin());
        if let Some(ns) = ns {
            ns.enter(&mut cmd);
        }
        let log = std::env::var("FORWARDER_TEST_LOG").unwrap_or_else(|_| "info".into());
        cmd.env("FORWARDER_LOG", log);
        cmd.env_remove("FORWARDER_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = ChildGuard::spawn(cmd, label);
        let stderr = Lines::collect(proc.child_mut().stderr.take().unwrap());
        Proc {
            proc,
            stderr,
            label: label.to_string(),
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Every line so far (JSON lines as text).
    pub fn lines(&self) -> Vec<String> {
        self.stderr.snapshot().iter().map(|l| as_text(l)).collect()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Lines so far that satisfy `pred`.
    pub fn matching(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.lines().into_iter().filter(|l| pred(l)).collect()
    }

    /// Waits up to `timeout` for `n` lines that satisfy `pred`; returns those seen.
    pub fn wait_n(&self, n: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.stderr
            .wait_for_n(n, timeout, |l| pred(&as_text(l)))
            .iter()
            .map(|l| as_text(l))
            .collect()
    }

    /// The first line that satisfies `pred`, waiting up to `timeout`; panics (with the
    /// log) if none comes, or the process exits first.
    pub fn expect_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        match self.wait_n(1, timeout, pred).into_iter().next() {
            Some(l) => l,
            None => panic!(
                "{}: no {what} line within {timeout:?}; its log:\n{}",
                self.label,
                self.text()
            ),
        }
    }

    /// `close rule=...` lines so far.
    pub fn close_lines(&self) -> Vec<String> {
        self.matching(|l| l.contains(" close rule="))
    }

    /// Waits for `n` close lines; returns those seen (maybe fewer).
    pub fn wait_close_lines(&self, n: usize, timeout: Duration) -> Vec<String> {
        self.wait_n(n, timeout, |l| l.contains(" close rule="))
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Panics (with the log) unless the process still runs.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.proc.try_status() {
            self.stderr.wait_eof(Duration::from_secs(2));
            panic!(
                "{} exited unexpectedly with {s}; its log:\n{}",
                self.label,
                self.text()
            );
        }
    }

    /// SIGKILLs the process now and waits for its output to end.
    pub fn kill(&mut self) {
        self.proc.kill();
        self.stderr.wait_eof(Duration::from_secs(5));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.proc.kill();
        if let Some(path) = std::env::var_os("FORWARDER_TEST_DUMP") {
            let text = format!(
                "==== {} ====\n{}\n",
                self.label,
                self.stderr.snapshot().join("\n")
            );
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = std::io::Write::write_all(&mut f, text.as_bytes());
            }
        }
        if thread::panicking() {
            let lines = self.stderr.snapshot();
            let skip = lines.len().saturating_sub(80);
            eprintln!(
                "---- {} stderr (last {} lines) ----",
                self.label,
                lines.len() - skip
            );
            for l in &lines[skip..] {
                eprintln!("{l}");
            }
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
