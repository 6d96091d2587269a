//! `deny_pattern`: byte regexes tested against the start of the client's stream as it
//! arrives. A lazy DFA over all patterns is stepped byte by byte, so each decision is
//! made as early as it can be: a match (deny), or a dead state (no pattern can match
//! any more: release the held bytes and stop looking). Until then the bytes that may
//! begin a match are held back, so none of a match reaches the upstream even when it
//! arrives in pieces; those that can begin none go on at once.

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::hybrid::LazyStateID;
use regex_automata::util::start;
use regex_automata::{Anchored, Input};

/// The compiled patterns of a rule (shared by its connections).
#[derive(Debug)]
pub struct DenyPatterns {
    all: DFA,
    /// Only the patterns anchored at the stream's start (`^SSH-`), if any: what may
    /// begin one of those is held until decided, not for the 1 s that bytes which may
    /// begin an unanchored match (`evil`) are.
    anchored: Option<DFA>,
}

/// What one connection's bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A pattern matched: refuse.
    Deny,
    /// No pattern can match any more.
    Clear,
    /// Could still go either way: hold the bytes.
    Undecided,
}

impl DenyPatterns {
    /// Patterns over bytes (see `inspect::syntax`).
    pub fn new(patterns: &[String]) -> Result<DenyPatterns, String> {
        let all: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let mut anchored = Vec::new();
        for p in &all {
            let hir = super::parse_pattern(p)?;
            if hir
                .properties()
                .look_set_prefix()
                .contains(regex_syntax::hir::Look::Start)
            {
                anchored.push(*p);
            }
        }
        Ok(DenyPatterns {
            all: super::lazy_dfa(&all)?,
            anchored: match anchored.is_empty() {
                true => None,
                false => Some(super::lazy_dfa(&anchored)?),
            },
        })
    }

    pub fn scanner(&self) -> Scanner<'_> {
        let mut cache = self.all.create_cache();
        let input = Input::new(&[] as &[u8]);
        let state = self.all.start_state_forward(&mut cache, &input).ok();
        let at_start = self.anchored.as_ref().and_then(|dfa| {
            let mut cache = dfa.create_cache();
            let sid = dfa
                .start_state_forward(&mut cache, &input.clone().anchored(Anchored::Yes))
                .ok()?;
            Some(AtStart { dfa, cache, sid })
        });
        Scanner {
            dfa: &self.all,
            cache,
            state,
            at_start,
            fed: 0,
            prev: None,
            probes: Vec::new(),
            probes_lost: false,
        }
    }
}

/// The anchored patterns stepped from the stream's first byte.
struct AtStart<'a> {
    dfa: &'a DFA,
    cache: Cache,
    sid: LazyStateID,
}

/// One connection's position in the DFA.
pub struct Scanner<'a> {
    dfa: &'a DFA,
    cache: Cache,
    /// `None` once the DFA gave up (cache thrashing): decided as [`Verdict::Clear`].
    state: Option<LazyStateID>,
    /// `None` once no pattern anchored with `^` can match (or there is none).
    at_start: Option<AtStart<'a>>,
    /// Bytes fed so far, and the last of them (look-behind for a match starting next).
    fed: u64,
    prev: Option<u8>,
    /// Where a match could still begin: (stream offset, anchored DFA state after the
    /// bytes from there), oldest first, one per state (two starts in the same state
    /// have the same future: the older one stands for both). Stepped with each byte,
    /// so finding the first possible start costs nothing extra (walking every held
    /// start again on each read was quadratic: 2 s of CPU for 126 KB).
    probes: Vec<(u64, LazyStateID)>,
    /// The DFA gave up on a probe: hold everything (the 1 s hold still applies).
    probes_lost: bool,
}

