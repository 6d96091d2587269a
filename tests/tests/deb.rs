//! The Debian package (`cargo xtask deb`): installs on this host with `dpkg -i`, its
//! binary has the kernel path, its config checks, its unit is in place, its user
//! exists, and the binary run with the unit's user and capabilities gets the whole
//! kernel path; `dpkg --purge` removes all of it, but an administrator's own
//! `forwarder` user.
//!
//! `cargo xtask test` builds the package and passes it as `FORWARDER_DEB`. The test
//! changes the host (a package, a system user), so it refuses to run where a
//! `forwarder` package or user already exists, and purges what it installed even when
//! it fails.

use std::ffi::OsString;
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

/// Runs dpkg with `args`; panics with its output unless it succeeds.
fn dpkg(args: &[&str]) {
    let out = run("dpkg", args);
    assert_eq!(
        out.code(),
        Some(0),
        "dpkg {args:?}: {}{}",
        out.stdout,
        out.stderr
    );
}

fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    out.stdout.contains("install ok installed")
}

fn user_exists() -> bool {
    run("getent", &["passwd", PACKAGE]).code() == Some(0)
}

/// What the unit gives the process, as a `setpriv` prefix: its user and group, and
/// the union of its `AmbientCapabilities=` and `CapabilityBoundingSet=` lines (systemd
/// merges repeated lines), with no new privileges.
fn as_the_unit(unit: &str) -> Vec<OsString> {
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    let caps = |key: &str| -> String {
        let list: Vec<String> = values(key)
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        assert!(!list.is_empty(), "the unit has no {key} line");
        format!("-all,{}", list.join(","))
    };
    let one = |key: &str| -> String {
        let v = values(key);
        assert_eq!(v.len(), 1, "the unit's {key} lines: {v:?}");
        v[0].clone()
    };
    let ambient = caps("AmbientCapabilities=");
    [
        "setpriv".to_string(),
        format!("--reuid={}", one("User=")),
        format!("--regid={}", one("Group=")),
        "--init-groups".into(),
        format!("--inh-caps={ambient}"),
        format!("--ambient-caps={ambient}"),
        format!("--bounding-set={}", caps("CapabilityBoundingSet=")),
        "--no-new-privs".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
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
    dpkg(&["-i", &deb]);
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
    // The packaged binary forwards on the kernel path, as the user the unit runs as
    // and with the capabilities it gives: the trimming verdict and the parting
    // iterator load (without CAP_PERFMON the weaker programs ran, and a peer could get
    // bytes twice before its pair was reset).
    let echo = Server::echo();
    let fwd = Forwarder::spawn_bin(
        &as_the_unit(&unit),
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
    let weaker: Vec<String> = fwd
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("needs CAP_PERFMON"))
        .collect();
    assert!(
        weaker.is_empty(),
        "under the unit's capabilities: {weaker:#?}"
    );
    echo_check_paired(
        fwd.addr(),
        Payload::new(1, 64 * KIB),
        Duration::from_secs(10),
    );
    drop(fwd);

    assert!(
        Path::new("/usr/share/doc/forwarder/changelog.Debian.gz").is_file(),
        "no changelog.Debian.gz (lintian: no-changelog)"
    );

    // Enabled as `systemctl enable` does (systemd need not run here): purge removes
    // the link, or a later install would start enabled (audit).
    let wants = "/etc/systemd/system/multi-user.target.wants";
    let link = format!("{wants}/forwarder.service");
    std::fs::create_dir_all(wants).unwrap();
    std::os::unix::fs::symlink(UNIT, &link).unwrap();
    dpkg(&["--purge", PACKAGE]);
    drop(purge);
    assert!(!installed());
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "{link} left after purge"
    );
    for gone in ["/usr/bin/forwarder", UNIT, CONFIG] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(
        !user_exists(),
        "postrm did not remove the forwarder user on purge"
    );

    // An administrator's own `forwarder` user is used, and kept at purge.
    let own = run(
        "adduser",
        &[
            "--system",
            "--group",
            "--no-create-home",
            "--home",
            "/nonexistent",
            PACKAGE,
        ],
    );
    assert_eq!(own.code(), Some(0), "adduser: {}", own.stderr);
    let _own_user = DelUser;
    let purge = Purge;
    dpkg(&["-i", &deb]);
    dpkg(&["--purge", PACKAGE]);
    drop(purge);
    assert!(
        user_exists(),
        "postrm removed a forwarder user the package did not create"
    );
}

/// Removes the test's own `forwarder` user (and group) when dropped.
struct DelUser;

impl Drop for DelUser {
    fn drop(&mut self) {
        let _ = run("deluser", &["--system", PACKAGE]);
        let _ = run("delgroup", &["--system", PACKAGE]);
    }
}
