//! Configuration: the TOML file format, the command-line shorthand, and validation.
//!
//! Parsing goes through `serde_path_to_error` so every error names the dotted key
//! (`defaults.connect_timeout`), and through `toml` so it also names the line.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::logging::LogFormat;
use crate::policy::schedule::Schedule;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The first healthy upstream in the listed order (failover only); the default.
    First,
    RoundRobin,
    LeastConn,
    /// Power of two random choices, by active connections.
    Random,
    /// Rendezvous hashing of the client address: sticky and consistent.
    SourceHash,
}

/// How `inspect` shows bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DumpFormat {
    Text,
    Hex,
}

/// A direction of a pair's bytes, as `rewrite` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    ToUpstream,
    ToClient,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    V1,
    V2,
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

/// A config error in what command-line flags made, said with the flag the user wrote
/// rather than the file key it became (`rule[0].listen` is `--listen`): `keys` maps
/// whole keys (the longest that fits wins), and `listed` a key prefix whose index
/// follows (`rule[0].upstream[1]` is the second `--upstream`, `--upstream[1]`).
fn named_by_flags(e: ConfigError, keys: &[(&str, &str)], listed: (&str, &str)) -> ConfigError {
    let mut msg = e.0.replace(" (rule \"cli\")", "");
    let (prefix, flag) = listed;
    while let Some(at) = msg.find(&format!("`{prefix}")) {
        let index_at = at + 1 + prefix.len();
        let index: String = msg[index_at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let Some(end) = msg[index_at..].find('`').map(|i| index_at + i + 1) else {
            break;
        };
        msg = format!("{}`{flag}[{index}]`{}", &msg[..at], &msg[end..]);
    }
    let mut keys = keys.to_vec();
    keys.sort_by_key(|(key, _)| std::cmp::Reverse(key.len()));
    for (key, flag) in keys {
        msg = msg.replace(&format!("`{key}`"), &format!("`{flag}`"));
    }
    ConfigError(msg.replace("config error at key `", "config error in `"))
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
    tunnel_server: Option<FileTunnelServer>,
    agent: Option<FileAgent>,
    #[serde(default)]
    service: Vec<FileService>,
}

/// Durations as humantime writes them (`250ms`, `5s`, `1h`, `2d`), at most
/// [`bounded_duration::MAX`]: a deadline further off overflows the clock (`check`
/// accepted `"9000000000000000000s"`, then every connection's task panicked).
mod bounded_duration {
    use serde::de::Error;
    use std::time::Duration;

    /// Ten years.
    pub const MAX: Duration = Duration::from_secs(3650 * 24 * 3600);

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        // humantime also reads `M` as months (`1M` for a minute was a month) and `y`,
        // `yr` as years, both of no fixed length: only these units are taken.
        const UNITS: &[&str] = &[
            "nsec", "ns", "usec", "us", "msec", "ms", "seconds", "second", "sec", "s", "minutes",
            "minute", "min", "m", "hours", "hour", "hr", "h", "days", "day", "d", "weeks", "week",
            "w",
        ];
        let mut units = text.split(|c: char| !c.is_ascii_alphabetic());
        if let Some(u) = units.find(|u| !u.is_empty() && !UNITS.contains(u)) {
            return Err(D::Error::custom(format!(
                "{text:?}: no unit {u:?} (units: ns us ms s m h d w; months and years \
                 have no fixed length: write days, e.g. \"30d\", or \"1m\" for a minute)"
            )));
        }
        let v = humantime::parse_duration(&text)
            .map_err(|e| D::Error::custom(format!("{text:?}: {e}")))?;
        if v > MAX {
            return Err(D::Error::custom(format!(
                "{text:?} is longer than a duration may be here (at most 3650d)"
            )));
        }
        Ok(Some(v))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTunnelServer {
    listen: String,
    token_file: Option<String>,
    token: Option<String>,
    #[serde(default, with = "bounded_duration")]
    resume_grace: Option<Duration>,
    resume_buffer: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    server: String,
    token_file: Option<String>,
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    target: String,
    connect_from: Option<String>,
    #[serde(default, with = "bounded_duration")]
    tcp_keepalive: Option<Duration>,
    upload_rate: Option<u64>,
    download_rate: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGlobal {
    #[serde(default, with = "bounded_duration")]
    shutdown_grace: Option<Duration>,
    max_connections: Option<usize>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    metrics: Option<String>,
    log_format: Option<LogFormat>,
    user: Option<String>,
    group: Option<String>,
    threads: Option<usize>,
}

/// Declares the per-rule keys once: `[defaults]` takes them all, `[[rule]]` takes them
/// plus its own. (serde cannot combine `flatten` with `deny_unknown_fields`, and
/// rejecting unknown keys matters more.)
macro_rules! rule_settings {
    ($($(#[$attr:meta])* $field:ident: $ty:ty,)*) => {
        #[derive(Debug, Default, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RuleSettingsFile {
            $($(#[$attr])* $field: Option<$ty>,)*
        }

        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileRule {
            name: Option<String>,
            listen: FileListen,
            upstream: OneOrMany<FileUpstream>,
            $($(#[$attr])* $field: Option<$ty>,)*
        }

        impl RuleSettingsFile {
            /// The keys this section sets.
            fn keys_set(&self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(if self.$field.is_some() { keys.push(stringify!($field)); })*
                keys
            }
        }

        impl FileRule {
            /// This rule's settings, falling back to `[defaults]` key by key.
            fn settings(&self, defaults: &RuleSettingsFile) -> RuleSettingsFile {
                RuleSettingsFile { $($field: self.$field.clone().or_else(|| defaults.$field.clone()),)* }
            }

            /// Whether the rule writes the setting `key` itself, rather than inheriting
            /// `[defaults]`' (keys that are not settings are always its own).
            fn sets(&self, key: &str) -> bool {
                match key {
                    $(stringify!($field) => self.$field.is_some(),)*
                    _ => true,
                }
            }
        }
    };
}

rule_settings! {
    mode: Mode,
    #[serde(default, with = "bounded_duration")]
    connect_timeout: Duration,
    #[serde(default, with = "bounded_duration")]
    idle_timeout: Duration,
    #[serde(default, with = "bounded_duration")]
    tcp_keepalive: Duration,
    connect_from: String,
    max_connections: usize,
    inflight_limit: u64,
    upload_rate: u64,
    download_rate: u64,
    balance: Balance,
    #[serde(default, with = "bounded_duration")]
    check_interval: Duration,
    check_http: FileCheckHttp,
    rise: u32,
    fall: u32,
    allow: Vec<String>,
    deny: Vec<String>,
    schedule: Vec<String>,
    timezone: String,
    #[serde(default, with = "bounded_duration")]
    max_connection_duration: Duration,
    max_connections_per_source: usize,
    rate_per_source: String,
    proxy_protocol: ProxyProtocol,
    accept_proxy_protocol: bool,
    #[serde(default, with = "bounded_duration")]
    proxy_protocol_timeout: Duration,
    inspect: FileInspect,
    deny_pattern: Vec<String>,
    inspect_window: usize,
    rewrite: Vec<FileRewrite>,
    max_match: usize,
    http_auth: FileHttpAuth,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInspect {
    bytes: Option<u64>,
    format: Option<DumpFormat>,
    to: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRewrite {
    direction: Direction,
    #[serde(rename = "match")]
    pattern: String,
    replace: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttpAuth {
    header: String,
    token_file: Option<String>,
    token: Option<String>,
}

/// `listen = "ADDR"` (a port or a range of them, `HOST:P1-P2`) or a list of those.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "\"HOST:PORT\", \"HOST:PORT-PORT\" or a list of them"
)]
enum FileListen {
    One(String),
    Many(Vec<String>),
}

/// `check_http = "/path"` or `{ path = ..., host = ..., status = [...] }`.
#[derive(Debug, Clone)]
enum FileCheckHttp {
    Path(String),
    Full(FileCheckHttpFull),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCheckHttpFull {
    path: String,
    host: Option<String>,
    status: Option<Vec<u16>>,
}

/// By hand, as [`OneUpstream`], so a table's own errors name its fields.
impl<'de> Deserialize<'de> for FileCheckHttp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FileCheckHttp;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path \"/...\" or a table { path = ..., host = ..., status = [...] }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FileCheckHttp::Path(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                FileCheckHttpFull::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(FileCheckHttp::Full)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

#[derive(Debug, Clone)]
enum FileUpstream {
    Addr(String),
    Full(FileUpstreamFull),
}

/// `upstream = "HOST:PORT"`, `{ addr = ..., weight = ... }` or a list of either. By
/// hand, not `#[serde(untagged)]`: that says only "data did not match any variant"
/// where a table's own error (``unknown field `wieght` ``) names the mistake.
impl<'de> Deserialize<'de> for OneOrMany<FileUpstream> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany<FileUpstream>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                OneUpstream.expecting(f)?;
                f.write_str(", or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                OneUpstream.visit_str(v).map(OneOrMany::One)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                OneUpstream.visit_map(m).map(OneOrMany::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Self::Value, A::Error> {
                let mut all = Vec::new();
                while let Some(u) = s.next_element::<FileUpstream>()? {
                    all.push(u);
                }
                Ok(OneOrMany::Many(all))
            }
        }
        d.deserialize_any(V)
    }
}

/// One upstream: an address, or a table (whose own errors name its fields).
struct OneUpstream;

impl<'de> serde::de::Visitor<'de> for OneUpstream {
    type Value = FileUpstream;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(
            "\"HOST:PORT\" or a table { addr = ..., weight = ..., backup = ..., max_connections = ... }",
        )
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(FileUpstream::Addr(v.to_string()))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<Self::Value, A::Error> {
        FileUpstreamFull::deserialize(serde::de::value::MapAccessDeserializer::new(m))
            .map(FileUpstream::Full)
    }
}

impl<'de> Deserialize<'de> for FileUpstream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OneUpstream)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstreamFull {
    addr: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    backup: bool,
    max_connections: Option<usize>,
}

fn one() -> u32 {
    1
}

// ---- the validated form the server runs from ----

#[derive(Debug, Clone)]
pub struct Config {
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    /// Checked for every rule before the rule's own lists.
    pub access: Access,
    pub rules: Vec<Rule>,
    /// Where `/metrics` is served.
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Who to run as once listeners are bound and the kernel program is loaded.
    pub user: Option<RunAs>,
    /// Worker threads of the runtime (`None`: one per CPU).
    pub threads: Option<usize>,
    /// `[tunnel_server]`: agents connect here to serve `agent:NAME` upstreams.
    pub tunnel_server: Option<TunnelServerConfig>,
    /// `[agent]` + `[[service]]`: this process dials a tunnel server.
    pub agent: Option<AgentConfig>,
}

/// A shared secret: never shown (`Debug` shows a hash, so a changed one is visible).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::ops::Deref for Secret {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.0.hash(&mut h);
        write!(f, "Secret(hash {:x})", h.finish())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelServerConfig {
    pub listen: SocketAddr,
    pub token: Secret,
    pub resume_grace: Duration,
    pub resume_buffer: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// `host:port` of the server's agent port, resolved at each dial.
    pub server: String,
    pub token: Secret,
    pub services: Vec<Service>,
    /// Stays the same across restarts with the same services, so a restarted agent
    /// takes its services over at once: a hash of the host name and the sorted
    /// `name=target` list.
    pub identity: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub target: String,
    /// The local address target connections are made from (as a rule's).
    pub connect_from: Option<IpAddr>,
    /// TCP keepalive on target connections (as a rule's), `None` = off.
    pub tcp_keepalive: Option<Duration>,
    /// Bytes per second, `[upload_rate, download_rate]` as a rule's: toward the target
    /// and toward the visitor; `None` = unpaced. The agent paces its own reads (frp's
    /// client-side `bandwidthLimit`), whatever the server's rule says.
    pub rates: [Option<u64>; 2],
}

pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(90);
pub const DEFAULT_RESUME_BUFFER: usize = 1 << 20;
/// The prefix of an upstream served by tunnel agents.
pub const AGENT_PREFIX: &str = "agent:";

/// Failures in a row that mark an upstream down (`fall`), unless the rule says.
pub const DEFAULT_FALL: u32 = 3;

/// `[global] user`/`group`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    /// `global.group` as written (`None`: the user's own group).
    pub group: Option<String>,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port`, resolved at connect time so DNS changes are followed; or `host`
    /// alone ([`Upstream::same_port`]).
    pub addr: String,
    /// Written without a port: connected to on the port the client connected to (as
    /// HAProxy's server without a port), so a range of ports forwards port by port.
    pub same_port: bool,
    pub weight: u32,
    /// Used only when every primary upstream is down.
    pub backup: bool,
    /// Connections open to it (or connecting) at most: one at the limit is passed over
    /// like a down one, without counting as failed.
    pub max_connections: Option<usize>,
}

impl Upstream {
    /// The address to dial for a client that connected to local port `port`.
    pub fn dial_addr(&self, port: u16) -> std::borrow::Cow<'_, str> {
        match self.same_port {
            true => format!("{}:{port}", self.addr).into(),
            false => self.addr.as_str().into(),
        }
    }
}

/// Allow/deny lists of networks: with a non-empty allow list only matching clients
/// pass; deny always wins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Access {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

/// New connections per second per source address, with a burst of one second's worth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// One address, or several (a list, a range of ports), served alike.
    pub listen: Vec<SocketAddr>,
    pub upstreams: Vec<Upstream>,
    pub mode: Mode,
    pub connect_timeout: Duration,
    /// `None` means never.
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive on the client's and the upstream's socket: probes start after
    /// this long without a packet; `None` = off (the kernel's default).
    pub tcp_keepalive: Option<Duration>,
    /// The local address upstream connections (and health checks) are made from.
    pub connect_from: Option<IpAddr>,
    pub max_connections: usize,
    /// eBPF path: bytes one direction may have redirected but not yet accepted by the
    /// peer socket before that direction leaves the redirect path (the kernel applies
    /// no backpressure there).
    pub inflight_limit: u64,
    /// Bytes per second each pair may move, `[to_upstream, to_client]`
    /// (`upload_rate`, `download_rate`); `None` = unpaced.
    pub rates: [Option<u64>; 2],
    pub balance: Balance,
    /// Active TCP connect checks; `None` = passive detection only.
    pub check_interval: Option<Duration>,
    /// With `check_interval`: each check is an HTTP request, not only a connect.
    pub check_http: Option<HttpCheck>,
    pub rise: u32,
    pub fall: u32,
    pub access: Access,
    pub schedule: Option<Schedule>,
    pub max_connection_duration: Option<Duration>,
    pub max_connections_per_source: Option<usize>,
    pub rate_per_source: Option<Rate>,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub accept_proxy_protocol: bool,
    pub proxy_protocol_timeout: Duration,
    /// Traffic inspection; see `crate::inspect`.
    pub inspect: Option<Inspect>,
    pub deny_patterns: Vec<String>,
    pub inspect_window: usize,
    pub rewrite: Vec<Rewrite>,
    pub max_match: usize,
    pub http_auth: Option<HttpAuth>,
}

/// `check_http`: each active check sends `GET path` and wants one of `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    pub path: String,
    /// The `Host` header; `None`: the upstream's address as written.
    pub host: Option<String>,
    /// The answers that mean up; empty: any 2xx or 3xx (HAProxy's `httpchk` default).
    pub status: Vec<u16>,
}

impl HttpCheck {
    pub fn wants(&self, status: u16) -> bool {
        match self.status.is_empty() {
            true => (200..400).contains(&status),
            false => self.status.contains(&status),
        }
    }
}

/// `inspect = { bytes, format, to }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspect {
    /// Shown per direction, from the start of the stream.
    pub bytes: u64,
    pub format: DumpFormat,
    /// `None`: our log; else one file per connection in this directory.
    pub dir: Option<std::path::PathBuf>,
}

/// One `rewrite` entry.
#[derive(Clone)]
pub struct Rewrite {
    pub direction: Direction,
    /// Pattern and replacement, compiled once when the config is checked and shared by
    /// every pair of the rule.
    pub compiled: std::sync::Arc<crate::inspect::rewrite::Compiled>,
}

/// The settings only (the DFA is made from the pattern): `Rule::same_settings` compares
/// this text.
impl fmt::Debug for Rewrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rewrite")
            .field("direction", &self.direction)
            .field("pattern", &self.compiled.re)
            .field("replace", &self.compiled.replace)
            .finish()
    }
}

/// `http_auth`: the token itself never appears in `Debug` (nor in logs); a hash of
/// it does, so a reload that changes it changes the rule.
#[derive(Clone)]
pub struct HttpAuth {
    pub header: String,
    pub token: Vec<u8>,
}

impl fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.token.hash(&mut h);
        write!(
            f,
            "HttpAuth({:?}, token hash {:x})",
            self.header,
            h.finish()
        )
    }
}

