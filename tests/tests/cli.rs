//! Mode-independent behaviour of the command line: config validation and start-up
//! failures, with their exit codes (2: what the user asked for is wrong, 1: cannot run).

mod cli {
    use std::net::TcpListener;
    use std::time::Duration;

    use forwarder_tests::*;

    const TIMEOUT: Duration = Duration::from_secs(20);

    fn check(toml: &str) -> Output {
        let dir = TempDir::new("check");
        let path = dir.write("c.toml", toml);
        let mut cmd = forwarder_command();
        cmd.arg("check").arg("--config").arg(path);
        run_to_exit(cmd, TIMEOUT)
    }

    /// `run --config` on the same text; a bad file must fail before anything listens.
    fn run_config(toml: &str) -> Output {
        let dir = TempDir::new("run");
        let path = dir.write("c.toml", toml);
        let mut cmd = forwarder_command();
        cmd.arg("run")
            .arg("-c")
            .arg(path)
            .args(["--mode", "splice"]);
        run_to_exit(cmd, TIMEOUT)
    }

    /// Both `check` and `run` exit 2 and name every one of `needles` on stderr.
    fn assert_config_error(toml: &str, needles: &[&str]) {
        for (what, o) in [("check", check(toml)), ("run", run_config(toml))] {
            assert_eq!(
                o.code(),
                Some(2),
                "{what}: {} (want exit 2); stderr:\n{}",
                describe_status(&o.status),
                o.stderr
            );
            for n in needles {
                assert!(
                    o.stderr.contains(n),
                    "{what}: stderr does not mention {n:?}:\n{}",
                    o.stderr
                );
            }
        }
    }

    /// `VERB -c PATH` (a file `check` would read) exits 2 saying `needle`.
    fn assert_file_error(verb: &str, path: &std::path::Path, needle: &str) {
        let mut cmd = forwarder_command();
        cmd.arg(verb).arg("-c").arg(path);
        let o = run_to_exit(cmd, TIMEOUT);
        assert_eq!(
            o.code(),
            Some(2),
            "{verb}: {}; stderr:\n{}",
            describe_status(&o.status),
            o.stderr
        );
        assert!(
            o.stderr.contains(needle),
            "{verb}: stderr does not mention {needle:?}: {}",
            o.stderr
        );
    }

    const RULE: &str = "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n";

    #[test]
    fn syntax_error_exits_2_naming_the_line() {
        let toml = format!("[global]\nshutdown_grace = \"1s\"\n[[rule]\n{RULE}");
        assert_config_error(&toml, &["line 3"]);
    }

    /// A value TOML accepts but the forwarder does not names its key and line too.
    #[test]
    fn bad_value_exits_2_naming_the_key_and_line() {
        let toml = format!("{RULE}\nrise = 0\n");
        assert_config_error(&toml, &["rule[0].rise", "must be at least 1", "(line 5)"]);
        let toml = format!("[defaults]\nallow = [\"10.0.0.0/33\"]\n{RULE}");
        assert_config_error(&toml, &["defaults.allow[0]", "10.0.0.0/33", "(line 2)"]);
    }

    /// Values that parse but could never work: an upstream on port 0 (every connect
    /// fails), an `http_auth` header no client can send, a rule name that would split
    /// the `rule=` field of its log lines. Each names its key and line.
    #[test]
    fn values_that_cannot_work_exit_2_naming_the_key() {
        let toml = "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:0\"\n";
        assert_config_error(toml, &["rule[0].upstream[0]", "port 0", "(line 3)"]);
        let toml = format!("{RULE}http_auth = {{ header = \"X-A:\", token = \"t\" }}\n");
        assert_config_error(
            &toml,
            &[
                "rule[0].http_auth.header",
                "not an HTTP header name",
                "(line 4)",
            ],
        );
        for name in ["", "a b"] {
            let toml = format!("{RULE}name = \"{name}\"\n");
            assert_config_error(&toml, &["rule[0].name", "without spaces", "(line 4)"]);
        }
    }

