//! Active health checks, each `check_interval`: a TCP connect to every upstream, and
//! with `check_http` an HTTP request on it whose status must say up.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::balance::Upstreams;
use super::proxy_protocol;
use crate::config::{HttpCheck, ProxyProtocol, Rule};

/// Runs for the life of the process; spawned once per rule that has `check_interval`.
pub async fn run(rule: Rule, upstreams: Arc<Upstreams>) {
    let Some(interval) = rule.check_interval else {
        return;
    };
    let timeout = rule.connect_timeout.min(interval);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let how = Arc::new(How {
        timeout,
        from: rule.connect_from,
        http: rule.check_http.clone(),
        // An upstream without a port is checked on the rule's first listen port.
        port: rule.listen[0].port(),
        proxy_protocol: rule.proxy_protocol,
    });
    loop {
        ticker.tick().await;
        // All checks of one round run at once, so one slow upstream delays none.
        let mut checks = tokio::task::JoinSet::new();
        for (i, u) in upstreams.list.iter().enumerate() {
            let addr = u.cfg.dial_addr(how.port).into_owned();
            let how = how.clone();
            checks.spawn(async move { (i, check(&addr, &how).await) });
        }
        while let Some(Ok((i, result))) = checks.join_next().await {
            // Out of fds or memory ourselves: the check says nothing of the upstream
            // (audit: every upstream, backups too, went DOWN while we were out of fds).
            let Some(result) = result else { continue };
            let why = result.as_ref().err().cloned().unwrap_or_default();
            if let Some(up) = upstreams.report(i, result.is_ok()) {
                log_transition(&rule.name, &upstreams.list[i].cfg.addr, up, "check", &why);
            }
        }
    }
}

pub fn log_transition(rule: &str, addr: &str, up: bool, by: &str, why: &str) {
    if up {
        crate::event!(
            info,
            "upstream is UP",
            text = ("upstream rule={rule} addr={addr} is UP ({by})"),
            rule = %rule,
            addr = %addr,
            state = "UP",
            by = %by,
        );
    } else {
        crate::event!(
            warn,
            "upstream is DOWN",
            text = ("upstream rule={rule} addr={addr} is DOWN ({by}: {why})"),
            rule = %rule,
            addr = %addr,
            state = "DOWN",
            by = %by,
            error = %why,
        );
    }
}

/// How a rule's checks are made.
struct How {
    /// For the whole check: connect, and the HTTP answer's head.
    timeout: Duration,
    /// `connect_from`, as the rule's connections are made.
    from: Option<IpAddr>,
    http: Option<HttpCheck>,
    port: u16,
    /// The rule's PROXY header version: an HTTP check sends a LOCAL header first.
    proxy_protocol: Option<ProxyProtocol>,
}

/// One check: whether `addr` answered (and with `check_http`, answered well), or
/// None when the failure was ours (out of fds or memory), which tells nothing about
/// the upstream.
async fn check(addr: &str, how: &How) -> Option<Result<(), String>> {
    let timeout = how.timeout;
    let checked = async {
        let (stream, _, _) = match crate::connection::connect_one(addr, timeout, how.from).await {
            Ok(answered) => answered,
            Err(e) if e.local => return None,
            Err(e) => return Some(Err(e.why)),
        };
        let Some(http) = &how.http else {
            return Some(Ok(()));
        };
        Some(ask_http(stream, addr, http, how.proxy_protocol).await)
    };
    match tokio::time::timeout(timeout, checked).await {
        Ok(result) => result,
        Err(_) => Some(Err(format!("timed out after {timeout:?}"))),
    }
}

/// The most of an answer's head we read: HAProxy's buffer size.
const MAX_HEAD: usize = 16 * 1024;

/// Sends `GET path` on `stream` and reads the answer's head (parsed by httparse).
async fn ask_http(
    mut stream: TcpStream,
    addr: &str,
    http: &HttpCheck,
    proxy_protocol: Option<ProxyProtocol>,
) -> Result<(), String> {
    // An upstream that wants a PROXY header refuses a request without one; a LOCAL
    // header is the one the spec gives health checks (no client to name).
    let mut request = proxy_protocol
        .map(proxy_protocol::encode_local)
        .unwrap_or_default();
    let host = http.host.as_deref().unwrap_or(addr);
    request.extend_from_slice(
        format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: forwarder-health-check\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n",
            http.path
        )
        .as_bytes(),
    );
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("sending GET {}: {e}", http.path))?;
    let mut head = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut answer = httparse::Response::new(&mut headers);
        match answer.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let code = answer.code.unwrap_or_default();
                return match http.wants(code) {
                    true => Ok(()),
                    false => Err(format!(
                        "GET {} answered HTTP {code} {}",
                        http.path,
                        answer.reason.unwrap_or_default()
                    )),
                };
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(format!(
                    "GET {}: answer's head over {MAX_HEAD} bytes",
                    http.path
                ))
            }
            Err(e) => return Err(format!("GET {}: not an HTTP answer ({e})", http.path)),
        }
        let n = stream
            .read_buf(&mut head)
            .await
            .map_err(|e| format!("GET {}: {e}", http.path))?;
        if n == 0 {
            return Err(format!("GET {}: closed before an HTTP answer", http.path));
        }
    }
}
