//! `--mode auto` with the kernel path available: every pair starts on splice and moves
//! to the kernel path once it proves interactive (16 bursts), and leaves it again at
//! its in-flight bound. The close line's `path=` names every path a pair took.

mod ebpf {
    use std::io::Read;
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::thread;
    use std::time::{Duration, Instant};

    use forwarder_tests::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn auto_forwarder(upstream: SocketAddr, extra: &str) -> Forwarder {
        let toml = format!(
            "[[rule]]\nname = \"auto\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"auto\"\n{extra}\n"
        );
        let fwd = Forwarder::config(None, &toml, 1);
        assert!(
            fwd.listening[0].line.contains("pairs start on splice"),
            "auto did not choose the kernel path: {}",
            fwd.listening[0].line
        );
        fwd
    }

    /// `n` small round trips on `s` through an echo (each a burst each way).
    fn chat(s: &TcpStream, n: usize) {
        for i in 0..n {
            ping(s, format!("msg {i:04}").as_bytes(), secs(5))
                .unwrap_or_else(|e| panic!("round trip {i}: {e}"));
        }
    }

    /// Short request/response pairs never touch the maps: they stay on splice (the
    /// connection rate of the kernel path is then splice's), and so does a pair that
    /// says one thing and goes quiet. No byte goes through userspace.
    #[test]
    fn short_and_idle_pairs_stay_on_splice() {
        if !ebpf_can_run("ebpf::short_and_idle_pairs_stay_on_splice") {
            return;
        }
        let _load = light();
        let up = Server::echo();
        let fwd = auto_forwarder(up.addr(), "");
        // The listening line says mode=ebpf (the rule may use the kernel path); these
        // pairs must not.
        fwd.expect_paths(&["splice"]).expect_pairs(0);
        for i in 0..20 {
            echo_check(fwd.addr(), Payload::new(500 + i, 1000 + i * 7), secs(5));
        }
        let quiet = connect(fwd.addr());
        chat(&quiet, 3);
        thread::sleep(Duration::from_millis(300));
        chat(&quiet, 1);
        drop(quiet);
        let closes = fwd.wait_close_lines(21, secs(5));
        assert_eq!(closes.len(), 21, "{closes:#?}");
        for l in &closes {
            assert_eq!(field(l, "path"), Some("splice"), "{l}");
        }
    }

    /// `pairs` echo pairs through `fwd`, each connected and heard once before any of
    /// them chats, then all chatting until every one made `rounds` round trips, then
    /// all closing together (a pair still in its last round trip while the others
    /// close would be one of few). Returns their close lines.
    fn chat_together(fwd: &Forwarder, pairs: usize, rounds: usize) -> Vec<String> {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        // A barrier with a deadline: a pair that failed must not leave the others
        // waiting for ever.
        let gate = |arrived: &AtomicUsize, what: &str| {
            arrived.fetch_add(1, Relaxed);
            let deadline = Instant::now() + secs(30);
            while arrived.load(Relaxed) < pairs {
                assert!(
                    Instant::now() < deadline,
                    "not every pair {what} within 30 s"
                );
                thread::sleep(Duration::from_millis(1));
            }
        };
        let (connected, heard, done) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let finished = AtomicUsize::new(0);
        thread::scope(|t| {
            for _ in 0..pairs {
                t.spawn(|| {
                    let s = connect(fwd.addr());
                    gate(&connected, "connected");
                    chat(&s, 1);
                    gate(&heard, "was heard");
                    // Until every pair made `rounds`: none chats alone at the end.
                    let mut i = 0;
                    while finished.load(Relaxed) < pairs {
                        assert!(i < 100 * rounds, "the others never finished");
                        chat(&s, 1);
                        i += 1;
                        if i == rounds {
                            finished.fetch_add(1, Relaxed);
                        }
                    }
                    gate(&done, "finished");
                });
            }
        });
        let closes = fwd.wait_close_lines(pairs, secs(5));
        assert_eq!(closes.len(), pairs, "{closes:#?}");
        for l in &closes {
            assert_eq!(field(l, "userspace_bytes"), Some("0"), "{l}");
        }
        closes
    }

