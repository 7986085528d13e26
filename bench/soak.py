#!/usr/bin/python3
"""Soak benchmark for mcpbox serve (run by bench/soak.sh; Python standard library only).

Phases, against one running `mcpbox serve` (its pid and port given):
  A. SESSIONS sessions opened and closed in a row (half Streamable HTTP: initialize, a tool
     call, DELETE; half legacy SSE: GET stream, initialize, a tool call, stream closed) on a
     session-isolated server: a sandbox each.
  B. STREAMS idle legacy SSE streams (a shared server) and HALF_OPEN half-sent requests (a
     request head cut short) held open, from several loopback addresses, while a normal
     client makes CALLS tool calls; then the streams are closed.
  C. The half-sent connections are left alone: how many mcpbox closes by itself within
     ABANDON_WAIT seconds of their opening.
  B and C run ROUNDS times.
  D. FLOOD idle connections from one address (the issue's 1100), then a normal client with a
     10 s timeout: does it get through?
  End: mcpbox's descriptors, threads, RSS and sandbox processes, against the baseline taken
  before phase A.
Prints one JSON object (all the numbers) on stdout; progress on stderr.
"""
import http.client
import json
import os
import re
import socket
import sys
import time

PID = int(os.environ["MCPBOX_PID"])
PORT = int(os.environ["MCPBOX_PORT"])
TOKEN = os.environ.get("MCPBOX_TOKEN", "soak-token")
SESSIONS = int(os.environ.get("SESSIONS", "2000"))
STREAMS = int(os.environ.get("STREAMS", "200"))
HALF_OPEN = int(os.environ.get("HALF_OPEN", "500"))
CALLS = int(os.environ.get("CALLS", "300"))
ABANDON_WAIT = float(os.environ.get("ABANDON_WAIT", "15"))
# B and C are run this many times: RSS that stays flat from one round to the next is the
# allocator keeping its high-water mark, not a leak.
ROUNDS = int(os.environ.get("ROUNDS", "2"))
FLOOD = int(os.environ.get("FLOOD", "1100"))
SETTLE = float(os.environ.get("SETTLE", "15"))
HOST = f"127.0.0.1:{PORT}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Connections from one source address stay under mcpbox's default per-address cap (64).
PER_ADDRESS = 40


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
                if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        c = children(todo.pop())
        found += c
        todo += c
    return found


def fd_targets():
    out = {}
    for fd in os.listdir(f"/proc/{PID}/fd"):
        try:
            t = os.readlink(f"/proc/{PID}/fd/{fd}")
        except OSError:
            continue
        t = re.sub(r"\[\d+\]", "[N]", t)
        out[t] = out.get(t, 0) + 1
    return out


def snapshot():
    with open(f"/proc/{PID}/status") as f:
        status = dict(l.split(":", 1) for l in f if ":" in l)
    return {
        "fds": len(os.listdir(f"/proc/{PID}/fd")),
        "threads": int(status["Threads"]),
        "rss_kib": int(status["VmRSS"].split()[0]),
        # each direct child of mcpbox is one sandbox (its sandbox-init); below it, the server
        "sandboxes": len(children(PID)),
        "processes": len(descendants(PID)),
    }


def msg(mid, method, params=None):
    m = {"jsonrpc": "2.0", "method": method}
    if mid is not None:
        m["id"] = mid
    if params is not None:
        m["params"] = params
    return json.dumps(m)


INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "soak", "version": "0"}}


def call(mid, text):
    return msg(mid, "tools/call", {"name": "echo", "arguments": {"text": text}})


def connect_from(i):
    s = socket.socket()
    s.bind((f"127.0.0.{10 + i // PER_ADDRESS}", 0))
    s.connect(("127.0.0.1", PORT))
    return s


class Streamable:
    def __init__(self, server, timeout=30):
        self.path = f"/{server}/mcp"
        self.c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
        self.h = dict(AUTH, **{"Content-Type": "application/json", "Accept": "application/json"})
        r = self.post(msg(0, "initialize", INIT))
        assert r[0] == 200, r
        self.h["Mcp-Session-Id"] = r[2]
        self.h["MCP-Protocol-Version"] = "2025-06-18"
        assert self.post(msg(None, "notifications/initialized"))[0] == 202

    def post(self, body):
        self.c.request("POST", self.path, body, self.h)
        r = self.c.getresponse()
        return r.status, r.read(), r.getheader("mcp-session-id")

    def call(self, mid, text):
        st, body, _ = self.post(call(mid, text))
        assert st == 200 and json.loads(body)["result"]["content"][0]["text"] == text, (st, body)

    def close(self):
        self.c.request("DELETE", self.path, None, self.h)
        r = self.c.getresponse()
        r.read()
        assert r.status in (200, 204), r.status
        self.c.close()


