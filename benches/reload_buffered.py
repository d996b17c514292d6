#!/usr/bin/env python3
# attack15: README "Reload and upgrade" promises that "the old process is gone within a
# second whatever its connections do". This opens N echo connections that write and
# never read (each leaves the default --max-pending-bytes, 256 KiB, in the server's
# outbound buffer: "whatever its connections do"), sends SIGHUP, and measures how long
# the old process lives. Exits 1 past 1 s.
#
#   cargo build --release --bins
#   python3 benches/reload_buffered.py 4500 2000000
#
# Needs `ulimit -n` of at least N + 100 (the clients' sockets) and ~2 GB of memory.
import os, socket, subprocess, sys, time, re, signal, threading
N = int(sys.argv[1]) if len(sys.argv) > 1 else 4500
HOARD = int(sys.argv[2]) if len(sys.argv) > 2 else 2000000
MODE = sys.argv[3] if len(sys.argv) > 3 else "echo"
exe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../target/release/edgepoll")
args = [exe, MODE, "--listen", "127.0.0.1:0", "--workers", "2", "--metrics-listen", "off"]
if MODE == "relay":
    args += ["--upstream", sys.argv[4]] + sys.argv[5:]
p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
lines = []
def reader():
    for l in p.stderr:
        lines.append((time.monotonic(), l.rstrip()))
threading.Thread(target=reader, daemon=True).start()
while not any(" listening on " in l for _, l in lines): time.sleep(0.01)
addr = re.search(r"listening on ([0-9.]+):(\d+)", [l for _, l in lines if " listening on " in l][0])
host, port = addr.group(1), int(addr.group(2))
conns = []
payload = os.urandom(65536)
for i in range(N):
    s = socket.create_connection((host, port))
    if HOARD:
        s.setblocking(False)
        sent = 0
        while sent < HOARD:
            try:
                sent += s.send(payload[: min(65536, HOARD - sent)])
            except BlockingIOError:
                time.sleep(0.001)
                if sent >= HOARD: break
                # give up when stalled
                t0 = time.monotonic()
                stalled = True
                while time.monotonic() - t0 < 0.05:
                    try:
                        sent += s.send(payload[: min(65536, HOARD - sent)]); stalled = False; break
                    except BlockingIOError:
                        time.sleep(0.005)
                if stalled: break
    conns.append(s)
time.sleep(1)
old = p.pid
t0 = time.monotonic()
os.kill(old, signal.SIGHUP)
p.wait()
t1 = time.monotonic()
time.sleep(0.5)
for t, l in lines:
    if "handed over" in l or "reloaded" in l or "reload failed" in l or "ERROR" in l or "WARN" in l:
        print(round(t - t0, 3), l[-160:])
print(f"N={N} hoard={HOARD}: old process lived {t1 - t0:.3f} s after SIGHUP")
newpid = None
for _, l in lines:
    m = re.search(r"pid (\d+) is serving", l)
    if m: newpid = int(m.group(1))
if newpid: os.kill(newpid, signal.SIGKILL)
sys.exit(0 if t1 - t0 <= 1.0 else 1)
