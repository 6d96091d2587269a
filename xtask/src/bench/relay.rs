//! A relay under test (our forwarder, nginx stream or HAProxy) as a child process: its
//! process tree (nginx forks workers), what that tree uses, and stopping it by PID.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::procfs;
use super::servers::Addrs;

pub struct Relay {
    child: Child,
    pub pid: u32,
    /// Where each rule listens, pointing at the same-named server.
    pub addrs: Addrs,
    /// What the relay said about its path, e.g. "splice (requested)", or how a peer is
    /// configured.
    pub path: String,
    pub log: PathBuf,
    /// Descendants seen so far (nginx workers): killed by PID too when the child is.
    seen: RefCell<BTreeSet<u32>>,
}

/// Why a relay did not come up: shown in the table instead of numbers.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl Relay {
    pub fn new(child: Child, addrs: Addrs, log: PathBuf) -> Relay {
        Relay {
            pid: child.id(),
            child,
            addrs,
            path: String::new(),
            log,
            seen: RefCell::new(BTreeSet::new()),
        }
    }

    /// If the child has exited: why, as the last line of its log and its status.
    pub fn exit_error(&mut self) -> Option<anyhow::Error> {
        let status = self.exited()?;
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let reason = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(no output)")
            .trim();
        Some(anyhow::anyhow!("{reason} [{status}]"))
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait: {e}")),
        }
    }

    /// The child and its descendants (remembered for the kill on drop).
    pub fn pids(&self) -> Vec<u32> {
        let mut out = vec![self.pid];
        out.extend(descendants(self.pid));
        self.seen.borrow_mut().extend(out.iter().skip(1));
        out
    }

    fn sum(&self, f: impl Fn(u32) -> Option<u64>) -> Option<u64> {
        let pids = self.pids();
        let v: Vec<u64> = pids.iter().filter_map(|p| f(*p)).collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }

    /// VmRSS summed over the process tree.
    pub fn rss_kib(&self) -> Option<u64> {
        self.sum(|p| procfs::status_kib(p, "VmRSS").ok())
    }

    /// VmHWM summed over the process tree.
    pub fn hwm_kib(&self) -> Option<u64> {
        self.sum(|p| procfs::status_kib(p, "VmHWM").ok())
    }

    /// utime + stime summed over the process tree.
    pub fn cpu_ticks(&self) -> Result<u64> {
        let mut total = 0;
        for p in self.pids() {
            total += procfs::process_cpu_ticks(p)?;
        }
        Ok(total)
    }

    /// Open file descriptors summed over the process tree.
    pub fn fds(&self) -> Option<u64> {
        self.sum(procfs::fd_count)
    }

    /// SIGTERM, then SIGKILL after `grace` (descendants too); always reaps our child.
    /// Returns how it ended.
    pub fn stop(mut self, grace: Duration) -> String {
        self.pids();
        if let Some(status) = self.exited() {
            self.kill_descendants();
            return format!("had already exited: {status}");
        }
        signal(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.kill_descendants();
                    return format!("exited: {status}");
                }
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        self.kill_descendants();
        match self.child.wait() {
            Ok(status) => format!("killed after {grace:?}: {status}"),
            Err(e) => format!("cannot reap: {e}"),
        }
    }

    /// SIGKILL to every descendant seen (nginx workers); they are not our children, so
    /// init reaps them.
    fn kill_descendants(&mut self) {
        for p in std::mem::take(&mut *self.seen.borrow_mut()) {
            signal(p, libc::SIGKILL);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.pids();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.kill_descendants();
    }
}

/// Makes the child get SIGTERM when this process dies without running the drop guards
/// (killed by a signal). SIGTERM, not SIGKILL: an nginx master then stops its workers
/// (which it forked: they do not inherit this) instead of leaving them behind.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) by PID of a process we started (or one it forked).
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Descendants of `pid` (three levels at most), from the ppid field of /proc/*/stat.
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, procfs::ppid(p)?)))
        .collect();
    let mut out = Vec::new();
    let mut level = vec![pid];
    for _ in 0..3 {
        let next: Vec<u32> = parents
            .iter()
            .filter(|(_, pp)| level.contains(pp))
            .map(|(p, _)| *p)
            .collect();
        if next.is_empty() {
            break;
        }
        out.extend(&next);
        level = next;
    }
    out
}

/// A directory under the system temp dir for generated configs, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let base = std::env::temp_dir();
        for i in 0..100 {
            let p = base.join(format!("forwarder-bench-{tag}-{}-{i}", std::process::id()));
            if fs::create_dir(&p).is_ok() {
                return Ok(TempDir(p));
            }
        }
        anyhow::bail!("cannot create a temp dir under {}", base.display())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port: bound, read, released (a peer binds it right after; a race
/// with another process is possible, and the caller retries).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until every port is in LISTEN state on 127.0.0.1, the child exits, or `limit`.
pub fn wait_listening(relay: &mut Relay, ports: &[u16], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let listening = procfs::listening_ports();
        if ports.iter().all(|p| listening.contains(p)) {
            return Ok(());
        }
        if let Some(e) = relay.exit_error() {
            return Err(e);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "not listening on all of {ports:?} after {limit:?} (see {})",
                relay.log.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}