pub const DEFAULT_INSPECT_WINDOW: usize = 4096;
pub const DEFAULT_MAX_MATCH: usize = 4096;

impl Rule {
    /// Whether any check or dump needs the first bytes in userspace.
    /// Whether `upload_rate` or `download_rate` paces its pairs.
    pub fn paced(&self) -> bool {
        self.rates.iter().any(Option::is_some)
    }

    fn paced_key(&self) -> &'static str {
        match self.rates[0] {
            Some(_) => "upload_rate",
            None => "download_rate",
        }
    }

    pub fn inspects(&self) -> bool {
        self.inspect.is_some() || !self.deny_patterns.is_empty() || self.http_auth.is_some()
    }

    /// Whether a reload leaves this rule as it is. Every field is plain data with a
    /// faithful `Debug` (the schedule's parsed windows included), so comparing that
    /// is comparing the settings, and a key added later cannot be forgotten here.
    pub fn same_settings(&self, other: &Rule) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }

    /// `NAME` for a rule whose upstream is `agent:NAME`.
    pub fn agent_service(&self) -> Option<&str> {
        match self.upstreams.as_slice() {
            [u] => u.addr.strip_prefix(AGENT_PREFIX),
            _ => None,
        }
    }

    pub fn upstream_list(&self) -> String {
        let list: Vec<String> = self
            .upstreams
            .iter()
            .map(|u| match (u.weight, u.backup) {
                (1, false) => u.addr.clone(),
                (w, false) => format!("{}*{w}", u.addr),
                (w, true) => format!("{}*{w}(backup)", u.addr),
            })
            .collect();
        list.join(",")
    }
}

pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_GLOBAL_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_RULE_MAX_CONNECTIONS: usize = 1_000;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_INFLIGHT_LIMIT: u64 = 4 << 20;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(5);

/// What `forwarder run --listen ... --upstream ...` asks for, before validation.
pub struct CliRule {
    pub listen: String,
    pub upstreams: Vec<String>,
    /// `--tunnel-listen`, with the token from `--token-file` or `FORWARDER_TOKEN`.
    pub tunnel_listen: Option<String>,
    pub token: CliToken,
}

/// Where a command line's tunnel token comes from: never the command line itself.
#[derive(Debug, Clone, Default)]
pub struct CliToken {
    pub file: Option<String>,
    /// `FORWARDER_TOKEN`, when set.
    pub env: Option<String>,
}

impl CliToken {
    pub fn from_env(file: Option<std::path::PathBuf>) -> CliToken {
        CliToken {
            file: file.map(|f| f.display().to_string()),
            env: std::env::var("FORWARDER_TOKEN").ok(),
        }
    }

    /// `(token_file, token)` as a config file would have them: the file wins.
    fn keys(&self) -> (Option<String>, Option<String>) {
        match &self.file {
            Some(f) => (Some(f.clone()), None),
            None => (None, self.env.clone()),
        }
    }
}

/// Reads a config or token file. Opened without blocking: a FIFO with no writer
/// blocked `check` for ever, and a reload on the main thread with it (SIGTERM was then
/// ignored); now it is an error that says so. A pipe with a writer (`-c <(...)`,
/// `/dev/stdin`) is read to its end.
fn read_text_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // Blocking reads from here on (a writer that is there finishes its file).
    let flags = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    if bytes.is_empty() && f.metadata()?.file_type().is_fifo() {
        return Err(std::io::Error::other("a FIFO with no writer"));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 (byte {:#04x} on line {line})", e.as_bytes()[at]),
        )
    })
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = read_text_file(path)
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
        Self::validate(file).map_err(|e| with_line(text, e))
    }

    pub fn from_cli(rule: CliRule) -> Result<Config, ConfigError> {
        let mut file = FileConfig::default();
        let (rule_tunnel_listen, token) = (rule.tunnel_listen, rule.token);
        let rule: FileRule = FileRule {
            name: Some("cli".into()),
            listen: FileListen::One(rule.listen),
            upstream: OneOrMany::Many(rule.upstreams.into_iter().map(FileUpstream::Addr).collect()),
            ..toml::from_str("listen = \"\"\nupstream = []").expect("an empty rule parses")
        };
        file.rule.push(rule);
        let tunnel_flags = rule_tunnel_listen.is_some();
        if let Some(listen) = rule_tunnel_listen {
            let (token_file, token) = token.keys();
            file.tunnel_server = Some(FileTunnelServer {
                listen,
                token_file,
                token,
                ..Default::default()
            });
        }
        let mut flags = vec![
            ("rule[0].listen", "--listen"),
            ("rule[0].upstream", "--upstream"),
            ("rule[0]", "--listen/--upstream"),
        ];
        if tunnel_flags {
            flags.extend([
                ("tunnel_server.listen", "--tunnel-listen"),
                ("tunnel_server.token_file", "--token-file"),
                ("tunnel_server.token", "--token-file/FORWARDER_TOKEN"),
                ("tunnel_server", "--token-file/FORWARDER_TOKEN"),
            ]);
        }
        Self::validate(file)
            .map_err(|e| named_by_flags(e, &flags, ("rule[0].upstream[", "--upstream")))
    }

    /// `forwarder agent --server ... --service NAME=ADDR ...`.
    pub fn agent_from_cli(
        server: String,
        services: &[String],
        token: CliToken,
    ) -> Result<Config, ConfigError> {
        let mut file = FileConfig::default();
        for (i, s) in services.iter().enumerate() {
            let Some((name, target)) = s.split_once('=') else {
                return Err(err(format!(
                    "--service[{i}] {s:?}: expected NAME=HOST:PORT"
                )));
            };
            file.service.push(FileService {
                name: name.into(),
                target: target.into(),
                connect_from: None,
                tcp_keepalive: None,
                upload_rate: None,
                download_rate: None,
            });
        }
        let (token_file, token) = token.keys();
        file.agent = Some(FileAgent {
            server,
            token_file,
            token,
        });
        let flags = [
            ("agent.server", "--server"),
            ("agent.token_file", "--token-file"),
            ("agent.token", "--token-file/FORWARDER_TOKEN"),
            ("agent", "--token-file/FORWARDER_TOKEN"),
        ];
        Self::validate(file).map_err(|e| named_by_flags(e, &flags, ("service[", "--service")))
    }

    /// Every `inspect.to` directory must take this process's files (checked after the
    /// privilege drop, and on reload): one the `user` cannot write passed `check` and
    /// startup, and then every connection's dump failed.
    pub fn check_dump_dirs(&self) -> Result<(), ConfigError> {
        use nix::unistd::{access, AccessFlags};
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(dir) = rule.inspect.as_ref().and_then(|d| d.dir.as_ref()) else {
                continue;
            };
            if let Err(e) = access(dir.as_path(), AccessFlags::W_OK | AccessFlags::X_OK) {
                return Err(err(format!(
                    "config error at key `rule[{i}].inspect.to` (rule {:?}): {}: this process \
                     (uid {}) cannot write there: {}",
                    rule.name,
                    dir.display(),
                    nix::unistd::geteuid(),
                    e.desc()
                )));
            }
        }
        Ok(())
    }

    /// Forces every rule onto one mode (the `--mode` flag); as in the file, `ebpf`
    /// cannot apply to a rule that rewrites.
    pub fn override_mode(&mut self, mode: Mode) -> Result<(), ConfigError> {
        for (i, rule) in self.rules.iter_mut().enumerate() {
            if mode == Mode::Ebpf && !rule.rewrite.is_empty() {
                return Err(err(format!(
                    "config error at key `rule[{i}].rewrite` (rule {:?}): --mode ebpf cannot \
                     apply: rewriting needs every byte in userspace (path=copy)",
                    rule.name
                )));
            }
            if mode == Mode::Ebpf && rule.paced() && rule.agent_service().is_none() {
                return Err(err(format!(
                    "config error at key `rule[{i}].{}` (rule {:?}): --mode ebpf cannot apply: {PACED_WHY}",
                    rule.paced_key(),
                    rule.name
                )));
            }
            rule.mode = mode;
        }
        Ok(())
    }

    fn validate(file: FileConfig) -> Result<Config, ConfigError> {
        if file.rule.is_empty() && file.agent.is_none() {
            return Err(err(
                "config error at key `rule`: at least one [[rule]] (or an [agent]) is required",
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
        if max_connections > MAX_PERMITS {
            return Err(err(format!(
                "config error at key `global.max_connections`: must be at most {MAX_PERMITS}"
            )));
        }
        let threads = file
            .global
            .threads
            .map(check_threads)
            .transpose()
            .map_err(|e| err(format!("config error at key `global.threads`: {e}")))?;
        let access = Access {
            allow: parse_nets(file.global.allow.as_deref(), |j| {
                format!("config error at key `global.allow[{j}]`")
            })?,
            deny: parse_nets(file.global.deny.as_deref(), |j| {
                format!("config error at key `global.deny[{j}]`")
            })?,
        };
        // A file with no rule (an agent's) has nothing `[defaults]` could apply to: its
        // streams follow the server rule's keys. Accepted, they would read as in force.
        if let (true, Some(key)) = (file.rule.is_empty(), file.defaults.keys_set().first()) {
            return Err(err(format!(
                "config error at key `defaults.{key}`: this file has no [[rule]] to apply it \
                 to; an agent's streams follow the settings of the server's rule (its \
                 connect_timeout too, which the server sends with each stream)"
            )));
        }
        // Checked even when no rule has a schedule to use it with.
        if let Some(tz) = &file.defaults.timezone {
            tz.parse::<chrono_tz::Tz>().map_err(|_| {
                err(format!(
                    "config error at key `defaults.timezone`: {tz:?} is not a time zone name \
                     such as \"UTC\" or \"Europe/Berlin\""
                ))
            })?;
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(file.rule.len());
        for (i, r) in file.rule.iter().enumerate() {
            let rule = validate_rule(i, r, &file.defaults)?;
            if let Some(j) = rules.iter().position(|o| o.name == rule.name) {
                // A rule without `name` is `rule{i}`: the clash is then with the name
                // another rule was given, which is the key the file has (and a line).
                if r.name.is_none() {
                    return Err(err(format!(
                        "config error at key `rule[{j}].name`: duplicate rule name {:?}: it is \
                         also the default name of rule[{i}], which has no `name`",
                        rule.name
                    )));
                }
                return Err(err(format!(
                    "config error at key `rule[{i}].name`: duplicate rule name {:?}",
                    rule.name
                )));
            }
            let clash = rules.iter().enumerate().find_map(|(j, o)| {
                let (a, b) = first_conflict(&rule.listen, &o.listen)?;
                Some((j, o, a, b))
            });
            if let Some((j, o, a, b)) = clash {
                return Err(err(format!(
                    "config error at key `rule[{i}].listen` (rule {:?}): {a} cannot be listened \
                     on together with {b} of rule {:?} (`rule[{j}].listen`): the second bind \
                     would fail with \"Address already in use\"",
                    rule.name, o.name
                )));
            }
            rules.push(rule);
        }
        let metrics = file
            .global
            .metrics
            .as_deref()
            .map(resolve_listen)
            .transpose()
            .map_err(|e| err(format!("config error at key `global.metrics`: {e}")))?;
        let tunnel_server = file
            .tunnel_server
            .as_ref()
            .map(validate_tunnel_server)
            .transpose()?;
        // The process's other listeners cannot share an address with a rule either.
        let others = [
            ("global.metrics", metrics),
            (
                "tunnel_server.listen",
                tunnel_server.as_ref().map(|t| t.listen),
            ),
        ];
        for (k, (key, addr)) in others.iter().enumerate() {
            let Some(addr) = *addr else { continue };
            let taken = rules
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    let what = format!("rule[{i}].listen` (rule {:?})", r.name);
                    r.listen.iter().map(move |a| (what.clone(), *a))
                })
                .chain(
                    others[..k]
                        .iter()
                        .filter_map(|(o, a)| Some((format!("{o}`"), (*a)?))),
                )
                .find(|(_, other)| listen_conflict(*other, addr));
            if let Some((what, other)) = taken {
                return Err(err(format!(
                    "config error at key `{key}`: {addr} cannot be listened on together with \
                     {other} of `{what}: the second bind would fail with \"Address already in use\""
                )));
            }
        }
        check_agent_rules(&rules, tunnel_server.as_ref())?;
        let agent = validate_agent(file.agent.as_ref(), &file.service)?;
        Ok(Config {
            tunnel_server,
            agent,
            shutdown_grace: file.global.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            max_connections,
            access,
            rules,
            metrics,
            log_format: file.global.log_format.unwrap_or_default(),
            user: run_as(file.global.user.as_deref(), file.global.group.as_deref())?,
            threads,
        })
    }
}

/// The most worker threads `threads` takes: far more than any host has cores.
pub const MAX_THREADS: usize = 1024;

/// `n` as a worker-thread count (`global.threads`, `--threads`).
pub fn check_threads(n: usize) -> Result<usize, String> {
    if (1..=MAX_THREADS).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} worker threads; must be from 1 to {MAX_THREADS}"
        ))
    }
}

