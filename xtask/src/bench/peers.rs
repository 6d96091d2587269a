//! The real peers: nginx `stream` and HAProxy `mode tcp`, each started as a child with a
//! generated config (in a temp dir), one listener per bench server, like our forwarder.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::relay::{self, Relay, TempDir, Unavailable};
use super::servers::Addrs;

/// Where Debian's dynamic nginx modules live (libnginx-mod-stream).
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
const START_TRIES: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `half_close`: `proxy_half_close on` (see `Mode::NginxHalfClose`).
    Nginx {
        half_close: bool,
    },
    Haproxy,
}

/// A running peer and the temp dir holding its config (removed after the peer is
/// stopped: fields drop in order).
pub struct PeerProc {
    pub relay: Relay,
    pub dir: TempDir,
}

/// `nginx -V` / `haproxy -v`: the first line naming the version, or why there is none.
pub fn version(bin: &str, arg: &str) -> Result<String> {
    let out = Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {bin} {arg}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok(text)
}

/// The `load_module` line nginx needs for `stream`, "" when it is built in.
fn nginx_stream_load() -> Result<String> {
    let v = version("nginx", "-V")?;
    if v.split_whitespace().any(|w| w == "--with-stream") {
        return Ok(String::new());
    }
    if Path::new(NGINX_STREAM_MODULE).is_file() {
        return Ok(format!("load_module {NGINX_STREAM_MODULE};\n"));
    }
    bail!(
        "this nginx has no stream module ({NGINX_STREAM_MODULE} missing: Debian package \
         libnginx-mod-stream)"
    )
}

pub fn nginx_version() -> String {
    version("nginx", "-V")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("nginx version: "))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "nginx".into())
}

pub fn haproxy_version() -> String {
    version("haproxy", "-v")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("HAProxy version"))
                .and_then(|l| l.split_whitespace().nth(2))
                .map(|v| format!("HAProxy {v}"))
        })
        .unwrap_or_else(|| "HAProxy".into())
}

/// HAProxy's pipes for splicing. HAProxy sizes its fd needs as 2 per connection plus 2
/// per pipe (plus a few), and refuses to start when that passes the hard RLIMIT_NOFILE;
/// with its default (maxconn / 4) it asks for 2.5 fds per connection, more than the
/// 20,000 here allow for the idle pairs the others hold. Pipes are only held while bytes
/// wait in them: the bulk phase's 8 streams need 16.
const PEER_MAXPIPES: usize = 256;

/// Starts `peer` forwarding to `up`, able to hold `max_pairs` pairs; its log goes to
/// `log_dir`. Retries with fresh ports when another process took one meanwhile.
pub fn start(
    peer: Peer,
    up: &Addrs,
    max_pairs: usize,
    log_dir: &Path,
) -> std::result::Result<PeerProc, Unavailable> {
    let mut last = None;
    for _ in 0..START_TRIES {
        match start_once(peer, up, max_pairs, log_dir) {
            Ok(p) => return Ok(p),
            Err(e) => {
                let text = format!("{e:#}");
                let retry = text.contains("in use");
                last = Some(text);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(Unavailable(last.unwrap_or_default()))
}

fn start_once(peer: Peer, up: &Addrs, max_pairs: usize, log_dir: &Path) -> Result<PeerProc> {
    let dir = TempDir::new(match peer {
        Peer::Nginx { .. } => "nginx",
        Peer::Haproxy => "haproxy",
    })?;
    let mut addrs = *up;
    let mut ports = Vec::new();
    let mut rules = Vec::new();
    for (name, upstream) in up.rules() {
        let port = relay::free_port()?;
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        addrs.set(name, listen);
        ports.push(port);
        rules.push((name, listen, upstream));
    }
    let (cmd, log, path) = match peer {
        Peer::Nginx { half_close } => {
            let load = nginx_stream_load()?;
            let log = log_dir.join(if half_close {
                "peer-nginx-hc.log"
            } else {
                "peer-nginx.log"
            });
            let half = if half_close {
                " proxy_half_close on;"
            } else {
                ""
            };
            let conf = dir.path().join("nginx.conf");
            let mut servers = String::new();
            for (_, listen, upstream) in &rules {
                servers += &format!(
                    "    server {{ listen {listen} backlog=4096; proxy_pass {upstream}; \
                     proxy_timeout 1h; proxy_connect_timeout 5s;{half} }}\n"
                );
            }
            let text = format!(
                "# written by cargo xtask bench\n{load}\
                 worker_processes auto;\n\
                 error_log {log} notice;\n\
                 pid {pid};\n\
                 events {{ worker_connections {wc}; }}\n\
                 stream {{\n{servers}}}\n",
                log = log.display(),
                pid = dir.path().join("nginx.pid").display(),
                wc = 2 * max_pairs + 4096,
            );
            write(&conf, &text)?;
            let mut cmd = Command::new("nginx");
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(&log)
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"]);
            let path = format!(
                "{} stream, worker_processes auto (no splice in nginx stream){}",
                nginx_version(),
                if half_close {
                    ", proxy_half_close on"
                } else {
                    ""
                }
            );
            (cmd, log, path)
        }
        Peer::Haproxy => {
            let log = log_dir.join("peer-haproxy.log");
            let conf = dir.path().join("haproxy.cfg");
            let mut listens = String::new();
            for (name, listen, upstream) in &rules {
                listens +=
                    &format!("\nlisten {name}\n    bind {listen}\n    server {name} {upstream}\n");
            }
            let text = format!(
                "# written by cargo xtask bench\n\
                 global\n    maxconn {mc}\n    maxpipes {PEER_MAXPIPES}\n\n\
                 defaults\n    mode tcp\n    option splice-auto\n    maxconn {mc}\n    \
                 backlog 4096\n    timeout connect 5s\n    timeout client 1h\n    \
                 timeout server 1h\n{listens}",
                mc = max_pairs,
            );
            write(&conf, &text)?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(&conf);
            let path = format!(
                "{} mode tcp, option splice-auto, one process, a thread per CPU",
                haproxy_version()
            );
            (cmd, log, path)
        }
    };
    let mut p = spawn(cmd, up, log)?;
    p.path = path;
    relay::wait_listening(&mut p, &ports, Duration::from_secs(10))?;
    p.addrs = addrs;
    Ok(PeerProc { relay: p, dir })
}

fn write(path: &PathBuf, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) fn spawn(mut cmd: Command, up: &Addrs, log: PathBuf) -> Result<Relay> {
    let out = fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    relay::die_with_parent(&mut cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    Ok(Relay::new(child, *up, log))
}
