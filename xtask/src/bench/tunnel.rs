//! `cargo xtask bench --tunnel`: our reverse tunnel (issue 10) against direct, rathole and
//! bore on loopback, side by side in the same run.
//!
//! Every tunnel is two processes: a public server, whose visitor port the clients connect
//! to, and an agent that dials the server and connects to the target for each visitor.
//! Ours is two forwarders sharing a token file (`run --upstream agent:bench
//! --tunnel-listen ...` and `agent --service bench=...`), once per relay path; rathole is
//! `rathole --server` and `rathole --client`, bore `bore server` and `bore local`, both
//! built from crates.io into the target directory (bench-tools/) the first time. One
//! forwarder hop (`hop-splice`, the main bench's `splice` row) is there for issue 10's
//! latency target: a tunnel's ping-pong p50 at most twice one hop's.
//!
//! A tunnel carries one service, so each repetition sets every path up twice: to the echo
//! server for 64 B ping-pong latency and the connection rate, then to the bulk server for
//! one stream each way, with the CPU of both processes read around the bulk windows. The
//! servers and the clients are the main bench's (servers.rs, load.rs). The table gives
//! the medians and the per-repetition ratios to direct and to rathole;
//! <target>/bench/tunnel.{md,json} keep them, and <target>/bench/tunnel/ the processes'
//! logs of the last repetition.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::forwarder::parse_listening;
use super::load::{self, CpuSnap, Direction};
use super::relay::{self, Relay, TempDir, Unavailable};
use super::report::{self, Metric, Sample};
use super::servers::{Addrs, Servers};
use super::{procfs, BenchArgs, Mode, Plan};

/// The paths compared, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Direct,
    /// One forwarder hop, `--mode splice`: the yardstick of issue 10's latency target.
    Hop,
    TunnelSplice,
    TunnelEbpf,
    Rathole,
    Bore,
}

const ROUTES: [Route; 6] = [
    Route::Direct,
    Route::Hop,
    Route::TunnelSplice,
    Route::TunnelEbpf,
    Route::Rathole,
    Route::Bore,
];

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Hop => "hop-splice",
            Route::TunnelSplice => "tunnel-splice",
            Route::TunnelEbpf => "tunnel-ebpf",
            Route::Rathole => "rathole",
            Route::Bore => "bore",
        }
    }
}

/// A peer built with `cargo install`.
struct Tool {
    krate: &'static str,
    version: &'static str,
    bin: &'static str,
    /// Extra `cargo install` arguments.
    args: &'static [&'static str],
}

impl Tool {
    /// What the table says of it.
    fn describe(&self) -> String {
        format!(
            "{} {} from crates.io ({}), default settings",
            self.krate,
            self.version,
            self.args.join(" ")
        )
    }
}

/// Plain TCP transport only (no TLS, noise or websocket to build). Not `--locked`: its
/// lockfile pins `time` 0.3.29, which today's rustc no longer compiles (E0282).
const RATHOLE: Tool = Tool {
    krate: "rathole",
    version: "0.5.0",
    bin: "rathole",
    args: &["--no-default-features", "--features", "server,client"],
};

const BORE: Tool = Tool {
    krate: "bore-cli",
    version: "0.6.0",
    bin: "bore",
    args: &["--locked"],
};

/// bore's control port (fixed: `bore server` has no option for it).
const BORE_CONTROL_PORT: u16 = 7835;
/// Tries at starting a path when a port we picked was taken meanwhile.
const START_TRIES: usize = 3;
/// How long a path may take to come up (the agent connected).
const START_LIMIT: Duration = Duration::from_secs(15);
/// max_connections of the one-hop forwarder.
const HOP_MAX_CONNS: usize = 20_000;
/// How long the processes get to exit on SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

const UP: bool = true;
const DOWN: bool = false;

