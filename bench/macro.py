#!/usr/bin/env python3
"""Side-by-side macro benchmarks of tollgate against nginx, haproxy and the bare Pingora proxy.

Same method as ../shared/bench/proxybench.py: one upstream (nginx, 1 worker; two listening
ports so round robin has two backends), every proxy held to one worker thread, contestants
loaded in alternating rounds (A B C D A B C D ...), figures are medians and ratios come from one
run. CPU is user+sys of the contestant's whole process tree over the run (its access-log and
background threads included). Loopback only; every phase is bounded in count and time.

Contestants: nginx, haproxy (no access log, as configured by most benchmarks), nginx-log (the
same nginx writing a JSON access log of the same fields as tollgate's, in 10 ms batches: small
and cache only), bare-pingora, bare-mimalloc, tollgate (bench/realistic.yaml: access log on),
tollgate-nolog (the same without its access log: small and cache only).

Scenarios (docs/performance.md):
  small     1 KiB GET, keep-alive (wrk): req/s, p50/p99, CPU us/request
  big       100 KiB responses and 1 MiB uploads (wrk): MiB/s and CPU us/MiB
  cache     cache hits: tollgate's cache vs nginx proxy_cache: CPU us/request
  conns     idle keep-alive connections and WebSockets (10,000 each): RSS
  stream    a 1 GiB upload and a 1 GiB download through the proxy: RSS growth
  rate      fixed-rate load at 50% of nginx's max small-GET rate (h2load --rps): p95/p99
  capacity  the seed targets: the realistic route on every core at its maximum rate (wrk), then
            at a fixed rate through it and straight to the upstream: the p95 latency it adds

  python3 bench/macro.py [--smoke] [--only small,cache] [--rounds 3] [--seconds 6] [--json FILE]
  python3 bench/macro.py --profile [--seconds 10]     # perf record of bare Pingora and tollgate

--smoke runs every scenario for about a second with tiny counts and exits 1 only if a scenario
could not run or produced no number; it never judges speed.
"""
import argparse, asyncio, base64, hashlib, json, os, re, resource, shutil, signal, socket, statistics
import subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Ports away from proxybench's 9001/91xx, so both can run on one machine.
UP1, UP2, WS_UP, SINK = 19001, 19002, 19005, 19006
PORT = {"nginx": 19101, "nginx-log": 19098, "haproxy": 19102, "bare-pingora": 19100, "bare-mimalloc": 19099, "tollgate": 19103}
ADMIN = 19901
# the capacity scenario's tollgate, one worker thread per core
CAP_PORT, CAP_ADMIN = 19104, 19902
SMALL, BIG, MIB = 1024, 100 * 1024, 1 << 20


# ---------------------------------------------------------------- processes and /proc

def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def port_free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def tree(root):
    """root and all its live descendants."""
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                s = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            kids.setdefault(int(s[s.rfind(")") + 2:].split()[1]), []).append(int(p))
    out, todo = [], [root]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += kids.get(q, [])
    return out


def tree_cpu(root, split=False):
    """user+sys seconds of the process tree (as proxybench.py); split: (user, sys)."""
    user = sys_ = 0.0
    for p in tree(root):
        try:
            s = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        f = s[s.rfind(")") + 2:].split()
        user, sys_ = user + int(f[11]) / TICK, sys_ + int(f[12]) / TICK
    return (user, sys_) if split else user + sys_


def tree_rss(root):
    """resident bytes of the process tree (nginx: master + worker; shared pages counted twice)."""
    tot = 0
    for p in tree(root):
        try:
            tot += int(open(f"/proc/{p}/statm").read().split()[1]) * PAGE
        except OSError:
            pass
    return tot


class Proc:
    def __init__(self, name, argv, port, d, env=None, wrap=(), wait=20):
        self.name, self.port = name, port
        self.log = f"{d}/{name}.log"
        assert port_free(port), f"port {port} ({name}) is in use: another benchmark running?"
        self.p = subprocess.Popen(list(wrap) + argv, env=dict(os.environ, **(env or {})),
                                  start_new_session=True, stdout=open(self.log, "w"),
                                  stderr=subprocess.STDOUT)
        if not wait_port(port, wait):
            self.stop()
            raise RuntimeError(f"{name} did not start on {port}: {open(self.log).read()[-2000:]}")

    @property
    def pid(self):
        return self.p.pid

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.p.wait(3)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(5)
        # nginx's worker may outlive the master by a moment
        for _ in range(50):
            if port_free(self.port):
                break
            time.sleep(0.1)


# ---------------------------------------------------------------- configurations