    /// Many pairs in conversation at once stay on splice: past
    /// `PROMOTE_MAX_ACTIVE` (16) pairs moving bytes together, the kernel path's
    /// per-message redirect worker costs more than our own wake-ups (wrk: 0.80-0.82x
    /// splice's requests/s at 16 connections, 0.64-0.90x beyond). 32 pairs chat at
    /// once until every one made 40 round trips (80 bursts, 5 times what promotes a
    /// pair alone): every close line says `path=splice`, with no byte through
    /// userspace.
    #[test]
    fn many_pairs_chatting_at_once_stay_on_splice() {
        if !ebpf_can_run("ebpf::many_pairs_chatting_at_once_stay_on_splice") {
            return;
        }
        let _load = light();
        let up = Server::echo();
        let fwd = auto_forwarder(up.addr(), "");
        fwd.expect_paths(&["splice"]).expect_pairs(0);
        for l in chat_together(&fwd, 32, 40) {
            assert_eq!(field(&l, "path"), Some("splice"), "{l}");
        }
    }

    /// A dozen pairs in conversation at once each move to the kernel path, as one
    /// alone does: up to `PROMOTE_MAX_ACTIVE` (16) busy pairs, the kernel path serves
    /// them at least as well (wrk: 1.12-1.24x splice's requests/s at 1 to 4
    /// connections, 0.99-1.37x at 8).
    #[test]
    fn a_dozen_pairs_chatting_at_once_each_move() {
        if !ebpf_can_run("ebpf::a_dozen_pairs_chatting_at_once_each_move") {
            return;
        }
        let _load = light();
        let up = Server::echo();
        let fwd = auto_forwarder(up.addr(), "");
        fwd.expect_paths(&["splice>ebpf"]).expect_pairs(0);
        for l in chat_together(&fwd, 12, 40) {
            assert_eq!(field(&l, "path"), Some("splice>ebpf"), "{l}");
        }
    }

    /// Bulk streams are not conversation: six one-way uploads and six downloads of 64
    /// MiB each stay on splice from start to end. A bulk stream drains its socket again and again on
    /// a fast forwarder, and bursts used to be counted whatever their size: such pairs
    /// moved to the kernel path, and some sent 16 MiB before its first look and went on
    /// through SK_PASS (1.9 of 2 GB of a one-stream upload copied through userspace,
    /// or a reset by the duplication guard).
    #[test]
    fn bulk_streams_stay_on_splice() {
        if !ebpf_can_run("ebpf::bulk_streams_stay_on_splice") {
            return;
        }
        let _load = heavy();
        const LEN: u64 = 64 * MIB;
        let (sink, digests) = Server::answer_after_eof();
        let up = auto_forwarder(sink.addr(), "");
        let down_p = Payload::new(71_000, LEN + 1);
        let source = Server::source(down_p);
        let down = auto_forwarder(source.addr(), "");
        for fwd in [&up, &down] {
            fwd.expect_paths(&["splice"]).expect_pairs(0);
        }
        const ROUNDS: u64 = 6;
        for i in 0..ROUNDS {
            let deadline = Instant::now() + secs(30);
            let p = Payload::new(70_900 + i, LEN + i);
            let s = connect(up.addr());
            p.write_to(&s, deadline).expect("upload");
            s.shutdown(Shutdown::Write).unwrap();
            let answer = read_to_end(&s, 256, deadline).expect("the sink's answer");
            let d = digests
                .recv_timeout(secs(5))
                .expect("sink digest")
                .expect("sink read");
            assert_eq!(d, Digested::of(&p), "upload {i}: the sink got other bytes");
            assert_eq!(
                String::from_utf8_lossy(&answer),
                format!("{} {}\n", hex(&d.sha), d.len),
                "upload {i}: answer"
            );
            let s = connect(down.addr());
            let got = read_digest(&s, deadline).expect("download");
            assert_eq!(got, Digested::of(&down_p), "download {i}");
        }
        for fwd in [&up, &down] {
            for l in fwd.wait_close_lines(ROUNDS as usize, secs(5)) {
                assert_eq!(
                    field(&l, "path"),
                    Some("splice"),
                    "a bulk pair left splice: {l}"
                );
                assert_eq!(field(&l, "userspace_bytes"), Some("0"), "{l}");
            }
        }
    }