/// The figures; the keys are the main bench's where the meaning is the same.
const METRICS: &[Metric] = &[
    report::m("up1_gbps", "upload, 1 stream", "Gbit/s", 2, true, UP),
    report::m("down1_gbps", "download, 1 stream", "Gbit/s", 2, true, UP),
    report::m("rr_p50_us", "64 B ping-pong p50", "µs", 1, true, DOWN),
    report::m("rr_p99_us", "64 B ping-pong p99", "µs", 1, true, DOWN),
    report::m(
        "rr_cpu_us",
        "server + agent CPU per 64 B round trip",
        "µs",
        1,
        true,
        DOWN,
    ),
    report::m(
        "conn_per_s",
        "connections/s (64 B req + resp)",
        "1/s",
        0,
        true,
        UP,
    ),
    report::m(
        "fwd_cpu_s_per_gib",
        "server + agent CPU per GiB (bulk)",
        "s",
        3,
        true,
        DOWN,
    ),
    report::m(
        "machine_cpu_s_per_gib",
        "machine CPU per GiB (bulk)",
        "s",
        3,
        true,
        DOWN,
    ),
    report::m(
        "rss_rr_mib",
        "server + agent RSS after ping-pong and connection rate",
        "MiB",
        2,
        true,
        DOWN,
    ),
    report::m(
        "rss_bulk_mib",
        "server + agent RSS after bulk",
        "MiB",
        2,
        true,
        DOWN,
    ),
    report::m(
        "conn_errors",
        "connection-rate failures",
        "",
        0,
        false,
        DOWN,
    ),
    report::m(
        "bulk_gib",
        "GiB moved in the bulk windows",
        "GiB",
        2,
        false,
        UP,
    ),
    report::m(
        "background_cpu_pct",
        "CPU busy before the run (other processes)",
        "%",
        0,
        false,
        DOWN,
    ),
];

/// Issue 10's targets for our tunnel, as ratios to another path in the same repetition:
/// (that path, key, limit, whether the ratio must be at least the limit).
const TARGETS: &[(Route, &str, f64, bool)] = &[
    (Route::Rathole, "up1_gbps", 1.5, true),
    (Route::Rathole, "down1_gbps", 1.5, true),
    (Route::Rathole, "machine_cpu_s_per_gib", 0.5, false),
    (Route::Rathole, "rr_p50_us", 1.0, false),
    (Route::Rathole, "rr_p99_us", 1.0, false),
    (Route::Hop, "rr_p50_us", 2.0, false),
];

/// One column of the table: a path's samples, one per repetition.
struct Row {
    route: Route,
    samples: Vec<Sample>,
    /// Why the path could not run at all: n/a in the table.
    unavailable: Option<String>,
    /// Our server's word on its relay path, or the peer's version.
    path: Option<String>,
    notes: Vec<String>,
}

impl Row {
    fn new(route: Route) -> Row {
        Row {
            route,
            samples: Vec::new(),
            unavailable: None,
            path: None,
            notes: Vec::new(),
        }
    }

    /// A line under the table (once), and on stderr now.
    fn note(&mut self, line: String) {
        eprintln!("bench:   {} {line}", self.route.name());
        if !self.notes.contains(&line) {
            self.notes.push(line);
        }
    }

    fn median(&self, key: &str) -> Option<f64> {
        let mut v: Vec<f64> = self.samples.iter().filter_map(|s| get(s, key)).collect();
        report::median(&mut v)
    }

    /// Median over the repetitions both ran of this row's `key` over `base`'s.
    fn ratio(&self, base: &Row, key: &str) -> Option<f64> {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| {
                let rep = s.get("rep")?;
                let b = base.samples.iter().find(|b| b.get("rep") == Some(rep))?;
                let (x, y) = (get(s, key)?, get(b, key)?);
                (y != 0.0).then(|| x / y)
            })
            .collect();
        report::median(&mut v)
    }
}

impl super::Column for Row {
    fn parts(&mut self) -> (&str, &mut Option<String>, &mut Vec<Sample>) {
        (self.route.name(), &mut self.unavailable, &mut self.samples)
    }
}

/// A finite value of a sample.
fn get(s: &Sample, key: &str) -> Option<f64> {
    s.get(key).copied().filter(|x| x.is_finite())
}

/// What every path needs to start.
struct Ctx<'a> {
    servers: &'a Servers,
    plan: &'a Plan,
    /// The processes' logs (and the one-hop forwarder's config).
    log_dir: PathBuf,
    forwarder: &'a Path,
    rathole: Option<PathBuf>,
    bore: Option<PathBuf>,
}