/// A rule served by agents (`agent:NAME`) needs a `[tunnel_server]` for them to
/// connect to: checked on the file, and on a reload against the running one (the
/// section cannot change while running).
pub fn check_agent_rules(
    rules: &[Rule],
    tunnel_server: Option<&TunnelServerConfig>,
) -> Result<(), ConfigError> {
    match rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.agent_service().is_some())
    {
        Some((i, rule)) if tunnel_server.is_none() => Err(err(format!(
            "config error at key `rule[{i}].upstream` (rule {:?}): {} needs a [tunnel_server] \
             section (or --tunnel-listen) for agents to connect to",
            rule.name, rule.upstreams[0].addr
        ))),
        _ => Ok(()),
    }
}

/// Token files as this process read them, by path. After `[global] user` dropped
/// privileges a root-only token file cannot be read again: a reload then keeps what
/// was read before, and says so, rather than failing (every reload did).
static TOKENS_READ: std::sync::Mutex<std::collections::BTreeMap<String, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// A token file's content, trimmed (see [`TOKENS_READ`]).
fn read_token_file(f: &str) -> std::io::Result<String> {
    let mut read = TOKENS_READ.lock().unwrap_or_else(|e| e.into_inner());
    match read_text_file(Path::new(f)) {
        Ok(t) => {
            let t = t.trim().to_string();
            read.insert(f.to_string(), t.clone());
            Ok(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && read.contains_key(f) => {
            tracing::warn!(
                "{f}: {e} (privileges were dropped); keeping the token read before: make the file readable by [global] user to change it on reload"
            );
            Ok(read[f].clone())
        }
        Err(e) => Err(e),
    }
}

/// The longest `tcp_keepalive`: the kernel's bound on TCP_KEEPIDLE (MAX_TCP_KEEPIDLE).
const MAX_KEEPALIVE: Duration = Duration::from_secs(32767);

/// The shortest `check_interval`.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// The most connections `max_connections` may count: more than a tokio semaphore
/// holds passed `check`, then `run` panicked making it; and draining takes every
/// permit back at once, counted in a u32 (review: 2^32 drained nothing).
const MAX_PERMITS: usize = u32::MAX as usize;

/// A secret from `KEY.token_file` (trimmed) or `KEY.token`: exactly one of them.
fn secret(section: &str, file: Option<&str>, inline: Option<&str>) -> Result<Secret, ConfigError> {
    let token = match (file, inline) {
        (Some(f), None) => read_token_file(f).map_err(|e| {
            err(format!(
                "config error at key `{section}.token_file`: {f}: {e}"
            ))
        })?,
        (None, Some(t)) => t.to_string(),
        _ => {
            return Err(err(format!(
                "config error at key `{section}`: give exactly one of token_file and token \
                 (on the command line: --token-file or FORWARDER_TOKEN)"
            )))
        }
    };
    if token.trim().is_empty() {
        let key = if file.is_some() {
            "token_file"
        } else {
            "token"
        };
        return Err(err(format!(
            "config error at key `{section}.{key}`: the token must not be empty"
        )));
    }
    Ok(Secret(token.into_bytes()))
}

fn validate_tunnel_server(t: &FileTunnelServer) -> Result<TunnelServerConfig, ConfigError> {
    let listen = resolve_listen(&t.listen)
        .map_err(|e| err(format!("config error at key `tunnel_server.listen`: {e}")))?;
    let resume_buffer = t.resume_buffer.unwrap_or(DEFAULT_RESUME_BUFFER);
    if resume_buffer == 0 {
        return Err(err(
            "config error at key `tunnel_server.resume_buffer`: must be more than 0 bytes",
        ));
    }
    let resume_grace = t.resume_grace.unwrap_or(DEFAULT_RESUME_GRACE);
    if resume_grace.is_zero() {
        return Err(err(
            "config error at key `tunnel_server.resume_grace`: must be more than 0s",
        ));
    }
    Ok(TunnelServerConfig {
        listen,
        token: secret("tunnel_server", t.token_file.as_deref(), t.token.as_deref())?,
        resume_grace,
        resume_buffer,
    })
}

fn validate_agent(
    agent: Option<&FileAgent>,
    services: &[FileService],
) -> Result<Option<AgentConfig>, ConfigError> {
    let Some(a) = agent else {
        if !services.is_empty() {
            return Err(err(
                "config error at key `service`: [[service]] needs an [agent] section",
            ));
        }
        return Ok(None);
    };
    check_dial_addr(&a.server).map_err(|e| {
        err(format!(
            "config error at key `agent.server`: {:?}: {e}",
            a.server
        ))
    })?;
    if services.is_empty() {
        return Err(err(
            "config error at key `service`: an [agent] needs at least one [[service]]",
        ));
    }
    let mut list = Vec::new();
    for (i, s) in services.iter().enumerate() {
        let at = |k: &str| format!("config error at key `service[{i}].{k}`");
        if s.name.is_empty() || s.name.contains(|c: char| c == ',' || c.is_whitespace()) {
            return Err(err(format!(
                "{}: {:?}: must be non-empty, without commas or spaces",
                at("name"),
                s.name
            )));
        }
        if list.iter().any(|o: &Service| o.name == s.name) {
            return Err(err(format!(
                "{}: duplicate service {:?}",
                at("name"),
                s.name
            )));
        }
        check_dial_addr(&s.target)
            .map_err(|e| err(format!("{}: {:?}: {e}", at("target"), s.target)))?;
        let tcp_keepalive = keepalive(s.tcp_keepalive, &at)?;
        let connect_from = source_addr(s.connect_from.as_deref(), [s.target.as_str()], &at)?;
        list.push(Service {
            name: s.name.clone(),
            target: s.target.clone(),
            connect_from,
            tcp_keepalive,
            rates: rates(s.upload_rate, s.download_rate),
        });
    }
    let mut sorted: Vec<String> = list
        .iter()
        .map(|s| format!("{}={}", s.name, s.target))
        .collect();
    sorted.sort();
    // This host and what it serves: a restart is the same agent; a replica on another
    // host, or one with other targets, is another agent (balanced, not replaced).
    let host =
        nix::unistd::gethostname().map_or(String::new(), |h| h.to_string_lossy().into_owned());
    sorted.insert(0, host);
    use sha2::Digest;
    let digest = sha2::Sha256::digest(sorted.join("\n").as_bytes());
    let identity = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(Some(AgentConfig {
        server: a.server.clone(),
        token: secret("agent", a.token_file.as_deref(), a.token.as_deref())?,
        services: list,
        identity,
    }))
}

fn validate_rule(i: usize, r: &FileRule, defaults: &RuleSettingsFile) -> Result<Rule, ConfigError> {
    let name = r.name.clone().unwrap_or_else(|| format!("rule{i}"));
    // A bad value is named where it is written: the rule's own key, or the `[defaults]`
    // one the rule inherited (`allow[0]`, `http_auth.token_file`: by their setting).
    let own = |k: &str| r.sets(k.split(['[', '.']).next().unwrap_or(k));
    let key = |k: &str| match own(k) {
        true => format!("rule[{i}].{k}"),
        false => format!("defaults.{k}"),
    };
    let at = |k: &str| match own(k) {
        true => format!("config error at key `{}` (rule {name:?})", key(k)),
        false => format!(
            "config error at key `{}` (inherited by rule {name:?})",
            key(k)
        ),
    };
    let s = r.settings(defaults);
    // The name is in every log line of the rule: a newline there would forge lines.
    if name.chars().any(char::is_control) {
        return Err(err(format!(
            "{}: {name:?} has a control character",
            at("name")
        )));
    }
    // `rule=NAME` must stay one `key=value` field, and `NAME-CONN.log` one file in
    // the dump directory (a `/` wrote outside it, or nowhere).
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(err(format!(
            "{}: {name:?}: must be non-empty, without spaces or `/`",
            at("name")
        )));
    }

    let listen = listen_addrs(&r.listen, &at)?;
    let upstreams: Vec<Upstream> = match &r.upstream {
        OneOrMany::One(u) => vec![u.clone()],
        OneOrMany::Many(v) => v.clone(),
    }
    .into_iter()
    .map(|u| match u {
        FileUpstream::Addr(addr) => Upstream {
            same_port: portless(&addr),
            addr,
            weight: 1,
            backup: false,
            max_connections: None,
        },
        FileUpstream::Full(f) => Upstream {
            same_port: portless(&f.addr),
            addr: f.addr,
            weight: f.weight,
            backup: f.backup,
            max_connections: f.max_connections,
        },
    })
    .collect();
    if upstreams.is_empty() {
        return Err(err(format!(
            "{}: at least one upstream is required",
            at("upstream")
        )));
    }
    for (j, u) in upstreams.iter().enumerate() {
        let bad = |e: String| {
            err(format!(
                "{}: {:?}: {e}",
                at(&format!("upstream[{j}]")),
                u.addr
            ))
        };
        if u.max_connections == Some(0) {
            return Err(bad("max_connections must be at least 1".into()));
        }
        if let Some(name) = u.addr.strip_prefix(AGENT_PREFIX) {
            if u.max_connections.is_some() {
                return Err(bad("an agent: upstream takes no max_connections of its own (the rule's bounds its visitors)".into()));
            }
            if upstreams.len() > 1 {
                return Err(bad("an agent: upstream must be the rule's only upstream (several agents offering it are balanced by `balance`)".into()));
            }
            if name.is_empty() || name.contains(|c: char| c == ',' || c.is_whitespace()) {
                return Err(bad(
                    "expected agent:NAME, NAME without commas or spaces".into()
                ));
            }
            continue;
        }
        // Only a rule listening on several ports may leave the port out: on one, a
        // missing port stays the mistake it always was.
        match u.same_port && listen.len() > 1 {
            // The syntax of HOST as it would be with a port.
            true => check_dial_addr(&format!("{}:1", u.addr)).map_err(bad)?,
            false => check_dial_addr(&u.addr).map_err(bad)?,
        }
        if u.same_port && listen.iter().any(|a| a.port() == 0) {
            return Err(bad(
                "without a port it takes the port each client connected to, and a listen \
                 address with port 0 has none fixed: write the upstream's port"
                    .into(),
            ));
        }
        if u.weight == 0 {
            return Err(bad("weight must be at least 1".into()));
        }
    }
    if upstreams.iter().all(|u| u.backup) {
        return Err(err(format!(
            "{}: every upstream is a backup; at least one must not be",
            at("upstream")
        )));
    }

    let positive = |v: Option<usize>, k: &str, default: usize| -> Result<usize, ConfigError> {
        match v.unwrap_or(default) {
            0 => Err(err(format!("{}: must be at least 1", at(k)))),
            n => Ok(n),
        }
    };
    let max_connections = positive(
        s.max_connections,
        "max_connections",
        DEFAULT_RULE_MAX_CONNECTIONS,
    )?;
    if max_connections > MAX_PERMITS {
        return Err(err(format!(
            "{}: must be at most {MAX_PERMITS}",
            at("max_connections")
        )));
    }
    let max_connections_per_source = s
        .max_connections_per_source
        .map(|v| positive(Some(v), "max_connections_per_source", 1))
        .transpose()?;
    let connect_timeout = s.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    if connect_timeout.is_zero() {
        return Err(err(format!(
            "{}: must be more than 0s",
            at("connect_timeout")
        )));
    }
    // 0 does not mean "never" here: a client that never sends its header would hold
    // its connection slot for ever.
    if s.proxy_protocol_timeout.is_some_and(|d| d.is_zero()) {
        return Err(err(format!(
            "{}: must be more than 0s",
            at("proxy_protocol_timeout")
        )));
    }
    let inflight_limit = s.inflight_limit.unwrap_or(DEFAULT_INFLIGHT_LIMIT);
    if inflight_limit < 65536 {
        return Err(err(format!(
            "{}: must be at least 65536 bytes",
            at("inflight_limit")
        )));
    }
    let nonzero = |d: Option<Duration>| d.filter(|d| !d.is_zero());
    // Each check is a connect to every upstream, and waits at most the interval:
    // at 1ns the upstream took 14,000 connects a second and healthy ones flapped DOWN.
    if nonzero(s.check_interval).is_some_and(|d| d < MIN_CHECK_INTERVAL) {
        return Err(err(format!(
            "{}: must be at least {MIN_CHECK_INTERVAL:?} (0s or unset: no active checks)",
            at("check_interval")
        )));
    }
    let tcp_keepalive = keepalive(s.tcp_keepalive, &at)?;
    // An agent dials out: one written in the rule is an error, one inherited from
    // `[defaults]` does not apply (as `check_interval`). Its agent's `[[service]]`
    // can have one.
    let connect_from = match upstreams[0].addr.starts_with(AGENT_PREFIX) {
        true if r.connect_from.is_some() => {
            return Err(err(format!(
                "{}: an agent: upstream connects nowhere from here (its agent dials out; \
                 a [[service]] can have connect_from)",
                at("connect_from")
            )))
        }
        true => None,
        false => {
            let addrs = upstreams.iter().map(|u| u.addr.as_str());
            source_addr(s.connect_from.as_deref(), addrs, &at)?
        }
    };
    let check_http = check_http(r, &s, &upstreams, &at)?;
    let (rise, fall) = (s.rise.unwrap_or(2), s.fall.unwrap_or(DEFAULT_FALL));
    if rise == 0 || fall == 0 {
        let k = if rise == 0 { "rise" } else { "fall" };
        return Err(err(format!("{}: must be at least 1", at(k))));
    }
    let schedule = match &s.schedule {
        None => None,
        Some(windows) => Some(
            // `at` names the rule's own key or the `[defaults]` one it inherited.
            Schedule::parse(windows, s.timezone.as_deref().unwrap_or("UTC"))
                .map_err(|e| err(format!("{}: {e}", at(e.key()))))?,
        ),
    };
    // Only a `timezone` written in the rule itself is an error without a schedule: one
    // in `[defaults]` is inherited by every rule, and those without a schedule simply
    // have no use for it.
    if r.timezone.is_some() && s.schedule.is_none() {
        return Err(err(format!(
            "{}: only meaningful with `schedule`",
            at("timezone")
        )));
    }
    let rate_per_source = s
        .rate_per_source
        .as_deref()
        .map(parse_rate)
        .transpose()
        .map_err(|e| err(format!("{}: {e}", at("rate_per_source"))))?;
    let mode = s.mode.unwrap_or(Mode::Auto);

    let inspect = s.inspect.as_ref().map(|i| Inspect {
        bytes: i.bytes.unwrap_or(4096),
        format: i.format.unwrap_or(DumpFormat::Text),
        dir: i.to.as_deref().filter(|t| *t != "log").map(Into::into),
    });
    if let Some(dir) = inspect.as_ref().and_then(|i| i.dir.as_ref()) {
        if !dir.is_dir() {
            return Err(err(format!(
                "{}: {} is not a directory (or \"log\")",
                at("inspect.to"),
                dir.display()
            )));
        }
    }
    let deny_patterns = s.deny_pattern.clone().unwrap_or_default();
    for (j, p) in deny_patterns.iter().enumerate() {
        crate::inspect::byte_regex(p)
            .and_then(|_| crate::inspect::lazy_dfa(&[p]).map(drop))
            .map_err(|e| err(format!("{}: {e}", at(&format!("deny_pattern[{j}]")))))?;
    }
    let inspect_window = s.inspect_window.unwrap_or(DEFAULT_INSPECT_WINDOW);
    let max_match = s.max_match.unwrap_or(DEFAULT_MAX_MATCH);
    for (k, v) in [("inspect_window", inspect_window), ("max_match", max_match)] {
        if v == 0 {
            return Err(err(format!("{}: must be at least 1", at(k))));
        }
    }
    let mut rewrite = Vec::new();
    for (j, r) in s
        .rewrite
        .clone()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let (pattern, dfa) = crate::inspect::byte_regex(&r.pattern)
            .and_then(|re| Ok((re, crate::inspect::lazy_dfa(&[&r.pattern])?)))
            .map_err(|e| err(format!("{}: {e}", at(&format!("rewrite[{j}].match")))))?;
        // A match that can be empty (`x?`, `a*`, `^`) has no bytes to replace: the
        // rewriter would pass such matches by unchanged, so say so instead.
        let can_be_empty = crate::inspect::parse_pattern(&r.pattern)
            .is_ok_and(|hir| hir.properties().minimum_len() == Some(0));
        if can_be_empty {
            return Err(err(format!(
                "{}: {:?} can match the empty string; a rewrite needs a pattern that \
                 matches at least one byte",
                at(&format!("rewrite[{j}].match")),
                r.pattern
            )));
        }
        if let Some(name) = missing_group(&pattern, &r.replace) {
            let hint = match name.find(|c: char| !c.is_ascii_digit()) {
                Some(i) if i > 0 => {
                    let (group, then) = name.split_at(i);
                    format!(
                        " (`${name}` names a group `{name}`: write `${{{group}}}{then}` for \
                         group {group} followed by `{then}`)"
                    )
                }
                _ => String::new(),
            };
            return Err(err(format!(
                "{}: refers to group `{name}`, which the pattern does not have{hint}",
                at(&format!("rewrite[{j}].replace"))
            )));
        }
        rewrite.push(Rewrite {
            direction: r.direction,
            compiled: std::sync::Arc::new(crate::inspect::rewrite::Compiled::new(
                pattern,
                dfa,
                r.replace.into_bytes(),
            )),
        });
    }
    if !rewrite.is_empty() && mode == Mode::Ebpf {
        return Err(err(format!(
            "{}: rewriting needs every byte in userspace (path=copy), which mode \"ebpf\" \
             cannot give; use mode \"auto\" or \"splice\" for this rule",
            at("rewrite")
        )));
    }
    let rates = rates(s.upload_rate, s.download_rate);
    for (key, rate) in ["upload_rate", "download_rate"].iter().zip(rates) {
        // Tunnel streams run on splice whatever the mode, and pace as it does; a rule
        // that rewrites in mode ebpf is refused above.
        if rate.is_some() && mode == Mode::Ebpf && !upstreams[0].addr.starts_with(AGENT_PREFIX) {
            return Err(err(format!("{}: {PACED_WHY}", at(key))));
        }
    }
    let http_auth = match &s.http_auth {
        None => None,
        Some(a) => {
            let token = match (&a.token, &a.token_file) {
                (Some(t), None) => t.clone(),
                (None, Some(f)) => read_token_file(f)
                    .map_err(|e| err(format!("{}: {f}: {e}", at("http_auth.token_file"))))?,
                _ => {
                    return Err(err(format!(
                        "{}: give exactly one of token_file and token",
                        at("http_auth")
                    )))
                }
            };
            if a.header.is_empty() {
                return Err(err(format!(
                    "{}: must not be empty",
                    at("http_auth.header")
                )));
            }
            if token.trim().is_empty() {
                let key = if a.token_file.is_some() {
                    "http_auth.token_file"
                } else {
                    "http_auth.token"
                };
                return Err(err(format!("{}: the token must not be empty", at(key))));
            }
            // An HTTP field name is a token (RFC 9110 5.1): no client could send another.
            let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if !a.header.chars().all(tchar) {
                return Err(err(format!(
                    "{}: {:?} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)",
                    at("http_auth.header"),
                    a.header
                )));
            }
            Some(HttpAuth {
                header: a.header.clone(),
                token: token.into_bytes(),
            })
        }
    };

    if !rewrite.is_empty() && upstreams[0].addr.starts_with(AGENT_PREFIX) {
        return Err(err(format!(
            "{}: cannot apply to an agent: upstream: a tunnel stream keeps the bytes a lost \
             link may need again in the kernel's pipes, which rewritten bytes never pass \
             through (inspect, deny_pattern and http_auth can)",
            at("rewrite")
        )));
    }

    let agent = upstreams[0].addr.starts_with(AGENT_PREFIX);
    Ok(Rule {
        name: name.clone(),
        listen,
        upstreams,
        mode,
        connect_timeout,
        idle_timeout: nonzero(Some(s.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT))),
        tcp_keepalive,
        connect_from,
        max_connections,
        inflight_limit,
        rates,
        balance: s.balance.unwrap_or(Balance::First),
        // An agent's link has its own heartbeat (a lost one is `link lost`): there is
        // no address to connect to, and `agent:NAME` is up while an agent offers NAME.
        check_interval: nonzero(s.check_interval).filter(|_| !agent),
        check_http,
        rise,
        fall,
        access: Access {
            allow: parse_nets(s.allow.as_deref(), |j| at(&format!("allow[{j}]")))?,
            deny: parse_nets(s.deny.as_deref(), |j| at(&format!("deny[{j}]")))?,
        },
        schedule,
        max_connection_duration: nonzero(s.max_connection_duration),
        max_connections_per_source,
        rate_per_source,
        proxy_protocol: s.proxy_protocol,
        accept_proxy_protocol: s.accept_proxy_protocol.unwrap_or(false),
        proxy_protocol_timeout: nonzero(s.proxy_protocol_timeout)
            .unwrap_or(DEFAULT_PROXY_PROTOCOL_TIMEOUT),
        inspect,
        deny_patterns,
        inspect_window,
        rewrite,
        max_match,
        http_auth,
    })
}

