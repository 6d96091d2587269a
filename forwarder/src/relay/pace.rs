//! Pacing a direction at a rule's `upload_rate` / `download_rate`: the token bucket
//! that the splice pumps and the tunnel's streams read through.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// A direction's rate (`upload_rate`, `download_rate`): a token bucket holding at most
/// a second's worth, so a pair starts with a second's bytes at once and then moves at
/// the rate, as nginx's `proxy_upload_rate`/`proxy_download_rate` do.
pub(crate) struct Bucket {
    /// Bytes per second.
    rate: u64,
    /// Bytes the direction may read now.
    tokens: u64,
    /// When `tokens` was last topped up.
    at: tokio::time::Instant,
    /// Wakes the direction when the bucket holds a read's worth again.
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Bucket {
    pub(crate) fn new(rate: u64) -> Bucket {
        let now = tokio::time::Instant::now();
        Bucket {
            rate,
            tokens: rate,
            at: now,
            sleep: Box::pin(tokio::time::sleep_until(now)),
        }
    }

    /// The smallest read worth a wake-up: a fiftieth of a second's bytes (at most
    /// 64 KiB), so a slow rate is not paced one byte per syscall.
    fn quantum(&self) -> u64 {
        (self.rate / 50).clamp(1, 64 * 1024)
    }

    /// Adds what the time since `at` earned, up to a second's worth.
    fn refill(&mut self, now: tokio::time::Instant) {
        let nanos = now.saturating_duration_since(self.at).as_nanos();
        let earned = (nanos * u128::from(self.rate) / 1_000_000_000) as u64;
        if self.tokens + earned >= self.rate {
            (self.tokens, self.at) = (self.rate, now);
        } else if earned > 0 {
            self.tokens += earned;
            // Only the time those bytes took: the remainder counts towards the next.
            let used = u128::from(earned) * 1_000_000_000 / u128::from(self.rate);
            self.at += std::time::Duration::from_nanos(used as u64);
        }
    }

    /// How many bytes the direction may read now: the tokens once they make a read's
    /// worth, else 0 (for a caller that polls [`Bucket::poll_allowance`] when it waits).
    pub(crate) fn allowance(&mut self) -> usize {
        self.allowance_at(tokio::time::Instant::now())
    }

    /// [`Bucket::allowance`] at `now`.
    fn allowance_at(&mut self, now: tokio::time::Instant) -> usize {
        self.refill(now);
        if self.tokens >= self.quantum() {
            self.tokens as usize
        } else {
            0
        }
    }

    /// How many bytes the direction may read now, once that is a read's worth.
    pub(crate) fn poll_allowance(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        loop {
            let now = tokio::time::Instant::now();
            match self.allowance_at(now) {
                0 => {}
                n => return Poll::Ready(n),
            }
            let nanos =
                u128::from(self.quantum() - self.tokens) * 1_000_000_000 / u128::from(self.rate);
            let wait = std::time::Duration::from_nanos(nanos as u64 + 1);
            self.sleep.as_mut().reset(now + wait);
            ready!(self.sleep.as_mut().poll(cx));
        }
    }

    /// The bytes the direction may read, as last topped up.
    pub(crate) fn tokens(&self) -> usize {
        self.tokens as usize
    }

    pub(crate) fn spend(&mut self, n: usize) {
        self.tokens = self.tokens.saturating_sub(n as u64);
    }
}
