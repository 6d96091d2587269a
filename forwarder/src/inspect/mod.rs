//! Traffic inspection per rule: `inspect` (dumps), `deny_pattern`, `http_auth` and
//! `rewrite`.
//!
//! [`InspectRelay`] wraps a rule's relay. It copies the first bytes of each direction
//! through our memory (the *prelude*) until every check has seen what it needs, then
//! hands the pair, with no byte read past that point, to the relay it wraps: the fast
//! path (ebpf or splice), or the copy relay for `rewrite` rules. So inspection costs
//! only the bytes it inspects, and `userspace_bytes` in the close line says how many.
//! A direction that streams on past its dump's `bytes` while the other has not shown
//! its own yet (a large request before the response) does not wait for it: the dump
//! goes along with the pair ([`Handover`]), and the relay shows the rest as it passes.

pub mod auth;
pub mod deny;
pub mod dump;
pub mod rewrite;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::Rule;
use crate::relay::{
    close_cleanly, pass_fin, reset_both_on_close, reset_on_close, Handover, Pair, Passed, Progress,
    Relay, RelayEnd, RelayFuture, Side,
};
use crate::tunnel::stream::{Event, Link, TellPeerReset};
use deny::{DenyPatterns, Verdict};
use dump::Dump;
use rewrite::Rewriter;

/// A `deny_pattern` that can still match only further in (an unanchored one) holds
/// the client's first bytes at most this long, as HAProxy's `inspect-delay` does;
/// then they go on and later bytes are still checked. Bytes that may begin a match
/// from the stream's first byte are held until the patterns decide (or the window
/// ends, or the client does).
const HOLD_MAX: Duration = Duration::from_secs(1);

/// How `deny_pattern` and `rewrite` patterns read: the syntax of `regex::bytes` with
/// Unicode mode off by default, so they match bytes, as a TCP stream is. `\xff` is the
/// byte ff and `.` any byte but `\n` (in Unicode mode `\xff` is U+00FF, the bytes c3 bf,
/// and `.` matches no byte of invalid UTF-8: `^\xff\xfb` never refused a telnet IAC
/// WILL, and one 0x80 byte in front got `(?s)^.{0,8}EVIL` past the filter). Classes and
/// `(?i)` are ASCII; `(?u:...)` asks for Unicode.
fn syntax() -> regex_automata::util::syntax::Config {
    regex_automata::util::syntax::Config::new()
        .unicode(false)
        .utf8(false)
}

/// A pattern as [`syntax`] reads it, for a search over bytes already in hand.
pub fn byte_regex(pattern: &str) -> Result<regex::bytes::Regex, String> {
    regex::bytes::RegexBuilder::new(pattern)
        .unicode(false)
        .build()
        .map_err(|e| match e.to_string() {
            // `[é]`, `\pL`: Unicode in a byte pattern (valid in Unicode mode).
            m if m.contains("Unicode not allowed") => {
                format!("{m} (patterns match bytes; write (?u:...) around what should match Unicode characters)")
            }
            m => m,
        })
}

/// A pattern's syntax tree as [`syntax`] reads it.
pub fn parse_pattern(pattern: &str) -> Result<regex_syntax::hir::Hir, String> {
    regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(pattern)
        .map_err(|e| e.to_string())
}

/// The lazy DFA that `deny_pattern` and `rewrite` step over a stream as it arrives
/// (see [`syntax`]). It cannot take what only a backtracking search can: Unicode word
/// boundaries (`(?u:\b)`), which `check` therefore refuses with a hint (the ASCII `\b`
/// works).
pub fn lazy_dfa(patterns: &[&str]) -> Result<regex_automata::hybrid::dfa::DFA, String> {
    use regex_automata::nfa::thompson;
    regex_automata::hybrid::dfa::DFA::builder()
        .syntax(syntax())
        .thompson(thompson::Config::new().utf8(false))
        .build_many(patterns)
        .map_err(|e| match e.to_string() {
            m if m.contains("word boundar") => format!(
                "{m} (Unicode \\b and \\B cannot be checked as bytes arrive; a plain \\b is the ASCII word boundary)"
            ),
            m => m,
        })
}

