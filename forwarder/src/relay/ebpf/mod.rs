//! The sockmap relay: the kernel moves each pair's bytes socket to socket.
//!
//! Both sockets of a pair go into SOCKS, keyed by socket cookie (B under cookie(A), A
//! under cookie(B)), which gives the verdict program each socket's peer, and then into
//! MEMBERS, whose verdict program (`forwarder-ebpf`) runs exactly for the sockets in it
//! and redirects every skb to the peer's egress. Userspace only watches: it raises
//! each direction's in-flight limit as the peer socket accepts bytes, relays the bytes
//! the program leaves behind when that limit is reached, passes FINs on once every
//! byte is in the peer socket, and turns errors into resets. See docs/ARCHITECTURE.md.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{splice, Handover, Pair, Progress, Relay, RelayEnd, RelayFuture};

mod kernel;
mod pair;
mod part;
/// Socket syscalls that std and tokio do not offer (also the splice relay's).
pub(crate) mod sys;

use kernel::Kernel;

pub use kernel::{built_in, preload, NOT_BUILT};

pub struct EbpfRelay {
    kernel: &'static Kernel,
    inflight_limit: u64,
    /// `auto`: every pair starts on splice (which costs nothing until bytes come) and
    /// moves to the kernel path once it proves interactive
    /// ([`splice::PROMOTE_AFTER_BURSTS`]); short and idle pairs never pay for the maps.
    start_on_splice: bool,
    /// What was done to a pair's sockets before [`Relay::relay`] gets them: nothing,
    /// unless the rule reads or writes a PROXY header.
    handed: pair::Before,
}

impl EbpfRelay {
    /// The relay for one rule; the program and maps are shared by every rule.
    /// Call [`probe`] first: only a probed kernel path is handed out. `proxy_header`:
    /// the rule reads a PROXY header from clients or writes one to upstreams.
    pub async fn new(
        inflight_limit: u64,
        start_on_splice: bool,
        proxy_header: bool,
    ) -> Result<EbpfRelay, String> {
        let kernel = probe().await?;
        Ok(EbpfRelay {
            kernel,
            inflight_limit,
            start_on_splice,
            handed: if proxy_header {
                pair::Before::Used
            } else {
                pair::Before::Untouched
            },
        })
    }

    /// How the program is attached, for the startup line.
    pub fn attach_kind(&self) -> &'static str {
        self.kernel.attach
    }
}

impl Relay for EbpfRelay {
    fn path(&self) -> &'static str {
        "ebpf"
    }

    fn relay<'a>(&'a self, pair: Pair, progress: Arc<Progress>) -> RelayFuture<'a> {
        let promote_after = self.start_on_splice.then_some(splice::PROMOTE_AFTER_BURSTS);
        self.run(pair, progress, promote_after, self.handed, None)
    }

    /// After an inspection prelude a socket may hold a partly read skb, which the
    /// program would see whole (docs/ARCHITECTURE.md). A pair with nothing queued has
    /// none (what arrives from now on comes whole): it pairs at once, as a drained one.
    /// A little queued is relayed by splice as the pair joins. A stream still pouring
    /// in (more queued than that) would keep that going for nothing: it starts on
    /// splice and moves at a quiet moment, as `auto` does. Either way no byte beyond
    /// the inspected ones goes through our memory. A pair whose dump still shows bytes
    /// starts on splice, which shows them, and moves at its first quiet moment after.
    fn relay_after_prelude<'a>(
        &'a self,
        pair: Pair,
        progress: Arc<Progress>,
        handover: Handover,
    ) -> RelayFuture<'a> {
        debug_assert!(
            handover.rewriters.is_none(),
            "rewrite rules use the copy relay"
        );
        let queued = |s: &tokio::net::TcpStream| {
            sys::inq(std::os::fd::AsRawFd::as_raw_fd(s)).unwrap_or(u64::MAX / 4)
        };
        let queued = queued(&pair.client) + queued(&pair.upstream);
        let promote_after = if self.start_on_splice || queued > pair::PARTLY_READ_MAX {
            Some(splice::PROMOTE_AFTER_BURSTS)
        } else if handover.dump.is_some() {
            Some(1)
        } else {
            None
        };
        let before = match queued {
            0 => pair::Before::Drained,
            _ => pair::Before::Used,
        };
        self.run(pair, progress, promote_after, before, handover.dump)
    }

    /// Redirected bytes wake nobody: an idle pair's counters are read on its slowest tick.
    fn progress_lag(&self) -> std::time::Duration {
        pair::MAX_TICK
    }
}