/// `upload_rate` and `download_rate` (a rule's or a service's) as paced, `[upload,
/// download]`: unset or 0 is unpaced.
fn rates(upload: Option<u64>, download: Option<u64>) -> [Option<u64>; 2] {
    [upload, download].map(|r| r.filter(|&r| r > 0))
}

/// Why a paced rule cannot run on the kernel path.
const PACED_WHY: &str = "the kernel path cannot pace bytes (it moves them without us); \
     use mode \"auto\" or \"splice\", which paced rules run on";

/// `tcp_keepalive` (a rule's or a service's): 0s is off.
fn keepalive(
    d: Option<Duration>,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<Duration>, ConfigError> {
    let d = d.filter(|d| !d.is_zero());
    if d.is_some_and(|d| !(Duration::from_secs(1)..=MAX_KEEPALIVE).contains(&d)) {
        return Err(err(format!(
            "{}: must be from 1s to {}s (TCP_KEEPIDLE's range; 0s or unset: off)",
            at("tcp_keepalive"),
            MAX_KEEPALIVE.as_secs()
        )));
    }
    Ok(d)
}

/// `connect_from` (a rule's or a service's), for connections to `targets` (addresses
/// as written).
fn source_addr<'t>(
    text: Option<&str>,
    targets: impl IntoIterator<Item = &'t str>,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<IpAddr>, ConfigError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let ip: IpAddr = text.parse().map_err(|_| {
        err(format!(
            "{}: {text:?} is not an IP address (a port is chosen per connection)",
            at("connect_from")
        ))
    })?;
    // A literal target of the other family could never be reached from it.
    let other = targets
        .into_iter()
        .filter_map(|t| literal_addr(t).and_then(Result::ok))
        .find(|a| a.is_ipv4() != ip.is_ipv4());
    if let Some(a) = other {
        return Err(err(format!(
            "{}: {ip} cannot connect to {a} (another address family)",
            at("connect_from")
        )));
    }
    Ok(Some(ip))
}

