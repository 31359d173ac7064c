//! TLS and HTTP/2 pieces of the harness: certificates generated at test time with rcgen (never
//! committed), a TLS upstream that terminates TLS (optionally requiring a client certificate)
//! and pipes the bytes to a plain recording [`Upstream`], an HTTP/2 upstream (h2c with prior
//! knowledge, or TLS with ALPN h2) that answers gRPC-style with trailers, and clients: reqwest
//! trusting a test CA, a raw rustls client that reports which certificate, version and ALPN the
//! server chose, and an `h2` crate client that can read trailers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::upstream::{Behavior, Upstream};

/// How long any single client operation of this module may take before it counts as failed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Install ring as the process' rustls provider (idempotent). Every constructor here calls it.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

/// A fresh certificate serial: distinct within the process, and random across runs.
fn next_serial() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    ((t & 0x00ff_ffff_ffff) << 16) | (SERIAL.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

// ---------------------------------------------------------------- certificates

/// A test certificate authority.
pub struct Ca {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate with its private key, as PEM and DER.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub serial: u64,
}

impl Ca {
    /// A new self-signed CA named `cn`.
    pub fn new(cn: &str) -> Ca {
        init();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from(next_serial()));
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names` (DNS names; strings that parse as IPs become IP SANs),
    /// signed by this CA, with a fresh key and serial.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cn = names.first().copied().unwrap_or("leaf");
        params.distinguished_name.push(DnType::CommonName, cn);
        let serial = next_serial();
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            serial,
        }
    }

    /// Write the CA certificate as `DIR/STEM.pem`; its path.
    pub fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let p = dir.join(format!("{stem}.pem"));
        std::fs::write(&p, &self.cert_pem).unwrap();
        p
    }

    /// A root store holding only this CA.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.cert_der.clone()))
            .unwrap();
        roots
    }
}

impl Leaf {
    /// Write `DIR/STEM.pem` (certificate) and `DIR/STEM.key` (private key); their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(self.cert_der.clone())]
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        use rustls::pki_types::pem::PemObject;
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }

    /// A rustls server configuration serving this certificate.
    fn server_config(
        &self,
        client_auth: &ClientAuth<'_>,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ServerConfig> {
        init();
        let builder = rustls::ServerConfig::builder();
        let builder = match client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Optional(ca) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder(Arc::new(ca.roots()))
                    .allow_unauthenticated()
                    .build()
                    .unwrap(),
            ),
            ClientAuth::Required(ca) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder(Arc::new(ca.roots()))
                    .build()
                    .unwrap(),
            ),
        };
        let mut cfg = builder.with_single_cert(self.chain(), self.key()).unwrap();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// Whether a test TLS server asks for a client certificate.
pub enum ClientAuth<'a> {
    None,
    /// Ask for one signed by this CA, accept connections without.
    Optional(&'a Ca),
    /// Refuse the handshake without a client certificate signed by this CA.
    Required(&'a Ca),
}

// ---------------------------------------------------------------- servers

/// One TLS handshake a test server completed (or failed).
#[derive(Clone, Debug)]
pub struct ServerHandshake {
    pub ok: bool,
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<rustls::ProtocolVersion>,
    /// The client's leaf certificate, if it presented one.
    pub client_cert: Option<Vec<u8>>,
    pub error: Option<String>,
}

#[derive(Default)]
struct Tasks(Mutex<Vec<tokio::task::AbortHandle>>);

impl Tasks {
    fn push(&self, h: &tokio::task::JoinHandle<()>) {
        self.0.lock().unwrap().push(h.abort_handle());
    }
    fn abort_all(&self) {
        for h in self.0.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

type Handshakes = Arc<Mutex<Vec<ServerHandshake>>>;

async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    sock: TcpStream,
    log: &Handshakes,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => {
            let c = tls.get_ref().1;
            log.lock().unwrap().push(ServerHandshake {
                ok: true,
                sni: c.server_name().map(str::to_owned),
                alpn: c.alpn_protocol().map(<[u8]>::to_vec),
                version: c.protocol_version(),
                client_cert: c
                    .peer_certificates()
                    .and_then(|p| p.first())
                    .map(|d| d.to_vec()),
                error: None,
            });
            Some(tls)
        }
        Ok(Err(e)) => {
            log.lock().unwrap().push(ServerHandshake {
                ok: false,
                sni: None,
                alpn: None,
                version: None,
                client_cert: None,
                error: Some(e.to_string()),
            });
            None
        }
        Err(_) => None,
    }
}

/// A TLS upstream: terminates TLS with `leaf` and pipes the plaintext to a recording
/// HTTP/1.1 [`Upstream`] (`.plain`), so tests can assert on the exact request bytes.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub plain: Upstream,
    handshakes: Handshakes,
    tasks: Arc<Tasks>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

impl TlsUpstream {
    pub async fn start(leaf: &Leaf, client_auth: ClientAuth<'_>) -> TlsUpstream {
        Self::with(leaf, client_auth, Behavior::default()).await
    }

    pub async fn with(leaf: &Leaf, client_auth: ClientAuth<'_>, b: Behavior) -> TlsUpstream {
        let plain = Upstream::with(b).await;
        // No ALPN list: whatever the client offers (or not), the session is HTTP/1.1.
        let acceptor = tokio_rustls::TlsAcceptor::from(leaf.server_config(&client_auth, &[]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes: Handshakes = Arc::default();
        let tasks = Arc::new(Tasks::default());
        let (hs, ts, target) = (handshakes.clone(), tasks.clone(), plain.addr);
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (acceptor, hs) = (acceptor.clone(), hs.clone());
                let conn = tokio::spawn(async move {
                    let Some(mut tls) = accept_tls(&acceptor, sock, &hs).await else {
                        return;
                    };
                    let Ok(mut back) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
                });
                ts.push(&conn);
            }
        });
        tasks.push(&accept);
        TlsUpstream {
            addr,
            plain,
            handshakes,
            tasks,
        }
    }

    /// Every handshake attempted so far, in order.
    pub fn handshakes(&self) -> Vec<ServerHandshake> {
        self.handshakes.lock().unwrap().clone()
    }

    /// Completed handshakes in which the client presented a certificate.
    pub fn client_certs_seen(&self) -> usize {
        self.handshakes()
            .iter()
            .filter(|h| h.ok && h.client_cert.is_some())
            .count()
    }
}

/// The gRPC message the [`H2Upstream`] answers with (a 5-byte gRPC frame header + "hello").
pub const GRPC_REPLY: &[u8] = b"\0\0\0\0\x05hello";

/// One request as the [`H2Upstream`] saw it.
#[derive(Clone, Debug)]
pub struct H2Received {
    pub method: String,
    /// The full URI (`https://authority/path` when the request carried `:authority`).
    pub uri: String,
    pub authority: Option<String>,
    pub path: String,
    pub version: http::Version,
    /// Regular headers (no pseudo-headers), names lower-case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl H2Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/2 upstream built on the `h2` server: h2c with prior knowledge on plain TCP, or TLS
/// with ALPN `h2` only. Answers every request gRPC-style: 200, `content-type:
/// application/grpc`, [`GRPC_REPLY`], then trailers `grpc-status: 0`, `grpc-message: ok`.
pub struct H2Upstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<H2Received>>>,
    handshakes: Handshakes,
    connections: Arc<AtomicUsize>,
    peak_streams: Arc<AtomicUsize>,
    tasks: Arc<Tasks>,
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

impl H2Upstream {
    /// Plain TCP, HTTP/2 with prior knowledge (h2c).
    pub async fn h2c() -> H2Upstream {
        Self::start(None, Duration::ZERO).await
    }

    /// h2c, answering each request `delay` after its body ended.
    pub async fn h2c_with_delay(delay: Duration) -> H2Upstream {
        Self::start(None, delay).await
    }

    /// TLS with `leaf`, ALPN `h2` only (a client that does not offer h2 fails the handshake).
    pub async fn tls(leaf: &Leaf) -> H2Upstream {
        Self::start(
            Some(tokio_rustls::TlsAcceptor::from(
                leaf.server_config(&ClientAuth::None, &[b"h2"]),
            )),
            Duration::ZERO,
        )
        .await
    }

    async fn start(acceptor: Option<tokio_rustls::TlsAcceptor>, delay: Duration) -> H2Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<H2Received>>> = Arc::default();
        let handshakes: Handshakes = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let peak_streams = Arc::new(AtomicUsize::new(0));
        let tasks = Arc::new(Tasks::default());
        let (rx, hs, cn, ts) = (
            received.clone(),
            handshakes.clone(),
            connections.clone(),
            tasks.clone(),
        );
        let peak = peak_streams.clone();
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                cn.fetch_add(1, Ordering::SeqCst);
                let (acceptor, rx, hs) = (acceptor.clone(), rx.clone(), hs.clone());
                let peak = peak.clone();
                let conn = tokio::spawn(async move {
                    match acceptor {
                        None => serve_h2(sock, rx, delay, peak).await,
                        Some(a) => {
                            if let Some(tls) = accept_tls(&a, sock, &hs).await {
                                serve_h2(tls, rx, delay, peak).await
                            }
                        }
                    }
                });
                ts.push(&conn);
            }
        });
        tasks.push(&accept);
        H2Upstream {
            addr,
            received,
            handshakes,
            connections,
            peak_streams,
            tasks,
        }
    }

    /// The most streams ever open at once on any single connection.
    pub fn peak_streams_per_connection(&self) -> usize {
        self.peak_streams.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<H2Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn last(&self) -> H2Received {
        self.received()
            .pop()
            .expect("the h2 upstream received no request")
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// TLS handshakes (TLS mode only).
    pub fn handshakes(&self) -> Vec<ServerHandshake> {
        self.handshakes.lock().unwrap().clone()
    }
}

async fn serve_h2<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
    rx: Arc<Mutex<Vec<H2Received>>>,
    delay: Duration,
    peak: Arc<AtomicUsize>,
) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    let open = Arc::new(AtomicUsize::new(0));
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        let rx = rx.clone();
        let now = open.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(now, Ordering::SeqCst);
        let open = open.clone();
        tokio::spawn(async move {
            /// Counts the stream as closed however the task ends.
            struct Open(Arc<AtomicUsize>);
            impl Drop for Open {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _open = Open(open);
            let (parts, mut body) = req.into_parts();
            let mut data = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            rx.lock().unwrap().push(H2Received {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                authority: parts.uri.authority().map(|a| a.to_string()),
                path: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                version: parts.version,
                headers: parts
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body: data,
            });
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let resp = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let Ok(mut send) = respond.send_response(resp, false) else {
                return;
            };
            if send
                .send_data(Bytes::from_static(GRPC_REPLY), false)
                .is_err()
            {
                return;
            }
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            t.insert("grpc-message", "ok".parse().unwrap());
            let _ = send.send_trailers(t);
        });
    }
}