/// Connection numbers for dumps (`conn=`), process-wide.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
/// The most the prelude reads at once. Its buffer is made for each read, after the
/// socket said it has bytes: a pair waiting in the prelude (for its dump's bytes, say)
/// holds none (a buffer kept across the wait cost 16 KiB per idle pair).
const PRELUDE_READ: usize = 16 * 1024;

pub struct InspectRelay {
    rule: Rule,
    deny: Option<DenyPatterns>,
    inner: Arc<dyn Relay>,
}

impl InspectRelay {
    /// `inner` is the relay the pair continues on once the checks are done.
    pub fn new(rule: &Rule, inner: Arc<dyn Relay>) -> Result<InspectRelay, String> {
        let deny = match rule.deny_patterns.is_empty() {
            true => None,
            false => Some(DenyPatterns::new(&rule.deny_patterns)?),
        };
        Ok(InspectRelay {
            rule: rule.clone(),
            deny,
            inner,
        })
    }
}

impl Relay for InspectRelay {
    fn path(&self) -> &'static str {
        self.inner.path()
    }

    fn progress_lag(&self) -> Duration {
        self.inner.progress_lag()
    }

    fn relay<'a>(&'a self, mut pair: Pair, progress: Arc<Progress>) -> RelayFuture<'a> {
        Box::pin(async move {
            // A tunnel stream that ends here (refused, failed, or cut short by a
            // limit) ends at the agent too: its target is reset. One the server cuts
            // short (idle_timeout, ...) is reset at the visitor too, as the tunnel's
            // relay resets the streams it cuts: a FIN would show it as complete.
            let mut tell = pair.tunnel.as_deref().map(TellPeerReset::new);
            if tell.is_some() {
                reset_on_close(&pair.client);
            }
            // Boxed, so that what the prelude needs is freed when it ends: a pair that
            // goes on for hours holds only this block's state and its relay's.
            let prelude = Box::pin(self.prelude(&mut pair, &progress)).await;
            progress.hold(Progress::HELD_BY_PRELUDE, false);
            match prelude {
                Ok(handover) => {
                    if let Some(tell) = &mut tell {
                        tell.disarm();
                        close_cleanly(&pair.client);
                    }
                    self.inner
                        .relay_after_prelude(pair, progress, handover)
                        .await
                }
                Err(end) => end,
            }
        })
    }
}

/// Where the prelude stands.
struct Prelude<'a> {
    dump: Option<Dump>,
    /// Boxed: its lazy DFA's cache is most of a prelude's size, and it is dropped once
    /// the patterns have decided, which is soon for most pairs (idle ones included).
    scanner: Option<Box<deny::Scanner<'a>>>,
    auth_pending: bool,
    /// Client bytes read but not yet passed on (a check is undecided).
    held: Vec<u8>,
    hold_until: Option<Instant>,
    /// Client bytes read so far.
    client_seen: usize,
    eof: [bool; 2],
    /// A `rewrite` rule's [to_upstream, to_client]: what the prelude passes on is
    /// rewritten too, from the stream's first byte.
    rewriters: Option<Box<[Rewriter; 2]>>,
    /// When what a rewriter holds (a possible match's beginning) goes on anyway.
    rewrite_hold: Option<Instant>,
    /// A tunnel stream's: every byte passed on to the upstream (its data connection),
    /// which the stream retains until the agent acknowledges it.
    sent: Option<Retained>,
    /// Bytes read from the upstream (a tunnel stream acknowledges each read).
    upstream_read: u64,
    /// A tunnel stream's events so far (see [`Prelude::tunnel_event`]).
    events: Vec<Event>,
    /// Where the agent said its target's stream ends (a `Fin` frame).
    peer_fin: Option<u64>,
}

