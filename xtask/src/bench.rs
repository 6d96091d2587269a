//! `cargo xtask bench`: direct vs our forwarder (splice, ebpf, auto) vs real peers
//! (nginx stream, HAProxy) on loopback.
//!
//! The upstream servers (bulk sink/source, echo, idle holder) and the load generators run
//! in this process on threads; an nginx serves a 1 KiB file as the HTTP origin. Each
//! relay (the forwarder, nginx stream or HAProxy) runs as a child with one rule per
//! server. For each repetition, each mode in turn: idle pairs (one byte each way, then
//! silence: the relay's CPU, fds and RSS per pair, kernel slab), 64 B ping-pong latency,
//! connection rate, HTTP request/response with wrk (keep-alive, then Connection: close),
//! then bulk throughput one way and the other with 1 and 8 streams (relay and machine CPU
//! are read around the bulk windows). The table gives the medians over the repetitions
//! and the per-repetition ratios to direct and to the better peer;
//! target/bench/latest.{md,json} keep them, and the JSON keeps every sample. `--tunnel`
//! measures the reverse tunnel against rathole and bore instead (bench/tunnel.rs).

mod forwarder;
mod http;
mod load;
mod peers;
mod procfs;
mod relay;
mod report;
mod servers;
mod tunnel;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::json;

use load::{CpuSnap, Direction, RelayMem};
use peers::Peer;
use relay::{Relay, Unavailable};
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
        default_value = "direct,splice,ebpf,auto,copy,inspect,nginx,haproxy",
        value_name = "MODE,..."
    )]
    pub modes: Vec<Mode>,
    /// Seconds per bulk window and per connection-rate run [default: 2, 0.5 with --quick].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Idle pairs held open for the per-pair figures [default: 10000, 1000 with --quick;
    /// fewer when RLIMIT_NOFILE does not allow them].
    #[arg(long, value_name = "N")]
    pub idle_conns: Option<usize>,
    /// Seconds over which the relay's CPU is read while the pairs idle [default: 10, 1
    /// with --quick].
    #[arg(long, value_name = "SECS")]
    pub idle_secs: Option<f64>,
    /// Seconds per wrk run [default: 3, 1 with --quick].
    #[arg(long, value_name = "SECS")]
    pub http_secs: Option<f64>,
    /// Which phases to run [default: all]; the others are left out of the table.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,latency,connections,http,bulk",
        value_name = "PHASE,..."
    )]
    pub phases: Vec<Phase>,
    /// Also write the JSON here (target/bench/latest.json is always written).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// FORWARDER_LOG for the forwarder under test [default: its own, which logs every close].
    #[arg(long, value_name = "FILTER")]
    pub forwarder_log: Option<String>,
    /// Measure the reverse tunnel (server + agent, on each relay path) against direct,
    /// rathole and bore instead (see bench/tunnel.rs); --modes and the idle and HTTP
    /// options do not apply.
    #[arg(long)]
    pub tunnel: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No forwarder: clients talk to the servers.
    Direct,
    /// forwarder --mode splice.
    Splice,
    /// forwarder --mode ebpf.
    Ebpf,
    /// forwarder --mode auto (pairs start on splice and move to ebpf when they prove
    /// interactive, where the kernel allows it).
    Auto,
    /// nginx `stream` proxy (Debian nginx + libnginx-mod-stream).
    Nginx,
    /// The same nginx with `proxy_half_close on`: it then passes a FIN on and waits for
    /// the other side's, as our paths and HAProxy do, instead of ending the session at
    /// the first EOF (its default). Not in the default set: the like-for-like row for
    /// the connection figures.
    #[value(name = "nginx-hc")]
    NginxHalfClose,
    /// HAProxy `mode tcp` with `option splice-auto`.
    Haproxy,
    /// forwarder on its copy path (a `rewrite` rule whose pattern never matches).
    Copy,
    /// forwarder --mode ebpf behind the inspection prelude (`deny_pattern`, a 64-byte dump).
    Inspect,
}

