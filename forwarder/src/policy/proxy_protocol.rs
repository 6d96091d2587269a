//! PROXY protocol v1 (text) and v2 (binary), as specified by HAProxy: written to an
//! upstream so it sees the real client address, and read strictly from a front load
//! balancer on listeners that ask for it. The `ppp` crate encodes and parses; what is
//! ours is reading exactly the header's bytes off the socket (never a payload byte:
//! they are spliced afterwards), the payload cap, and which headers we accept.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ppp::v2::{AddressFamily, Command, Protocol};
use ppp::{v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyProtocol;

const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line, CRLF included.
const V1_MAX: usize = 107;
/// Addresses and TLVs (a front balancer's SSL fields and certificate names can pass
/// 1 KiB): 16 KiB, HAProxy's buffer size, which it accepts; bigger is refused.
const V2_MAX_PAYLOAD: usize = 16 * 1024;

/// The header to write to an upstream for a client `src` that connected to `dst`.
pub fn encode(version: ProxyProtocol, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let addrs = same_family(src, dst);
    match version {
        ProxyProtocol::V1 => v1::Addresses::from(addrs).to_string().into_bytes(),
        ProxyProtocol::V2 => {
            v2::Builder::with_addresses(v2::Version::Two | Command::Proxy, Protocol::Stream, addrs)
                .build()
                // Writes into a Vec of a known size: nothing can fail.
                .expect("a PROXY v2 header of two addresses")
        }
    }
}

/// The header for a connection of our own (a health check): v2's LOCAL command, v1's
/// UNKNOWN, which the spec gives for that case; the receiver uses the real addresses.
pub fn encode_local(version: ProxyProtocol) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => v1::Addresses::Unknown.to_string().into_bytes(),
        ProxyProtocol::V2 => v2::Builder::with_addresses(
            v2::Version::Two | Command::Local,
            Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .expect("a PROXY v2 LOCAL header"),
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Both addresses in one family: IPv4 when both can be, mapped IPv6 otherwise.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (src.ip().to_canonical(), dst.ip().to_canonical());
    if s.is_ipv4() == d.is_ipv4() {
        return (
            SocketAddr::new(s, src.port()),
            SocketAddr::new(d, dst.port()),
        );
    }
    (
        SocketAddr::new(IpAddr::V6(to_v6(s)), src.port()),
        SocketAddr::new(IpAddr::V6(to_v6(d)), dst.port()),
    )
}

/// What a received header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The real client and the address it connected to.
    Proxied { src: SocketAddr, dst: SocketAddr },
    /// `PROXY UNKNOWN`, v2 LOCAL or AF_UNSPEC: use the connection's own addresses.
    Local,
}

/// The crate's address block (one type for its v1 and v2 headers) as ours.
impl From<v1::IPv4> for Header {
    fn from(a: v1::IPv4) -> Header {
        proxied(
            a.source_address,
            a.source_port,
            a.destination_address,
            a.destination_port,
        )
    }
}

impl From<v1::IPv6> for Header {
    fn from(a: v1::IPv6) -> Header {
        proxied(
            a.source_address,
            a.source_port,
            a.destination_address,
            a.destination_port,
        )
    }
}

