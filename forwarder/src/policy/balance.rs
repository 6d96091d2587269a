//! Choosing upstreams: balancing, health (active checks and passive failures), backups.
//!
//! `order()` gives the whole list of attempts for one client: the balancer's pick
//! first, then the other healthy primaries, healthy backups, and only then upstreams
//! marked down (checks can be stale). A refused or timed-out connect moves on to the
//! next entry, so a client never sees a dead upstream while a healthy one exists.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Balance, Rule, Upstream};

/// Without active checks nothing would ever bring a passively failed upstream back:
/// after this long it gets real traffic again as a trial.
pub const PASSIVE_RETRY: Duration = Duration::from_secs(10);

pub struct Upstreams {
    pub list: Vec<UpstreamState>,
    balance: Balance,
    rise: u32,
    fall: u32,
    active_checks: bool,
    /// Smooth weighted round robin (nginx's): current weight per upstream.
    rr: Mutex<Vec<i64>>,
}

pub struct UpstreamState {
    pub cfg: Upstream,
    /// What checks and traffic learnt of it. Shared, by address, with the runtime this
    /// one replaced on a reload and with the one that replaces it: a connect still
    /// under way on the old runtime reports to the new one too. (Copied once at the
    /// reload, an upstream that such a connect then found dead read up again, and the
    /// next `fall` clients each waited `connect_timeout` on it.)
    health: Arc<Health>,
}

struct Health {
    up: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
    down_since: Mutex<Option<Instant>>,
    /// A passively downed upstream's trial connection is under way: the one client it
    /// is, and no other meanwhile (every client that came during it went first to the
    /// dead upstream and waited `connect_timeout` there).
    trial: AtomicBool,
    /// Connections open to it or connecting, for least_conn and random: counted from
    /// the attempt on (a slow connect counted nothing, and a burst piled onto the
    /// slowest upstream), and across a reload (a kept upstream's open connections
    /// still count for the rule's new runtime).
    active: AtomicUsize,
}

impl Health {
    fn new() -> Arc<Health> {
        Arc::new(Health {
            up: AtomicBool::new(true),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            down_since: Mutex::new(None),
            trial: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        })
    }
}

/// One connection to an upstream, from its connect attempt on: counted against the
/// upstream while it lives, and holding its passive trial, if it is that, until the
/// result is reported (or it ends).
pub struct Attempt {
    health: Arc<Health>,
    trial: bool,
}

