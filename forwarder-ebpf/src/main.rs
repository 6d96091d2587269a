//! The kernel half of the sockmap relay: one sk_skb verdict program.
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
    use aya_ebpf::cty::c_void;
    use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_map_delete_elem};
    use aya_ebpf::macros::{map, stream_verdict};
    use aya_ebpf::maps::{HashMap, RingBuf, SockHash};
    use aya_ebpf::programs::SkBuffContext;
    use aya_ebpf::EbpfContext;
    use aya_log_ebpf::debug;
    use forwarder_common::{DirControl, DirState, MAX_PAIRS, PART_ASKED, PART_DONE, PART_REFUSED};

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
    /// Sockets to take out of MEMBERS (see `forwarder_part`).
    #[map(name = "PARTING")]
    static PARTING: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);
    /// Wake-ups for pairs whose userspace side sleeps (cookies, 8 bytes each).
    #[map(name = "WAKES")]
    static WAKES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

    #[stream_verdict]
    pub fn forwarder_verdict(ctx: SkBuffContext) -> u32 {
        // SAFETY: the helper only reads the skb's socket.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let len = ctx.len() as u64;
        if len == 0 {
            // A FIN alone. TCP has already taken note of it (userspace sees RDHUP); the
            // skb itself carries nothing. Redirected, the kernel would "send" it to
            // the peer, fail with EPIPE and disable the peer's psock for good: every
            // byte later passed on that socket would then be dropped.
            return SK_DROP;
        }
        let Some(state) = STATE.get_ptr_mut(cookie) else {
            debug!(
                &ctx,
                "verdict: no state for cookie {}, passing {} bytes", cookie, len
            );
            return SK_PASS;
        };
        // SAFETY: map values stay valid for the program's run; each key has one writer
        // (this program, serialised by the source socket's lock).
        let state = unsafe { &mut *state };
        // SAFETY: read-only access to a value userspace updates with whole-u64 writes.
        let (consumed, limit) = match unsafe { CONTROL.get(cookie) } {
            Some(c) => (c.consumed, c.limit),
            None => (0, 0),
        };
        if limit != 0 && state.passed == consumed && state.redirected + len <= limit {
            let verdict = SOCKS.redirect_skb(&ctx, cookie, 0) as u32;
            if verdict == SK_PASS {
                state.redirected += len;
                wake_if_asleep(cookie, state);
                return SK_PASS;
            }
            // The peer is gone from the map: keep the bytes here instead of dropping them.
            debug!(
                &ctx,
                "verdict: redirect failed for cookie {}, passing", cookie
            );
        }
        state.passed += len;
        wake_if_asleep(cookie, state);
        SK_PASS
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

    /// Takes the sockets named in PARTING out of MEMBERS, each while the kernel's TCP
    /// iterator holds its socket lock (`bpf_iter_tcp_seq_show` takes it around this
    /// call). Userspace runs the iterator by reading it.
    ///
    /// Why the lock: leaving MEMBERS takes the verdict program off the socket. If TCP is
    /// handing the socket an skb on another CPU at that moment (`tcp_read_skb` has
    /// unlinked it, `sk_psock_verdict_recv` then finds no program), the skb is counted
    /// read and dropped: bytes lost (seen in CI as 62 KB missing after a pair left the
    /// maps mid-upload). TCP hands skbs over only under the same lock, or defers them
    /// to its owner's backlog, so under it no skb is between the queue and a program.
    ///
    /// Bytes the program passed must be read while it runs (only that recvmsg advances
    /// TCP's `copied_seq` for them), so a socket whose passed bytes are not all consumed
    /// is refused; checked under the same lock, no verdict can pass more before it parts.
    #[unsafe(link_section = "iter/tcp")]
    #[unsafe(no_mangle)]
    pub fn forwarder_part(ctx: *mut u64) -> i32 {
        // The context is `struct bpf_iter__tcp { meta; sk_common; uid }`, one u64 each.
        // SAFETY: the verifier checks this read against the iterator's context type.
        let sk = unsafe { *ctx.add(1) } as *mut c_void;
        if sk.is_null() {
            return 0;
        }
        // SAFETY: sk is a live sock_common (non-null checked), as the helper expects.
        let cookie = unsafe { bpf_get_socket_cookie(sk) };
        if let Some(asked) = PARTING.get_ptr_mut(cookie) {
            // SAFETY: a map value, valid for the program's run.
            let asked = unsafe { &mut *asked };
            if *asked == PART_ASKED {
                let passed = STATE.get_ptr(cookie).map_or(0, |st| {
                    // SAFETY: a map value, valid for the program's run.
                    unsafe { (*st).passed }
                });
                // SAFETY: read-only access to a value userspace writes whole.
                let consumed = unsafe { CONTROL.get(cookie) }.map_or(0, |c| c.consumed);
                if passed != consumed {
                    *asked = PART_REFUSED;
                    return 0;
                }
                // SAFETY: MEMBERS is a map definition (SockHash is transparent over it)
                // and the key a u64 on our stack, as the helper expects.
                unsafe {
                    bpf_map_delete_elem(
                        &MEMBERS as *const SockHash<u64> as *mut c_void,
                        &cookie as *const u64 as *const c_void,
                    )
                };
                *asked = PART_DONE;
            }
        }
        0
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
