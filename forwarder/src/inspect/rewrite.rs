//! `rewrite`: regex replacement over a whole stream, matches allowed to span reads.
//!
//! Only bytes that could still begin a match are held back: for each position of the
//! last `max_match` bytes, an anchored lazy DFA says whether a match starting there
//! could still complete with more bytes. Everything before the first such position is
//! final, replaced and passed on; a request whose tail cannot be part of a match goes
//! on at once (a request/response protocol must not wait for bytes that never come).
//! A held tail goes on anyway after [`HOLD_MAX`] without more bytes ([`Rewriter::flush`]).
//!
//! Assertions see the stream, not the read. Before what it holds, a rule keeps the
//! last byte it passed on (`LOOK_BEHIND`) and searches start after it, so `^`, `\A`,
//! `(?m)^` and `\b` see what came before (the stream starts only once). At the end of
//! what it has, the regex takes the end for the stream's end (`$`, `\z`, `\b`): that
//! is right at EOF, and before it the hold keeps every match that more bytes could
//! change (`foo$` waits); what goes on without the rest (a flush, or past `max_match`)
//! is replaced up to its end only if the match stands whatever follows.

use std::sync::Arc;
use std::time::Duration;

use regex::bytes::Regex;
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::hybrid::LazyStateID;
use regex_automata::util::pool::Pool;
use regex_automata::{Anchored, Input};

use crate::config::{Direction, Rewrite};

/// How long a possible match's beginning waits for the rest.
pub const HOLD_MAX: Duration = Duration::from_secs(1);

/// The bytes before a position that the assertions at it look at: one, for line
/// anchors and ASCII word boundaries (the Unicode `\b`, which looks further, cannot
/// be checked as bytes arrive and is a config error, `inspect::lazy_dfa`).
const LOOK_BEHIND: usize = 1;

pub struct Rewriter {
    rules: Vec<Rule>,
    max_match: usize,
}

/// A `rewrite` entry compiled, shared by every pair of its rule. Nothing of it is a
/// pair's own: a cloned regex gets a search-cache pool of its own (1.4 KB), and a lazy
/// DFA with its cache another 1.9 KB, all held by each pair while it idles.
pub struct Compiled {
    pub re: Regex,
    pub replace: Vec<u8>,
    /// The same pattern, for "could a match start here?".
    dfa: DFA,
    /// The DFA's caches: a step takes one and gives it back (no step waits), so there
    /// are at most as many as steps at once, one per worker thread, and what one pair
    /// taught the DFA serves the next. regex's own pool: the first thread to use it
    /// takes no lock.
    caches: Pool<Cache, CacheFn>,
}

type CacheFn = Box<dyn Fn() -> Cache + Send + Sync>;

impl Compiled {
    pub fn new(re: Regex, dfa: DFA, replace: Vec<u8>) -> Compiled {
        let for_caches = dfa.clone();
        Compiled {
            re,
            replace,
            dfa,
            caches: Pool::new(Box::new(move || for_caches.create_cache())),
        }
    }
}

struct Rule {
    compiled: Arc<Compiled>,
    held: Held,
}

/// A rule's bytes of one stream.
#[derive(Default)]
struct Held {
    /// The last [`LOOK_BEHIND`] bytes passed on (fewer at the stream's start), then
    /// those held back.
    buf: Vec<u8>,
    /// How many of `buf`'s first bytes were passed on (look-behind only).
    passed: usize,
}

/// Where the bytes a rule has end, for one step.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// More may come: what could begin a match waits for it.
    Open,
    /// More may come but nothing waits (a flush): everything goes on, and the end is
    /// not the stream's (`$` does not match there).
    Cut,
    /// The stream's end.
    Eof,
}

impl Rewriter {
    /// The rules of one direction, applied in order (each to the previous one's output).
    pub fn new(rules: &[&Rewrite], max_match: usize) -> Rewriter {
        let rules = rules
            .iter()
            .map(|r| Rule {
                compiled: r.compiled.clone(),
                held: Held::default(),
            })
            .collect();
        Rewriter { rules, max_match }
    }