// ---------------------------------------------------------------- clients

/// A reqwest client builder trusting only `ca`, resolving every one of `names` to 127.0.0.1
/// (so `https://NAME:PORT/` sends SNI `NAME`), no proxy, 30 s timeout.
pub fn https_builder(ca: &Ca, names: &[&str]) -> reqwest::ClientBuilder {
    init();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap());
    for n in names {
        b = b.resolve(n, SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    b
}

/// [`https_builder`], built.
pub fn https_client(ca: &Ca, names: &[&str]) -> reqwest::Client {
    https_builder(ca, names).build().unwrap()
}

/// Options of [`tls_connect`].
#[derive(Clone)]
pub struct ClientOpts {
    /// Offer TLS 1.2 / TLS 1.3.
    pub tls12: bool,
    pub tls13: bool,
    /// ALPN protocols offered (none by default).
    pub alpn: Vec<Vec<u8>>,
    /// Verify the server against these roots; `None` accepts any certificate (so tests can see
    /// which certificate a server picks for a name it does not cover).
    pub verify: Option<rustls::RootCertStore>,
    /// Present this client certificate.
    pub identity: Option<Leaf>,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            tls12: true,
            tls13: true,
            alpn: Vec::new(),
            verify: None,
            identity: None,
        }
    }
}

