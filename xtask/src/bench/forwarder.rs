//! Starting the forwarder under test and finding its ports.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::relay::{Relay, Unavailable};
use super::servers::Addrs;

/// Starts `bin` as the bench row `name`, with one rule per bench server whose keys are
/// `mode = RULE_MODE` plus `extra` (`rule`); the config and the log go to `dir`.
/// `Err(Unavailable)` when it exits during startup.
pub fn start(
    bin: &Path,
    name: &str,
    rule: (&str, String),
    upstreams: &Addrs,
    max_conns: usize,
    dir: &Path,
    log_filter: Option<&str>,
) -> std::result::Result<Relay, Unavailable> {
    start_inner(bin, name, rule, upstreams, max_conns, dir, log_filter)
        .map_err(|e| Unavailable(format!("{e:#}")))
}

fn start_inner(
    bin: &Path,
    mode: &str,
    (rule_mode, extra): (&str, String),
    up: &Addrs,
    max_conns: usize,
    dir: &Path,
    log_filter: Option<&str>,
) -> Result<Relay> {
    let config = dir.join(format!("forwarder-{mode}.toml"));
    let mut text = format!(
        "# written by cargo xtask bench\n\
         [global]\nmax_connections = {max_conns}\n\n\
         [defaults]\nmax_connections = {max_conns}\n"
    );
    for (name, addr) in up.rules() {
        text += &format!(
            "\n[[rule]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"{addr}\"\nmode = \"{rule_mode}\"\n{extra}"
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
    super::relay::die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut fwd = Relay::new(child, *up, log);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = fs::read_to_string(&fwd.log).unwrap_or_default();
        let listening = parse_listening(&text);
        let find = |rule: &str| listening.iter().find(|l| l.rule == rule).map(|l| l.listen);
        let mut addrs = *up;
        let mut all = true;
        for (name, _) in up.rules() {
            match find(name) {
                Some(a) => addrs.set(name, a),
                None => all = false,
            }
        }
        if all {
            fwd.addrs = addrs;
            fwd.path = listening
                .iter()
                .find(|l| l.rule == "bulk")
                .map(|l| l.path.clone())
                .unwrap_or_default();
            return Ok(fwd);
        }
        if let Some(e) = fwd.exit_error() {
            return Err(e);
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

pub(crate) struct Listening {
    pub(crate) rule: String,
    pub(crate) listen: SocketAddr,
    /// "splice (requested)", "ebpf (...)".
    pub(crate) path: String,
}

/// `... listening rule=NAME listen=ADDR upstream=... mode=PATH (WHY)` lines.
pub(crate) fn parse_listening(log: &str) -> Vec<Listening> {
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