/// The parts of a repetition, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    Idle,
    Latency,
    Connections,
    Http,
    Bulk,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Splice => "splice",
            Mode::Ebpf => "ebpf",
            Mode::Auto => "auto",
            Mode::Nginx => "nginx",
            Mode::NginxHalfClose => "nginx-hc",
            Mode::Haproxy => "haproxy",
            Mode::Copy => "copy",
            Mode::Inspect => "inspect",
        }
    }

    /// The `mode` key and extra rule keys of the forwarder rows.
    fn forwarder_rule(self) -> (&'static str, String) {
        match self {
            Mode::Copy => (
                "splice",
                "rewrite = [{ direction = \"to_upstream\", match = '\\x00never\\x00', replace = \"\" }]\n"
                    .into(),
            ),
            // A check and a small dump to the log: per-file dumps of every connection
            // of the connection-rate runs would be the bench's bottleneck.
            Mode::Inspect => (
                "ebpf",
                "inspect = { bytes = 64, format = \"text\", to = \"log\" }\n\
                 deny_pattern = ['^SSH-']\n"
                    .into(),
            ),
            m => (m.name(), String::new()),
        }
    }

    pub fn is_peer(self) -> bool {
        matches!(self, Mode::Nginx | Mode::NginxHalfClose | Mode::Haproxy)
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
    idle_cpu: Duration,
    http: Duration,
    forwarder_log: Option<String>,
    phases: Vec<Phase>,
}

/// Fds per idle pair the relay gets room for: its 2 sockets (every path and peer measured
/// 2.00 per idle pair since the kernel path shares one epoll set; the pipe pool's at most
/// 256 fds fit in the 1024 kept aside).
const RELAY_FDS_PER_PAIR: u64 = 2;

/// wrk connections: keep-alive, then Connection: close.
const HTTP_KA_CONNS: usize = 50;
const HTTP_CLOSE_CONNS: usize = 20;