pub fn run(forwarder: &Path, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let plan = Plan::new(args);
    let out_dir = crate::target_dir().join("bench");
    let log_dir = out_dir.join("tunnel");
    fs::create_dir_all(&log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
    let servers = super::servers::start()?;
    let mut rows: Vec<Row> = ROUTES.iter().map(|r| Row::new(*r)).collect();

    // What each path needs: our `agent` subcommand, the peers' binaries (built when
    // missing). A path without is n/a, and the run goes on.
    let tools = crate::target_dir().join("bench-tools");
    let tunnel = tunnel_support(forwarder);
    let rathole = install(&RATHOLE, &tools);
    let bore = install(&BORE, &tools);
    for r in rows.iter_mut() {
        let why = match r.route {
            Route::Direct | Route::Hop => None,
            Route::TunnelSplice | Route::TunnelEbpf => tunnel.as_ref().err(),
            Route::Rathole => rathole.as_ref().err(),
            Route::Bore => bore.as_ref().err(),
        };
        if let Some(e) = why {
            let why = format!("{e:#}");
            eprintln!("bench: {} n/a: {why}", r.route.name());
            r.unavailable = Some(why);
        }
        match r.route {
            Route::Rathole => r.path = Some(RATHOLE.describe()),
            Route::Bore => r.path = Some(BORE.describe()),
            _ => {}
        }
    }
    let ctx = Ctx {
        servers: &servers,
        plan: &plan,
        log_dir: log_dir.clone(),
        forwarder,
        rathole: rathole.ok(),
        bore: bore.ok(),
    };

    super::repeat(plan.reps, started, &mut rows, |r| run_route(r, &ctx));

    let elapsed = started.elapsed().as_secs_f64();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let header = vec![
        format!(
            "**forwarder tunnel bench** ({}): {} rep(s), medians; every path set up twice per \
             repetition (to the echo server, then to the bulk server); {} ping-pongs; \
             connection rate {:.1} s x {} threads; bulk {:.1} s windows, 1 stream each way, \
             256 KiB writes; CPU and RSS of server + agent (rathole server + client, bore \
             server + local)",
            if args.quick { "quick" } else { "full" },
            plan.reps,
            plan.rr_count,
            plan.conn_rate.as_secs_f64(),
            plan.conn_threads,
            plan.bulk.as_secs_f64(),
        ),
        format!(
            "{cpus} CPU(s), {}, Linux {}; took {elapsed:.0} s",
            procfs::cpu_model(),
            procfs::kernel_release()
        ),
    ];
    let md = markdown(&header, &rows);
    println!("{md}");
    let meta = json!({
        "unix_time": SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "quick": args.quick,
        "reps": plan.reps,
        "bulk_secs": plan.bulk.as_secs_f64(),
        "bulk_write_bytes": super::servers::BULK_BUF,
        "rr_count": plan.rr_count,
        "conn_rate_secs": plan.conn_rate.as_secs_f64(),
        "conn_threads": plan.conn_threads,
        "cpus": cpus,
        "cpu_model": procfs::cpu_model(),
        "kernel": procfs::kernel_release(),
        "forwarder_bin": forwarder.display().to_string(),
        "forwarder_log": plan.forwarder_log,
        "elapsed_secs": elapsed,
    });
    super::write_results(
        &out_dir,
        "tunnel",
        &md,
        &to_json(meta, &rows),
        args.json.as_deref(),
    )?;
    eprintln!(
        "bench: the logs of the last repetition are in {}",
        log_dir.display()
    );
    Ok(())
}

/// One repetition on one path. `Err` only when the path will not come up; a failing test
/// leaves its figures out and adds a note.
fn run_route(r: &mut Row, ctx: &Ctx) -> std::result::Result<Sample, Unavailable> {
    let plan = ctx.plan;
    let mut s = Sample::new();
    if let Some(pct) = super::background_cpu_pct(Duration::from_millis(300)) {
        s.insert("background_cpu_pct", pct);
        // Once per path, like the main bench.
        if pct > 10.0 && !r.notes.iter().any(|n| n.starts_with("other processes")) {
            r.note(format!(
                "other processes kept the CPUs {pct:.0}% busy before a run: figures are noisy"
            ));
        }
    }

    // Latency and connection rate, to the echo server.
    let echo = start(
        Leg {
            route: r.route,
            phase: "echo",
            target: ctx.servers.addrs.echo,
        },
        ctx,
    )?;
    if echo.path.is_some() {
        r.path.clone_from(&echo.path);
    }
    // A ping-pong read times out after 5 s, a connection of the rate test too.
    let dog = Watchdog::new(&echo, Duration::from_secs(60) + plan.conn_rate);
    // With server + agent CPU per round trip (warm-up included), as the main bench.
    let cpu_before = (!echo.procs.is_empty()).then(|| echo.cpu_ticks());
    match load::ping_pong(echo.addr, plan.rr_warmup, plan.rr_count) {
        Ok(rtts) => {
            s.insert("rr_p50_us", load::percentile(&rtts, 0.50));
            s.insert("rr_p99_us", load::percentile(&rtts, 0.99));
            if let Some(Ok(a)) = cpu_before {
                match echo.cpu_ticks() {
                    Ok(b) => {
                        let secs = procfs::secs_between(a, b);
                        let trips = (plan.rr_warmup + plan.rr_count) as f64;
                        s.insert("rr_cpu_us", secs * 1e6 / trips);
                    }
                    Err(e) => r.note(format!("CPU per round trip: {e:#}")),
                }
            }
        }
        Err(e) => r.note(format!("ping-pong failed: {e:#}")),
    }
    match load::conn_rate(echo.addr, plan.conn_threads, plan.conn_rate) {
        Ok(c) => {
            s.insert("conn_per_s", c.per_sec);
            s.insert("conn_errors", c.errors as f64);
            if c.errors > 0 {
                r.note(format!(
                    "connection rate: {} connections failed (in one repetition)",
                    c.errors
                ));
            }
        }
        Err(e) => r.note(format!("connection rate failed: {e:#}")),
    }
    thread::sleep(Duration::from_millis(200));
    if let Some(kib) = echo.rss_kib() {
        s.insert("rss_rr_mib", kib as f64 / 1024.0);
    }
    dog.finish(r);
    echo.stop(r);

    // Bulk, to the bulk server, with the CPU of both processes over the windows.
    let bulk = start(
        Leg {
            route: r.route,
            phase: "bulk",
            target: ctx.servers.addrs.bulk,
        },
        ctx,
    )?;
    let window = plan.bulk_warmup + plan.bulk;
    let dog = Watchdog::new(&bulk, 2 * window + Duration::from_secs(30));
    let snap = || -> Result<CpuSnap> {
        Ok(CpuSnap {
            forwarder: (!bulk.procs.is_empty())
                .then(|| bulk.cpu_ticks())
                .transpose()?,
            machine: procfs::machine_busy_ticks()?,
        })
    };
    super::bulk_windows(
        &mut s,
        bulk.addr,
        &[
            ("up1_gbps", Direction::Upload, 1),
            ("down1_gbps", Direction::Download, 1),
        ],
        plan,
        ctx.servers,
        &snap,
        &mut |key, e| r.note(format!("{key} failed: {e:#}")),
    );
    if let Some(kib) = bulk.rss_kib() {
        s.insert("rss_bulk_mib", kib as f64 / 1024.0);
    }
    dog.finish(r);
    bulk.stop(r);
    Ok(s)
}

/// A path set up to one target: its processes (none for direct) and where visitors
/// connect.
struct Running {
    /// ("server" | "agent", process), in start order.
    procs: Vec<(&'static str, Relay)>,
    addr: SocketAddr,
    /// What our server said about its relay path.
    path: Option<String>,
    /// Configs and tokens; after `procs`, so it goes after they are stopped (or killed on
    /// drop, when a start fails).
    _dir: Option<TempDir>,
}

impl Running {
    fn new(addr: SocketAddr, dir: Option<TempDir>) -> Running {
        Running {
            procs: Vec::new(),
            addr,
            path: None,
            _dir: dir,
        }
    }

    /// Starts `cmd` as `role`, logging to the leg's log for it, then waits until `ready`.
    fn up(
        &mut self,
        (leg, ctx): (Leg, &Ctx),
        role: &'static str,
        cmd: Command,
        what: &str,
        ready: impl Fn(&Running) -> bool,
    ) -> Result<()> {
        // The relay's own addresses are the main bench's business: all ours.
        let a = self.addr;
        let up = Addrs {
            bulk: a,
            echo: a,
            idle: a,
            http: None,
        };
        let relay = super::peers::spawn(cmd, &up, leg.log(ctx, role))?;
        self.procs.push((role, relay));
        self.wait(what, ready)
    }

    fn log(&self, role: &str) -> String {
        self.procs
            .iter()
            .find(|(r, _)| *r == role)
            .and_then(|(_, p)| fs::read_to_string(&p.log).ok())
            .unwrap_or_default()
    }

    /// Waits until `ready`, failing when a process exits or after START_LIMIT.
    fn wait(&mut self, what: &str, ready: impl Fn(&Running) -> bool) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if ready(self) {
                return Ok(());
            }
            for (role, p) in self.procs.iter_mut() {
                if let Some(e) = p.exit_error() {
                    bail!(
                        "{role} exited while waiting for {what}: {e:#} (see {})",
                        p.log.display()
                    );
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .procs
                    .iter()
                    .map(|(_, p)| p.log.display().to_string())
                    .collect();
                bail!(
                    "timed out after {START_LIMIT:?} waiting for {what} (see {})",
                    logs.join(", ")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn cpu_ticks(&self) -> Result<u64> {
        self.procs.iter().map(|(_, p)| p.cpu_ticks()).sum()
    }

    fn rss_kib(&self) -> Option<u64> {
        let v: Vec<u64> = self.procs.iter().filter_map(|(_, p)| p.rss_kib()).collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }

    /// Stops the processes, the last started first; notes an unclean end.
    fn stop(mut self, r: &mut Row) {
        while let Some((role, p)) = self.procs.pop() {
            let how = p.stop(STOP_GRACE);
            if !how.starts_with("exited") {
                r.note(format!("clean shutdown failed: {role} {how}"));
            }
        }
    }
}

/// One setup of a path: to the echo or to the bulk server.
#[derive(Clone, Copy)]
struct Leg {
    route: Route,
    /// "echo" or "bulk": in the log names.
    phase: &'static str,
    target: SocketAddr,
}

impl Leg {
    /// Where `role` (server, agent) logs: kept until the next run.
    fn log(&self, ctx: &Ctx, role: &str) -> PathBuf {
        ctx.log_dir
            .join(format!("{}-{}-{role}.log", self.route.name(), self.phase))
    }
}

/// Sets a leg up, retrying when a port it picked was taken meanwhile.
fn start(leg: Leg, ctx: &Ctx) -> std::result::Result<Running, Unavailable> {
    let mut tries = 0;
    loop {
        tries += 1;
        let r = match leg.route {
            Route::Direct => Ok(Running::new(leg.target, None)),
            Route::Hop => start_hop(leg, ctx),
            Route::TunnelSplice => start_tunnel("splice", leg, ctx),
            Route::TunnelEbpf => start_tunnel("ebpf", leg, ctx),
            Route::Rathole => start_rathole(leg, ctx),
            Route::Bore => start_bore(leg, ctx),
        };
        match r {
            Err(e) if tries < START_TRIES && format!("{e:#}").contains("in use") => continue,
            r => return r.map_err(|e| Unavailable(format!("{e:#}"))),
        }
    }
}

/// The main bench's `splice` forwarder (one rule per bench server), its rule to `target`.
fn start_hop(leg: Leg, ctx: &Ctx) -> Result<Running> {
    let relay = super::forwarder::start(
        ctx.forwarder,
        &format!("{}-{}", leg.route.name(), leg.phase),
        Mode::Splice.forwarder_rule(),
        &ctx.servers.addrs,
        HOP_MAX_CONNS,
        &ctx.log_dir,
        ctx.plan.forwarder_log.as_deref(),
    )
    .map_err(|Unavailable(why)| anyhow!(why))?;
    let addr = if leg.target == ctx.servers.addrs.bulk {
        relay.addrs.bulk
    } else {
        relay.addrs.echo
    };
    let mut run = Running::new(addr, None);
    run.path = Some(relay.path.clone());
    run.procs.push(("server", relay));
    Ok(run)
}

/// Our server (`run --mode MODE`, visitors on an ephemeral port) and agent, on a token
/// file; up once both have logged `agent connected`.
fn start_tunnel(mode: &str, leg: Leg, ctx: &Ctx) -> Result<Running> {
    let target = leg.target;
    let dir = TempDir::new("tunnel")?;
    let token = dir.path().join("token");
    fs::write(&token, secret()?).with_context(|| format!("cannot write {}", token.display()))?;
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600))?;
    let control = format!("127.0.0.1:{}", relay::free_port()?);
    let mut run = Running::new(target, Some(dir));

    let mut server = Command::new(ctx.forwarder);
    server
        .args(["run", "--mode", mode, "--listen", "127.0.0.1:0"])
        .args(["--upstream", "agent:bench", "--tunnel-listen", &control])
        .arg("--token-file")
        .arg(&token);
    let mut agent = Command::new(ctx.forwarder);
    agent
        .args(["agent", "--server", &control])
        .args(["--service", &format!("bench={target}")])
        .arg("--token-file")
        .arg(&token);
    for cmd in [&mut server, &mut agent] {
        if let Some(f) = &ctx.plan.forwarder_log {
            cmd.env("FORWARDER_LOG", f);
        }
        cmd.env_remove("FORWARDER_TOKEN");
    }

    run.up(
        (leg, ctx),
        "server",
        server,
        "`tunnel listening` from the server",
        |r| r.log("server").contains("tunnel listening"),
    )?;
    let visitors = |r: &Running| {
        parse_listening(&r.log("server"))
            .into_iter()
            .find(|l| l.rule == "cli")
    };
    run.up(
        (leg, ctx),
        "agent",
        agent,
        "`agent connected` from both and the server's `listening rule=cli`",
        |r| {
            r.log("server").contains("agent connected")
                && r.log("agent").contains("agent connected")
                && visitors(r).is_some()
        },
    )?;
    let l = visitors(&run).ok_or_else(|| anyhow!("no `listening rule=cli` line"))?;
    run.addr = l.listen;
    run.path = Some(l.path);
    Ok(run)
}

/// `rathole --server` and `--client` with one TCP service; up once the server listens for
/// visitors, which it does when the client's control channel is established.
fn start_rathole(leg: Leg, ctx: &Ctx) -> Result<Running> {
    let target = leg.target;
    let bin = ctx.rathole.as_deref().context("no rathole binary")?;
    let dir = TempDir::new("rathole")?;
    let token = secret()?;
    let (control, visitors) = (relay::free_port()?, relay::free_port()?);
    let server_toml = dir.path().join("server.toml");
    let client_toml = dir.path().join("client.toml");
    write(
        &server_toml,
        &format!(
            "# written by cargo xtask bench --tunnel\n\
             [server]\nbind_addr = \"127.0.0.1:{control}\"\n\n\
             [server.services.bench]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{visitors}\"\n"
        ),
    )?;
    write(
        &client_toml,
        &format!(
            "# written by cargo xtask bench --tunnel\n\
             [client]\nremote_addr = \"127.0.0.1:{control}\"\n\n\
             [client.services.bench]\ntoken = \"{token}\"\nlocal_addr = \"{target}\"\n"
        ),
    )?;
    let mut run = Running::new(([127, 0, 0, 1], visitors).into(), Some(dir));
    let mut server = Command::new(bin);
    server.arg("--server").arg(&server_toml);
    run.up(
        (leg, ctx),
        "server",
        server,
        "the rathole server's control port",
        |_| listening(control),
    )?;
    let mut client = Command::new(bin);
    client.arg("--client").arg(&client_toml);
    run.up(
        (leg, ctx),
        "agent",
        client,
        "the rathole server's visitor port",
        |_| listening(visitors),
    )?;
    Ok(run)
}

/// `bore server` (control port 7835, one tunnel port allowed) and `bore local`; up once
/// the server listens on the tunnel port, which it opens for the client.
fn start_bore(leg: Leg, ctx: &Ctx) -> Result<Running> {
    let target = leg.target;
    let bin = ctx.bore.as_deref().context("no bore binary")?;
    let dir = TempDir::new("bore")?;
    let secret = secret()?;
    let visitors = relay::free_port()?;
    let mut run = Running::new(([127, 0, 0, 1], visitors).into(), Some(dir));
    let port = visitors.to_string();
    let mut server = Command::new(bin);
    server
        .args(["server", "--bind-addr", "127.0.0.1"])
        .args(["--min-port", &port, "--max-port", &port])
        .env("BORE_SECRET", &secret);
    run.up(
        (leg, ctx),
        "server",
        server,
        "the bore server's control port",
        |_| listening(BORE_CONTROL_PORT),
    )?;
    let mut local = Command::new(bin);
    local
        .args(["local", &target.port().to_string()])
        .args(["--local-host", &target.ip().to_string()])
        .args(["--to", "127.0.0.1", "--port", &port])
        .env("BORE_SECRET", &secret);
    run.up(
        (leg, ctx),
        "agent",
        local,
        "the bore server's tunnel port",
        |_| listening(visitors),
    )?;
    Ok(run)
}

fn listening(port: u16) -> bool {
    procfs::listening_ports().contains(&port)
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// 32 random hex digits: the token or secret of one setup.
fn secret() -> Result<String> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Ok when `bin` has the tunnel: an `agent` subcommand and `run --tunnel-listen`.
fn tunnel_support(bin: &Path) -> Result<()> {
    let help = |args: &[&str]| -> Result<String> {
        let out = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let first = text.lines().next().unwrap_or("").trim();
            bail!(
                "{} has no tunnel yet: `{}` failed: {first}",
                bin.display(),
                args.join(" ")
            );
        }
        Ok(text)
    };
    help(&["agent", "--help"])?;
    if !help(&["run", "--help"])?.contains("--tunnel-listen") {
        bail!(
            "{} has no tunnel yet: `run --help` has no --tunnel-listen",
            bin.display()
        );
    }
    Ok(())
}

/// `cargo install` of `tool` into `root` unless its binary is there already. Returns the
/// binary.
fn install(tool: &Tool, root: &Path) -> Result<PathBuf> {
    let bin = root.join("bin").join(tool.bin);
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "bench: building {} {} into {} (a few minutes, once)",
        tool.krate,
        tool.version,
        root.display()
    );
    let t = Instant::now();
    let mut cargo = Command::new(crate::cargo_bin());
    cargo
        .args(["install", tool.krate, "--version", tool.version])
        .args(tool.args)
        .arg("--root")
        .arg(root)
        // A temporary build directory, removed afterwards; not ours.
        .env_remove("CARGO_TARGET_DIR");
    crate::run(&mut cargo).with_context(|| format!("cannot build {}", tool.krate))?;
    eprintln!(
        "bench: {} built in {:.0}s",
        tool.krate,
        t.elapsed().as_secs_f64()
    );
    Ok(bin)
}

/// Kills a path's processes by PID when a phase overruns its limit: the bulk clients have
/// no timeouts, so a stalled tunnel would otherwise hang the bench. The kill fails the
/// blocked clients instead, and `finish` notes it.
struct Watchdog {
    done: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<bool>>,
    limit: Duration,
}

impl Watchdog {
    fn new(run: &Running, limit: Duration) -> Watchdog {
        let pids: Vec<u32> = run.procs.iter().map(|(_, p)| p.pid).collect();
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let d = done.clone();
        let thread = thread::spawn(move || {
            let (lock, cv) = &*d;
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (guard, _) = cv
                .wait_timeout_while(guard, limit, |done| !*done)
                .unwrap_or_else(|e| e.into_inner());
            if *guard {
                return false;
            }
            for p in pids {
                // SAFETY: kill(2) by PID of our own child, not yet reaped (the Running
                // that holds it outlives this watchdog).
                unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
            }
            true
        });
        Watchdog {
            done,
            thread: Some(thread),
            limit,
        }
    }

    /// Stops the watchdog; notes on `r` if it fired.
    fn finish(mut self, r: &mut Row) {
        if self.stop() {
            r.note(format!(
                "a phase overran {:?}: its processes were killed (stalled?)",
                self.limit
            ));
        }
    }

    /// Whether it fired.
    fn stop(&mut self) -> bool {
        let (lock, cv) = &*self.done;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        self.thread
            .take()
            .is_some_and(|t| t.join().unwrap_or(false))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

fn markdown(header: &[String], rows: &[Row]) -> String {
    let mut out = String::new();
    for l in header {
        out += &format!("{l}  \n");
    }
    out += "\n";
    let find = |route| {
        rows.iter()
            .find(|r| r.route == route && !r.samples.is_empty())
    };
    let (direct, rathole) = (find(Route::Direct), find(Route::Rathole));
    let vs_direct: Vec<&Row> = rows.iter().filter(|r| r.route != Route::Direct).collect();
    let vs_rathole: Vec<&Row> = vs_direct
        .iter()
        .copied()
        .filter(|r| r.route != Route::Rathole)
        .collect();

    let mut head = vec!["metric".to_string()];
    head.extend(rows.iter().map(|r| r.route.name().to_string()));
    if direct.is_some() {
        head.extend(
            vs_direct
                .iter()
                .map(|r| format!("{}/direct", r.route.name())),
        );
    }
    if rathole.is_some() {
        head.extend(
            vs_rathole
                .iter()
                .map(|r| format!("{}/rathole", r.route.name())),
        );
    }
    out += &format!("| {} |\n|---|", head.join(" | "));
    out += &"---:|".repeat(head.len() - 1);
    out += "\n";
    let ratio = |v: Option<f64>| v.map_or_else(|| "–".into(), |v| format!("{v:.2}×"));
    for m in METRICS.iter().filter(|m| m.table) {
        let mut cells = vec![if m.unit.is_empty() {
            m.label.to_string()
        } else {
            format!("{} ({})", m.label, m.unit)
        }];
        for r in rows {
            cells.push(if r.samples.is_empty() && r.unavailable.is_some() {
                "n/a".into()
            } else {
                report::fmt_num(r.median(m.key), m.decimals)
            });
        }
        for (base, others) in [(direct, &vs_direct), (rathole, &vs_rathole)] {
            if let Some(b) = base {
                cells.extend(others.iter().map(|r| ratio(r.ratio(b, m.key))));
            }
        }
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out += "\nRatios are medians of per-repetition ratios (each repetition runs every path \
            back to back).\n";

    let mut checks = Vec::new();
    for r in rows
        .iter()
        .filter(|r| matches!(r.route, Route::TunnelSplice | Route::TunnelEbpf))
    {
        for &(base, key, limit, at_least) in TARGETS {
            let Some(v) = find(base).and_then(|b| r.ratio(b, key)) else {
                continue;
            };
            let label = METRICS
                .iter()
                .find(|m| m.key == key)
                .map_or(key, |m| m.label);
            let ok = if at_least { v >= limit } else { v <= limit };
            checks.push(format!(
                "- {} {}: {label}: {v:.2}× {} (target {} {limit}×)",
                if ok { "✅" } else { "❌" },
                r.route.name(),
                base.name(),
                if at_least { "≥" } else { "≤" },
            ));
        }
    }
    if !checks.is_empty() {
        out += "\nTargets (issue 10), as ratios in the same repetitions:\n\n";
        out += &checks.join("\n");
        out += "\n";
    }

    let mut notes = Vec::new();
    for r in rows {
        let name = r.route.name();
        if let Some(why) = &r.unavailable {
            notes.push(format!("- {name}: n/a: {why}"));
        }
        match (&r.path, r.route) {
            (Some(p), Route::Hop | Route::TunnelSplice | Route::TunnelEbpf) => {
                notes.push(format!("- {name}: server reported mode={p}"))
            }
            (Some(p), _) => notes.push(format!("- {name}: {p}")),
            (None, _) => {}
        }
        notes.extend(r.notes.iter().map(|n| format!("- {name}: {n}")));
    }
    if !notes.is_empty() {
        out += "\nNotes:\n\n";
        out += &notes.join("\n");
        out += "\n";
    }
    out
}

fn to_json(meta: Value, rows: &[Row]) -> Value {
    let find = |route| rows.iter().find(|r| r.route == route);
    let mut out = serde_json::Map::new();
    for r in rows {
        let mut median = serde_json::Map::new();
        let mut to_direct = serde_json::Map::new();
        let mut to_rathole = serde_json::Map::new();
        for m in METRICS {
            let key = m.key.to_string();
            if let Some(v) = r.median(m.key) {
                median.insert(key.clone(), json!(v));
            }
            for (base, map) in [
                (Route::Direct, &mut to_direct),
                (Route::Rathole, &mut to_rathole),
            ] {
                let v = find(base)
                    .filter(|b| b.route != r.route)
                    .and_then(|b| r.ratio(b, m.key));
                if let Some(v) = v {
                    map.insert(key.clone(), json!(v));
                }
            }
        }
        out.insert(
            r.route.name().to_string(),
            json!({
                "available": r.unavailable.is_none(),
                "reason": r.unavailable,
                "path": r.path,
                "median": median,
                "ratio_to_direct": to_direct,
                "ratio_to_rathole": to_rathole,
                "samples": r.samples,
                "notes": r.notes,
            }),
        );
    }
    let metrics: Vec<Value> = METRICS
        .iter()
        .map(|m| json!({"key": m.key, "label": m.label, "unit": m.unit, "higher_is_better": m.higher}))
        .collect();
    json!({ "meta": meta, "metrics": metrics, "paths": out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(route: Route, reps: &[(usize, f64)]) -> Row {
        let mut r = Row::new(route);
        for (rep, v) in reps {
            let mut s = Sample::new();
            s.insert("rep", *rep as f64);
            s.insert("up1_gbps", *v);
            r.samples.push(s);
        }
        r
    }

    #[test]
    fn ratios_are_paired_by_repetition_and_the_table_has_both_bases() {
        let direct = row(Route::Direct, &[(1, 10.0), (2, 20.0)]);
        let tunnel = row(Route::TunnelSplice, &[(1, 5.0), (2, 10.0)]);
        let rathole = row(Route::Rathole, &[(1, 2.0), (2, 5.0)]);
        assert_eq!(tunnel.ratio(&direct, "up1_gbps"), Some(0.5));
        // 5/2 and 10/5: a median of 2.25.
        assert_eq!(tunnel.ratio(&rathole, "up1_gbps"), Some(2.25));
        let mut bore = Row::new(Route::Bore);
        bore.unavailable = Some("cannot build".into());
        let md = markdown(&[], &[direct, tunnel, rathole, bore]);
        assert!(md.contains(
            "| metric | direct | tunnel-splice | rathole | bore | tunnel-splice/direct | \
             rathole/direct | bore/direct | tunnel-splice/rathole | bore/rathole |"
        ));
        assert!(md.contains("| upload, 1 stream (Gbit/s) | 15.00 | 7.50 | 3.50 | n/a | 0.50× |"));
        assert!(md.contains("✅ tunnel-splice: upload, 1 stream: 2.25× rathole (target ≥ 1.5×)"));
        assert!(md.contains("- bore: n/a: cannot build"));
    }

    #[test]
    fn a_forwarder_without_the_tunnel_is_refused() {
        let e = format!("{:#}", tunnel_support(Path::new("/bin/false")).unwrap_err());
        assert!(
            e.contains("has no tunnel yet: `agent --help` failed"),
            "{e}"
        );
        let e = format!("{:#}", tunnel_support(Path::new("/bin/true")).unwrap_err());
        assert!(e.contains("`run --help` has no --tunnel-listen"), "{e}");
    }
}
