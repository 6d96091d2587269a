//! The loaded kernel side: one program and its maps per process, shared by all rules.
//!
//! Nothing is pinned: the program stays attached to the SOCKHASH only while this
//! process holds the map's fd, so exit (clean or not) leaves nothing behind.

use std::collections::HashMap as StdHashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use forwarder_common::{
    DirControl, DirState, CONTROL_MAP, MEMBERS_MAP, SOCKS_MAP, STATE_MAP, VERDICT_PLAIN_PROG,
    VERDICT_PROG, WAKES_MAP,
};
use tokio::sync::Notify;

use super::part::LockedPart;
use super::sys::Epoll;

#[cfg(has_ebpf)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/forwarder-ebpf.o"
)));
#[cfg(not(has_ebpf))]
static OBJECT: Option<&[u8]> = None;

pub const NOT_BUILT: &str = "kernel path not built into this binary";

/// Whether this binary carries the kernel program.
pub fn built_in() -> bool {
    OBJECT.is_some()
}

pub struct Kernel {
    /// Redirect targets (no program attached).
    pub socks: Mutex<SockHash<MapData, u64>>,
    /// Sockets running the verdict program (attached to this map).
    pub members: Mutex<SockHash<MapData, u64>>,
    pub state: Mutex<HashMap<MapData, u64, DirState>>,
    pub control: Mutex<HashMap<MapData, u64, DirControl>>,
    /// STATE's and CONTROL's fds, for the batched calls aya does not wrap (owned by
    /// `state` and `control`).
    state_fd: RawFd,
    control_fd: RawFd,
    /// Whether this kernel takes batched map calls (5.6+); per-element calls if not.
    batches: AtomicBool,
    /// Cookies of ended pairs whose STATE and CONTROL entries wait to be deleted
    /// together (see [`Kernel::retire_dirs`]).
    retired: Mutex<Vec<u64>>,
    /// How the verdict program is attached, for the startup line.
    pub attach: &'static str,
    /// Every paired socket, by its cookie: where its epoll events and the program's
    /// wake-ups for it go (see [`Kernel::watch`]).
    watched: Arc<Mutex<StdHashMap<u64, Watched>>>,
    /// Told when `watched` gets its first pair: the sleep check waits for it.
    first_watched: Arc<Notify>,
    /// One epoll set for every paired socket (a pair holds no fd but its sockets).
    epoll: Arc<Epoll>,
    /// Parts sockets under their socket lock; None where the kernel cannot run it.
    locked_part: Option<LockedPart>,
    // Owns the program (and with aya's attach, its link): keep last.
    _ebpf: Ebpf,
}

/// How [`Kernel::part`] took sockets out of MEMBERS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parted {
    /// Under their socket locks: no verdict can still be running for them.
    Locked,
    /// With a plain delete, because nothing more arrives: it had received its FIN,
    /// or (a socket of a walk) it was closed (TCP_CLOSE: no longer hashed, so the walk
    /// does not meet it).
    Closed,
    /// With a plain delete: a verdict running on another CPU may still run (and drop
    /// its skb if it finds the program gone).
    Unlocked,
}

impl Parted {
    pub fn as_str(self) -> &'static str {
        match self {
            Parted::Locked => "under its socket lock",
            Parted::Closed => "(nothing more arrives on a socket of it: no lock needed)",
            Parted::Unlocked => "without the socket lock",
        }
    }
}

/// Whether the effective set holds what loading needs: CAP_BPF (or CAP_SYS_ADMIN, which
/// older kernels ask for) and CAP_NET_ADMIN. Not the uid: root in a container or a unit
/// with a trimmed bounding set may lack them, and must be told so, not blame seccomp.
fn has_kernel_path_caps() -> bool {
    use caps::Capability::{CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN};
    (has_cap(CAP_BPF) || has_cap(CAP_SYS_ADMIN)) && has_cap(CAP_NET_ADMIN)
}

/// Whether the effective set holds `c`.
pub(super) fn has_cap(c: caps::Capability) -> bool {
    caps::has_cap(None, caps::CapSet::Effective, c).unwrap_or(false)
}