impl Prelude<'_> {
    /// Direction `d`'s rewriter, for a `rewrite` rule.
    fn rewriter(&mut self, d: usize) -> Option<&mut Rewriter> {
        self.rewriters.as_deref_mut().map(|r| &mut r[d])
    }

    /// Where bytes passed on to the upstream go through: the rewriter (`rewrite`),
    /// and, for a tunnel stream, the copy it retains.
    fn upstream_sinks(&mut self) -> (Option<&mut Rewriter>, Option<&mut Retained>) {
        (
            self.rewriters.as_deref_mut().map(|r| &mut r[0]),
            self.sent.as_mut(),
        )
    }

    /// Client bytes the checks let go, on to the upstream (through the rewriters, and
    /// kept for a tunnel stream's replay); `eof`: the client's FIN after them.
    async fn pass_client_bytes(
        &mut self,
        pair: &mut Pair,
        progress: &Progress,
        out: &[u8],
        eof: bool,
    ) -> Result<(), RelayEnd> {
        let (rewriter, keep) = self.upstream_sinks();
        pass_on(
            &mut pair.upstream,
            out,
            eof,
            rewriter,
            keep,
            &progress.to_upstream,
            progress,
        )
        .await
        .map_err(|e| fail(pair, Side::Upstream, e))?;
        self.note_rewrite_hold();
        Ok(())
    }

    /// After bytes went through the rewriters: what they hold waits for the rest of a
    /// match [`rewrite::HOLD_MAX`] after the last bytes, as on the copy path.
    fn note_rewrite_hold(&mut self) {
        let holding = self
            .rewriters
            .as_ref()
            .is_some_and(|r| r.iter().any(Rewriter::holding));
        // From when holding began: a read that extends a possible match does not put
        // the deadline off.
        self.rewrite_hold = holding.then(|| {
            self.rewrite_hold
                .unwrap_or_else(|| Instant::now() + rewrite::HOLD_MAX)
        });
    }

    /// A tunnel stream's event while its checks wait. The stream's ends travel as
    /// events, not on the data connection: a reset or a lost link ends the visitor
    /// here, and the target's FIN reaches the visitor once every byte before it has
    /// (a server-first protocol's server may say its piece and close). Every event
    /// but an end goes on to the stream's relay too, which keeps its own account.
    fn tunnel_event(&mut self, pair: &Pair, ev: Option<Event>) -> Result<(), RelayEnd> {
        match ev {
            None | Some(Event::GraceExpired) => {
                reset_both_on_close(&pair.client, &pair.upstream);
                Err(RelayEnd::Ended("agent_lost"))
            }
            Some(Event::Unreachable(why)) => {
                reset_both_on_close(&pair.client, &pair.upstream);
                Err(RelayEnd::ConnectFailed(why))
            }
            Some(Event::Reset) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset at the far end of the tunnel",
                );
                Err(fail(pair, Side::Upstream, e))
            }
            Some(ev) => {
                if let Event::Fin(at) = ev {
                    self.peer_fin = Some(at);
                }
                self.events.push(ev);
                self.pass_peer_fin(pair)
            }
        }
    }

    /// A tunnel stream whose data connection failed while the checks wait: nothing
    /// more is read from or written to it (what is passed on is retained).
    fn lose_data(&mut self) {
        if let Some(r) = &mut self.sent {
            r.lost = true;
        }
    }

    fn data_lost(&self) -> bool {
        self.sent.as_ref().is_some_and(|r| r.lost)
    }

    /// The tunnel peer's FIN, once every byte before it was passed on.
    fn pass_peer_fin(&mut self, pair: &Pair) -> Result<(), RelayEnd> {
        if self.peer_fin == Some(self.upstream_read) && !self.eof[1] {
            self.eof[1] = true;
            pass_fin(&pair.client).map_err(|e| fail(pair, Side::Client, e))?;
        }
        Ok(())
    }

    /// What the inner relay takes on: the dump if a direction not yet ended still
    /// shows bytes, the rewriters, and what a tunnel stream passed on.
    fn handover(self) -> Handover {
        let eof = self.eof;
        Handover {
            dump: self
                .dump
                .filter(|t| (0..2).any(|d| !eof[d] && t.wants(d) > 0))
                .map(Box::new),
            rewriters: self.rewriters,
            passed: self.sent.map(|retained| {
                Box::new(Passed {
                    sent: retained.sent,
                    received: self.upstream_read,
                    eof: eof[0],
                    events: self.events,
                })
            }),
        }
    }
}