impl ClientOpts {
    pub fn alpn(mut self, protos: &[&[u8]]) -> Self {
        self.alpn = protos.iter().map(|p| p.to_vec()).collect();
        self
    }
    pub fn only_tls12(mut self) -> Self {
        (self.tls12, self.tls13) = (true, false);
        self
    }
    pub fn only_tls13(mut self) -> Self {
        (self.tls12, self.tls13) = (false, true);
        self
    }
    pub fn verify(mut self, ca: &Ca) -> Self {
        self.verify = Some(ca.roots());
        self
    }

    fn config(&self) -> Arc<rustls::ClientConfig> {
        init();
        let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
        if self.tls13 {
            versions.push(&rustls::version::TLS13);
        }
        if self.tls12 {
            versions.push(&rustls::version::TLS12);
        }
        let b = rustls::ClientConfig::builder_with_protocol_versions(&versions);
        let b = match &self.verify {
            Some(roots) => b.with_root_certificates(roots.clone()),
            None => b
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert)),
        };
        let mut cfg = match &self.identity {
            Some(l) => b.with_client_auth_cert(l.chain(), l.key()).unwrap(),
            None => b.with_no_client_auth(),
        };
        cfg.alpn_protocols = self.alpn.clone();
        Arc::new(cfg)
    }
}

