//! A rule's connection slots (`max_connections`), which outlive its runtimes: a reload
//! that changes the rule hands them on, so the connections opened before it still
//! count, and a changed limit applies to all of them.

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

pub struct RuleSlots {
    free: Semaphore,
    size: Mutex<Size>,
}

struct Size {
    limit: usize,
    /// Slots a lowered limit still has to take away: those in use when it was lowered
    /// are not given back as their connections end, until this is paid.
    owed: usize,
}

/// One connection's slot (or the accept loop's, waiting for a client), given back when
/// dropped. A pointer, not a semaphore permit: it is held per connection.
pub struct RuleSlot(Arc<RuleSlots>);

impl Drop for RuleSlot {
    fn drop(&mut self) {
        let mut size = self.0.size.lock().unwrap();
        if size.owed > 0 {
            size.owed -= 1;
        } else {
            // Under the lock, so that a `resize` meanwhile sees it.
            self.0.free.add_permits(1);
        }
    }
}

impl RuleSlots {
    pub fn new(limit: usize) -> Arc<RuleSlots> {
        Arc::new(RuleSlots {
            free: Semaphore::new(limit),
            size: Mutex::new(Size { limit, owed: 0 }),
        })
    }

    /// Waits for a free slot (cancel-safe: dropped before it is ready, it takes none).
    /// `None` only if the semaphore were closed, which it never is.
    pub async fn acquire(self: &Arc<Self>) -> Option<RuleSlot> {
        self.free.acquire().await.ok()?.forget();
        Some(RuleSlot(self.clone()))
    }

    /// Sets a new limit for all the slots, in use or not. Never waits: a raised limit
    /// frees slots at once; a lowered one takes the free slots, and the rest from the
    /// connections that end next (so until then more are open than the new limit,
    /// and no new one is served).
    pub fn resize(&self, limit: usize) {
        let mut size = self.size.lock().unwrap();
        if limit >= size.limit {
            let more = limit - size.limit;
            let forgiven = more.min(size.owed);
            size.owed -= forgiven;
            self.free.add_permits(more - forgiven);
        } else {
            let fewer = size.limit - limit;
            let taken = self.free.forget_permits(fewer);
            size.owed += fewer - taken;
        }
        size.limit = limit;
    }

    #[cfg(test)]
    fn try_acquire(self: &Arc<Self>) -> Option<RuleSlot> {
        self.free.try_acquire().ok()?.forget();
        Some(RuleSlot(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(slots: &Arc<RuleSlots>, n: usize) -> Vec<RuleSlot> {
        (0..n)
            .map(|i| slots.try_acquire().unwrap_or_else(|| panic!("slot {i}")))
            .collect()
    }

    #[test]
    fn limit_and_release() {
        let s = RuleSlots::new(2);
        let mut held = take(&s, 2);
        assert!(s.try_acquire().is_none());
        held.pop();
        assert!(s.try_acquire().is_some());
    }

    #[test]
    fn raised_limit_counts_the_open_slots() {
        let s = RuleSlots::new(2);
        let _held = take(&s, 2);
        s.resize(3);
        let _third = take(&s, 1);
        assert!(s.try_acquire().is_none());
    }

    #[test]
    fn lowered_limit_takes_slots_as_they_are_given_back() {
        let s = RuleSlots::new(3);
        let mut held = take(&s, 2);
        // One free slot is taken at once, one of the two in use when it comes back.
        s.resize(1);
        assert!(s.try_acquire().is_none());
        held.pop();
        assert!(s.try_acquire().is_none());
        held.pop();
        let _one = take(&s, 1);
        assert!(s.try_acquire().is_none());
    }

    #[test]
    fn raising_again_forgives_what_is_owed() {
        let s = RuleSlots::new(3);
        let mut held = take(&s, 3);
        s.resize(1);
        s.resize(2);
        held.pop();
        assert!(s.try_acquire().is_none(), "two still open, limit 2");
        held.pop();
        let _one = take(&s, 1);
        assert!(s.try_acquire().is_none());
        s.resize(4);
        let _more = take(&s, 2);
        assert!(s.try_acquire().is_none());
    }
}
