use std::process::ExitCode;

use clap::Parser;
use forwarder::cli::{AgentArgs, Cli, Command, RunArgs};
use forwarder::config::{CliRule, CliToken, Config, ConfigError, Mode};
use forwarder::logging::{self, LogFormat};
use forwarder::server::{ConfigSource, Startup};

/// Exit codes: 2 for anything wrong in what the user asked for, 1 for failures to run.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => {
            logging::init(LogFormat::Text);
            // Dump directories are checked as `run` checks them when it keeps its own
            // user; with `user`, only `run` (after the drop) can tell.
            let checked = Config::from_file(&args.config).and_then(|c| {
                c.user
                    .is_none()
                    .then(|| c.check_dump_dirs())
                    .transpose()
                    .map(|_| c)
            });
            match checked {
                Ok(c) => {
                    let extra = match (&c.tunnel_server, &c.agent) {
                        (Some(_), Some(a)) => format!(
                            ", a tunnel server, an agent with {} service(s)",
                            a.services.len()
                        ),
                        (Some(_), None) => ", a tunnel server".to_string(),
                        (None, Some(a)) => {
                            format!(", an agent with {} service(s)", a.services.len())
                        }
                        (None, None) => String::new(),
                    };
                    println!(
                        "{}: ok, {} rule(s){extra}",
                        args.config.display(),
                        c.rules.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
        Command::Run(args) => run(args),
        Command::Agent(args) => agent(args),
    }
}

/// `forwarder agent`: the same process as `run`, with only an `[agent]`.
fn agent(args: AgentArgs) -> ExitCode {
    let token = CliToken::from_env(args.token_file);
    let config = Config::agent_from_cli(args.server, &args.service, token);
    start(config, None, args.log_format, args.threads)
}

fn run(args: RunArgs) -> ExitCode {
    let source = args.config.clone().map(|path| ConfigSource {
        path,
        mode: args.mode,
    });
    let config = match (&source, args.listen) {
        (Some(source), _) => source.load(),
        (None, Some(listen)) => Config::from_cli(CliRule {
            listen,
            upstreams: args.upstream,
            tunnel_listen: args.tunnel_listen,
            token: CliToken::from_env(args.token_file),
        })
        .and_then(|mut c| {
            if let Some(mode) = args.mode {
                c.override_mode(mode)?;
            }
            Ok(c)
        }),
        (None, None) => unreachable!("clap requires --config or --listen"),
    };
    start(config, source, args.log_format, args.threads)
}

fn start(
    config: Result<Config, ConfigError>,
    source: Option<ConfigSource>,
    log_format: Option<LogFormat>,
    threads: Option<usize>,
) -> ExitCode {
    let config = match config {
        Ok(c) => c,
        // `--log-format json` is known before the file is read: keep the promise.
        Err(e) if log_format == Some(LogFormat::Json) => {
            logging::init(LogFormat::Json);
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
        Err(e) => return config_error(e),
    };
    logging::init(log_format.unwrap_or(config.log_format));
    // The schedule clock (and FORWARDER_FAKE_NOW's) starts with the process, not at
    // the first connection that asks it (audit).
    let _ = forwarder::policy::clock::now();
    forwarder::sys::raise_fd_limit();
    // From the first bind on, a stop or reload signal waits for its handler.
    forwarder::sys::hold_handled_signals();

    // Everything that needs privileges beyond those kept happens here, while the
    // process has one thread (see `privileges`).
    let file = source.as_ref().map(|s| s.path.as_path());
    let listeners = match forwarder::server::bind_all(&config.rules, file) {
        Ok(l) => l,
        Err(e) => return failure(e),
    };
    if let Some(agent) = &config.agent {
        if let Err(e) = forwarder::server::can_connect_from_services(agent, file) {
            return failure(e);
        }
    }
    let metrics = match config.metrics.map(forwarder::metrics::bind).transpose() {
        Ok(m) => m,
        Err(e) => return failure(e),
    };
    let tunnel = match config
        .tunnel_server
        .as_ref()
        .map(|t| forwarder::server::bind_tunnel(t.listen))
        .transpose()
    {
        Ok(t) => t,
        Err(e) => return failure(e),
    };
    if let Some(who) = &config.user {
        // The kernel program loads now, with the privileges it may need (its trimming
        // verdict and its parting iterator need CAP_PERFMON, which the drop does not
        // keep); the runtime attaches it. A failure is reported there, as without a drop.
        let wants_kernel_path = config.rules.iter().any(|r| r.mode != Mode::Splice);
        if wants_kernel_path && forwarder::relay::ebpf::built_in() {
            forwarder::relay::ebpf::preload();
        }
        if let Err(e) = forwarder::privileges::drop_to(who) {
            return failure(e.context(format!("cannot drop privileges to user {:?}", who.user)));
        }
    }
    if let Err(e) = config.check_dump_dirs() {
        failure(e.into());
        return ExitCode::from(2);
    }

    // Started with the handled signals held, as the runtime's threads are.
    if let Err(e) = forwarder::deadlines::start() {
        return failure(anyhow::anyhow!("cannot start the deadlines thread: {e}"));
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads.or(config.threads) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return failure(anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    let startup = Startup {
        config,
        source,
        listeners,
        metrics,
        tunnel,
    };
    let result = runtime.block_on(forwarder::server::run(startup));
    logging::finish();
    match result {
        Ok(()) => {
            // Connections still open after a forced stop are closed by exit.
            runtime.shutdown_background();
            ExitCode::SUCCESS
        }
        Err(e) => failure(e),
    }
}

fn config_error(e: ConfigError) -> ExitCode {
    eprintln!("forwarder: {e}");
    ExitCode::from(2)
}

/// After logging is set up, a JSON log stays JSON to the last line.
fn failure(e: anyhow::Error) -> ExitCode {
    logging::finish();
    if logging::json() {
        tracing::error!("{e:#}");
    } else {
        eprintln!("forwarder: {e:#}");
    }
    ExitCode::from(1)
}