/// What a failed load means for the user, and what to do, from the errno under it.
fn load_hint(e: &(dyn std::error::Error + 'static), privileged: bool) -> String {
    let mut errno = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            errno = io.raw_os_error();
        }
        cur = err.source();
    }
    let why = match errno {
        Some(libc::EPERM) | Some(libc::EACCES) if !privileged => {
            "the kernel path needs CAP_BPF and CAP_NET_ADMIN: run as root, give the binary \
             both with `setcap cap_bpf,cap_net_admin+ep BINARY`, or grant them with \
             AmbientCapabilities= in its systemd unit"
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "bpf() is not permitted here even with CAP_BPF and CAP_NET_ADMIN: a seccomp filter (a container's \
             default profile) or kernel lockdown denies it; allow the bpf syscall \
             (e.g. run the container with a seccomp profile that permits it) or run on the host"
        }
        Some(libc::ENOSYS) => {
            "this kernel has no bpf() system call: it needs CONFIG_BPF_SYSCALL=y \
             (and CONFIG_BPF_STREAM_PARSER=y for sockmap)"
        }
        Some(libc::EINVAL) => {
            "this kernel rejects the sockmap maps or program: it needs \
             CONFIG_BPF_STREAM_PARSER=y (6.1 and 6.18 are tested; see docs/ARCHITECTURE.md, Kernels)"
        }
        _ => return String::new(),
    };
    format!(" ({why})")
}

/// The verdict program called `name` in the object.
fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SkSkb, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?
        .try_into()
        .map_err(|e| format!("program {name}: {e}"))
}

/// A load error without the verifier's log, which aya appends whole.
fn brief(e: &str) -> &str {
    let e = e.split(" Verifier output:").next().unwrap_or_default();
    e.lines().next().unwrap_or_default().trim_end_matches('.')
}

fn load_verdict(ebpf: &mut Ebpf, name: &str) -> Result<(), String> {
    program(ebpf, name)?
        .load()
        .map_err(|e| format!("the kernel rejected the verdict program {name}: {e:#}"))
}

/// What loading needs privileges for: the object, the verdict program (the trimming
/// one where CAP_PERFMON allows) and the parting iterator. Made before `[global] user`
/// drops privileges, when a rule wants the kernel path ([`preload`]); the runtime's
/// [`Kernel::load`] then only attaches it and starts its tasks.
struct Loaded {
    ebpf: Ebpf,
    prog: &'static str,
    locked_part: Option<LockedPart>,
}

static PRELOADED: Mutex<Option<Result<Loaded, String>>> = Mutex::new(None);

/// Loads the programs now, while the process still has its privileges (one thread,
/// before the drop): dropped to a user without CAP_PERFMON, the kernel would refuse
/// the trimming verdict and the parting iterator, and the weaker fallbacks would run.
pub fn preload() {
    let loaded = Loaded::new();
    *PRELOADED.lock().unwrap_or_else(|e| e.into_inner()) = Some(loaded);
}

impl Loaded {
    fn new() -> Result<Loaded, String> {
        let object = OBJECT.ok_or(NOT_BUILT)?;
        // No kernel BTF: the program uses no CO-RE relocations, and parsing vmlinux's
        // BTF cost 16 MiB of RSS for the life of the process.
        let mut ebpf = EbpfLoader::new().btf(None).load(object).map_err(|e| {
            format!(
                "cannot load the eBPF object: {e}{}",
                load_hint(&e, has_kernel_path_caps())
            )
        })?;
        let prog = match load_verdict(&mut ebpf, VERDICT_PROG) {
            Ok(()) => VERDICT_PROG,
            Err(e) => {
                // Expected without CAP_PERFMON: the plain verdict relays the same, minus
                // the trim. The verifier's dump (dozens of lines) only at debug.
                tracing::info!(
                    "ebpf: the verdict cannot trim bytes TCP hands it twice ({}; reading the skb's sequence number needs CAP_PERFMON): after an overlapping retransmit its pair is reset, and the peer may have got some bytes twice first",
                    brief(&e)
                );
                tracing::debug!("ebpf: the trimming verdict's load: {e}");
                load_verdict(&mut ebpf, VERDICT_PLAIN_PROG)?;
                VERDICT_PLAIN_PROG
            }
        };
        let locked_part = LockedPart::load(&mut ebpf)
            .inspect_err(|e| {
                // Expected without CAP_PERFMON (a tracing program) or kernel BTF:
                // parting works as it did before the lock.
                tracing::info!(
                    "ebpf: sockets leave the maps with a plain delete, not under their socket lock ({}; the iterator needs {}): a packet arriving at that moment can be lost, and its pair is then reset",
                    brief(&e.why),
                    e.needs
                );
                tracing::debug!("ebpf: the parting iterator's load: {}", e.why);
            })
            .ok();
        Ok(Loaded {
            ebpf,
            prog,
            locked_part,
        })
    }
}