/// `check_http`, checked: it goes into a request line and a header, so only visible
/// ASCII; it needs active checks, and an agent's rule has none. One inherited from
/// `[defaults]` applies only where it can (as `timezone` and `connect_from`).
fn check_http(
    r: &FileRule,
    s: &RuleSettingsFile,
    upstreams: &[Upstream],
    at: &dyn Fn(&str) -> String,
) -> Result<Option<HttpCheck>, ConfigError> {
    let Some(c) = &s.check_http else {
        return Ok(None);
    };
    let own = r.check_http.is_some();
    let checks = s.check_interval.is_some_and(|d| !d.is_zero());
    if upstreams[0].addr.starts_with(AGENT_PREFIX) || !checks {
        if !own {
            return Ok(None);
        }
        let why = match checks {
            true => "an agent: upstream has no address to check (its link has a heartbeat)",
            false => "needs `check_interval` (the checks it shapes)",
        };
        return Err(err(format!("{}: {why}", at("check_http"))));
    }
    let (path, host, status) = match c {
        FileCheckHttp::Path(p) => (p, None, Vec::new()),
        FileCheckHttp::Full(f) => (
            &f.path,
            f.host.clone(),
            f.status.clone().unwrap_or_default(),
        ),
    };
    let visible = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic());
    if !path.starts_with('/') || !visible(path) {
        return Err(err(format!(
            "{}: {path:?}: must be a path starting with `/`, without spaces or control characters",
            at("check_http")
        )));
    }
    if let Some(h) = host.as_deref().filter(|h| !visible(h)) {
        return Err(err(format!(
            "{}: {h:?}: must not be empty, nor have spaces or control characters",
            at("check_http.host")
        )));
    }
    if let Some(bad) = status.iter().find(|c| !(100..600).contains(*c)) {
        return Err(err(format!(
            "{}: {bad} is not an HTTP status (100 to 599)",
            at("check_http.status")
        )));
    }
    Ok(Some(HttpCheck {
        path: path.clone(),
        host,
        status,
    }))
}

/// Looks the user (and group, by default the user's own) up in the system databases.
fn run_as(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, ConfigError> {
    use nix::unistd::{Group, User};
    let Some(name) = user else {
        return match group {
            Some(_) => Err(err(
                "config error at key `global.group`: needs `global.user` as well",
            )),
            None => Ok(None),
        };
    };
    let u = User::from_name(name)
        .map_err(|e| err(format!("config error at key `global.user`: {name:?}: {e}")))?
        .ok_or_else(|| {
            err(format!(
                "config error at key `global.user`: no user {name:?}"
            ))
        })?;
    let gid = match group {
        None => u.gid.as_raw(),
        Some(g) => Group::from_name(g)
            .map_err(|e| err(format!("config error at key `global.group`: {g:?}: {e}")))?
            .ok_or_else(|| {
                err(format!(
                    "config error at key `global.group`: no group {g:?}"
                ))
            })?
            .gid
            .as_raw(),
    };
    Ok(Some(RunAs {
        user: name.to_string(),
        uid: u.uid.as_raw(),
        group: group.map(str::to_string),
        gid,
    }))
}

/// A value that parsed but failed validation, with the line where it is written
/// (TOML's own errors say theirs): `... (line 5)`.
fn with_line(text: &str, e: ConfigError) -> ConfigError {
    let key =
        e.0.strip_prefix("config error at key `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| key);
    match key.and_then(|k| line_of(text, k)) {
        Some(line) => err(format!("{} (line {line})", e.0)),
        None => e,
    }
}

/// The line of the value at `key` in the config file at `path`, read again (for
/// errors found after parsing, such as an address that cannot be bound).
pub fn line_in_file(path: &std::path::Path, key: &str) -> Option<usize> {
    line_of(&std::fs::read_to_string(path).ok()?, key)
}

/// The line of the value at `key` (`rule[0].allow[1]`, `defaults.rise`) in `text`.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = doc.as_item();
    for part in key.split('.') {
        let mut segments = part.split('[');
        item = item.get(segments.next()?)?;
        for index in segments {
            let i = index.strip_suffix(']')?.parse::<usize>().ok()?;
            // `upstream = "a:1"` is named as `upstream[0]`, the one of a list of one.
            item = match item.get(i) {
                Some(entry) => entry,
                None if i == 0 && !item.is_array() && !item.is_array_of_tables() => item,
                None => return None,
            };
        }
    }
    let at = item.span()?.start;
    Some(text.get(..at)?.matches('\n').count() + 1)
}

/// CIDRs (`10.0.0.0/8`, `::1/128`) or bare addresses (a /32 or /128).
/// `at(j)` names entry j in the error (`config error at key ...`).
fn parse_nets(
    list: Option<&[String]>,
    at: impl Fn(usize) -> String,
) -> Result<Vec<IpNet>, ConfigError> {
    list.unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(j, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(v4_if_mapped)
                .map_err(|_| {
                    err(format!(
                        "{}: {s:?} is not an address or CIDR network",
                        at(j)
                    ))
                })
        })
        .collect()
}

/// An IPv6 network inside `::ffff:0:0/96` (IPv4-mapped) as the IPv4 network it is:
/// clients are matched as IPv4 (a v4 client on a dual-stack listener, or in a PROXY
/// header, shows up as `::ffff:a.b.c.d` and is matched as `a.b.c.d`), so a mapped entry
/// kept as IPv6 would never match anyone, and a deny written that way would let them in.
fn v4_if_mapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, n.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// `20/s`, `300/m`, `1000/h`.
fn parse_rate(s: &str) -> Result<Rate, String> {
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected N/s, N/m or N/h"))?;
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a number"))?;
    let secs = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        u => return Err(format!("{s:?}: unknown unit {u:?}, expected s, m or h")),
    };
    // `inf` (or `1e400`, which parses as it) would turn the limit off unsaid.
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("{s:?}: must be a number more than 0"));
    }
    Ok(Rate {
        per_second: n / secs,
        burst: n.max(1.0),
    })
}

/// Whether listening on `a` and on `b` at once fails with EADDRINUSE on Linux (our
/// listeners set SO_REUSEADDR, which allows no overlap between listening sockets, and
/// not SO_REUSEPORT): the same port (not 0: each bind of port 0 gets its own) and
/// addresses that overlap. A wildcard covers every address of its family; `[::]` is
/// dual-stack (unless net.ipv6.bindv6only=1), so it covers IPv4 too; an IPv4-mapped
/// IPv6 address is that IPv4 address.
/// The first address of `a` that cannot be listened on together with one of `b`.
fn first_conflict(a: &[SocketAddr], b: &[SocketAddr]) -> Option<(SocketAddr, SocketAddr)> {
    a.iter().find_map(|x| {
        b.iter()
            .find(|y| listen_conflict(*x, **y))
            .map(|y| (*x, *y))
    })
}

pub fn listen_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    listen_ips_overlap(a.ip(), b.ip(), v6_wildcard_is_dual_stack())
}

fn listen_ips_overlap(a: IpAddr, b: IpAddr, dual_stack: bool) -> bool {
    let norm = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (a, b) = (norm(a), norm(b));
    match (a, b) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V6(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(v6), IpAddr::V4(_)) | (IpAddr::V4(_), IpAddr::V6(v6)) => {
            dual_stack && v6.is_unspecified()
        }
    }
}

/// Whether an IPv6 wildcard listener also takes IPv4 (Linux's default).
fn v6_wildcard_is_dual_stack() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() == "0")
}

/// A literal socket address, an IPv6 link-local one scoped by interface name
/// included (`[fe80::1%eth0]:80`, the form `ip addr` and `ping` use; std parses only
/// a numeric scope, `%2`). None for a host name; an error when the interface cannot
/// be looked up (not there, or we are out of fds: the lookup opens a socket), which no
/// resolver could do better (review: it fell back to DNS, and an fd shortage of ours
/// was blamed on the upstream as "cannot resolve").
pub fn literal_addr(s: &str) -> Option<std::io::Result<SocketAddr>> {
    match s.parse() {
        Ok(a) => Some(Ok(a)),
        Err(_) => scoped_by_name(s),
    }
}

/// `[ADDR%NAME]:PORT`: the interface's index as the scope, or why it has none. None
/// when `s` is not of that form.
fn scoped_by_name(s: &str) -> Option<std::io::Result<SocketAddr>> {
    let (host, port) = s.strip_prefix('[')?.rsplit_once("]:")?;
    let (ip, name) = host.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let port = port_number(port)?;
    Some(interface_index(name).map(|index| SocketAddr::V6(SocketAddrV6::new(ip, port, 0, index))))
}

/// The index of the network interface `name`, by SIOCGIFINDEX on a socket of our own.
/// Not glibc's if_nametoindex: when no socket can be opened it reports ENOENT, not
/// EMFILE (CI: out of fds, a health check of `[::1%lo]` marked the upstream DOWN
/// with "No such file or directory"), and we must tell our fd shortage from a
/// missing interface.
fn interface_index(name: &str) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let missing = || {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no network interface {name:?}"),
        )
    };
    // SAFETY: an all-zero ifreq is valid (a NUL name, a zero union).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() || name.contains('\0') {
        return Err(missing());
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: SIOCGIFINDEX reads ifr_name and writes ifr_ifindex of the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENODEV) {
            missing()
        } else {
            e
        });
    }
    // SAFETY: SIOCGIFINDEX succeeded, so the union holds the index.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex } as u32)
}

/// Listen addresses are resolved once, at startup (`localhost:80` is fine).
/// A rule's listen addresses: each written address, a range `HOST:P1-P2` giving
/// every port from P1 to P2 (HOST resolved once). Each may appear once.
fn listen_addrs(
    listen: &FileListen,
    at: &dyn Fn(&str) -> String,
) -> Result<Vec<SocketAddr>, ConfigError> {
    let written = match listen {
        FileListen::One(s) => vec![(at("listen"), s)],
        FileListen::Many(v) => v
            .iter()
            .enumerate()
            .map(|(j, s)| (at(&format!("listen[{j}]")), s))
            .collect(),
    };
    if written.is_empty() {
        return Err(err(format!(
            "{}: at least one address is required",
            at("listen")
        )));
    }
    let mut all: Vec<SocketAddr> = Vec::new();
    for (key, s) in written {
        let addrs = match port_range(s) {
            None => resolve_listen(s).map(|a| vec![a]),
            Some(Err(e)) => Err(format!("{s:?}: {e}")),
            Some(Ok((host, first, last))) => resolve_listen(&format!("{host}:{first}"))
                .map(|a| (first..=last).map(|p| SocketAddr::new(a.ip(), p)).collect()),
        }
        .map_err(|e| err(format!("{key}: {e}")))?;
        if let Some((a, b)) = first_conflict(&addrs, &all) {
            return Err(err(format!(
                "{key}: {a} is already listened on by this rule ({b})"
            )));
        }
        all.extend(addrs);
    }
    Ok(all)
}

/// `HOST:P1-P2`: `Some((HOST, P1, P2))`, or why the range is wrong; `None` for an
/// address without a range.
fn port_range(s: &str) -> Option<Result<(&str, u16, u16), String>> {
    let (host, ports) = s.rsplit_once(':')?;
    let (first, last) = ports.split_once('-')?;
    Some(match (port_number(first), port_number(last)) {
        (Some(a), Some(b)) if a >= 1 && a <= b => Ok((host, a, b)),
        (Some(a), Some(b)) if a >= 1 => Err(format!("port range {a}-{b} runs backwards")),
        (Some(_), Some(_)) => Err("a port range starts at 1 or more".into()),
        _ => Err(format!(
            "port range {ports:?} is not PORT-PORT, each from 1 to 65535"
        )),
    })
}

/// A port as written: digits only (`+1` parses as a u16, and the address was then
/// blamed).
fn port_number(p: &str) -> Option<u16> {
    p.parse()
        .ok()
        .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
}

/// An upstream written without a port: `HOST`, an IPv4 address, `[IPv6]`.
fn portless(addr: &str) -> bool {
    (addr.starts_with('[') && addr.ends_with(']')) || !addr.contains(':')
}