    /// A rule's rewriters, [to_upstream, to_client] (either may have no rules).
    pub fn for_rule(rule: &crate::config::Rule) -> [Rewriter; 2] {
        [Direction::ToUpstream, Direction::ToClient].map(|direction| {
            let rules: Vec<_> = rule
                .rewrite
                .iter()
                .filter(|r| r.direction == direction)
                .collect();
            Rewriter::new(&rules, rule.max_match)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether bytes are held back waiting to see if they begin a match.
    pub fn holding(&self) -> bool {
        self.rules.iter().any(|r| r.held.buf.len() > r.held.passed)
    }

    /// The next bytes of the stream in; what may be passed on out. `eof`: the stream
    /// ends after `data`, so everything held is final.
    pub fn push(&mut self, data: &[u8], eof: bool) -> Vec<u8> {
        self.run(data, if eof { End::Eof } else { End::Open })
    }

    /// Gives up waiting: everything held goes on (the stream continues, so this is
    /// not its end for `$`).
    pub fn flush(&mut self) -> Vec<u8> {
        self.run(&[], End::Cut)
    }

    fn run(&mut self, data: &[u8], end: End) -> Vec<u8> {
        let mut out = data.to_vec();
        for rule in &mut self.rules {
            rule.held.buf.extend_from_slice(&out);
            out = rule.step(self.max_match, end);
        }
        out
    }
}

impl Rule {
    fn step(&mut self, max_match: usize, end: End) -> Vec<u8> {
        let mut cache = self.compiled.caches.get();
        self.held.step(&self.compiled, &mut cache, max_match, end)
    }
}

impl Held {
    fn step(&mut self, c: &Compiled, cache: &mut Cache, max_match: usize, end: End) -> Vec<u8> {
        let len = self.buf.len();
        let commit = match end {
            End::Open => self.first_possible_start(&c.dfa, cache, max_match),
            End::Cut | End::Eof => len,
        };
        let mut out = Vec::with_capacity(len - self.passed);
        // As `captures_iter`, but from after the look-behind bytes, which the regex
        // sees (`captures_at`) but never matches again.
        let (mut last, mut at) = (self.passed, self.passed);
        while at <= len {
            let Some(caps) = c.re.captures_at(&self.buf, at) else {
                break;
            };
            let m = caps.get(0).expect("group 0 always matches");
            if m.start() >= commit {
                break;
            }
            if m.is_empty() {
                at = m.end() + 1;
                continue;
            }
            // Up to the end of what there is, before EOF: the regex took that end
            // for the stream's, so the match holds only if it needs nothing of it.
            if m.end() == len
                && end != End::Eof
                && !stands_whatever_follows(&c.dfa, cache, &self.buf, m.start())
            {
                break;
            }
            out.extend_from_slice(&self.buf[last..m.start()]);
            caps.expand(&c.replace, &mut out);
            (last, at) = (m.end(), m.end());
        }
        let keep_from = commit.max(last);
        out.extend_from_slice(&self.buf[last..keep_from]);
        self.passed = keep_from.min(LOOK_BEHIND);
        self.buf.drain(..keep_from - self.passed);
        out
    }

    /// The first position (within the last `max_match` bytes) where a match could
    /// begin and still be unfinished, or complete but longer with more bytes; the
    /// end when there is none.
    fn first_possible_start(&self, dfa: &DFA, cache: &mut Cache, max_match: usize) -> usize {
        let len = self.buf.len();
        for i in len.saturating_sub(max_match).max(self.passed)..len {
            let Some(sid) = walk(dfa, cache, &self.buf, i) else {
                return i;
            };
            if !sid.is_dead() && !settled(dfa, cache, sid) {
                return i;
            }
        }
        len
    }
}

/// The anchored DFA's state after `buf[start..]` (dead once no match can come), the
/// bytes before `start` as look-behind; `None` if the DFA gives up.
fn walk(dfa: &DFA, cache: &mut Cache, buf: &[u8], start: usize) -> Option<LazyStateID> {
    let input = Input::new(buf).range(start..).anchored(Anchored::Yes);
    let mut sid = dfa.start_state_forward(cache, &input).ok()?;
    for &b in &buf[start..] {
        sid = dfa.next_state(cache, sid, b).ok()?;
        if sid.is_dead() {
            break;
        }
    }
    Some(sid)
}

/// Whether the match from a position is final, `sid` being the anchored DFA's state
/// after the bytes from there: no byte can lengthen or undo it, so nothing need wait for
/// the next read. A lazy DFA shows a match one byte late: a match that ended one byte
/// before the end of what there is (a line's `\n` after it) leaves a match state,
/// which is not dead, and is final when every byte from it leads nowhere; one that ends
/// at the very end is final when every next byte shows it and then leads nowhere.
/// Cautious when the cache is cleared meanwhile (earlier state ids are void then).
fn settled(dfa: &DFA, cache: &mut Cache, sid: LazyStateID) -> bool {
    let clears = cache.clear_count();
    let answer = if sid.is_match() {
        leads_nowhere(dfa, cache, sid)
    } else {
        // Most bytes lead to the same state: each distinct one is looked at once.
        let mut seen: Vec<LazyStateID> = Vec::new();
        (0..=255u8).all(|b| match dfa.next_state(cache, sid, b) {
            Ok(s) if seen.contains(&s) => true,
            Ok(s) if s.is_match() && leads_nowhere(dfa, cache, s) => {
                seen.push(s);
                true
            }
            _ => false,
        })
    };
    answer && cache.clear_count() == clears
}

/// Whether every byte from `sid` leads to the dead state.
fn leads_nowhere(dfa: &DFA, cache: &mut Cache, sid: LazyStateID) -> bool {
    (0..=255u8).all(|b| matches!(dfa.next_state(cache, sid, b), Ok(s) if s.is_dead()))
}

/// Whether a match from `start` to the end of `buf` is one whatever byte comes next:
/// `foo` is, `foo$` or `foo(?-u:\b)` is not.
fn stands_whatever_follows(dfa: &DFA, cache: &mut Cache, buf: &[u8], start: usize) -> bool {
    let Some(sid) = walk(dfa, cache, buf, start) else {
        return false;
    };
    // A lazy DFA shows a match one byte late: in the state after the next byte.
    (0..=255u8).all(|b| matches!(dfa.next_state(cache, sid, b), Ok(s) if s.is_match()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;
    use proptest::prelude::*;

    fn rule(p: &str, r: &str) -> Rewrite {
        Rewrite {
            direction: Direction::ToUpstream,
            compiled: Arc::new(Compiled::new(
                crate::inspect::byte_regex(p).unwrap(),
                crate::inspect::lazy_dfa(&[p]).unwrap(),
                r.as_bytes().to_vec(),
            )),
        }
    }

    /// A match that ends one byte before the read does (a line protocol's `\n` after
    /// it), or where the read does, is final when no byte could make it longer or undo
    /// it: it goes on at once, not after the hold. One that more bytes could still
    /// lengthen, or that needs the next byte to stand (`$`, `\b`), waits.
    #[test]
    fn a_finished_match_goes_on_at_once() {
        let r = rule("secret", "XXXXXX");
        let mut w = Rewriter::new(&[&r], 64);
        assert_eq!(w.push(b"AUTH secret\n", false), b"AUTH XXXXXX\n");
        assert!(!w.holding());
        assert_eq!(w.push(b"AUTH secret", false), b"AUTH XXXXXX");
        assert!(!w.holding());
        // `$` is the stream's end only; `\b` holds after "!" but not after "s".
        for (pattern, then) in [
            ("secret$", &b"secret!"[..]),
            ("secret(?-u:\\b)", b"XXXXXX!"),
        ] {
            let r = rule(pattern, "XXXXXX");
            let mut w = Rewriter::new(&[&r], 64);
            assert_eq!(w.push(b"AUTH secret", false), b"AUTH ", "{pattern}");
            assert_eq!(w.push(b"!", false), then, "{pattern}");
        }
        let r = rule("secret!*", "XXXXXX");
        let mut w = Rewriter::new(&[&r], 64);
        assert_eq!(w.push(b"AUTH secret!", false), b"AUTH ");
        assert!(w.holding());
        assert_eq!(w.push(b"!.", false), b"XXXXXX.");
    }

    /// Every pair of a rule shares its compiled pattern, and a pair between reads holds
    /// no DFA cache (a step borrows one from the pattern's pool), whichever pair taught
    /// it what.
    #[test]
    fn an_idle_rewriter_holds_no_cache() {
        let r = rule("secret", "XXXXXX");
        let mut a = Rewriter::new(&[&r], 64);
        let mut b = Rewriter::new(&[&r], 64);
        assert!(Arc::ptr_eq(&a.rules[0].compiled, &r.compiled));
        // Its Arc and its bytes: no regex, DFA or cache of its own.
        assert!(std::mem::size_of::<Rule>() <= 40);
        assert_eq!(a.push(b"a secr", false), b"a ");
        assert_eq!(b.push(b"the secret..", false), b"the XXXXXX..");
        assert_eq!(a.push(b"et..", false), b"XXXXXX..");
    }

    /// The stream in `pieces` through `rules` (EOF after the last), as a relay
    /// passes it.
    fn chunked(rules: &[Rewrite], max_match: usize, pieces: &[&[u8]]) -> Vec<u8> {
        let mut w = Rewriter::new(&rules.iter().collect::<Vec<_>>(), max_match);
        let mut out = Vec::new();
        for p in pieces {
            out.extend(w.push(p, false));
        }
        out.extend(w.push(b"", true));
        out
    }

    /// `replace_all` of each rule in turn over the whole stream: what `chunked` must
    /// give however the stream is cut, for matches up to `max_match` bytes that are
    /// never empty.
    fn whole(rules: &[Rewrite], stream: &[u8]) -> Vec<u8> {
        rules.iter().fold(stream.to_vec(), |s, r| {
            r.compiled
                .re
                .replace_all(&s, &r.compiled.replace[..])
                .into_owned()
        })
    }

    /// Assertions (and a few plain patterns) over the stream, not the read.
    const PATTERNS: &[&str] = &[
        "^A",
        r"\AA",
        "foo$",
        r"foo\z",
        "(?m)^x",
        "(?m)x$",
        "(?Rm)^x",
        "(?Rm)x$",
        "foo",
        "a+",
        r"(?-u:\b)ab(?-u:\b)",
        r"(?-u:\B)o",
        "b[^b]*b",
    ];

    #[test]
    fn assertions_see_the_stream_however_it_is_cut() {
        let streams: &[&[u8]] = &[
            b"A0A1A2A3A4A5A6A7",
            b"AAfoo foo\nfoo",
            b"xx\nx\nxyx\r\nx\rx",
            b"ab abc ab\nab.ab",
            b"aaa baa foofoo",
            b"bob fob b",
        ];
        for p in PATTERNS {
            let rules = [rule(p, "[$0]")];
            for s in streams {
                let want = whole(&rules, s);
                let mut cuts: Vec<Vec<&[u8]>> = vec![
                    vec![s],
                    s.chunks(1).collect(),
                    s.chunks(2).collect(),
                    s.chunks(3).collect(),
                ];
                cuts.extend((1..s.len()).map(|i| vec![&s[..i], &s[i..]]));
                for pieces in cuts {
                    assert_eq!(
                        String::from_utf8_lossy(&chunked(&rules, 4096, &pieces)),
                        String::from_utf8_lossy(&want),
                        "{p:?} over {pieces:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn start_anchor_matches_the_stream_start_only() {
        let r = rule("^A", "Z");
        let pieces: Vec<&[u8]> = vec![b"A0", b"A1", b"A2", b"A3", b"A4", b"A5", b"A6", b"A7"];
        assert_eq!(chunked(&[r], 4096, &pieces), b"Z0A1A2A3A4A5A6A7");
        // Nor after a flush (`^Bx?` waits for its next byte, then is flushed).
        let r = rule("^Bx?", "Z");
        let mut w = Rewriter::new(&[&r], 4096);
        assert_eq!(w.push(b"B", false), b"");
        assert_eq!(w.flush(), b"Z");
        assert_eq!(w.push(b"B", false), b"B");
        assert_eq!(w.push(b"B", true), b"B");
    }

    #[test]
    fn a_flush_is_not_the_end_of_the_stream() {
        let end = rule("foo$", "Z");
        let mut w = Rewriter::new(&[&end], 4096);
        assert_eq!(w.push(b"a foo", false), b"a ");
        assert!(w.holding());
        assert_eq!(w.flush(), b"foo");
        assert!(!w.holding());
        assert_eq!(w.push(b" foo", false), b" ");
        assert_eq!(w.push(b"", true), b"Z");
        // What comes next decides `(?m)$` and `\b`: a flush does not guess.
        for p in ["(?m)foo$", r"foo(?-u:\b)", r"foo(?-u:\B)", r"foo\z"] {
            let r = rule(p, "Z");
            let mut w = Rewriter::new(&[&r], 4096);
            assert_eq!(w.push(b"foo", false), b"", "{p}");
            assert_eq!(w.flush(), b"foo", "{p}");
        }
        // A match that needs nothing of what follows is made: at once when no byte
        // could lengthen it, else at the flush.
        for p in ["foo", "(?m)^foo", r"(?-u:\b)foo"] {
            let r = rule(p, "Z");
            let mut w = Rewriter::new(&[&r], 4096);
            assert_eq!(w.push(b"foo", false), b"Z", "{p}");
            assert!(!w.holding(), "{p}");
        }
        let r = rule("fo+", "Z");
        let mut w = Rewriter::new(&[&r], 4096);
        assert_eq!(w.push(b"foo", false), b"");
        assert_eq!(w.flush(), b"Z");
        // A line starts after a line end already passed on, also after a flush (`y?`
        // keeps a lone `x` waiting for its next byte).
        let r = rule("(?m)^xy?", "Z");
        let mut w = Rewriter::new(&[&r], 4096);
        assert_eq!(w.push(b"a\n", false), b"a\n");
        assert_eq!(w.push(b"x", false), b"");
        assert_eq!(w.push(b"x\n", false), b"Zx\n");
        assert_eq!(w.push(b"x", false), b"");
        assert_eq!(w.flush(), b"Z");
        assert_eq!(w.push(b"x", true), b"x");
    }

    #[test]
    fn past_max_match_the_end_is_not_the_stream_end() {
        // A run longer than max_match goes on; `$` does not match where it is cut.
        let r = rule("a+$", "Z");
        let mut w = Rewriter::new(&[&r], 4);
        let out = w.push(b"aaaaaaaa", false);
        assert!(!out.contains(&b'Z'), "{out:?}");
        let r = rule("a+", "Z");
        let mut w = Rewriter::new(&[&r], 4);
        let mut out = w.push(b"aaaaaaaa", false);
        out.extend(w.push(b"", true));
        assert!(out.iter().all(|&b| b == b'Z'), "{out:?}");
    }

    proptest! {
        /// Any cutting of a stream rewrites as the whole stream does (the patterns'
        /// matches are never empty and the streams shorter than max_match), also with
        /// two rules in a row.
        #[test]
        fn cut_anywhere_is_the_whole_stream(
            stream in proptest::collection::vec(proptest::sample::select(b"aAbfox\n\r .".to_vec()), 0..40),
            cuts in proptest::collection::vec(0usize..40, 0..8),
            p in 0..PATTERNS.len(),
            q in proptest::option::of(0..PATTERNS.len()),
        ) {
            let mut rules = vec![rule(PATTERNS[p], "[$0]")];
            rules.extend(q.map(|q| rule(PATTERNS[q], "x")));
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            prop_assert_eq!(chunked(&rules, 4096, &pieces), whole(&rules, &stream));
        }
    }

    #[test]
    fn matches_span_pushes() {
        let r = rule(r"Host: old\.example", "Host: new.example");
        let mut w = Rewriter::new(&[&r], 64);
        let mut out = w.push(b"GET / HTTP/1.1\r\nHost: ol", false);
        out.extend(w.push(b"d.example\r\n\r\n", false));
        out.extend(w.push(b"", true));
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: new.example\r\n\r\n");
        let mut w = Rewriter::new(&[&r], 20);
        let mut out = Vec::new();
        for b in b"xx Host: old.example yy Host: old.example" {
            out.extend(w.push(&[*b], false));
        }
        out.extend(w.push(b"", true));
        assert_eq!(out, b"xx Host: new.example yy Host: new.example");
    }

    #[test]
    fn holds_only_a_possible_match() {
        let r = rule(r"Host: old\.example", "Host: new.example");
        let mut w = Rewriter::new(&[&r], 4096);
        // Nothing here can begin a match: it all goes on at once.
        assert_eq!(w.push(b"GET / HTTP/1.1\r\n", false), b"GET / HTTP/1.1\r\n");
        assert!(!w.holding());
        // "Host: ol" might: it waits, then the rest completes it.
        assert_eq!(w.push(b"X: 1\r\nHost: ol", false), b"X: 1\r\n");
        assert!(w.holding());
        assert_eq!(w.push(b"d.example\r\n", false), b"Host: new.example\r\n");
        // A held beginning that never completes goes on when flushed.
        assert_eq!(w.push(b"Host: o", false), b"");
        assert_eq!(w.flush(), b"Host: o");
    }
}
