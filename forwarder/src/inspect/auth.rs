//! `http_auth`: the client's first HTTP/1.x request must carry a header with the
//! token; the header is removed before the request goes on.

use subtle::ConstantTimeEq;

use crate::config::HttpAuth;

pub const UNAUTHORIZED: &[u8] =
    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The longest request head `http_auth` reads: HAProxy's default buffer (tune.bufsize,
/// 16 KiB), so requests with large cookies pass; `inspect_window` when larger.
const HEAD_MAX: usize = 16 * 1024;

/// How far into the client's stream the request head may reach.
pub fn window(inspect_window: usize) -> usize {
    inspect_window.max(HEAD_MAX)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request's headers are not complete yet.
    NeedMore,
    /// Authorized: forward these bytes (the held ones minus the auth header).
    Pass(Vec<u8>),
    /// Answer 401 and close; the reason is for the log.
    Fail(&'static str),
}

/// Judges the bytes held so far (the start of the client's stream), whose request
/// head must end within `window` bytes.
pub fn check(held: &[u8], auth: &HttpAuth, window: usize) -> Outcome {
    // Room for 100 headers on the stack; a head with more (the window allows one per
    // 4 bytes, `a:` and CRLF) is parsed again with room for every header it can hold,
    // rather than refused as not HTTP (HAProxy takes 101 by default, nginx any number
    // within its buffer).
    let mut few = [httparse::EMPTY_HEADER; 100];
    let mut many;
    let mut req = httparse::Request::new(&mut few);
    let mut parsed = req.parse(held);
    if let Err(httparse::Error::TooManyHeaders) = parsed {
        many = vec![httparse::EMPTY_HEADER; window / 4 + 1];
        req = httparse::Request::new(&mut many);
        parsed = req.parse(held);
    }
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if held.len() < window => return Outcome::NeedMore,
        Ok(httparse::Status::Partial) => return Outcome::Fail("request headers too long"),
        Err(_) => return Outcome::Fail("not an HTTP/1.x request"),
    };
    let mut ok = false;
    // Byte ranges of the auth header lines, to cut out.
    let mut cuts = Vec::new();
    for h in req.headers.iter() {
        if !h.name.eq_ignore_ascii_case(&auth.header) {
            continue;
        }
        let value = h.value.trim_ascii();
        ok |= bool::from(value.ct_eq(&auth.token));
        let start = h.name.as_ptr() as usize - held.as_ptr() as usize;
        let end = held[start..head_len]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(head_len, |p| start + p + 1);
        cuts.push(start..end);
    }
    if !ok {
        return Outcome::Fail(if cuts.is_empty() {
            "no auth header"
        } else {
            "wrong token"
        });
    }
    let mut out = Vec::with_capacity(held.len());
    let mut at = 0;
    for c in cuts {
        out.extend_from_slice(&held[at..c.start]);
        at = c.end;
    }
    out.extend_from_slice(&held[at..]);
    Outcome::Pass(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> HttpAuth {
        HttpAuth {
            header: "X-Forwarder-Auth".into(),
            token: b"s3cret".to_vec(),
        }
    }

    #[test]
    fn header_checked_and_removed() {
        let a = auth();
        let req =
            b"GET / HTTP/1.1\r\nHost: x\r\nx-forwarder-auth: s3cret\r\nAccept: */*\r\n\r\nBODY";
        assert_eq!(
            check(req, &a, 4096),
            Outcome::Pass(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nBODY".to_vec())
        );
        assert_eq!(
            check(b"GET / HTTP/1.1\r\nHost: x\r\n", &a, 4096),
            Outcome::NeedMore
        );
        let wrong = b"GET / HTTP/1.1\r\nX-Forwarder-Auth: nope\r\n\r\n";
        assert_eq!(check(wrong, &a, 4096), Outcome::Fail("wrong token"));
        assert_eq!(
            check(b"GET / HTTP/1.1\r\n\r\n", &a, 4096),
            Outcome::Fail("no auth header")
        );
        assert_eq!(
            check(b"\x16\x03\x01", &a, 4096),
            Outcome::Fail("not an HTTP/1.x request")
        );
    }

    /// A head with more headers than the first parse has room for (100) is judged
    /// like any other, not refused as "not an HTTP/1.x request" (audit: 101 headers
    /// with the right token got a 401). The smallest header lines fill the window.
    #[test]
    fn many_headers_within_the_window() {
        let a = auth();
        let window = 16 * 1024;
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        let filler = |head: &mut Vec<u8>, n| (0..n).for_each(|_| head.extend_from_slice(b"a:\r\n"));
        filler(&mut head, 150);
        head.extend_from_slice(b"x-forwarder-auth: s3cret\r\n");
        let rest = b"\r\n";
        let mut want = b"GET / HTTP/1.1\r\n".to_vec();
        filler(&mut want, 150);
        want.extend_from_slice(rest);
        assert_eq!(
            check(&[&head[..], rest].concat(), &a, window),
            Outcome::Pass(want)
        );
        // As many as the window holds.
        let mut full = b"GET / HTTP/1.1\r\nx-forwarder-auth: s3cret\r\n".to_vec();
        let room = (window - full.len() - 2) / 4;
        filler(&mut full, room);
        full.extend_from_slice(rest);
        assert!(full.len() <= window);
        assert!(matches!(check(&full, &a, window), Outcome::Pass(_)));
    }
}
