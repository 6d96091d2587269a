//! Types shared by the kernel programs (`forwarder-ebpf`) and userspace (`forwarder`).
#![no_std]