    /// A bad value given as a flag is named by the flag the user wrote, not by the
    /// file key it became (`rule[0].listen`, `agent.server`: keys of no file) (audit).
    #[test]
    fn bad_flag_values_exit_2_naming_the_flag() {
        let dir = TempDir::new("flags");
        let token = dir.write("token", "a-tunnel-token-of-some-length\n");
        let token = token.to_str().unwrap();
        let missing = dir.path().join("no-such-token");
        let missing = missing.to_str().unwrap();
        // Each command line, words split at spaces.
        let cases = [
            ("run --listen 127.0.0.1:x --upstream 127.0.0.1:9".to_string(), "`--listen`"),
            ("run --listen 127.0.0.1:0 --upstream 127.0.0.1:9 --upstream bad".to_string(), "`--upstream[1]`"),
            (format!("agent --server 127.0.0.1 --service web=127.0.0.1:9 --token-file {token}"), "`--server`"),
            (format!("agent --server 127.0.0.1:1 --service web --token-file {token}"), "--service[0]"),
            (format!("agent --server 127.0.0.1:1 --service web=127.0.0.1:9 --token-file {missing}"), "`--token-file`"),
            (format!("run --listen 127.0.0.1:0 --upstream agent:web --tunnel-listen 127.0.0.1:0 --token-file {missing}"), "`--token-file`"),
        ];
        for (line, flag) in cases {
            let args: Vec<&str> = line.split(' ').collect();
            let mut cmd = forwarder_command();
            cmd.args(&args);
            let o = run_to_exit(cmd, TIMEOUT);
            assert_eq!(o.code(), Some(2), "{args:?}: {}", o.stderr);
            assert!(
                o.stderr.contains(flag),
                "{args:?}: stderr does not name {flag}:\n{}",
                o.stderr
            );
            for key in ["rule[0]", "agent.", "tunnel_server."] {
                assert!(
                    !o.stderr.contains(key),
                    "{args:?} names file key {key}: {}",
                    o.stderr
                );
            }
        }
    }

    #[test]
    fn unknown_key_exits_2_naming_the_key() {
        let toml = format!("[defaults]\nmode = \"splice\"\nconect_timeout = \"1s\"\n{RULE}");
        assert_config_error(&toml, &["conect_timeout", "line 3"]);
        let toml = format!("{RULE}colour = \"blue\"\n");
        assert_config_error(&toml, &["colour", "line 4"]);
        let toml = format!("[global]\nbogus_limit = 3\n{RULE}");
        assert_config_error(&toml, &["bogus_limit", "line 2"]);
    }

    #[test]
    fn bad_duration_exits_2_naming_the_key() {
        let toml = format!("[defaults]\nconnect_timeout = \"5x\"\n{RULE}");
        assert_config_error(&toml, &["defaults.connect_timeout", "line 2"]);
        let toml = format!("[global]\nshutdown_grace = \"soon\"\n{RULE}");
        assert_config_error(&toml, &["global.shutdown_grace", "line 2"]);
        let toml = format!("{RULE}idle_timeout = \"-1s\"\n");
        assert_config_error(&toml, &["idle_timeout", "line 4"]);
    }

    #[test]
    fn check_accepts_a_valid_file() {
        let toml = r#"
[global]
shutdown_grace = "2s"
max_connections = 100

[defaults]
mode = "splice"
connect_timeout = "250ms"
idle_timeout = "0s"
max_connections = 10
inflight_limit = 1048576

[[rule]]
name = "web"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:8005"

[[rule]]
name = "v6-failover"
listen = "[::1]:0"
upstream = ["[::1]:8006", "localhost:8007"]
mode = "auto"
idle_timeout = "1h"
"#;
        let o = check(toml);
        assert_eq!(
            o.code(),
            Some(0),
            "{}; stdout:\n{}\nstderr:\n{}",
            describe_status(&o.status),
            o.stdout,
            o.stderr
        );
    }

    /// A rule served by an agent takes the checks and dumps (`check` accepts them),
    /// not `rewrite`, whose error says why.
    #[test]
    fn an_agent_rule_inspects_but_does_not_rewrite() {
        let agent_rule = "[tunnel_server]\nlisten = \"127.0.0.1:0\"\ntoken = \"secret\"\n\n\
                          [[rule]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"agent:web\"\n";
        let inspects = format!(
            "{agent_rule}inspect = {{ bytes = 64 }}\ndeny_pattern = ['^SSH-']\n\
             http_auth = {{ header = \"X-Auth\", token = \"t\" }}\n"
        );
        let o = check(&inspects);
        assert_eq!(
            o.code(),
            Some(0),
            "{}: {}",
            describe_status(&o.status),
            o.stderr
        );
        let rewrites = format!(
            "{agent_rule}rewrite = [ {{ direction = \"to_upstream\", match = \"a\", replace = \"b\" }} ]\n"
        );
        assert_config_error(&rewrites, &["rule[0].rewrite", "agent:"]);
    }

