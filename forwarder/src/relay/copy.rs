//! The copy relay: read into our memory, maybe rewrite, write. The only path on which
//! a rule may change bytes (`rewrite`), so every byte of its pairs is counted in
//! `userspace_bytes`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;

use super::pace::Bucket;
use super::{
    reset_both_on_close, Handover, Hop, Pair, Progress, Relay, RelayEnd, RelayFuture, Side,
};
use crate::config::Rule;
use crate::inspect::dump::Dump;
use crate::inspect::rewrite::Rewriter;

pub struct CopyRelay {
    rule: Rule,
}

impl CopyRelay {
    pub fn new(rule: &Rule) -> CopyRelay {
        CopyRelay { rule: rule.clone() }
    }
}

/// Read at most this much at once (and hold no more than it in our memory).
const READ_MAX: usize = 64 * 1024;

impl Relay for CopyRelay {
    /// Splice mode's userspace variant, as the rule's startup line says it (issues 2
    /// and 3: `splice` or `ebpf`); its pairs' close lines say `path=copy` (`Hop::Copy`).
    fn path(&self) -> &'static str {
        "splice"
    }

    fn relay<'a>(&'a self, pair: Pair, progress: Arc<Progress>) -> RelayFuture<'a> {
        self.relay_after_prelude(pair, progress, Handover::default())
    }

    /// Goes on with the prelude's rewriters (what it passed on was rewritten by them)
    /// and shows what the dump still shows as it reads: every byte is in our memory
    /// here anyway.
    fn relay_after_prelude<'a>(
        &'a self,
        pair: Pair,
        progress: Arc<Progress>,
        handover: Handover,
    ) -> RelayFuture<'a> {
        let [to_upstream, to_client] = match handover.rewriters {
            Some(r) => *r,
            None => Rewriter::for_rule(&self.rule),
        };
        let dump = Mutex::new(handover.dump);
        Box::pin(async move {
            progress.enter(Hop::Copy);
            let Pair {
                mut client,
                mut upstream,
                ..
            } = pair;
            let [up_rate, down_rate] = self.rule.rates.map(|r| r.map(Bucket::new));
            let result = {
                let (cr, cw) = client.split();
                let (ur, uw) = upstream.split();
                let up = pump(
                    cr,
                    uw,
                    [Side::Client, Side::Upstream],
                    (to_upstream, up_rate),
                    (&dump, 0),
                    &progress.to_upstream,
                    &progress,
                );
                let down = pump(
                    ur,
                    cw,
                    [Side::Upstream, Side::Client],
                    (to_client, down_rate),
                    (&dump, 1),
                    &progress.to_client,
                    &progress,
                );
                tokio::try_join!(up, down)
            };
            match result {
                Ok(_) => RelayEnd::Closed,
                Err((side, error)) => {
                    reset_both_on_close(&client, &upstream);
                    RelayEnd::Failed { side, error }
                }
            }
        })
    }
}

/// One direction until EOF, which it passes on (after the rewriter's tail), reading no
/// more than its rate's bucket allows (`upload_rate`, `download_rate`). `dump`: the
/// connection's dump (shared by both directions) and this direction's index in it.
async fn pump(
    src: tokio::net::tcp::ReadHalf<'_>,
    mut dst: tokio::net::tcp::WriteHalf<'_>,
    [src_side, dst_side]: [Side; 2],
    (mut rewriter, mut bucket): (Rewriter, Option<Bucket>),
    (dump, d): (&Mutex<Option<Box<Dump>>>, usize),
    counter: &AtomicU64,
    progress: &Progress,
) -> Result<(), (Side, std::io::Error)> {
    // While the rewriter holds bytes: HOLD_MAX after the last bytes arrived (a
    // spurious wake-up, which reads nothing, does not put it off). The prelude's
    // rewriter may hold some already.
    let hold = || tokio::time::Instant::now() + crate::inspect::rewrite::HOLD_MAX;
    let mut hold_until = rewriter.holding().then(hold);
    let mut showing = true;
    loop {
        progress.hold(Progress::held_by_rewriter(d), rewriter.holding());
        // A paced direction waits for its bucket first: until it holds a read's worth
        // (a fiftieth of a second's bytes, or one byte below 50 B/s), which also puts
        // off a held match's flush by at most that long.
        let want = match &mut bucket {
            Some(b) => std::future::poll_fn(|cx| b.poll_allowance(cx))
                .await
                .min(READ_MAX),
            None => READ_MAX,
        };
        // Wait for bytes holding no buffer, so an idle pair holds none (a 64 KiB one
        // kept across the wait cost 15 KB of RSS per idle pair, the pages bytes had
        // touched). A held beginning of a match waits a while for the rest, not
        // forever; only then is the wait timed: a timer per read would enter and leave
        // tokio's wheel on every read of a direction with nothing held.
        let ready = match hold_until.filter(|_| rewriter.holding()) {
            Some(at) => tokio::time::timeout_at(at, src.readable()).await.ok(),
            None => Some(src.readable().await),
        };
        // Read into its spare capacity: nothing zeroes the 64 KiB.
        let mut buf = Vec::new();
        let (n, out): (_, Cow<[u8]>) = match ready {
            None => (None, rewriter.flush().into()),
            Some(r) => {
                r.map_err(|e| (src_side, e))?;
                buf.reserve_exact(want);
                let n = match src.try_read_buf(&mut buf) {
                    Ok(n) => {
                        if let Some(b) = &mut bucket {
                            b.spend(n);
                        }
                        n
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err((src_side, e)),
                };
                if showing {
                    // What came in, before any rewrite (as the prelude shows it).
                    let mut dump = dump.lock().unwrap_or_else(|e| e.into_inner());
                    match dump.as_mut() {
                        Some(t) if t.wants(d) > 0 => t.record(d, &buf[..n]),
                        _ => showing = false,
                    }
                }
                // With no rule for this direction the read is written as it is.
                let out = if rewriter.is_empty() {
                    Cow::Borrowed(&buf[..n])
                } else {
                    let held_before = rewriter.holding();
                    let out = rewriter.push(&buf[..n], n == 0).into();
                    // Bounded from when holding began, not put off by each read that
                    // extends a possible match (`a+c` fed one `a` at a time).
                    hold_until = match (held_before, rewriter.holding()) {
                        (_, false) => None,
                        (true, true) => hold_until.or_else(|| Some(hold())),
                        (false, true) => Some(hold()),
                    };
                    out
                };
                (Some(n), out)
            }
        };
        let eof = n == Some(0);
        dst.write_all(&out).await.map_err(|e| (dst_side, e))?;
        counter.fetch_add(out.len() as u64, Ordering::Relaxed);
        progress
            .via_userspace
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        progress.touch();
        if eof {
            return super::pass_fin(dst.as_ref()).map_err(|e| (dst_side, e));
        }
    }
}
