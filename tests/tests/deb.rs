//! The Debian package (`cargo xtask deb`): installs on this host with `dpkg -i`, its
//! binary has the kernel path, its config checks, its unit is in place, its user
//! exists; and `dpkg --purge` removes all of it.
//!
//! `cargo xtask test` builds the package and passes it as `FORWARDER_DEB`. The test
//! changes the host (a package, a system user), so it refuses to run where a
//! `forwarder` package or user already exists, and purges what it installed even when
//! it fails.

use std::path::Path;
use std::time::Duration;

use forwarder_tests::*;

const PACKAGE: &str = "forwarder";
const CONFIG: &str = "/etc/forwarder/forwarder.toml";
const UNIT: &str = "/lib/systemd/system/forwarder.service";

fn run(program: &str, args: &[&str]) -> Output {
    let mut cmd = command(program);
    cmd.args(args);
    run_to_exit(cmd, Duration::from_secs(120))
}

fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    out.stdout.contains("install ok installed")
}

fn user_exists() -> bool {
    run("getent", &["passwd", PACKAGE]).code() == Some(0)
}

/// Purges the package when dropped, so a failed assertion leaves the host clean.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed() {
            let _ = run("dpkg", &["--purge", PACKAGE]);
        }
    }
}

#[test]
fn deb_installs_checks_and_purges() {
    let _g = light();
    assert!(is_root(), "installing a package needs root");
    let deb = std::env::var("FORWARDER_DEB").unwrap_or_else(|_| {
        panic!("FORWARDER_DEB is not set: run `cargo xtask test`, or `cargo xtask deb` and set it")
    });
    assert!(Path::new(&deb).is_file(), "{deb} is missing");
    assert!(
        !installed() && !user_exists(),
        "a forwarder package or user already exists on this host: not touching it"
    );

    let purge = Purge;
    let out = run("dpkg", &["-i", &deb]);
    assert_eq!(
        out.code(),
        Some(0),
        "dpkg -i {deb}: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(installed());
    assert!(user_exists(), "postinst did not create the forwarder user");
    assert!(Path::new(UNIT).is_file(), "{UNIT} missing");
    let unit = std::fs::read_to_string(UNIT).unwrap();
    for line in ["Type=notify", "User=forwarder", "NoNewPrivileges=yes"] {
        assert!(unit.contains(line), "{UNIT} lacks {line}");
    }
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", PACKAGE]);
    assert!(
        conffiles.stdout.contains(CONFIG),
        "{CONFIG} is not a conffile: {:?}",
        conffiles.stdout
    );

    let check = run("/usr/bin/forwarder", &["check", "-c", CONFIG]);
    assert_eq!(check.code(), Some(0), "forwarder check: {}", check.stderr);
    assert!(check.stdout.contains("ok, 1 rule(s)"), "{}", check.stdout);
    let version = run("/usr/bin/forwarder", &["--version"]);
    assert!(
        version.stdout.contains("kernel path built in"),
        "the packaged binary lacks the kernel path: {}",
        version.stdout
    );
    // The packaged binary forwards on the kernel path, as the user the unit runs as.
    let echo = Server::echo();
    let fwd = Forwarder::spawn_bin(
        &[],
        Path::new("/usr/bin/forwarder"),
        vec![
            "run".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--upstream".into(),
            echo.addr().to_string().into(),
            "--mode".into(),
            "ebpf".into(),
        ],
        1,
        None,
    );
    fwd.assert_mode(Mode::Ebpf);
    echo_check_paired(
        fwd.addr(),
        Payload::new(1, 64 * KIB),
        Duration::from_secs(10),
    );
    drop(fwd);

    let out = run("dpkg", &["--purge", PACKAGE]);
    assert_eq!(
        out.code(),
        Some(0),
        "dpkg --purge: {}{}",
        out.stdout,
        out.stderr
    );
    drop(purge);
    assert!(!installed());
    for gone in ["/usr/bin/forwarder", UNIT, CONFIG] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(
        !user_exists(),
        "postrm did not remove the forwarder user on purge"
    );
}