impl InspectRelay {
    /// Runs the checks; `Ok` when the pair may go on to the inner relay, with what is
    /// left to do.
    async fn prelude(&self, pair: &mut Pair, progress: &Progress) -> Result<Handover, RelayEnd> {
        let rule = &self.rule;
        let dump = rule.inspect.as_ref().and_then(|cfg| {
            Dump::new(cfg, &rule.name, &NEXT_CONN)
                .map_err(|e| tracing::warn!("inspect rule={}: no dump: {e}", rule.name))
                .ok()
        });
        let mut p = Prelude {
            dump,
            scanner: self.deny.as_ref().map(|d| {
                Box::new(match rule.http_auth {
                    // The whole request waits for the credentials: nothing to free early.
                    Some(_) => d.scanner().holding_all(),
                    None => d.scanner(),
                })
            }),
            auth_pending: rule.http_auth.is_some(),
            held: Vec::new(),
            hold_until: None,
            client_seen: 0,
            eof: [false; 2],
            rewriters: (!rule.rewrite.is_empty()).then(|| Box::new(Rewriter::for_rule(rule))),
            rewrite_hold: None,
            sent: pair.tunnel.is_some().then(Retained::default),
            upstream_read: 0,
            events: Vec::new(),
            peer_fin: None,
        };
        // A tunnel stream's ends and bytes past the checks are the stream's to pass on
        // (as control frames, counted and retained): it leaves as soon as the checks
        // have decided, and its relay shows what the dump still wants.
        let tunnel = p.sent.is_some();
        loop {
            // Held bytes make a cut a reset (see `connection::relay_bounded`).
            progress.hold(
                Progress::HELD_BY_PRELUDE,
                !p.held.is_empty() || p.rewrite_hold.is_some(),
            );
            let wants = |d: usize, p: &Prelude| p.dump.as_ref().map_or(0, |x| x.wants(d));
            let checking = p.scanner.is_some() || p.auth_pending || !p.held.is_empty();
            // Once the checks have decided, a direction reads only for its dump, and a
            // direction whose dump is full ends the prelude as soon as it has more to
            // say: a stream in either direction moves on to the fast path at once
            // (which shows what the other direction's dump still wants), and only the
            // dumped bytes went through our memory.
            // The copy path (`rewrite`) shows the dump itself, as it reads every byte.
            let full = |d: usize, p: &Prelude| p.eof[d] || wants(d, p) == 0;
            if !checking && (p.rewriters.is_some() || tunnel || full(0, &p) && full(1, &p)) {
                return Ok(p.handover());
            }
            // Never read past what a check or the dump needs: the inner relay takes
            // over at exactly that point. While the client's checks wait, the
            // upstream's bytes flow (server-first protocols).
            let window = match p.auth_pending {
                true => auth::window(rule.inspect_window),
                false => rule.inspect_window,
            };
            let client_max = if checking {
                (window.saturating_sub(p.client_seen) as u64).max(wants(0, &p))
            } else {
                wants(0, &p)
            };
            let upstream_max = if checking {
                PRELUDE_READ as u64
            } else {
                wants(1, &p)
            };
            let max = |m: u64| m.clamp(1, PRELUDE_READ as u64) as usize;
            let (client_max, upstream_max) = (max(client_max), max(upstream_max));
            let client_moves_on = !checking && wants(0, &p) == 0;
            let upstream_moves_on = !checking && wants(1, &p) == 0;
            let hold_until = p.hold_until;
            let rewrite_hold = p.rewrite_hold;
            tokio::select! {
                r = pair.client.readable(), if !p.eof[0] => {
                    r.map_err(|e| fail(pair, Side::Client, e))?;
                    if client_moves_on {
                        match has_bytes(&pair.client) {
                            Ok(true) => return Ok(p.handover()),
                            Ok(false) => continue,
                            Err(e) => return Err(fail(pair, Side::Client, e)),
                        }
                    }
                    let mut buf = vec![0u8; client_max];
                    let n = match pair.client.try_read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(fail(pair, Side::Client, e)),
                    };
                    self.client_bytes(pair, progress, &mut p, &buf[..n]).await?;
                    if n == 0 && !tunnel {
                        // Every check decided at the client's EOF, and whatever it sent
                        // was passed on: pass its FIN on too. The prelude may still be
                        // waiting for the upstream's bytes (its dump), and the upstream
                        // for this FIN before it says more or closes.
                        pass_fin(&pair.upstream).map_err(|e| fail(pair, Side::Upstream, e))?;
                    }
                }
                r = pair.upstream.readable(), if !p.eof[1] && !p.data_lost() => {
                    if upstream_moves_on {
                        match r.and_then(|()| has_bytes(&pair.upstream)) {
                            Ok(true) => return Ok(p.handover()),
                            Ok(false) => continue,
                            Err(e) => return Err(fail(pair, Side::Upstream, e)),
                        }
                    }
                    // Bytes that no check, dump or rewrite needs (a server-first
                    // upstream's while the client's checks wait) are spliced, not
                    // copied: inspection costs only the bytes it inspects.
                    let splices = !tunnel && wants(1, &p) == 0 && p.rewriter(1).is_none();
                    let r = match r {
                        Err(e) if splices => return Err(fail(pair, Side::Upstream, e)),
                        r => r,
                    };
                    if splices {
                        match splice_on(&pair.upstream, &pair.client, &progress.to_client).await {
                            Ok(Spliced::Moved(n)) => {
                                p.upstream_read += n as u64;
                                progress.touch();
                                continue;
                            }
                            Ok(Spliced::Nothing) => continue,
                            Ok(Spliced::Eof) => {
                                p.eof[1] = true;
                                pass_fin(&pair.client).map_err(|e| fail(pair, Side::Client, e))?;
                                continue;
                            }
                            // At an urgent mark, or no pipe to be had: this read copies.
                            Ok(Spliced::Cannot) => {}
                            Err((side, e)) => return Err(fail(pair, side, e)),
                        }
                    }
                    let buf = match r.and_then(|()| try_read_some(&pair.upstream, upstream_max)) {
                        Ok(None) => continue,
                        // A tunnel stream's data connection failed, or the agent
                        // closed it to dial another, while the checks wait: a lost
                        // link, waited out like any stream's (what is passed on
                        // meanwhile is retained for the reattach, or the grace ends).
                        Ok(Some(b)) if tunnel && b.is_empty() => {
                            p.lose_data();
                            continue;
                        }
                        Err(_) if tunnel => {
                            p.lose_data();
                            continue;
                        }
                        Ok(Some(b)) => b,
                        Err(e) => return Err(fail(pair, Side::Upstream, e)),
                    };
                    let n = buf.len();
                    p.eof[1] = n == 0;
                    p.upstream_read += n as u64;
                    if let Some(d) = &mut p.dump {
                        d.record(1, &buf[..n]);
                    }
                    pass_on(&mut pair.client, &buf[..n], n == 0, p.rewriter(1), None, &progress.to_client, progress)
                        .await
                        .map_err(|e| fail(pair, Side::Client, e))?;
                    if let Some(link) = &pair.tunnel {
                        // The agent holds at most resume_buffer unacknowledged: a
                        // server that pushes while the client's checks wait goes on.
                        link.acknowledge(p.upstream_read);
                        p.pass_peer_fin(pair)?;
                    }
                    p.note_rewrite_hold();
                    if n == 0 {
                        // Its bytes were passed on as they came: the FIN follows them
                        // now, not when the client's checks end (a server-first
                        // protocol's client may be waiting for it to say anything).
                        pass_fin(&pair.client).map_err(|e| fail(pair, Side::Client, e))?;
                    }
                }
                ev = next_event(&mut pair.tunnel), if tunnel => p.tunnel_event(pair, ev)?,
                _ = tokio::time::sleep_until(hold_until.unwrap_or_else(Instant::now)), if hold_until.is_some() => {
                    p.hold_until = None;
                    if !p.auth_pending {
                        let held = std::mem::take(&mut p.held);
                        p.pass_client_bytes(pair, progress, &held, false).await?;
                    }
                }
                _ = tokio::time::sleep_until(rewrite_hold.unwrap_or_else(Instant::now)), if rewrite_hold.is_some() => {
                    p.rewrite_hold = None;
                    let [up, down] = p.rewriters.as_deref_mut().expect("only a rewriter holds").each_mut();
                    let (up, down) = (up.flush(), down.flush());
                    pass_on(&mut pair.upstream, &up, false, None, p.sent.as_mut(), &progress.to_upstream, progress)
                        .await
                        .map_err(|e| fail(pair, Side::Upstream, e))?;
                    pass_on(&mut pair.client, &down, false, None, None, &progress.to_client, progress)
                        .await
                        .map_err(|e| fail(pair, Side::Client, e))?;
                }
            }
        }
    }

    /// The client's next bytes (none: EOF) through the checks.
    async fn client_bytes(
        &self,
        pair: &mut Pair,
        progress: &Progress,
        p: &mut Prelude<'_>,
        data: &[u8],
    ) -> Result<(), RelayEnd> {
        let rule = &self.rule;
        if data.is_empty() {
            p.eof[0] = true;
        } else {
            // Bytes a check holds are activity too: a client trickling its request
            // is not idle (`idle_timeout`).
            progress.touch();
        }
        if let Some(d) = &mut p.dump {
            d.record(0, data);
        }
        // Patterns look only within the first `inspect_window` bytes, even when the
        // read went further (for the dump's `bytes`).
        let in_window = &data[..data
            .len()
            .min(rule.inspect_window.saturating_sub(p.client_seen))];
        p.client_seen += data.len();
        p.held.extend_from_slice(data);
        if let Some(scanner) = &mut p.scanner {
            match scanner.feed(in_window) {
                Verdict::Deny => {
                    reset_both_on_close(&pair.client, &pair.upstream);
                    return Err(RelayEnd::Refused {
                        reason: "pattern",
                        detail: String::new(),
                    });
                }
                Verdict::Clear => p.scanner = None,
                Verdict::Undecided if p.eof[0] || p.client_seen >= rule.inspect_window => {
                    p.scanner = None
                }
                Verdict::Undecided => {}
            }
        }
        if let (true, Some(a)) = (p.auth_pending, &rule.http_auth) {
            let outcome = if p.eof[0] && !p.held.is_empty() {
                match auth::check(&p.held, a, auth::window(rule.inspect_window)) {
                    auth::Outcome::NeedMore => auth::Outcome::Fail("incomplete request"),
                    o => o,
                }
            } else if p.eof[0] {
                auth::Outcome::Fail("no request")
            } else {
                auth::check(&p.held, a, auth::window(rule.inspect_window))
            };
            match outcome {
                auth::Outcome::NeedMore => {}
                auth::Outcome::Pass(request) => {
                    p.held = request;
                    p.auth_pending = false;
                }
                auth::Outcome::Fail(why) => return Err(unauthorized(pair, why).await),
            }
        }
        let release = if p.scanner.is_none() && !p.auth_pending {
            // Every check decided: all of it (and the FIN, if that came).
            Some((std::mem::take(&mut p.held), p.eof[0]))
        } else if let (false, None, Some(scanner)) =
            (p.auth_pending, &rule.http_auth, &mut p.scanner)
        {
            // Bytes that can begin no match go on now; only a possible match's
            // beginning waits (a request that merely holds no match must not wait for
            // the hold). Not under `http_auth`, which holds the whole request.
            let free = scanner.first_possible_start(p.held.len());
            (free > 0).then(|| (p.held.drain(..free).collect(), false))
        } else {
            None
        };
        if let Some((out, eof)) = release {
            p.pass_client_bytes(pair, progress, &out, eof).await?;
        }
        if p.held.is_empty() {
            p.hold_until = None;
        }
        if !p.held.is_empty()
            && p.hold_until.is_none()
            && !p.scanner.as_ref().is_some_and(|s| s.may_match_from_start())
        {
            // What is held may begin a match from the first byte (an anchored pattern
            // half seen): held until decided, none of a match may go on. Otherwise a
            // match can only begin further in: held a while only.
            p.hold_until = Some(Instant::now() + HOLD_MAX);
        }
        Ok(())
    }
}

