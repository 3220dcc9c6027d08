# Passive queue.declare round trips over a raw socket (no client library):
# the broker's own floor for `perf --rpc N`. python3 bench-compare/raw_rpc.py
import socket, struct, time
def frame(t, ch, payload): return struct.pack(">BHI", t, ch, len(payload)) + payload + b"\xce"
def sstr(s): b = s.encode(); return bytes([len(b)]) + b
def lstr(b): return struct.pack(">I", len(b)) + b
s = socket.create_connection(("127.0.0.1", 5672)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = b""
def read_frame():
    global buf
    while True:
        if len(buf) >= 7:
            t, ch, n = struct.unpack(">BHI", buf[:7])
            if len(buf) >= n + 8:
                p = buf[7:7+n]; buf = buf[n+8:]; return t, ch, p
        buf += s.recv(65536)
s.sendall(b"AMQP\x00\x00\x09\x01"); read_frame()  # start
s.sendall(frame(1, 0, struct.pack(">HH", 10, 11) + struct.pack(">I", 0) + sstr("PLAIN") + lstr(b"\x00guest\x00guest") + sstr("en_US")))
t, ch, p = read_frame()  # tune
cmax, fmax, hb = struct.unpack(">HIH", p[4:12])
s.sendall(frame(1, 0, struct.pack(">HH", 10, 31) + struct.pack(">HIH", cmax, fmax, 0)))
s.sendall(frame(1, 0, struct.pack(">HH", 10, 40) + sstr("/") + sstr("") + b"\x00")); read_frame()
s.sendall(frame(1, 1, struct.pack(">HH", 20, 10) + sstr(""))); read_frame()
q = "amqp-client.rawrpc"
s.sendall(frame(1, 1, struct.pack(">HH", 50, 10) + b"\x00\x00" + sstr(q) + b"\x00" + lstr(b""))); read_frame()
passive = frame(1, 1, struct.pack(">HH", 50, 10) + b"\x00\x00" + sstr(q) + b"\x01" + lstr(b""))
for _ in range(1000): s.sendall(passive); read_frame()
times = []
for _ in range(20000):
    t0 = time.perf_counter_ns(); s.sendall(passive); read_frame(); times.append(time.perf_counter_ns() - t0)
times.sort()
print("raw socket: p50 %.1f µs, p90 %.1f µs, p99 %.1f µs" % (times[10000]/1e3, times[18000]/1e3, times[19800]/1e3))
s.sendall(frame(1, 1, struct.pack(">HH", 50, 40) + b"\x00\x00" + sstr(q) + b"\x00")); read_frame()