class Legacy:
    """GET /NAME/sse on a raw socket; POSTs on a keep-alive connection."""

    def __init__(self, server, i=0):
        self.s = connect_from(i)
        self.s.settimeout(30)
        self.s.sendall(f"GET /{server}/sse HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {TOKEN}\r\n"
                       "Accept: text/event-stream\r\n\r\n".encode())
        self.buf = b""
        m = self.wait(rb"event: endpoint\r?\ndata: (\S+)")
        self.post_path = m.group(1).decode()
        self.c = None

    def wait(self, pattern):
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            d = self.s.recv(65536)
            if not d:
                raise RuntimeError(f"stream ended waiting for {pattern!r}: {self.buf[-200:]!r}")
            self.buf += d

    def post(self, body):
        if self.c is None:
            self.c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        self.c.request("POST", self.post_path, body, dict(AUTH, **{"Content-Type": "application/json"}))
        r = self.c.getresponse()
        r.read()
        assert r.status == 202, r.status

    def session(self, text):
        self.post(msg(0, "initialize", INIT))
        self.wait(rb'"id":0')
        self.post(msg(None, "notifications/initialized"))
        self.post(call(1, text))
        self.wait(re.escape(json.dumps(text)).encode())

    def close(self):
        if self.c:
            self.c.close()
        self.s.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def settle():
    """Wait until the sandboxes are back to the baseline count (or SETTLE seconds)."""
    t = time.time()
    while time.time() - t < SETTLE:
        if len(children(PID)) <= base["sandboxes"]:
            break
        time.sleep(0.2)
    time.sleep(1)


out = {}
time.sleep(2)
base = snapshot()
base_fds = fd_targets()
out["baseline"] = base
log("baseline", base)

# ---- A: sessions opened and closed in a row ----
t0 = time.time()
lat = []
for i in range(SESSIONS):
    t = time.time()
    if i % 2 == 0:
        s = Streamable("echo")
        s.call(1, f"s{i}")
        s.close()
    else:
        s = Legacy("echo")
        s.session(f"l{i}")
        s.close()
    lat.append(time.time() - t)
    if (i + 1) % 250 == 0:
        log(f"A: {i + 1} sessions, {time.time() - t0:.1f} s")
out["A"] = {"sessions": SESSIONS, "seconds": round(time.time() - t0, 1),
            "session_ms_p50": round(pct(lat, 0.5) * 1e3, 1), "session_ms_p99": round(pct(lat, 0.99) * 1e3, 1)}
settle()
out["after_A"] = snapshot()
log("after A", out["after_A"])

# ---- B: idle streams and half-sent requests held while a client works ----
def round_b_c(r):
    streams = [Legacy("echos", i) for i in range(STREAMS)]
    half = []
    t_half = time.time()
    for i in range(HALF_OPEN):
        s = connect_from(STREAMS + i)
        s.sendall(f"POST /echo/mcp HTTP/1.1\r\nHost: {HOST}\r\n".encode())
        half.append(s)
    time.sleep(0.5)
    held = snapshot()
    log(f"round {r}: held", held)
    t = time.time()
    client = Streamable("echo")
    init_ms = (time.time() - t) * 1e3
    lat = []
    for i in range(CALLS):
        t = time.time()
        client.call(i + 1, f"c{i}")
        lat.append(time.time() - t)
    client.close()
    b = {"streams": STREAMS, "half_open": HALF_OPEN, "client_init_ms": round(init_ms, 1), "calls": CALLS,
         "call_ms_p50": round(pct(lat, 0.5) * 1e3, 2), "call_ms_p99": round(pct(lat, 0.99) * 1e3, 2)}
    peak = snapshot()
    for s in streams:
        s.close()
    # ---- C: abandoned half-sent requests: does mcpbox close them? ----
    closed = 0
    for s in half:
        s.settimeout(max(0.01, ABANDON_WAIT - (time.time() - t_half)))
        try:
            if s.recv(4096) == b"":
                closed += 1
        except socket.timeout:
            pass
        except OSError:
            closed += 1
    c = {"half_open": HALF_OPEN, "closed_by_mcpbox_within_s": ABANDON_WAIT, "closed": closed}
    log(f"round {r}: C", c)
    for s in half:
        s.close()
    settle()
    return b, peak, c, snapshot()


for r in range(ROUNDS):
    b, peak, c, after = round_b_c(r)
    out["B"], out["peak"], out["C"] = b, peak, c
    out[f"after_round_{r + 1}"] = after
    log(f"round {r}: after", after)

# ---- D: one address opens FLOOD idle connections; a normal client comes after ----
flood = []
for i in range(FLOOD):
    s = socket.socket()
    s.bind(("127.0.0.250", 0))
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", PORT))
    except OSError:
        pass
    flood.append(s)
# until mcpbox has taken all it will take (its descriptor count stops changing)
last, since, t0 = -1, time.time(), time.time()
while time.time() - since < 1.5 and time.time() - t0 < 20:
    n = len(os.listdir(f"/proc/{PID}/fd"))
    if n != last:
        last, since = n, time.time()
    time.sleep(0.1)
held = snapshot()
t = time.time()
try:
    client = Streamable("echo", timeout=10)
    client.call(1, "through")
    client.close()
    d_ok, d_err = True, None
except Exception as e:  # noqa: BLE001 - the outcome is the measurement
    d_ok, d_err = False, repr(e)
out["D"] = {"flood": FLOOD, "fds_held": held["fds"], "client_ok": d_ok, "client_ms": round((time.time() - t) * 1e3, 1), "error": d_err}
log("D", out["D"])
for s in flood:
    s.close()

settle()
# idle tokio blocking threads retire after 10 s
time.sleep(max(0, 11 - SETTLE))
out["end"] = snapshot()
end_fds = fd_targets()
out["fds_added"] = {k: end_fds.get(k, 0) - base_fds.get(k, 0) for k in set(base_fds) | set(end_fds)
                    if end_fds.get(k, 0) != base_fds.get(k, 0)}
log("end", out["end"])
print(json.dumps(out))
