//! TLS termination, HTTP/2 and upstream TLS through the real gateway: certificate choice by SNI
//! (exact, wildcard, default, reject), TLS versions, ALPN h2 next to http/1.1, many streams on
//! one connection and the advertised stream limit, h2c, X-Forwarded-Proto and `:authority`
//! routing, the h2 idle timeout, large bodies over h2, upstream verification, mTLS, failover
//! and HTTP health checks over TLS, the discovery name as SNI, upstream h2 stream caps and
//! reuse, gRPC trailers end to end, `redirect` with `plain_only`, certificate rotation on reload
//! (POST /reload and SIGHUP) with connections kept open, and located configuration errors.
//! Every certificate is generated at test time (`common::tls`); nothing leaves loopback.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::dns::DnsServer;
use common::tls::{
    Ca, ClientAuth, ClientOpts, GRPC_REPLY, H2Upstream, Leaf, TlsUpstream, grpc_call, h2_get,
    h2_handshake_driven, h2_tls, h2c, https_builder, https_client, served_cert, tls_connect,
};
use common::{
    Behavior, GatewayConfig, TestGateway, Upstream, WsUpstream, check_config, client, error_json,
    metric, pattern,
};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- helpers

/// A test CA and a temp dir for the PEM files it signs.
struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            ca: Ca::new("tollgate test CA"),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A leaf for `names`, written as `STEM.pem` / `STEM.key`.
    fn cert(&self, stem: &str, names: &[&str]) -> (Leaf, PathBuf, PathBuf) {
        let leaf = self.ca.leaf(names);
        let (c, k) = leaf.write(self.dir.path(), stem);
        (leaf, c, k)
    }

    fn ca_file(&self) -> PathBuf {
        self.ca.write(self.dir.path(), "ca")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// One `certificates:` entry: cert, key, explicit names.
type CertEntry<'a> = (&'a Path, &'a Path, Option<&'a [&'a str]>);

/// A listener's `tls:` block (for `GatewayConfig::listener`), plus extra keys under `tls:`.
fn tls_block(certs: &[CertEntry<'_>], extra: &str) -> String {
    let mut s = String::from("tls:\n  certificates:\n");
    for (cert, key, names) in certs {
        let names = names
            .map(|n| {
                let quoted: Vec<String> = n.iter().map(|x| format!("\"{x}\"")).collect();
                format!(", names: [{}]", quoted.join(", "))
            })
            .unwrap_or_default();
        s.push_str(&format!(
            "    - {{ cert: \"{}\", key: \"{}\"{names} }}\n",
            cert.display(),
            key.display()
        ));
    }
    for l in extra.lines() {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Everything to one upstream.
fn one_route(up: SocketAddr) -> String {
    format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{up}\" }}]\nroutes:\n  - {{ name: all, upstream: u }}\n"
    )
}

/// A TLS gateway with one certificate for `a.test` routing everything to `up`.
fn tls_gateway(pki: &Pki, up: SocketAddr, tls_extra: &str) -> (TestGateway, Leaf) {
    let (leaf, c, k) = pki.cert("a", &["a.test"]);
    let gw = GatewayConfig::new(one_route(up))
        .listener(&tls_block(&[(&c, &k, None)], tls_extra))
        .start();
    (gw, leaf)
}

fn https(gw: &TestGateway, host: &str, path: &str) -> String {
    format!("https://{host}:{}{path}", gw.addr.port())
}

fn head_text(r: &common::Received) -> String {
    String::from_utf8_lossy(&r.head).into_owned()
}

/// POST /reload on the admin port: (status, body).
async fn reload(gw: &TestGateway) -> (u16, String) {
    let r = client()
        .post(format!("http://{}/reload", gw.admin))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Sample `up.active()` every 2 ms until `done`; the largest value seen. Bounded: at most 30 s.
fn sample_peak(
    active: impl Fn() -> usize + Send + 'static,
    done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..15_000 {
            peak = peak.max(active());
            if done.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        peak
    })
}

// ---------------------------------------------------------------- harness self-tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_tls_upstream_answers_rustls_clients_and_records_client_certs() {
    let pki = Pki::new();
    let client_ca = Ca::new("client CA");
    let server = pki.ca.leaf(&["up.test", "127.0.0.1"]);
    let id = client_ca.leaf(&["client.test"]);

    // Optional client auth: a request without and one with a client certificate both answer.
    let up = TlsUpstream::start(&server, ClientAuth::Optional(&client_ca)).await;
    let opts = ClientOpts::default().verify(&pki.ca);
    let mut c = tls_connect(up.addr, Some("up.test"), &opts).await.unwrap();
    assert_eq!(c.leaf(), server.cert_der);
    let r = c.get("up.test", "/plain").await.unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
    let r = c.get("up.test", "/again").await.unwrap();
    assert_eq!(r.status, 200, "keep-alive through the TLS pipe");
    let with_id = ClientOpts {
        identity: Some(id.clone()),
        ..opts.clone()
    };
    let mut c2 = tls_connect(up.addr, None, &with_id).await.unwrap();
    assert_eq!(c2.get("127.0.0.1", "/mtls").await.unwrap().status, 200);
    let hs = up.handshakes();
    assert_eq!(hs.len(), 2);
    assert_eq!(hs[0].sni.as_deref(), Some("up.test"));
    assert_eq!(hs[0].client_cert, None);
    assert_eq!(hs[1].sni, None, "connecting by IP sends no SNI");
    assert_eq!(hs[1].client_cert.as_deref(), Some(id.cert_der.as_slice()));
    assert_eq!(up.client_certs_seen(), 1);
    let paths: Vec<String> = up.plain.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/plain", "/again", "/mtls"]);

    // Required client auth: no certificate, or one from another CA, gets no answer.
    let strict = TlsUpstream::start(&server, ClientAuth::Required(&client_ca)).await;
    for opts in [
        opts.clone(),
        ClientOpts {
            identity: Some(pki.ca.leaf(&["stranger.test"])),
            ..opts.clone()
        },
    ] {
        let res = match tls_connect(strict.addr, Some("up.test"), &opts).await {
            Ok(mut c) => c.get("up.test", "/").await.map(|r| r.status),
            Err(e) => Err(e),
        };
        assert!(
            res.is_err(),
            "a client without a valid certificate got {res:?}"
        );
    }
    let mut ok = tls_connect(strict.addr, Some("up.test"), &with_id)
        .await
        .unwrap();
    assert_eq!(ok.get("up.test", "/").await.unwrap().status, 200);
    assert_eq!(strict.plain.count(), 1);
    assert_eq!(strict.client_certs_seen(), 1);

    // Verification against the wrong CA fails on the client.
    let other = Ca::new("other CA");
    let res = tls_connect(
        up.addr,
        Some("up.test"),
        &ClientOpts::default().verify(&other),
    )
    .await;
    assert!(res.is_err(), "a certificate from another CA was accepted");
    let res = tls_connect(up.addr, Some("wrong.test"), &opts).await;
    assert!(res.is_err(), "a certificate for another name was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_h2_upstream_answers_h2c_and_tls_with_trailers() {
    let pki = Pki::new();
    let h2c_up = H2Upstream::h2c().await;
    let send = h2c(h2c_up.addr).await.unwrap();
    let r = grpc_call(&send, "http://svc.test/pkg.Svc/Call")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/grpc");
    assert_eq!(r.body, GRPC_REPLY);
    let t = r.trailers.expect("trailers");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "ok");
    let seen = h2c_up.last();
    assert_eq!(seen.header("te"), Some("trailers"));
    assert_eq!(seen.authority.as_deref(), Some("svc.test"));
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/pkg.Svc/Call")
    );
    assert_eq!(seen.body, b"\0\0\0\0\x05world");
    assert_eq!(seen.version, http::Version::HTTP_2);

    let leaf = pki.ca.leaf(&["up.test", "127.0.0.1"]);
    let tls_up = H2Upstream::tls(&leaf).await;
    let send = h2_tls(tls_up.addr, "up.test", &pki.ca).await.unwrap();
    let r = h2_get(&send, "https://up.test/x").await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.trailers.is_some());
    assert_eq!(
        tls_up.handshakes()[0].alpn.as_deref(),
        Some(b"h2".as_slice())
    );
    // ALPN h2 only: a client offering only http/1.1 is refused.
    let res = tls_connect(
        tls_up.addr,
        Some("up.test"),
        &ClientOpts::default().alpn(&[b"http/1.1"]),
    )
    .await;
    let res = match res {
        Ok(mut c) => c.get("up.test", "/").await.map(|r| r.status),
        Err(e) => Err(e),
    };
    assert!(res.is_err(), "an http/1.1-only client got {res:?}");
}

/// `openssl s_client` against a rustls server: TLS 1.2 connects, TLS 1.1 is refused by the
/// server (so the gateway test below can tell a refusal from a client that never tried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_openssl_tls11_probe_sees_a_rustls_refusal() {
    let pki = Pki::new();
    let up = TlsUpstream::start(&pki.ca.leaf(&["up.test"]), ClientAuth::None).await;
    let port = up.addr.port();
    let (ok12, out12) = tokio::task::spawn_blocking(move || openssl(port, "-tls1_2"))
        .await
        .unwrap();
    assert!(ok12 && out12.contains("TLSv1.2"), "{out12}");
    let (ok11, out11) = tokio::task::spawn_blocking(move || openssl(port, "-tls1_1"))
        .await
        .unwrap();
    assert!(!ok11, "TLS 1.1 was accepted:\n{out11}");
    assert!(tls11_refused_by_server(&out11), "{out11}");
}