    /// `connect_from` must be an IP address of the upstreams' family (exit 2, naming
    /// the key), and one of this host's: otherwise `run` stops at start (exit 1),
    /// naming the key and line, before every upstream would go DOWN for it.
    #[test]
    fn connect_from_is_checked() {
        let rule = |from: &str| {
            format!("[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nconnect_from = \"{from}\"\n")
        };
        assert_config_error(
            &rule("10.0.0.1:80"),
            &["rule[0].connect_from", "not an IP address"],
        );
        assert_config_error(
            &rule("::1"),
            &["rule[0].connect_from", "another address family"],
        );
        let not_ours = rule("192.0.2.1");
        assert_eq!(
            check(&not_ours).code(),
            Some(0),
            "{}",
            check(&not_ours).stderr
        );
        let o = run_config(&not_ours);
        assert_eq!(o.code(), Some(1), "stderr:\n{}", o.stderr);
        let want =
            "cannot connect from 192.0.2.1 (rule \"rule0\", key `rule[0].connect_from`, line 4)";
        assert!(o.stderr.contains(want), "stderr:\n{}", o.stderr);
        // An agent's [[service]] is checked the same way, at its start.
        let agent = "[agent]\nserver = \"127.0.0.1:9\"\ntoken = \"0123456789abcdef\"\n\n\
                     [[service]]\nname = \"web\"\ntarget = \"127.0.0.1:9\"\nconnect_from = \"192.0.2.1\"\n";
        assert_eq!(check(agent).code(), Some(0), "{}", check(agent).stderr);
        let o = run_config(agent);
        assert_eq!(o.code(), Some(1), "stderr:\n{}", o.stderr);
        let want = "cannot connect from 192.0.2.1 (service \"web\", key `service[0].connect_from`, line 8)";
        assert!(o.stderr.contains(want), "stderr:\n{}", o.stderr);
    }

    #[test]
    fn listen_address_in_use_exits_1_naming_it() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let mut cmd = forwarder_command();
        cmd.args(["run", "--listen"]).arg(addr.to_string()).args([
            "--upstream",
            "127.0.0.1:9",
            "--mode",
            "splice",
        ]);
        let o = run_to_exit(cmd, TIMEOUT);
        assert_eq!(
            o.code(),
            Some(1),
            "{} (want exit 1); stderr:\n{}",
            describe_status(&o.status),
            o.stderr
        );
        assert!(
            o.stderr.contains(&addr.to_string()),
            "stderr does not name {addr}:\n{}",
            o.stderr
        );

