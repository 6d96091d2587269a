//! `cargo xtask bench`: direct vs splice vs ebpf on loopback.
//!
//! The upstream servers (bulk sink/source, echo, idle holder) and the load generators run
//! in this process on threads; the forwarder runs as a child with one rule per server.
//! For each repetition, each mode in turn: idle-connection memory, 64 B ping-pong
//! latency, connection rate, then bulk throughput one way and the other with 1 and 8
//! streams (forwarder and machine CPU are read around the bulk windows). The table gives
//! the medians over the repetitions; target/bench/latest.{md,json} keep them, and the
//! JSON keeps every sample.

mod forwarder;
mod load;
mod procfs;
mod report;
mod servers;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::json;

use forwarder::{Forwarder, Unavailable};
use load::{CpuSnap, Direction};
use report::{ModeResult, Sample};
use servers::Servers;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Short runs for smoke testing (CI).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every test; the table shows medians [default: 3, 1 with --quick].
    #[arg(long, value_name = "N")]
    pub reps: Option<usize>,
    /// Which paths to compare, in table order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,splice,ebpf",
        value_name = "MODE,..."
    )]
    pub modes: Vec<Mode>,
    /// Seconds per bulk window and per connection-rate run [default: 3, 1 with --quick].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Idle connections held open for the per-connection memory figures.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub idle_conns: usize,
    /// Also write the JSON here (target/bench/latest.json is always written).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// FORWARDER_LOG for the forwarder under test [default: its own, which logs every close].
    #[arg(long, value_name = "FILTER")]
    pub forwarder_log: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No forwarder: clients talk to the servers.
    Direct,
    /// forwarder --mode splice.
    Splice,
    /// forwarder --mode ebpf.
    Ebpf,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Splice => "splice",
            Mode::Ebpf => "ebpf",
        }
    }
}

struct Plan {
    reps: usize,
    bulk_warmup: Duration,
    bulk: Duration,
    conn_rate: Duration,
    conn_threads: usize,
    rr_warmup: usize,
    rr_count: usize,
    idle_conns: usize,
    forwarder_log: Option<String>,
}

