//! The tunnel's wire format: length-prefixed postcard frames.
//!
//! Every connection to the agent port starts with the server's `Challenge`. A control
//! connection then carries `Hello`/`Welcome` and afterwards acks, FINs, resets and
//! heartbeats. A data connection carries one header frame each way (`Data`, then
//! `Open` on a pooled one or `Resume` both ways on a reattached one) and then the
//! stream's raw bytes, which never pass through this module.
//!
//! Frames are read with exact reads (the 4-byte length, then the body), never through
//! a buffer, so not one raw byte after a header is consumed here.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version in `Hello`; a server refuses any other.
pub const VERSION: u16 = 1;

/// Larger frames are refused before their body is read: the biggest legitimate one is
/// a `Hello` listing services, or a resume listing streams.
pub const MAX_FRAME: usize = 256 * 1024;

pub type Nonce = [u8; 32];
pub type Mac = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Server → agent, first on every connection: what the agent's MAC must cover.
    Challenge {
        nonce: Nonce,
    },
    /// Agent → server: this is a control connection.
    Hello {
        version: u16,
        nonce: Nonce,
        /// HMAC(token, "ctl" ‖ server nonce ‖ agent nonce ‖ identity ‖ services).
        mac: Mac,
        /// Who this agent is across restarts (a new session of the same identity
        /// replaces the old one at once).
        identity: String,
        services: Vec<String>,
        /// The session to resume, and the streams the agent still holds.
        resume: Option<(u64, Vec<u64>)>,
    },
    /// Server → agent: accepted. `mac` proves the server knows the token too.
    Welcome {
        session: u64,
        mac: Mac,
        resumed: bool,
        grace_ms: u64,
        /// Bytes each side retains per stream and direction.
        resume_buffer: u64,
    },
    /// Either way: no, and why (logged by the other side).
    Refused {
        reason: String,
    },
    /// Agent → server: this is a data connection of `session`, for a new stream
    /// (`attach: None`, pooled) or to reattach stream `attach`.
    /// `mac` = HMAC(session key, "data" ‖ server nonce ‖ session ‖ attach).
    Data {
        session: u64,
        attach: Option<u64>,
        mac: Mac,
    },
    /// Server → agent on a pooled data connection: a visitor for `service`.
    Open {
        stream: u64,
        service: String,
        visitor: String,
        /// The rule's PROXY protocol header, for the agent to write to the target
        /// first (bytes written into the data connection would not be counted).
        proxy_header: Vec<u8>,
        /// The rule's `connect_timeout` (ms), which bounds the agent's connect to the
        /// target as it bounds a plain rule's connect to its upstream.
        connect_timeout_ms: u64,
    },
    /// Agent → server, control: the stream's target could not be connected (`why`,
    /// refused or timed out): the stream is gone, as with `Reset`, and the server
    /// counts it against the agent.
    Unreachable {
        stream: u64,
        service: String,
        why: String,
    },
    /// Both ways, first on a reattached data connection: bytes received so far.
    Resume {
        received: u64,
    },
    /// Control, both ways: bytes of `stream` received from the data connections.
    Ack {
        stream: u64,
        received: u64,
    },
    /// Control: the sender's source of `stream` ended after `at` bytes.
    Fin {
        stream: u64,
        at: u64,
    },
    /// Control: `stream` was reset (or its end could not be reached).
    Reset {
        stream: u64,
    },
    Ping,
    Pong,
    /// Agent → server, control: shutting down. No new stream for this agent: the
    /// server closes its pooled data connections (an `Open` already written on one
    /// is still served) and chooses other agents.
    Draining,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    TooLarge(usize),
    Malformed(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooLarge(n) => write!(f, "frame of {n} bytes (limit {MAX_FRAME})"),
            DecodeError::Malformed(e) => write!(f, "malformed frame: {e}"),
        }
    }
}

/// The 4-byte big-endian length prefix, checked against [`MAX_FRAME`].
pub fn body_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_FRAME {
        return Err(DecodeError::TooLarge(n));
    }
    Ok(n)
}

/// Decodes a frame body; trailing bytes are an error (a frame is exactly its length).
pub fn decode(body: &[u8]) -> Result<Frame, DecodeError> {
    match postcard::take_from_bytes::<Frame>(body) {
        Ok((frame, [])) => Ok(frame),
        Ok((_, rest)) => Err(DecodeError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        ))),
        Err(e) => Err(DecodeError::Malformed(e.to_string())),
    }
}

pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(frame, &mut out);
    out
}

/// Appends `frame`, length prefix and body, to `out` (frames written together share
/// one buffer).
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    *out = postcard::to_extend(frame, std::mem::take(out)).expect("frames always serialize");
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let n = body_len(prefix).map_err(invalid)?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    decode(&body).map_err(invalid)
}

pub async fn write_frame(w: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> std::io::Result<()> {
    w.write_all(&encode(frame)).await
}

fn invalid(e: DecodeError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames() -> impl Strategy<Value = Frame> {
        let nonce = any::<[u8; 32]>();
        prop_oneof![
            nonce.prop_map(|nonce| Frame::Challenge { nonce }),
            (
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                ".{0,40}",
                proptest::collection::vec(".{0,20}", 0..5),
                proptest::option::of((
                    any::<u64>(),
                    proptest::collection::vec(any::<u64>(), 0..20)
                ))
            )
                .prop_map(|(nonce, mac, identity, services, resume)| Frame::Hello {
                    version: VERSION,
                    nonce,
                    mac,
                    identity,
                    services,
                    resume
                }),
            (any::<u64>(), any::<Option<u64>>(), any::<[u8; 32]>()).prop_map(
                |(session, attach, mac)| Frame::Data {
                    session,
                    attach,
                    mac
                }
            ),
            (
                any::<u64>(),
                ".{0,20}",
                ".{0,40}",
                proptest::collection::vec(any::<u8>(), 0..64),
                any::<u64>()
            )
                .prop_map(
                    |(stream, service, visitor, proxy_header, connect_timeout_ms)| {
                        Frame::Open {
                            stream,
                            service,
                            visitor,
                            proxy_header,
                            connect_timeout_ms,
                        }
                    }
                ),
            (any::<u64>(), any::<u64>())
                .prop_map(|(stream, received)| Frame::Ack { stream, received }),
            (any::<u64>(), any::<u64>()).prop_map(|(stream, at)| Frame::Fin { stream, at }),
            any::<u64>().prop_map(|stream| Frame::Reset { stream }),
            (any::<u64>(), ".{0,20}", ".{0,40}").prop_map(|(stream, service, why)| {
                Frame::Unreachable {
                    stream,
                    service,
                    why,
                }
            }),
            Just(Frame::Ping),
            Just(Frame::Draining),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frame in frames()) {
            let wire = encode(&frame);
            let n = body_len(wire[..4].try_into().unwrap()).unwrap();
            prop_assert_eq!(n, wire.len() - 4);
            prop_assert_eq!(decode(&wire[4..]).unwrap(), frame);
        }

        #[test]
        fn frames_written_together_read_back_in_order(a in frames(), b in frames()) {
            let mut wire = Vec::new();
            encode_into(&a, &mut wire);
            encode_into(&b, &mut wire);
            let mut rest = &wire[..];
            for frame in [a, b] {
                let n = body_len(rest[..4].try_into().unwrap()).unwrap();
                prop_assert_eq!(decode(&rest[4..4 + n]).unwrap(), frame);
                rest = &rest[4 + n..];
            }
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn truncated_frames_are_errors_not_panics(frame in frames(), cut in any::<prop::sample::Index>()) {
            let wire = encode(&frame);
            let body = &wire[4..];
            let cut = cut.index(body.len().max(1));
            if cut < body.len() {
                prop_assert!(decode(&body[..cut]).is_err());
            }
        }

        #[test]
        fn random_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&body);
        }

        #[test]
        fn oversized_lengths_are_refused_before_reading(n in (MAX_FRAME as u32 + 1)..=u32::MAX) {
            prop_assert_eq!(body_len(n.to_be_bytes()), Err(DecodeError::TooLarge(n as usize)));
        }

        #[test]
        fn trailing_bytes_are_refused(frame in frames(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
            let mut wire = encode(&frame);
            wire.extend_from_slice(&extra);
            prop_assert!(decode(&wire[4..]).is_err());
        }
    }

    #[tokio::test]
    async fn read_frame_stops_at_the_frame_end() {
        let mut wire = encode(&Frame::Resume { received: 7 });
        wire.extend_from_slice(b"raw bytes");
        let mut r = &wire[..];
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            Frame::Resume { received: 7 }
        );
        assert_eq!(r, b"raw bytes");
    }
}
