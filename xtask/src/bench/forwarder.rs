//! Starting the forwarder under test, finding its ports, and stopping it.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::servers::Addrs;

pub struct Forwarder {
    child: Child,
    pub pid: u32,
    /// Where each rule listens, pointing at the same-named server.
    pub addrs: Addrs,
    /// What the forwarder said about its relay path for the bulk rule, e.g. "splice (requested)".
    pub path: String,
    pub log: PathBuf,
}

/// Why a forwarder did not come up: shown in the table instead of numbers.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl Forwarder {
    /// Starts `bin` with one rule per bench server in `mode` ("splice" or "ebpf"); the
    /// config and the log go to `dir`. `Err(Unavailable)` when it exits during startup.
    pub fn start(
        bin: &Path,
        mode: &str,
        upstreams: &Addrs,
        max_conns: usize,
        dir: &Path,
        log_filter: Option<&str>,
    ) -> std::result::Result<Forwarder, Unavailable> {
        Self::start_inner(bin, mode, upstreams, max_conns, dir, log_filter)
            .map_err(|e| Unavailable(format!("{e:#}")))
    }

    fn start_inner(
        bin: &Path,
        mode: &str,
        up: &Addrs,
        max_conns: usize,
        dir: &Path,
        log_filter: Option<&str>,
    ) -> Result<Forwarder> {
        let config = dir.join(format!("forwarder-{mode}.toml"));
        let mut text = format!(
            "# written by cargo xtask bench\n\
             [global]\nmax_connections = {max_conns}\n\n\
             [defaults]\nmax_connections = {max_conns}\n"
        );
        for (name, addr) in [("bulk", up.bulk), ("echo", up.echo), ("idle", up.idle)] {
            text += &format!(
                "\n[[rule]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n\
                 upstream = \"{addr}\"\nmode = \"{mode}\"\n"
            );
        }
        fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
        let log = dir.join(format!("forwarder-{mode}.log"));
        let log_file =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if let Some(f) = log_filter {
            cmd.env("FORWARDER_LOG", f);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id();
        let mut fwd = Forwarder {
            child,
            pid,
            addrs: *up,
            path: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = fs::read_to_string(&fwd.log).unwrap_or_default();
            let listening = parse_listening(&text);
            let find = |rule: &str| listening.iter().find(|l| l.rule == rule);
            if let (Some(b), Some(e), Some(i)) = (find("bulk"), find("echo"), find("idle")) {
                fwd.addrs = Addrs {
                    bulk: b.listen,
                    echo: e.listen,
                    idle: i.listen,
                };
                fwd.path = b.path.clone();
                return Ok(fwd);
            }
            if let Some(status) = fwd.child.try_wait()? {
                // Give the last lines a moment to land in the file.
                let text = fs::read_to_string(&fwd.log).unwrap_or_default();
                let reason = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("(no output)")
                    .trim()
                    .to_string();
                return Err(anyhow!("{reason} [exit {status}]"));
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "no `listening` line for all rules after 15 s (see {})",
                    fwd.log.display()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rss_kib(&self) -> Option<u64> {
        super::procfs::status_kib(self.pid, "VmRSS").ok()
    }

    pub fn hwm_kib(&self) -> Option<u64> {
        super::procfs::status_kib(self.pid, "VmHWM").ok()
    }

    pub fn cpu_ticks(&self) -> Result<u64> {
        super::procfs::process_cpu_ticks(self.pid)
    }

    /// SIGTERM, then SIGKILL after `grace`; always reaps. Returns how it ended.
    pub fn stop(mut self, grace: Duration) -> String {
        self.stop_inner(grace)
    }

    fn stop_inner(&mut self, grace: Duration) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited: {status}");
        }
        // SAFETY: kill(2) on our own child, which we have not reaped yet.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => return format!("exited: {status}"),
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => format!("killed after {grace:?}: {status}"),
            Err(e) => format!("cannot reap: {e}"),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Listening {
    rule: String,
    listen: SocketAddr,
    /// "splice (requested)", "ebpf (...)".
    path: String,
}

/// `... listening rule=NAME listen=ADDR upstream=... mode=PATH (WHY)` lines.
fn parse_listening(log: &str) -> Vec<Listening> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(pos) = line.find("listening rule=") else {
            continue;
        };
        let rest = &line[pos + "listening ".len()..];
        let field = |key: &str| -> Option<&str> {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let (Some(rule), Some(listen)) = (field("rule"), field("listen")) else {
            continue;
        };
        let Ok(listen) = listen.parse() else {
            continue;
        };
        let path = rest
            .find(" mode=")
            .map(|i| rest[i + " mode=".len()..].trim().to_string())
            .unwrap_or_default();
        out.push(Listening {
            rule: rule.to_string(),
            listen,
            path,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        let log = "2026-11-22T04:49:15.298156Z  INFO listening rule=cli listen=127.0.0.1:33015 \
                   upstream=127.0.0.1:9 mode=splice (requested)\nother line\n";
        let l = parse_listening(log);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].rule, "cli");
        assert_eq!(l[0].listen, "127.0.0.1:33015".parse().unwrap());
        assert_eq!(l[0].path, "splice (requested)");
    }
}
