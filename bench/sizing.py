#!/usr/bin/env python3
"""Sizing figures for docs/deployment.md: a gateway's memory and CPU per request at rest, under
keep-alive load, and holding many idle connections. Loopback only; every phase is bounded.

  python3 bench/sizing.py [--bin target/release/tollgate] [--threads 2] [--seconds 10]

An nginx upstream (1 worker, 1 KiB body) on a free port, the gateway with one route to it,
wrk as the client. RSS and CPU come from the gateway's own /metrics (process_* series).
"""
import argparse, os, re, socket, subprocess, sys, tempfile, time, urllib.request


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def metrics(admin):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(process_cpu_seconds_total|process_resident_memory_bytes|tollgate_requests_total)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/tollgate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tollgate-sizing-")
    up, gw, admin = free_port(), free_port(), free_port()
    open(f"{tmp}/body", "wb").write(b"x" * 1024)
    # nginx's worker runs as nobody: it must be able to read the body.
    os.chmod(tmp, 0o755)
    os.chmod(f"{tmp}/body", 0o644)
    open(f"{tmp}/nginx.conf", "w").write(f"""
worker_processes 1; worker_rlimit_nofile 30000; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{up}; location / {{ root {tmp}; try_files /body =404; }} }} }}
""")
    open(f"{tmp}/tollgate.yaml", "w").write(f"""
server: {{ threads: {a.threads}, grace_period: 1s, graceful_shutdown_timeout: 1s,
          pid_file: {tmp}/t.pid, upgrade_sock: {tmp}/t.sock }}
listeners: [{{ address: "127.0.0.1:{gw}" }}]
admin: {{ address: "127.0.0.1:{admin}" }}
upstreams: {{ app: {{ backends: [{{ address: "127.0.0.1:{up}" }}], keepalive: {{ pool_size: 256 }},
                      circuit_breaker: {{ max_in_flight: 0 }} }} }}  # no in-flight cap (default 1024)
routes: [{{ name: app, upstream: app }}]
""")
    procs = [subprocess.Popen(["nginx", "-c", f"{tmp}/nginx.conf"])]
    procs.append(subprocess.Popen([a.bin, "-c", f"{tmp}/tollgate.yaml"], stderr=open(f"{tmp}/gw.log", "w")))
    try:
        wait(up); wait(gw); wait(admin)
        time.sleep(1)
        idle = metrics(admin)
        print(f"idle: RSS {idle['process_resident_memory_bytes'] / 2**20:.1f} MiB")
        # Idle keep-alive clients: each sends one request, reads the answer and stays open.
        for n in (1000, 5000):
            socks = []
            for _ in range(n):
                c = socket.create_connection(("127.0.0.1", gw), 30)
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(c)
            for c in socks:
                got = b""
                while not got.endswith(b"x" * 64):
                    more = c.recv(65536)
                    if not more or got.startswith(b"HTTP/1.1 ") and not got.startswith(b"HTTP/1.1 200"):
                        sys.exit(f"unexpected answer: {got[:100]!r}")
                    got += more
            time.sleep(1)
            m = metrics(admin)
            print(f"{n:5d} idle keep-alive clients: RSS {m['process_resident_memory_bytes'] / 2**20:.1f} MiB")
            for c in socks:
                c.close()
        for conns in (64, 1000, 5000):
            before = metrics(admin)
            out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{a.seconds}s", f"http://127.0.0.1:{gw}/"],
                                 capture_output=True, text=True, timeout=a.seconds + 30).stdout
            after = metrics(admin)
            reqs = after.get("tollgate_requests_total", 0) - before.get("tollgate_requests_total", 0)
            cpu = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
            rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
            if "Non-2xx" in out:
                sys.exit(f"non-2xx answers under load:\n{out}")
            errs = re.search(r"Socket errors:.*", out)
            print(f"{conns:5d} keep-alive conns: {float(rps.group(1)) if rps else 0:8.0f} req/s, "
                  f"{cpu / max(reqs, 1) * 1e6:5.1f} us CPU/request, "
                  f"RSS {after['process_resident_memory_bytes'] / 2**20:.1f} MiB"
                  + (f"  ({errs.group(0)})" if errs else ""))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


if __name__ == "__main__":
    main()
