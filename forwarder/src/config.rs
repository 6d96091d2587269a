//! Configuration: the TOML file format, the command-line shorthand, and validation.
//!
//! Parsing goes through `serde_path_to_error` so every error names the dotted key
//! (`defaults.connect_timeout`), and through `toml` so it also names the line.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Which relay moves the bytes of a connection pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF when the kernel path loads and works, splice otherwise.
    Auto,
    /// eBPF sockmap redirection; refuse to start without it.
    Ebpf,
    /// epoll + splice(2) in userspace.
    Splice,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Ebpf => "ebpf",
            Mode::Splice => "splice",
        })
    }
}

/// A config error: exit code 2, message names the key and (for file syntax) the line.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

// ---- the file format, as written by users ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    global: FileGlobal,
    #[serde(default)]
    defaults: RuleSettingsFile,
    #[serde(default)]
    rule: Vec<FileRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGlobal {
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    max_connections: Option<usize>,
}

/// Per-rule settings that `[defaults]` provides and each `[[rule]]` may override.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSettingsFile {
    mode: Option<Mode>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    max_connections: Option<usize>,
    inflight_limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    name: Option<String>,
    listen: String,
    upstream: Upstreams,
    // Same keys as RuleSettingsFile: serde cannot combine `flatten` with
    // `deny_unknown_fields`, and rejecting unknown keys matters more.
    mode: Option<Mode>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    max_connections: Option<usize>,
    inflight_limit: Option<u64>,
}

impl FileRule {
    fn settings(&self) -> RuleSettingsFile {
        RuleSettingsFile {
            mode: self.mode,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            inflight_limit: self.inflight_limit,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Upstreams {
    One(String),
    Many(Vec<String>),
}

// ---- the validated form the server runs from ----

#[derive(Debug, Clone)]
pub struct Config {
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub listen: SocketAddr,
    /// `host:port` strings, resolved at connect time so DNS changes are followed.
    pub upstreams: Vec<String>,
    pub mode: Mode,
    pub connect_timeout: Duration,
    /// `None` means never.
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
    /// eBPF path: bytes one direction may have redirected but not yet accepted by the
    /// peer socket before that direction leaves the redirect path (the kernel applies
    /// no backpressure there).
    pub inflight_limit: u64,
}

pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_GLOBAL_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_RULE_MAX_CONNECTIONS: usize = 1_000;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_INFLIGHT_LIMIT: u64 = 4 << 20;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// What `forwarder run --listen ... --upstream ...` asks for, before validation.
pub struct CliRule {
    pub listen: String,
    pub upstreams: Vec<String>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| err(format!("{}: {}", path.display(), e.0)))
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner = inner.trim_end();
            if key.is_empty() || key == "." {
                err(format!("config error: {inner}"))
            } else {
                err(format!("config error at key `{key}`: {inner}"))
            }
        })?;
        Self::validate(file)
    }

    pub fn from_cli(rule: CliRule) -> Result<Config, ConfigError> {
        Self::validate(FileConfig {
            rule: vec![FileRule {
                name: Some("cli".into()),
                listen: rule.listen,
                upstream: Upstreams::Many(rule.upstreams),
                mode: None,
                connect_timeout: None,
                idle_timeout: None,
                max_connections: None,
                inflight_limit: None,
            }],
            ..FileConfig::default()
        })
    }

    /// Forces every rule onto one mode (the `--mode` flag).
    pub fn override_mode(&mut self, mode: Mode) {
        for rule in &mut self.rules {
            rule.mode = mode;
        }
    }

    fn validate(file: FileConfig) -> Result<Config, ConfigError> {
        if file.rule.is_empty() {
            return Err(err(
                "config error at key `rule`: at least one [[rule]] is required",
            ));
        }
        let max_connections = file
            .global
            .max_connections
            .unwrap_or(DEFAULT_GLOBAL_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(err(
                "config error at key `global.max_connections`: must be at least 1",
            ));
        }
        let defaults = file.defaults;
        let mut rules: Vec<Rule> = Vec::with_capacity(file.rule.len());
        for (i, r) in file.rule.into_iter().enumerate() {
            let name = r.name.clone().unwrap_or_else(|| format!("rule{i}"));
            let at = |key: &str| format!("config error at key `rule[{i}].{key}` (rule {name:?})");
            if rules.iter().any(|o| o.name == name) {
                return Err(err(format!("{}: duplicate rule name", at("name"))));
            }
            let listen =
                resolve_listen(&r.listen).map_err(|e| err(format!("{}: {e}", at("listen"))))?;
            let s = &r.settings();
            let upstreams = match r.upstream {
                Upstreams::One(u) => vec![u],
                Upstreams::Many(v) => v,
            };
            if upstreams.is_empty() {
                return Err(err(format!(
                    "{}: at least one upstream is required",
                    at("upstream")
                )));
            }
            for (j, u) in upstreams.iter().enumerate() {
                check_host_port(u)
                    .map_err(|e| err(format!("{}: {u:?}: {e}", at(&format!("upstream[{j}]")))))?;
            }
            let d = &defaults;
            let max_conns = s
                .max_connections
                .or(d.max_connections)
                .unwrap_or(DEFAULT_RULE_MAX_CONNECTIONS);
            if max_conns == 0 {
                return Err(err(format!(
                    "{}: must be at least 1",
                    at("max_connections")
                )));
            }
            let connect_timeout = s
                .connect_timeout
                .or(d.connect_timeout)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
            if connect_timeout.is_zero() {
                return Err(err(format!(
                    "{}: must be more than 0s",
                    at("connect_timeout")
                )));
            }
            let inflight_limit = s
                .inflight_limit
                .or(d.inflight_limit)
                .unwrap_or(DEFAULT_INFLIGHT_LIMIT);
            if inflight_limit < 65536 {
                return Err(err(format!(
                    "{}: must be at least 65536 bytes",
                    at("inflight_limit")
                )));
            }
            let idle = s
                .idle_timeout
                .or(d.idle_timeout)
                .unwrap_or(DEFAULT_IDLE_TIMEOUT);
            rules.push(Rule {
                name,
                listen,
                upstreams,
                mode: s.mode.or(d.mode).unwrap_or(Mode::Auto),
                connect_timeout,
                idle_timeout: (!idle.is_zero()).then_some(idle),
                max_connections: max_conns,
                inflight_limit,
            });
        }
        Ok(Config {
            shutdown_grace: file.global.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            max_connections,
            rules,
        })
    }
}