/// A client TLS connection (raw tokio-rustls) and what was negotiated.
pub struct TlsConn {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
}

impl TlsConn {
    /// The leaf certificate the server presented (DER).
    pub fn leaf(&self) -> Vec<u8> {
        self.stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
    pub fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.stream.get_ref().1.protocol_version()
    }
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
    }

    /// One HTTP/1.1 keep-alive request on this connection.
    pub async fn get(&mut self, host: &str, path: &str) -> Result<H1Response, String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tls-test\r\n\r\n");
        h1_exchange(&mut self.stream, req.as_bytes()).await
    }

    /// An HTTP/2 client on this connection (ALPN must have chosen h2).
    pub async fn h2(self) -> Result<h2::client::SendRequest<Bytes>, String> {
        h2_handshake(self.stream).await
    }
}

/// Connect to `addr` over TLS with SNI `sni` (`None`: connect by IP, which sends no SNI).
/// Errors (refused handshakes) come back as text.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: Option<&str>,
    opts: &ClientOpts,
) -> Result<TlsConn, String> {
    let connector = tokio_rustls::TlsConnector::from(opts.config());
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).map_err(|e| e.to_string())?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let fut = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let mut stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // With TLS 1.3 a client-side handshake can complete before the server has judged the
        // client's Finished (e.g. a refused client certificate): flush so an alert surfaces on
        // the first read rather than here.
        stream.flush().await.map_err(|e| e.to_string())?;
        Ok(TlsConn { stream })
    };
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .map_err(|_| "TLS connect timed out".to_string())?
}

/// The server's leaf certificate for `sni` (any certificate accepted), or the handshake error.
pub async fn served_cert(addr: SocketAddr, sni: Option<&str>) -> Result<Vec<u8>, String> {
    tls_connect(addr, sni, &ClientOpts::default().alpn(&[b"http/1.1"]))
        .await
        .map(|c| c.leaf())
}

/// An HTTP/1.1 response read off a connection.
#[derive(Debug)]
pub struct H1Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl H1Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Write `request` and read one response (content-length, chunked, or until close).
pub async fn h1_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &[u8],
) -> Result<H1Response, String> {
    tokio::time::timeout(IO_TIMEOUT, h1_exchange_inner(s, request))
        .await
        .map_err(|_| "HTTP/1.1 exchange timed out".to_string())?
}

async fn h1_exchange_inner<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &[u8],
) -> Result<H1Response, String> {
    let io = |e: std::io::Error| e.to_string();
    s.write_all(request).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).await.map_err(io)?;
        if n == 0 {
            return Err(format!(
                "connection closed before a response head ({} bytes)",
                buf.len()
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let mut hdrs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hdrs);
    resp.parse(&buf[..head_end]).map_err(|e| e.to_string())?;
    let status = resp.code.unwrap_or(0);
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if let Some(cl) = get("content-length") {
        let len: usize = cl.trim().parse().map_err(|_| "bad content-length")?;
        while rest.len() < len {
            let n = s.read(&mut tmp).await.map_err(io)?;
            if n == 0 {
                return Err("connection closed inside the body".into());
            }
            rest.extend_from_slice(&tmp[..n]);
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                let n = s.read(&mut tmp).await.map_err(io)?;
                if n == 0 {
                    return Err("connection closed inside a chunk".into());
                }
                rest.extend_from_slice(&tmp[..n]);
            };
            let line = String::from_utf8_lossy(&rest[..line_end]).to_string();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            rest.drain(..line_end + 2);
            // chunk data + CRLF (for the last chunk: optional trailers + CRLF)
            let need = if size == 0 { 2 } else { size + 2 };
            while rest.len() < need
                || (size == 0 && !rest.starts_with(b"\r\n") && !contains(&rest, b"\r\n\r\n"))
            {
                let n = s.read(&mut tmp).await.map_err(io)?;
                if n == 0 {
                    return Err("connection closed inside a chunk".into());
                }
                rest.extend_from_slice(&tmp[..n]);
            }
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest.drain(..size + 2);
        }
        body
    } else if status == 204 || status == 304 {
        Vec::new()
    } else {
        loop {
            let n = s.read(&mut tmp).await.map_err(io)?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&tmp[..n]);
        }
        rest
    };
    Ok(H1Response {
        status,
        headers,
        body,
    })
}