impl Plan {
    fn new(args: &BenchArgs) -> Plan {
        let dur = Duration::from_secs_f64(
            args.duration
                .unwrap_or(if args.quick { 1.0 } else { 3.0 })
                .max(0.1),
        );
        Plan {
            reps: args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
            bulk_warmup: Duration::from_millis(if args.quick { 200 } else { 300 }),
            bulk: dur,
            conn_rate: dur,
            conn_threads: 4,
            rr_warmup: if args.quick { 200 } else { 1000 },
            rr_count: if args.quick { 2_000 } else { 20_000 },
            idle_conns: args.idle_conns,
            forwarder_log: args.forwarder_log.clone(),
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(forwarder: &Path, args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    let mut plan = Plan::new(&args);
    let mut modes = args.modes.clone();
    modes.dedup();

    // Idle test: our client ends plus the server ends, and the forwarder (which inherits
    // this limit) holds two sockets and four pipe fds per pair.
    let want_fds = (plan.idle_conns as u64 * 6 + 4096).max(65_536);
    let nofile = procfs::raise_nofile(want_fds);
    let fit = (nofile.saturating_sub(1024) / 6) as usize;
    if plan.idle_conns > fit {
        eprintln!(
            "bench: RLIMIT_NOFILE is {nofile}: idle connections cut from {} to {fit}",
            plan.idle_conns
        );
        plan.idle_conns = fit;
    }

    let out_dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let servers = servers::start()?;
    let mut results: Vec<ModeResult> = modes.iter().map(|m| ModeResult::new(*m)).collect();

    for rep in 1..=plan.reps {
        for r in results.iter_mut() {
            if r.unavailable.is_some() {
                continue;
            }
            eprintln!(
                "bench: rep {rep}/{} {} [{:.0}s]",
                plan.reps,
                r.mode.name(),
                started.elapsed().as_secs_f64()
            );
            match run_mode(r, forwarder, &servers, &plan, &out_dir) {
                Ok(sample) => r.samples.push(sample),
                Err(Unavailable(why)) => {
                    eprintln!("bench:   {} n/a: {why}", r.mode.name());
                    r.unavailable = Some(why);
                }
            }
        }
    }

    let elapsed = started.elapsed().as_secs_f64();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let header = report::Header {
        lines: vec![
            format!(
                "**forwarder bench** ({}): {} rep(s), medians; bulk {:.1} s windows with 256 KiB \
                 writes; {} ping-pongs; connection rate {:.1} s x {} threads; {} idle connections",
                if args.quick { "quick" } else { "full" },
                plan.reps,
                plan.bulk.as_secs_f64(),
                plan.rr_count,
                plan.conn_rate.as_secs_f64(),
                plan.conn_threads,
                plan.idle_conns
            ),
            format!(
                "{cpus} CPU(s), {}, Linux {}; took {elapsed:.0} s",
                procfs::cpu_model(),
                procfs::kernel_release()
            ),
        ],
    };
    let md = report::markdown(&header, &results);
    println!("{md}");
    let meta = json!({
        "unix_time": now,
        "quick": args.quick,
        "reps": plan.reps,
        "bulk_secs": plan.bulk.as_secs_f64(),
        "bulk_write_bytes": servers::BULK_BUF,
        "rr_count": plan.rr_count,
        "conn_rate_secs": plan.conn_rate.as_secs_f64(),
        "conn_threads": plan.conn_threads,
        "idle_conns": plan.idle_conns,
        "cpus": cpus,
        "cpu_model": procfs::cpu_model(),
        "kernel": procfs::kernel_release(),
        "forwarder_bin": forwarder.display().to_string(),
        "forwarder_log": plan.forwarder_log,
        "elapsed_secs": elapsed,
    });
    let js = serde_json::to_string_pretty(&report::json(meta, &results))? + "\n";
    let mut json_paths = vec![out_dir.join("latest.json")];
    json_paths.extend(args.json.clone());
    for p in &json_paths {
        std::fs::write(p, &js).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let md_path = out_dir.join("latest.md");
    std::fs::write(&md_path, &md).with_context(|| format!("cannot write {}", md_path.display()))?;
    eprintln!(
        "bench: wrote {} and {}",
        md_path.display(),
        json_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// One repetition of every test in one mode. `Err` only when the forwarder will not
/// start; a failing test leaves its metrics out and adds a note.
fn run_mode(
    r: &mut ModeResult,
    bin: &Path,
    servers: &Servers,
    plan: &Plan,
    out_dir: &Path,
) -> std::result::Result<Sample, Unavailable> {
    let fwd = match r.mode {
        Mode::Direct => None,
        mode => {
            let max_conns = (plan.idle_conns + 1000).max(20_000);
            let f = Forwarder::start(
                bin,
                mode.name(),
                &servers.addrs,
                max_conns,
                out_dir,
                plan.forwarder_log.as_deref(),
            )?;
            r.path = Some(f.path.clone());
            Some(f)
        }
    };
    let addrs = fwd.as_ref().map_or(servers.addrs, |f| f.addrs);
    let mut s = Sample::new();

    // Anything else busy on the machine skews every figure: say so.
    if let Some(pct) = background_cpu_pct(Duration::from_millis(300)) {
        s.insert("background_cpu_pct", pct);
        if pct > 10.0 {
            let line = format!(
                "other processes kept the CPUs {pct:.0}% busy before a run: figures are noisy"
            );
            eprintln!("bench:   {line}");
            if !r.notes.iter().any(|n| n.starts_with("other processes")) {
                r.notes.push(line);
            }
        }
    }
    if let Some(f) = &fwd {
        thread::sleep(Duration::from_millis(200));
        if let Some(kib) = f.rss_kib() {
            s.insert("fwd_base_rss_mib", kib as f64 / 1024.0);
        }
    }

    // Memory per idle connection.
    let rss = || fwd.as_ref().and_then(|f| f.rss_kib());
    match load::idle(addrs.idle, &servers.idle, plan.idle_conns, &rss) {
        Ok((m, conns)) => {
            let n = m.conns as f64;
            eprintln!(
                "bench:   {} idle connections open in {:.1} s",
                m.conns, m.open_secs
            );
            if let Some((a, b)) = m.forwarder_rss_kib {
                s.insert("idle_rss_per_conn_b", (b as f64 - a as f64) * 1024.0 / n);
            }
            if let Some((a, b)) = m.slab_active {
                s.insert("idle_slab_per_conn_b", (b as f64 - a as f64) / n);
            }
            if let (Some((a, b)), true) = (&m.slab_caches, r.samples.is_empty()) {
                // Which caches grew, once per mode: where the kernel memory goes.
                let mut growth: Vec<(&String, f64)> = b
                    .iter()
                    .map(|(k, v)| (k, (*v as f64 - *a.get(k).unwrap_or(&0) as f64) / n))
                    .filter(|(_, d)| *d >= 32.0)
                    .collect();
                growth.sort_by(|x, y| y.1.total_cmp(&x.1));
                let top: Vec<String> = growth
                    .iter()
                    .take(8)
                    .map(|(k, d)| format!("{k} {d:.0}"))
                    .collect();
                r.notes.push(format!(
                    "slab growth per idle connection (B): {}",
                    top.join(", ")
                ));
            }
            let (a, b) = m.slab_meminfo_kib;
            s.insert(
                "idle_meminfo_slab_per_conn_b",
                (b as f64 - a as f64) * 1024.0 / n,
            );
            if m.slab_active.is_none() {
                // Not root: fall back to meminfo for the table row.
                s.insert("idle_slab_per_conn_b", (b as f64 - a as f64) * 1024.0 / n);
            }
            conns.close(&servers.idle);
            // Let the forwarder tear the pairs down before timing anything.
            thread::sleep(Duration::from_millis(500));
        }
        Err(e) => note(r, "idle connections", e),
    }

    // Latency.
    match load::ping_pong(addrs.echo, plan.rr_warmup, plan.rr_count) {
        Ok(rtts) => {
            s.insert("rr_p50_us", load::percentile(&rtts, 0.50));
            s.insert("rr_p99_us", load::percentile(&rtts, 0.99));
            s.insert("rr_p999_us", load::percentile(&rtts, 0.999));
            s.insert("rr_max_us", rtts.last().copied().unwrap_or(f64::NAN));
        }
        Err(e) => note(r, "ping-pong", e),
    }

    // Connection rate.
    match load::conn_rate(addrs.echo, plan.conn_threads, plan.conn_rate) {
        Ok(c) => {
            s.insert("conn_per_s", c.per_sec);
            s.insert("conn_errors", c.errors as f64);
        }
        Err(e) => note(r, "connection rate", e),
    }
    thread::sleep(Duration::from_millis(200));

    // Bulk, with CPU accounting over the measurement windows.
    let tck = procfs::clk_tck();
    let snap = || -> Result<CpuSnap> {
        Ok(CpuSnap {
            forwarder: fwd.as_ref().map(|f| f.cpu_ticks()).transpose()?,
            machine: procfs::machine_busy_ticks()?,
        })
    };
    let (mut bytes, mut fwd_ticks, mut machine_ticks) = (0u64, 0u64, 0u64);
    for (key, dir, streams) in [
        ("up1_gbps", Direction::Upload, 1),
        ("up8_gbps", Direction::Upload, 8),
        ("down1_gbps", Direction::Download, 1),
        ("down8_gbps", Direction::Download, 8),
    ] {
        match load::bulk(
            addrs.bulk,
            dir,
            streams,
            plan.bulk_warmup,
            plan.bulk,
            &servers.sunk,
            &snap,
        ) {
            Ok(b) => {
                s.insert(key, b.bytes as f64 * 8.0 / b.secs / 1e9);
                bytes += b.bytes;
                fwd_ticks += b.forwarder_ticks.unwrap_or(0);
                machine_ticks += b.machine_ticks;
            }
            Err(e) => note(r, key, e),
        }
        // Let the streams wind down before the next window.
        thread::sleep(Duration::from_millis(100));
    }
    if bytes > 0 {
        let gib = bytes as f64 / GIB;
        s.insert("bulk_gib", gib);
        s.insert("machine_cpu_s_per_gib", machine_ticks as f64 / tck / gib);
        if fwd.is_some() {
            s.insert("fwd_cpu_s_per_gib", fwd_ticks as f64 / tck / gib);
        }
    }

    if let Some(f) = fwd {
        if let Some(kib) = f.hwm_kib() {
            s.insert("fwd_peak_rss_mib", kib as f64 / 1024.0);
        }
        let how = f.stop(Duration::from_secs(5));
        if !how.starts_with("exited") {
            note(r, "clean shutdown", anyhow::anyhow!("forwarder {how}"));
        }
    }
    Ok(s)
}

fn note(r: &mut ModeResult, what: &str, e: anyhow::Error) {
    let line = format!("{what} failed: {e:#}");
    eprintln!("bench:   {line}");
    if !r.notes.contains(&line) {
        r.notes.push(line);
    }
}

/// Whole-machine busy percentage (of all CPUs) over `window` while we do nothing.
fn background_cpu_pct(window: Duration) -> Option<f64> {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let a = procfs::machine_busy_ticks().ok()?;
    let t = Instant::now();
    thread::sleep(window);
    let b = procfs::machine_busy_ticks().ok()?;
    let secs = (b - a) as f64 / procfs::clk_tck();
    Some(100.0 * secs / (t.elapsed().as_secs_f64() * cpus))
}
