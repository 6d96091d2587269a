//! Reverse tunnel: visitors reach a service behind NAT through a public forwarder.
//!
//! One plain TCP data connection per visitor (no multiplexing), so each hop is a
//! socket pair the splice relay moves in the kernel; a control connection per agent
//! carries acknowledgements, ends and heartbeats, so streams survive losing the link
//! (see `stream` for how, and docs/ARCHITECTURE.md for the figures).

pub mod agent;
pub mod auth;
pub mod control;
pub mod proto;
pub mod server;
pub mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::relay::{Handover, Pair, Progress, Relay, RelayEnd, RelayFuture, Side};

/// The link events both sides log, counted for `/metrics`
/// (`forwarder_tunnel_link_events_total{side,event}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// `agent connected`: a new session.
    Connected,
    /// `link lost`: its streams wait for the link to come back.
    Lost,
    /// `link resumed`: the session's streams carry on.
    Resumed,
    /// `grace expired`: the session is over, its streams were reset.
    GraceExpired,
}

impl LinkEvent {
    pub const ALL: [LinkEvent; 4] = [
        LinkEvent::Connected,
        LinkEvent::Lost,
        LinkEvent::Resumed,
        LinkEvent::GraceExpired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LinkEvent::Connected => "connected",
            LinkEvent::Lost => "lost",
            LinkEvent::Resumed => "resumed",
            LinkEvent::GraceExpired => "grace_expired",
        }
    }
}

/// Link events seen by one side of this process (a process can hold both).
pub struct LinkEvents([AtomicU64; 4]);

impl LinkEvents {
    const fn new() -> LinkEvents {
        LinkEvents([const { AtomicU64::new(0) }; 4])
    }

    /// Counts `e` (next to its log line).
    pub fn count(&self, e: LinkEvent) {
        self.0[e as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, e: LinkEvent) -> u64 {
        self.0[e as usize].load(Ordering::Relaxed)
    }
}

pub static SERVER_LINK_EVENTS: LinkEvents = LinkEvents::new();
pub static AGENT_LINK_EVENTS: LinkEvents = LinkEvents::new();

/// A tunnel's streams as `/metrics` shows them: `attached` while their session's
/// link is up, `waiting` while it is down (for at most resume_grace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    pub attached: usize,
    pub waiting: usize,
}

/// The relay of every tunnel stream, on both sides: splice with retention
/// (`stream`). A rule with an `agent:` upstream uses it whatever its `mode`: the
/// kernel path cannot keep the bytes a lost link may need again.
/// `rates`: a rule's `upload_rate` and `download_rate`, `[to_upstream, to_client]`
/// (as [`crate::relay::splice::SpliceRelay`]'s); on the agent, its `[[service]]`'s.
pub struct TunnelRelay {
    pub rates: [Option<u64>; 2],
}

impl TunnelRelay {
    /// `handover`: what a rule's inspection prelude (server side) leaves to do.
    pub async fn run(
        pair: Pair,
        progress: &Progress,
        handover: Handover,
        rates: [Option<u64>; 2],
    ) -> RelayEnd {
        let Pair {
            client,
            upstream,
            tunnel,
        } = pair;
        let link = tunnel.expect("a tunnel stream's pair carries its link");
        let (local, data) = match link.local_side {
            Side::Client => (client, upstream),
            Side::Upstream => (upstream, client),
        };
        stream::run(local, data, link, progress, handover, rates).await
    }
}

impl Relay for TunnelRelay {
    fn path(&self) -> &'static str {
        "splice"
    }

    fn relay<'a>(&'a self, pair: Pair, progress: Arc<Progress>) -> RelayFuture<'a> {
        Box::pin(async move { Self::run(pair, &progress, Handover::default(), self.rates).await })
    }

    fn relay_after_prelude<'a>(
        &'a self,
        pair: Pair,
        progress: Arc<Progress>,
        handover: Handover,
    ) -> RelayFuture<'a> {
        debug_assert!(handover.rewriters.is_none(), "rewrite: refused by check");
        Box::pin(async move { Self::run(pair, &progress, handover, self.rates).await })
    }
}