impl EbpfRelay {
    /// An `auto` pair starts as a splice relay, the kernel path's state only made when
    /// the pair is promoted: an idle `auto` pair holds what a splice pair holds, plus
    /// this small wrapper (which is not an `async fn`, so it keeps no copy of the pair).
    /// `promote_after`: start on splice and move after that many small bursts (and
    /// after showing what `dump` still shows).
    fn run(
        &self,
        pair: Pair,
        progress: Arc<Progress>,
        promote_after: Option<u32>,
        before: pair::Before,
        dump: Option<Box<crate::inspect::dump::Dump>>,
    ) -> RelayFuture<'static> {
        let (k, limit) = (self.kernel, self.inflight_limit);
        debug_assert!(
            dump.is_none() || promote_after.is_some(),
            "splice shows the dump"
        );
        if promote_after.is_none() {
            return Box::pin(pair::relay(k, limit, pair, progress, true, before));
        }
        let on_splice = Box::pin(splice::relay_until(
            pair,
            progress.clone(),
            promote_after,
            dump,
        ));
        Box::pin(async move {
            let pair = match on_splice.await {
                Ok(end) => return end,
                Err(pair) => pair,
            };
            Box::pin(pair::relay(
                k,
                limit,
                pair,
                &*progress,
                true,
                pair::Before::Drained,
            ))
            .await
        })
    }
}

fn kernel() -> Result<&'static Kernel, String> {
    static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();
    KERNEL
        .get_or_init(Kernel::load)
        .as_ref()
        .map_err(Clone::clone)
}

/// Loads and attaches the program, then forwards a real loopback pair through it end
/// to end (bytes queued before pairing, both directions, both FINs). Runs once per
/// process; every later call returns the first answer.
pub async fn probe() -> Result<&'static Kernel, String> {
    static PROBE: tokio::sync::OnceCell<Result<&'static Kernel, String>> =
        tokio::sync::OnceCell::const_new();
    PROBE
        .get_or_init(|| async {
            let k = kernel()?;
            match tokio::time::timeout(Duration::from_secs(3), probe_pair(k)).await {
                Ok(Ok(())) => Ok(k),
                Ok(Err(e)) => Err(format!("probe pair failed: {e}")),
                Err(_) => Err("probe pair timed out after 3s".into()),
            }
        })
        .await
        .clone()
}

async fn probe_pair(k: &'static Kernel) -> Result<(), String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let front = TcpListener::bind("127.0.0.1:0").await.map_err(io("bind"))?;
    let back = TcpListener::bind("127.0.0.1:0").await.map_err(io("bind"))?;
    let mut client = TcpStream::connect(front.local_addr().map_err(io("addr"))?)
        .await
        .map_err(io("connect"))?;
    let (a, _) = front.accept().await.map_err(io("accept"))?;
    let b = TcpStream::connect(back.local_addr().map_err(io("addr"))?)
        .await
        .map_err(io("connect"))?;
    let (mut server, _) = back.accept().await.map_err(io("accept"))?;
    // Queued before pairing: exercises the kick.
    client.write_all(b"early-up ").await.map_err(io("write"))?;
    server
        .write_all(b"early-down ")
        .await
        .map_err(io("write"))?;
    let progress = Progress::default();
    let relay = pair::relay(
        k,
        65536,
        Pair {
            client: a,
            upstream: b,
            tunnel: None,
        },
        &progress,
        false,
        pair::Before::Untouched,
    );
    let talk = async {
        client.write_all(b"ping").await.map_err(io("write"))?;
        client.shutdown().await.map_err(io("shutdown"))?;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.map_err(io("read"))?;
        if got != b"early-up ping" {
            return Err(format!("upstream got {:?}", String::from_utf8_lossy(&got)));
        }
        server.write_all(b"pong").await.map_err(io("write"))?;
        server.shutdown().await.map_err(io("shutdown"))?;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.map_err(io("read"))?;
        if got != b"early-down pong" {
            return Err(format!("client got {:?}", String::from_utf8_lossy(&got)));
        }
        Ok(())
    };
    let (end, talked) = tokio::join!(relay, talk);
    talked?;
    match end {
        RelayEnd::Closed => Ok(()),
        RelayEnd::Failed { side, error } => Err(format!("{} side: {error}", side.as_str())),
        RelayEnd::Refused { reason, .. } => Err(format!("refused: {reason}")),
        RelayEnd::Ended(why) => Err(why.to_string()),
        RelayEnd::ConnectFailed(why) => Err(format!("connect failed: {why}")),
    }
}