def write_configs(d, bins):
    os.chmod(d, 0o755)  # nginx workers run as nobody and read the bodies
    www = f"{d}/www"
    os.makedirs(www)
    open(f"{www}/big", "wb").write(b"b" * BIG)
    with open(f"{www}/gib", "wb") as f:  # sparse: no disk, served by sendfile
        f.truncate(1 << 30)
    for n in ("big", "gib"):
        os.chmod(f"{www}/{n}", 0o644)
    os.chmod(www, 0o755)
    os.makedirs(f"{d}/ngcache")
    os.chmod(f"{d}/ngcache", 0o777)
    small = "s" * SMALL
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # /upload reads the whole body before answering (nginx's `return` answers at once and
    # discards the body afterwards): the mirror subrequest makes nginx read it into memory first,
    # then the static handler's 405 for a POST is turned into 200 "ok". Each request length is
    # logged, so the benchmark can check every upload arrived whole. /upload-stream (1 GiB) goes
    # to the Python sink, which counts the bytes without storing them.
    open(f"{www}/ok", "w").write("ok")
    open(f"{www}/upload", "w").write("ok")
    for n in ("ok", "upload"):
        os.chmod(f"{www}/{n}", 0o644)
    open(f"{d}/up.conf", "w").write(f"""worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile - 100}; }}
http {{ access_log off; sendfile on; keepalive_requests 10000000; keepalive_timeout 600s; client_max_body_size 0;
  client_body_buffer_size 2m; log_format len '$request_length';
  server {{ listen 127.0.0.1:{UP1} backlog=4096; listen 127.0.0.1:{UP2} backlog=4096; root {www};
    location / {{ default_type text/plain; return 200 "{small}"; }}
    location /big {{ default_type application/octet-stream; try_files /big =404; }}
    location = /gib {{ default_type application/octet-stream; try_files /gib =404; }}
    location = /upload {{ mirror /drain; mirror_request_body on; error_page 405 =200 /ok; }}
    location = /drain {{ internal; return 204; }}
    location = /ok {{ internal; default_type text/plain; access_log {d}/upload.log len; }}
    location = /upload-stream {{ proxy_pass http://127.0.0.1:{SINK}; proxy_http_version 1.1;
                                proxy_request_buffering off; proxy_set_header Connection ""; }}
    location /cached/ {{ default_type text/plain; add_header Cache-Control "public, max-age=3600";
                        return 200 "{small}"; }} }} }}
""")
    # proxy_request_buffering off and proxy_max_temp_file_size 0: stream like the others do
    # (nginx's defaults spool 1 MiB uploads and large responses to temporary files on disk).
    open(f"{d}/nginx.conf", "w").write(f"""worker_processes 1; daemon off; pid {d}/ng.pid; error_log {d}/ng.err;
worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile - 100}; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 600s; client_max_body_size 0;
  upstream up {{ server 127.0.0.1:{UP1}; server 127.0.0.1:{UP2}; keepalive 128; }}
  proxy_cache_path {d}/ngcache levels=1:2 keys_zone=c:10m max_size=64m inactive=1h use_temp_path=off;
  server {{ listen 127.0.0.1:{PORT['nginx']} backlog=4096;
    proxy_http_version 1.1; proxy_request_buffering off; proxy_max_temp_file_size 0;
    location / {{ proxy_pass http://up; proxy_set_header Connection ""; }}
    location /cached/ {{ proxy_pass http://up; proxy_set_header Connection ""; proxy_cache c;
                        add_header X-Cache-Status $upstream_cache_status; }}
    location /ws {{ proxy_pass http://127.0.0.1:{WS_UP}; proxy_set_header Upgrade $http_upgrade;
                   proxy_set_header Connection "upgrade"; proxy_read_timeout 600s; }} }} }}
""")
    # nginx-log: the same nginx with an access log like tollgate's (JSON, the same fields, written
    # in batches: buffer + flush 10 ms, as tollgate's writer does), for the small and cache scenarios
    # only: tollgate's realistic route logs every request, the nginx above logs none.
    ng = open(f"{d}/nginx.conf").read()
    ng = ng.replace(f"listen 127.0.0.1:{PORT['nginx']}", f"listen 127.0.0.1:{PORT['nginx-log']}")
    ng = ng.replace(f"{d}/ng.pid", f"{d}/nglog.pid").replace(f"{d}/ng.err", f"{d}/nglog.err")
    ng = ng.replace(f"{d}/ngcache", f"{d}/nglogcache")
    ng = ng.replace("http { access_log off;", """http { log_format tg escape=json '{"time":"$time_iso8601",'
    '"request_id":"$request_id","client":"$remote_addr","method":"$request_method","host":"$host",'
    '"path":"$request_uri","status":$status,"bytes_in":$request_length,"bytes_out":$body_bytes_sent,'
    '"upstream":"$upstream_addr","upstream_ms":"$upstream_response_time","total_ms":$request_time,'
    '"cache":"$upstream_cache_status"}';
  access_log """ + f"{d}/nginx-access.log" + " tg buffer=256k flush=10ms;", 1)
    assert "log_format tg" in ng
    open(f"{d}/nginx-log.conf", "w").write(ng)
    # maxconn above nofile/2: 10,000 idle clients need one descriptor each (no strict-limits:
    # haproxy would refuse to start for want of 2 x maxconn descriptors).
    open(f"{d}/haproxy.cfg", "w").write(f"""global
  nbthread 1
  maxconn 10100
  no strict-limits
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout tunnel 600s
  http-reuse always
frontend f
  bind 127.0.0.1:{PORT['haproxy']}
  use_backend ws if {{ path_beg /ws }}
  default_backend b
backend b
  balance roundrobin
  server s1 127.0.0.1:{UP1}
  server s2 127.0.0.1:{UP2}
backend ws
  server w 127.0.0.1:{WS_UP}
""")
    open(f"{d}/pingora.yaml", "w").write(
        f"---\nversion: 1\nthreads: 1\npid_file: {d}/bare.pid\nupgrade_sock: {d}/bare.sock\n")
    text = open(bins["config"]).read().replace("/tmp/tollgate-realistic", d)
    open(f"{d}/tollgate.yaml", "w").write(text)
    for i, (name, (binary, config)) in enumerate(bins["variants"].items()):
        # a variant: another binary (and/or configuration) on its own listener and admin ports
        PORT[name] = PORT["tollgate"] + 10 + i
        v = open(config or bins["config"]).read().replace("/tmp/tollgate-realistic", f"{d}/{name}")
        v = v.replace(f"127.0.0.1:{PORT['tollgate']}", f"127.0.0.1:{PORT[name]}")
        v = v.replace(f"127.0.0.1:{ADMIN}", f"127.0.0.1:{ADMIN + 10 + i}")
        os.makedirs(f"{d}/{name}", exist_ok=True)
        open(f"{d}/{name}.yaml", "w").write(v)


def start_contestant(name, d, bins, ws=False, wrap=(), wait=20):
    if name in ("nginx", "nginx-log"):
        return Proc(name, ["nginx", "-c", f"{d}/{name}.conf"], PORT[name], d)
    if name == "haproxy":
        return Proc(name, ["haproxy", "-f", f"{d}/haproxy.cfg"], PORT[name], d, wrap=wrap, wait=wait)
    if name in ("bare-pingora", "bare-mimalloc"):
        # round robin over every backend it is given: the WS upstream alone for WS
        ups = f"127.0.0.1:{WS_UP}" if ws else f"127.0.0.1:{UP1},127.0.0.1:{UP2}"
        binary = bins["bare"] if name == "bare-pingora" else bins["bare_mimalloc"]
        return Proc(name, [binary, "-c", f"{d}/pingora.yaml"], PORT[name], d,
                    env={"UPSTREAMS": ups, "LISTEN": f"127.0.0.1:{PORT[name]}"}, wrap=wrap, wait=wait)
    if name == "tollgate":
        p = Proc(name, [bins["tollgate"], "-c", f"{d}/tollgate.yaml"], PORT[name], d, wrap=wrap, wait=wait)
        assert wait_port(ADMIN, wait), "tollgate admin listener did not start"
        return p
    if name in bins["variants"]:
        return Proc(name, [bins["variants"][name][0], "-c", f"{d}/{name}.yaml"], PORT[name], d,
                    wrap=wrap, wait=wait)
    raise ValueError(name)


# ---------------------------------------------------------------- load generators

def wrk(port, seconds, conns, path="/", script=None):
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"wrk gave no figures:\n{out}")
    reqs = int(m.group(1))
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v, u = float(m.group(1)), m.group(2)
        return v / 1000 if u == "us" else v if u == "ms" else v * 1000
    sock = re.search(r"Socket errors: (.*)", out)
    return dict(rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), reqs=reqs,
                p50=pct(50), p99=pct(99), errors=int(errs.group(1)) if errs else 0,
                sockerr=sock.group(1) if sock else "")


def h2load_rate(port, seconds, conns, rate, d, path="/"):
    """fixed request rate (rate/conns per connection, HTTP/1.1); latency percentiles from the
    per-request log. h2load paces each connection's requests, so a late response delays the
    next request of that connection (coordinated omission): p99 understates a proxy that falls
    behind, which is why the achieved rate is reported beside it."""
    log = f"{d}/h2load.log"
    per = max(1, round(rate / conns))
    out = subprocess.run(["h2load", "--h1", "-t1", f"-c{conns}", f"--rps={per}", f"-D{seconds}",
                          f"--log-file={log}", f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=seconds + 60)
    lat, bad = [], 0
    for line in open(log):
        f = line.split("\t")
        if len(f) >= 3:
            lat.append(int(f[2]) / 1000)
            bad += f[1] != "200"
    os.unlink(log)
    if not lat:
        raise RuntimeError(f"h2load gave no requests:\n{out.stdout}{out.stderr}")
    # requests that failed on the connection (reset, timeout) leave no line in the log
    m = re.search(r"requests: .*? (\d+) failed, (\d+) errored, (\d+) timeout", out.stdout)
    lost = sum(int(x) for x in m.groups()) if m else 0
    lat.sort()
    q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))]
    return dict(target=per * conns, rps=len(lat) / seconds, reqs=len(lat), p50=q(0.50), p95=q(0.95),
                p99=q(0.99), p999=q(0.999), errors=bad + lost)


