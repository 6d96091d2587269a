//! `deny_pattern`: byte regexes tested against the start of the client's stream as it
//! arrives. A lazy DFA over all patterns is stepped byte by byte, so each decision is
//! made as early as it can be: a match (deny), or a dead state (no pattern can match
//! any more: release the held bytes and stop looking). Until then the bytes are held
//! back, so none of a match reaches the upstream even when it arrives in pieces.

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::hybrid::LazyStateID;
use regex_automata::{Anchored, Input};

/// The compiled patterns of a rule (shared by its connections).
#[derive(Debug)]
pub struct DenyPatterns(DFA);

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
    /// Same syntax as `regex::bytes::Regex` (Unicode classes, but any byte may match).
    pub fn new(patterns: &[String]) -> Result<DenyPatterns, String> {
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        Ok(DenyPatterns(super::lazy_dfa(&patterns)?))
    }

    pub fn scanner(&self) -> Scanner<'_> {
        let mut cache = self.0.create_cache();
        let input = Input::new(&[] as &[u8]);
        let state = self.0.start_state_forward(&mut cache, &input).ok();
        let at_start = self
            .0
            .start_state_forward(&mut cache, &input.anchored(Anchored::Yes))
            .ok();
        Scanner {
            dfa: &self.0,
            cache,
            state,
            at_start,
        }
    }
}

/// One connection's position in the DFA.
pub struct Scanner<'a> {
    dfa: &'a DFA,
    cache: Cache,
    /// `None` once the DFA gave up (cache thrashing): decided as [`Verdict::Clear`].
    state: Option<LazyStateID>,
    /// The same patterns anchored at the stream's first byte: `None` once no match
    /// can start there (every pattern anchored with `^` is then decided).
    at_start: Option<LazyStateID>,
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
            if let Some(a) = self.at_start {
                // A match from the first byte shows in `sid` too: only its end matters.
                self.at_start = self
                    .dfa
                    .next_state(&mut self.cache, a, b)
                    .ok()
                    .filter(|s| !s.is_dead());
            }
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

    /// Whether a match starting at the stream's first byte is still possible: then
    /// the bytes so far may be the beginning of one and are held for as long as that
    /// holds (a pattern that can only match further in holds them a while only).
    pub fn may_match_from_start(&self) -> bool {
        self.state.is_some() && self.at_start.is_some()
    }

    /// Where in `held` (the bytes fed but not passed on yet, `behind` the last byte
    /// passed on before them) the first match could still begin: the bytes before it
    /// can begin none and may go on while the patterns keep looking (`evil` holds
    /// `ev` of `GET /ev`, not `GET /`). `held.len()` if no match can begin in it.
    pub fn first_possible_start(&mut self, behind: Option<u8>, held: &[u8]) -> usize {
        if self.state.is_none() {
            return held.len();
        }
        // The byte before as look-behind, for `^`, `(?m)^` and `(?-u:\b)`.
        let buf: Vec<u8> = behind.into_iter().chain(held.iter().copied()).collect();
        let skip = buf.len() - held.len();
        for start in skip..buf.len() {
            let input = Input::new(&buf).range(start..).anchored(Anchored::Yes);
            let Ok(mut sid) = self.dfa.start_state_forward(&mut self.cache, &input) else {
                // The DFA gave up: hold the rest, as an undecided pattern would.
                return start - skip;
            };
            for &b in &buf[start..] {
                match self.dfa.next_state(&mut self.cache, sid, b) {
                    Ok(s) => sid = s,
                    Err(_) => return start - skip,
                }
                if sid.is_dead() {
                    break;
                }
            }
            if !sid.is_dead() {
                return start - skip;
            }
        }
        held.len()
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
        assert_eq!(s.first_possible_start(None, b"GET /"), 5);
        assert_eq!(s.feed(b"ev"), Verdict::Undecided);
        assert_eq!(s.first_possible_start(Some(b'/'), b"ev"), 0);
        assert_eq!(s.first_possible_start(None, b"GET /ev"), 5);
        // `x` after a word byte may begin `\Bxy`, after `/` it may not.
        assert_eq!(s.first_possible_start(Some(b'a'), b"x"), 0);
        assert_eq!(s.first_possible_start(Some(b'/'), b"x"), 1);
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
        let mut s = d.scanner();
        assert_eq!(s.feed(b"ev"), Verdict::Undecided);
        assert!(s.may_match_from_start(), "ev may begin evil at the start");
    }
}
