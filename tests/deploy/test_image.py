"""The container image, linted, built and run for real with podman (`make image-test`).

The base images are made locally by scripts/image-bases.sh (this machine cannot pull); the
Dockerfile itself is the one users build. Containers share the host's network namespace and
everything they talk to is on 127.0.0.1.
"""

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import ROOT, free_ports, require_tool

IMAGE = os.environ.get("TOLLGATE_IMAGE", "localhost/tollgate:test")
BODY = b"hello from the loopback upstream\n"


def podman_env() -> dict:
    """The environment scripts/podman-env.sh sets (storage and runtime for this sandbox)."""
    out = subprocess.run(
        ["bash", "-c", ". scripts/podman-env.sh && env -0"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout
    return dict(kv.split("=", 1) for kv in out.decode().split("\0") if "=" in kv)


ENV = podman_env()


def podman(*args, timeout=120, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(["podman", *args], env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def image():
    require_tool("podman")
    start = time.monotonic()
    # Build logs go to a file: the first build compiles every dependency (minutes).
    log = ROOT / "target" / "image-build.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.run(["podman", "build", "--pull=never", "-t", IMAGE, "."],
                           env=ENV, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    if p.returncode != 0:
        pytest.fail(f"podman build failed; the last lines of {log}:\n"
                    + "".join(open(log).readlines()[-30:]))
    print(f"\nimage built in {time.monotonic() - start:.0f} s (log: {log})")
    return IMAGE


def test_dockerfile_is_hadolint_clean():
    hadolint = require_tool("hadolint")
    p = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout + p.stderr


def test_dependencies_build_in_their_own_layer():
    """Cargo manifests are copied and built before src/, so a code change reuses that layer."""
    lines = [l.strip() for l in (ROOT / "Dockerfile").read_text().splitlines()]
    copy_manifests = lines.index("COPY Cargo.toml Cargo.lock ./")
    copy_src = lines.index("COPY src ./src")
    dep_build = next(i for i, l in enumerate(lines) if "cargo build" in l)
    assert copy_manifests < dep_build < copy_src
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and "!src/" in ignore, "the context must be an allow-list"


def build_steps(context, tag) -> dict[str, tuple[bool, str]]:
    """`podman build` of `context`: for each RUN/COPY step, whether it came from the cache and
    the id of the layer it produced."""
    p = podman("build", "--pull=never", "-t", tag, str(context), timeout=1800)
    lines = p.stdout.splitlines()
    steps = {}
    for i, line in enumerate(lines):
        if " STEP " in f" {line}" and (": RUN " in line or ": COPY " in line):
            after = lines[i + 1:]
            cached = bool(after) and after[0].startswith("--> Using cache")
            # The step's result: the first "--> <id>" line after it.
            layer = next(l.split()[-1] for l in after if l.startswith("--> ") and "Using cache" not in l)
            steps[line.split(": ", 1)[1]] = (cached, layer)
    assert steps, p.stdout
    return steps


def step(steps: dict, prefix: str, contains: str = "") -> tuple[bool, str]:
    return next(v for k, v in steps.items() if k.startswith(prefix) and contains in k)


def test_rebuild_without_changes_is_all_cache(image):
    steps = build_steps(ROOT, image)
    assert all(cached for cached, _ in steps.values()), steps


def test_code_change_reuses_the_dependency_layer(image, tmp_path):
    """A change under src/ makes new tollgate layers on top of the same dependency layer."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for f in ("Dockerfile", ".dockerignore", "Cargo.toml", "Cargo.lock"):
        shutil.copy(ROOT / f, ctx / f)
    shutil.copytree(ROOT / "src", ctx / "src")
    shutil.copytree(ROOT / "benches", ctx / "benches")
    (ctx / "conf").mkdir()
    shutil.copy(ROOT / "conf" / "container.yaml", ctx / "conf")
    with open(ctx / "src" / "main.rs", "a") as f:
        f.write("// a code change (tests/deploy/test_image.py)\n")
    tag = "localhost/tollgate:code-change"
    base = build_steps(ROOT, image)
    try:
        changed = build_steps(ctx, tag)
    finally:
        podman("rmi", tag, check=False)
    deps = ("RUN mkdir src", "cargo build")
    cached, layer = step(changed, *deps)
    assert cached and layer == step(base, *deps)[1], f"the dependency layer was rebuilt: {changed}"
    # The changed sources, and the build on them, are new layers (the build itself is cached
    # only where this exact change was built before).
    assert step(changed, "COPY src")[1] != step(base, "COPY src")[1], changed
    assert step(changed, "RUN cargo build")[1] != step(base, "RUN cargo build")[1], changed


def test_image_metadata(image):
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    cfg = info["Config"]
    assert cfg["User"] == "10001:10001"
    assert set(cfg["ExposedPorts"]) == {"8080/tcp", "8443/tcp", "9901/tcp"}
    assert cfg["Entrypoint"] == ["/usr/local/bin/tollgate"]
    assert cfg["Cmd"] == ["-c", "/etc/tollgate/tollgate.yaml"]
    size = info["Size"]
    print(f"\nimage size: {size / 1e6:.1f} MB")
    assert size < 150e6, f"image is {size / 1e6:.1f} MB"


def test_baked_config_validates(image):
    p = podman("run", "--rm", image, "-t", "-c", "/etc/tollgate/tollgate.yaml")
    assert "configuration OK" in p.stdout + p.stderr


def test_runs_as_non_root_without_capabilities(image):
    p = podman("run", "--rm", "--entrypoint", "sh", image, "-c", "id -u; grep CapEff /proc/self/status")
    uid, cap = p.stdout.split("\n", 1)
    assert uid == "10001"
    assert cap.split()[1] == "0000000000000000", cap


def test_system_roots_for_upstream_tls(image):
    # Upstreams with tls: and no ca_file verify against these (rustls-native-certs' path).
    p = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
               "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt")
    assert int(p.stdout.strip()) > 50, p.stdout


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("X-Seen-Path", self.path)
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *a):
        pass


def test_request_through_the_running_container(image, tmp_path):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    http_port, admin_port = free_ports(2)
    conf = tmp_path / "tollgate.yaml"
    conf.write_text(f"""
server: {{ grace_period: 1s, graceful_shutdown_timeout: 2s,
          pid_file: /tmp/tollgate.pid, upgrade_sock: /tmp/tollgate_upgrade.sock }}
listeners: [{{ address: "127.0.0.1:{http_port}" }}]
admin: {{ address: "127.0.0.1:{admin_port}" }}
access_log: {{ format: json, path: stdout }}
upstreams: {{ app: {{ backends: [{{ address: "127.0.0.1:{upstream.server_port}" }}] }} }}
routes: [{{ name: app, match: {{ path_prefix: /app }}, upstream: app, strip_prefix: true }}]
""")
    # The container's user must be able to read the mounted file.
    tmp_path.chmod(0o755)
    conf.chmod(0o644)
    name = f"tollgate-test-{os.getpid()}"
    podman("run", "-d", "--name", name, "--network", "host", "--read-only",
           "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "-v", f"{conf}:/etc/tollgate/tollgate.yaml:ro", image)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gateway in the container never became ready:\n"
                            + podman("logs", name, check=False).stderr)
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/app/hello?x=1", timeout=5) as r:
            assert r.status == 200
            assert r.read() == BODY
            assert r.headers["X-Seen-Path"] == "/hello?x=1"
            request_id = r.headers["X-Request-Id"]
            assert request_id
        # SIGTERM drains and exits 0 within grace_period + graceful_shutdown_timeout.
        start = time.monotonic()
        podman("stop", "-t", "20", name, timeout=60)
        took = time.monotonic() - start
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
        assert took < 10, f"stop took {took:.1f} s"
        logs = podman("logs", name).stdout
        line = next(json.loads(l) for l in logs.splitlines() if request_id in l)
        assert line["status"] == 200 and line["route"] == "app", line
    finally:
        podman("rm", "-f", name, check=False)
        upstream.shutdown()