/// What [`splice_on`] did.
enum Spliced {
    Moved(usize),
    Eof,
    /// Nothing to read after all (stale readiness, now cleared).
    Nothing,
    /// Not spliced (at an urgent mark, or no pipe): copy instead.
    Cannot,
}

/// Moves what `src` has, up to a pipe's worth, on to `dst` through a pipe, as the
/// splice relay does: the bytes never enter our memory. Waits until `dst` took them.
async fn splice_on(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
) -> Result<Spliced, (Side, std::io::Error)> {
    use crate::relay::splice::{fill, splice_out, Fill, Pipe};
    let Ok(pipe) = Pipe::take() else {
        return Ok(Spliced::Cannot);
    };
    let n = match fill(src, &pipe, 0, pipe.size) {
        Ok(Fill::Bytes { n, .. }) => n,
        Ok(Fill::Eof) => {
            pipe.give_back();
            return Ok(Spliced::Eof);
        }
        Ok(Fill::Empty | Fill::NoSlot) => {
            pipe.give_back();
            return Ok(Spliced::Nothing);
        }
        Ok(Fill::UrgentMark) => {
            pipe.give_back();
            return Ok(Spliced::Cannot);
        }
        // The pipe is dropped, not given back: it may hold bytes.
        Err(e) => return Err((Side::Upstream, e)),
    };
    // The pipe is dropped on an error, not given back: it may hold bytes.
    splice_out(&pipe, dst, n)
        .await
        .map_err(|e| (Side::Client, e))?;
    counter.fetch_add(n as u64, Ordering::Relaxed);
    pipe.give_back();
    Ok(Spliced::Moved(n))
}

