#!/usr/bin/env python3
"""A TCP client on a raw socket that sends a retransmission overlapping bytes the
server already received, as a lossy link makes a sender do.

    overlap_client.py HOST PORT SRC_PORT

Connects from HOST:SRC_PORT to HOST:PORT (IPv4, no TCP options), then sends one
payload of TOTAL bytes as three segments:
  A = [0, A_END)           wait until it is acknowledged
  B = [B_START, B_END)     its head, A_END - B_START bytes, was already received
  C = [B_END, TOTAL)       wait until it is acknowledged
  C again + FIN            only the FIN is new
and prints "sent TOTAL bytes, overlap N, sha256 HEX" for the payload the server must
deliver once. The caller must keep the kernel from resetting the connection (it knows
no socket for SRC_PORT): drop outgoing RSTs from SRC_PORT.
"""
import hashlib
import socket
import struct
import sys
import time

TOTAL = 40000
A_END = 16000
B_START = 6000  # 10,000 bytes of overlap: three of the verdict's 4095-byte trim steps
B_END = 30000
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TIMEOUT = 5.0


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def segment(host, sport, dport, seq, ack, flags, payload=b""):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    addr = socket.inet_aton(host)
    pseudo = addr + addr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr) + len(payload))
    csum = checksum(pseudo + hdr + payload)
    return hdr[:16] + struct.pack("!H", csum) + hdr[18:] + payload


def main():
    host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    payload = bytes((i * 131 + i // 251) & 0xFF for i in range(TOTAL))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.settimeout(0.2)

    def send(seq, ack, flags, data=b""):
        s.sendto(segment(host, sport, port, seq, ack, flags, data), (host, 0))

    def wait(pred, what):
        """The first segment from the server that satisfies pred(seq, ack, flags)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                pkt = s.recv(65535)
            except socket.timeout:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            src, dst = struct.unpack("!HH", pkt[ihl:ihl + 4])
            if src != port or dst != sport:
                continue
            seq, ack, _, flags = struct.unpack("!IIBB", pkt[ihl + 4:ihl + 14])
            if flags & RST:
                sys.exit(f"the server reset the connection while waiting for {what}")
            if pred(seq, ack, flags):
                return seq, ack, flags
        sys.exit(f"no {what} within {TIMEOUT} s")

    isn = 1_000_000
    send(isn, 0, SYN)
    srv, _, _ = wait(lambda q, a, f: f & SYN and f & ACK and a == isn + 1, "SYN-ACK")
    base, rcv = isn + 1, srv + 1
    send(base, rcv, ACK)
    # Let the forwarder connect upstream and pair the sockets: A then reaches the
    # relay that is meant to run.
    time.sleep(0.5)
    send(base, rcv, PSH | ACK, payload[:A_END])
    wait(lambda q, a, f: f & ACK and a == base + A_END, "ACK of segment A")
    time.sleep(0.1)
    send(base + B_START, rcv, PSH | ACK, payload[B_START:B_END])
    wait(lambda q, a, f: f & ACK and a == base + B_END, "ACK of segment B")
    send(base + B_END, rcv, PSH | ACK, payload[B_END:])
    wait(lambda q, a, f: f & ACK and a == base + TOTAL, "ACK of segment C")
    time.sleep(0.1)
    send(base + B_END, rcv, PSH | ACK | FIN, payload[B_END:])
    wait(lambda q, a, f: f & ACK and a == base + TOTAL + 1, "ACK of the FIN")
    sha = hashlib.sha256(payload).hexdigest()
    overlap = (A_END - B_START) + (TOTAL - B_END)
    print(f"sent {TOTAL} bytes, overlap {overlap}, sha256 {sha}")


if __name__ == "__main__":
    main()