impl Plan {
    fn new(args: &BenchArgs) -> Plan {
        let dur = Duration::from_secs_f64(
            args.duration
                .unwrap_or(if args.quick { 0.5 } else { 2.0 })
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
            idle_conns: args
                .idle_conns
                .unwrap_or(if args.quick { 1_000 } else { 10_000 }),
            idle_cpu: Duration::from_secs_f64(
                args.idle_secs
                    .unwrap_or(if args.quick { 1.0 } else { 10.0 })
                    .max(0.1),
            ),
            http: Duration::from_secs_f64(
                args.http_secs
                    .unwrap_or(if args.quick { 1.0 } else { 3.0 })
                    .max(1.0),
            ),
            forwarder_log: args.forwarder_log.clone(),
            phases: args.phases.clone(),
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(forwarder: &Path, args: BenchArgs) -> Result<()> {
    if args.tunnel {
        return tunnel::run(forwarder, &args);
    }
    let started = Instant::now();
    let mut plan = Plan::new(&args);
    let mut modes = args.modes.clone();
    modes.dedup();

    // Idle test: this process holds the client and the server end of every pair (2 fds),
    // and the relay, which inherits this limit (without CAP_SYS_RESOURCE nothing goes
    // past the hard limit), two sockets per pair and maybe a pipe or an eventfd: room
    // for RELAY_FDS_PER_PAIR.
    let want_fds = (plan.idle_conns as u64 * RELAY_FDS_PER_PAIR + 4096).max(65_536);
    let nofile = procfs::raise_nofile(want_fds);
    let fit = (nofile.saturating_sub(1024) / RELAY_FDS_PER_PAIR) as usize;
    let mut limit_note = None;
    if plan.idle_conns > fit {
        let line = format!(
            "RLIMIT_NOFILE is {nofile} (the hard limit; room for {RELAY_FDS_PER_PAIR} relay fds \
             per pair): idle pairs cut from {} to {fit}",
            plan.idle_conns
        );
        eprintln!("bench: {line}");
        limit_note = Some(line);
        plan.idle_conns = fit;
    }

    let out_dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut servers = servers::start()?;
    let mut results: Vec<ModeResult> = modes.iter().map(|m| ModeResult::new(*m)).collect();

    // The peers and the HTTP tools: installed when missing (and we may); a peer that
    // cannot be is n/a in the table, and the run goes on.
    for r in results.iter_mut() {
        let pkgs: &[&str] = match r.mode {
            Mode::Nginx | Mode::NginxHalfClose => &["nginx", "libnginx-mod-stream"],
            Mode::Haproxy => &["haproxy"],
            _ => continue,
        };
        if let Err(e) = crate::provision::bench_tools(pkgs) {
            let why = format!("cannot install {pkgs:?}: {e:#}");
            eprintln!("bench: {} n/a: {why}", r.mode.name());
            r.unavailable = Some(why);
        }
    }
    let mut http_note = None;
    let origin = match crate::provision::bench_tools(&["nginx", "wrk"])
        .and_then(|()| http::start_origin(&out_dir))
    {
        Ok(o) => {
            servers.addrs.http = Some(o.addr);
            Some(o)
        }
        Err(e) => {
            let line = format!("no HTTP (wrk) figures: {e:#}");
            eprintln!("bench: {line}");
            http_note = Some(line);
            None
        }
    };

    repeat(plan.reps, started, &mut results, |r| {
        run_mode(r, forwarder, &servers, &plan, &out_dir)
    });

    if let Some(o) = origin {
        let how = o.relay.stop(Duration::from_secs(5));
        if !how.starts_with("exited") {
            eprintln!("bench: HTTP origin (nginx) {how}");
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
                 writes; {} ping-pongs; connection rate {:.1} s x {} threads; {} idle pairs \
                 (1 B each way), relay CPU over {:.0} s; wrk -t{} {:.0} s x {HTTP_KA_CONNS} \
                 keep-alive / {HTTP_CLOSE_CONNS} Connection: close conns, 1 KiB from nginx",
                if args.quick { "quick" } else { "full" },
                plan.reps,
                plan.bulk.as_secs_f64(),
                plan.rr_count,
                plan.conn_rate.as_secs_f64(),
                plan.conn_threads,
                plan.idle_conns,
                plan.idle_cpu.as_secs_f64(),
                http::WRK_THREADS,
                plan.http.as_secs_f64(),
            ),
            format!(
                "{cpus} CPU(s), {}, Linux {}; took {elapsed:.0} s",
                procfs::cpu_model(),
                procfs::kernel_release()
            ),
        ],
    };
    let mut header = header;
    header.lines.extend(limit_note.clone());
    header.lines.extend(http_note.clone());
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
        "idle_cpu_secs": plan.idle_cpu.as_secs_f64(),
        "nofile": nofile,
        "nofile_note": limit_note,
        "http_secs": plan.http.as_secs_f64(),
        "http_note": http_note,
        "wrk_threads": http::WRK_THREADS,
        "http_keepalive_conns": HTTP_KA_CONNS,
        "http_close_conns": HTTP_CLOSE_CONNS,
        "http_body_bytes": http::BODY,
        "cpus": cpus,
        "cpu_model": procfs::cpu_model(),
        "kernel": procfs::kernel_release(),
        "forwarder_bin": forwarder.display().to_string(),
        "forwarder_log": plan.forwarder_log,
        "elapsed_secs": elapsed,
    });
    write_results(
        &out_dir,
        "latest",
        &md,
        &report::json(meta, &results),
        args.json.as_deref(),
    )
}

