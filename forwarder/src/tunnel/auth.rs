//! Tunnel authentication. The token never crosses the wire: the control connection
//! answers the server's fresh challenge with HMAC-SHA256(token, ...), the server
//! answers back (so an agent knows it reached a server with the same token), and each
//! session gets its own key (HKDF-SHA256 over the token, salted with both nonces) that
//! every data connection uses to answer its own fresh challenge. A recorded header
//! answers a challenge that is never asked again, so replaying it fails.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use super::proto::{Mac, Nonce};

type HmacSha256 = Hmac<Sha256>;

pub fn nonce() -> Nonce {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).expect("the kernel's random source");
    n
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m
}

pub fn sign(key: &[u8], parts: &[&[u8]]) -> Mac {
    mac(key, parts).finalize().into_bytes().into()
}

/// Constant-time comparison (the `hmac` crate's `verify_slice`).
pub fn verify(key: &[u8], parts: &[&[u8]], tag: &Mac) -> bool {
    mac(key, parts).verify_slice(tag).is_ok()
}

/// The control connection's proof: over both nonces and what the agent claims.
pub fn hello_parts<'a>(
    server: &'a Nonce,
    agent: &'a Nonce,
    identity: &'a str,
    services: &'a str,
) -> [&'a [u8]; 5] {
    [
        b"ctl",
        server,
        agent,
        identity.as_bytes(),
        services.as_bytes(),
    ]
}

pub fn welcome_parts<'a>(
    server: &'a Nonce,
    agent: &'a Nonce,
    session: &'a [u8; 8],
) -> [&'a [u8]; 4] {
    [b"srv", agent, server, session]
}

/// A session's key, from which data connections prove they belong to it.
pub fn session_key(token: &[u8], server: &Nonce, agent: &Nonce) -> [u8; 32] {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(server);
    salt[32..].copy_from_slice(agent);
    let hk = hkdf::Hkdf::<Sha256>::new(Some(&salt), token);
    let mut key = [0u8; 32];
    hk.expand(b"forwarder tunnel session v1", &mut key)
        .expect("32 bytes is a valid HKDF output");
    key
}

pub fn data_parts<'a>(
    nonce: &'a Nonce,
    session: &'a [u8; 8],
    attach: &'a [u8; 9],
) -> [&'a [u8]; 4] {
    [b"data", nonce, session, attach]
}

/// `attach` in a fixed form for the MAC.
pub fn attach_bytes(attach: Option<u64>) -> [u8; 9] {
    let mut b = [0u8; 9];
    if let Some(s) = attach {
        b[0] = 1;
        b[1..].copy_from_slice(&s.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_every_part() {
        let (s, a) = (nonce(), nonce());
        let tag = sign(b"token", &hello_parts(&s, &a, "id", "web"));
        assert!(verify(b"token", &hello_parts(&s, &a, "id", "web"), &tag));
        assert!(!verify(b"other", &hello_parts(&s, &a, "id", "web"), &tag));
        assert!(!verify(b"token", &hello_parts(&a, &s, "id", "web"), &tag));
        assert!(!verify(b"token", &hello_parts(&s, &a, "id", "web2"), &tag));
        let k1 = session_key(b"token", &s, &a);
        assert_ne!(k1, session_key(b"token", &s, &nonce()));
        assert_ne!(&k1[..], b"token");
    }
}