impl Kernel {
    /// Attaches the program (loading it first unless [`preload`] did) and starts its
    /// tasks. Must run inside the tokio runtime (log reader).
    pub fn load() -> Result<Kernel, String> {
        let preloaded = PRELOADED.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Loaded {
            mut ebpf,
            prog,
            locked_part,
        } = preloaded.unwrap_or_else(Loaded::new)?;
        spawn_logger(&mut ebpf);
        let socks: SockHash<MapData, u64> = take(&mut ebpf, SOCKS_MAP)?;
        let members: SockHash<MapData, u64> = take(&mut ebpf, MEMBERS_MAP)?;
        let state_fd = hash_map_fd(&ebpf, STATE_MAP)?;
        let control_fd = hash_map_fd(&ebpf, CONTROL_MAP)?;
        let state: HashMap<MapData, u64, DirState> = take(&mut ebpf, STATE_MAP)?;
        let control: HashMap<MapData, u64, DirControl> = take(&mut ebpf, CONTROL_MAP)?;
        let wakes: RingBuf<MapData> = take(&mut ebpf, WAKES_MAP)?;
        let watched = Arc::new(Mutex::new(StdHashMap::new()));
        spawn_waker(wakes, watched.clone())?;
        let epoll = Arc::new(Epoll::new().map_err(|e| format!("epoll_create: {e}"))?);
        spawn_epoll_reader(epoll.clone(), watched.clone())?;
        let first_watched = Arc::new(Notify::new());
        spawn_sleep_check(watched.clone(), first_watched.clone());
        let prog: &mut SkSkb = program(&mut ebpf, prog)?;
        let prog_fd = prog.fd().map_err(|e| e.to_string())?.as_fd().as_raw_fd();
        let attach = match attach_sk_skb_verdict(prog_fd, members.fd().as_fd().as_raw_fd()) {
            Ok(()) => "sk_skb_verdict",
            Err(e) => {
                tracing::debug!("BPF_SK_SKB_VERDICT attach failed ({e}); trying stream_verdict");
                prog.attach(members.fd())
                    .map_err(|e| format!("cannot attach the verdict program: {e:#}"))?;
                "sk_skb_stream_verdict"
            }
        };
        Ok(Kernel {
            socks: Mutex::new(socks),
            members: Mutex::new(members),
            state: Mutex::new(state),
            control: Mutex::new(control),
            state_fd,
            control_fd,
            batches: AtomicBool::new(true),
            retired: Mutex::new(Vec::with_capacity(RETIRE_BATCH)),
            attach,
            watched,
            first_watched,
            epoll,
            locked_part,
            _ebpf: ebpf,
        })
    }

    /// Starts delivering `sock`'s epoll events (for `events`) and the program's
    /// wake-ups for its direction to `signals`, as side `side`, until [`Kernel::unwatch`].
    pub fn watch(
        &self,
        cookie: u64,
        sock: &impl AsRawFd,
        side: usize,
        events: u32,
        signals: Arc<PairSignals>,
    ) -> io::Result<()> {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if watched.is_empty() {
            self.first_watched.notify_waiters();
        }
        watched.insert(cookie, Watched { signals, side });
        drop(watched);
        self.epoll.add(sock.as_raw_fd(), events, cookie)
    }

    pub fn rewatch(&self, cookie: u64, sock: &impl AsRawFd, events: u32) -> io::Result<()> {
        self.epoll.modify(sock.as_raw_fd(), events, cookie)
    }