fn resolve_listen(s: &str) -> Result<SocketAddr, String> {
    if let Some(literal) = literal_addr(s) {
        return literal.map_err(|e| format!("{s:?}: {e}"));
    }
    check_host_port(s)?;
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?}: cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?}: resolves to no address"))
}

/// An address we connect to (an upstream, an agent's server or target): port 0 can be
/// listened on, never connected to (every connect would fail).
fn check_dial_addr(s: &str) -> Result<(), String> {
    check_host_port(s)?;
    if s.rsplit_once(':')
        .is_some_and(|(_, port)| port.parse() == Ok(0u16))
    {
        return Err("port 0 cannot be connected to".into());
    }
    Ok(())
}

/// A group that `replace` refers to (regex's expansion syntax: `$name`, the longest
/// run of letters, digits and `_`, or `${name}`; `$$` is a `$`) and `pattern` lacks:
/// the expansion would put nothing there, and say nothing.
fn missing_group(pattern: &regex::bytes::Regex, replace: &str) -> Option<String> {
    let has = |name: &str| match name.parse::<usize>() {
        Ok(i) => i < pattern.captures_len(),
        Err(_) => pattern.capture_names().any(|n| n == Some(name)),
    };
    let mut rest = replace;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name = if let Some(braced) = rest.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => {
                    rest = &braced[end + 1..];
                    &braced[..end]
                }
                None => continue, // not a reference: written as it is
            }
        } else if let Some(after) = rest.strip_prefix('$') {
            rest = after;
            continue;
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            rest = &rest[end..];
            name
        };
        if !name.is_empty() && !has(name) {
            return Some(name.to_string());
        }
    }
    None
}

