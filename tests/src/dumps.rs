//! Inspection dumps (`inspect`), parsed back: the text and hex formats, from a dump
//! file or from the forwarder's log.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::Forwarder;

// ---------------------------------------------------------------------------------
// Dumps, parsed back
// ---------------------------------------------------------------------------------

/// One dump chunk: its header's fields and the bytes its body shows.
#[derive(Debug)]
pub struct Chunk {
    /// `>` client to upstream, `<` upstream to client.
    pub arrow: char,
    pub rule: String,
    pub conn: u64,
    pub from: u64,
    pub to: u64,
    pub data: Vec<u8>,
}

/// The header's fields, exactly `A TIMESTAMP rule=R conn=N length=L from=F to=T`.
pub fn parse_header(line: &str) -> Option<(char, String, u64, u64, u64, u64)> {
    let t: Vec<&str> = line.split(' ').collect();
    if t.len() != 7 || !(t[0] == ">" || t[0] == "<") {
        return None;
    }
    let ts = t[1];
    let ts_ok = ts.len() == 27
        && ts.ends_with('Z')
        && ts.as_bytes()[4] == b'-'
        && ts.as_bytes()[10] == b'T'
        && ts.as_bytes()[19] == b'.';
    let kv = |s: &str, k: &str| s.strip_prefix(k)?.strip_prefix('=').map(str::to_string);
    let n = |s: &str, k: &str| kv(s, k)?.parse::<u64>().ok();
    if !ts_ok {
        return None;
    }
    Some((
        t[0].chars().next()?,
        kv(t[2], "rule")?,
        n(t[3], "conn")?,
        n(t[4], "length")?,
        n(t[5], "from")?,
        n(t[6], "to")?,
    ))
}

/// A line of the forwarder's own (text) log: `TIMESTAMP  LEVEL ...`.
pub fn is_log_line(l: &str) -> bool {
    let Some((ts, rest)) = l.split_once(' ') else {
        return false;
    };
    let b = ts.as_bytes();
    b.len() >= 20
        && ts.ends_with('Z')
        && b[4] == b'-'
        && b[10] == b'T'
        && ["TRACE ", "DEBUG ", "INFO ", "WARN ", "ERROR "]
            .iter()
            .any(|lvl| rest.trim_start().starts_with(lvl))
}

/// Decodes a text chunk's body: printable ASCII kept, `\xNN` a byte, lines joined
/// by `\n`; the newlines the renderer may drop at the end (it adds one after data
/// that lacks it, the log trims trailing ones) are restored from `length`.
pub fn decode_text(body: &[&str], length: u64) -> Vec<u8> {
    let joined = body.join("\n");
    let b = joined.as_bytes();
    for &c in b {
        assert!(
            c == b'\n' || (0x20..=0x7e).contains(&c),
            "a raw byte {c:#04x} in a text dump: {body:?}"
        );
    }
    let hexval = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            if let (Some(h), Some(l)) = (
                b.get(i + 2).copied().and_then(hexval),
                b.get(i + 3).copied().and_then(hexval),
            ) {
                out.push(h << 4 | l);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    assert!(
        out.len() as u64 <= length,
        "text body decodes to {} bytes, the header says length={length}: {body:?}",
        out.len()
    );
    out.resize(length as usize, b'\n');
    out
}

/// Decodes a hex chunk's body: `{offset:08x} ` then ` {byte:02x}` per byte, 16 a line.
pub fn decode_hex(body: &[&str], from: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, line) in body.iter().enumerate() {
        let (off, bytes) = line
            .split_at_checked(8)
            .unwrap_or_else(|| panic!("short hex line {line:?}"));
        let off = u64::from_str_radix(off, 16)
            .unwrap_or_else(|_| panic!("no offset in hex line {line:?}"));
        assert_eq!(off, from + 16 * i as u64, "offset of hex line {line:?}");
        let bytes = bytes
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("hex line {line:?}"));
        let vals: Vec<u8> = bytes
            .split(' ')
            .skip(1)
            .map(|h| {
                assert_eq!(h.len(), 2, "hex byte {h:?} in {line:?}");
                u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("hex byte {h:?}"))
            })
            .collect();
        let rebuilt: String = vals.iter().map(|v| format!(" {v:02x}")).collect();
        assert_eq!(bytes, rebuilt, "hex line layout {line:?}");
        assert!(
            !vals.is_empty() && vals.len() <= 16,
            "hex line with {} bytes",
            vals.len()
        );
        assert!(
            i + 1 == body.len() || vals.len() == 16,
            "a short hex line before the last: {body:?}"
        );
        out.extend(vals);
    }
    assert_eq!(out.len() as u64, length, "hex body length: {body:?}");
    out
}