    /// Stops delivering; `sock` is taken out of the epoll set unless it was closed
    /// (closing did that).
    pub fn unwatch(&self, cookie: u64, sock: Option<&impl AsRawFd>) {
        if let Some(sock) = sock {
            let _ = self.epoll.delete(sock.as_raw_fd());
        }
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cookie);
    }

    pub fn dir_state(&self, cookie: u64) -> io::Result<DirState> {
        let map = self.state.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&cookie, 0).map_err(io::Error::other)
    }

    pub fn set_control(&self, cookie: u64, c: DirControl) -> io::Result<()> {
        let mut map = self.control.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(cookie, c, 0).map_err(io::Error::other)
    }

    /// Sets up both directions of a pair (keyed by their sources' cookies): zeroed
    /// STATE, CONTROL with `limit`. One batched bpf(2) call per map where the kernel
    /// takes them: a bpf(2) call costs 1–1.5 µs on the bench host, and a short
    /// connection on the kernel path made 15 of them.
    pub fn init_dirs(&self, cookies: [u64; 2], limit: u64) -> io::Result<()> {
        let c = DirControl {
            consumed: 0,
            limit,
            sleep: 0,
        };
        if self.batches.load(Ordering::Relaxed) {
            match super::sys::map_update_batch(self.state_fd, &cookies, &[DirState::default(); 2])
                .and_then(|()| super::sys::map_update_batch(self.control_fd, &cookies, &[c; 2]))
            {
                Ok(()) => return Ok(()),
                Err(e) if !batch_unsupported(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!("ebpf: no batched map calls here ({e}); one call per element");
                    self.batches.store(false, Ordering::Relaxed);
                }
            }
        }
        for cookie in cookies {
            let mut map = self.state.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(cookie, DirState::default(), 0)
                .map_err(io::Error::other)?;
            drop(map);
            self.set_control(cookie, c)?;
        }
        Ok(())
    }

    /// Puts `peer` under key `cookie` in SOCKS: bytes arriving on the socket with that
    /// cookie go to `peer`. `peer` gets a psock but runs no program yet.
    pub fn insert_sock(&self, cookie: u64, peer: &impl AsRawFd) -> io::Result<()> {
        let mut map = self.socks.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(cookie, peer.as_raw_fd(), 0)
            .map_err(map_error_to_io)
    }

    pub fn remove_sock(&self, cookie: u64) {
        let mut map = self.socks.lock().unwrap_or_else(|e| e.into_inner());
        let _ = map.remove(&cookie);
    }

    /// Makes `sock` (whose cookie is `cookie`) run the verdict program on its bytes.
    pub fn join(&self, cookie: u64, sock: &impl AsRawFd) -> io::Result<()> {
        let mut map = self.members.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(cookie, sock.as_raw_fd(), 0)
            .map_err(map_error_to_io)
    }

    /// Stops running the program for the sockets with these cookies (a psock, and
    /// what is queued on it, stays while its socket is still in SOCKS), under their
    /// socket locks where it can (see [`LockedPart`]). Walks every TCP socket of the
    /// namespace: call it off the runtime's threads where it can wait.
    pub fn part(&self, cookies: &[u64]) -> Parted {
        let Some(locked) = &self.locked_part else {
            self.part_unlocked(cookies);
            return Parted::Unlocked;
        };
        match locked.part(cookies) {
            Ok(met) if met.iter().all(|&m| m) => Parted::Locked,
            Ok(met) => {
                // The walk meets every hashed socket: these were closed.
                let closed: Vec<u64> = cookies
                    .iter()
                    .zip(met)
                    .filter_map(|(c, met)| (!met).then_some(*c))
                    .collect();
                self.part_unlocked(&closed);
                Parted::Closed
            }
            Err(e) => {
                tracing::debug!("ebpf: parting under the socket lock failed: {e}");
                self.part_unlocked(cookies);
                Parted::Unlocked
            }
        }
    }

    /// [`Kernel::part`] without the socket lock: a verdict running on another CPU
    /// at that moment may drop its skb.
    pub fn part_unlocked(&self, cookies: &[u64]) {
        let mut map = self.members.lock().unwrap_or_else(|e| e.into_inner());
        for c in cookies {
            let _ = map.remove(c);
        }
    }

    /// Frees an ended pair's STATE and CONTROL entries, `RETIRE_BATCH` cookies at a
    /// time: one batched delete per map instead of four deletes per pair. Returns how
    /// many pairs' entries went now (until then they hold their room in the maps).
    /// Cookies are never reused, and a connection's sockets are set up on the kernel
    /// path at most once (a pair that leaves goes on in splice to its end), so an entry
    /// waiting here meets no new pair. Promoting a pair again would have to take its
    /// cookies back out of `retired` first.
    pub fn retire_dirs(&self, cookies: [u64; 2]) -> u32 {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.extend(cookies);
        if retired.len() < RETIRE_BATCH && self.batches.load(Ordering::Relaxed) {
            return 0;
        }
        let keys = std::mem::replace(&mut *retired, Vec::with_capacity(RETIRE_BATCH));
        drop(retired);
        self.delete_all(self.state_fd, &keys, |k| remove_key(&self.state, k));
        self.delete_all(self.control_fd, &keys, |k| remove_key(&self.control, k));
        (keys.len() / 2) as u32
    }

    /// Deletes `keys` from the hash map `map`, skipping keys it does not hold (a pair
    /// that failed before its entries were all set); `remove_one` deletes one key where
    /// batches do not work.
    fn delete_all(&self, map: RawFd, keys: &[u64], remove_one: impl Fn(u64)) {
        let rest = if self.batches.load(Ordering::Relaxed) {
            match super::sys::map_delete_batch(map, keys) {
                Ok(()) => return,
                Err((rest, e)) => {
                    if batch_unsupported(&e) {
                        self.batches.store(false, Ordering::Relaxed);
                    } else {
                        tracing::debug!("ebpf: batched map delete failed: {e}");
                    }
                    rest
                }
            }
        } else {
            keys
        };
        for key in rest {
            remove_one(*key);
        }
    }
}

