//! Far-off deadlines, kept off tokio's timer wheel.
//!
//! While any timer is armed on tokio's wheel, every park of a worker thread is an
//! `epoll_wait` with a timeout: the kernel sets and cancels an hrtimer, and tokio reads
//! the clock and turns its wheel, at each one. A pair's `idle_timeout` (an hour by
//! default) and the pipe pool's trim were armed nearly always, so every message through
//! a splice hop paid for it: 3.3 µs of CPU per 64 B round trip (10%) and 1.6 µs of p50,
//! in 10 paired runs (docs/BENCHMARKS.md, "What a message costs"). They wait here
//! instead: one thread sleeps until the earliest deadline and wakes its task, and the
//! workers park without a timeout while nothing else is armed.
//!
//! The tunnel's steady timers wait here too: the control link's heartbeat (a ping each
//! second, silence for 4 s) and a stream's delayed ack. On tokio's wheel they made
//! every park of both tunnel processes a timed one: a 64 B round trip through the
//! tunnel (server and agent, pinned to one CPU, 3 paired runs) took 29.5, 35.5 and
//! 25.5 µs of their CPU against 33.0, 43.0 and 33.5.
//!
//! Arming a deadline takes a lock, and wakes the thread when it is the earliest by more
//! than [`LATE_OK`] (so a deadline may fire up to 5 ms late): it suits timers armed at
//! most every few milliseconds (an ack is armed once per 5 ms of a stream's traffic at
//! most). Retries and pacing stay on tokio's: they are armed only while something fails
//! or is paced.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

struct Waiting {
    /// (deadline, id) -> the task to wake.
    tasks: BTreeMap<(Instant, u64), Waker>,
    /// When the thread wakes next (`None`: when told). A deadline added after it needs
    /// no wake-up: one that fires late is looked at then, and the thread sleeps again.
    wakes_at: Option<Instant>,
}

struct Shared {
    waiting: Mutex<Waiting>,
    /// Told when a deadline earlier than the thread's next wake-up is added.
    earlier: Condvar,
}

/// Bumped each time the thread wakes tasks. A registered deadline that still sees the
/// value it saw when it registered cannot have fired, so polling it reads no clock
/// (a pair polls its deadline each time it wakes up).
static FIRED: AtomicU64 = AtomicU64::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static SHARED: OnceLock<&'static Shared> = OnceLock::new();

/// Starts the thread (at startup, so that a failure is a startup error, not a pair's).
pub fn start() -> std::io::Result<()> {
    if SHARED.get().is_some() {
        return Ok(());
    }
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        waiting: Mutex::new(Waiting {
            tasks: BTreeMap::new(),
            wakes_at: None,
        }),
        earlier: Condvar::new(),
    }));
    if SHARED.set(shared).is_ok() {
        std::thread::Builder::new()
            .name("deadlines".into())
            .spawn(move || run(shared))?;
    }
    Ok(())
}

fn shared() -> &'static Shared {
    if SHARED.get().is_none() {
        start().expect("cannot start the deadlines thread");
    }
    SHARED.get().expect("started above")
}