/// `host:port` or `[v6]:port`, with a numeric port; the host is resolved later.
fn check_host_port(s: &str) -> Result<(), String> {
    if let Some(literal) = literal_addr(s) {
        return literal.map(drop).map_err(|e| e.to_string());
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
    port_number(port).ok_or_else(|| format!("port {port:?} is not a number from 0 to 65535"))?;
    // Brackets hold an IPv6 address, never a name (the port is fine, so the address
    // is what failed to parse): `[::g]` was accepted, and every connect then failed.
    if host.contains(['[', ']']) {
        return Err(format!("{host} is not an IPv6 address in brackets"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients are matched as IPv4 even when they arrive as `::ffff:a.b.c.d`, so
    /// entries written in that form are IPv4 entries: a mapped deny refuses the client.
    #[test]
    fn ipv4_mapped_entries_are_ipv4() {
        let c = Config::from_toml(
            "[global]\ndeny = [\"::ffff:127.0.0.2\"]\n[[rule]]\nlisten = \"[::]:0\"\n\
             upstream = \"127.0.0.1:1\"\nallow = [\"::ffff:10.0.0.0/104\", \"::ffff:0:0/96\", \"::1\"]\n",
        )
        .unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(!c.access.permits(ip("127.0.0.2")));
        assert!(!c.access.permits(ip("::ffff:127.0.0.2")));
        assert!(c.access.permits(ip("::ffff:127.0.0.3")));
        let allow = &c.rules[0].access.allow;
        let shown: Vec<String> = allow.iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "0.0.0.0/0", "::1/128"]);
    }

    /// A link-local address takes its interface by name (`ip addr`'s form) as well as by
    /// index; a name that is no interface is an error that says so.
    #[test]
    fn link_local_addresses_take_an_interface_name() {
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let by_name = literal_addr("[fe80::1%lo]:80").unwrap().unwrap();
        assert_eq!(by_name, format!("[fe80::1%{lo}]:80").parse().unwrap());
        let numeric = literal_addr("[fe80::1%1]:80").unwrap().unwrap();
        assert_eq!(numeric, "[fe80::1%1]:80".parse().unwrap());
        let gone = literal_addr("[fe80::1%nosuch0]:80").unwrap().unwrap_err();
        assert_eq!(gone.to_string(), "no network interface \"nosuch0\"");
        let long = literal_addr("[fe80::1%a-name-longer-than-15]:80")
            .unwrap()
            .unwrap_err();
        assert_eq!(long.kind(), std::io::ErrorKind::NotFound, "{long}");
        assert!(literal_addr("example.com:80").is_none());
        assert_eq!(
            resolve_listen("[fe80::1%lo]:8080"),
            Ok(SocketAddr::V6(SocketAddrV6::new(
                "fe80::1".parse().unwrap(),
                8080,
                0,
                lo
            )))
        );
        let e = check_dial_addr("[fe80::1%nosuch0]:80").unwrap_err();
        assert!(e.contains("no network interface \"nosuch0\""), "{e}");
        assert!(check_dial_addr("[fe80::1%lo]:+80").is_err());
        assert!(check_dial_addr("[fe80::1%lo]:0").is_err(), "port 0");
    }

    /// Two rules with one name: the key and line named are those of a `name` the file
    /// has, also when the other rule's is its default (`rule1` for rule[1]).
    #[test]
    fn a_duplicate_rule_name_names_a_line() {
        let rule = |name: &str, port: u16| {
            format!("[[rule]]\n{name}listen = \"127.0.0.1:{port}\"\nupstream = \"127.0.0.1:1\"\n")
        };
        let e = Config::from_toml(&(rule("name = \"a\"\n", 1) + &rule("name = \"a\"\n", 2)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`rule[1].name`: duplicate rule name \"a\"") && e.ends_with("(line 6)"),
            "{e}"
        );
        let e = Config::from_toml(&(rule("name = \"rule1\"\n", 1) + &rule("", 2)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`rule[0].name`: duplicate rule name \"rule1\": it is also the default name of rule[1]")
                && e.ends_with("(line 2)"),
            "{e}"
        );
    }

    /// A value that parses but fails validation names its line too, as TOML's own
    /// errors do (a key the file does not have, such as a default, names none).
    #[test]
    fn bad_values_name_their_line() {
        for (setting, key) in [
            (
                "allow = [\"10.0.0.1\", \"10.0.0.0/33\"]",
                "rule[0].allow[1]",
            ),
            ("schedule = [\"Mon-Fry 09:00-17:00\"]", "rule[0].schedule"),
            ("rate_per_source = \"20/d\"", "rule[0].rate_per_source"),
            ("rise = 0", "rule[0].rise"),
            (
                "max_connections_per_source = 0",
                "rule[0].max_connections_per_source",
            ),
            (
                "upstream = [\"127.0.0.1:1\", \"nohost\"]",
                "rule[0].upstream[1]",
            ),
            ("upstream = \"127.0.0.1:99999\"", "rule[0].upstream[0]"),
        ] {
            let upstream = if setting.starts_with("upstream") {
                ""
            } else {
                "upstream = \"127.0.0.1:1\"\n"
            };
            let text = format!(
                "# a comment\n[global]\nmax_connections = 10\n\n[[rule]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n{upstream}{setting}\n"
            );
            let line = text.lines().position(|l| l == setting).unwrap() + 1;
            let e = Config::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{setting}: {e}");
            assert!(e.ends_with(&format!("(line {line})")), "{setting}: {e}");
        }
        let e = Config::from_toml("[defaults]\n\nrise = 0\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("(line 3)"), "{e}");
        let e = Config::from_toml("[global]\ndeny = [\n  \"10.0.0.0/8\",\n  \"bad\",\n]\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`global.deny[1]`") && e.ends_with("(line 4)"),
            "{e}"
        );
    }

    /// A rewrite pattern that can match the empty string is refused (such matches
    /// were passed by unchanged); one that always takes a byte is fine.
    #[test]
    fn rewrite_patterns_that_can_match_nothing_are_refused() {
        for (pattern, ok) in [
            ("x?", false),
            ("a*", false),
            ("^", false),
            ("", false),
            ("x", true),
            ("a+b?", true),
            (r"(?-u:\b)x", true),
        ] {
            let toml = format!(
                "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nmode = \"splice\"\n\
                 rewrite = [{{ direction = \"to_upstream\", match = '{pattern}', replace = \"-\" }}]\n"
            );
            match Config::from_toml(&toml) {
                Ok(_) => assert!(ok, "{pattern:?} accepted"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!ok, "{pattern:?}: {e}");
                    assert!(
                        e.contains("rewrite[0].match")
                            && e.contains("empty string")
                            && e.ends_with("(line 5)"),
                        "{e}"
                    );
                }
            }
        }
    }

    /// A rule name with a newline would split every log line that names the rule.
    #[test]
    fn rule_names_have_no_control_characters() {
        let e = Config::from_toml(
            "[[rule]]\nname = \"a\\nINFO forged\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`rule[0].name`") && e.contains("control character"),
            "{e}"
        );
    }

    /// A bad value inherited from `[defaults]` is named there, not under a
    /// `[[rule]]` key the file does not have; one in the rule under the rule's.
    #[test]
    fn inherited_bad_values_name_the_defaults_key() {
        const RULE: &str =
            "[[rule]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n";
        for (setting, shown) in [
            ("rise = 0", "rise"),
            ("fall = 0", "fall"),
            ("allow = [\"10.0.0.0/33\"]", "allow[0]"),
            ("deny = [\"x\"]", "deny[0]"),
            ("rate_per_source = \"20/d\"", "rate_per_source"),
            (
                "max_connections_per_source = 0",
                "max_connections_per_source",
            ),
            ("connect_timeout = \"0s\"", "connect_timeout"),
            ("proxy_protocol_timeout = \"0s\"", "proxy_protocol_timeout"),
        ] {
            let e = Config::from_toml(&format!("[defaults]\n{setting}\n{RULE}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`defaults.{shown}` (inherited by rule \"r\")")),
                "{setting}: {e}"
            );
            let e = Config::from_toml(&format!("{RULE}{setting}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`rule[0].{shown}`")),
                "{setting} in the rule: {e}"
            );
        }
    }

    /// A typo inside an upstream table is named, not "did not match any variant".
    #[test]
    fn upstream_table_errors_name_the_field() {
        for (upstream, says) in [
            (
                r#"[{ addr = "a:1", wieght = 2 }]"#,
                "unknown field `wieght`",
            ),
            (r#"{ addr = "a:1", backup = "yes" }"#, "expected a boolean"),
            (r#"[{ addr = "a:1", weight = -1 }]"#, "expected u32"),
            (
                r#"[{ addr = "a:1", max_connections = 0 }]"#,
                "max_connections must be at least 1",
            ),
            (
                r#"{ addr = "agent:web", max_connections = 5 }"#,
                "takes no max_connections",
            ),
        ] {
            let toml = format!("[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = {upstream}\n");
            let e = Config::from_toml(&toml).unwrap_err().to_string();
            assert!(e.contains(says), "{upstream}: {e}");
            assert!(e.contains("rule[0].upstream"), "{upstream}: {e}");
        }
    }

    #[test]
    fn full_file_with_defaults_and_overrides() {
        let c = Config::from_toml(
            r#"
            [global]
            shutdown_grace = "2s"
            max_connections = 50
            deny = ["10.0.0.0/8"]
            [defaults]
            mode = "splice"
            connect_timeout = "250ms"
            idle_timeout = "0s"
            max_connections = 7
            balance = "least_conn"
            [[rule]]
            name = "web"
            listen = "127.0.0.1:0"
            upstream = "192.168.1.25:8005"
            [[rule]]
            listen = "[::1]:0"
            upstream = ["a.example:1", { addr = "[::1]:2", weight = 3, max_connections = 9 }, { addr = "b:3", backup = true }]
            idle_timeout = "1h"
            mode = "auto"
            balance = "source_hash"
            allow = ["127.0.0.1", "::1/128"]
            schedule = ["Mon-Fri 09:00-17:00"]
            timezone = "Europe/Berlin"
            rate_per_source = "20/s"
            proxy_protocol = "v2"
            "#,
        )
        .unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(2));
        assert_eq!(c.max_connections, 50);
        assert_eq!(c.access.deny.len(), 1);
        let (web, r1) = (&c.rules[0], &c.rules[1]);
        assert_eq!(web.name, "web");
        assert_eq!(web.mode, Mode::Splice);
        assert_eq!(web.idle_timeout, None);
        assert_eq!(web.connect_timeout, Duration::from_millis(250));
        assert_eq!(web.max_connections, 7);
        assert_eq!(web.balance, Balance::LeastConn);
        assert_eq!(r1.name, "rule1");
        assert_eq!(
            r1.upstreams[1],
            Upstream {
                addr: "[::1]:2".into(),
                same_port: false,
                weight: 3,
                backup: false,
                max_connections: Some(9),
            }
        );
        assert!(r1.upstreams[2].backup);
        assert_eq!(r1.upstreams[2].max_connections, None);
        assert_eq!(r1.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(r1.mode, Mode::Auto);
        assert_eq!(r1.balance, Balance::SourceHash);
        assert_eq!(r1.access.allow.len(), 2);
        assert!(r1.schedule.is_some());
        assert_eq!(
            r1.rate_per_source,
            Some(Rate {
                per_second: 20.0,
                burst: 20.0
            })
        );
        assert_eq!(r1.proxy_protocol, Some(ProxyProtocol::V2));
    }

    fn error_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().0
    }

    const RULE: &str = "[[rule]]\nlisten=\"127.0.0.1:1\"\nupstream=\"a:1\"\n";

    /// A rewrite's replacement that names a group the pattern lacks is an error (the
    /// expansion puts nothing there): `$1Y` is a group named `1Y`, and the message
    /// says how to write group 1 then `Y`. Groups it has, `$$` and a `$` with no name
    /// are fine.
    #[test]
    fn rewrite_replacement_names_only_groups_the_pattern_has() {
        let rule = |replace: &str| {
            format!(
                "{RULE}mode = \"splice\"\nrewrite = [{{ direction = \"to_upstream\", match = '(?P<n>\\d+)-(\\d+)', replace = '{replace}' }}]\n"
            )
        };
        for ok in [
            "X${1}Y", "$1 Y", "$2$n", "${n}x", "$$1", "a$ b", "$0", "${2",
        ] {
            Config::from_toml(&rule(ok)).unwrap_or_else(|e| panic!("{ok}: {}", e.0));
        }
        let e = error_of(&rule("X$1Y"));
        assert!(
            e.contains("rule[0].rewrite[0].replace")
                && e.contains("group `1Y`")
                && e.contains("`${1}Y`"),
            "{e}"
        );
        for bad in ["$3", "${nn}", "$m"] {
            let e = error_of(&rule(bad));
            assert!(
                e.contains("rewrite[0].replace") && e.contains("does not have"),
                "{bad}: {e}"
            );
        }
    }

    /// Patterns match bytes: a Unicode class (valid in regex's Unicode mode) is an
    /// error that says how to ask for Unicode; with `(?u:...)` it is accepted.
    #[test]
    fn unicode_class_in_a_byte_pattern_says_how() {
        let e = error_of(&format!("{RULE}deny_pattern = ['\\pL']\n"));
        assert!(
            e.contains("rule[0].deny_pattern[0]") && e.contains("(?u:...)"),
            "{e}"
        );
        let ok = format!("{RULE}deny_pattern = ['(?u:\\pL)']\n");
        assert!(Config::from_toml(&ok).is_ok());
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = error_of(&format!("[defaults]\nconnect_timeout = \"5x\"\n{RULE}"));
        assert!(e.contains("defaults.connect_timeout"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = error_of("[global]\nbogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = error_of(&format!("{RULE}foo=2\n"));
        assert!(e.contains("foo"), "{e}");
        let e = error_of("[[rule]]\nlisten=\"127.0.0.1:1\"\nupstream=\"nope\"\n");
        assert!(e.contains("upstream"), "{e}");
        let e = error_of("[[rule]\n");
        assert!(e.contains("line 1"), "{e}");
        // A port written `+1` is the port's fault, not the address's.
        let e = error_of("[[rule]]\nlisten=\"127.0.0.1:1\"\nupstream=\"[::1]:+1\"\n");
        assert!(e.contains("port \"+1\""), "the port is what is wrong: {e}");
        // Brackets hold an IPv6 address: these were accepted, and every connect failed.
        for bad in [
            "[::g]:1",
            "[1:2:3:4:5:6:7:8:9]:1",
            "[[::1]]:1",
            "[::ffff:1.2.3.300]:1",
            "a[b]:1",
        ] {
            let e = error_of(&format!(
                "[[rule]]\nlisten=\"127.0.0.1:1\"\nupstream=\"{bad}\"\n"
            ));
            assert!(
                e.contains("rule[0].upstream") && e.contains("line 3") && e.contains("brackets"),
                "{bad}: {e}"
            );
        }
        let e = error_of("[[rule]]\nlisten=\"127.0.0.1:99999\"\nupstream=\"a:1\"\n");
        assert!(e.contains("listen"), "{e}");
        let e = error_of(&format!("{RULE}allow=[\"10.0.0.0/33\"]\n"));
        assert!(e.contains("rule[0].allow[0]"), "{e}");
        let e = error_of(&format!("{RULE}rate_per_source=\"20/fortnight\"\n"));
        assert!(e.contains("rate_per_source"), "{e}");
        let e = error_of(&format!("{RULE}balance=\"fastest\"\n"));
        assert!(e.contains("balance"), "{e}");
        let e = error_of(&format!("{RULE}schedule=[\"Mon-Fri 09:00-25:00\"]\n"));
        assert!(e.contains("schedule"), "{e}");
        let e = error_of(&format!(
            "{RULE}schedule=[\"Mon 09:00-10:00\"]\ntimezone=\"Mars/Olympus\"\n"
        ));
        assert!(e.contains("timezone"), "{e}");
        let e = error_of(&format!("[global]\nmetrics=\"nope\"\n{RULE}"));
        assert!(e.contains("global.metrics"), "{e}");
        let e = error_of(&format!("[global]\nlog_format=\"xml\"\n{RULE}"));
        assert!(e.contains("global.log_format"), "{e}");
        let e = error_of(&format!("[global]\nuser=\"no-such-user-xyz\"\n{RULE}"));
        assert!(e.contains("global.user"), "{e}");
        let e = error_of(&format!("[global]\ngroup=\"root\"\n{RULE}"));
        assert!(e.contains("global.group"), "{e}");
    }

    #[test]
    fn operations_keys() {
        let c = Config::from_toml(&format!(
            "[global]\nmetrics=\"127.0.0.1:9100\"\nlog_format=\"json\"\nuser=\"root\"\n{RULE}"
        ))
        .unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        let root = c.user.unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
    }

    #[test]
    fn tcp_keepalive_is_off_unless_asked_and_bounded() {
        let rule = |extra: &str| Config::from_toml(&format!("{RULE}{extra}\n"));
        assert_eq!(rule("").unwrap().rules[0].tcp_keepalive, None);
        assert_eq!(
            rule("tcp_keepalive=\"0s\"").unwrap().rules[0].tcp_keepalive,
            None
        );
        let on = rule("tcp_keepalive=\"90s\"").unwrap();
        assert_eq!(on.rules[0].tcp_keepalive, Some(Duration::from_secs(90)));
        for bad in ["999ms", "32768s"] {
            let e = error_of(&format!("{RULE}tcp_keepalive=\"{bad}\"\n"));
            assert!(
                e.contains("`rule[0].tcp_keepalive`") && e.contains("1s to 32767s"),
                "{e}"
            );
        }
    }

    #[test]
    fn reload_compares_every_setting() {
        let a = Config::from_toml(RULE).unwrap().rules.remove(0);
        let b = Config::from_toml(RULE).unwrap().rules.remove(0);
        assert!(a.same_settings(&b));
        let c = Config::from_toml(&format!("{RULE}idle_timeout=\"5s\"\n"))
            .unwrap()
            .rules
            .remove(0);
        assert!(!a.same_settings(&c));
        let d = Config::from_toml(&format!("{RULE}schedule=[\"Mon 09:00-10:00\"]\n"))
            .unwrap()
            .rules
            .remove(0);
        let e = Config::from_toml(&format!("{RULE}schedule=[\"Mon 09:00-11:00\"]\n"))
            .unwrap()
            .rules
            .remove(0);
        assert!(!d.same_settings(&e));
    }

    #[test]
    fn cli_rule() {
        let c = Config::from_cli(CliRule {
            listen: "127.0.0.1:0".into(),
            upstreams: vec!["a:1".into(), "b:2".into()],
            tunnel_listen: None,
            token: CliToken::default(),
        })
        .unwrap();
        assert_eq!(c.rules[0].upstreams.len(), 2);
        assert_eq!(c.rules[0].balance, Balance::First);
    }

    const TUNNEL: &str = r#"
        [tunnel_server]
        listen = "127.0.0.1:0"
        token = "0123456789abcdef"
        resume_grace = "5s"
        [[rule]]
        name = "web"
        listen = "127.0.0.1:0"
        upstream = "agent:web"
        [agent]
        server = "127.0.0.1:9887"
        token = "0123456789abcdef"
        [[service]]
        name = "web"
        target = "127.0.0.1:3000"
    "#;

    /// The error for TUNNEL with `keys` written in its `agent:` rule.
    fn agent_rule_error(keys: &str) -> String {
        error_of(&TUNNEL.replace(
            "upstream = \"agent:web\"",
            &format!("upstream = \"agent:web\"\n{keys}"),
        ))
    }

    #[test]
    fn tunnel_sections() {
        let c = Config::from_toml(TUNNEL).unwrap();
        let t = c.tunnel_server.as_ref().unwrap();
        assert_eq!(t.resume_grace, Duration::from_secs(5));
        assert_eq!(t.resume_buffer, DEFAULT_RESUME_BUFFER);
        assert_eq!(c.rules[0].agent_service(), Some("web"));
        let a = c.agent.as_ref().unwrap();
        assert_eq!(a.services[0].target, "127.0.0.1:3000");
        // The token never shows in Debug (nor, so, in a reload diff or a log).
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        // An agent alone needs no rule.
        let agent_only = &TUNNEL[TUNNEL.find("[agent]").unwrap()..];
        let c = Config::from_toml(agent_only).unwrap();
        assert!(c.rules.is_empty() && c.agent.is_some());
        // ... and takes no `[defaults]`: nothing there would apply to its streams (an
        // empty section is harmless). With rules, the same keys are theirs.
        let e = error_of(&format!("[defaults]\nidle_timeout = \"1s\"\n{agent_only}"));
        assert!(
            e.contains("`defaults.idle_timeout`") && e.contains("no [[rule]]"),
            "{e}"
        );
        Config::from_toml(&format!("[defaults]\n{agent_only}")).unwrap();
        Config::from_toml(&format!("[defaults]\nidle_timeout = \"1s\"\n{TUNNEL}")).unwrap();
        // A rule served by agents has no address to health-check: the link has its own
        // heartbeat.
        let c =
            Config::from_toml(&format!("[defaults]\ncheck_interval = \"2s\"\n{TUNNEL}")).unwrap();
        assert_eq!(c.rules[0].check_interval, None);
        // Nor a local address to connect from: inherited, it does not apply; written in
        // the rule, it is an error.
        let c = Config::from_toml(&format!(
            "[defaults]\nconnect_from = \"127.0.0.1\"\n{TUNNEL}"
        ))
        .unwrap();
        assert_eq!(c.rules[0].connect_from, None);
        let e = agent_rule_error("connect_from = \"127.0.0.1\"");
        assert!(
            e.contains("`rule[0].connect_from`") && e.contains("agent dials out"),
            "{e}"
        );
    }

    #[test]
    fn listen_takes_ranges_and_lists() {
        let rule = |listen: &str, upstream: &str| {
            format!("[[rule]]\nlisten = {listen}\nupstream = \"{upstream}\"\n")
        };
        let c = Config::from_toml(&rule("\"127.0.0.1:8000-8002\"", "10.0.0.5")).unwrap();
        let r = &c.rules[0];
        let want: Vec<SocketAddr> = (8000..=8002)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        assert_eq!(r.listen, want);
        // Without a port: each client's own.
        assert!(r.upstreams[0].same_port);
        assert_eq!(r.upstreams[0].dial_addr(8001), "10.0.0.5:8001");
        let c = Config::from_toml(&rule("[\"127.0.0.1:80\", \"[::1]:81-82\"]", "[::1]")).unwrap();
        assert_eq!(c.rules[0].listen.len(), 3);
        assert_eq!(c.rules[0].upstreams[0].dial_addr(81), "[::1]:81");
        // A port written is kept.
        let c = Config::from_toml(&rule("\"127.0.0.1:8000-8001\"", "10.0.0.5:9000")).unwrap();
        assert!(!c.rules[0].upstreams[0].same_port);
        assert_eq!(c.rules[0].upstreams[0].dial_addr(8001), "10.0.0.5:9000");
        for (listen, upstream, needles) in [
            // One port: a missing upstream port is the mistake it always was.
            (
                "\"127.0.0.1:80\"",
                "10.0.0.5",
                &["`rule[0].upstream[0]`", "HOST:PORT"][..],
            ),
            (
                "\"127.0.0.1:82-80\"",
                "a:1",
                &["`rule[0].listen`", "runs backwards"],
            ),
            (
                "\"127.0.0.1:0-3\"",
                "a:1",
                &["`rule[0].listen`", "starts at 1"],
            ),
            (
                "\"127.0.0.1:80-x\"",
                "a:1",
                &["`rule[0].listen`", "not PORT-PORT"],
            ),
            (
                "\"127.0.0.1:80-70000\"",
                "a:1",
                &["`rule[0].listen`", "not PORT-PORT"],
            ),
            ("[]", "a:1", &["`rule[0].listen`", "at least one"]),
            (
                "[\"127.0.0.1:80-82\", \"0.0.0.0:82\"]",
                "a:1",
                &["`rule[0].listen[1]`", "0.0.0.0:82", "127.0.0.1:82"],
            ),
            (
                "[\"127.0.0.1:0\", \"127.0.0.1:81\"]",
                "a",
                &["`rule[0].upstream[0]`", "port 0"],
            ),
            (
                "[\"127.0.0.1:80\", \"127.0.0.1:81\"]",
                "::1",
                &["`rule[0].upstream[0]`", "[addr]:port"],
            ),
        ] {
            let e = error_of(&rule(listen, upstream));
            assert!(
                needles.iter().all(|n| e.contains(n)),
                "{listen} {upstream}: {e}"
            );
        }
        // Two rules: any address of one against any of the other.
        let two = format!(
            "{}{}",
            rule("\"127.0.0.1:80-90\"", "a"),
            rule("\"0.0.0.0:85\"", "a:1")
        );
        let e = error_of(&two);
        assert!(
            e.contains("`rule[1].listen`")
                && e.contains("0.0.0.0:85")
                && e.contains("127.0.0.1:85"),
            "{e}"
        );
    }

    #[test]
    fn rates_are_checked() {
        let rule = |keys: &str| {
            format!("[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n{keys}\n")
        };
        let c = Config::from_toml(&rule("upload_rate = 1000\ndownload_rate = 0")).unwrap();
        assert_eq!(c.rules[0].rates, [Some(1000), None]);
        assert!(c.rules[0].paced());
        assert!(!Config::from_toml(&rule("")).unwrap().rules[0].paced());
        for (keys, needles) in [
            (
                "mode = \"ebpf\"\ndownload_rate = 1000",
                &["`rule[0].download_rate`", "cannot pace"][..],
            ),
            ("upload_rate = -1", &["upload_rate"]),
        ] {
            let e = error_of(&rule(keys));
            assert!(needles.iter().all(|n| e.contains(n)), "{keys}: {e}");
        }
        // A rule that rewrites paces its copy path.
        let c = Config::from_toml(&rule(
            "upload_rate = 1000\nrewrite = [{ direction = \"to_upstream\", match = \"a\", replace = \"b\" }]",
        ))
        .unwrap();
        assert_eq!(c.rules[0].rates, [Some(1000), None]);
        // An agent: rule paces its tunnel streams, which run on splice in any mode,
        // also under --mode ebpf.
        for mode in ["auto", "ebpf"] {
            let text = TUNNEL.replace(
                "upstream = \"agent:web\"",
                &format!("upstream = \"agent:web\"\nmode = \"{mode}\"\ndownload_rate = 1000"),
            );
            let mut c = Config::from_toml(&text).unwrap_or_else(|e| panic!("{mode}: {}", e.0));
            assert_eq!(c.rules[0].rates, [None, Some(1000)], "{mode}");
            c.override_mode(Mode::Ebpf).unwrap();
        }
        // --mode ebpf over a paced rule: refused, naming the key.
        let mut c = Config::from_toml(&rule("download_rate = 1000")).unwrap();
        let e = c.override_mode(Mode::Ebpf).unwrap_err().0;
        assert!(
            e.contains("`rule[0].download_rate`") && e.contains("--mode ebpf"),
            "{e}"
        );
    }

    #[test]
    fn check_http_is_checked() {
        let rule = |keys: &str| {
            format!("[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n{keys}\n")
        };
        let c =
            Config::from_toml(&rule("check_interval = \"1s\"\ncheck_http = \"/healthz\"")).unwrap();
        let want = HttpCheck {
            path: "/healthz".into(),
            host: None,
            status: vec![],
        };
        assert_eq!(c.rules[0].check_http.as_ref(), Some(&want));
        assert!(want.wants(200) && want.wants(302) && !want.wants(404) && !want.wants(101));
        let full = "check_interval = \"1s\"\ncheck_http = { path = \"/up?x=1\", host = \"app.example\", status = [204] }";
        let c = Config::from_toml(&rule(full)).unwrap();
        let h = c.rules[0].check_http.clone().unwrap();
        assert_eq!(
            (h.path.as_str(), h.host.as_deref()),
            ("/up?x=1", Some("app.example"))
        );
        assert!(h.wants(204) && !h.wants(200));
        for (keys, needles) in [
            (
                "check_http = \"/healthz\"",
                &["`rule[0].check_http`", "needs `check_interval`"][..],
            ),
            (
                "check_interval = \"1s\"\ncheck_http = \"healthz\"",
                &["`rule[0].check_http`", "starting with `/`"],
            ),
            (
                "check_interval = \"1s\"\ncheck_http = \"/a b\"",
                &["`rule[0].check_http`", "without spaces"],
            ),
            (
                "check_interval = \"1s\"\ncheck_http = { path = \"/\", host = \"a\\r\\nX: y\" }",
                &["`rule[0].check_http.host`"],
            ),
            (
                "check_interval = \"1s\"\ncheck_http = { path = \"/\", status = [700] }",
                &["`rule[0].check_http.status`", "700"],
            ),
            (
                "check_interval = \"1s\"\ncheck_http = { path = \"/\", stauts = [200] }",
                &["stauts"],
            ),
        ] {
            let e = error_of(&rule(keys));
            assert!(needles.iter().all(|n| e.contains(n)), "{keys}: {e}");
        }
        // From `[defaults]`: a rule without active checks, or served by agents, has
        // nothing for it to shape; written in an agent's rule, it is an error.
        let c = Config::from_toml(&format!(
            "[defaults]\ncheck_http = \"/healthz\"\n{}",
            rule("")
        ))
        .unwrap();
        assert_eq!(c.rules[0].check_http, None);
        let c = Config::from_toml(&format!(
            "[defaults]\ncheck_interval = \"1s\"\ncheck_http = \"/healthz\"\n{TUNNEL}"
        ))
        .unwrap();
        assert_eq!(c.rules[0].check_http, None);
        let e = agent_rule_error("check_interval = \"1s\"\ncheck_http = \"/\"");
        assert!(
            e.contains("`rule[0].check_http`") && e.contains("agent:"),
            "{e}"
        );
    }

    #[test]
    fn tunnel_errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("[tunnel_server]", "[tunnel_server_x]", "tunnel_server_x"),
            (
                "token = \"0123456789abcdef\"\n        resume_grace",
                "resume_grace",
                "tunnel_server",
            ),
            (
                "resume_grace = \"5s\"",
                "resume_grace = \"5s\"\nresume_buffer = 0",
                "tunnel_server.resume_buffer",
            ),
            (
                "resume_grace = \"5s\"",
                "resume_grace = \"5s\"\nbogus = 1",
                "tunnel_server",
            ),
            (
                "upstream = \"agent:web\"",
                "upstream = [\"agent:web\", \"a:1\"]",
                "rule[0].upstream[0]",
            ),
            (
                "target = \"127.0.0.1:3000\"",
                "target = \"nope\"",
                "service[0].target",
            ),
            (
                "server = \"127.0.0.1:9887\"",
                "server = \"\"",
                "agent.server",
            ),
            (
                "target = \"127.0.0.1:3000\"",
                "target = \"127.0.0.1:3000\"\nconnect_from = \"10.0.0.1:5\"",
                "service[0].connect_from",
            ),
            (
                "target = \"127.0.0.1:3000\"",
                "target = \"127.0.0.1:3000\"\nconnect_from = \"::1\"",
                "service[0].connect_from",
            ),
            (
                "target = \"127.0.0.1:3000\"",
                "target = \"127.0.0.1:3000\"\ntcp_keepalive = \"40000s\"",
                "service[0].tcp_keepalive",
            ),
            (
                "target = \"127.0.0.1:3000\"",
                "target = \"127.0.0.1:3000\"\nupload_rate = -1",
                "service[0].upload_rate",
            ),
        ];
        for (from, to, key) in cases {
            let text = TUNNEL.replacen(from, to, 1);
            let e = Config::from_toml(&text).unwrap_err().0;
            assert!(e.contains(&format!("`{key}")), "{key}: {e}");
        }
        let shaped = TUNNEL.replacen(
            "target = \"127.0.0.1:3000\"",
            "target = \"127.0.0.1:3000\"\nconnect_from = \"127.0.0.7\"\ntcp_keepalive = \"1m\"\n\
             upload_rate = 1000\ndownload_rate = 0",
            1,
        );
        let c = Config::from_toml(&shaped).unwrap();
        let service = &c.agent.unwrap().services[0];
        assert_eq!(service.connect_from, Some(IpAddr::from([127, 0, 0, 7])));
        assert_eq!(service.tcp_keepalive, Some(Duration::from_secs(60)));
        assert_eq!(service.rates, [Some(1000), None], "0 is unpaced");
        // agent: needs a tunnel server to be served from.
        let no_server = &TUNNEL[TUNNEL.find("[[rule]]").unwrap()..];
        let e = Config::from_toml(no_server).unwrap_err().0;
        assert!(
            e.contains("`rule[0].upstream`") && e.contains("[tunnel_server]"),
            "{e}"
        );
        let e = Config::agent_from_cli(
            "h:1".into(),
            &["web".into()],
            CliToken {
                file: None,
                env: Some("t".into()),
            },
        )
        .unwrap_err()
        .0;
        assert!(e.contains("NAME=HOST:PORT"), "{e}");
        let e = Config::agent_from_cli(
            "h:1".into(),
            &["web=127.0.0.1:1".into()],
            CliToken::default(),
        )
        .unwrap_err()
        .0;
        assert!(e.contains("FORWARDER_TOKEN"), "{e}");
    }

    /// A rule `name` on `listen` (upstream a:1), plus `extra` lines.
    fn rule_at(name: &str, listen: &str, extra: &str) -> String {
        format!("[[rule]]\nname=\"{name}\"\nlisten=\"{listen}\"\nupstream=\"a:1\"\n{extra}")
    }

    #[test]
    fn a_default_timezone_is_no_error_for_rules_without_schedule() {
        let text = format!(
            "[defaults]\ntimezone = \"Europe/Berlin\"\n{}{}",
            rule_at("a", "127.0.0.1:1", "schedule=[\"Mon-Fri 09:00-17:00\"]\n"),
            rule_at("b", "127.0.0.1:2", "")
        );
        let c = Config::from_toml(&text).unwrap();
        assert!(c.rules[0].schedule.is_some());
        assert!(c.rules[1].schedule.is_none());
        // Nor when no rule has a schedule at all.
        Config::from_toml(&format!(
            "[defaults]\ntimezone = \"UTC\"\n{}",
            rule_at("b", "127.0.0.1:2", "")
        ))
        .unwrap();
        // A timezone written in the rule itself, without a schedule, is still one.
        let e = error_of(&rule_at("b", "127.0.0.1:2", "timezone = \"UTC\"\n"));
        assert!(e.contains("`rule[0].timezone`"), "{e}");
        assert!(e.contains("only meaningful with `schedule`"), "{e}");
        // A bad default names the key where it is written, used or not.
        let e = error_of(&format!(
            "[defaults]\ntimezone = \"Mars/Olympus\"\n{}",
            rule_at("b", "127.0.0.1:2", "")
        ));
        assert!(e.contains("`defaults.timezone`"), "{e}");
        let e = error_of(&format!(
            "[defaults]\nschedule = [\"Mon 09:00-25:00\"]\n{}",
            rule_at("b", "127.0.0.1:2", "")
        ));
        assert!(e.contains("`defaults.schedule`"), "{e}");
    }

    #[test]
    fn rules_cannot_share_a_listen_address() {
        let two = |a: &str, b: &str| format!("{}{}", rule_at("a", a, ""), rule_at("b", b, ""));
        for (a, b) in [
            ("127.0.0.1:21570", "127.0.0.1:21570"),
            ("0.0.0.0:21570", "127.0.0.1:21570"),
            ("127.0.0.1:21570", "0.0.0.0:21570"),
            ("[::1]:21570", "[::]:21570"),
            ("[::ffff:127.0.0.1]:21570", "127.0.0.1:21570"),
        ] {
            let e = error_of(&two(a, b));
            assert!(e.contains("`rule[1].listen` (rule \"b\")"), "{a} {b}: {e}");
            assert!(e.contains("rule \"a\""), "{a} {b}: {e}");
        }
        for (a, b) in [
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("0.0.0.0:0", "127.0.0.1:0"),
            ("127.0.0.1:21570", "127.0.0.1:21571"),
            ("127.0.0.1:21570", "127.0.0.2:21570"),
            ("[::1]:21570", "127.0.0.1:21570"),
        ] {
            Config::from_toml(&two(a, b)).unwrap_or_else(|e| panic!("{a} {b}: {e}"));
        }
        // The metrics listener cannot take a rule's address either.
        let e = error_of(&format!(
            "[global]\nmetrics = \"127.0.0.1:21570\"\n{}",
            rule_at("a", "0.0.0.0:21570", "")
        ));
        assert!(
            e.contains("`global.metrics`") && e.contains("`rule[0].listen`"),
            "{e}"
        );
    }

    #[test]
    fn listen_overlap_rules() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let o = |a: &str, b: &str, dual| listen_ips_overlap(ip(a), ip(b), dual);
        assert!(o("::", "0.0.0.0", true) && o("127.0.0.1", "::", true));
        assert!(!o("::", "0.0.0.0", false) && !o("127.0.0.1", "::", false));
        assert!(o("::", "::1", false) && o("::ffff:0.0.0.0", "10.0.0.1", false));
        assert!(!o("::1", "127.0.0.1", true) && !o("10.0.0.1", "10.0.0.2", true));
    }
}
