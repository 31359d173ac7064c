//! Shared harness for the integration tests: real upstreams on 127.0.0.1:0 ([`upstream`]), the
//! real `tollgate` binary ([`TestGateway`]) with its own pid file, upgrade socket and reserved
//! ports, and small helpers for requests and raw sockets.
#![allow(dead_code)]

pub mod dns;
pub mod echo;
pub mod redis;
pub mod tls;
pub mod upstream;
pub mod zookeeper;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[allow(unused_imports)]
pub use upstream::{Behavior, Received, Upstream, WsUpstream, pattern};

/// The built binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

/// A free loopback port (bound, read, released).
pub fn reserve_port() -> u16 {
    reserve_ports::<1>()[0]
}

/// `N` distinct free loopback ports: all are held until every one is read, so two calls cannot
/// hand out the same port (which sequential `reserve_port` calls can).
pub fn reserve_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// `tollgate -t -c FILE`: (exit code, stdout, stderr).
pub fn check_config(path: &Path) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("-t")
        .arg("-c")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running gateway process; SIGINT (then SIGKILL) on drop.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// Connections the readiness check made to the proxy listener (see [`TestGateway::settled`]).
    probes: usize,
}

/// Builder for the YAML a gateway runs: the harness writes `server`, `listeners` and `admin`;
/// the test supplies the rest (upstreams, routes, trusted_proxies, …).
pub struct GatewayConfig {
    body: String,
    server_extra: String,
    listener_extra: String,
    admin_extra: String,
    args: Vec<String>,
    program: Option<PathBuf>,
}

impl GatewayConfig {
    pub fn new(body: impl Into<String>) -> Self {
        GatewayConfig {
            body: body.into(),
            server_extra: String::new(),
            listener_extra: String::new(),
            admin_extra: String::new(),
            args: Vec::new(),
            program: None,
        }
    }

    /// Extra lines under `server:` (indented by the harness).
    pub fn server(mut self, lines: &str) -> Self {
        indent_into(&mut self.server_extra, "  ", lines);
        self
    }

    /// Extra lines under `admin:` (indented by the harness).
    pub fn admin(mut self, lines: &str) -> Self {
        indent_into(&mut self.admin_extra, "  ", lines);
        self
    }

    /// Extra keys of the (one) traffic listener (indented by the harness).
    pub fn listener(mut self, lines: &str) -> Self {
        indent_into(&mut self.listener_extra, "    ", lines);
        self
    }

    /// Run this binary instead of `tollgate` (e.g. an example that embeds the library).
    pub fn program(mut self, path: PathBuf) -> Self {
        self.program = Some(path);
        self
    }

    /// Extra command-line arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    pub fn start(self) -> TestGateway {
        TestGateway::start_with(self)
    }
}

fn indent_into(out: &mut String, indent: &str, lines: &str) {
    for l in lines.lines() {
        out.push_str(indent);
        out.push_str(l);
        out.push('\n');
    }
}

/// One upstream YAML entry: `name: {balance: .., backends: [...]}` plus extra keys.
pub fn upstream_yaml(
    name: &str,
    balance: &str,
    backends: &[(SocketAddr, u32)],
    extra: &str,
) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address: \"{a}\", weight: {w} }}"))
        .collect();
    format!(
        "  {name}:\n    balance: {balance}\n    backends: [{}]\n{extra}",
        list.join(", ")
    )
}

impl TestGateway {
    /// Start a gateway whose config is `body` plus the harness' server/listener/admin sections.
    pub fn start(body: &str) -> TestGateway {
        GatewayConfig::new(body).start()
    }

    fn start_with(cfg: GatewayConfig) -> TestGateway {
        for _ in 0..3 {
            if let Some(gw) = Self::try_start(&cfg) {
                return gw;
            }
        }
        panic!("the gateway did not start three times in a row");
    }