/// Writes the table to OUT_DIR/STEM.md and the JSON to OUT_DIR/STEM.json (and to `also`).
fn write_results(
    out_dir: &Path,
    stem: &str,
    md: &str,
    json: &serde_json::Value,
    also: Option<&Path>,
) -> Result<()> {
    let js = serde_json::to_string_pretty(json)? + "\n";
    let mut json_paths = vec![out_dir.join(format!("{stem}.json"))];
    json_paths.extend(also.map(Path::to_path_buf));
    for p in &json_paths {
        std::fs::write(p, &js).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let md_path = out_dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, md).with_context(|| format!("cannot write {}", md_path.display()))?;
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

/// What the repetition loop needs of a column of a table: its name, why it is n/a, and
/// its samples.
trait Column {
    fn parts(&mut self) -> (&str, &mut Option<String>, &mut Vec<Sample>);
}

impl Column for ModeResult {
    fn parts(&mut self) -> (&str, &mut Option<String>, &mut Vec<Sample>) {
        (self.mode.name(), &mut self.unavailable, &mut self.samples)
    }
}

/// Every repetition, every column that is not n/a in turn: `run` gives its sample, or
/// why the column is n/a from then on.
fn repeat<C: Column>(
    reps: usize,
    started: Instant,
    columns: &mut [C],
    mut run: impl FnMut(&mut C) -> std::result::Result<Sample, Unavailable>,
) {
    for rep in 1..=reps {
        for c in columns.iter_mut() {
            let (name, unavailable, _) = c.parts();
            if unavailable.is_some() {
                continue;
            }
            let name = name.to_string();
            eprintln!(
                "bench: rep {rep}/{reps} {name} [{:.0}s]",
                started.elapsed().as_secs_f64()
            );
            let result = run(c);
            let (_, unavailable, samples) = c.parts();
            match result {
                Ok(mut sample) => {
                    sample.insert("rep", rep as f64);
                    samples.push(sample);
                }
                Err(Unavailable(why)) => {
                    eprintln!("bench:   {name} n/a: {why}");
                    *unavailable = Some(why);
                }
            }
        }
    }
}

/// One repetition of every test in one mode. `Err` only when the relay will not start;
/// a failing test leaves its metrics out and adds a note.
fn run_mode(
    r: &mut ModeResult,
    bin: &Path,
    servers: &Servers,
    plan: &Plan,
    out_dir: &Path,
) -> std::result::Result<Sample, Unavailable> {
    let max_pairs = (plan.idle_conns + 1000).max(20_000);
    // Declared before the relay so that it goes after it.
    let mut _peer_dir = None;
    let fwd: Option<Relay> = match r.mode {
        Mode::Direct => None,
        Mode::Nginx | Mode::NginxHalfClose | Mode::Haproxy => {
            let peer = match r.mode {
                Mode::Haproxy => Peer::Haproxy,
                m => Peer::Nginx {
                    half_close: m == Mode::NginxHalfClose,
                },
            };
            let p = peers::start(peer, &servers.addrs, plan.idle_conns + 128, out_dir)?;
            _peer_dir = Some(p.dir);
            r.path = Some(p.relay.path.clone());
            Some(p.relay)
        }
        mode => {
            let f = forwarder::start(
                bin,
                mode.name(),
                mode.forwarder_rule(),
                &servers.addrs,
                max_pairs,
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

    // Idle pairs: memory, fds and CPU per pair.
    let mut mem = || RelayMem {
        rss_kib: fwd.as_ref().and_then(|f| f.rss_kib()),
        fds: fwd.as_ref().and_then(|f| f.fds()),
    };
    let idle = if plan.runs(Phase::Idle) {
        load::idle(addrs.idle, &servers.idle, plan.idle_conns, &mut mem)
    } else {
        Err(Skipped.into())
    };
    match idle {
        Ok((m, conns)) => {
            let n = m.conns as f64;
            eprintln!(
                "bench:   {} idle pairs open in {:.1} s",
                m.conns, m.open_secs
            );
            s.insert("idle_pairs", n);
            s.insert("idle_failed", m.failed as f64);
            if m.failed > 0 {
                note(
                    r,
                    "idle pairs",
                    anyhow::anyhow!(
                        "{} of {} pairs did not carry their byte each way",
                        m.failed,
                        plan.idle_conns
                    ),
                );
            }
            if let Some((a, b)) = m.relay_rss_kib {
                s.insert("idle_rss_per_conn_b", (b as f64 - a as f64) * 1024.0 / n);
            }
            if let Some((a, b)) = m.relay_fds {
                s.insert("idle_fds_per_pair", (b as f64 - a as f64) / n);
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
                r.notes
                    .push(format!("slab growth per idle pair (B): {}", top.join(", ")));
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
            // The relay's CPU while the pairs sit idle (none to read without a relay).
            if let Some(f) = &fwd {
                let t = Instant::now();
                match f.cpu_ticks() {
                    Ok(a) => {
                        thread::sleep(plan.idle_cpu);
                        match f.cpu_ticks() {
                            Ok(b) => {
                                let secs = procfs::secs_between(a, b);
                                s.insert("idle_cpu_cores", secs / t.elapsed().as_secs_f64());
                            }
                            Err(e) => note(r, "idle CPU", e),
                        }
                    }
                    Err(e) => note(r, "idle CPU", e),
                }
            }
            conns.close(&servers.idle);
            // Let the relay tear the pairs down before timing anything: until it holds
            // about as many fds as before them (its pipe pool may keep up to 256 more),
            // for at most 20 s. The kernel path parts each pair from its maps, which
            // takes longer than closing a splice pair.
            if let (Some(f), Some((before, _))) = (&fwd, m.relay_fds) {
                let t = Instant::now();
                while f.fds().is_some_and(|n| n > before + 300)
                    && t.elapsed() < Duration::from_secs(20)
                {
                    thread::sleep(Duration::from_millis(50));
                }
                eprintln!(
                    "bench:   idle pairs torn down in {:.1} s",
                    t.elapsed().as_secs_f64()
                );
            }
            thread::sleep(Duration::from_millis(500));
        }
        Err(e) => note(r, "idle pairs", e),
    }

    // Latency, and the relay's CPU per round trip (warm-up included): what a message
    // costs, steadier from run to run than the percentiles it explains.
    let cpu_before = fwd.as_ref().map(|f| f.cpu_ticks());
    let rr = if plan.runs(Phase::Latency) {
        load::ping_pong(addrs.echo, plan.rr_warmup, plan.rr_count)
    } else {
        Err(Skipped.into())
    };
    match rr {
        Ok(rtts) => {
            s.insert("rr_p50_us", load::percentile(&rtts, 0.50));
            s.insert("rr_p99_us", load::percentile(&rtts, 0.99));
            s.insert("rr_p999_us", load::percentile(&rtts, 0.999));
            s.insert("rr_max_us", rtts.last().copied().unwrap_or(f64::NAN));
            if let (Some(Ok(a)), Some(f)) = (cpu_before, &fwd) {
                match f.cpu_ticks() {
                    Ok(b) => {
                        let secs = procfs::secs_between(a, b);
                        let trips = (plan.rr_warmup + plan.rr_count) as f64;
                        s.insert("rr_cpu_us", secs * 1e6 / trips);
                    }
                    Err(e) => note(r, "CPU per round trip", e),
                }
            }
        }
        Err(e) => note(r, "ping-pong", e),
    }

    // Connection rate, and the relay's CPU (all its processes) per connection.
    let cpu_before = fwd.as_ref().map(|f| f.cpu_ticks());
    let rate = if plan.runs(Phase::Connections) {
        load::conn_rate(addrs.echo, plan.conn_threads, plan.conn_rate)
    } else {
        Err(Skipped.into())
    };
    match rate {
        Ok(c) => {
            s.insert("conn_per_s", c.per_sec);
            s.insert("conn_errors", c.errors as f64);
            if let (Some(Ok(a)), Some(f)) = (cpu_before, &fwd) {
                match f.cpu_ticks() {
                    Ok(b) if c.ok > 0 => {
                        let secs = procfs::secs_between(a, b);
                        s.insert("conn_cpu_us", secs * 1e6 / c.ok as f64);
                    }
                    Ok(_) => {}
                    Err(e) => note(r, "CPU per connection", e),
                }
            }
        }
        Err(e) => note(r, "connection rate", e),
    }
    thread::sleep(Duration::from_millis(200));

    // HTTP request/response through the relay to the nginx origin.
    if let Some(http_addr) = addrs.http.filter(|_| plan.runs(Phase::Http)) {
        for (prefix, conns, close) in [
            ("http_ka", HTTP_KA_CONNS, false),
            ("http_close", HTTP_CLOSE_CONNS, true),
        ] {
            match http::wrk(http_addr, conns, plan.http, close) {
                Ok(w) => {
                    let key = |k: &str| -> &'static str {
                        match (prefix, k) {
                            ("http_ka", "rps") => "http_ka_rps",
                            ("http_ka", "p50") => "http_ka_p50_us",
                            ("http_ka", "p99") => "http_ka_p99_us",
                            ("http_ka", _) => "http_ka_errors",
                            (_, "rps") => "http_close_rps",
                            (_, "p50") => "http_close_p50_us",
                            (_, "p99") => "http_close_p99_us",
                            _ => "http_close_errors",
                        }
                    };
                    s.insert(key("rps"), w.req_per_s);
                    s.insert(key("p50"), w.p50_us);
                    s.insert(key("p99"), w.p99_us);
                    s.insert(key("errors"), w.errors as f64);
                    if w.errors > 0 {
                        let line = format!(
                            "{prefix}: {} of {} requests had socket errors or non-2xx",
                            w.errors, w.requests
                        );
                        eprintln!("bench:   {line}");
                        if !r.notes.iter().any(|n| n.starts_with(prefix)) {
                            r.notes.push(line);
                        }
                    }
                }
                Err(e) => note(r, prefix, e),
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    // Bulk, with CPU accounting over the measurement windows.
    let snap = || -> Result<CpuSnap> {
        Ok(CpuSnap {
            forwarder: fwd.as_ref().map(|f| f.cpu_ticks()).transpose()?,
            machine: procfs::machine_busy_ticks()?,
        })
    };
    let windows: &[_] = if plan.runs(Phase::Bulk) {
        &[
            ("up1_gbps", Direction::Upload, 1),
            ("up8_gbps", Direction::Upload, 8),
            ("down1_gbps", Direction::Download, 1),
            ("down8_gbps", Direction::Download, 8),
        ]
    } else {
        &[]
    };
    bulk_windows(
        &mut s,
        addrs.bulk,
        windows,
        plan,
        servers,
        &snap,
        &mut |key, e| note(r, key, e),
    );

    if let Some(f) = fwd {
        if let Some(kib) = f.hwm_kib() {
            s.insert("fwd_peak_rss_mib", kib as f64 / 1024.0);
        }
        let how = f.stop(Duration::from_secs(5));
        if !how.starts_with("exited") {
            note(
                r,
                "clean shutdown",
                anyhow::anyhow!("{} {how}", r.mode.name()),
            );
        }
    }
    Ok(s)
}

/// The bulk windows (sample key, direction, streams) in turn through `addr`, with the CPU
/// read by `snap` around each: each window's Gbit/s goes into `s`, then the GiB moved and
/// the machine's CPU per GiB (and the relay's, when `snap` reads one). A window that
/// fails leaves its key out and goes to `failed`.
impl Plan {
    fn runs(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }
}

/// The error of a phase left out by `--phases`: no figure and no note.
#[derive(Debug)]
struct Skipped;

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("left out by --phases")
    }
}

impl std::error::Error for Skipped {}

fn bulk_windows(
    s: &mut Sample,
    addr: std::net::SocketAddr,
    windows: &[(&'static str, Direction, usize)],
    plan: &Plan,
    servers: &Servers,
    snap: &dyn Fn() -> Result<CpuSnap>,
    failed: &mut dyn FnMut(&str, anyhow::Error),
) {
    let (mut bytes, mut relay_ticks, mut machine_ticks) = (0u64, None, 0u64);
    for &(key, dir, streams) in windows {
        match load::bulk(
            addr,
            dir,
            streams,
            plan.bulk_warmup,
            plan.bulk,
            &servers.sunk,
            snap,
        ) {
            Ok(b) => {
                s.insert(key, b.bytes as f64 * 8.0 / b.secs / 1e9);
                bytes += b.bytes;
                if let Some(t) = b.forwarder_ticks {
                    *relay_ticks.get_or_insert(0u64) += t;
                }
                machine_ticks += b.machine_ticks;
            }
            Err(e) => failed(key, e),
        }
        // Let the streams wind down before the next window.
        thread::sleep(Duration::from_millis(100));
    }
    if bytes > 0 {
        let (gib, tck) = (bytes as f64 / GIB, procfs::clk_tck());
        s.insert("bulk_gib", gib);
        s.insert("machine_cpu_s_per_gib", machine_ticks as f64 / tck / gib);
        if let Some(t) = relay_ticks {
            s.insert("fwd_cpu_s_per_gib", t as f64 / tck / gib);
        }
    }
}

fn note(r: &mut ModeResult, what: &str, e: anyhow::Error) {
    if e.is::<Skipped>() {
        return;
    }
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
    let secs = procfs::secs_between(a, b);
    Some(100.0 * secs / (t.elapsed().as_secs_f64() * cpus))
}