/// The chunks of `only_rule` in `lines`: a chunk starts at a header (found in the line by `header`,
/// which returns the header text) and its body runs to the next header or log line.
pub fn parse_chunks(
    lines: &[&str],
    header: fn(&str) -> Option<&str>,
    only_rule: &str,
    hex: bool,
) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some((arrow, rule, conn, length, from, to)) = header(lines[i]).and_then(parse_header)
        else {
            i += 1;
            continue;
        };
        let start = i + 1;
        let mut end = start;
        while end < lines.len()
            && header(lines[end]).and_then(parse_header).is_none()
            && !is_log_line(lines[end])
        {
            end += 1;
        }
        let body = &lines[start..end];
        i = end;
        if rule != only_rule {
            continue;
        }
        let data = if hex {
            decode_hex(body, from, length)
        } else {
            decode_text(body, length)
        };
        chunks.push(Chunk {
            arrow,
            rule,
            conn,
            from,
            to,
            data,
        });
    }
    chunks
}

/// A dump file's header line is the header.
pub fn file_header(l: &str) -> Option<&str> {
    Some(l)
}

/// A log line carries the header after its timestamp and level.
pub fn log_header(l: &str) -> Option<&str> {
    is_log_line(l).then_some(())?;
    Some(l.split_once(" INFO ")?.1)
}

/// The bytes one direction's chunks show, checking that they follow each other
/// (`from` where the previous ended, `to` its last byte's offset).
pub fn stream(chunks: &[Chunk], arrow: char) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks.iter().filter(|c| c.arrow == arrow) {
        assert_eq!(
            c.from,
            out.len() as u64,
            "chunk does not continue the stream: {c:?}"
        );
        assert_eq!(c.to, c.from + c.data.len() as u64 - 1, "to= of {c:?}");
        out.extend_from_slice(&c.data);
    }
    out
}

/// The dump files in `dir`: exactly one, `<rule>-<conn>.log`, mode 0600; its chunks.
pub fn dump_file(dir: &Path, rule: &str, hex: bool) -> Vec<Chunk> {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one dump file per connection: {files:?}");
    let path = &files[0];
    let name = path.file_name().unwrap().to_str().unwrap();
    let conn: u64 = name
        .strip_prefix(&format!("{rule}-"))
        .and_then(|n| n.strip_suffix(".log"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("dump file {name:?} is not {rule}-<conn>.log"));
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "mode of {}",
        path.display()
    );
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "dump file ends mid-line: {text:?}");
    let lines: Vec<&str> = text[..text.len() - 1].split('\n').collect();
    assert!(
        lines.first().and_then(|l| parse_header(l)).is_some(),
        "dump file does not start with a chunk header: {text:?}"
    );
    let chunks = parse_chunks(&lines, file_header, rule, hex);
    let headers = lines.iter().filter(|l| parse_header(l).is_some()).count();
    assert_eq!(headers, chunks.len(), "chunks of another rule in {name}");
    for c in &chunks {
        assert_eq!(
            (c.rule.as_str(), c.conn),
            (rule, conn),
            "chunk of {name}: {c:?}"
        );
    }
    chunks
}

/// The chunks of `rule` in the forwarder's log (each chunk a log event: the header
/// after the log's own timestamp and level, the body on the lines after it).
pub fn dump_log(fwd: &Forwarder, rule: &str, hex: bool) -> Vec<Chunk> {
    let lines = fwd.stderr.snapshot();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mine = parse_chunks(&lines, log_header, rule, hex);
    let conns: std::collections::BTreeSet<u64> = mine.iter().map(|c| c.conn).collect();
    assert_eq!(
        conns.len(),
        1,
        "one connection's chunks for {rule}: {mine:?}"
    );
    mine
}
