#!/usr/bin/env python3
"""Session starts under bursts, and memory per idle session (driven by bench/burst.sh).

For one mcpbox binary: prepare `time` (uvx mcp-server-time) and `everything` (npx
server-everything) from examples/mcpbox.json, time one cold start of each through `mcpbox run`,
then `mcpbox serve` them and, per server: 60 s idle, a burst of N concurrent new sessions
(Streamable HTTP initialize until its answer), the sessions left idle for IDLE_S s, PSS summed
over each session sandbox's processes, the sessions closed; 60 s idle, a second burst, PSS again.
With SUPERGATEWAY_JS (supergateway's dist/index.js), then the same for the same prepared entry
points run unsandboxed behind `supergateway --stateful`, one supergateway per server.
Prints one JSON object on stdout; progress on stderr.
"""
import http.client, json, os, re, shlex, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

MCPBOX = sys.argv[1]
LABEL = sys.argv[2]
N = int(os.environ.get("BURST", "10"))
GAP = float(os.environ.get("GAP_S", "60"))
IDLE = float(os.environ.get("IDLE_S", "30"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "burst", "version": "1"}}}


def log(*a):
    print(f"[{LABEL} {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def config(port, names, extra):
    ex = json.load(open(os.path.join(REPO, "examples/mcpbox.json")))
    servers = {n: ex["mcpServers"][n] for n in names}
    for n in names:
        # POLICY_<name>=/abs/file.toml: another policy for that server (e.g. other node_flags).
        if os.environ.get(f"POLICY_{n}"):
            servers[n] = dict(servers[n], policy=os.environ[f"POLICY_{n}"])
    return {"mcpProxy": {"addr": f"127.0.0.1:{port}", "name": "burst", "type": "streamable-http",
                         "options": {"authTokens": [TOKEN]}},
            "mcpbox": extra, "mcpServers": servers}


def cold_start(state, name, srv):
    """One `mcpbox run` of the prepared server: time until its initialize answer."""
    cmd = [MCPBOX, "run", "--policy", srv["policy"], "--state-dir", state, "--name", name, "--", srv["command"], *srv["args"]]
    t = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdin.write((json.dumps(INIT) + "\n").encode())
    p.stdin.flush()
    line = p.stdout.readline()
    dt = time.monotonic() - t
    p.kill()
    p.wait()
    if b'"result"' not in line:
        raise SystemExit(f"cold start of {name}: no initialize answer: {line[:200]!r}")
    return dt


def open_session(port, name, path=None):
    path = path or f"/{name}/mcp"
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t = time.monotonic()
    c.request("POST", path, json.dumps(INIT), {
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream"})
    r = c.getresponse()
    body = r.read()
    dt = time.monotonic() - t
    sid = r.getheader("Mcp-Session-Id")
    c.close()
    if r.status != 200 or not sid or b'"result"' not in body:
        raise SystemExit(f"session on {name}: {r.status} {body[:200]!r}")
    # The initialized notification, as a client sends it.
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", path, json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), {
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "Mcp-Session-Id": sid})
    c.getresponse().read()
    c.close()
    return dt, sid


def close_session(port, name, sid, path=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("DELETE", path or f"/{name}/mcp", headers={"Authorization": f"Bearer {TOKEN}", "Mcp-Session-Id": sid})
    c.getresponse().read()
    c.close()


def burst(port, name, path=None):
    out = [None] * N
    def one(i):
        out[i] = open_session(port, name, path)
    ts = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if any(o is None for o in out):
        raise SystemExit(f"burst on {name}: a session failed")
    return [o[0] for o in out], [o[1] for o in out]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def pss_kb(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sandboxes(name):
    """pid lists of the sandboxes of server `name`, by cgroup slot (`name.K`), with the cpu
    cgroup's path (for the weight) where there is one."""
    groups = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cg = open(f"/proc/{d}/cgroup").read()
        except OSError:
            continue
        slot, cpu = None, None
        for line in cg.splitlines():
            _, ctrls, path = line.split(":", 2)
            m = re.search(rf"/mcpbox/{re.escape(name)}\.\d+$", path)
            if m:
                slot = m.group(0)
                if ctrls == "" or "cpu" in ctrls.split(","):
                    cpu = (ctrls, path)
        if slot:
            g = groups.setdefault(slot, {"pids": [], "cpu": None})
            g["pids"].append(int(d))
            g["cpu"] = g["cpu"] or cpu
    return groups


def weight(cpu):
    if not cpu:
        return None
    ctrls, path = cpu
    files = [(f"/sys/fs/cgroup{path}/cpu.weight", 1)] if ctrls == "" else \
        [(f"/sys/fs/cgroup/{m}{path}/cpu.shares", 100 / 1024) for m in ("cpu,cpuacct", "cpu")]
    for f, scale in files:
        try:
            return round(int(open(f).read()) * scale)
        except OSError:
            continue
    return None


def is_sandbox_init(pid):
    try:
        return b"sandbox-init" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False


def idle_pss(name):
    """PSS (MB) of each sandbox at the live weight (sessions; a warm process waits at a lower one
    where mcpbox sets it), of the warm ones, and of each session's sandbox-init processes."""
    sess, warm, init = [], [], []
    for g in sandboxes(name).values():
        mb = sum(pss_kb(p) for p in g["pids"]) / 1024
        live = (weight(g["cpu"]) or 100) >= 100
        (sess if live else warm).append(mb)
        if live:
            init.append(sum(pss_kb(p) for p in g["pids"] if is_sandbox_init(p)) / 1024)
    return sess, warm, init


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in open(f"/proc/{pid}/task/{tid}/children").read().split()]
    except OSError:
        pass
    return out


def tree(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def wait_http(port, path, ok=(200,)):
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status in ok:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"nothing answers on port {port}")


def supergateway(state, names, res):
    """The same prepared servers, unsandboxed, behind supergateway --stateful (one child process
    per session, started when the session's initialize arrives: it has no warm process). Each
    server gets its own supergateway; PSS per idle session is summed over each session's process
    tree (supergateway spawns the command through a shell)."""
    js = os.environ["SUPERGATEWAY_JS"]
    for n in names:
        rec = json.load(open(os.path.join(state, n, "cache", "prepared.json")))
        srv = json.load(open(os.path.join(REPO, "examples/mcpbox.json")))["mcpServers"][n]
        # The server's own arguments: what follows the package (`npx -y PKG ARGS…`, `uvx CMD ARGS…`).
        first = next(i for i, a in enumerate(srv["args"]) if not a.startswith("-"))
        args = srv["args"][first + 1:]
        cmd = " ".join(shlex.quote(a) for a in [rec["interpreter"], rec["entry"], *args])
        port = free_port()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.path.join(state, n, "sg-home")}
        os.makedirs(env["HOME"], exist_ok=True)
        logf = open(os.path.join(os.path.dirname(state), f"supergateway-{n}.log"), "w")
        gw = subprocess.Popen(["node", js, "--stdio", cmd, "--outputTransport", "streamableHttp", "--stateful",
                               "--port", str(port), "--healthEndpoint", "/healthz", "--logLevel", "none"],
                              stdout=logf, stderr=logf, env=env)
        r = res["servers"][n]["supergateway"] = {"command": cmd}
        try:
            wait_http(port, "/healthz")
            for k in (1, 2):
                log(f"supergateway {n}: idle {GAP:.0f} s before burst {k}")
                time.sleep(GAP)
                lat, sids = burst(port, n, "/mcp")
                r[f"burst{k}"] = {"p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99), "all_s": sorted(lat)}
                log(f"supergateway {n}: burst {k}: p50 {pct(lat, 0.5) * 1e3:.0f} ms, p99 {pct(lat, 0.99) * 1e3:.0f} ms")
                time.sleep(IDLE)
                sess = [sum(pss_kb(p) for p in tree(c)) / 1024 for c in children(gw.pid)]
                r[f"burst{k}"]["pss_session_mb"] = sorted(sess)
                r[f"burst{k}"]["gateway_pss_mb"] = pss_kb(gw.pid) / 1024
                if sess:
                    med = statistics.median(sess)
                    r[f"burst{k}"]["pss_median_mb"] = med
                    r[f"burst{k}"]["sessions_per_gib"] = 1024 / med
                    log(f"supergateway {n}: PSS per idle session after {IDLE:.0f} s: median {med:.1f} MB over {len(sess)} sessions; supergateway itself {pss_kb(gw.pid) / 1024:.1f} MB")
                for s_ in sids:
                    close_session(port, n, s_, "/mcp")
                time.sleep(1)
        finally:
            gw.terminate()
            gw.wait()
            logf.close()


def main():
    work = tempfile.mkdtemp(prefix=f"mcpbox-burst-{LABEL}.")
    os.chmod(work, 0o755)
    state = os.path.join(work, "state")
    port = free_port()
    names = os.environ.get("SERVERS", "time everything").split()
    # mcpbox.warmPoolBytes only when asked (binaries before it do not know the key).
    extra = {"warmPoolBytes": int(os.environ["WARM_POOL_BYTES"])} if os.environ.get("WARM_POOL_BYTES") else {}
    # MEMORY_MERGE=1: mcpbox.memoryMerge (KSM; the host's ksmd must run to merge anything).
    if os.environ.get("MEMORY_MERGE") == "1":
        extra["memoryMerge"] = True
    cfg = config(port, names, extra)
    cfg_path = os.path.join(work, "mcpbox.json")
    json.dump(cfg, open(cfg_path, "w"))
    t = time.monotonic()
    subprocess.run([MCPBOX, "prepare", "--config", cfg_path, "--state-dir", state], check=True, stderr=open(os.path.join(work, "prepare.log"), "w"))
    log(f"prepared in {time.monotonic() - t:.1f} s")
    res = {"label": LABEL, "burst": N, "servers": {}}
    for n in names:
        cs = [cold_start(state, n, cfg["mcpServers"][n]) for _ in range(3)]
        res["servers"][n] = {"cold_start_s": statistics.median(cs), "cold_starts_s": cs}
        log(f"{n}: one cold start (median of 3) {statistics.median(cs) * 1e3:.0f} ms")
    logf = open(os.path.join(work, "serve.log"), "w")
    env = dict(os.environ, MCPBOX_LOG="info")
    srv = subprocess.Popen([MCPBOX, "serve", "--config", cfg_path, "--state-dir", state], stderr=logf, env=env)
    try:
        for _ in range(300):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        for n in names:
            r = res["servers"][n]
            for k in (1, 2):
                log(f"{n}: idle {GAP:.0f} s before burst {k}")
                time.sleep(GAP)
                lat, sids = burst(port, n)
                r[f"burst{k}"] = {"p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99), "all_s": sorted(lat)}
                log(f"{n}: burst {k}: p50 {pct(lat, 0.5) * 1e3:.0f} ms, p99 {pct(lat, 0.99) * 1e3:.0f} ms")
                time.sleep(IDLE)
                sess, warm, init = idle_pss(n)
                r[f"burst{k}"]["pss_session_mb"] = sorted(sess)
                if init:
                    r[f"burst{k}"]["pss_sandbox_init_median_mb"] = statistics.median(init)
                r[f"burst{k}"]["pss_warm_mb"] = sorted(warm)
                r[f"burst{k}"]["gateway_pss_mb"] = pss_kb(srv.pid) / 1024
                if sess:
                    med = statistics.median(sess)
                    r[f"burst{k}"]["pss_median_mb"] = med
                    r[f"burst{k}"]["sessions_per_gib"] = 1024 / med
                    log(f"{n}: PSS per idle session after {IDLE:.0f} s: median {med:.1f} MB over {len(sess)} sandboxes (+{len(warm)} warm), "
                        f"of it sandbox-init {statistics.median(init):.2f} MB")
                for s in sids:
                    close_session(port, n, s)
    finally:
        srv.terminate()
        srv.wait()
        logf.close()
        log(f"serve log: {work}/serve.log")
    if os.environ.get("SUPERGATEWAY_JS"):
        supergateway(state, names, res)
    res["cold_logged"] = sum(1 for line in open(os.path.join(work, "serve.log")) if "waits for a cold start" in line)
    print(json.dumps(res))
    if os.environ.get("KEEP") != "1":
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
