//! What the kernel tells us about CPU time and memory: /proc and a few syscalls.

use std::collections::BTreeMap;
use std::fs;

use anyhow::{bail, Context, Result};

/// Seconds between two readings of a tick counter (/proc/PID/stat, /proc/stat); 0 when
/// the second is lower (a process of the tree exited between the two).
pub fn secs_between(before: u64, after: u64) -> f64 {
    after.saturating_sub(before) as f64 / clk_tck()
}

/// Clock ticks per second of the times in /proc/PID/stat and /proc/stat.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads, live and exited), in ticks.
pub fn process_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("malformed {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let num = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("malformed {path}"))
    };
    Ok(num(11)? + num(12)?)
}

/// Non-idle CPU time of the whole machine in ticks: user, nice, system, irq, softirq, steal
/// (guest time is already inside user).
pub fn machine_busy_ticks() -> Result<u64> {
    let text = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    if v.len() < 8 {
        bail!("short cpu line in /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal
    Ok(v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

/// A `Key:   123 kB` value of /proc/PID/status, in KiB.
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    kib_field(&text, key).with_context(|| format!("no {key} in {path}"))
}

/// A `Key:   123 kB` value of /proc/meminfo, in KiB.
pub fn meminfo_kib(key: &str) -> Result<u64> {
    let text = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    kib_field(&text, key).with_context(|| format!("no {key} in /proc/meminfo"))
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Bytes held by allocated slab objects per slab cache (active_objs x objsize from
/// /proc/slabinfo). Unlike meminfo's Slab this does not count empty slabs the allocator
/// keeps cached, so it does not depend on what earlier runs freed. None when unreadable
/// (not root).
pub fn slab_by_cache() -> Option<BTreeMap<String, u64>> {
    let text = fs::read_to_string("/proc/slabinfo").ok()?;
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let active: u64 = f[1].parse().ok()?;
        let size: u64 = f[3].parse().ok()?;
        *out.entry(f[0].to_string()).or_insert(0) += active * size;
    }
    Some(out)
}

/// Raises RLIMIT_NOFILE to `want` (root may go past the hard limit), else to the hard
/// limit. Children (the forwarder) inherit it. Returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: cur is a valid rlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return 1024;
    }
    if cur.rlim_cur >= want {
        return cur.rlim_cur;
    }
    let wanted = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(cur.rlim_max),
    };
    // SAFETY: a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
        return want;
    }
    let hard = libc::rlimit {
        rlim_cur: cur.rlim_max,
        rlim_max: cur.rlim_max,
    };
    // SAFETY: a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &hard) } == 0 {
        cur.rlim_max
    } else {
        cur.rlim_cur
    }
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// The parent PID from /proc/PID/stat.
pub fn ppid(pid: u32) -> Option<u32> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    // rest starts at field 3 (state); ppid is field 4.
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Entries in /proc/PID/fd.
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Local ports of IPv4 TCP sockets in LISTEN state (/proc/net/tcp).
pub fn listening_ports() -> std::collections::BTreeSet<u16> {
    let text = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let port = f.get(1)?.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}
