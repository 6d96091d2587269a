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

use std::sync::Arc;

use crate::relay::{Handover, Pair, Progress, Relay, RelayEnd, RelayFuture, Side};

/// The relay of every tunnel stream, on both sides: splice with retention
/// (`stream`). A rule with an `agent:` upstream uses it whatever its `mode`: the
/// kernel path cannot keep the bytes a lost link may need again.
pub struct TunnelRelay;

impl TunnelRelay {
    /// `handover`: what a rule's inspection prelude (server side) leaves to do.
    pub async fn run(pair: Pair, progress: &Progress, handover: Handover) -> RelayEnd {
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
        stream::run(local, data, link, progress, handover).await
    }
}

impl Relay for TunnelRelay {
    fn path(&self) -> &'static str {
        "splice"
    }

    fn relay<'a>(&'a self, pair: Pair, progress: Arc<Progress>) -> RelayFuture<'a> {
        Box::pin(async move { Self::run(pair, &progress, Handover::default()).await })
    }

    fn relay_after_prelude<'a>(
        &'a self,
        pair: Pair,
        progress: Arc<Progress>,
        handover: Handover,
    ) -> RelayFuture<'a> {
        debug_assert!(handover.rewriters.is_none(), "rewrite: refused by check");
        Box::pin(async move { Self::run(pair, &progress, handover).await })
    }
}