    fn try_start(cfg: &GatewayConfig) -> Option<TestGateway> {
        let dir = tempfile::tempdir().unwrap();
        let [port, admin_port] = reserve_ports::<2>();
        // Harness defaults, overridden key by key by the test's `server(..)` lines.
        let mut server = vec![
            "  threads: 2".to_string(),
            "  grace_period: 0s".to_string(),
            "  graceful_shutdown_timeout: 1s".to_string(),
            format!("  pid_file: {}/tollgate.pid", dir.path().display()),
            format!("  upgrade_sock: {}/upgrade.sock", dir.path().display()),
        ];
        for line in cfg.server_extra.lines() {
            let key = line.split(':').next().unwrap();
            server.retain(|l| l.split(':').next().unwrap() != key);
            server.push(line.to_string());
        }
        let yaml = format!(
            "server:\n{}\nlisteners:\n  - address: 127.0.0.1:{port}\n{listener}admin:\n  address: 127.0.0.1:{admin_port}\n{admin}{body}\n",
            server.join("\n"),
            listener = cfg.listener_extra,
            admin = cfg.admin_extra,
            body = cfg.body
        );
        let conf = dir.path().join("tollgate.yaml");
        std::fs::write(&conf, &yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let program = cfg.program.clone().unwrap_or_else(|| binary().into());
        let child = Command::new(program)
            .arg("-c")
            .arg(&conf)
            .args(&cfg.args)
            .env(
                "RUST_LOG",
                std::env::var("TOLLGATE_TEST_LOG").unwrap_or_else(|_| "warn,tollgate=info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut gw = TestGateway {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
            dir,
            child: Some(child),
            probes: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = gw.child.as_mut().unwrap().try_wait().unwrap() {
                assert_ne!(
                    status.code(),
                    Some(64),
                    "the test's configuration is invalid:\n{}",
                    gw.log()
                );
                eprintln!("gateway exited early ({status}):\n{}", gw.log());
                gw.child = None;
                return None; // most likely a port race: try again with new ports
            }
            if TcpStream::connect(gw.addr).is_ok() {
                gw.probes += 1;
                if TcpStream::connect(gw.admin).is_ok() {
                    let pid = gw.pid();
                    if listens(pid, port) && listens(pid, admin_port) {
                        return Some(gw);
                    }
                    // Another test's gateway holds a port this one was given: start again.
                    eprintln!("port {port} or {admin_port} is not this gateway's: retrying");
                    drop(gw);
                    return None;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the gateway did not listen within 15 s:\n{}", gw.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.yaml")
    }

    /// What the gateway wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    /// Wait for the process to exit; its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident memory (VmHWM) of the gateway process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Current resident memory (VmRSS) of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

/// Whether process `pid` holds the socket listening on loopback `port` (from `/proc`: its
/// descriptors' socket inodes against the listening sockets' in `/proc/net/tcp`).
fn listens(pid: Pid, port: u16) -> bool {
    let Ok(tcp) = std::fs::read_to_string("/proc/net/tcp") else {
        return true; // not Linux: nothing to check against
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|t| inodes.iter().any(|i| t.to_str() == Some(i.as_str())))
    })
}

fn proc_status_kib(pid: Pid, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP client that never uses a proxy from the environment.
/// GET `url`: (status, body text).
pub async fn get(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A client speaking HTTP/2 with prior knowledge (for h2c listeners).
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One complete response on a kept-alive connection (a `Content-Length` body).
pub fn read_response(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("a response");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// Send raw bytes on a new connection and read until the server closes or `timeout` passes.
pub fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

/// The JSON error body of a response.
pub fn error_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// Send `n` GETs to `url` from `concurrency` workers (constant concurrency); the statuses, in
/// completion order. Transport errors count as status 0.
pub async fn statuses(url: &str, n: usize, concurrency: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let c = client();
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (c, next, out, url) = (c.clone(), next.clone(), out.clone(), url.to_string());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let s = match c.get(&url).send().await {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    out.lock().unwrap().push(s);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    Arc::try_unwrap(out).unwrap().into_inner().unwrap()
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes; whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The path of a built example. `cargo test` builds examples in test mode only, without the
/// plain binary this needs, so a missing one is built here with the cargo running the tests.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let path = target.join("examples").join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --example");
        assert!(status.success(), "cargo build --example {name} failed");
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

impl TestGateway {
    /// The admin listener's `/metrics` text.
    /// Wait (5 s at most) until the readiness check's connections have been admitted and closed.
    /// The gateway admits a connection in the task it spawns for it, and tasks may run out of
    /// order: a probe still waiting could otherwise be counted against a connection cap by a
    /// test that opened its own connections meanwhile.
    pub async fn settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics().await;
            let admitted = metric(&m, "tollgate_downstream_connections_total");
            let open = metric(&m, "tollgate_downstream_connections");
            if admitted >= self.probes as f64 && open == 0.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "readiness probes not settled: {admitted} admitted of {}, {open} open",
                self.probes
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The value of the series `name` (with its labels, as exposed) in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}
