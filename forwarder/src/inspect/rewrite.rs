//! `rewrite`: regex replacement over a whole stream, matches allowed to span reads.
//!
//! Bytes are held back until no match of at most `max_match` bytes can still begin in
//! them: everything but the last `max_match` bytes is final (a match that starts in it
//! ends within what we have), so it is replaced and passed on; the tail waits for more
//! bytes or the end of the stream.

use regex::bytes::Regex;

use crate::config::Rewrite;

pub struct Rewriter {
    rules: Vec<(Regex, Vec<u8>, Vec<u8>)>,
    max_match: usize,
}

impl Rewriter {
    /// The rules of one direction, applied in order (each to the previous one's output).
    pub fn new(rules: &[&Rewrite], max_match: usize) -> Rewriter {
        Rewriter {
            rules: rules
                .iter()
                .map(|r| (r.pattern.clone(), r.replace.clone(), Vec::new()))
                .collect(),
            max_match,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The next bytes of the stream in; what may be passed on out. `eof`: the stream
    /// ends after `data`, so everything held is final.
    pub fn push(&mut self, data: &[u8], eof: bool) -> Vec<u8> {
        let mut out = data.to_vec();
        for (re, replace, pending) in &mut self.rules {
            pending.extend_from_slice(&out);
            out = step(re, replace, pending, self.max_match, eof);
        }
        out
    }
}

fn step(re: &Regex, replace: &[u8], pending: &mut Vec<u8>, max_match: usize, eof: bool) -> Vec<u8> {
    let commit = if eof {
        pending.len()
    } else {
        pending.len().saturating_sub(max_match)
    };
    let mut out = Vec::with_capacity(pending.len());
    let mut last = 0;
    for caps in re.captures_iter(pending) {
        let m = caps.get(0).expect("group 0 always matches");
        if m.start() >= commit {
            break;
        }
        if m.is_empty() {
            continue;
        }
        out.extend_from_slice(&pending[last..m.start()]);
        caps.expand(replace, &mut out);
        last = m.end();
    }
    let keep_from = commit.max(last);
    out.extend_from_slice(&pending[last..keep_from]);
    pending.drain(..keep_from);
    out
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
}