    /// 100 pairs, each: 20 round trips (it moves to the kernel path: splice>ebpf),
    /// then both directions at full speed at once through an echo, 2 MiB each way with
    /// a 64 KiB in-flight bound (it leaves again: ...>splice), then 4 more round trips
    /// and a half-close. Every byte checked by sha256 both ways, every pair's moves
    /// read from its close line. Pairs run 4 at a time.
    #[test]
    fn pairs_move_both_ways_mid_transfer_100x() {
        if !ebpf_can_run("ebpf::pairs_move_both_ways_mid_transfer_100x") {
            return;
        }
        let _load = heavy();
        let up = Server::echo();
        let fwd = auto_forwarder(up.addr(), "inflight_limit = 65536");
        // Bytes the program passes before the pair leaves (past 4 x 64 KiB in flight)
        // go through userspace: at most the 2 MiB of each direction.
        fwd.expect_paths(&["splice>ebpf", "splice>ebpf>splice"])
            .expect_pairs(0)
            .expect_userspace_at_most(2 * (2 * MIB + 200));
        const PAIRS: u64 = 100;
        let started = Instant::now();
        for round in 0..PAIRS / 4 {
            thread::scope(|t| {
                for i in 0..4 {
                    let addr = fwd.addr();
                    t.spawn(move || {
                        let n = round * 4 + i;
                        let s = connect(addr);
                        chat(&s, 20);
                        let p = Payload::new(70_000 + n, 2 * MIB + n);
                        let deadline = Instant::now() + secs(30);
                        // Both directions at once: the echo streams back while we send.
                        let got = thread::scope(|t2| {
                            t2.spawn(|| p.write_to(&s, deadline).expect("upload"));
                            let mut h = Hasher::new();
                            let mut left = p.len;
                            let mut buf = vec![0u8; 256 * 1024];
                            set_read_deadline(&s, deadline).unwrap();
                            while left > 0 {
                                let want = left.min(buf.len() as u64) as usize;
                                let k = (&s).read(&mut buf[..want]).expect("echo");
                                assert!(k > 0, "pair {n}: EOF after {} bytes", p.len - left);
                                h.update(&buf[..k]);
                                left -= k as u64;
                            }
                            Digested {
                                len: p.len,
                                sha: h.finish(),
                            }
                        });
                        assert_eq!(got, Digested::of(&p), "pair {n}: echo differs");
                        chat(&s, 4);
                        s.shutdown(Shutdown::Write).unwrap();
                        let mut rest = Vec::new();
                        (&s).read_to_end(&mut rest)
                            .expect("EOF after the half-close");
                        assert!(
                            rest.is_empty(),
                            "pair {n}: {} bytes after the last echo",
                            rest.len()
                        );
                    });
                }
            });
        }
        let closes = fwd.wait_close_lines(PAIRS as usize, secs(10));
        assert_eq!(closes.len(), PAIRS as usize);
        let promoted = closes
            .iter()
            .filter(|l| field(l, "path").is_some_and(|p| p.starts_with("splice>ebpf")))
            .count();
        let back = closes
            .iter()
            .filter(|l| field(l, "path") == Some("splice>ebpf>splice"))
            .count();
        println!(
            "{PAIRS} pairs in {:.1?}: {promoted} moved splice>ebpf, {back} of them back to splice",
            started.elapsed()
        );
        for l in &closes {
            assert_eq!(field(l, "end"), Some("closed"), "{l}");
        }
        assert_eq!(promoted, PAIRS as usize, "every pair made 20 round trips");
        // Leaving needs the pair to be seen 16 KiB or more behind, or passing bytes:
        // certain with 2 MiB each way at full speed, but it is read on a 1 ms tick.
        assert!(
            back >= 90,
            "only {back} of {PAIRS} pairs left the kernel path"
        );
    }
}