/// Deletes `key` from `map` with one bpf(2) call (where batches do not work).
fn remove_key<V: aya::Pod>(map: &Mutex<HashMap<MapData, u64, V>>, key: u64) {
    let _ = map.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
}

/// Ended pairs' cookies deleted from STATE and CONTROL in one call (32 pairs).
const RETIRE_BATCH: usize = 64;

/// Whether `e` says the kernel has no batched calls for this map (before 5.6).
fn batch_unsupported(e: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524; // the kernel's own, returned for a missing map op
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP)
    )
}

/// The fd of the hash map `name`, for the batched calls aya does not wrap; it stays
/// valid while the map (taken from `ebpf` afterwards) lives.
fn hash_map_fd(ebpf: &Ebpf, name: &str) -> Result<RawFd, String> {
    match ebpf.map(name) {
        Some(aya::maps::Map::HashMap(d)) => Ok(d.fd().as_fd().as_raw_fd()),
        Some(_) => Err(format!("map {name} is not a hash map")),
        None => Err(format!("map {name} missing from the object")),
    }
}

fn map_error_to_io(e: aya::maps::MapError) -> io::Error {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        other => io::Error::other(other),
    }
}

pub(super) fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, String>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| format!("map {name} missing from the object"))?;
    T::try_from(map).map_err(|e| format!("map {name}: {e}"))
}

/// Attaches `prog` to the sockmap `map` as BPF_SK_SKB_VERDICT (kernel 5.13+).
///
/// aya 0.14 only knows the older STREAM_PARSER/STREAM_VERDICT attach types, so this is
/// a raw `bpf(BPF_PROG_ATTACH)` call. The attachment belongs to the map: it goes
/// away with the map's last fd, there is no link to detach.
fn attach_sk_skb_verdict(prog: i32, map: i32) -> io::Result<()> {
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_SK_SKB_VERDICT: u32 = 38;
    /// The BPF_PROG_ATTACH member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct ProgAttachAttr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
        relative_fd: u32,
        expected_revision: u64,
    }
    let attr = ProgAttachAttr {
        target_fd: map as u32,
        attach_bpf_fd: prog as u32,
        attach_type: BPF_SK_SKB_VERDICT,
        attach_flags: 0,
        replace_bpf_fd: 0,
        relative_fd: 0,
        expected_revision: 0,
    };
    super::sys::bpf(BPF_PROG_ATTACH, &attr).map(drop)
}