        // The same from a config file whose second rule collides.
        let dir = TempDir::new("inuse");
        let path = dir.write(
            "c.toml",
            &format!(
                "[[rule]]\nname = \"free\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
                 [[rule]]\nname = \"taken\"\nlisten = \"{addr}\"\nupstream = \"127.0.0.1:9\"\n"
            ),
        );
        let mut cmd = forwarder_command();
        cmd.arg("run")
            .arg("--config")
            .arg(path)
            .args(["--mode", "splice"]);
        let o = run_to_exit(cmd, TIMEOUT);
        assert_eq!(o.code(), Some(1), "stderr:\n{}", o.stderr);
        assert!(o.stderr.contains(&addr.to_string()), "{}", o.stderr);
        drop(taken);
    }

    /// A `timezone` in `[defaults]` is inherited by every rule: the rules without a
    /// `schedule` have no use for it, which is no error. One written in a rule without
    /// a schedule still is, naming that rule's key.
    #[test]
    fn default_timezone_is_fine_for_rules_without_schedule() {
        let toml = "[defaults]\ntimezone = \"Europe/Berlin\"\n\
                    [[rule]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
                    schedule = [\"Mon-Fri 09:00-17:00\"]\n\
                    [[rule]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n";
        let o = check(toml);
        assert_eq!(
            o.code(),
            Some(0),
            "{}; stderr:\n{}",
            describe_status(&o.status),
            o.stderr
        );
        assert_config_error(
            &format!("{RULE}timezone = \"Europe/Berlin\"\n"),
            &["rule[0].timezone", "only meaningful with `schedule`"],
        );
    }

    /// Two rules on one address can never both listen: a config error naming the
    /// second rule's `listen` (for `check` as for `run`), also when a wildcard covers
    /// the other address; port 0 (a new port for each) is fine.
    #[test]
    fn two_rules_on_one_listen_address_exit_2() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let two = |a: &str, b: &str| {
            format!(
                "[[rule]]\nname = \"a\"\nlisten = \"{a}\"\nupstream = \"127.0.0.1:9\"\n\
                 [[rule]]\nname = \"b\"\nlisten = \"{b}\"\nupstream = \"127.0.0.1:9\"\n"
            )
        };
        let same = format!("127.0.0.1:{port}");
        let any = format!("0.0.0.0:{port}");
        assert_config_error(
            &two(&same, &same),
            &["rule[1].listen", "(rule \"b\")", "rule \"a\""],
        );
        assert_config_error(&two(&any, &same), &["rule[1].listen", "(rule \"b\")"]);
        let o = check(&two("127.0.0.1:0", "127.0.0.1:0"));
        assert_eq!(o.code(), Some(0), "port 0 twice: {}", o.stderr);
    }

    /// The runtime's worker threads, by name, once there are `want` of them or 5 s
    /// have passed. A new thread names itself when it first runs, which may be after
    /// the `listening` line (printed by the main thread): until then it shows its
    /// parent's name.
    fn workers(pid: i32, want: usize) -> usize {
        let named = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == "tokio-rt-worker")
                .count()
        };
        netns::wait_until(Duration::from_secs(5), || named() == want);
        named()
    }

    /// `--threads N` and `[global] threads = N` set how many worker threads run (the
    /// command line wins); bytes move through either exactly. 0 and more than 1024
    /// are refused, naming the flag or the key.
    #[test]
    fn threads_sets_the_worker_count() {
        let up = Server::echo();
        let p = Payload::new(4_001, 300 * 1024 + 7);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let default = Forwarder::cli(Mode::Splice, &[up.addr()]);
        assert_eq!(
            workers(default.pid(), cores),
            cores,
            "default: one worker per CPU"
        );
        echo_check(default.addr(), p, TIMEOUT);

        let up_s = up.addr().to_string();
        let args = [
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up_s,
            "--mode",
            "splice",
        ];
        let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        args.extend(["--threads".into(), "3".into()]);
        let three = Forwarder::spawn(&[], args, 1, None);
        assert_eq!(workers(three.pid(), 3), 3, "--threads 3");
        echo_check(three.addr(), p, TIMEOUT);

        let toml = format!(
            "[global]\nthreads = 1\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"splice\"\n",
            up.addr()
        );
        let one = Forwarder::config(None, &toml, 1);
        assert_eq!(workers(one.pid(), 1), 1, "global.threads = 1");
        echo_check(one.addr(), p, TIMEOUT);

        // The same file with --threads 2: the flag wins.
        let dir = TempDir::new("threads");
        let path = dir.write("c.toml", &toml);
        let args: [std::ffi::OsString; 5] = [
            "run".into(),
            "--config".into(),
            path.into(),
            "--threads".into(),
            "2".into(),
        ];
        let two = Forwarder::spawn(&[], args.to_vec(), 1, Some(dir));
        assert_eq!(
            workers(two.pid(), 2),
            2,
            "global.threads = 1 with --threads 2"
        );
        echo_check(two.addr(), p, TIMEOUT);

        for n in ["0", "1025"] {
            assert_config_error(
                &format!("[global]\nthreads = {n}\n{RULE}"),
                &["global.threads"],
            );
            let mut cmd = forwarder_command();
            cmd.args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
            ])
            .args(["--threads", n]);
            let o = run_to_exit(cmd, TIMEOUT);
            assert_eq!(o.code(), Some(2), "--threads {n}: stderr:\n{}", o.stderr);
            assert!(
                o.stderr.contains("--threads"),
                "--threads {n}: {}",
                o.stderr
            );
        }
    }

    /// Values `check` used to pass and `run` could not live with (audit cfz): a limit
    /// beyond what a semaphore holds (run panicked), a duration beyond the clock
    /// (every connection's task panicked), `M` (months, where a minute was meant), a
    /// check every nanosecond (14,000 connects a second at the upstream), a rate of
    /// `inf` (no limit, unsaid), a rule name with `/` (its dump files written outside
    /// `inspect.to`), an empty token file blamed on `token`. Each exits 2 naming its key.
    #[test]
    fn values_that_could_not_run_exit_2_naming_the_key() {
        // 2^32: draining counts the permits in a u32 (it drained nothing); more than
        // 2^61 panicked making the semaphore.
        let too_many = "4294967296";
        let toml = format!("[global]\nmax_connections = {too_many}\n{RULE}");
        assert_config_error(
            &toml,
            &["global.max_connections", "must be at most 4294967295"],
        );
        let toml = format!("{RULE}max_connections = {too_many}\n");
        assert_config_error(&toml, &["rule[0].max_connections", "at most", "(line 4)"]);
        for key in ["idle_timeout", "connect_timeout", "max_connection_duration"] {
            let toml = format!("{RULE}{key} = \"9000000000000000000s\"\n");
            assert_config_error(
                &toml,
                &[&format!("rule[0].{key}"), "at most 3650d", "line 4"],
            );
        }
        let toml = format!("[global]\nshutdown_grace = \"3651d\"\n{RULE}");
        assert_config_error(&toml, &["global.shutdown_grace", "at most 3650d", "line 2"]);
        let toml = format!("{RULE}idle_timeout = \"1yr\"\n");
        assert_config_error(&toml, &["rule[0].idle_timeout", "no unit \"yr\"", "line 4"]);
        let toml = format!("{RULE}idle_timeout = \"1M\"\n");
        assert_config_error(
            &toml,
            &["rule[0].idle_timeout", "\"1m\" for a minute", "line 4"],
        );
        let toml = format!("{RULE}check_interval = \"1ns\"\n");
        assert_config_error(
            &toml,
            &["rule[0].check_interval", "at least 10ms", "(line 4)"],
        );
        let toml = format!("{RULE}rate_per_source = \"inf/s\"\n");
        assert_config_error(&toml, &["rule[0].rate_per_source", "more than 0"]);
        let toml = RULE.replace("[[rule]]\n", "[[rule]]\nname = \"../escape\"\n");
        assert_config_error(&toml, &["rule[0].name", "`/`", "(line 2)"]);
        let dir = TempDir::new("token");
        let empty = dir.write("empty.token", " \n");
        let toml = format!(
            "[tunnel_server]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n\
             [[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"agent:web\"\n",
            empty.display().to_string()
        );
        assert_config_error(&toml, &["tunnel_server.token_file", "must not be empty"]);
        // Still accepted: what README shows, combined units, 0s for no active checks,
        // TOML's largest integer as a per-source limit ("no limit": no semaphore).
        let toml = format!(
            "{RULE}idle_timeout = \"1h 30m\"\ncheck_interval = \"0s\"\n\
             max_connections_per_source = 9223372036854775807\n"
        );
        assert_eq!(check(&toml).code(), Some(0), "{}", check(&toml).stderr);
    }

    /// A config path that is a FIFO nobody writes to is an error that says so (exit 2
    /// at once), where `check` and `run` blocked in open() for ever; a token file too.
    #[test]
    fn a_fifo_with_no_writer_does_not_block() {
        let dir = TempDir::new("fifo");
        let fifo = dir.path().join("c.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        for verb in ["check", "run"] {
            assert_file_error(verb, &fifo, "a FIFO with no writer");
        }
        // A token file that is such a FIFO likewise (it blocked a reload too).
        let toml = format!(
            "[tunnel_server]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n\
             [[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"agent:web\"\n",
            fifo.display().to_string()
        );
        assert_config_error(
            &toml,
            &["tunnel_server.token_file", "a FIFO with no writer"],
        );
    }

    /// An `inspect.to` directory the `user` cannot write: the forwarder refuses to start
    /// (exit 2, naming the key), where it started and every connection's dump then
    /// failed with EACCES (audit cfz). Root before the drop could write it, so the
    /// check runs after it.
    #[test]
    fn a_dump_directory_the_user_cannot_write_exits_2() {
        let dir = TempDir::new("dumps");
        let only_root = dir.path().join("only-root");
        std::fs::create_dir(&only_root).unwrap();
        let toml = format!(
            "[global]\nuser = \"nobody\"\n{RULE}inspect = {{ bytes = 64, to = {:?} }}\n",
            only_root.display().to_string()
        );
        let o = check(&toml);
        assert_eq!(
            o.code(),
            Some(0),
            "check cannot know the user's rights: {}",
            o.stderr
        );
        let o = run_config(&toml);
        assert_eq!(
            o.code(),
            Some(2),
            "{}; stderr:\n{}",
            describe_status(&o.status),
            o.stderr
        );
        for n in ["rule[0].inspect.to", "cannot write there"] {
            assert!(
                o.stderr.contains(n),
                "stderr does not mention {n:?}:\n{}",
                o.stderr
            );
        }
    }

    /// A byte that is not UTF-8, even in a comment, names its line (it named none).
    #[test]
    fn a_file_that_is_not_utf8_names_the_line() {
        let dir = TempDir::new("utf8");
        let path = dir.path().join("c.toml");
        let mut bytes = format!("{RULE}# caf").into_bytes();
        bytes.extend_from_slice(b"\xe9\n"); // Latin-1's é
        std::fs::write(&path, bytes).unwrap();
        assert_file_error("check", &path, "not UTF-8 (byte 0xe9 on line 4)");
    }
}
