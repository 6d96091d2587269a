//! Request/response with a real HTTP client: an nginx origin serving a 1 KiB file, and
//! wrk against it (directly or through a relay).

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::relay::{self, Relay, TempDir};
use super::servers::Addrs;

/// The file wrk fetches.
pub const PATH: &str = "/1k";
pub const BODY: usize = 1024;
/// wrk threads (the machine has few cores: client, relay and origin share them).
pub const WRK_THREADS: usize = 1;

/// The nginx that serves the file, and its temp dir (removed after it stops).
pub struct Origin {
    pub relay: Relay,
    pub addr: SocketAddr,
    _dir: TempDir,
}

/// Starts an nginx serving `PATH` on 127.0.0.1:ephemeral with one worker; its log goes to
/// `log_dir`.
pub fn start_origin(log_dir: &Path) -> Result<Origin> {
    let mut last = None;
    for _ in 0..3 {
        match start_once(log_dir) {
            Ok(o) => return Ok(o),
            Err(e) => {
                let retry = format!("{e:#}").contains("in use");
                last = Some(e);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("origin did not start")))
}

fn start_once(log_dir: &Path) -> Result<Origin> {
    let dir = TempDir::new("origin")?;
    let www = dir.path().join("www");
    fs::create_dir(&www)?;
    fs::write(www.join(&PATH[1..]), vec![b'x'; BODY])?;
    let port = relay::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = log_dir.join("http-origin.log");
    let tmp = |n: &str| dir.path().join(n).display().to_string();
    let conf = dir.path().join("nginx.conf");
    let text = format!(
        "# written by cargo xtask bench: the HTTP origin\n\
         worker_processes 1;\n\
         error_log {log} warn;\n\
         pid {pid};\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   default_type application/octet-stream;\n\
         \x20   keepalive_requests 100000000;\n\
         \x20   keepalive_timeout 60s;\n\
         \x20   client_body_temp_path {b};\n\
         \x20   proxy_temp_path {p};\n\
         \x20   fastcgi_temp_path {f};\n\
         \x20   uwsgi_temp_path {u};\n\
         \x20   scgi_temp_path {s};\n\
         \x20   server {{ listen {addr} backlog=4096; root {www}; }}\n\
         }}\n",
        log = log.display(),
        pid = tmp("nginx.pid"),
        b = tmp("body"),
        p = tmp("proxy"),
        f = tmp("fastcgi"),
        u = tmp("uwsgi"),
        s = tmp("scgi"),
        www = www.display(),
    );
    fs::write(&conf, text)?;
    let out = fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new("nginx");
    relay::die_with_parent(&mut cmd);
    let child = cmd
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(&log)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("cannot start nginx (HTTP origin)")?;
    let dummy: SocketAddr = ([127, 0, 0, 1], 0).into();
    let none = Addrs {
        bulk: dummy,
        echo: dummy,
        idle: dummy,
        http: None,
    };
    let mut r = Relay::new(child, none, log);
    relay::wait_listening(&mut r, &[port], Duration::from_secs(10))?;
    Ok(Origin {
        relay: r,
        addr,
        _dir: dir,
    })
}

pub struct WrkResult {
    pub req_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    /// Socket errors plus non-2xx responses.
    pub errors: u64,
}

/// `wrk --latency` against `addr` with `conns` connections for `dur`; with `close`, every
/// request carries `Connection: close`. Killed by PID if it overruns.
pub fn wrk(addr: SocketAddr, conns: usize, dur: Duration, close: bool) -> Result<WrkResult> {
    let secs = dur.as_secs_f64().ceil().max(1.0) as u64;
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg("--timeout")
        .arg("2s");
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}{PATH}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    relay::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("cannot start wrk")?;
    let pid = child.id();
    // wrk prints little (well under a pipe buffer): wait, then read.
    let deadline = Instant::now() + Duration::from_secs(secs + 15);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                // SAFETY: kill(2) on our own, not yet reaped, child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                let _ = child.wait();
                bail!("wrk (pid {pid}) overran {secs} s by 15 s: killed");
            }
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        bail!("wrk failed ({status}): {}", err.trim());
    }
    parse_wrk(&out).with_context(|| format!("cannot parse wrk's output:\n{out}"))
}

fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult {
        req_per_s: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        requests: 0,
        errors: 0,
    };
    for line in out.lines() {
        let l = line.trim();
        let w: Vec<&str> = l.split_whitespace().collect();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.req_per_s = v.trim().parse()?;
        } else if w.len() == 2 && w[0] == "50%" {
            r.p50_us = duration_us(w[1])?;
        } else if w.len() == 2 && w[0] == "99%" {
            r.p99_us = duration_us(w[1])?;
        } else if w.len() >= 3 && w[1] == "requests" && w[2] == "in" {
            r.requests = w[0].parse()?;
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>()?;
        }
    }
    if !r.req_per_s.is_finite() || !r.p99_us.is_finite() {
        bail!("no Requests/sec or 99% line");
    }
    Ok(r)
}

/// wrk's "123.45us", "1.23ms", "2.00s", "1.00m" in microseconds.
fn duration_us(s: &str) -> Result<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        bail!("unknown duration {s:?}");
    };
    Ok(num.parse::<f64>()? * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:1/1k
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  300.00us   9.87ms   90.00%
    Req/Sec    48.00k     1.00k   50.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.40ms
     99%    2.50ms
  96000 requests in 2.00s, 120.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  48000.50
Transfer/sec:     60.00MB
";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.req_per_s, 48000.5);
        assert_eq!(r.p50_us, 812.0);
        assert_eq!(r.p99_us, 2500.0);
        assert_eq!(r.requests, 96000);
        assert_eq!(r.errors, 6);
    }
}
