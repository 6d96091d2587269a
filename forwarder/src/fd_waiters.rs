//! Clients accepted but waiting for an fd (or memory) for their upstream.
//!
//! Out of fds, a client accepted with the last one waits for another for its upstream
//! (connection.rs). Two rules keep that from starving the process:
//! - while anyone waits, no rule accepts: an fd that frees goes to a waiting client,
//!   not to a new one that would only wait too;
//! - when waiting clients hold every fd, nothing frees and they would all wait out
//!   connect_timeout together (a burst accepted before the first EMFILE did exactly
//!   that: CI, no client of 60 served). So when no fd has come free for [`STUCK`] (no
//!   waiter left, no connection ended), the newest gives up its client, and its fd
//!   serves an older one: oldest first, as the backlog serves. Not sooner: open pairs
//!   that end a moment later would have served it (audit: 100 ms reset clients that
//!   pairs ending 0.5 s later had room for).

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
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    tickets: BTreeSet::new(),
    last_left: None,
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

    /// This client should give up its fd: it is the newest of several waiters, and no
    /// fd has come free for [`STUCK`]. Returns how many were waiting, for the warning.
    pub fn should_yield(&self) -> Option<usize> {
        let q = QUEUE.lock().unwrap();
        let newest = q.tickets.last() == Some(&self.ticket);
        let stuck = q.last_left.is_some_and(|t| t.elapsed() >= STUCK);
        (newest && q.tickets.len() >= 2 && stuck).then_some(q.tickets.len())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut q = QUEUE.lock().unwrap();
        q.tickets.remove(&self.ticket);
        q.last_left = Some(Instant::now());
        WAITING.store(q.tickets.len(), Ordering::Relaxed);
    }
}
