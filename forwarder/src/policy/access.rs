//! Allow/deny by client network, checked before any upstream connection is made.

use std::net::IpAddr;

use crate::config::Access;

impl Access {
    /// With a non-empty allow list only matching clients pass; deny always wins.
    pub fn permits(&self, ip: IpAddr) -> bool {
        // A v4 client on a dual-stack listener shows up as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip)))
            && !self.deny.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(allow: &[&str], deny: &[&str]) -> Access {
        Access {
            allow: allow.iter().map(|s| s.parse().unwrap()).collect(),
            deny: deny.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn allow_then_deny() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = access(&["127.0.0.1/32", "::1/128"], &[]);
        assert!(a.permits(ip("127.0.0.1")));
        assert!(a.permits(ip("::ffff:127.0.0.1")));
        assert!(a.permits(ip("::1")));
        assert!(!a.permits(ip("127.0.0.2")));
        let d = access(&[], &["10.0.0.0/8"]);
        assert!(d.permits(ip("11.0.0.1")));
        assert!(!d.permits(ip("10.2.3.4")));
        assert!(Access::default().permits(ip("8.8.8.8")));
        let both = access(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(both.permits(ip("10.2.0.1")));
        assert!(!both.permits(ip("10.1.0.1")));
    }
}
