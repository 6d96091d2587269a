//! `[global] user`: run as an unprivileged user, keeping only the capabilities the
//! forwarder still uses.
//!
//! Capabilities belong to each thread, so the drop happens in `main` before the
//! runtime starts any thread: every thread the process ever has inherits it. The
//! listeners are bound by then, and the kernel programs loaded (`kernel::preload`);
//! they are attached afterwards, with the CAP_BPF and CAP_NET_ADMIN kept for exactly
//! that (and for the maps updated per pair).

use anyhow::{bail, Context};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid};

use crate::config::RunAs;

/// What stays: the kernel path's two, and binding ports below 1024 on reload.
pub const KEPT: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_BIND_SERVICE,
];

/// Switches the process to `who`, with [`KEPT`] as its permitted and effective sets
/// (those of them it had) and nothing else, bounding set included.
/// Must run while the process has one thread.
pub fn drop_to(who: &RunAs) -> anyhow::Result<()> {
    let keep: CapsHashSet = KEPT.into_iter().collect();
    let had = caps::read(None, CapSet::Permitted).context("cannot read capabilities")?;
    let keep: CapsHashSet = keep.intersection(&had).copied().collect();
    // While still privileged: nothing beyond `keep` can ever come back (execve).
    if had.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding).context("cannot read the bounding set")? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)
                    .with_context(|| format!("cannot drop {cap} from the bounding set"))?;
            }
        }
    }
    let (uid, gid) = (Uid::from_raw(who.uid), Gid::from_raw(who.gid));
    if Uid::current() != uid || Gid::current() != gid {
        if !Uid::effective().is_root() {
            bail!(
                "cannot switch to user {:?}: only root can (running as uid {})",
                who.user,
                Uid::effective()
            );
        }
        // Keep the permitted set across setuid (the effective one is cleared).
        nix::sys::prctl::set_keepcaps(true).context("prctl(PR_SET_KEEPCAPS)")?;
        nix::unistd::setgroups(&[gid]).context("setgroups")?;
        nix::unistd::setgid(gid).with_context(|| format!("setgid({gid})"))?;
        nix::unistd::setuid(uid).with_context(|| format!("setuid({uid})"))?;
        nix::sys::prctl::set_keepcaps(false).context("prctl(PR_SET_KEEPCAPS)")?;
    }
    caps::clear(None, CapSet::Ambient).context("cannot clear the ambient set")?;
    caps::clear(None, CapSet::Inheritable).context("cannot clear the inheritable set")?;
    caps::set(None, CapSet::Effective, &keep).context("cannot set the effective set")?;
    caps::set(None, CapSet::Permitted, &keep).context("cannot set the permitted set")?;
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    tracing::info!(
        "privileges: running as user={} uid={uid} gid={gid} capabilities={}",
        who.user,
        names.join(",")
    );
    Ok(())
}