fn proxied(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Header {
    Header::Proxied {
        src: SocketAddr::new(src.into(), sport),
        dst: SocketAddr::new(dst.into(), dport),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// The header is `len` bytes long.
    Complete { header: Header, len: usize },
    /// At least this many more bytes are needed (never more than the header holds, so
    /// reading exactly that many never consumes payload).
    Need(usize),
}

/// Strict parser over the bytes received so far.
pub fn parse(buf: &[u8]) -> Result<Parse, String> {
    let sig = v2::PROTOCOL_PREFIX;
    let n = buf.len().min(sig.len());
    if buf[..n] == sig[..n] {
        return parse_v2(buf);
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return parse_v1(buf);
    }
    Err("not a PROXY protocol header".into())
}

fn parse_v1(buf: &[u8]) -> Result<Parse, String> {
    // The line ends at its CRLF, within 107 bytes; until then we only wait (the crate
    // takes a line cut between words, "... 80 ", for a malformed one).
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX || buf.contains(&b'\n') {
            return Err("v1 header has no CRLF within 107 bytes".into());
        }
        return Ok(Parse::Need(1));
    };
    let line = &buf[..end];
    let h = match v1::Header::try_from(&buf[..end + 2]) {
        Ok(h) => h,
        // The spec has a receiver ignore whatever follows UNKNOWN up to the CRLF; the
        // crate reads at most four words there.
        Err(_) if line == b"PROXY UNKNOWN" || line.starts_with(b"PROXY UNKNOWN ") => {
            return Ok(Parse::Complete {
                header: Header::Local,
                len: end + 2,
            });
        }
        Err(e) => {
            let line = String::from_utf8_lossy(line);
            return Err(format!("malformed v1 header {line:?}: {e}"));
        }
    };
    let header = match h.addresses {
        v1::Addresses::Unknown => Header::Local,
        v1::Addresses::Tcp4(a) => a.into(),
        v1::Addresses::Tcp6(a) => a.into(),
    };
    Ok(Parse::Complete {
        header,
        len: end + 2,
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parse, String> {
    // The payload's length is known from the first 16 bytes: cap it before waiting
    // for it, and ask for exactly the rest of the header.
    if buf.len() >= 16 {
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if len > V2_MAX_PAYLOAD {
            return Err(format!("v2 header: {len} byte payload is too long"));
        }
    }
    let h = match v2::Header::try_from(buf) {
        Ok(h) => h,
        Err(v2::ParseError::Incomplete(have)) => return Ok(Parse::Need(16 - have)),
        Err(v2::ParseError::Partial(have, len)) => return Ok(Parse::Need(len - have)),
        Err(e) => return Err(format!("v2 header: {e}")),
    };
    let header = match (h.command, h.address_family(), h.protocol, &h.addresses) {
        (Command::Local, ..) => Header::Local,
        (_, AddressFamily::Unspecified, Protocol::Unspecified, _) => Header::Local,
        (_, _, Protocol::Stream, v2::Addresses::IPv4(a)) => (*a).into(),
        (_, _, Protocol::Stream, v2::Addresses::IPv6(a)) => (*a).into(),
        // Valid combinations we have no use for (UDP over IPv4 or IPv6, UNIX sockets):
        // the spec has a receiver fall back to UNSPEC, the connection's own addresses,
        // as HAProxy does; any other family/protocol pair is malformed.
        (_, AddressFamily::Unix, Protocol::Stream | Protocol::Datagram, _)
        | (_, AddressFamily::IPv4 | AddressFamily::IPv6, Protocol::Datagram, _) => Header::Local,
        _ => {
            return Err(format!(
                "v2 header: unsupported family/protocol 0x{:02x}",
                buf[13]
            ))
        }
    };
    // After the address block, TLVs (type, 2-byte length, value) fill the rest exactly:
    // one that runs past the header is malformed (HAProxy refuses it too).
    if let Some(Err(e)) = h.tlvs().find(Result::is_err) {
        return Err(format!("v2 header: {e}"));
    }
    Ok(Parse::Complete {
        header,
        len: h.len(),
    })
}

/// Reads exactly one header from a fresh connection, consuming nothing after it.
pub async fn read(stream: &mut TcpStream, timeout: Duration) -> Result<Header, String> {
    let read = async {
        let mut buf = Vec::with_capacity(64);
        let mut need = 8;
        loop {
            let have = buf.len();
            buf.resize(have + need, 0);
            stream
                .read_exact(&mut buf[have..])
                .await
                .map_err(|e| format!("reading PROXY header: {e}"))?;
            match parse(&buf)? {
                Parse::Complete { header, len } => {
                    debug_assert_eq!(len, buf.len());
                    return Ok(header);
                }
                Parse::Need(n) => need = n,
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| format!("no complete PROXY header within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_known_answers() {
        let h = encode(
            ProxyProtocol::V1,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:443"),
        );
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let h = encode(ProxyProtocol::V1, sa("[::1]:5"), sa("127.0.0.1:6"));
        assert_eq!(h, b"PROXY TCP6 ::1 ::ffff:127.0.0.1 5 6\r\n");
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\nGET /"),
            Ok(Parse::Complete {
                header: Header::Local,
                len: 15
            })
        );
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n"[..],
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(b"PROXY TCP4 1.2"), Ok(Parse::Need(1)));
        assert!(parse(&[b'P'; 2]).is_err());
        // Whatever follows UNKNOWN is ignored up to the CRLF, however many words.
        let unknown = b"PROXY UNKNOWN ffff::1 ffff::2 1 2 and more\r\nGET /";
        assert_eq!(
            parse(unknown),
            Ok(Parse::Complete {
                header: Header::Local,
                len: unknown.len() - 5
            })
        );
        // A line that cannot end well is refused before it reads payload: a LF alone,
        // a CR alone and no CRLF within 107 bytes.
        assert!(parse(b"PROXY TCP4 1.2.3.4\n").is_err());
        let mut cr = b"PROXY TCP4\r1.2.3.4".to_vec();
        while let Ok(Parse::Need(n)) = parse(&cr) {
            assert!(cr.len() < 107, "{:?}", String::from_utf8_lossy(&cr));
            cr.extend(std::iter::repeat_n(b'1', n));
        }
        assert!(parse(&cr).is_err());
    }

    #[test]
    fn v2_known_answer() {
        let h = encode(ProxyProtocol::V2, sa("1.2.3.4:1000"), sa("5.6.7.8:80"));
        let mut want = v2::PROTOCOL_PREFIX.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 0x03, 0xe8, 0, 80]);
        assert_eq!(h, want);
        assert_eq!(parse(&h[..10]), Ok(Parse::Need(6)));
        assert_eq!(parse(&h[..16]), Ok(Parse::Need(12)));
        let mut local = v2::PROTOCOL_PREFIX.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse(&local),
            Ok(Parse::Complete {
                header: Header::Local,
                len: 16
            })
        );
        let mut v3 = h.clone();
        v3[12] = 0x31;
        assert!(parse(&v3).is_err());
        // TLVs are skipped, up to 16 KiB of payload (front balancers' SSL fields and
        // certificate names pass 1 KiB, which was the limit); more is refused.
        for (tlvs, ok) in [
            (2000, true),
            (16 * 1024 - 12, true),
            (16 * 1024 - 11, false),
        ] {
            let mut big = h.clone();
            big[14..16].copy_from_slice(&((12 + tlvs) as u16).to_be_bytes());
            // One PP2_TYPE_NOOP TLV filling them.
            big.push(0x04);
            big.extend_from_slice(&((tlvs - 3) as u16).to_be_bytes());
            big.extend(std::iter::repeat_n(0u8, tlvs - 3));
            let Ok(Parse::Complete { header: plain, .. }) = parse(&h) else {
                unreachable!()
            };
            match parse(&big) {
                Ok(Parse::Complete { header, len }) if ok => {
                    assert_eq!((header, len), (plain, big.len()))
                }
                Err(e) if !ok => assert!(e.contains("too long"), "{e}"),
                other => panic!("{tlvs} bytes of TLVs: {other:?}"),
            }
        }
        // UDP and UNIX addresses fall back to the connection's own (UNSPEC); unknown
        // families and short address blocks stay malformed.
        for (fam, len, ok) in [
            (0x12, 12, true),
            (0x22, 36, true),
            (0x31, 216, true),
            (0x32, 216, true),
            (0x22, 12, false),
            (0x31, 36, false),
            (0x13, 12, false),
            (0x41, 12, false),
        ] {
            let mut v = v2::PROTOCOL_PREFIX.to_vec();
            v.extend_from_slice(&[0x21, fam, 0, len as u8]);
            v.resize(16 + len, 7);
            let want = Parse::Complete {
                header: Header::Local,
                len: 16 + len,
            };
            assert_eq!(
                parse(&v) == Ok(want),
                ok,
                "family 0x{fam:02x}, {len} bytes: {:?}",
                parse(&v)
            );
        }
    }

    #[test]
    fn v2_tlvs_must_fit_the_header() {
        let tcp4 = |tlvs: &[u8]| {
            let mut v = v2::PROTOCOL_PREFIX.to_vec();
            v.extend_from_slice(&[0x21, 0x11, 0, (12 + tlvs.len()) as u8]);
            v.extend_from_slice(&[10, 2, 0, 1, 10, 2, 0, 2, 0, 7, 0, 8]);
            v.extend_from_slice(tlvs);
            parse(&v)
        };
        // A NOOP of 2 bytes and an empty one: fine.
        assert!(matches!(
            tcp4(&[0x04, 0, 2, 9, 9, 0x04, 0, 0]),
            Ok(Parse::Complete { .. })
        ));
        // A value longer than what is left, a head cut short.
        assert!(tcp4(&[0xee, 0x02, 0x58]).is_err());
        assert!(tcp4(&[0x04, 0, 3, 9, 9]).is_err());
        assert!(tcp4(&[0x04, 0]).is_err());
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
        ]
    }

    proptest! {
        #[test]
        fn round_trips_with_payload_untouched(v2 in any::<bool>(), src in any_addr(), dst in any_addr(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let version = if v2 { ProxyProtocol::V2 } else { ProxyProtocol::V1 };
            let mut bytes = encode(version, src, dst);
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            let (s, d) = same_family(src, dst);
            prop_assert_eq!(parse(&bytes), Ok(Parse::Complete { header: Header::Proxied { src: s, dst: d }, len }));
            // Fed byte by byte as the reader does, it never asks for more than the header.
            let mut have = 0;
            let mut need = 8.min(len);
            loop {
                have += need;
                prop_assert!(have <= len);
                match parse(&bytes[..have]) {
                    Ok(Parse::Need(n)) => need = n,
                    Ok(Parse::Complete { len: l, .. }) => { prop_assert_eq!(l, have); break; }
                    Err(e) => prop_assert!(false, "{}", e),
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_overread(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            match parse(&bytes) {
                Ok(Parse::Complete { len, .. }) => prop_assert!(len <= bytes.len()),
                Ok(Parse::Need(n)) => prop_assert!(n >= 1),
                Err(_) => {}
            }
        }

        #[test]
        fn mutated_headers_never_panic(v2 in any::<bool>(), src in any_addr(), dst in any_addr(), at in any::<usize>(), byte in any::<u8>()) {
            let version = if v2 { ProxyProtocol::V2 } else { ProxyProtocol::V1 };
            let mut bytes = encode(version, src, dst);
            let i = at % bytes.len();
            bytes[i] = byte;
            let _ = parse(&bytes);
        }
    }
}