fn contains(h: &[u8], n: &[u8]) -> bool {
    h.windows(n.len()).any(|w| w == n)
}

/// HTTP/2 client handshake on any stream; the connection is driven by a spawned task.
pub async fn h2_handshake<T>(io: T) -> Result<h2::client::SendRequest<Bytes>, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    h2_handshake_driven(io).await.map(|(send, _)| send)
}

/// [`h2_handshake`], also returning the task driving the connection: it finishes when the
/// connection does (closed by the peer, GOAWAY with nothing left open, or an error).
pub async fn h2_handshake_driven<T>(
    io: T,
) -> Result<(h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>), String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = tokio::time::timeout(IO_TIMEOUT, h2::client::handshake(io))
        .await
        .map_err(|_| "h2 handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, driver))
}

/// HTTP/2 over TLS to `addr` with SNI `sni`, verified against `ca`, ALPN `h2` only.
pub async fn h2_tls(
    addr: SocketAddr,
    sni: &str,
    ca: &Ca,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let conn = tls_connect(
        addr,
        Some(sni),
        &ClientOpts::default().verify(ca).alpn(&[b"h2"]),
    )
    .await?;
    if conn.alpn().as_deref() != Some(b"h2") {
        return Err(format!(
            "ALPN chose {:?}, not h2",
            conn.alpn()
                .map(|a| String::from_utf8_lossy(&a).into_owned())
        ));
    }
    conn.h2().await
}

/// HTTP/2 with prior knowledge (h2c) to `addr`.
pub async fn h2c(addr: SocketAddr) -> Result<h2::client::SendRequest<Bytes>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    h2_handshake(tcp).await
}

/// An HTTP/2 response, read to the end, with its trailers.
#[derive(Debug)]
pub struct H2Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub trailers: Option<http::HeaderMap>,
}

/// Send `req` (with `body`, if any) on a new stream and read the whole response.
pub async fn h2_send(
    send: &h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Option<Bytes>,
) -> Result<H2Response, String> {
    let fut = async {
        let e = |e: h2::Error| e.to_string();
        let mut send = send.clone().ready().await.map_err(e)?;
        let (resp, mut stream) = send.send_request(req, body.is_none()).map_err(e)?;
        if let Some(b) = body {
            stream.send_data(b, true).map_err(e)?;
        }
        let (parts, mut body) = resp.await.map_err(e)?.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(e)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(e)?;
        Ok(H2Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: data,
            trailers,
        })
    };
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .map_err(|_| "h2 request timed out".to_string())?
}

/// GET `uri` (absolute: its authority becomes `:authority`) on a new stream.
pub async fn h2_get(
    send: &h2::client::SendRequest<Bytes>,
    uri: &str,
) -> Result<H2Response, String> {
    let req = http::Request::builder()
        .method("GET")
        .uri(uri)
        .body(())
        .unwrap();
    h2_send(send, req, None).await
}

/// A gRPC-style unary call: POST `uri`, `content-type: application/grpc`, `te: trailers`,
/// one length-prefixed message.
pub async fn grpc_call(
    send: &h2::client::SendRequest<Bytes>,
    uri: &str,
) -> Result<H2Response, String> {
    let req = http::Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    h2_send(send, req, Some(Bytes::from_static(b"\0\0\0\0\x05world"))).await
}

/// A certificate verifier that accepts anything (signatures are still checked by ring).
#[derive(Debug)]
struct AcceptAnyCert;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