/// A tunnel stream's next event (acks, the peer's FIN or reset, a new data connection).
async fn next_event(link: &mut Option<Box<Link>>) -> Option<Event> {
    link.as_mut()?.events.recv().await
}

/// One read of at most `max` bytes (none: the end); `None` when there was nothing
/// after all (stale readiness, now cleared).
fn try_read_some(sock: &TcpStream, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; max];
    match sock.try_read(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `sock` has a byte (or its end) to read now. Readiness alone may be stale
/// (our last read did not drain the socket); this looks, and clears it if not.
fn has_bytes(sock: &TcpStream) -> std::io::Result<bool> {
    let peek = sock.try_io(tokio::io::Interest::READABLE, || {
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        socket2::SockRef::from(sock).peek(&mut b)
    });
    match peek {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// A tunnel stream's bytes passed on to its data connection, kept for its retention,
/// and whether that connection failed (a lost link): then they only wait, retained,
/// for the reattach, which sends again what the agent lacks.
#[derive(Default)]
struct Retained {
    sent: Vec<u8>,
    lost: bool,
}

/// Writes `data` to `dst`, through `rewriter` when the rule rewrites (`eof`: the
/// stream ends after `data`, so what the rewriter held goes too); for a tunnel stream
/// (`keep`), retains it too, and a failed write is a lost link, not an error.
async fn pass_on(
    dst: &mut TcpStream,
    data: &[u8],
    eof: bool,
    rewriter: Option<&mut Rewriter>,
    keep: Option<&mut Retained>,
    counter: &AtomicU64,
    progress: &Progress,
) -> std::io::Result<()> {
    let data: Cow<[u8]> = match rewriter {
        Some(r) if !r.is_empty() => r.push(data, eof).into(),
        _ => data.into(),
    };
    if data.is_empty() {
        return Ok(());
    }
    match keep {
        Some(keep) => {
            keep.sent.extend_from_slice(&data);
            if !keep.lost && dst.write_all(&data).await.is_err() {
                keep.lost = true;
            }
        }
        None => dst.write_all(&data).await?,
    }
    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
    progress
        .via_userspace
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    progress.touch();
    Ok(())
}

fn fail(pair: &Pair, side: Side, error: std::io::Error) -> RelayEnd {
    reset_both_on_close(&pair.client, &pair.upstream);
    RelayEnd::Failed { side, error }
}

/// Answers 401 and lets the client read it: a FIN after the answer, and what the
/// client still sends is read and dropped (for up to a second) so that closing does
/// not turn into a reset that could destroy the answer in flight.
async fn unauthorized(pair: &mut Pair, why: &'static str) -> RelayEnd {
    // The upstream gets a plain close: it has been sent nothing. The client's close
    // must not destroy the answer.
    close_cleanly(&pair.client);
    let _ = pair.upstream.shutdown().await;
    let _ = pair.client.write_all(auth::UNAUTHORIZED).await;
    let _ = pair.client.shutdown().await;
    let drain = async {
        // On the heap: an array here would sit in every pair's prelude future (4 KiB
        // of each idle inspected pair) for an answer most pairs never give.
        let mut sink = vec![0u8; 4096];
        while matches!(pair.client.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    RelayEnd::Refused {
        reason: "http_auth",
        detail: why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::relay::splice::SpliceRelay;

    /// What an inspected pair holds for its whole life is the relay's outer block; the
    /// prelude's state is boxed apart and freed when the checks end. A buffer in a
    /// rarely taken branch (a 4 KiB drain array once) would sit in every pair's.
    #[tokio::test]
    async fn an_inspected_pair_holds_little_before_and_after_its_prelude() {
        let toml = "[[rule]]\nname = \"t\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:9\"\n\
                    inspect = { bytes = 64, format = \"text\", to = \"log\" }\n\
                    deny_pattern = ['^SSH-']\nhttp_auth = { header = \"X-Token\", token = \"t\" }\n";
        let rule = Config::from_toml(toml).unwrap().rules.remove(0);
        let relay = InspectRelay::new(&rule, Arc::new(SpliceRelay::default())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (upstream, _) = listener.accept().await.unwrap();
        let mut pair = Pair {
            client,
            upstream,
            tunnel: None,
        };
        let progress = Arc::new(Progress::default());
        let prelude = std::mem::size_of_val(&relay.prelude(&mut pair, &progress));
        assert!(prelude <= 1280, "the prelude's future is {prelude} bytes");
        let whole = relay.relay(pair, progress);
        let outer = std::mem::size_of_val(&*whole);
        assert!(
            outer <= 256,
            "an inspected pair's relay future is {outer} bytes"
        );
    }
}
