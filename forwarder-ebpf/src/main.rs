//! The kernel half of the sockmap relay: the sk_skb verdict, in two variants that differ
//! only in trimming retransmitted overlaps (`forwarder_verdict`, which needs CAP_PERFMON,
//! and `forwarder_verdict_plain`; userspace attaches one), and `part_locked`, the TCP
//! iterator that takes sockets out of it under their socket lock.
//!
//! For every skb arriving on a socket of a pair it either redirects the bytes to the
//! peer socket's egress (the fast path) or leaves them on the source socket (SK_PASS)
//! for userspace to relay, which keeps order and bounds memory:
//! - redirect only while everything ever passed has been relayed (`passed == consumed`),
//!   so redirected bytes can never overtake passed ones;
//! - redirect only while `redirected + len <= limit`; userspace keeps `limit` at
//!   "bytes the peer socket accepted + inflight_limit", since the kernel applies no
//!   backpressure to redirected data. Passed data stays charged to the source
//!   socket's receive buffer, so its advertised window shrinks: the sender is slowed.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
    use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_map_delete_elem, bpf_probe_read_kernel};
    use aya_ebpf::macros::{map, stream_verdict};
    use aya_ebpf::maps::{HashMap, RingBuf, SockHash};
    use aya_ebpf::programs::SkBuffContext;
    use aya_ebpf::EbpfContext;
    use aya_log_ebpf::{debug, warn};
    use forwarder_common::{
        DirControl, DirState, MAX_PAIRS, NEXT_SEQ_KNOWN, PARTING_ASKED, PARTING_DONE,
    };

    /// Redirect targets: the peer of the socket with this cookie.
    #[map(name = "SOCKS")]
    static SOCKS: SockHash<u64> = SockHash::with_max_entries(2 * MAX_PAIRS, 0);
    /// The sockets that run this program (it is attached to this map, by userspace).
    #[map(name = "MEMBERS")]
    static MEMBERS: SockHash<u64> = SockHash::with_max_entries(2 * MAX_PAIRS, 0);
    #[map(name = "STATE")]
    static STATE: HashMap<u64, DirState> = HashMap::with_max_entries(2 * MAX_PAIRS, 0);
    #[map(name = "CONTROL")]
    static CONTROL: HashMap<u64, DirControl> = HashMap::with_max_entries(2 * MAX_PAIRS, 0);
    /// Sockets userspace wants out of MEMBERS (cookie -> PARTING_ASKED, set to
    /// PARTING_DONE by `part_locked` once it removed them), and under key 0 (no
    /// socket's cookie) how many of them are still to be met.
    #[map(name = "PARTING")]
    static PARTING: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);
    /// Wake-ups for pairs whose userspace side sleeps (cookies, 8 bytes each).
    #[map(name = "WAKES")]
    static WAKES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

    /// The verdict, trimming what TCP hands over twice. Loading it needs CAP_PERFMON
    /// (it reads the skb's TCP sequence number with `bpf_probe_read_kernel`).
    #[stream_verdict]
    pub fn forwarder_verdict(ctx: SkBuffContext) -> u32 {
        verdict(&ctx, true)
    }

    /// The verdict without the trim, for when `forwarder_verdict` cannot load.
    #[stream_verdict]
    pub fn forwarder_verdict_plain(ctx: SkBuffContext) -> u32 {
        verdict(&ctx, false)
    }

    #[inline(always)]
    fn verdict(ctx: &SkBuffContext, trim: bool) -> u32 {
        // SAFETY: the helper only reads the skb's socket.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let mut len = ctx.len() as u64;
        if len == 0 {
            // A FIN alone. TCP has already taken note of it (userspace sees RDHUP); the
            // skb itself carries nothing. Redirected, the kernel would "send" it to
            // the peer, fail with EPIPE and disable the peer's psock for good: every
            // byte later passed on that socket would then be dropped.
            return SK_DROP;
        }
        let Some(state) = STATE.get_ptr_mut(cookie) else {
            debug!(
                ctx,
                "verdict: no state for cookie {}, passing {} bytes", cookie, len
            );
            return SK_PASS;
        };
        // SAFETY: map values stay valid for the program's run; each key has one writer
        // (this program, serialised by the source socket's lock).
        let state = unsafe { &mut *state };
        if trim {
            len = trim_overlap(ctx, state, len);
            if len == 0 {
                // Only a FIN was new (a retransmit that repeats the last bytes with
                // it): as a FIN alone above.
                return SK_DROP;
            }
        }
        // SAFETY: read-only access to a value userspace updates with whole-u64 writes.
        let (consumed, limit) = match unsafe { CONTROL.get(cookie) } {
            Some(c) => (c.consumed, c.limit),
            None => (0, 0),
        };
        if limit != 0 && state.passed == consumed && state.redirected + len <= limit {
            let verdict = SOCKS.redirect_skb(ctx, cookie, 0) as u32;
            if verdict == SK_PASS {
                state.redirected += len;
                wake_if_asleep(cookie, state);
                return SK_PASS;
            }
            // The peer is gone from the map: keep the bytes here instead of dropping them.
            debug!(
                ctx,
                "verdict: redirect failed for cookie {}, passing", cookie
            );
        }
        state.passed += len;
        wake_if_asleep(cookie, state);
        SK_PASS
    }

    /// `offsetof(struct sk_buff, cb)` on 64-bit kernels (unchanged since 4.x; a wrong
    /// value reads numbers that fail the length check in [`skb_seq`], and nothing is
    /// trimmed).
    const SKB_CB: usize = 40;
    /// `bpf_skb_adjust_room` on sk_skb takes at most this many bytes off per call.
    const TRIM_STEP: u32 = 0xfff;
    /// Enough steps for a 128 KiB overlap (a retransmitted segment is at most 64 KiB
    /// on loopback); what is left over stays, and userspace's duplication check catches it.
    const TRIM_STEPS: u32 = 32;

    /// TCP's sequence number for the skb's first byte (`TCP_SKB_CB(skb)->seq`, the
    /// first field of `cb`), when it reads consistently: `end_seq - seq` is the length
    /// (plus one for a FIN).
    fn skb_seq(ctx: &SkBuffContext, len: u64) -> Option<u32> {
        // SAFETY: the context is the kernel's sk_buff; the helper reads 8 bytes of its
        // control block and fails cleanly on a bad address.
        let [seq, end] = unsafe {
            let cb = (ctx.skb.skb as *const u8).add(SKB_CB) as *const [u32; 2];
            bpf_probe_read_kernel(cb).ok()?
        };
        let span = end.wrapping_sub(seq) as u64;
        (span == len || span == len + 1).then_some(seq)
    }

    /// `tcp_read_skb` hands over whole skbs from the receive queue, and TCP queues a
    /// retransmitted segment that starts before `rcv_nxt` (partly new) whole: TCP's own
    /// readers skip the old head by `copied_seq`, this path would send it twice (seen
    /// under receive-memory pressure, and in CI on loopback). So this direction keeps
    /// the sequence number it expects next, and the skb's head up to it is cut off
    /// before the verdict; `tcp_eat_skb` then advances `copied_seq` by what is left,
    /// which keeps TCP's own count right too. Returns the skb's length after the trim.
    fn trim_overlap(ctx: &SkBuffContext, state: &mut DirState, len: u64) -> u64 {
        let Some(seq) = skb_seq(ctx, len) else {
            state.next_seq = 0;
            state.seq_unknown += 1;
            return len;
        };
        let mut start = seq;
        if state.next_seq & NEXT_SEQ_KNOWN != 0 {
            let overlap = (state.next_seq as u32).wrapping_sub(seq);
            // What stays in, and why (the helper's error; 0: the skb is older than
            // `next_seq` end to end, which TCP should never queue).
            let mut left_in = None;
            // At most the whole skb: TCP queues a segment only if something in it is new
            // (the FIN, when every byte is old).
            if (overlap as i32) > 0 && (overlap as u64) <= len {
                let mut left = overlap;
                for _ in 0..TRIM_STEPS {
                    if left == 0 {
                        break;
                    }
                    let step = if left < TRIM_STEP { left } else { TRIM_STEP };
                    if let Err(e) = ctx.adjust_room(-(step as i32), 0, 0) {
                        left_in = Some((left, e));
                        break;
                    }
                    left -= step;
                }
                let cut = overlap - left;
                state.trimmed += cut as u64;
                state.untrimmed += left as u64;
                start = seq.wrapping_add(cut);
            } else if (overlap as i32) > 0 {
                state.untrimmed += len;
                left_in = Some((len as u32, 0));
            }
            if let Some((left, error)) = left_in {
                // Rare, and what the duplication check needs explained. (One call
                // site: each costs the program 3-6 KiB of instructions.)
                warn!(
                    ctx,
                    "overlap left in: {} of {} bytes (adjust_room error {}; 0: skb older than expected), skb seq {} len {}",
                    left,
                    overlap,
                    error,
                    seq,
                    len
                );
            }
        }
        let len = ctx.len() as u64;
        state.next_seq = NEXT_SEQ_KNOWN | start.wrapping_add(len as u32) as u64;
        len
    }

    /// Redirected bytes wake nobody in userspace: when it sleeps (CONTROL.sleep moved
    /// on since our last wake-up), tell it bytes moved. Read after the counters were
    /// updated, so userspace, which raises `sleep` and then reads the counters, sees
    /// either the bytes or the wake-up.
    fn wake_if_asleep(cookie: u64, state: &mut DirState) {
        // SAFETY: read-only access to a value userspace updates with whole-u64 writes.
        let sleep = match unsafe { CONTROL.get(cookie) } {
            Some(c) => c.sleep,
            None => return,
        };
        if sleep != state.woken {
            state.woken = sleep;
            let _ = WAKES.output::<u64>(&cookie, 0);
        }
    }

    /// A TCP iterator (`iter/tcp`): runs once per TCP socket of the network namespace,
    /// with that socket locked (`lock_sock`), and takes the sockets listed in PARTING
    /// out of MEMBERS. Parting under the socket's lock is what makes it safe: a
    /// verdict runs under the same lock (softirq, or the lock's owner), so none can be
    /// running while the program comes off, and TCP hands the packets that arrive
    /// meanwhile to the restored plain `sk_data_ready` when the lock is released.
    /// Removed by userspace without the lock, a verdict that started on another CPU
    /// finds no program and drops the skb after TCP counted it read (seen: the last 3
    /// bytes and FIN of a transfer, lost while the pair left the maps).
    ///
    /// The context is `struct bpf_iter__tcp { meta; sk_common; uid }`: the socket is
    /// its second pointer, NULL on the iterator's last call.
    #[unsafe(link_section = "iter/tcp")]
    #[unsafe(no_mangle)]
    pub fn part_locked(ctx: *mut *mut core::ffi::c_void) -> i32 {
        // SAFETY: the verifier types this load from the iterator's context.
        let sk = unsafe { *ctx.add(1) };
        if sk.is_null() {
            return 0;
        }
        // SAFETY: sk is a socket the iterator holds (tracing flavour of the helper).
        let cookie = unsafe { bpf_get_socket_cookie(sk) };
        let Some(asked) = PARTING.get_ptr_mut(&cookie) else {
            return 0;
        };
        // SAFETY: MEMBERS is a map definition (the helper takes the map's address);
        // the key is a live u64.
        unsafe {
            if *asked != PARTING_ASKED {
                // Met already (a TIME_WAIT twin shares the cookie).
                return 0;
            }
            bpf_map_delete_elem(
                core::ptr::addr_of!(MEMBERS) as *mut core::ffi::c_void,
                &cookie as *const u64 as *const core::ffi::c_void,
            );
            *asked = PARTING_DONE;
        }
        // The last one listed: stop the walk here (1 ends the read with EAGAIN).
        match PARTING.get_ptr_mut(&0) {
            // SAFETY: a map value, valid for the program's run; one walk at a time.
            Some(left) => unsafe {
                *left = (*left).saturating_sub(1);
                i32::from(*left == 0)
            },
            None => 0,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