/// Forwards the program's aya-log records to `log` (bridged to tracing by the
/// subscriber), read whenever the ring buffer has something.
fn spawn_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("eBPF logs not available: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, open and unchanged until dropped
    // together with the AsyncFd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut afd = match registered {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!("eBPF logs not available: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = afd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// What the shared tasks tell one pair's watch loop: the epoll events of each of its
/// sockets, and that it should look (an event, or the program's wake-up).
#[derive(Default)]
pub struct PairSignals {
    pub notify: Notify,
    pub events: [AtomicU32; 2],
}

struct Watched {
    signals: Arc<PairSignals>,
    side: usize,
}

type Registry = Arc<Mutex<StdHashMap<u64, Watched>>>;

/// Reads the program's wake-ups (cookies) whenever the ring buffer has some, and wakes
/// the pairs they belong to. One task for every pair: a sleeping pair costs nothing.
fn spawn_waker(wakes: RingBuf<MapData>, watched: Registry) -> Result<(), String> {
    // SAFETY: the ring buffer owns its fd, open and unchanged until it is dropped
    // together with the AsyncFd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(wakes, tokio::io::Interest::READABLE)
    };
    let mut afd = registered.map_err(|e| format!("cannot watch the WAKES ring buffer: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = afd.readable_mut().await else {
                return;
            };
            let rb = guard.get_inner_mut();
            while let Some(item) = rb.next() {
                let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) else {
                    continue;
                };
                let cookie = u64::from_ne_bytes(bytes);
                let map = watched.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(w) = map.get(&cookie) {
                    w.signals.notify.notify_one();
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Wakes every watched pair once per [`super::pair::SLEEP_CHECK`], so a sleeping pair
/// whose wake-up was lost (the ring buffer full, say) looks at its counters anyway. One
/// timer for all pairs instead of one each (idle pairs hold none), and spread: each
/// second it wakes the pairs whose cookie falls in that second's slice, so 10,000
/// idle pairs cost a steady trickle (about 170 looks a second, two map reads each for a
/// pair that is still quiet), never one burst. With no pair at all it does not tick:
/// it waits for `first`, which the first pair to come in notifies.
fn spawn_sleep_check(watched: Registry, first: Arc<Notify>) {
    tokio::spawn(async move {
        let slices = super::pair::SLEEP_CHECK.as_secs().max(1);
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            every.tick().await;
            // Listening before looking: a pair that comes in after the look wakes it
            // (and no wake-up is stored for later, which would cost a spare tick).
            let arrived = first.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if watched.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                arrived.await;
                every.reset();
                continue;
            }
            let map = watched.lock().unwrap_or_else(|e| e.into_inner());
            // Each pair is registered once per socket: wake it through its client's.
            for (_, w) in map
                .iter()
                .filter(|(c, w)| w.side == 0 && *c % slices == n % slices)
            {
                w.signals.notify.notify_one();
            }
        }
    });
}

/// Reads the shared epoll set and hands each socket's events to its pair.
fn spawn_epoll_reader(epoll: Arc<Epoll>, watched: Registry) -> Result<(), String> {
    // SAFETY: the Epoll owns its fd, open and unchanged while this Arc (and so the
    // AsyncFd) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)
    };
    let afd = registered.map_err(|e| format!("cannot watch the epoll set: {e}"))?;
    tokio::spawn(async move {
        let mut events = Vec::new();
        loop {
            let Ok(mut guard) = afd.readable().await else {
                return;
            };
            loop {
                if afd.get_ref().poll(&mut events).is_err() || events.is_empty() {
                    break;
                }
                let map = watched.lock().unwrap_or_else(|e| e.into_inner());
                for &(cookie, ev) in &events {
                    if let Some(w) = map.get(&cookie) {
                        w.signals.events[w.side].fetch_or(ev, Ordering::Relaxed);
                        w.signals.notify.notify_one();
                    }
                }
                // A short read emptied the set: one more would find nothing (an event
                // that lands after it makes the set readable again, and `clear_ready`
                // keeps readiness that arrived after `readable()`).
                if events.len() < Epoll::BATCH {
                    break;
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}
