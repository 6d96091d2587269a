//! Types shared by the kernel programs (`forwarder-ebpf`) and userspace (`forwarder`).
//!
//! Every map is keyed by the socket cookie (`u64`) of the socket the bytes come FROM,
//! so one key names one direction of one pair.
#![no_std]

/// SOCKHASH: cookie(A) -> socket B, cookie(B) -> socket A: where each socket's bytes
/// are redirected. No program is attached to it, so joining it runs nothing.
pub const SOCKS_MAP: &str = "SOCKS";
/// SOCKHASH: cookie(A) -> socket A. The verdict program is attached here: a socket
/// runs it from the moment it joins this map. Pairs join SOCKS first, then this map,
/// so every verdict already finds its peer and no byte is passed while pairing.
pub const MEMBERS_MAP: &str = "MEMBERS";
/// HASH cookie -> [`DirState`], written by the verdict program only.
pub const STATE_MAP: &str = "STATE";
/// HASH cookie -> [`DirControl`], written by userspace only.
pub const CONTROL_MAP: &str = "CONTROL";
/// RINGBUF of cookies (u64): the program posts a direction's cookie on its first skb
/// after userspace put the pair to sleep ([`DirControl::sleep`]).
pub const WAKES_MAP: &str = "WAKES";
/// HASH cookie -> u32: sockets to take out of MEMBERS under their socket lock.
/// Userspace writes [`PARTING_ASKED`], runs [`PART_PROG`], and finds [`PARTING_DONE`].
pub const PARTING_MAP: &str = "PARTING";
pub const PARTING_ASKED: u32 = 1;
pub const PARTING_DONE: u32 = 2;
/// Name of the TCP iterator program that parts sockets (see PARTING_MAP).
pub const PART_PROG: &str = "part_locked";
/// Name of the sk_skb verdict program in the object: it trims bytes TCP hands it twice
/// (see [`DirState::next_seq`]), which needs CAP_PERFMON to load.
pub const VERDICT_PROG: &str = "forwarder_verdict";
/// The same verdict without the trim, for when [`VERDICT_PROG`] cannot load.
pub const VERDICT_PLAIN_PROG: &str = "forwarder_verdict_plain";
/// [`DirState::next_seq`] holds a sequence number (in its low 32 bits) when this bit is
/// set.
pub const NEXT_SEQ_KNOWN: u64 = 1 << 32;
/// Room for this many pairs (two sockets, two directions each).
pub const MAX_PAIRS: u32 = 65536;

/// What the verdict program did with one direction's bytes (its byte counters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirState {
    /// Bytes redirected to the peer socket's egress.
    pub redirected: u64,
    /// Bytes left on the source socket (SK_PASS) for userspace to `recv()` and send.
    pub passed: u64,
    /// The last [`DirControl::sleep`] the program answered with a wake-up.
    pub woken: u64,
    /// TCP sequence number of the next byte this direction expects (with
    /// [`NEXT_SEQ_KNOWN`]; 0 until the first skb after pairing). `tcp_read_skb` hands the
    /// program whole skbs, including the head of a retransmitted segment that overlaps
    /// bytes already handed over; the program trims that head off by this number.
    pub next_seq: u64,
    /// Bytes trimmed that way (each was handed to the program twice).
    pub trimmed: u64,
    /// Overlapping bytes left in: a trim the kernel refused partway, or an skb older
    /// than `next_seq` from end to end (which TCP should never queue). Diagnostics for
    /// the duplication check's error line.
    pub untrimmed: u64,
    /// Skbs whose sequence number read inconsistently: `next_seq` was unknown after
    /// each, so an overlap right behind one could not be trimmed. Diagnostics too.
    pub seq_unknown: u64,
}

/// Userspace's side of the bargain for one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirControl {
    /// Bytes of `passed` that userspace has written to the peer so far.
    pub consumed: u64,
    /// Redirect only while `redirected + len <= limit`; 0 means "not paired yet".
    pub limit: u64,
    /// Raised by userspace when it stops watching an idle pair: while it differs from
    /// [`DirState::woken`], the next skb posts this direction's cookie to WAKES.
    pub sleep: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are #[repr(C)], made of u64s only: no padding, any bit
    // pattern is valid.
    unsafe impl aya::Pod for super::DirState {}
    unsafe impl aya::Pod for super::DirControl {}
    unsafe impl bytemuck::Zeroable for super::DirState {}
    unsafe impl bytemuck::Pod for super::DirState {}
    unsafe impl bytemuck::Zeroable for super::DirControl {}
    unsafe impl bytemuck::Pod for super::DirControl {}
}
