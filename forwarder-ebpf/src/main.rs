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
    use aya_ebpf::helpers::bpf_get_socket_cookie;
    use aya_ebpf::macros::{map, stream_verdict};
    use aya_ebpf::maps::{HashMap, RingBuf, SockHash};
    use aya_ebpf::programs::SkBuffContext;
    use aya_ebpf::EbpfContext;
    use aya_log_ebpf::debug;
    use forwarder_common::{DirControl, DirState, MAX_PAIRS};

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
