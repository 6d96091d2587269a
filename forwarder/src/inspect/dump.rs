//! The traffic dump (`inspect`): socat `-v` style chunks, to our log or to one file
//! per connection.
//!
//! ```text
//! > 2026-11-29T18:00:00.123456Z rule=web conn=17 length=6 from=0 to=5
//! hello
//! ```
//! `>` is client → upstream, `<` upstream → client; `from`/`to` are the first and last
//! byte's offsets in that direction's stream. Text keeps printable ASCII and newlines
//! and writes every other byte (and `\`) as `\xNN`; hex writes 16 bytes a line after
//! the offset.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{DumpFormat, Inspect};

/// How many taken file names (an earlier run's dumps) one connection skips before it
/// gives up its dump: runs that left thousands behind are told to clear them.
const MAX_SKIPPED: u32 = 10_000;

/// One connection's dump: at most `bytes` per direction.
pub struct Dump {
    rule: String,
    conn: u64,
    format: DumpFormat,
    limit: u64,
    /// Bytes shown so far, [to_upstream, to_client].
    shown: [u64; 2],
    file: Option<std::fs::File>,
}

impl Dump {
    /// The dump of the next connection, numbered from `conns` (`conn=`). When it goes
    /// to a directory, its file `<rule>-<conn>.log` is made new (mode 0600): a number
    /// whose file exists (an earlier run's: numbers start at 1 in each process) is
    /// skipped, and a symlink in its place is not followed, so a dump never lands in
    /// another connection's file, or in any file but its own.
    pub fn new(cfg: &Inspect, rule: &str, conns: &AtomicU64) -> std::io::Result<Dump> {
        let mut conn = conns.fetch_add(1, Ordering::Relaxed);
        let file = match &cfg.dir {
            None => None,
            Some(dir) => {
                let mut skipped = 0;
                loop {
                    let path = dir.join(format!("{rule}-{conn}.log"));
                    match std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                    {
                        Ok(f) => break Some(f),
                        Err(e)
                            if e.kind() == std::io::ErrorKind::AlreadyExists
                                && skipped < MAX_SKIPPED =>
                        {
                            skipped += 1;
                            conn = conns.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            return Err(std::io::Error::new(
                                e.kind(),
                                format!("{}: {e}", path.display()),
                            ))
                        }
                    }
                }
            }
        };
        Ok(Dump {
            rule: rule.to_string(),
            conn,
            format: cfg.format,
            limit: cfg.bytes,
            shown: [0; 2],
            file,
        })
    }

    /// Bytes direction `d` still shows.
    pub fn wants(&self, d: usize) -> u64 {
        self.limit - self.shown[d]
    }

    /// Shows (the part within the limit of) `data`, the next bytes of direction `d`.
    pub fn record(&mut self, d: usize, data: &[u8]) {
        let take = (self.wants(d) as usize).min(data.len());
        if take == 0 {
            return;
        }
        let from = self.shown[d];
        let chunk = render(&self.rule, self.conn, self.format, d, from, &data[..take]);
        self.shown[d] += take as u64;
        match &mut self.file {
            Some(f) => {
                if let Err(e) = f.write_all(chunk.as_bytes()) {
                    tracing::warn!(
                        "inspect rule={} conn={}: cannot write the dump: {e}",
                        self.rule,
                        self.conn
                    );
                    self.file = None;
                    self.limit = 0;
                }
            }
            None => tracing::info!("{}", chunk.trim_end_matches('\n')),
        }
    }
}

/// One chunk: the header line, then the data.
pub fn render(
    rule: &str,
    conn: u64,
    format: DumpFormat,
    d: usize,
    from: u64,
    data: &[u8],
) -> String {
    let arrow = if d == 0 { '>' } else { '<' };
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let to = from + data.len() as u64 - 1;
    let mut out = format!(
        "{arrow} {now} rule={rule} conn={conn} length={} from={from} to={to}\n",
        data.len()
    );
    match format {
        DumpFormat::Text => {
            for &b in data {
                match b {
                    // A backslash is escaped too, so every `\` in a dump starts an escape.
                    b'\n' | 0x20..=0x5b | 0x5d..=0x7e => out.push(b as char),
                    _ => {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
            }
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
        DumpFormat::Hex => {
            for (i, line) in data.chunks(16).enumerate() {
                let _ = write!(out, "{:08x} ", from + 16 * i as u64);
                for b in line {
                    let _ = write!(out, " {b:02x}");
                }
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_hex() {
        let t = render("web", 17, DumpFormat::Text, 0, 0, b"GET /\r\nx\x00");
        let (head, body) = t.split_once('\n').unwrap();
        assert!(head.starts_with("> 20"), "{head}");
        assert!(
            head.ends_with(" rule=web conn=17 length=9 from=0 to=8"),
            "{head}"
        );
        assert_eq!(body, "GET /\\x0d\nx\\x00\n");
        let h = render("web", 1, DumpFormat::Hex, 1, 16, &[0xab; 17]);
        let lines: Vec<&str> = h.lines().collect();
        assert!(lines[0].starts_with("< "));
        assert_eq!(lines[1], format!("00000010 {}", " ab".repeat(16)));
        assert_eq!(lines[2], "00000020  ab");
    }
}