/// Listen addresses are resolved once, at startup (`localhost:80` is fine).
fn resolve_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    check_host_port(s)?;
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?}: cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?}: resolves to no address"))
}

/// `host:port` or `[v6]:port`, with a numeric port; the host is resolved later.
fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT".to_string())?;
    if host.is_empty() {
        return Err("expected HOST:PORT, host is empty".into());
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("IPv6 addresses must be written [addr]:port".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_with_defaults_and_overrides() {
        let c = Config::from_toml(
            r#"
            [global]
            shutdown_grace = "2s"
            max_connections = 50
            [defaults]
            mode = "splice"
            connect_timeout = "250ms"
            idle_timeout = "0s"
            max_connections = 7
            [[rule]]
            name = "web"
            listen = "127.0.0.1:0"
            upstream = "192.168.1.25:8005"
            [[rule]]
            listen = "[::1]:0"
            upstream = ["a.example:1", "[::1]:2"]
            idle_timeout = "1h"
            mode = "auto"
            "#,
        )
        .unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(2));
        assert_eq!(c.max_connections, 50);
        assert_eq!(c.rules[0].name, "web");
        assert_eq!(c.rules[0].mode, Mode::Splice);
        assert_eq!(c.rules[0].idle_timeout, None);
        assert_eq!(c.rules[0].connect_timeout, Duration::from_millis(250));
        assert_eq!(c.rules[0].max_connections, 7);
        assert_eq!(c.rules[1].name, "rule1");
        assert_eq!(c.rules[1].upstreams.len(), 2);
        assert_eq!(c.rules[1].idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.rules[1].mode, Mode::Auto);
    }

    fn error_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().0
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = error_of("[defaults]\nconnect_timeout = \"5x\"\n[[rule]]\nlisten=\"127.0.0.1:1\"\nupstream=\"a:1\"\n");
        assert!(e.contains("defaults.connect_timeout"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = error_of("[global]\nbogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = error_of("[[rule]]\nlisten=\"127.0.0.1:1\"\nupstream=\"a:1\"\nfoo=2\n");
        assert!(e.contains("foo"), "{e}");
        let e = error_of("[[rule]]\nlisten=\"127.0.0.1:1\"\nupstream=\"nope\"\n");
        assert!(e.contains("upstream"), "{e}");
        let e = error_of("[[rule]\n");
        assert!(e.contains("line 1"), "{e}");
        let e = error_of("[[rule]]\nlisten=\"127.0.0.1:99999\"\nupstream=\"a:1\"\n");
        assert!(e.contains("listen"), "{e}");
    }
}