impl Attempt {
    /// Whether this connect is the passive trial of a downed upstream.
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    fn end_trial(&mut self) {
        if std::mem::take(&mut self.trial) {
            self.health.trial.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.end_trial();
        self.health.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    /// `before`: the same rule's upstreams before a reload, whose health (by address)
    /// these share.
    pub fn new(rule: &Rule, before: Option<&Upstreams>) -> Arc<Upstreams> {
        let health = |addr: &str| {
            before
                .and_then(|b| b.list.iter().find(|o| o.cfg.addr == addr))
                .map_or_else(Health::new, |o| o.health.clone())
        };
        Arc::new(Upstreams {
            list: rule
                .upstreams
                .iter()
                .map(|u| UpstreamState {
                    cfg: u.clone(),
                    health: health(&u.addr),
                })
                .collect(),
            balance: rule.balance,
            rise: rule.rise,
            fall: rule.fall,
            active_checks: rule.check_interval.is_some(),
            rr: Mutex::new(vec![0; rule.upstreams.len()]),
        })
    }

    /// Whether health checks or traffic last marked the upstream up (what metrics
    /// show); [`Upstreams::is_up`] also lets a passively failed one take a trial.
    /// Connections open to upstream `i` or connecting.
    pub fn open(&self, i: usize) -> usize {
        self.list[i].health.active.load(Ordering::Relaxed)
    }

    pub fn marked_up(&self, i: usize) -> bool {
        self.list[i].health.up.load(Ordering::Relaxed)
    }

    pub fn is_up(&self, i: usize) -> bool {
        let h = &self.list[i].health;
        h.up.load(Ordering::Relaxed) || (self.trial_due(h) && !h.trial.load(Ordering::Relaxed))
    }

    /// A passively downed upstream has been down long enough for a trial connection.
    fn trial_due(&self, h: &Health) -> bool {
        !self.active_checks
            && !h.up.load(Ordering::Relaxed)
            && h.down_since
                .lock()
                .unwrap()
                .is_some_and(|t| t.elapsed() >= PASSIVE_RETRY)
    }

    /// Whether upstream `i` is below its `max_connections`, if it has one.
    fn has_room(&self, i: usize) -> bool {
        let u = &self.list[i];
        u.cfg
            .max_connections
            .is_none_or(|max| u.health.active.load(Ordering::Relaxed) < max)
    }

    /// [`Upstreams::attempt`], unless upstream `i` is at its `max_connections`: the
    /// count is taken only below it, so clients racing for the last slot cannot both
    /// have it.
    pub fn try_attempt(&self, i: usize) -> Option<Attempt> {
        let Some(max) = self.list[i].cfg.max_connections else {
            return Some(self.attempt(i));
        };
        let active = &self.list[i].health.active;
        active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(self.counted(i))
    }

    /// Starts a connect to upstream `i` (from [`Upstreams::order`]): the downed
    /// upstream's trial if one is due and no other client makes it now. (While one
    /// does, `order` puts the upstream last, as any downed one: tried only as a last
    /// resort, when every healthy one failed, or there is none.)
    pub fn attempt(&self, i: usize) -> Attempt {
        self.list[i].health.active.fetch_add(1, Ordering::Relaxed);
        self.counted(i)
    }

    /// The [`Attempt`] of a connect to upstream `i` already counted in its `active`.
    fn counted(&self, i: usize) -> Attempt {
        let health = &self.list[i].health;
        let trial = self.trial_due(health)
            && health
                .trial
                .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        Attempt {
            health: health.clone(),
            trial,
        }
    }

    /// The upstreams to try for this client, best first.
    pub fn order(&self, client: IpAddr) -> Vec<usize> {
        let n = self.list.len();
        // One list per connection, built in place: the healthy primaries (or, with none,
        // the healthy backups) are the balancer's candidates.
        let primary_up = (0..n).any(|i| !self.list[i].cfg.backup && self.is_up(i));
        // Sized exactly: a `collect` here (capacity 4) cost 90-130 B of RSS per idle
        // pair (its freed chunk fragments the heap the pair's long-lived allocations use).
        let mut order = Vec::with_capacity(n);
        // (Those at their max_connections are passed over, as later in the order.)
        order.extend((0..n).filter(|&i| {
            self.list[i].cfg.backup != primary_up && self.is_up(i) && self.has_room(i)
        }));
        let first = self.pick(&order, client);
        order.clear();
        if let Some(first) = first {
            order.push(first);
        }
        // The rest: healthy primaries, healthy backups, then the ones marked down.
        let rest = |backup: bool, healthy: bool| {
            (0..self.list.len())
                .filter(move |&i| self.list[i].cfg.backup == backup && self.is_up(i) == healthy)
        };
        for i in rest(false, true)
            .chain(rest(true, true))
            .chain(rest(false, false))
            .chain(rest(true, false))
        {
            if !order.contains(&i) {
                order.push(i);
            }
        }
        if self.balance == Balance::SourceHash {
            // Keep failover consistent too: a source's next choice is its next-best score.
            let healthy = order.iter().take_while(|&&i| self.is_up(i)).count();
            order[..healthy]
                .sort_by(|&a, &b| self.score(client, a).total_cmp(&self.score(client, b)));
        }
        order
    }

    fn pick(&self, candidates: &[usize], client: IpAddr) -> Option<usize> {
        let weight = |i: usize| self.list[i].cfg.weight as u64;
        let load = |i: usize| self.list[i].health.active.load(Ordering::Relaxed) as u64;
        match (self.balance, candidates) {
            (_, []) => None,
            (_, [only]) => Some(*only),
            (Balance::First, c) => c.first().copied(),
            (Balance::RoundRobin, c) => self.smooth_round_robin(c.iter().copied()),
            // Fewest open connections per unit of weight; ties go weighted round robin,
            // as nginx's do (short connections all tie at 0 open: a plain pick among
            // them spread 3:1:1 weights 1:1:1).
            (Balance::LeastConn, c) => {
                let fewest = c
                    .iter()
                    .copied()
                    .min_by(|&a, &b| (load(a) * weight(b)).cmp(&(load(b) * weight(a))))?;
                let tied = move |&i: &usize| load(i) * weight(fewest) == load(fewest) * weight(i);
                self.smooth_round_robin(c.iter().copied().filter(tied))
            }
            (Balance::Random, c) => {
                let total: u64 = c.iter().map(|&i| weight(i)).sum();
                let draw = || {
                    let mut x = fastrand::u64(..total);
                    for &i in c {
                        if x < weight(i) {
                            return i;
                        }
                        x -= weight(i);
                    }
                    c[c.len() - 1]
                };
                let (a, b) = (draw(), draw());
                Some(if load(b) * weight(a) < load(a) * weight(b) {
                    b
                } else {
                    a
                })
            }
            (Balance::SourceHash, c) => c
                .iter()
                .copied()
                .min_by(|&a, &b| self.score(client, a).total_cmp(&self.score(client, b))),
        }
    }

    /// Smooth weighted round robin (nginx's) over `candidates`: each gains its weight,
    /// the richest is picked and pays the total.
    fn smooth_round_robin(&self, candidates: impl Iterator<Item = usize> + Clone) -> Option<usize> {
        let weight = |i: usize| self.list[i].cfg.weight as i64;
        let mut rr = self.rr.lock().unwrap();
        let total: i64 = candidates.clone().map(weight).sum();
        for i in candidates.clone() {
            rr[i] += weight(i);
        }
        let best = candidates.max_by_key(|&i| (rr[i], std::cmp::Reverse(i)))?;
        rr[best] -= total;
        Some(best)
    }

    /// Weighted rendezvous hashing: the lowest score wins. Adding or removing an
    /// upstream only moves the clients whose best score it has or had.
    fn score(&self, client: IpAddr, i: usize) -> f64 {
        let mut h = std::hash::DefaultHasher::new();
        client.to_canonical().hash(&mut h);
        self.list[i].cfg.addr.hash(&mut h);
        // Map to (0, 1], then -ln(u)/w is exponentially distributed with rate w.
        let u = ((h.finish() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        -u.ln() / self.list[i].cfg.weight as f64
    }

    /// Records a connect's result; returns the new state when it changed.
    pub fn report_connect(&self, i: usize, attempt: &mut Attempt, ok: bool) -> Option<bool> {
        let changed = self.record(i, ok, attempt.is_trial());
        attempt.end_trial();
        changed
    }

    /// Records a check's result; returns the new state when it changed.
    pub fn report(&self, i: usize, ok: bool) -> Option<bool> {
        self.record(i, ok, false)
    }

    fn record(&self, i: usize, ok: bool, trial: bool) -> Option<bool> {
        let u = &self.list[i];
        let was_up = u.health.up.load(Ordering::Relaxed);
        if ok {
            u.health.failures.store(0, Ordering::Relaxed);
            if was_up {
                return None;
            }
            // A passive trial that worked is as good as `rise` checks.
            if trial || u.health.successes.fetch_add(1, Ordering::Relaxed) + 1 >= self.rise {
                u.health.successes.store(0, Ordering::Relaxed);
                u.health.up.store(true, Ordering::Relaxed);
                *u.health.down_since.lock().unwrap() = None;
                return Some(true);
            }
        } else {
            u.health.successes.store(0, Ordering::Relaxed);
            if trial {
                *u.health.down_since.lock().unwrap() = Some(Instant::now());
            }
            if was_up && u.health.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.fall {
                u.health.failures.store(0, Ordering::Relaxed);
                u.health.up.store(false, Ordering::Relaxed);
                *u.health.down_since.lock().unwrap() = Some(Instant::now());
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstreams(balance: &str, list: &str) -> Arc<Upstreams> {
        let c = Config::from_toml(&format!(
            "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = {list}\nbalance = \"{balance}\"\nrise = 2\nfall = 2\ncheck_interval = \"1s\"\n"
        ))
        .unwrap();
        Upstreams::new(&c.rules[0], None)
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from((0x7f00_0000u32 + n).to_be_bytes())
    }

    fn counts(u: &Upstreams, n: u32) -> Vec<usize> {
        let mut c = vec![0; u.list.len()];
        for k in 0..n {
            c[u.order(ip(k))[0]] += 1;
        }
        c
    }

    #[test]
    fn round_robin_with_weights() {
        let u = upstreams("round_robin", r#"["a:1", "b:1", "c:1"]"#);
        assert_eq!(counts(&u, 300), vec![100, 100, 100]);
        let u = upstreams("round_robin", r#"[{ addr = "a:1", weight = 3 }, "b:1"]"#);
        assert_eq!(counts(&u, 400), vec![300, 100]);
        // Smooth: never three of the same in a row out of weight 2:1.
        let u = upstreams("round_robin", r#"[{ addr = "a:1", weight = 2 }, "b:1"]"#);
        let seq: Vec<usize> = (0..6).map(|k| u.order(ip(k))[0]).collect();
        assert_eq!(seq, vec![0, 1, 0, 0, 1, 0]);
    }

    #[test]
    fn least_conn_ties_follow_the_weights() {
        let u = upstreams(
            "least_conn",
            r#"[{ addr = "a:1", weight = 3 }, "b:1", "c:1"]"#,
        );
        assert_eq!(counts(&u, 300), vec![180, 60, 60]);
    }

    #[test]
    fn an_upstream_at_its_max_connections_is_passed_over() {
        let u = upstreams("first", r#"[{ addr = "a:1", max_connections = 2 }, "b:1"]"#);
        let ip = "10.0.0.1".parse().unwrap();
        let held: Vec<Attempt> = (0..2).map(|_| u.try_attempt(0).unwrap()).collect();
        assert!(u.try_attempt(0).is_none(), "a third connection to a:1");
        assert_eq!(u.order(ip)[0], 1, "b:1 first while a:1 is full");
        drop(held);
        assert_eq!(u.order(ip)[0], 0);
        // Many at once never take more than the limit.
        let taken: Vec<Attempt> = (0..10).filter_map(|_| u.try_attempt(0)).collect();
        assert_eq!(taken.len(), 2);
    }

    #[test]
    fn least_conn_and_random_follow_load() {
        for balance in ["least_conn", "random"] {
            let u = upstreams(balance, r#"["a:1", "b:1"]"#);
            let _busy: Vec<Attempt> = (0..10).map(|_| u.attempt(0)).collect();
            let c = counts(&u, 100);
            assert!(c[1] > 60, "{balance}: {c:?}");
        }
    }

    #[test]
    fn source_hash_sticky_and_consistent() {
        let three = upstreams("source_hash", r#"["a:1", "b:1", "c:1"]"#);
        let two = upstreams("source_hash", r#"["a:1", "b:1"]"#);
        let mut moved = 0;
        for k in 0..1000 {
            let first = three.order(ip(k))[0];
            assert_eq!(first, three.order(ip(k))[0]);
            let now = two.order(ip(k))[0];
            if first != 2 {
                assert_eq!(first, now, "client {k} moved although its upstream stayed");
            } else {
                moved += 1;
            }
        }
        assert!((250..420).contains(&moved), "{moved}");
    }

    #[test]
    fn health_rise_fall_and_backups() {
        let u = upstreams(
            "round_robin",
            r#"["a:1", "b:1", { addr = "c:1", backup = true }]"#,
        );
        assert_eq!(u.report(0, false), None);
        assert_eq!(u.report(0, false), Some(false));
        assert!((0..10).all(|k| u.order(ip(k))[0] == 1));
        assert_eq!(u.order(ip(0)), vec![1, 2, 0]);
        u.report(1, false);
        u.report(1, false);
        assert_eq!(u.order(ip(0)), vec![2, 0, 1]);
        assert_eq!(u.report(0, true), None);
        assert_eq!(u.report(0, true), Some(true));
        assert_eq!(u.order(ip(0))[0], 0);
    }

    /// Passive detection only (no `check_interval`), `fall = 1`.
    fn passive(balance: &str, list: &str, before: Option<&Upstreams>) -> Arc<Upstreams> {
        let c = Config::from_toml(&format!(
            "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = {list}\nbalance = \"{balance}\"\nfall = 1\n"
        ))
        .unwrap();
        Upstreams::new(&c.rules[0], before)
    }

    /// least_conn counts a connection from its attempt on: a burst of clients while
    /// the first connect is still under way does not all go to that upstream (a slow
    /// one drew them all); and a reload's new runtime counts the kept upstreams'
    /// connections too.
    #[test]
    fn least_conn_counts_connects_under_way_and_across_a_reload() {
        let u = passive("least_conn", r#"["a:1", "b:1"]"#, None);
        let mut held = Vec::new();
        for k in 0..6 {
            let first = u.order(ip(k))[0];
            held.push((first, u.attempt(first)));
        }
        let on_a = held.iter().filter(|(i, _)| *i == 0).count();
        assert_eq!(on_a, 3, "6 attempts under way split {on_a}/{}", 6 - on_a);
        // A reload adds c: the next three go to it, a and b still have three each.
        let v = passive("least_conn", r#"["a:1", "b:1", "c:1"]"#, Some(&u));
        let next: Vec<usize> = (0..3)
            .map(|k| {
                let first = v.order(ip(k))[0];
                held.push((first, v.attempt(first)));
                first
            })
            .collect();
        assert_eq!(next, [2, 2, 2]);
    }

    /// A passively downed upstream's trial is one connection: while it is under way,
    /// other clients are not sent there (each waited connect_timeout on it); a trial
    /// that works brings it back at once, one that fails starts the wait again.
    #[test]
    fn a_passive_trial_is_one_connection() {
        let u = passive("first", r#"["a:1", "b:1"]"#, None);
        let mut first = u.attempt(0);
        assert_eq!(u.report_connect(0, &mut first, false), Some(false));
        drop(first);
        assert_eq!(u.order(ip(0)), vec![1, 0]);
        let due = Instant::now() - PASSIVE_RETRY - Duration::from_secs(1);
        *u.list[0].health.down_since.lock().unwrap() = Some(due);
        assert_eq!(u.order(ip(0))[0], 0, "the trial is due");
        let mut trial = u.attempt(0);
        assert!(trial.is_trial());
        assert_eq!(
            u.order(ip(1)),
            vec![1, 0],
            "a second client during the trial"
        );
        assert!(
            !u.attempt(0).is_trial(),
            "a second trial at once (a last resort only)"
        );
        // Failed: down again for PASSIVE_RETRY.
        assert_eq!(u.report_connect(0, &mut trial, false), None);
        drop(trial);
        assert_eq!(u.order(ip(2)), vec![1, 0]);
        let mut again = u.attempt(0);
        assert!(!again.is_trial(), "a last resort, not a trial");
        drop(again);
        *u.list[0].health.down_since.lock().unwrap() = Some(due);
        again = u.attempt(0);
        assert!(again.is_trial());
        // A trial given up (the client went away) lets the next client make one.
        drop(again);
        let mut next = u.attempt(0);
        assert!(next.is_trial());
        assert_eq!(u.report_connect(0, &mut next, true), Some(true));
        assert_eq!(u.order(ip(3))[0], 0);
    }
}