def get(port, path, headers=()):
    """one HTTP/1.1 request on a fresh connection: (status, headers dict, body)."""
    c = socket.create_connection(("127.0.0.1", port), 10)
    extra = "".join(f"{h}\r\n" for h in headers)
    c.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n{extra}\r\n".encode())
    data = b""
    while True:
        b = c.recv(65536)
        if not b:
            break
        data += b
    c.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hd = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return int(lines[0].split()[1]), hd, body


# ---------------------------------------------------------------- scenarios

def rounds(a, names, fn):
    """fn(name) -> dict of figures; alternating rounds; medians per name."""
    res = {n: [] for n in names}
    for _ in range(a.rounds):
        for n in names:
            res[n].append(fn(n))
    med = {}
    for n, rs in res.items():
        med[n] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        med[n]["errors"] = sum(r.get("errors", 0) for r in rs)
        if "sockerrs" in rs[0]:
            med[n]["sockerrs"] = sum(r["sockerrs"] for r in rs)
    return med


def cpu_load(procs, name, fn):
    pid = procs[name].pid
    u0, s0 = tree_cpu(pid, split=True)
    r = fn(procs[name].port)
    u1, s1 = tree_cpu(pid, split=True)
    ok = max(r["reqs"] - r.get("errors", 0), 1)
    r["cpu_s"] = (u1 - u0) + (s1 - s0)
    r["cpu_us"] = r["cpu_s"] / ok * 1e6
    r["user_us"], r["sys_us"] = (u1 - u0) / ok * 1e6, (s1 - s0) / ok * 1e6  # user space / kernel
    return r


def scenario_small(a, procs, names, out):
    med = rounds(a, names, lambda n: cpu_load(procs, n, lambda p: wrk(p, a.seconds, a.conns, "/")))
    table(out, "small", f"1 KiB GET, keep-alive: wrk -t1 -c{a.conns} -d{a.seconds}s, {a.rounds} rounds",
          names, med, [("rps", "req/s", 0), ("p50", "p50 ms", 2), ("p99", "p99 ms", 2),
                       ("cpu_us", "cpu us/req", 1), ("user_us", "user us", 1), ("sys_us", "sys us", 1),
                       ("errors", "errors", 0)])
    return med