fn lock(s: &Shared) -> MutexGuard<'_, Waiting> {
    s.waiting.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(s: &'static Shared) {
    let mut waiting = lock(s);
    loop {
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(entry) = waiting.tasks.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        if !due.is_empty() {
            // Under the lock: a deadline registering now reads the new value.
            FIRED.fetch_add(1, Ordering::SeqCst);
            drop(waiting);
            due.into_iter().for_each(Waker::wake);
            waiting = lock(s);
            continue;
        }
        let next = waiting.tasks.first_key_value().map(|(k, _)| k.0);
        waiting.wakes_at = next;
        waiting = match next {
            Some(at) => {
                s.earlier
                    .wait_timeout(waiting, at.saturating_duration_since(now))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => s.earlier.wait(waiting).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

/// How late a deadline may fire, so that arming one seldom wakes the thread.
const LATE_OK: Duration = Duration::from_millis(5);

/// A deadline: ready at `at`. Registered with the thread on the first poll that finds
/// it still ahead, and taken off again when reset, ready or dropped.
pub struct Deadline {
    at: Instant,
    /// The registered entry's id (0: not registered), the waker it wakes and the
    /// [`FIRED`] count it saw.
    id: u64,
    waker: Option<Waker>,
    seen: u64,
}

impl Deadline {
    pub fn new(at: Instant) -> Deadline {
        Deadline {
            at,
            id: 0,
            waker: None,
            seen: 0,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.at
    }

    pub fn reset(&mut self, at: Instant) {
        self.unregister();
        self.at = at;
    }

    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Read before the clock: the thread bumps it after taking entries off, so an
        // entry it takes after this read shows as a changed count at the next poll
        // (which its wake-up brings).
        let fired = FIRED.load(Ordering::SeqCst);
        let same_waker = self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if self.id != 0 && same_waker && fired == self.seen {
            return Poll::Pending;
        }
        if Instant::now() >= self.at {
            self.unregister();
            return Poll::Ready(());
        }
        if self.id != 0 && same_waker {
            // Some other deadline fired: this one is still ahead, and still registered.
            self.seen = fired;
            return Poll::Pending;
        }
        self.unregister();
        let s = shared();
        let mut waiting = lock(s);
        self.id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.seen = FIRED.load(Ordering::SeqCst);
        self.waker = Some(cx.waker().clone());
        waiting.tasks.insert((self.at, self.id), cx.waker().clone());
        // The thread is woken only for a deadline it would otherwise meet more than
        // LATE_OK late: a stream's ack is armed 5 ms ahead and often dropped unfired
        // (the stream ends first), and waking the thread for each cost every tunnel
        // connection a futex call and two context switches per process.
        if waiting.wakes_at.is_none_or(|t| self.at + LATE_OK < t) {
            waiting.wakes_at = Some(self.at);
            s.earlier.notify_one();
        }
        Poll::Pending
    }

    fn unregister(&mut self) {
        if self.id != 0 {
            lock(shared()).tasks.remove(&(self.at, self.id));
            self.id = 0;
            self.waker = None;
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// Sleeps until `at`, off tokio's wheel (see the module's comment for what for).
pub fn sleep_until(at: Instant) -> impl Future<Output = ()> + Send {
    let mut deadline = Deadline::new(at);
    std::future::poll_fn(move |cx| deadline.poll(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_at_its_deadline_in_order_and_not_when_dropped_or_moved() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut noop = Context::from_waker(Waker::noop());
        // Registered, then dropped before its time: taken off again.
        let mut dropped = Deadline::new(ms(50));
        assert!(dropped.poll(&mut noop).is_pending());
        let key = (dropped.at, dropped.id);
        assert!(lock(shared()).tasks.contains_key(&key));
        drop(dropped);
        assert!(!lock(shared()).tasks.contains_key(&key));
        // A second apart, so a stalled test machine cannot blur the order.
        let late = tokio::spawn(sleep_until(ms(1100)));
        let early = tokio::spawn(sleep_until(ms(100)));
        early.await.unwrap();
        let at_early = start.elapsed();
        assert!(at_early >= Duration::from_millis(100), "{at_early:?}");
        assert!(!late.is_finished(), "the later one fired with the earlier");
        late.await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(1100));
        // Registered, moved later, polled: it waits for the new time.
        let t = Instant::now();
        let mut d = Deadline::new(t + Duration::from_millis(50));
        assert!(d.poll(&mut noop).is_pending());
        d.reset(t + Duration::from_millis(150));
        std::future::poll_fn(|cx| d.poll(cx)).await;
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(d.id, 0, "ready, and taken off");
    }

    #[tokio::test]
    async fn a_deadline_armed_without_waking_the_thread_still_fires() {
        let t = Instant::now();
        let mut noop = Context::from_waker(Waker::noop());
        // The thread is told of `first`; `second`, within LATE_OK before it, is not.
        let mut first = Deadline::new(t + Duration::from_millis(300));
        assert!(first.poll(&mut noop).is_pending());
        let second = sleep_until(t + Duration::from_millis(298));
        // Polled (registered) before `first` goes: the thread's wake-up, set for
        // `first`, is the only one it gets.
        tokio::pin!(second);
        assert!(poll_once(second.as_mut()).await.is_pending());
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("a deadline registered within LATE_OK of the thread's wake-up was lost");
        assert!(t.elapsed() >= Duration::from_millis(298));
    }

    /// Polls `f` once, with the task's own waker.
    async fn poll_once<F: Future + Unpin>(mut f: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut f).poll(cx))).await
    }
}
