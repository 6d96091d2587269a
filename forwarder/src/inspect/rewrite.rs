//! `rewrite`: regex replacement over a whole stream, matches allowed to span reads.
//!
//! Only bytes that could still begin a match are held back: for each position of the
//! last `max_match` bytes, an anchored lazy DFA says whether a match starting there
//! could still complete with more bytes. Everything before the first such position is
//! final, replaced and passed on; a request whose tail cannot be part of a match goes
//! on at once (a request/response protocol must not wait for bytes that never come).
//! A held tail goes on anyway after [`HOLD_MAX`] without more bytes ([`Rewriter::flush`]).

use std::time::Duration;

use regex::bytes::Regex;
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::{Anchored, Input};

use crate::config::{Direction, Rewrite};

/// How long a possible match's beginning waits for the rest.
pub const HOLD_MAX: Duration = Duration::from_secs(1);

pub struct Rewriter {
    rules: Vec<Rule>,
    max_match: usize,
}

struct Rule {
    re: Regex,
    /// The same pattern, for "could a match start here?".
    dfa: DFA,
    cache: Cache,
    replace: Vec<u8>,
    pending: Vec<u8>,
}

impl Rewriter {
    /// The rules of one direction, applied in order (each to the previous one's output).
    pub fn new(rules: &[&Rewrite], max_match: usize) -> Rewriter {
        let rules = rules
            .iter()
            .map(|r| {
                let dfa = super::lazy_dfa(&[r.pattern.as_str()])
                    .expect("validated by the config (inspect::lazy_dfa)");
                Rule {
                    re: r.pattern.clone(),
                    cache: dfa.create_cache(),
                    dfa,
                    replace: r.replace.clone(),
                    pending: Vec::new(),
                }
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
        self.rules.iter().any(|r| !r.pending.is_empty())
    }

    /// The next bytes of the stream in; what may be passed on out. `eof`: the stream
    /// ends after `data`, so everything held is final.
    pub fn push(&mut self, data: &[u8], eof: bool) -> Vec<u8> {
        self.run(data, eof)
    }

    /// Gives up waiting: everything held goes on (the stream continues).
    pub fn flush(&mut self) -> Vec<u8> {
        self.run(&[], true)
    }

    fn run(&mut self, data: &[u8], all: bool) -> Vec<u8> {
        let mut out = data.to_vec();
        for rule in &mut self.rules {
            rule.pending.extend_from_slice(&out);
            out = rule.step(self.max_match, all);
        }
        out
    }
}

impl Rule {
    fn step(&mut self, max_match: usize, all: bool) -> Vec<u8> {
        let commit = if all {
            self.pending.len()
        } else {
            self.first_possible_start(max_match)
        };
        let pending = &self.pending;
        let mut out = Vec::with_capacity(pending.len());
        let mut last = 0;
        for caps in self.re.captures_iter(pending) {
            let m = caps.get(0).expect("group 0 always matches");
            if m.start() >= commit {
                break;
            }
            if m.is_empty() {
                continue;
            }
            out.extend_from_slice(&pending[last..m.start()]);
            caps.expand(&self.replace, &mut out);
            last = m.end();
        }
        let keep_from = commit.max(last);
        out.extend_from_slice(&pending[last..keep_from]);
        self.pending.drain(..keep_from);
        out
    }

    /// The first position (within the last `max_match` bytes) where a match could
    /// begin and still be unfinished, or complete but longer with more bytes; the
    /// end when there is none.
    fn first_possible_start(&mut self, max_match: usize) -> usize {
        let len = self.pending.len();
        for i in len.saturating_sub(max_match)..len {
            let input = Input::new(&self.pending[..])
                .range(i..)
                .anchored(Anchored::Yes);
            let Ok(mut sid) = self.dfa.start_state_forward(&mut self.cache, &input) else {
                return i;
            };
            let mut alive = true;
            for &b in &self.pending[i..] {
                match self.dfa.next_state(&mut self.cache, sid, b) {
                    Ok(s) if s.is_dead() => {
                        alive = false;
                        break;
                    }
                    Ok(s) => sid = s,
                    Err(_) => return i,
                }
            }
            if alive {
                return i;
            }
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;

    fn rule(p: &str, r: &str) -> Rewrite {
        Rewrite {
            direction: Direction::ToUpstream,
            pattern: Regex::new(p).unwrap(),
            replace: r.as_bytes().to_vec(),
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