/// Run `openssl s_client -connect 127.0.0.1:PORT VERSION_FLAG` (security level 0 so OpenSSL 3
/// is willing to offer TLS 1.1 at all); (handshake succeeded, combined output).
fn openssl(port: u16, version_flag: &str) -> (bool, String) {
    let bin = ["/usr/bin/openssl", "/usr/local/bin/openssl"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("openssl is needed for the TLS 1.1 check (Debian package openssl; `make test` installs it)");
    let out = Command::new("timeout")
        .args(["10", bin, "s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            version_flag,
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-servername",
            "a.test",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// OpenSSL did send a TLS 1.1 (or 1.0) ClientHello ("… and written N bytes", N > 0) and the server
/// answered it with an alert (rustls sends handshake_failure, alert 40; others send
/// protocol_version, 70) rather than a ServerHello.
fn tls11_refused_by_server(out: &str) -> bool {
    let o = out.to_ascii_lowercase();
    let written = o
        .split("and written ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    written > 0 && (o.contains("ssl alert number") || o.contains("alert protocol version"))
}

// ---------------------------------------------------------------- 1. certificate selection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_exact_name_then_a_wildcard_then_the_first_certificate() {
    let pki = Pki::new();
    let (default, dc, dk) = pki.cert("default", &["default.test"]);
    let (a, ac, ak) = pki.cert("a", &["a.test"]);
    let (wild, wc, wk) = pki.cert("wild", &["*.wild.test"]);
    // Explicit `names:` serve a certificate for names it does not list itself.
    let (named, nc, nk) = pki.cert("named", &["explicit.test"]);
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .listener(&tls_block(
            &[
                (&dc, &dk, None),
                (&ac, &ak, None),
                (&wc, &wk, None),
                (&nc, &nk, Some(&["named.test"])),
            ],
            "",
        ))
        .start();
    let cases: [(Option<&str>, &Leaf, &str); 10] = [
        (Some("a.test"), &a, "exact"),
        (Some("A.Test"), &a, "exact, case-insensitive"),
        (Some("x.wild.test"), &wild, "wildcard"),
        (Some("y.wild.test"), &wild, "wildcard"),
        (
            Some("deep.x.wild.test"),
            &default,
            "default: a wildcard covers one label only",
        ),
        (
            Some("wild.test"),
            &default,
            "default: a wildcard does not cover its parent",
        ),
        (Some("named.test"), &named, "explicit names"),
        (Some("other.test"), &default, "default for an unknown name"),
        (
            Some("default.test"),
            &default,
            "exact (the default's own name)",
        ),
        (None, &default, "default without SNI"),
    ];
    for (sni, want, what) in cases {
        let opts = ClientOpts::default().alpn(&[b"http/1.1"]);
        let mut conn = tls_connect(gw.addr, sni, &opts)
            .await
            .unwrap_or_else(|e| panic!("SNI {sni:?}: handshake failed: {e}\n{}", gw.log()));
        assert!(
            conn.leaf() == want.cert_der,
            "SNI {sni:?}: expected the {what} certificate (serial {}), got another one",
            want.serial
        );
        let r = conn
            .get(sni.unwrap_or("127.0.0.1"), "/sni")
            .await
            .unwrap_or_else(|e| panic!("SNI {sni:?}: request failed: {e}"));
        assert_eq!(r.status, 200, "SNI {sni:?}");
        assert_eq!(r.body, b"ok");
    }
    assert_eq!(up.count(), cases.len());

    // A verifying client (reqwest, SNI from the URL) for every name a certificate covers.
    let names = ["a.test", "x.wild.test", "default.test"];
    let c = https_client(&pki.ca, &names);
    for name in names {
        let r = c
            .get(https(&gw, name, "/verified"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(up.count(), cases.len() + names.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_reject_fails_the_handshake_for_unknown_names_and_no_sni() {
    let pki = Pki::new();
    let (a, ac, ak) = pki.cert("a", &["a.test"]);
    let (wild, wc, wk) = pki.cert("wild", &["*.wild.test"]);
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .listener(&tls_block(
            &[(&ac, &ak, None), (&wc, &wk, None)],
            "unknown_sni: reject",
        ))
        .start();
    for sni in [Some("other.test"), Some("deep.x.wild.test"), None] {
        let res = tls_connect(gw.addr, sni, &ClientOpts::default()).await;
        let res = match res {
            Ok(mut c) => c.get("other.test", "/").await.map(|r| r.status),
            Err(e) => Err(e),
        };
        assert!(res.is_err(), "SNI {sni:?} was served with reject: {res:?}");
    }
    assert_eq!(up.count(), 0);
    for (sni, want) in [("a.test", &a), ("x.wild.test", &wild)] {
        let got = served_cert(gw.addr, Some(sni)).await.unwrap();
        assert!(got == want.cert_der, "SNI {sni} got the wrong certificate");
    }
    let c = https_client(&pki.ca, &["a.test"]);
    assert_eq!(
        c.get(https(&gw, "a.test", "/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

// ---------------------------------------------------------------- 2. protocol versions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_and_tls12_are_served_and_tls11_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let (gw, leaf) = tls_gateway(&pki, up.addr, "");
    for (opts, want) in [
        (
            ClientOpts::default().only_tls13(),
            rustls::ProtocolVersion::TLSv1_3,
        ),
        (
            ClientOpts::default().only_tls12(),
            rustls::ProtocolVersion::TLSv1_2,
        ),
    ] {
        let opts = opts.verify(&pki.ca).alpn(&[b"http/1.1"]);
        let mut c = tls_connect(gw.addr, Some("a.test"), &opts)
            .await
            .unwrap_or_else(|e| panic!("{want:?}: {e}"));
        assert_eq!(c.version(), Some(want));
        assert!(c.leaf() == leaf.cert_der);
        let r = c.get("a.test", "/v").await.unwrap();
        assert_eq!(r.status, 200, "{want:?}");
    }
    assert_eq!(up.count(), 2);

    // Also with reqwest's own version limits.
    let r = https_builder(&pki.ca, &["a.test"])
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap()
        .get(https(&gw, "a.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let port = gw.addr.port();
    let (ok12, out12) = tokio::task::spawn_blocking(move || openssl(port, "-tls1_2"))
        .await
        .unwrap();
    assert!(
        ok12 && out12.contains("TLSv1.2"),
        "openssl -tls1_2 failed:\n{out12}"
    );
    for flag in ["-tls1_1", "-tls1"] {
        let (ok, out) = tokio::task::spawn_blocking(move || openssl(port, flag))
            .await
            .unwrap();
        assert!(!ok, "openssl {flag} was accepted:\n{out}");
        assert!(
            tls11_refused_by_server(&out),
            "openssl {flag}: expected the server to refuse the ClientHello with an alert:\n{out}"
        );
    }
}

// ---------------------------------------------------------------- 3. ALPN

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_gives_h2_and_http11_on_the_same_listener() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let (gw, _) = tls_gateway(&pki, up.addr, "");
    let r = https_client(&pki.ca, &["a.test"])
        .get(https(&gw, "a.test", "/h2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = https_builder(&pki.ca, &["a.test"])
        .http1_only()
        .build()
        .unwrap()
        .get(https(&gw, "a.test", "/h1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    let c = tls_connect(
        gw.addr,
        Some("a.test"),
        &ClientOpts::default().alpn(&[b"h2", b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(c.alpn().as_deref(), Some(b"h2".as_slice()));
    let mut c = tls_connect(
        gw.addr,
        Some("a.test"),
        &ClientOpts::default().alpn(&[b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(c.alpn().as_deref(), Some(b"http/1.1".as_slice()));
    assert_eq!(c.get("a.test", "/raw").await.unwrap().status, 200);
    // No ALPN at all: HTTP/1.1.
    let mut c = tls_connect(gw.addr, Some("a.test"), &ClientOpts::default())
        .await
        .unwrap();
    assert_eq!(c.alpn(), None);
    assert_eq!(c.get("a.test", "/none").await.unwrap().status, 200);
    let paths: Vec<String> = up.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/h2", "/h1", "/raw", "/none"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_false_gives_http11_to_h2_capable_clients() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let (gw, _) = tls_gateway(&pki, up.addr, "http2: false");
    let r = https_client(&pki.ca, &["a.test"])
        .get(https(&gw, "a.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    let c = tls_connect(
        gw.addr,
        Some("a.test"),
        &ClientOpts::default().alpn(&[b"h2", b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_ne!(
        c.alpn().as_deref(),
        Some(b"h2".as_slice()),
        "h2 was negotiated"
    );
}

// ---------------------------------------------------------------- 4. streams on one connection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_requests_multiplex_on_one_h2_connection() {
    const TOTAL: usize = 300;
    const IN_FLIGHT: usize = 200;
    let pki = Pki::new();
    let up = Arc::new(
        Upstream::with(Behavior {
            delay: Duration::from_millis(20),
            ..Behavior::default()
        })
        .await,
    );
    let (gw, _) = tls_gateway(&pki, up.addr, "");
    let send = h2_tls(gw.addr, "a.test", &pki.ca).await.unwrap();
    assert_eq!(
        h2_get(&send, "https://a.test/warm").await.unwrap().status,
        200
    );
    assert_eq!(
        send.current_max_send_streams(),
        100,
        "the default SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    let done = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    let peak = sample_peak(move || u.active(), done.clone());
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let ok = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..TOTAL)
        .map(|i| {
            let (send, permits, ok) = (send.clone(), permits.clone(), ok.clone());
            tokio::spawn(async move {
                let _p = permits.acquire().await.unwrap();
                match h2_get(&send, &format!("https://a.test/s/{i}")).await {
                    Ok(r) if r.status == 200 && r.body == b"ok" => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => eprintln!("stream {i}: {} {:?}", r.status, r.body),
                    Err(e) => eprintln!("stream {i}: {e}"),
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let peak = peak.await.unwrap();
    let took = started.elapsed();
    assert_eq!(
        ok.load(Ordering::SeqCst),
        TOTAL,
        "not every stream got 200 ok"
    );
    assert_eq!(up.count(), TOTAL + 1);
    let paths: HashSet<String> = up.received().iter().map(|r| r.path.clone()).collect();
    for i in 0..TOTAL {
        assert!(
            paths.contains(&format!("/s/{i}")),
            "/s/{i} never reached the upstream"
        );
    }
    // All on one client connection: anything above 1 in flight at the upstream is multiplexing.
    // The gateway allows 100 streams at once, so with 20 ms per answer it should get close.
    assert!(
        (10..=100).contains(&peak),
        "peak concurrency at the upstream {peak} (expected 10..=100); took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_streams_is_advertised_in_settings() {
    let pki = Pki::new();
    let up = Arc::new(
        Upstream::with(Behavior {
            delay: Duration::from_millis(50),
            ..Behavior::default()
        })
        .await,
    );
    let (_, c, k) = pki.cert("a", &["a.test"]);
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("http2: { max_concurrent_streams: 10 }")
        .listener(&tls_block(&[(&c, &k, None)], ""))
        .start();
    let send = h2_tls(gw.addr, "a.test", &pki.ca).await.unwrap();
    assert_eq!(
        h2_get(&send, "https://a.test/warm").await.unwrap().status,
        200
    );
    assert_eq!(send.current_max_send_streams(), 10);
    let done = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    let peak = sample_peak(move || u.active(), done.clone());
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let send = send.clone();
            tokio::spawn(async move { h2_get(&send, &format!("https://a.test/c/{i}")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    done.store(true, Ordering::SeqCst);
    let peak = peak.await.unwrap();
    assert!(
        peak <= 10,
        "{peak} requests in flight on a 10-stream connection"
    );
    assert_eq!(up.count(), 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_idle_timeout_closes_idle_connections_but_not_busy_ones() {
    let pki = Pki::new();
    let up = Upstream::with(Behavior {
        delay: Duration::from_millis(1500),
        ..Behavior::default()
    })
    .await;
    let (_, c, k) = pki.cert("a", &["a.test"]);
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("http2: { idle_timeout: 1s }")
        .listener(&tls_block(&[(&c, &k, None)], ""))
        .start();
    let conn = tls_connect(
        gw.addr,
        Some("a.test"),
        &ClientOpts::default().verify(&pki.ca).alpn(&[b"h2"]),
    )
    .await
    .unwrap();
    assert_eq!(conn.alpn().as_deref(), Some(b"h2".as_slice()));
    let (send, driver) = h2_handshake_driven(conn.stream).await.unwrap();
    // A stream that outlives the idle timeout is not cut.
    let r = h2_get(&send, "https://a.test/slow").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ok");
    let idle_since = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(6), driver).await;
    let after = idle_since.elapsed();
    assert!(
        closed.is_ok(),
        "the idle h2 connection was still open after 6 s"
    );
    assert!(
        after >= Duration::from_millis(500),
        "closed {after:?} after the last stream, before the 1 s idle timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_cross_h2_both_ways_intact() {
    const LEN: usize = 8 << 20;
    let pki = Pki::new();
    let sink = Upstream::start().await;
    let source = Upstream::with(Behavior {
        generated_len: Some(LEN as u64),
        ..Behavior::default()
    })
    .await;
    let (_, c, k) = pki.cert("a", &["a.test"]);
    let gw = GatewayConfig::new(format!(
        "upstreams:\n  sink:\n    backends: [{{ address: \"{}\" }}]\n  source:\n    backends: [{{ address: \"{}\" }}]\nroutes:\n  - {{ name: up, upstream: sink, match: {{ path_prefix: /up }} }}\n  - {{ name: down, upstream: source, match: {{ path_prefix: /down }} }}\n",
        sink.addr, source.addr
    ))
    .listener(&tls_block(&[(&c, &k, None)], ""))
    .start();
    let c = https_client(&pki.ca, &["a.test"]);
    let body = pattern(0, LEN);
    let want = Sha256::digest(&body).to_vec();
    let r = c
        .post(https(&gw, "a.test", "/up"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen = sink.last();
    assert_eq!(seen.body_len, LEN as u64);
    assert!(seen.body_sha256 == want, "the upload arrived altered");
    let r = c.get(https(&gw, "a.test", "/down")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let got = r.bytes().await.unwrap();
    assert_eq!(got.len(), LEN);
    assert!(
        Sha256::digest(&got).to_vec() == want,
        "the download arrived altered"
    );
}

// ---------------------------------------------------------------- 5. h2c

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_listener_takes_prior_knowledge_and_http11_and_others_refuse_it() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .listener("h2c: true")
        .start();
    let pk = common::h2c_client();
    let r = pk.get(gw.url("/h2c")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = client().get(gw.url("/h1")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    // The h2 crate client too (a plain HTTP/2 connection with several streams).
    let send = h2c(gw.addr).await.unwrap();
    for i in 0..3 {
        let r = h2_get(&send, &format!("http://h2c.test/raw/{i}"))
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
    }
    assert_eq!(up.count(), 5);

    let plain = GatewayConfig::new(one_route(up.addr)).start();
    let res = pk.get(plain.url("/nope")).send().await;
    assert!(
        res.is_err(),
        "prior knowledge worked without h2c: {:?}",
        res.map(|r| r.version())
    );
    assert_eq!(
        client()
            .get(plain.url("/h1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        up.count(),
        6,
        "the prior-knowledge request reached the upstream"
    );
}

// ---------------------------------------------------------------- 6. forwarding and routing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_tls_leaves_pingora_and_crosses_intact() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pki = Pki::new();
    let ws = WsUpstream::start().await;
    let (gw, _) = tls_gateway(&pki, ws.addr, "");
    let conn = tls_connect(
        gw.addr,
        Some("a.test"),
        &ClientOpts::default().alpn(&[b"http/1.1"]),
    )
    .await
    .unwrap();
    let (mut socket, resp) = tokio_tungstenite::client_async("wss://a.test/chat", conn.stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    // The client's TLS session is the tunnel's: messages larger than a TLS record both ways.
    for size in [5, 40_000, 200_000] {
        let blob = pattern(size as u64, size);
        socket.send(Message::Binary(blob.clone())).await.unwrap();
        let echo = socket.next().await.unwrap();
        assert_eq!(
            echo.unwrap_or_else(|e| panic!("{size}: {e}\n{}", gw.log())),
            Message::Binary(blob)
        );
    }
    assert_eq!(metric(&gw.metrics().await, "tollgate_tunnels_open"), 1.0);
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_proto_is_https_over_tls_and_http_on_plain() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let (gw, _) = tls_gateway(&pki, up.addr, "");
    let plain = GatewayConfig::new(one_route(up.addr)).start();
    // h2 and http/1.1 over TLS, each trying to spoof the header (the peer is not trusted).
    for builder in [
        https_builder(&pki.ca, &["a.test"]),
        https_builder(&pki.ca, &["a.test"]).http1_only(),
    ] {
        let r = builder
            .build()
            .unwrap()
            .get(https(&gw, "a.test", "/xfp"))
            .header("x-forwarded-proto", "http")
            .send()
            .await
            .unwrap();
        let version = r.version();
        assert_eq!(r.status(), 200);
        let seen = up.last();
        assert_eq!(
            seen.header_all("x-forwarded-proto"),
            ["https"],
            "over TLS ({version:?}):\n{}",
            head_text(&seen)
        );
    }
    let r = client()
        .get(plain.url("/xfp"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.last();
    assert_eq!(
        seen.header_all("x-forwarded-proto"),
        ["http"],
        "{}",
        head_text(&seen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_route_by_authority_and_the_h1_upstream_gets_it_as_host() {
    let pki = Pki::new();
    let a = Upstream::start().await;
    let other = Upstream::start().await;
    let (_, c, k) = pki.cert("a", &["a.test", "b.test"]);
    let gw = GatewayConfig::new(format!(
        "upstreams:\n  a:\n    backends: [{{ address: \"{}\" }}]\n  other:\n    backends: [{{ address: \"{}\" }}]\nroutes:\n  - {{ name: a, upstream: a, match: {{ hosts: [a.test] }} }}\n  - {{ name: other, upstream: other }}\n",
        a.addr, other.addr
    ))
    .listener(&tls_block(&[(&c, &k, None)], ""))
    .start();
    let send = h2_tls(gw.addr, "a.test", &pki.ca).await.unwrap();
    let r = h2_get(&send, "https://a.test/p?q=1").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        (a.count(), other.count()),
        (1, 0),
        "not routed by :authority"
    );
    let seen = a.last();
    let head = head_text(&seen);
    assert!(
        head.starts_with("GET /p?q=1 HTTP/1.1\r\n"),
        "origin-form request line:\n{head}"
    );
    assert_eq!(seen.header_all("host"), ["a.test"], "{head}");
    // The same connection (SNI a.test), another authority: routing follows :authority, not SNI.
    let r = h2_get(&send, "https://b.test/p").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!((a.count(), other.count()), (1, 1));
    assert_eq!(other.last().header_all("host"), ["b.test"]);
    // A path the gateway normalises keeps its authority.
    let r = h2_get(&send, "https://a.test/x/../n").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(a.count(), 2, "a normalised path lost its authority");
    assert_eq!(
        a.last().header_all("host"),
        ["a.test"],
        "{}",
        head_text(&a.last())
    );
    // reqwest over h2 (authority with the port).
    let r = https_client(&pki.ca, &["a.test"])
        .get(https(&gw, "a.test", "/r"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(a.count(), 3);
    let host = a.last().header("host").unwrap_or_default().to_string();
    assert_eq!(host, format!("a.test:{}", gw.addr.port()));
    // h2c routes by :authority as well.
    let h2c_gw = GatewayConfig::new(format!(
        "upstreams:\n  a:\n    backends: [{{ address: \"{}\" }}]\n  other:\n    backends: [{{ address: \"{}\" }}]\nroutes:\n  - {{ name: a, upstream: a, match: {{ hosts: [a.test] }} }}\n  - {{ name: other, upstream: other }}\n",
        a.addr, other.addr
    ))
    .listener("h2c: true")
    .start();
    let send = h2c(h2c_gw.addr).await.unwrap();
    assert_eq!(h2_get(&send, "http://a.test/c").await.unwrap().status, 200);
    assert_eq!(a.count(), 4);
    assert_eq!(a.last().header_all("host"), ["a.test"]);
}

// ---------------------------------------------------------------- 7. upstream TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verifies_the_chain_and_the_name() {
    let pki = Pki::new();
    let wrong_ca = Ca::new("wrong CA");
    let ca_file = pki.ca_file();
    let wrong_file = wrong_ca.write(pki.dir.path(), "wrong-ca");
    let server = pki.ca.leaf(&["up.test", "127.0.0.1"]);
    let up = TlsUpstream::start(&server, ClientAuth::None).await;
    // A backend that does not speak TLS: it answers any bytes with a plain HTTP response.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    let plain_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = plain.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let (ca, wrong, addr) = (ca_file.display(), wrong_file.display(), up.addr);
    let upstream = |name: &str, tls: &str| {
        format!("  {name}:\n    backends: [{{ address: \"{addr}\" }}]\n    tls: {{ {tls} }}\n")
    };
    let mut body = String::from("upstreams:\n");
    body.push_str(&format!(
        "  plaintext:\n    backends: [{{ address: \"{plain_addr}\" }}]\n    tls: {{ ca_file: \"{ca}\", sni: up.test }}\n"
    ));
    for (name, tls) in [
        ("good", format!("ca_file: \"{ca}\", sni: up.test")),
        ("ipsni", format!("ca_file: \"{ca}\"")),
        ("wrongca", format!("ca_file: \"{wrong}\", sni: up.test")),
        (
            "noverify",
            format!("ca_file: \"{wrong}\", sni: up.test, verify: false"),
        ),
        ("wrongsni", format!("ca_file: \"{ca}\", sni: wrong.test")),
        (
            "nohostcheck",
            format!("ca_file: \"{ca}\", sni: wrong.test, verify_hostname: false"),
        ),
        ("sysroots", "sni: up.test".to_string()),
    ] {
        body.push_str(&upstream(name, &tls));
    }
    body.push_str("routes:\n");
    for name in [
        "good",
        "ipsni",
        "wrongca",
        "noverify",
        "wrongsni",
        "nohostcheck",
        "sysroots",
        "plaintext",
    ] {
        body.push_str(&format!(
            "  - {{ name: {name}, upstream: {name}, match: {{ path_prefix: /{name}/ }} }}\n"
        ));
    }
    let gw = TestGateway::start(&body);
    let c = client();
    // Each case: (path, status, whether the upstream must have seen it). `good` goes first so a
    // pooled connection exists when the wrong-CA upstream (same address, same SNI) is tried.
    for (name, want) in [
        ("good", 200),
        ("wrongca", 502),
        ("ipsni", 200),
        ("noverify", 200),
        ("wrongsni", 502),
        ("nohostcheck", 200),
        ("sysroots", 502),
        ("plaintext", 502),
        ("good", 200),
    ] {
        let before = up.plain.count();
        let r = c.get(gw.url(&format!("/{name}/x"))).send().await.unwrap();
        let status = r.status().as_u16();
        let ctype = r.headers().get("content-type").cloned();
        let text = r.text().await.unwrap();
        assert_eq!(status, want, "/{name}/: {text}\n{}", gw.log());
        if want == 200 {
            assert_eq!(text, "ok");
            assert_eq!(
                up.plain.count(),
                before + 1,
                "/{name}/ did not reach the upstream"
            );
            assert_eq!(up.plain.last().path, format!("/{name}/x"));
        } else {
            assert_eq!(up.plain.count(), before, "/{name}/ reached the upstream");
            assert_eq!(
                ctype.as_ref().map(|v| v.to_str().unwrap()),
                Some("application/json")
            );
            let e = error_json(&text);
            assert!(e["error"].is_string(), "{text}");
            assert!(e["request_id"].is_string(), "{text}");
        }
    }
    // The gateway sent the configured SNI, and none when verifying the backend's IP.
    let snis: Vec<Option<String>> = up
        .handshakes()
        .iter()
        .filter(|h| h.ok)
        .map(|h| h.sni.clone())
        .collect();
    assert!(snis.contains(&Some("up.test".to_string())), "{snis:?}");
    assert!(
        snis.contains(&None),
        "no handshake without SNI (ipsni): {snis:?}"
    );
    plain_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_tls_failure_is_a_connect_error_that_fails_over() {
    let pki = Pki::new();
    let ca_file = pki.ca_file();
    let good = TlsUpstream::start(&pki.ca.leaf(&["up.test"]), ClientAuth::None).await;
    let stranger = Ca::new("stranger CA");
    let bad = TlsUpstream::start(&stranger.leaf(&["up.test"]), ClientAuth::None).await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{}\" }}, {{ address: \"{}\" }}]\n    tls: {{ ca_file: \"{}\", sni: up.test }}\n    retries: {{ attempts: 2, on: [connect_error], budget_percent: 100 }}\nroutes: [{{ name: all, upstream: u }}]\n",
        bad.addr,
        good.addr,
        ca_file.display()
    ));
    let c = client();
    for i in 0..10 {
        let r = c.get(gw.url(&format!("/f/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}: {}", gw.log());
    }
    assert_eq!(good.plain.count(), 10);
    assert_eq!(bad.plain.count(), 0);
    assert!(
        !bad.handshakes().is_empty(),
        "the bad backend was never tried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_on_a_tls_upstream_use_its_trust_and_client_certificate() {
    let pki = Pki::new();
    let ca_file = pki.ca_file();
    let client_ca = Ca::new("client CA");
    let id = client_ca.leaf(&["gateway.test"]);
    let (id_cert, id_key) = id.write(pki.dir.path(), "client");
    let good =
        TlsUpstream::start(&pki.ca.leaf(&["up.test"]), ClientAuth::Required(&client_ca)).await;
    let stranger = Ca::new("stranger CA");
    let bad = TlsUpstream::start(
        &stranger.leaf(&["up.test"]),
        ClientAuth::Required(&client_ca),
    )
    .await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{}\" }}, {{ address: \"{}\" }}]\n    tls: {{ ca_file: \"{}\", sni: up.test, client_cert: \"{}\", client_key: \"{}\" }}\n    health_check: {{ kind: http, path: /healthz, interval: 100ms, timeout: 500ms, healthy: 2, unhealthy: 2 }}\n    retries: {{ attempts: 0 }}\nroutes: [{{ name: all, upstream: u }}]\n",
        good.addr,
        bad.addr,
        ca_file.display(),
        id_cert.display(),
        id_key.display()
    ));
    let checked = || good.plain.received().iter().any(|r| r.path == "/healthz");
    assert!(
        common::eventually(Duration::from_secs(5), checked).await,
        "no HTTP health check reached the TLS backend\n{}",
        gw.log()
    );
    let check = good
        .plain
        .received()
        .into_iter()
        .find(|r| r.path == "/healthz")
        .unwrap();
    assert_eq!(check.header("user-agent"), Some("tollgate-health-check"));
    assert!(
        good.client_certs_seen() >= 1,
        "the health check sent no client certificate"
    );
    assert!(
        good.handshakes()
            .iter()
            .filter(|h| h.ok)
            .all(|h| h.sni.as_deref() == Some("up.test"))
    );
    let down = format!("upstream u backend {} is unhealthy", bad.addr);
    assert!(
        common::eventually(Duration::from_secs(5), || gw.log().contains(&down)).await,
        "the backend whose certificate does not verify stayed healthy\n{}",
        gw.log()
    );
    let c = client();
    for i in 0..10 {
        let r = c.get(gw.url(&format!("/h/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert_eq!(good.plain.traffic(), 10);
    assert_eq!(bad.plain.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_plain_only_sends_plain_requests_to_https_and_passes_tls_ones() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let (_, c, k) = pki.cert("a", &["a.test"]);
    let body = format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{}\" }}]\nroutes:\n  - name: site\n    upstream: u\n    filters:\n      - {{ kind: redirect, to: \"https://${{host}}${{path}}\", status: 308, plain_only: true }}\n",
        up.addr
    );
    let plain = GatewayConfig::new(body.clone()).start();
    let tls = GatewayConfig::new(body)
        .listener(&tls_block(&[(&c, &k, None)], ""))
        .start();
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow
        .get(plain.url("/p?x=1"))
        .header("host", format!("a.test:{}", plain.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "https://a.test/p?x=1");
    assert_eq!(up.count(), 0);
    let r = https_builder(&pki.ca, &["a.test"])
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(https(&tls, "a.test", "/p?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a request over TLS was redirected");
    assert_eq!(up.count(), 1);
    assert_eq!(up.last().path, "/p?x=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mtls_presents_the_client_certificate() {
    let pki = Pki::new();
    let client_ca = Ca::new("client CA");
    let ca_file = pki.ca_file();
    let id = client_ca.leaf(&["gateway.test"]);
    let (id_cert, id_key) = id.write(pki.dir.path(), "client");
    let server = pki.ca.leaf(&["up.test"]);
    let up = TlsUpstream::start(&server, ClientAuth::Required(&client_ca)).await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  mtls:\n    backends: [{{ address: \"{a}\" }}]\n    tls: {{ ca_file: \"{ca}\", sni: up.test, client_cert: \"{c}\", client_key: \"{k}\" }}\n  nocert:\n    backends: [{{ address: \"{a}\" }}]\n    tls: {{ ca_file: \"{ca}\", sni: up.test }}\nroutes:\n  - {{ name: mtls, upstream: mtls, match: {{ path_prefix: /mtls }} }}\n  - {{ name: nocert, upstream: nocert, match: {{ path_prefix: /nocert }} }}\n",
        a = up.addr,
        ca = ca_file.display(),
        c = id_cert.display(),
        k = id_key.display()
    ));
    let c = client();
    let r = c.get(gw.url("/mtls")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(up.plain.count(), 1);
    assert!(up.client_certs_seen() >= 1);
    let presented = up.handshakes().into_iter().find_map(|h| h.client_cert);
    assert!(
        presented.as_deref() == Some(id.cert_der.as_slice()),
        "another client certificate"
    );
    let r = c.get(gw.url("/nocert")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    error_json(&r.text().await.unwrap());
    assert_eq!(
        up.plain.count(),
        1,
        "a request without a client certificate got through"
    );
    let r = c.get(gw.url("/mtls/again")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.plain.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_default_sni_is_the_discovery_name() {
    let pki = Pki::new();
    let ca_file = pki.ca_file();
    // No IP SAN: verifying the backend's address instead of the name would fail.
    let up = TlsUpstream::start(&pki.ca.leaf(&["up.test"]), ClientAuth::None).await;
    let dns = DnsServer::start(&[std::net::Ipv4Addr::LOCALHOST]).await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  svc:\n    discovery: {{ kind: dns, name: up.test, port: {}, refresh: 200ms, nameservers: [\"{}\"] }}\n    tls: {{ ca_file: \"{}\" }}\nroutes: [{{ name: all, upstream: svc }}]\n",
        up.addr.port(),
        dns.addr,
        ca_file.display()
    ));
    let mut last = 0;
    for _ in 0..50 {
        last = client()
            .get(gw.url("/d"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if last == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, 200, "{}", gw.log());
    assert_eq!(up.plain.last().path, "/d");
    let hs: Vec<_> = up.handshakes().into_iter().filter(|h| h.ok).collect();
    assert!(!hs.is_empty());
    assert!(
        hs.iter().all(|h| h.sni.as_deref() == Some("up.test")),
        "{hs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_h2_max_streams_caps_streams_per_connection_and_connections_are_reused() {
    let capped = H2Upstream::h2c_with_delay(Duration::from_millis(300)).await;
    let shared = H2Upstream::h2c_with_delay(Duration::from_millis(300)).await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  capped:\n    backends: [{{ address: \"{}\" }}]\n    protocol: http2\n    h2_max_streams: 2\n  shared:\n    backends: [{{ address: \"{}\" }}]\n    protocol: http2\nroutes:\n  - {{ name: capped, upstream: capped, match: {{ path_prefix: /capped }} }}\n  - {{ name: shared, upstream: shared, match: {{ path_prefix: /shared }} }}\n",
        capped.addr, shared.addr
    ));
    // HTTP/1.1 clients, HTTP/2 to the backend.
    let c = client();
    let get = |path: String| {
        let (c, url) = (c.clone(), gw.url(&path));
        tokio::spawn(async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        })
    };
    for (name, up) in [("capped", &capped), ("shared", &shared)] {
        // One request first, so a pooled connection exists before the burst.
        let (status, body) = get(format!("/{name}/warm")).await.unwrap();
        assert_eq!(
            (status, body.as_ref()),
            (200, GRPC_REPLY),
            "{name}: {}",
            gw.log()
        );
        assert_eq!(up.connections(), 1, "{name}");
        let burst: Vec<_> = (0..10).map(|i| get(format!("/{name}/{i}"))).collect();
        for t in burst {
            let (status, body) = t.await.unwrap();
            assert_eq!(status, 200, "{name}: {}", gw.log());
            assert_eq!(body, GRPC_REPLY);
        }
        assert_eq!(up.count(), 11, "{name}");
        assert_eq!(up.last().version, http::Version::HTTP_2);
    }
    assert!(
        capped.peak_streams_per_connection() <= 2,
        "{} streams at once on one upstream connection with h2_max_streams: 2",
        capped.peak_streams_per_connection()
    );
    assert!(
        capped.connections() >= 5,
        "10 concurrent requests, 2 streams per connection, only {} connections",
        capped.connections()
    );
    // Default 100 streams: the burst shares connections (Pingora's own default would be 1).
    assert!(
        shared.peak_streams_per_connection() >= 3,
        "no multiplexing to the upstream: at most {} stream(s) per connection over {} connections",
        shared.peak_streams_per_connection(),
        shared.connections()
    );
    // Sequential requests reuse the pooled connection.
    let before = shared.connections();
    for i in 0..5 {
        let (status, _) = get(format!("/shared/seq/{i}")).await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(
        shared.connections(),
        before,
        "sequential requests opened new connections"
    );
}

// ---------------------------------------------------------------- 8. gRPC over h2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_te_and_trailers_pass_through_h2_upstreams() {
    let pki = Pki::new();
    let ca_file = pki.ca_file();
    let h2c_up = H2Upstream::h2c().await;
    let up_leaf = pki.ca.leaf(&["up.test"]);
    let tls_up = H2Upstream::tls(&up_leaf).await;
    let auto_up = H2Upstream::tls(&up_leaf).await;
    let (_, c, k) = pki.cert("a", &["a.test"]);
    let routes = format!(
        "upstreams:\n  h2c:\n    backends: [{{ address: \"{}\" }}]\n    protocol: http2\n  h2tls:\n    backends: [{{ address: \"{}\" }}]\n    protocol: http2\n    tls: {{ ca_file: \"{ca}\", sni: up.test }}\n  auto:\n    backends: [{{ address: \"{}\" }}]\n    protocol: auto\n    tls: {{ ca_file: \"{ca}\", sni: up.test }}\nroutes:\n  - {{ name: h2c, upstream: h2c, match: {{ path_prefix: /h2c.Svc }} }}\n  - {{ name: h2tls, upstream: h2tls, match: {{ path_prefix: /tls.Svc }} }}\n  - {{ name: auto, upstream: auto, match: {{ path_prefix: /auto.Svc }} }}\n",
        h2c_up.addr,
        tls_up.addr,
        auto_up.addr,
        ca = ca_file.display()
    );
    let gw = GatewayConfig::new(routes.clone())
        .listener(&tls_block(&[(&c, &k, None)], ""))
        .start();
    let send = h2_tls(gw.addr, "a.test", &pki.ca).await.unwrap();
    for (path, up) in [
        ("/h2c.Svc/Call", &h2c_up),
        ("/tls.Svc/Call", &tls_up),
        ("/auto.Svc/Call", &auto_up),
    ] {
        let r = grpc_call(&send, &format!("https://a.test{path}"))
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", gw.log()));
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(
            r.headers.get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/grpc"),
            "{path}"
        );
        assert_eq!(r.body, GRPC_REPLY, "{path}");
        let t = r.trailers.unwrap_or_else(|| panic!("{path}: no trailers"));
        assert_eq!(
            t.get("grpc-status").map(|v| v.to_str().unwrap()),
            Some("0"),
            "{path}"
        );
        assert_eq!(
            t.get("grpc-message").map(|v| v.to_str().unwrap()),
            Some("ok"),
            "{path}"
        );
        assert_eq!(up.count(), 1, "{path}");
        let seen = up.last();
        assert_eq!(seen.version, http::Version::HTTP_2);
        assert_eq!(
            seen.header("te"),
            Some("trailers"),
            "{path}: {:?}",
            seen.headers
        );
        assert_eq!((seen.method.as_str(), seen.path.as_str()), ("POST", path));
        assert_eq!(seen.body, b"\0\0\0\0\x05world", "{path}: request body");
        assert_eq!(seen.header("content-type"), Some("application/grpc"));
    }
    for up in [&tls_up, &auto_up] {
        let hs = up.handshakes();
        assert!(
            hs.iter()
                .any(|h| h.ok && h.alpn.as_deref() == Some(b"h2".as_slice())),
            "{hs:?}"
        );
        assert!(
            hs.iter()
                .filter(|h| h.ok)
                .all(|h| h.sni.as_deref() == Some("up.test"))
        );
    }

    // An HTTP/1.1 client gets the response (Pingora 0.9.1 drops the trailers for h1).
    let r = https_builder(&pki.ca, &["a.test"])
        .http1_only()
        .build()
        .unwrap()
        .post(https(&gw, "a.test", "/h2c.Svc/H1"))
        .header("content-type", "application/grpc")
        .body(&b"\0\0\0\0\x05world"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), GRPC_REPLY);
    assert_eq!(h2c_up.last().path, "/h2c.Svc/H1");

    // An h2c client on an h2c listener gets the trailers too.
    let gw2 = GatewayConfig::new(routes).listener("h2c: true").start();
    let send = h2c(gw2.addr).await.unwrap();
    let r = grpc_call(&send, "http://a.test/h2c.Svc/Again")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, GRPC_REPLY);
    let t = r.trailers.expect("trailers over h2c");
    assert_eq!(t.get("grpc-status").map(|v| v.to_str().unwrap()), Some("0"));
    assert_eq!(h2c_up.last().header("te"), Some("trailers"));
}

// ---------------------------------------------------------------- 9. rotation on reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_change_serves_a_renewed_certificate_without_a_signal() {
    // What a renewed Kubernetes Secret looks like to the pod: new files under the same paths.
    let pki = Pki::new();
    let up = Upstream::start().await;
    let (old, cert_path, key_path) = pki.cert("a", &["a.test"]);
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("reload_on_change: 200ms")
        .listener(&tls_block(&[(&cert_path, &key_path, None)], ""))
        .start();
    assert!(served_cert(gw.addr, Some("a.test")).await.unwrap() == old.cert_der);
    let new = pki.ca.leaf(&["a.test"]);
    new.write(pki.dir.path(), "a");
    let start = Instant::now();
    let mut got = served_cert(gw.addr, Some("a.test")).await.unwrap();
    while got != new.cert_der && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = served_cert(gw.addr, Some("a.test")).await.unwrap();
    }
    assert!(
        got == new.cert_der,
        "the renewed certificate was not picked up:\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_certificates_and_open_connections_keep_working() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let (old, cert_path, key_path) = pki.cert("a", &["a.test"]);
    let gw = GatewayConfig::new(one_route(up.addr))
        .listener(&tls_block(&[(&cert_path, &key_path, None)], ""))
        .start();
    let h1_opts = ClientOpts::default().verify(&pki.ca).alpn(&[b"http/1.1"]);
    let mut h1 = tls_connect(gw.addr, Some("a.test"), &h1_opts)
        .await
        .unwrap();
    assert!(h1.leaf() == old.cert_der);
    assert_eq!(h1.get("a.test", "/before").await.unwrap().status, 200);
    let h2 = h2_tls(gw.addr, "a.test", &pki.ca).await.unwrap();
    assert_eq!(
        h2_get(&h2, "https://a.test/before-h2")
            .await
            .unwrap()
            .status,
        200
    );

    // Same paths, new certificate and key.
    let new = pki.ca.leaf(&["a.test"]);
    assert_ne!(new.serial, old.serial);
    new.write(pki.dir.path(), "a");
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 200, "{body}\n{}", gw.log());
    // The admin API lists the certificate.
    let cfg_text = client()
        .get(format!("http://{}/config", gw.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    let listed = &cfg["listeners"][0]["tls"]["certificates"][0];
    assert_eq!(listed["names"], serde_json::json!(["a.test"]), "{cfg}");
    assert!(!listed["not_after"].is_null(), "{cfg}");
    let got = served_cert(gw.addr, Some("a.test")).await.unwrap();
    assert!(
        got == new.cert_der,
        "a new handshake still gets the old certificate"
    );
    let r = https_client(&pki.ca, &["a.test"])
        .get(https(&gw, "a.test", "/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The connections opened before the reload still answer.
    let r = h1
        .get("a.test", "/old-h1")
        .await
        .expect("the old h1 connection broke");
    assert_eq!(r.status, 200);
    let r = h2_get(&h2, "https://a.test/old-h2")
        .await
        .expect("the old h2 connection broke");
    assert_eq!(r.status, 200);

    // A broken key is refused on reload, located, and the current certificate stays.
    std::fs::write(&key_path, "not a key\n").unwrap();
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("listeners[0].tls.certificates[0].key"),
        "{body}"
    );
    let m = gw.metrics().await;
    assert_eq!(
        common::metric(&m, r#"tollgate_config_reloads_total{outcome="failure"}"#),
        1.0
    );
    assert!(served_cert(gw.addr, Some("a.test")).await.unwrap() == new.cert_der);
    new.write(pki.dir.path(), "a");

    // Turning HTTP/2 off is a listener change: refused.
    let conf = gw.config_path();
    let text = std::fs::read_to_string(&conf).unwrap();
    let off = text.replace(
        "      certificates:\n",
        "      http2: false\n      certificates:\n",
    );
    assert_ne!(off, text);
    std::fs::write(&conf, &off).unwrap();
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("listeners cannot change on reload"), "{body}");
    // So are the HTTP/2 limits (they belong to the process).
    let limits = text.replacen(
        "server:\n",
        "server:\n  http2: { max_concurrent_streams: 7 }\n",
        1,
    );
    assert_ne!(limits, text);
    std::fs::write(&conf, &limits).unwrap();
    let (status, body) = reload(&gw).await;
    assert_eq!(
        status, 400,
        "a change of server.http2 was applied on reload: {body}"
    );

    // New paths (and a name) are applied.
    let third = pki.ca.leaf(&["a.test"]);
    let (c3, k3) = third.write(pki.dir.path(), "third");
    let moved = text
        .replace(&cert_path.display().to_string(), &c3.display().to_string())
        .replace(&key_path.display().to_string(), &k3.display().to_string());
    assert_ne!(moved, text);
    std::fs::write(&conf, &moved).unwrap();
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert!(served_cert(gw.addr, Some("a.test")).await.unwrap() == third.cert_der);
    assert_eq!(h1.get("a.test", "/still").await.unwrap().status, 200);
    assert_eq!(
        h2_get(&h2, "https://a.test/still-h2").await.unwrap().status,
        200
    );

    // unknown_sni is applied on reload too.
    let rejecting = moved.replace(
        "      certificates:\n",
        "      unknown_sni: reject\n      certificates:\n",
    );
    assert_ne!(rejecting, moved);
    std::fs::write(&conf, &rejecting).unwrap();
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        served_cert(gw.addr, Some("other.test")).await.is_err(),
        "unknown_sni: reject was not applied on reload"
    );
    assert!(served_cert(gw.addr, Some("a.test")).await.unwrap() == third.cert_der);

    // SIGHUP re-reads the files as well.
    let fourth = pki.ca.leaf(&["a.test"]);
    fourth.write(pki.dir.path(), "third");
    gw.signal(Signal::SIGHUP);
    let mut rotated = false;
    for _ in 0..50 {
        if served_cert(gw.addr, Some("a.test")).await.ok().as_ref() == Some(&fourth.cert_der) {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rotated,
        "SIGHUP did not rotate the certificate within 5 s\n{}",
        gw.log()
    );

    // Same connection for the h1 client the whole time, and it still answers.
    assert_eq!(h1.get("a.test", "/last").await.unwrap().status, 200);
    assert!(h1.leaf() == old.cert_der);
}

// ---------------------------------------------------------------- 10. configuration errors

/// A config file in `dir` with `yaml`, checked with `tollgate -t`: must exit 64; the output.
fn config_error(dir: &Path, name: &str, yaml: &str) -> String {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let (code, out, err) = check_config(&path);
    assert_eq!(code, 64, "{name}: expected exit 64\n{yaml}\n{out}{err}");
    format!("{out}{err}")
}

/// `out` names `location` and at least one of `words` (case-insensitive).
fn assert_located(name: &str, out: &str, location: &str, words: &[&str]) {
    assert!(
        out.contains(location),
        "{name}: {location:?} not in:\n{out}"
    );
    let lower = out.to_ascii_lowercase();
    assert!(
        words
            .iter()
            .any(|w| lower.contains(&w.to_ascii_lowercase())),
        "{name}: none of {words:?} in:\n{out}"
    );
}

#[test]
fn bad_tls_configuration_is_a_located_error() {
    let pki = Pki::new();
    let d = pki.dir.path();
    let (_, a_cert, a_key) = pki.cert("a", &["a.test"]);
    let (_, b_cert, _) = pki.cert("b", &["b.test"]);
    let ca = pki.ca_file();
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "this is not PEM at all\n").unwrap();
    let bad_base64 = pki.path("bad-base64.pem");
    std::fs::write(
        &bad_base64,
        "-----BEGIN CERTIFICATE-----\n!!! not base64 !!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = pki.path("missing.pem");
    let not_x509 = pki.path("not-x509.pem");
    // A well-formed PEM CERTIFICATE block whose bytes are no X.509 certificate.
    std::fs::write(
        &not_x509,
        "-----BEGIN CERTIFICATE-----\naGVsbG8sIEkgYW0gbm90IGEgY2VydGlmaWNhdGUgYXQgYWxs\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (_, a2_cert, a2_key) = pki.cert("a2", &["a.test"]);
    let (_, ip_cert, ip_key) = pki.cert("ip-only", &["127.0.0.1"]);
    let listener =
        |tls: &str| format!("listeners:\n  - address: \"127.0.0.1:8443\"\n    tls:\n{tls}");
    let certs = |entries: &[(&Path, &Path)]| {
        let mut s = String::from("      certificates:\n");
        for (c, k) in entries {
            s.push_str(&format!(
                "        - {{ cert: \"{}\", key: \"{}\" }}\n",
                c.display(),
                k.display()
            ));
        }
        s
    };
    let secure = |tls: &str, extra: &str| {
        format!(
            "listeners: [{{ address: \"127.0.0.1:8080\" }}]\nupstreams:\n  secure:\n    backends: [{{ address: \"127.0.0.1:9443\" }}]\n{tls}{extra}routes: [{{ name: r, upstream: secure }}]\n"
        )
    };

    // The valid form of everything in the contract passes, so the failures below are about
    // the one broken thing each.
    let (_, cc, ck) = pki.cert("client", &["client.test"]);
    let valid = format!(
        "server:\n  http2: {{ max_concurrent_streams: 100, max_header_list_size: 64KiB, max_pending_reset_streams: 20, max_local_error_reset_streams: 1024, initial_window_size: 1MiB, idle_timeout: 5m }}\nlisteners:\n  - address: \"127.0.0.1:8443\"\n    tls:\n      certificates:\n        - {{ cert: \"{ac}\", key: \"{ak}\" }}\n        - {{ cert: \"{cc}\", key: \"{ck}\", names: [\"*.wild.test\"] }}\n      unknown_sni: reject\n      http2: true\n  - address: \"127.0.0.1:8080\"\n    h2c: true\nupstreams:\n  secure:\n    backends: [{{ address: \"127.0.0.1:9443\" }}]\n    tls: {{ sni: api.internal, verify: true, verify_hostname: true, ca_file: \"{ca}\", client_cert: \"{cc}\", client_key: \"{ck}\" }}\n    protocol: auto\n    h2_max_streams: 50\n  grpc:\n    backends: [{{ address: \"127.0.0.1:9444\" }}]\n    protocol: http2\nroutes:\n  - {{ name: r, upstream: secure }}\n  - {{ name: g, upstream: grpc, match: {{ path_prefix: /pkg. }} }}\n",
        ac = a_cert.display(),
        ak = a_key.display(),
        cc = cc.display(),
        ck = ck.display(),
        ca = ca.display()
    );
    let vpath = d.join("valid.yaml");
    std::fs::write(&vpath, &valid).unwrap();
    let (code, out, err) = check_config(&vpath);
    assert_eq!(
        code, 0,
        "the full valid TLS configuration failed:\n{valid}\n{err}"
    );
    assert!(out.contains("configuration OK"), "{out}");

    // (name, yaml, location, words): the output must name the location and one of the words
    // (case-insensitive). The wording is the gateway's; the words are kept loose on purpose.
    // Messages assumed (they match the gateway's as of writing), e.g.:
    //   …certificates[0].cert: cannot read /…/missing.pem: No such file or directory
    //   …certificates[0].cert: /…/garbage.pem holds no PEM certificate (-----BEGIN CERTIFICATE-----)
    //   …certificates[0].cert: /…/bad-base64.pem is not a valid PEM file (base64 decode error: …)
    //   …certificates[0].key: /…/a.pem holds no PEM private key (PKCS#8, PKCS#1 or SEC1)
    //   …certificates[1].key: /…/a.key is not the private key of the certificate in /…/b.pem
    //   …certificates[1].names: a.test is also served by certificates[0]
    //   listeners[0].tls.certificates: at least one certificate is needed
    //   listeners[0].h2c: h2c is HTTP/2 without TLS; …
    //   upstreams.secure.tls.client_key: client_cert needs client_key
    //   upstreams.secure.protocol: auto negotiates HTTP/2 through TLS ALPN: add tls:, …
    //   server.http2.max_header_list_size: 512 bytes is outside 1024..=16777216
    let cases: Vec<(&str, String, &str, Vec<&str>)> = vec![
        (
            "missing cert file",
            listener(&certs(&[(&missing, &a_key)])),
            "listeners[0].tls.certificates[0].cert",
            vec!["missing.pem", "cannot read", "no such file"],
        ),
        (
            "missing key file",
            listener(&certs(&[(&a_cert, &missing)])),
            "listeners[0].tls.certificates[0].key",
            vec!["missing.pem", "cannot read", "no such file"],
        ),
        (
            "cert not PEM",
            listener(&certs(&[(&garbage, &a_key)])),
            "listeners[0].tls.certificates[0].cert",
            vec!["pem", "no certificate", "not a certificate"],
        ),
        (
            "cert PEM with bad base64",
            listener(&certs(&[(&bad_base64, &a_key)])),
            "listeners[0].tls.certificates[0].cert",
            vec!["pem", "base64", "invalid", "certificate"],
        ),
        (
            "key not PEM",
            listener(&certs(&[(&a_cert, &garbage)])),
            "listeners[0].tls.certificates[0].key",
            vec!["pem", "no private key", "no key", "private key"],
        ),
        (
            "cert file holding only a key",
            listener(&certs(&[(&a_key, &a_key)])),
            "listeners[0].tls.certificates[0].cert",
            vec![
                "no certificate",
                "no pem certificate",
                "holds no",
                "contains no",
                "not contain",
                "found",
            ],
        ),
        (
            "key file holding only a certificate",
            listener(&certs(&[(&a_cert, &a_cert)])),
            "listeners[0].tls.certificates[0].key",
            vec![
                "no private key",
                "no key",
                "private key",
                "contains no",
                "not contain",
            ],
        ),
        (
            "key of another certificate (second entry)",
            listener(&certs(&[(&a_cert, &a_key), (&b_cert, &a_key)])),
            "listeners[0].tls.certificates[1].key",
            vec!["match", "not the private key"],
        ),
        (
            "no certificates",
            listener("      certificates: []\n"),
            "listeners[0].tls.certificates",
            vec!["empty", "at least one", "no certificate", "one certificate"],
        ),
        (
            "h2c together with tls",
            format!(
                "listeners:\n  - address: \"127.0.0.1:8443\"\n    h2c: true\n    tls:\n{}",
                certs(&[(&a_cert, &a_key)])
            ),
            "listeners[0]",
            vec!["h2c"],
        ),
        (
            "upstream ca_file garbage",
            secure(
                &format!("    tls: {{ ca_file: \"{}\" }}\n", garbage.display()),
                "",
            ),
            "upstreams.secure.tls.ca_file",
            vec!["pem", "no certificate", "certificate"],
        ),
        (
            "upstream ca_file missing",
            secure(
                &format!("    tls: {{ ca_file: \"{}\" }}\n", missing.display()),
                "",
            ),
            "upstreams.secure.tls.ca_file",
            vec!["missing.pem", "cannot read", "no such file"],
        ),
        (
            "client_cert without client_key",
            secure(
                &format!("    tls: {{ client_cert: \"{}\" }}\n", a_cert.display()),
                "",
            ),
            "upstreams.secure.tls",
            vec!["client_key"],
        ),
        (
            "client_key without client_cert",
            secure(
                &format!("    tls: {{ client_key: \"{}\" }}\n", a_key.display()),
                "",
            ),
            "upstreams.secure.tls",
            vec!["client_cert"],
        ),
        (
            "client key of another certificate",
            secure(
                &format!(
                    "    tls: {{ client_cert: \"{}\", client_key: \"{}\" }}\n",
                    b_cert.display(),
                    a_key.display()
                ),
                "",
            ),
            "upstreams.secure.tls.client_key",
            vec!["match", "not the private key"],
        ),
        (
            "protocol auto without tls",
            secure("", "    protocol: auto\n"),
            "upstreams.secure.protocol",
            vec!["tls"],
        ),
        (
            "PEM certificate that is not X.509",
            listener(&certs(&[(&not_x509, &a_key)])),
            "listeners[0].tls.certificates[0].cert",
            vec!["x.509", "x509", "parse", "invalid", "der"],
        ),
        (
            "a name served by two entries",
            listener(&certs(&[(&a_cert, &a_key), (&a2_cert, &a2_key)])),
            "listeners[0].tls.certificates[1]",
            vec!["a.test"],
        ),
        (
            "a second certificate with no DNS name and no names:",
            listener(&certs(&[(&a_cert, &a_key), (&ip_cert, &ip_key)])),
            "listeners[0].tls.certificates[1]",
            vec!["names", "dns"],
        ),
        (
            "an invalid name",
            listener(&format!(
                "      certificates:\n        - {{ cert: \"{}\", key: \"{}\", names: [\"not a name!\"] }}\n",
                a_cert.display(),
                a_key.display()
            )),
            "listeners[0].tls.certificates[0].names",
            vec!["not a name!"],
        ),
        (
            "max_header_list_size below 1KiB",
            format!(
                "server:\n  http2: {{ max_header_list_size: 512 }}\n{}",
                listener(&certs(&[(&a_cert, &a_key)]))
            ),
            "server.http2.max_header_list_size",
            vec!["1KiB", "1024", "range", "at least", "between"],
        ),
        (
            "initial_window_size below 64KiB",
            format!(
                "server:\n  http2: {{ initial_window_size: 1KiB }}\n{}",
                listener(&certs(&[(&a_cert, &a_key)]))
            ),
            "server.http2.initial_window_size",
            vec!["64KiB", "65535", "65536", "range", "at least", "between"],
        ),
        (
            "h2_max_streams 0",
            secure("", "    protocol: http2\n    h2_max_streams: 0\n"),
            "upstreams.secure.h2_max_streams",
            vec!["at least", "zero", "positive", "between", ">= 1"],
        ),
    ];
    for (name, yaml, location, words) in &cases {
        let file: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let out = config_error(d, &file, yaml);
        eprintln!("{name}:\n{out}");
        assert_located(name, &out, location, words);
    }
}
