//! Per-source-address limits: concurrent connections and a new-connection rate (token
//! bucket), in a table whose size is bounded however many sources show up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Rate;

/// Entries beyond this are evicted (idle ones first) so a flood of sources cannot
/// grow memory without bound; ~100 bytes each.
const MAX_ENTRIES: usize = 65_536;

pub struct SourceLimits {
    max_per_source: Option<usize>,
    rate: Option<Rate>,
    /// Shared with the rule's limits before and after a reload (see [`Self::carried`]).
    table: Arc<Mutex<HashMap<IpAddr, Entry>>>,
}

struct Entry {
    active: usize,
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    RateLimited,
}

/// Held for the life of a connection; gives its slot back when dropped.
pub struct SourceSlot {
    limits: Option<(Arc<SourceLimits>, IpAddr)>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some((limits, ip)) = self.limits.take() {
            let mut table = limits.table.lock().unwrap();
            if let Some(e) = table.get_mut(&ip) {
                e.active = e.active.saturating_sub(1);
            }
        }
    }
}

impl SourceLimits {
    pub fn new(max_per_source: Option<usize>, rate: Option<Rate>) -> Arc<SourceLimits> {
        Arc::new(SourceLimits {
            max_per_source,
            rate,
            table: Arc::default(),
        })
    }

    /// The same rule's limits with new settings over the same table, for a reload: each
    /// source's open connections still count and its bucket stays as it was (clamped
    /// to a smaller burst at its next refill). Buckets that were not kept (no rate
    /// before) start full.
    pub fn carried(&self, max_per_source: Option<usize>, rate: Option<Rate>) -> Arc<SourceLimits> {
        if let (None, Some(r)) = (self.rate, rate) {
            for e in self.table.lock().unwrap().values_mut() {
                e.tokens = r.burst;
            }
        }
        Arc::new(SourceLimits {
            max_per_source,
            rate,
            table: self.table.clone(),
        })
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<SourceSlot, Refusal> {
        if self.max_per_source.is_none() && self.rate.is_none() {
            return Ok(SourceSlot { limits: None });
        }
        let ip = ip.to_canonical();
        let mut table = self.table.lock().unwrap();
        if table.len() >= MAX_ENTRIES && !table.contains_key(&ip) {
            self.evict(&mut table, now);
        }
        let burst = self.rate.map_or(0.0, |r| r.burst);
        let e = table.entry(ip).or_insert(Entry {
            active: 0,
            tokens: burst,
            refilled: now,
        });
        if let Some(max) = self.max_per_source {
            if e.active >= max {
                return Err(Refusal::TooManyConnections);
            }
        }
        if let Some(rate) = self.rate {
            let elapsed = now.saturating_duration_since(e.refilled).as_secs_f64();
            e.tokens = (e.tokens + elapsed * rate.per_second).min(rate.burst);
            e.refilled = now;
            if e.tokens < 1.0 {
                return Err(Refusal::RateLimited);
            }
            e.tokens -= 1.0;
        }
        e.active += 1;
        Ok(SourceSlot {
            limits: Some((self.clone(), ip)),
        })
    }

    /// Drops sources with no open connection whose bucket has refilled (forgetting them
    /// changes nothing); if that is not enough, any source with no open connection.
    fn evict(&self, table: &mut HashMap<IpAddr, Entry>, now: Instant) {
        let full = |e: &Entry| match self.rate {
            None => true,
            Some(r) => {
                e.tokens + now.saturating_duration_since(e.refilled).as_secs_f64() * r.per_second
                    >= r.burst
            }
        };
        table.retain(|_, e| e.active > 0 || !full(e));
        if table.len() >= MAX_ENTRIES {
            table.retain(|_, e| e.active > 0);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_source_connections() {
        let l = SourceLimits::new(Some(2), None);
        let now = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = l.admit(a, now).unwrap();
        let _s2 = l.admit(a, now).unwrap();
        assert_eq!(l.admit(a, now).err(), Some(Refusal::TooManyConnections));
        let _other = l.admit(b, now).unwrap();
        drop(s1);
        assert!(l.admit(a, now).is_ok());
    }

    #[test]
    fn token_bucket() {
        let l = SourceLimits::new(
            None,
            Some(Rate {
                per_second: 10.0,
                burst: 10.0,
            }),
        );
        let t0 = Instant::now();
        let a: IpAddr = "::1".parse().unwrap();
        for _ in 0..10 {
            assert!(l.admit(a, t0).is_ok());
        }
        assert_eq!(l.admit(a, t0).err(), Some(Refusal::RateLimited));
        assert!(l.admit(a, t0 + Duration::from_millis(110)).is_ok());
        assert_eq!(
            l.admit(a, t0 + Duration::from_millis(110)).err(),
            Some(Refusal::RateLimited)
        );
    }

    #[test]
    fn carried_keeps_open_connections_and_buckets() {
        let rate = |burst| Rate {
            per_second: 1.0,
            burst,
        };
        let old = SourceLimits::new(Some(2), Some(rate(2.0)));
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let s1 = old.admit(a, t0).unwrap();
        let _s2 = old.admit(a, t0).unwrap();
        let new = old.carried(Some(3), Some(rate(3.0)));
        assert_eq!(new.admit(a, t0).err(), Some(Refusal::RateLimited));
        let t1 = t0 + Duration::from_secs(10);
        let _s3 = new.admit(a, t1).unwrap();
        assert_eq!(new.admit(a, t1).err(), Some(Refusal::TooManyConnections));
        // A connection of the old settings gives its slot back to the shared table.
        drop(s1);
        assert!(new.admit(a, t1).is_ok());
    }

    #[test]
    fn rate_added_by_a_reload_starts_full() {
        let old = SourceLimits::new(Some(5), None);
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let _s = old.admit(a, t0).unwrap();
        let new = old.carried(
            Some(5),
            Some(Rate {
                per_second: 1.0 / 60.0,
                burst: 2.0,
            }),
        );
        assert!(new.admit(a, t0).is_ok());
        assert!(new.admit(a, t0).is_ok());
        assert_eq!(new.admit(a, t0).err(), Some(Refusal::RateLimited));
    }

    #[test]
    fn table_stays_bounded() {
        let l = SourceLimits::new(
            None,
            Some(Rate {
                per_second: 1000.0,
                burst: 5.0,
            }),
        );
        let t0 = Instant::now();
        for i in 0..(MAX_ENTRIES as u32 + 10_000) {
            let ip = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            drop(l.admit(ip, t0 + Duration::from_micros(i as u64 * 20)));
        }
        assert!(l.len() <= MAX_ENTRIES, "{}", l.len());
    }
}
