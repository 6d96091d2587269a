//! Clients accepted but waiting for an fd (or memory) for their upstream.
//!
//! Out of fds, a client accepted with the last one waits for another for its upstream
//! (connection.rs). Two rules keep that from starving the process:
//! - while anyone waits, no rule accepts: an fd that frees goes to a waiting client,
//!   not to a new one that would only wait too;
//! - when waiting clients hold every fd, nothing frees and they would all wait out
//!   connect_timeout together (a burst accepted before the first EMFILE did exactly
//!   that: CI, no client of 60 served). So when no fd has come free for [`STUCK`] (no
//!   waiter left, no connection ended), the newest half give up their clients at once,
//!   and each fd so freed serves one of the older half. Not sooner: open pairs that
//!   end a moment later would have served them (audit: 100 ms reset clients that pairs
//!   ending 0.5 s later had room for). Not one at a time: one a second served 4 of 39
//!   waiting clients before the others' connect_timeout, and a test that looked at
//!   each client once saw none served (CI).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long no fd may come free while clients wait before the newest gives its up.
pub const STUCK: Duration = Duration::from_secs(1);
/// How often accepting looks again while clients wait.
pub const RECHECK: Duration = Duration::from_millis(100);

struct Queue {
    /// Tickets of the clients waiting, oldest (smallest) first.
    tickets: BTreeSet<u64>,
    /// When an fd last came free (a waiter left, a connection ended), or the first
    /// waiter came.
    last_left: Option<Instant>,
    /// Stuck: the waiters from this ticket on (the newest half) give up.
    yield_from: Option<u64>,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    tickets: BTreeSet::new(),
    last_left: None,
    yield_from: None,
});
static NEXT: AtomicU64 = AtomicU64::new(0);
/// `QUEUE.tickets.len()`, read by every accept without the lock.
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// A connection ended: its fds are free, so the waiters are not stuck.
pub fn freed() {
    if any() {
        QUEUE.lock().unwrap().last_left = Some(Instant::now());
    }
}

/// Whether any client waits for an fd: accepting waits until none does.
pub fn any() -> bool {
    WAITING.load(Ordering::Relaxed) > 0
}

/// One client's place in the queue; leaving (drop) lets the next one go.
pub struct Waiter {
    ticket: u64,
}

impl Waiter {
    /// Joins the queue, newest.
    pub fn join() -> Self {
        let ticket = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut q = QUEUE.lock().unwrap();
        if q.tickets.is_empty() {
            q.last_left = Some(Instant::now());
        }
        q.tickets.insert(ticket);
        WAITING.store(q.tickets.len(), Ordering::Relaxed);
        Waiter { ticket }
    }

    /// This client should give up its fd: no fd has come free for [`STUCK`] while
    /// several waited, and it is among the newest half of them then. Returns how many
    /// were waiting, for the warning.
    pub fn should_yield(&self) -> Option<usize> {
        let mut q = QUEUE.lock().unwrap();
        let n = q.tickets.len();
        if q.yield_from.is_none() && n >= 2 && q.last_left.is_some_and(|t| t.elapsed() >= STUCK) {
            q.yield_from = q.tickets.iter().nth(n / 2).copied();
        }
        q.yield_from.filter(|&from| self.ticket >= from).map(|_| n)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut q = QUEUE.lock().unwrap();
        q.tickets.remove(&self.ticket);
        q.last_left = Some(Instant::now());
        // The newest half gone: the older half is served by the fds they freed.
        if q.yield_from
            .is_some_and(|from| q.tickets.range(from..).next().is_none())
        {
            q.yield_from = None;
        }
        WAITING.store(q.tickets.len(), Ordering::Relaxed);
    }
}