impl Scanner<'_> {
    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) -> Verdict {
        let Some(mut sid) = self.state else {
            return Verdict::Clear;
        };
        for &b in bytes {
            sid = match self.dfa.next_state(&mut self.cache, sid, b) {
                Ok(s) => s,
                Err(_) => return self.give_up(),
            };
            if let Some(a) = &mut self.at_start {
                // A match from the first byte shows in `sid` too: only its end matters.
                match a.dfa.next_state(&mut a.cache, a.sid, b) {
                    Ok(s) if !s.is_dead() => a.sid = s,
                    _ => self.at_start = None,
                }
            }
            self.step_probes(b);
            // Match states are entered one byte after the match ends.
            if sid.is_match() {
                return Verdict::Deny;
            }
            if sid.is_dead() {
                self.state = None;
                return Verdict::Clear;
            }
        }
        self.state = Some(sid);
        // A match ending exactly at the last byte so far.
        match self.dfa.next_eoi_state(&mut self.cache, sid) {
            Ok(eoi) if eoi.is_match() => Verdict::Deny,
            Ok(_) => Verdict::Undecided,
            Err(_) => self.give_up(),
        }
    }

    /// For a stream whose bytes all wait until a decision anyway (an `http_auth` rule
    /// holds the whole request): no probe is stepped, and nothing is said to be free.
    pub fn holding_all(mut self) -> Self {
        self.probes_lost = true;
        self
    }

    /// A match may begin at this byte: a probe joins, then every probe takes the byte.
    fn step_probes(&mut self, b: u8) {
        if !self.probes_lost {
            let config = start::Config::new()
                .anchored(Anchored::Yes)
                .look_behind(self.prev);
            match self.dfa.start_state(&mut self.cache, &config) {
                Ok(sid) => self.probes.push((self.fed, sid)),
                Err(_) => self.probes_lost = true,
            }
            // Filtered in place (this runs for every byte): the first `kept` entries
            // are the live probes so far.
            let mut kept = 0;
            for i in 0..self.probes.len() {
                let (at, sid) = self.probes[i];
                match self.dfa.next_state(&mut self.cache, sid, b) {
                    Ok(next) if next.is_dead() => {}
                    Ok(next) if self.probes[..kept].iter().any(|&(_, k)| k == next) => {}
                    Ok(next) => {
                        self.probes[kept] = (at, next);
                        kept += 1;
                    }
                    Err(_) => {
                        self.probes_lost = true;
                        break;
                    }
                }
            }
            self.probes.truncate(kept);
        }
        self.prev = Some(b);
        self.fed += 1;
    }

    /// Of the last `held` bytes fed (those not passed on yet), how many come before
    /// the first place a match could still begin: they can begin none and may go on
    /// while the patterns keep looking (`evil` holds `ev` of `GET /ev`, not `GET /`).
    pub fn first_possible_start(&self, held: usize) -> usize {
        if self.state.is_none() {
            return held;
        }
        if self.probes_lost {
            return 0;
        }
        let base = self.fed.saturating_sub(held as u64);
        match self.probes.first() {
            Some(&(at, _)) => (at.saturating_sub(base) as usize).min(held),
            None => held,
        }
    }

    /// Whether a match of a pattern anchored with `^` is still possible: then the
    /// bytes so far may be the beginning of one and are held for as long as that
    /// holds (a pattern that can only match further in holds them a while only).
    pub fn may_match_from_start(&self) -> bool {
        self.state.is_some() && self.at_start.is_some()
    }

    fn give_up(&mut self) -> Verdict {
        self.state = None;
        self.at_start = None;
        Verdict::Clear
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(patterns: &[&str], chunks: &[&[u8]]) -> Vec<Verdict> {
        let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        let d = DenyPatterns::new(&p).unwrap();
        let mut s = d.scanner();
        chunks.iter().map(|c| s.feed(c)).collect()
    }

    #[test]
    fn decides_as_early_as_possible() {
        use Verdict::*;
        let p = &["^SSH-", r"^\x16\x03"];
        assert_eq!(run(p, &[b"SS", b"H-2.0"]), vec![Undecided, Deny]);
        assert_eq!(run(p, &[b"GET / HTTP/1.1\r\n"]), vec![Clear]);
        assert_eq!(run(p, &[b"S", b"X"]), vec![Undecided, Clear]);
        assert_eq!(run(p, &[b"\x16", b"\x03\x01"]), vec![Undecided, Deny]);
        // Unanchored: a match may start anywhere, so it never clears early.
        assert_eq!(
            run(&["evil"], &[b"a good ev", b"il"]),
            vec![Undecided, Deny]
        );
    }

    #[test]
    fn only_a_possible_match_is_held() {
        let p: Vec<String> = ["evil", "(?-u:\\B)xy", "^SSH-"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let d = DenyPatterns::new(&p).unwrap();
        let mut s = d.scanner();
        assert_eq!(s.feed(b"GET /"), Verdict::Undecided);
        // `GET /` can begin no match once it is not the start of `SSH-`.
        assert_eq!(s.first_possible_start(5), 5);
        assert_eq!(s.feed(b"ev"), Verdict::Undecided);
        assert_eq!(s.first_possible_start(2), 0);
        assert_eq!(s.first_possible_start(7), 5);
        // `x` after a word byte may begin `\Bxy`, after `/` it may not.
        let mut s = d.scanner();
        assert_eq!(s.feed(b"ax"), Verdict::Undecided);
        assert_eq!(s.first_possible_start(1), 0);
        let mut s = d.scanner();
        assert_eq!(s.feed(b"/x"), Verdict::Undecided);
        assert_eq!(s.first_possible_start(1), 1);
        // Overlapping beginnings: of `aaab` under `aab`, the first `a` can go.
        let p: Vec<String> = vec!["aab".into()];
        let d = DenyPatterns::new(&p).unwrap();
        let mut s = d.scanner();
        assert_eq!(s.feed(b"aaa"), Verdict::Undecided);
        assert_eq!(s.first_possible_start(3), 1);
        assert_eq!(s.feed(b"b"), Verdict::Deny);
    }

    #[test]
    fn many_live_starts_cost_linear_time() {
        // Every `select ` may begin a match until the newline kills them all at once.
        let p: Vec<String> = vec!["(?i)select.*outfile".into()];
        let d = DenyPatterns::new(&p).unwrap();
        let mut s = d.scanner();
        let t = std::time::Instant::now();
        for _ in 0..18_000 {
            assert_eq!(s.feed(b"select "), Verdict::Undecided);
            assert_eq!(s.first_possible_start(7), 0);
        }
        assert_eq!(s.feed(b"\n"), Verdict::Undecided);
        assert_eq!(s.first_possible_start(1), 1);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn knows_when_a_match_from_the_start_is_still_possible() {
        let p: Vec<String> = ["^SSH-", "evil"].iter().map(|s| s.to_string()).collect();
        let d = DenyPatterns::new(&p).unwrap();
        let mut s = d.scanner();
        assert!(s.may_match_from_start());
        assert_eq!(s.feed(b"SS"), Verdict::Undecided);
        assert!(s.may_match_from_start(), "SS may begin SSH-");
        assert_eq!(s.feed(b"X ev"), Verdict::Undecided);
        assert!(!s.may_match_from_start(), "only `evil` further in is left");
        // `evil` is not anchored: its beginning at the stream's start is held a while
        // only, as anywhere else (it was held until decided, without a limit).
        let mut s = d.scanner();
        assert_eq!(s.feed(b"ev"), Verdict::Undecided);
        assert!(!s.may_match_from_start(), "ev of evil at the start");
        assert_eq!(s.first_possible_start(2), 0);
    }

    #[test]
    fn holding_all_steps_no_probe_and_still_decides() {
        let p: Vec<String> = ["evil"].iter().map(|s| s.to_string()).collect();
        let d = DenyPatterns::new(&p).unwrap();
        let mut s = d.scanner().holding_all();
        assert_eq!(s.feed(b"GET /e"), Verdict::Undecided);
        assert!(s.probes.is_empty());
        assert_eq!(s.first_possible_start(6), 0);
        assert_eq!(s.feed(b"vil"), Verdict::Deny);
    }
}