def scenario_big(a, procs, names, out, d):
    script = f"{d}/post.lua"
    open(script, "w").write('wrk.method = "POST"\nwrk.body = string.rep("u", 1048576)\n'
                            'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    res = {}
    for label, path, size, conns, lua in (("100 KiB GET", "/big", BIG, a.big_conns, None),
                                          ("1 MiB POST", "/upload", MIB, a.upload_conns, script)):
        upl = f"{d}/upload.log"

        def one(n):
            if lua:
                open(upl, "w").close()  # nginx appends the request lengths its /upload received
            r = cpu_load(procs, n, lambda p: wrk(p, a.seconds, conns, path, lua))
            ok = r["reqs"] - r["errors"]
            r["mib_s"] = r["rps"] * size / MIB
            r["cpu_us_mib"] = r["cpu_s"] / max(ok * size / MIB, 1e-9) * 1e6
            if lua:  # every upload wrk counted must have reached the upstream whole
                time.sleep(0.3)
                whole = sum(1 for x in open(upl).read().split() if int(x) >= MIB)
                r["short"] = max(0, ok - whole)
            return r
        med = rounds(a, names, one)
        table(out, "big", f"{label}: wrk -t1 -c{conns} -d{a.seconds}s, {a.rounds} rounds", names, med,
              [("rps", "req/s", 0), ("mib_s", "MiB/s", 0), ("p99", "p99 ms", 2),
               ("cpu_us_mib", "cpu us/MiB", 0), ("errors", "errors", 0)]
              + ([("short", "short", 0)] if lua else []))
        res[label] = med
    return res


def scenario_cache(a, procs, out):
    names = [n for n in procs if n in ("nginx", "nginx-log") or n.startswith("tollgate")]
    path = "/cached/hit"
    for n in names:  # fill, then check the second answer is a hit
        get(procs[n].port, path)
        st, hd, _ = get(procs[n].port, path)
        if st != 200 or hd.get("x-cache-status", "").upper() != "HIT":
            raise RuntimeError(f"{n}: {path} is not a cache hit: {st} {hd}")
    med = rounds(a, names, lambda n: cpu_load(procs, n, lambda p: wrk(p, a.seconds, a.conns, path)))
    # the same run's uncached small GETs, for scale
    table(out, "cache", f"cache hits (1 KiB), {path}: wrk -t1 -c{a.conns} -d{a.seconds}s, {a.rounds} rounds",
          names, med, [("rps", "req/s", 0), ("p50", "p50 ms", 2), ("p99", "p99 ms", 2),
                       ("cpu_us", "cpu us/req", 1), ("errors", "errors", 0)])
    return med


async def _open_clients(port, n, ws, batch=200):
    """n connections that each did one request (or a WebSocket handshake plus one echoed
    message) and stay open — sizing.py's method, in batches so the proxies' in-flight
    limits and upstream pools are not what is measured."""
    conns = []

    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        if ws:
            key = base64.b64encode(os.urandom(16)).decode()
            w.write(f"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"WebSocket refused: {head[:200]!r}")
            mask = os.urandom(4)
            w.write(bytes([0x81, 0x80 | 5]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello")))
            echo = await r.readexactly(7)
            if echo != b"\x81\x05hello":
                raise RuntimeError(f"bad echo {echo!r}")
        else:
            w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {head[:200]!r}")
            cl = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            await r.readexactly(cl)
        conns.append((r, w))
    errors = []
    for i in range(0, n, batch):
        got = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(min(batch, n - i))),
                                                    return_exceptions=True), 60)
        errors += [f"{type(e).__name__}: {e}" for e in got if isinstance(e, Exception)]
        if errors:  # the proxy's limit: stop there and report what it held
            break
    return conns, errors


def scenario_conns(a, d, bins, names, out):
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    n_idle = min(a.idle, nofile - 200)
    # a proxied WebSocket holds two descriptors in the proxy (client and upstream)
    n_ws = min(a.ws, (nofile - 200) // 2)
    res = {}
    for label, n, ws in (("idle keep-alive", n_idle, False), ("WebSockets", n_ws, True)):
        res[label] = {}
        for name in names:
            p = start_contestant(name, d, bins, ws=ws)
            try:
                if not ws:
                    for _ in range(10):
                        get(p.port, "/")
                else:
                    asyncio.run(_hold(p.port, 10, True, p.pid, {}, a))
                time.sleep(0.5)
                r = {"before": tree_rss(p.pid)}
                try:
                    asyncio.run(_hold(p.port, n, ws, p.pid, r, a))
                except Exception as e:
                    raise RuntimeError(f"{name}, {n} {label}: {type(e).__name__} {e}; "
                                       f"its log ends: {open(p.log).read()[-500:]!r}"
                                       + (open(f"{d}/ng.err").read()[-500:] if name == "nginx" else "")) from e
                n_ok = r["n"]
                r["mib"] = r["during"] / MIB
                r["kib_per_conn"] = (r["during"] - r["before"]) / n_ok / 1024
                r["at_10k_mib"] = (r["before"] + (r["during"] - r["before"]) / n_ok * 10000) / MIB
                res[label][name] = r
                if "error" in r:
                    print(f"# {name}: {r['error']}", flush=True)
            finally:
                p.stop()
        table(out, "conns", f"{n} {label} connections from 127.0.0.1 (RLIMIT_NOFILE {nofile})", names,
              res[label], [("n", "conns", 0), ("before", "RSS before MiB", 1, MIB), ("mib", "RSS with MiB", 1),
                           ("kib_per_conn", "KiB/conn", 1), ("at_10k_mib", "10k est. MiB", 0)])
    return res


async def _hold(port, n, ws, pid, r, a):
    conns, errors = await _open_clients(port, n, ws)
    await asyncio.sleep(a.settle)
    r["during"] = tree_rss(pid)
    r["n"] = len(conns)
    if errors:
        r["error"] = f"{len(errors)} failed after {len(conns)} open, first: {errors[0][:200]}"
    if not conns:
        raise RuntimeError(f"no connection opened: {r.get('error')}")
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.2)


def stream(port, size, up):
    """upload (POST /upload) or download (GET /gib) of `size` bytes on one connection."""
    c = socket.create_connection(("127.0.0.1", port), 60)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    if up:
        c.sendall(f"POST /upload-stream HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n"
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        chunk, left = b"u" * MIB, size
        while left:
            c.sendall(chunk[:min(left, MIB)])
            left -= min(left, MIB)
    else:
        c.sendall(f"GET /gib HTTP/1.1\r\nHost: bench\r\nRange: bytes=0-{size - 1}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        b = c.recv(65536)
        if not b:
            raise RuntimeError("closed before the response head")
        data += b
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    cl = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    got, buf = len(body), bytearray(1 << 20)
    while got < cl:
        k = c.recv_into(buf)
        if not k:
            raise RuntimeError(f"closed after {got} of {cl} bytes")
        got += k
    c.close()
    if status not in (200, 206) or (not up and got != size):
        raise RuntimeError(f"status {status}, {got} bytes")
    if up:  # the sink says how many body bytes reached it
        m = re.search(rb"(?i)x-got:\s*(\d+)", head)
        if not m or int(m.group(1)) != size:
            raise RuntimeError(f"the upstream got {m and m.group(1)} of {size} bytes")
    return got


def scenario_stream(a, d, bins, names, out):
    size = a.stream_mib * MIB
    res = {}
    for name in names:
        p = start_contestant(name, d, bins)
        try:
            for _ in range(5):
                get(p.port, "/")
            stream(p.port, MIB, True)
            stream(p.port, MIB, False)
            time.sleep(0.3)
            r = {"before": tree_rss(p.pid)}
            for label, up in (("up", True), ("down", False)):
                peak, stop = [0], threading.Event()

                def sample():
                    while not stop.is_set():
                        peak[0] = max(peak[0], tree_rss(p.pid))
                        time.sleep(0.01)
                t = threading.Thread(target=sample)
                t.start()
                c0, t0 = tree_cpu(p.pid), time.time()
                try:
                    stream(p.port, size, up)
                finally:
                    stop.set()
                    t.join()
                secs = time.time() - t0
                r[f"{label}_peak"] = peak[0]
                r[f"{label}_growth"] = (peak[0] - r["before"]) / MIB
                r[f"{label}_mib_s"] = size / MIB / secs
                r[f"{label}_cpu_us_mib"] = (tree_cpu(p.pid) - c0) / (size / MIB) * 1e6
            res[name] = r
        finally:
            p.stop()
    table(out, "stream", f"{a.stream_mib} MiB upload then {a.stream_mib} MiB download, one connection each",
          names, res, [("before", "RSS before MiB", 1, MIB), ("up_growth", "upload growth MiB", 1),
                       ("down_growth", "download growth MiB", 1), ("up_mib_s", "up MiB/s", 0),
                       ("down_mib_s", "down MiB/s", 0), ("up_cpu_us_mib", "up us/MiB", 0),
                       ("down_cpu_us_mib", "down us/MiB", 0)])
    return res


def scenario_rate(a, procs, names, out, d, nginx_max):
    rate = max(100, int(nginx_max * 0.5))
    med = rounds(a, names, lambda n: cpu_load(
        procs, n, lambda p: h2load_rate(p, a.seconds, a.conns, rate, d)))
    table(out, "rate", f"fixed rate {rate} req/s (50% of nginx's {nginx_max:.0f}), h2load --h1 -c{a.conns}, "
          f"{a.seconds}s, {a.rounds} rounds", names, med,
          [("rps", "got req/s", 0), ("p50", "p50 ms", 2), ("p95", "p95 ms", 2), ("p99", "p99 ms", 2),
           ("p999", "p99.9 ms", 2), ("cpu_us", "cpu us/req", 1), ("errors", "errors", 0)])
    return med


def preemptions(root):
    """involuntary context switches of the process tree's threads so far."""
    n = 0
    for p in tree(root):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                for line in open(f"/proc/{p}/task/{t}/status"):
                    if line.startswith("nonvoluntary_ctxt_switches"):
                        n += int(line.split()[1])
            except OSError:
                pass
    return n


def children_cpu():
    """user+sys seconds of this process's waited-for children (wrk, h2load)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def scenario_capacity(a, d, bins, procs, out):
    """The seed targets' throughput and latency, per instance: nginx, bare Pingora and
    tollgate's realistic route each with one worker per core (`worker_processes N`, `threads:
    N`), loaded to their maximum by wrk with twice the connections in alternating rounds, then
    held at a fixed rate, min(60,000, half tollgate's maximum), straight to the upstream and
    through each proxy: the p95 and p99 each adds. wrk and the upstream run on the same cores,
    so a maximum is this machine's rather than the proxy's: the table says how many cores each
    took, and the CPU per request says what one core of the proxy's own serves."""
    cores = len(os.sched_getaffinity(0))  # the CPUs this process may run on, not the host's
    ports = {f"nginx x{cores}": CAP_PORT + 1, f"bare-pingora x{cores}": CAP_PORT + 2, f"tollgate x{cores}": CAP_PORT}
    ng = open(f"{d}/nginx.conf").read().replace("worker_processes 1;", f"worker_processes {cores};", 1)
    ng = ng.replace(f"listen 127.0.0.1:{PORT['nginx']}", f"listen 127.0.0.1:{CAP_PORT + 1}")
    ng = ng.replace(f"{d}/ng.pid", f"{d}/ngcap.pid").replace(f"{d}/ng.err", f"{d}/ngcap.err")
    ng = ng.replace(f"{d}/ngcache", f"{d}/ngcapcache")
    assert f"worker_processes {cores};" in ng
    open(f"{d}/nginx-capacity.conf", "w").write(ng)
    open(f"{d}/pingora-capacity.yaml", "w").write(
        f"---\nversion: 1\nthreads: {cores}\npid_file: {d}/barecap.pid\nupgrade_sock: {d}/barecap.sock\n")
    text = open(bins["config"]).read().replace("/tmp/tollgate-realistic", f"{d}/capacity")
    assert re.search(r"(?m)^  threads: 1$", text), f"{bins['config']} has no `  threads: 1` line"
    cfg = re.sub(r"(?m)^(  threads:) 1$", rf"\g<1> {cores}", text)
    cfg = cfg.replace(f"127.0.0.1:{PORT['tollgate']}", f"127.0.0.1:{CAP_PORT}")
    cfg = cfg.replace(f"127.0.0.1:{ADMIN}", f"127.0.0.1:{CAP_ADMIN}")
    os.makedirs(f"{d}/capacity", exist_ok=True)
    open(f"{d}/tollgate-capacity.yaml", "w").write(cfg)
    names = list(ports)
    gw = {}
    try:
        ng_name, bare_name, tg_name = names
        gw[ng_name] = Proc(ng_name, ["nginx", "-c", f"{d}/nginx-capacity.conf"], ports[ng_name], d)
        gw[bare_name] = Proc(bare_name, [bins["bare"], "-c", f"{d}/pingora-capacity.yaml"], ports[bare_name], d,
                             env={"UPSTREAMS": f"127.0.0.1:{UP1},127.0.0.1:{UP2}",
                                  "LISTEN": f"127.0.0.1:{ports[bare_name]}"})
        gw[tg_name] = Proc(tg_name, [bins["tollgate"], "-c", f"{d}/tollgate-capacity.yaml"], ports[tg_name], d)
        conns = a.conns * 2
        for n in names:
            wrk(ports[n], 1, conns)  # warm the upstream pools of every worker
        up = procs["upstream"].pid

        def flat_out(n):
            g0, u0, w0, t0 = tree_cpu(gw[n].pid), tree_cpu(up), children_cpu(), time.time()
            p0 = preemptions(gw[n].pid)
            r = wrk(ports[n], a.seconds, conns)
            secs = time.time() - t0
            g, u, w = tree_cpu(gw[n].pid) - g0, tree_cpu(up) - u0, children_cpu() - w0
            ok = max(r["reqs"] - r["errors"], 1)
            sockerrs = sum(int(x) for x in re.findall(r"\d+", r["sockerr"]))  # wrk: connect, read, ...
            r.update(ok_rps=ok / secs, sockerrs=sockerrs, rss=tree_rss(gw[n].pid), cpu_us=g / ok * 1e6,
                     gw_cores=g / secs, up_cores=u / secs, wrk_cores=w / secs,
                     preempted=(preemptions(gw[n].pid) - p0) / ok)
            r["per_core"] = 1e6 / max(r["cpu_us"], 1e-9)
            return r
        top = rounds(a, names, flat_out)
        table(out, "capacity", f"one worker per core ({cores}), flat out: wrk -t1 -c{conns} -d{a.seconds}s, "
              f"{a.rounds} rounds, on {cores} cores shared with wrk and the upstream", names, top,
              [("rps", "req/s", 0), ("p50", "p50 ms", 2), ("p99", "p99 ms", 2), ("cpu_us", "cpu us/req", 1),
               ("gw_cores", "proxy cores", 2), ("wrk_cores", "wrk cores", 2),
               ("up_cores", "upstream cores", 2), ("preempted", "preempted/req", 2),
               ("per_core", "req/s per proxy core", 0), ("errors", "errors", 0)])
        rate = max(100, int(min(60000, top[tg_name]["ok_rps"] * 0.5)))
        ports["direct"] = UP1
        order = ["direct"] + names
        fixed = rounds(a, order, lambda n: h2load_rate(ports[n], a.seconds, a.conns, rate, d))
        for n in fixed:
            fixed[n]["added_p95"] = fixed[n]["p95"] - fixed["direct"]["p95"]
            fixed[n]["added_p99"] = fixed[n]["p99"] - fixed["direct"]["p99"]
        table(out, "capacity", f"fixed rate {rate} req/s (min(60,000, half of tollgate's maximum above)), "
              f"h2load --h1 -c{a.conns}, {a.seconds}s, {a.rounds} rounds: straight to the upstream and "
              "through each proxy", order, fixed,
              [("rps", "got req/s", 0), ("p50", "p50 ms", 2), ("p95", "p95 ms", 2), ("p99", "p99 ms", 2),
               ("added_p95", "added p95 ms", 2), ("added_p99", "added p99 ms", 2), ("errors", "errors", 0)])
        return {"cores": cores, "max": top[tg_name], "rate": rate, "direct": fixed["direct"],
                "gateway": fixed[tg_name], "all": top, "fixed": fixed}
    finally:
        for p in gw.values():
            p.stop()


def table(out, key, title, names, res, cols):
    w = max([14] + [len(n) for n in names if n in res])
    lines = [f"# {title}", f"{'contestant':{w}}" + "".join(f" {c[1]:>{max(len(c[1]), 9)}}" for c in cols)]
    for n in names:
        if n not in res:
            continue
        row = f"{n:{w}}"
        for c in cols:
            v = res[n].get(c[0], float("nan"))
            v = v / c[3] if len(c) > 3 else v
            row += f" {v:>{max(len(c[1]), 9)}.{c[2]}f}"
        lines.append(row)
    print("\n".join(lines) + "\n", flush=True)
    out.setdefault("tables", []).append("\n".join(lines))


# ---------------------------------------------------------------- verdicts

def verdicts(r):
    v = []

    def ratio(what, x, y, target, le=True):
        if x is None or y is None:
            return
        q = x / y
        ok = q <= target if le else q < target
        v.append(f"{what}: {q:.2f} (target {'≤' if le else '<'} {target}) {'met' if ok else 'NOT met'}")
    s = r.get("small", {})
    if "tollgate" in s and "bare-pingora" in s:
        ratio("small GET CPU/req tollgate realistic / bare Pingora", s["tollgate"]["cpu_us"],
              s["bare-pingora"]["cpu_us"], 1.10)
        ratio("small GET CPU/req tollgate / bare Pingora (own choices)", s["tollgate"]["cpu_us"],
              s["bare-pingora"]["cpu_us"], 0.90)
    if "tollgate" in s and "bare-mimalloc" in s:
        v.append("small GET CPU/req tollgate / bare Pingora with mimalloc (the allocator held equal): "
                 f"{s['tollgate']['cpu_us'] / s['bare-mimalloc']['cpu_us']:.2f}")
    if "tollgate" in s and "nginx" in s:
        v.append(f"small GET CPU/req tollgate / nginx: {s['tollgate']['cpu_us'] / s['nginx']['cpu_us']:.2f}")
    if "tollgate" in s and "nginx-log" in s:
        v.append("small GET CPU/req tollgate / nginx with an access log like tollgate's: "
                 f"{s['tollgate']['cpu_us'] / s['nginx-log']['cpu_us']:.2f}")
    c = r.get("cache", {})
    if "tollgate" in c and "nginx" in c:
        ratio("cache hit CPU/req tollgate / nginx proxy_cache", c["tollgate"]["cpu_us"], c["nginx"]["cpu_us"],
              1.0, le=False)
    if "tollgate-nolog" in c and "nginx" in c:
        ratio("cache hit CPU/req tollgate / nginx proxy_cache, neither with an access log",
              c["tollgate-nolog"]["cpu_us"], c["nginx"]["cpu_us"], 1.0, le=False)
    if "tollgate" in c and "nginx-log" in c:
        ratio("cache hit CPU/req tollgate / nginx proxy_cache, both with an access log",
              c["tollgate"]["cpu_us"], c["nginx-log"]["cpu_us"], 1.0, le=False)
    w = r.get("conns", {}).get("WebSockets", {}).get("tollgate")
    if w:
        ok = w["at_10k_mib"] < 300
        v.append(f"WebSockets: {w['n']} open, RSS {w['mib']:.0f} MiB, {w['at_10k_mib']:.0f} MiB at 10,000 "
                 f"(target < 300 MB) {'met' if ok else 'NOT met'}")
    st = r.get("stream", {}).get("tollgate")
    if st:
        g = max(st["up_growth"], st["down_growth"])
        v.append(f"streaming: RSS growth {st['up_growth']:.1f} MiB up, {st['down_growth']:.1f} MiB down "
                 f"(target < 64 MB) {'met' if g < 64 else 'NOT met'}")
    cap = r.get("capacity")
    if cap:
        m = cap["max"]
        one = s.get("tollgate", {}).get("cpu_us")  # one worker thread, next to wrk, not under it
        per = max(one or m["cpu_us"], 1e-9)
        clean = m["errors"] == 0 and m["sockerrs"] == 0
        v.append(f"seed: 60,000+ req/s per instance: {m['ok_rps']:.0f} successful req/s here with threads: "
                 f"{cap['cores']} ({m['errors']} errors, {m['cpu_us']:.1f} us per request, its threads preempted "
                 f"{m['preempted']:.2f} times per request, with wrk ({m['wrk_cores']:.2f} cores) and the upstream "
                 f"({m['up_cores']:.2f}) on the same {cap['cores']} cores); at {per:.1f} us per request "
                 + ("(small GET, one thread) " if one else "") + f"one core of its own serves {1e6 / per:.0f} "
                 f"req/s, so 60,000 req/s takes {60000 * per / 1e6:.2f} cores "
                 + ("(met here)" if m["ok_rps"] >= 60000 and clean
                    else "(a projection: not reachable on this machine)"))
        g = cap["gateway"]
        add = g["added_p95"]
        others = ", ".join(f"{n} {x['added_p95']:.2f}" for n, x in cap["fixed"].items()
                           if n not in ("direct", f"tollgate x{cap['cores']}"))
        held = g["errors"] == 0 and g["rps"] >= 0.95 * cap["rate"]
        if add >= 5 or not held:
            verdict = "NOT met" + ("" if held else f" (got {g['rps']:.0f} req/s, {g['errors']} errors)")
        elif cap["rate"] >= 60000:
            verdict = "met"
        else:
            verdict = f"met at {cap['rate']} req/s (60,000 not driven on this machine)"
        v.append(f"seed: p95 added latency at {cap['rate']} req/s: {add:.2f} ms (p95 {g['p95']:.2f} "
                 f"through the gateway, {cap['direct']['p95']:.2f} direct; {others} ms; target < 5 ms) {verdict}")
    peaks = [c["tollgate"]["during"] for c in r.get("conns", {}).values() if "tollgate" in c]
    if st:
        peaks += [st["up_peak"], st["down_peak"]]
    if cap:
        peaks.append(cap["max"]["rss"])
    if peaks:
        v.append(f"seed: memory per instance: largest RSS of the connection, streaming and capacity scenarios "
                 f"{max(peaks) / MIB:.0f} MiB (target < 4 GB) {'met' if max(peaks) < 4e9 else 'NOT met'}")
    return v


# ---------------------------------------------------------------- WebSocket upstream

async def ws_upstream(port):
    """accepts every WebSocket handshake and echoes each (small, masked) text frame."""
    async def serve(r, w):
        try:
            head = await r.readuntil(b"\r\n\r\n")
            key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", head).group(1)
            acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
            while True:
                h = await r.readexactly(2)
                n = h[1] & 0x7F
                mask = await r.readexactly(4) if h[1] & 0x80 else b"\0\0\0\0"
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(await r.readexactly(n)))
                w.write(bytes([0x81, n]) + data)
        except (asyncio.IncompleteReadError, ConnectionError, AttributeError):
            pass
        finally:
            w.close()
    async def sink(r, w):
        """POST with Content-Length: reads the body, answers 200 with X-Got: bytes read."""
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                left = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                got = 0
                while got < left:
                    b = await r.read(min(left - got, 1 << 20))
                    if not b:
                        return
                    got += len(b)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Got: %d\r\n\r\nok" % got)
        except (asyncio.IncompleteReadError, ConnectionError, AttributeError):
            pass
        finally:
            w.close()
    srv = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    srv2 = await asyncio.start_server(sink, "127.0.0.1", SINK, limit=1 << 20)
    async with srv, srv2:
        await asyncio.gather(srv.serve_forever(), srv2.serve_forever())


# ---------------------------------------------------------------- profiling

GROUPS = [("kernel", lambda dso, sym: "kernel" in dso), ("tollgate", lambda dso, sym: "tollgate" in sym),
          ("pingora", lambda dso, sym: "pingora" in sym),
          ("tokio", lambda dso, sym: "tokio" in sym or "mio::" in sym),
          ("allocator", lambda dso, sym: sym.startswith(("mi_", "_mi_", "malloc", "free", "cfree", "realloc",
                                                         "__libc_malloc", "__libc_free", "_int_", "alloc::"))),
          ("http parsing/headers", lambda dso, sym: any(k in sym for k in ("httparse", "http::", "bytes::"))),
          ("libc", lambda dso, sym: "libc" in dso)]


def syscalls(a, procs, names):
    """system calls per request for --path (strace -c -f on the proxy while wrk runs): strace slows
    the proxy down, but the calls each request needs do not change."""
    print(f"# system calls per request, GET {a.path}, wrk -c{a.conns} (strace -c -f)")
    for n in names:
        pids = [x for p in tree(procs[n].pid) for x in ("-p", str(p))]  # nginx: master and worker
        st = subprocess.Popen(["strace", "-c", "-f", "-q"] + pids,
                              stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        w = wrk(procs[n].port, a.seconds, a.conns, path=a.path)
        st.send_signal(signal.SIGINT)
        rep = st.communicate(timeout=30)[1]
        calls = {}
        for line in rep.splitlines():
            f = line.split()
            if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
                calls[f[-1]] = int(f[3])
        tot = sum(calls.values())
        top = ", ".join(f"{k} {v / w['reqs']:.2f}" for k, v in sorted(calls.items(), key=lambda x: -x[1])[:6])
        print(f"  {n:14} {tot / max(w['reqs'], 1):5.2f} per request ({w['reqs']} requests): {top}")
    print(flush=True)


def profile(a, d, bins):
    names = ["bare-pingora", "tollgate"]
    procs = {"upstream": Proc("upstream", ["nginx", "-c", f"{d}/up.conf"], UP1, d)}
    try:
        for n in names + (["nginx", "haproxy"] if a.syscalls else []):
            procs[n] = start_contestant(n, d, bins)
        if a.syscalls:
            syscalls(a, procs, ["nginx", "haproxy"] + names)
        for n in names:
            wrk(procs[n].port, 1, a.conns, a.path)
            load = subprocess.Popen(["wrk", "-t1", f"-c{a.conns}", f"-d{a.seconds + 2}s",
                                     f"http://127.0.0.1:{procs[n].port}{a.path}"], stdout=subprocess.DEVNULL)
            time.sleep(1)
            subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-g", "-o", f"{d}/{n}.perf",
                            "-p", str(procs[n].pid), "--", "sleep", str(a.seconds)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            load.wait()
            rep = subprocess.run(["perf", "report", "-i", f"{d}/{n}.perf", "--stdio", "--no-children",
                                  "-g", "none", "--sort", "dso,sym", "--percent-limit", "0"],
                                 capture_output=True, text=True).stdout
            groups, top = {}, []
            for line in rep.splitlines():
                m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.kH]\]\s+(.*)$", line)
                if not m:
                    continue
                pct, dso, sym = float(m.group(1)), m.group(2), m.group(3).strip()
                g = next((g for g, f in GROUPS if f(dso, sym)), "other")
                groups[g] = groups.get(g, 0) + pct
                top.append((pct, g, dso, sym))
            print(f"# perf record -e cpu-clock -g, {n}, GET {a.path} under wrk -c{a.conns}: self time by group")
            for g, pct in sorted(groups.items(), key=lambda x: -x[1]):
                print(f"  {pct:5.1f}%  {g}")
            print("  top symbols:")
            for pct, g, dso, sym in top[:a.top]:
                print(f"  {pct:5.1f}%  {g:10} {sym[:130]}")
            print(flush=True)
            if a.dwarf:
                inclusive(a, d, n, procs[n])
            if a.keep_perf:
                os.makedirs(a.keep_perf, exist_ok=True)
                shutil.copy(f"{d}/{n}.perf", os.path.join(a.keep_perf, f"{n}.perf"))
                if a.dwarf:  # for callers: perf report -i X.dwarf --no-children -S SYMBOL -G
                    shutil.copy(f"{d}/{n}.dwarf", os.path.join(a.keep_perf, f"{n}.dwarf"))
    finally:
        for p in procs.values():
            p.stop()


def instructions(a, d, bins):
    """User-space instructions per small GET, counted by valgrind's callgrind: deterministic
    where CPU time on a shared machine is not (±5-10% run to run), so an A/B of a small change
    shows. Blind to the kernel (about half of a proxied request's CPU, the same for every
    Pingora build) and to cache misses and branch mispredictions: a ranking of code paths, not a
    substitute for the CPU figures. Under valgrind every thread runs on one core, ~50x slower."""
    names = [n for n in a.contestants.split(",") if n not in ("nginx", "nginx-log")]
    procs = {"upstream": Proc("upstream", ["nginx", "-c", f"{d}/up.conf"], UP1, d)}
    res = {}
    try:
        for n in names:
            out = f"{d}/cg.{n}"
            wrap = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                    f"--callgrind-out-file={out}.%p", "--dump-instr=no"]
            procs[n] = p = start_contestant(n, d, bins, wrap=wrap, wait=120)
            wrk(p.port, 3, a.conns, a.path)  # warm: connections, pools, lazy statics (the cache)
            subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
            r = wrk(p.port, a.seconds, a.conns, a.path)
            subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
            dumps = sorted((f for f in os.listdir(d) if f.startswith(f"cg.{n}.{p.pid}.")),
                           key=lambda f: os.path.getmtime(f"{d}/{f}"))
            text = open(f"{d}/{dumps[-1]}").read()
            ir = int(re.search(r"(?m)^(?:summary|totals): (\d+)", text).group(1))
            res[n] = dict(reqs=r["reqs"], errors=r["errors"], ir=ir / max(r["reqs"] - r["errors"], 1))
            if a.keep_perf:  # callgrind_annotate --inclusive=yes DIR/NAME.callgrind
                os.makedirs(a.keep_perf, exist_ok=True)
                shutil.copy(f"{d}/{dumps[-1]}", os.path.join(a.keep_perf, f"{n}.callgrind"))
            procs.pop(n).stop()
            print(f"# {n}: {r['reqs']} requests, {res[n]['ir']:.0f} instructions each", flush=True)
    finally:
        for p in procs.values():
            p.stop()
    base = res.get("bare-pingora", {}).get("ir")
    print(f"# user-space instructions per 1 KiB GET {a.path} (callgrind), wrk -t1 -c{a.conns} -d{a.seconds}s")
    print(f"{'contestant':16} {'requests':>9} {'instr/req':>10} {'vs bare':>8}")
    for n, r in res.items():
        ratio = f"{r['ir'] / base:8.3f}" if base else ""
        print(f"{n:16} {r['reqs']:9d} {r['ir']:10.0f} {ratio}")
    return res


def inclusive(a, d, n, proc):
    """Rust release builds have no frame pointers, so -g stacks stop early; DWARF unwinding
    gives whole stacks, hence inclusive ("children") time per function: what a hook of ours
    costs with everything it calls."""
    load = subprocess.Popen(["wrk", "-t1", f"-c{a.conns}", f"-d{a.seconds + 2}s",
                             f"http://127.0.0.1:{proc.port}{a.path}"], stdout=subprocess.DEVNULL)
    time.sleep(1)
    subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf,32768",
                    "-o", f"{d}/{n}.dwarf", "-p", str(proc.pid), "--", "sleep", str(a.seconds)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load.wait()
    rep = subprocess.run(["perf", "report", "-i", f"{d}/{n}.dwarf", "--stdio", "--children", "-g", "none",
                          "--sort", "sym", "--percent-limit", "0.2"], capture_output=True, text=True).stdout
    print(f"# perf record -e cpu-clock --call-graph dwarf, {n}: inclusive time (children, self)")
    rows = 0
    for line in rep.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[[.kH]\]\s+(.*)$", line)
        if not m:
            continue
        sym = m.group(3).strip()
        # our own functions (not Pingora's generic code instantiated for our Gateway type)
        ours = sym.startswith(("tollgate::", "<tollgate::"))
        if ours or rows < a.top:
            print(f"  {float(m.group(1)):5.1f}% {float(m.group(2)):5.1f}%  {'OURS ' if ours else ''}{sym[:140]}")
            rows += 1
    print(flush=True)


# ---------------------------------------------------------------- main

def cpu_model():
    """the CPU's model name, clock and cache as /proc/cpuinfo gives them: hosts differ from day
    to day, and figures from different hosts are not comparable."""
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        return "unknown CPU"
    return f"{info.get('model name', '?')}, {info.get('cpu MHz', '?')} MHz, {info.get('cache size', '?')} cache"


def cpu_ticks():
    """(steal, total) jiffies of all CPUs from /proc/stat, idle included: steal is time the
    hypervisor ran other guests on our virtual CPUs while they had work."""
    try:
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (f[7] if len(f) > 7 else 0), sum(f[:8])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every scenario briefly; fail only on no number")
    ap.add_argument("--only", default="small,big,cache,conns,stream,rate,capacity")
    ap.add_argument("--contestants", default="nginx,nginx-log,haproxy,bare-pingora,bare-mimalloc,tollgate,tollgate-nolog")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--big-conns", type=int, default=16)
    ap.add_argument("--upload-conns", type=int, default=8)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--ws", type=int, default=10000)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between opening and measuring")
    ap.add_argument("--stream-mib", type=int, default=1024)
    ap.add_argument("--rate", type=float, default=0, help="fixed rate instead of 50%% of nginx's max")
    ap.add_argument("--tollgate", default=f"{ROOT}/target/release/tollgate")
    ap.add_argument("--bare", default=f"{ROOT}/target/release/examples/bare_proxy")
    ap.add_argument("--bare-mimalloc", default="",
                    help="bare_proxy built with mimalloc (default: bare_proxy_mimalloc beside --bare)")
    ap.add_argument("--config", default=f"{HERE}/realistic.yaml")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=BINARY[:CONFIG]",
                    help="another tollgate build (or configuration) as a contestant, e.g. an A/B")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--keep-perf", default="")
    ap.add_argument("--dwarf", action="store_true", help="also inclusive time from DWARF call stacks")
    ap.add_argument("--path", default="/", help="what --profile, --instructions and --syscalls request (/cached/x: cache hits)")
    ap.add_argument("--syscalls", action="store_true", help="also system calls per request (strace)")
    ap.add_argument("--instructions", action="store_true",
                    help="user-space instructions per small GET under callgrind (not: nginx)")
    ap.add_argument("--ws-upstream", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ws_upstream:
        asyncio.run(ws_upstream(a.ws_upstream))
        return 0
    if a.smoke:
        a.rounds, a.seconds, a.conns, a.big_conns, a.upload_conns = 1, 1, 8, 2, 2
        a.idle, a.ws, a.settle, a.stream_mib = 100, 100, 0.2, 16
    a.bare_mimalloc = a.bare_mimalloc or os.path.join(os.path.dirname(a.bare), "bare_proxy_mimalloc")
    bins = {"tollgate": a.tollgate, "bare": a.bare, "bare_mimalloc": a.bare_mimalloc,
            "config": a.config, "variants": {}}
    for v in a.variant:
        name, rest = v.split("=", 1)
        binary, _, config = rest.partition(":")
        bins["variants"][name] = (binary, config)
    a.contestants += "".join("," + n for n in bins["variants"] if n not in a.contestants.split(","))
    needed = [a.tollgate, a.bare] + ([a.bare_mimalloc] if "bare-mimalloc" in a.contestants.split(",") else [])
    for b in needed:
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} missing: cargo build --release --bin tollgate --examples")
    d = tempfile.mkdtemp(prefix="tollgate-macro-")
    if "tollgate-nolog" in a.contestants.split(","):
        # the realistic route without its access log: tollgate's side of a like-for-like
        # comparison with the nginx that logs nothing
        text = open(a.config).read()
        nolog = re.sub(r"(?m)^access_log:.*\n", "", text)
        assert nolog != text, f"{a.config} has no access_log line to drop"
        open(f"{d}/nolog.yaml", "w").write(nolog)
        bins["variants"]["tollgate-nolog"] = (a.tollgate, f"{d}/nolog.yaml")
    write_configs(d, bins)
    if a.profile or a.instructions:
        try:
            (instructions if a.instructions else profile)(a, d, bins)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return 0
    names = a.contestants.split(",")
    scen = a.only.split(",")
    res, out, failed, t0 = {}, {}, [], time.time()
    ticks0 = cpu_ticks()
    procs = {}
    print(f"# tollgate macro benchmarks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs ({cpu_model()}), load average {os.getloadavg()[0]:.2f}"
          + (", SMOKE" if a.smoke else ""), flush=True)
    try:
        procs["upstream"] = Proc("upstream", ["nginx", "-c", f"{d}/up.conf"], UP1, d)
        procs["ws-upstream"] = Proc("ws-upstream", [sys.executable, os.path.abspath(__file__),
                                                    "--ws-upstream", str(WS_UP)], WS_UP, d)
        for n in names:
            procs[n] = start_contestant(n, d, bins)
        for n in names:  # warm up pools
            wrk(procs[n].port, 1, a.conns)

        def run(key, fn):
            if key not in scen:
                return
            t = time.time()
            try:
                res[key] = fn()
                if not res[key]:
                    raise RuntimeError("no figures")
            except Exception as e:  # a scenario that cannot run fails the smoke, not the others
                failed.append(f"{key}: {type(e).__name__}: {e}")
                print(f"# {key} FAILED: {e}", flush=True)
            print(f"# ({key}: {time.time() - t:.0f}s)\n", flush=True)

        run("small", lambda: scenario_small(a, procs, names, out))
        # nginx-log and tollgate-nolog are references for the per-request cost of logging: small
        # GETs and cache hits only
        rest = [n for n in names if n not in ("nginx-log", "tollgate-nolog")]
        run("big", lambda: scenario_big(a, procs, rest, out, d))
        run("cache", lambda: scenario_cache(a, procs, out))
        nginx_max = a.rate * 2 or res.get("small", {}).get("nginx", {}).get("rps")
        if nginx_max is None and "rate" in scen:  # measured here when small was not asked for
            nginx_max = wrk(procs["nginx"].port, a.seconds, a.conns)["rps"]
        run("rate", lambda: scenario_rate(a, procs, rest, out, d, nginx_max))
        run("capacity", lambda: scenario_capacity(a, d, bins, procs, out))
        for n in names:  # the memory scenarios start each contestant afresh
            procs.pop(n).stop()
        run("conns", lambda: scenario_conns(a, d, bins, rest, out))
        run("stream", lambda: scenario_stream(a, d, bins, rest, out))
    finally:
        for p in procs.values():
            p.stop()
        shutil.rmtree(d, ignore_errors=True)
    v = verdicts(res)
    print("# ratios against the targets (one run)")
    for line in v:
        print("  " + line)
    (s0, n0), (s1, n1) = ticks0, cpu_ticks()
    steal = (f", CPU time stolen by the hypervisor {100 * (s1 - s0) / (n1 - n0):.1f}% (of all CPU time, "
             "idle included)" if n1 > n0 else "")
    print(f"\n# total {time.time() - t0:.0f}s{steal}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": res, "verdicts": v, "failed": failed, "tables": out.get("tables", [])}, f, indent=1)
    if failed:
        print("# scenarios that did not run:\n  " + "\n  ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
