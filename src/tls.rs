//! TLS material, loaded and checked while the configuration is validated (so a bad file is a
//! located error, never a panic inside Pingora): listener certificates chosen by SNI, and the
//! TLS settings of upstream connections.
//!
//! Listener certificates live behind an [`SniResolver`] that the listener keeps for its whole
//! life; a reload builds a new [`CertStore`] from the files and swaps it in, so new handshakes
//! get the new certificates while open connections keep theirs.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert, RusTlsError};
use pingora::utils::tls::{CertKey, WrappedX509, parse_x509};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of one TLS listener, by the names they serve.
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.org` is stored under `example.org`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// The first certificate: served without SNI or for unknown names (unless rejecting).
    default: Arc<CertifiedKey>,
    reject_unknown: bool,
    /// For the admin API: each certificate's file and names.
    pub summary: Vec<CertSummary>,
}

/// What `/config` shows of a listener certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Certificate chain file.
    pub cert: String,
    /// Private key file.
    pub key: String,
    /// Names it is chosen for.
    pub names: Vec<String>,
    /// Its expiry, as the certificate states it.
    pub not_after: String,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("certificates", &self.summary)
            .field("reject_unknown", &self.reject_unknown)
            .finish()
    }
}

impl CertStore {
    /// Whether unknown names fail the handshake.
    pub fn reject_unknown(&self) -> bool {
        self.reject_unknown
    }

    /// The certificate for a ClientHello's server name (already lower case), if any.
    pub fn select(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.');
            if let Some(c) = self.exact.get(name) {
                return Some(Arc::clone(c));
            }
            // A wildcard covers exactly one label (RFC 6125 §6.4.3).
            if let Some((_, parent)) = name.split_once('.')
                && let Some(c) = self.wildcard.get(parent)
            {
                return Some(Arc::clone(c));
            }
            if self.reject_unknown {
                return None;
            }
        } else if self.reject_unknown {
            return None;
        }
        Some(Arc::clone(&self.default))
    }
}

/// The listener's certificate resolver: a [`CertStore`] that reloads swap.
#[derive(Debug)]
pub struct SniResolver(ArcSwap<CertStore>);

impl SniResolver {
    /// A resolver serving `store`.
    pub fn new(store: Arc<CertStore>) -> Self {
        Self(ArcSwap::new(store))
    }

    /// Serve `store` from the next handshake on.
    pub fn swap(&self, store: Arc<CertStore>) {
        self.0.store(store);
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().select(hello.server_name())
    }
}

/// One `certificates:` entry, as written.
pub struct CertificateFiles<'a> {
    /// Certificate chain (PEM, leaf first).
    pub cert: &'a str,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: &'a str,
    /// Names to serve it for instead of its DNS subject alternative names.
    pub names: Option<&'a [String]>,
}

/// A problem with one file: which key of the entry it belongs to, and what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct FileError {
    /// `cert`, `key`, `names`, `ca_file`, `client_cert` or `client_key`.
    pub key: &'static str,
    /// The message.
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> FileError {
    FileError {
        key,
        message: message.into(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .expect("the ring provider was just installed")
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| err(key, format!("cannot read {path}: {e}")))
}

/// Every certificate in a PEM file, each checked to be X.509 (Pingora's helpers panic on bad DER).
fn certificates(key: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(key, format!("{path} is not a valid PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c).map_err(|e| {
            err(
                key,
                format!("certificate {} in {path} is not valid X.509 ({e})", i + 1),
            )
        })?;
    }
    Ok(certs)
}

fn private_key(key: &'static str, path: &str) -> Result<PrivateKeyDer<'static>, FileError> {
    let pem = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        err(
            key,
            format!("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })
}

/// The chain and key as a rustls signing identity, the key checked against the leaf.
fn certified_key(
    files: (&'static str, &str, &'static str, &str),
) -> Result<
    (
        CertifiedKey,
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    ),
    FileError,
> {
    let (cert_key, cert, key_key, key) = files;
    let chain = certificates(cert_key, cert)?;
    let private = private_key(key_key, key)?;
    CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider())
        .map(|c| (c, chain, private))
        .map_err(|e| match e {
            RusTlsError::InconsistentKeys(_) => err(
                key_key,
                format!("{key} is not the private key of the certificate in {cert}"),
            ),
            other => err(key_key, format!("{key}: unusable private key ({other})")),
        })
}

/// DNS names of a certificate (subject alternative names), lower case.
fn dns_names(leaf: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn not_after(leaf: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.validity().not_after.to_string())
        .unwrap_or_default()
}

/// A name `names:` may hold: a DNS name, or `*.` and one.
fn valid_name(n: &str) -> bool {
    let host = n.strip_prefix("*.").unwrap_or(n);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Load a listener's certificates. Errors come back with the index of the entry they concern.
pub fn cert_store(
    entries: &[CertificateFiles<'_>],
    reject_unknown: bool,
) -> Result<CertStore, Vec<(usize, FileError)>> {
    let mut errors = Vec::new();
    let mut exact: HashMap<String, Arc<CertifiedKey>> = HashMap::new();
    let mut wildcard: HashMap<String, Arc<CertifiedKey>> = HashMap::new();
    let mut owner: HashMap<String, usize> = HashMap::new();
    let mut default = None;
    let mut summary = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let (certified, chain, _) = match certified_key(("cert", e.cert, "key", e.key)) {
            Ok(c) => c,
            Err(fe) => {
                errors.push((i, fe));
                continue;
            }
        };
        let names: Vec<String> = match e.names {
            Some(list) => list.iter().map(|n| n.to_ascii_lowercase()).collect(),
            None => dns_names(&chain[0]),
        };
        if let Some(bad) = names.iter().find(|n| !valid_name(n)) {
            errors.push((
                i,
                err(
                    "names",
                    format!("{bad:?} is not a DNS name or a *.wildcard of one"),
                ),
            ));
            continue;
        }
        if names.is_empty() && i > 0 {
            errors.push((
                i,
                err(
                    "names",
                    format!(
                        "{} has no DNS names (subject alternative names): only the first \
                         certificate can serve without one; list its names in names:",
                        e.cert
                    ),
                ),
            ));
            continue;
        }
        let certified = Arc::new(certified);
        for n in &names {
            if let Some(prev) = owner.get(n) {
                errors.push((
                    i,
                    err(
                        "names",
                        format!("{n} is also served by certificates[{prev}]"),
                    ),
                ));
                continue;
            }
            owner.insert(n.clone(), i);
            match n.strip_prefix("*.") {
                Some(parent) => wildcard.insert(parent.to_string(), Arc::clone(&certified)),
                None => exact.insert(n.clone(), Arc::clone(&certified)),
            };
        }
        default.get_or_insert_with(|| Arc::clone(&certified));
        summary.push(CertSummary {
            cert: e.cert.to_string(),
            key: e.key.to_string(),
            names,
            not_after: not_after(&chain[0]),
        });
    }
    match default {
        Some(default) if errors.is_empty() => Ok(CertStore {
            exact,
            wildcard,
            default,
            reject_unknown,
            summary,
        }),
        _ => Err(errors),
    }
}

/// TLS towards an upstream's backends, loaded and checked.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Server name sent and verified; `None`: the discovery name, else the backend address.
    pub sni: Option<String>,
    /// Verify the certificate chain.
    pub verify: bool,
    /// Verify the name.
    pub verify_hostname: bool,
    /// Trusted roots instead of the system's.
    pub ca: Option<Arc<[WrappedX509]>>,
    /// Client certificate and key (mTLS).
    pub client: Option<Arc<CertKey>>,
    /// Files and settings in force: also the connection-pool group, so a connection opened
    /// under other TLS settings is never reused (Pingora's pool key ignores the CA).
    pub fingerprint: u64,
    /// For `/config`.
    pub ca_file: Option<String>,
    /// For `/config`.
    pub client_cert: Option<String>,
    /// Watched for changes.
    pub client_key: Option<String>,
    /// The same trust and identity for the gateway's own connections (HTTP health checks).
    pub client_config: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .field("verify_hostname", &self.verify_hostname)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

/// The files of an upstream's `tls:` section, as written.
pub struct UpstreamTlsFiles<'a> {
    /// `sni`.
    pub sni: Option<&'a str>,
    /// `verify`.
    pub verify: bool,
    /// `verify_hostname`.
    pub verify_hostname: bool,
    /// `ca_file`.
    pub ca_file: Option<&'a str>,
    /// `client_cert`.
    pub client_cert: Option<&'a str>,
    /// `client_key`.
    pub client_key: Option<&'a str>,
}

/// Load an upstream's TLS files.
pub fn upstream_tls(f: &UpstreamTlsFiles<'_>) -> Result<UpstreamTls, Vec<FileError>> {
    let mut errors = Vec::new();
    let mut h = DefaultHasher::new();
    (f.sni, f.verify, f.verify_hostname).hash(&mut h);
    // Every file is read once: traffic, health checks and the fingerprint see the same bytes.
    let ca_certs = match f.ca_file.map(|path| certificates("ca_file", path)) {
        Some(Ok(certs)) => Some(certs),
        Some(Err(e)) => {
            errors.push(e);
            None
        }
        None => None,
    };
    let ca: Option<Arc<[WrappedX509]>> = ca_certs.as_ref().map(|certs| {
        for c in certs {
            c.as_ref().hash(&mut h);
        }
        certs
            .iter()
            .map(|c| WrappedX509::new(c.to_vec(), parse_x509))
            .collect::<Vec<_>>()
            .into()
    });
    let mut identity = None;
    let client = match (f.client_cert, f.client_key) {
        (None, None) => None,
        (Some(_), None) => {
            errors.push(err("client_key", "client_cert needs client_key"));
            None
        }
        (None, Some(_)) => {
            errors.push(err("client_cert", "client_key needs client_cert"));
            None
        }
        (Some(cert), Some(key)) => match certified_key(("client_cert", cert, "client_key", key)) {
            Ok((_, chain, private)) => {
                let key_der = private.secret_der().to_vec();
                for c in &chain {
                    c.as_ref().hash(&mut h);
                }
                key_der.hash(&mut h);
                let certkey = CertKey::new(chain.iter().map(|c| c.to_vec()).collect(), key_der);
                identity = Some((chain, private));
                Some(Arc::new(certkey))
            }
            Err(e) => {
                errors.push(e);
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let client_config = client_config(f, ca_certs, identity).map_err(|e| vec![e])?;
    Ok(UpstreamTls {
        client_config,
        sni: f.sni.map(str::to_string),
        verify: f.verify,
        verify_hostname: f.verify_hostname,
        ca,
        client,
        fingerprint: h.finish() | 1,
        ca_file: f.ca_file.map(str::to_string),
        client_cert: f.client_cert.map(str::to_string),
        client_key: f.client_key.map(str::to_string),
    })
}

/// A rustls client configuration with an upstream's trust settings and client identity.
fn client_config(
    f: &UpstreamTlsFiles<'_>,
    ca: Option<Vec<CertificateDer<'static>>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, FileError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certs) => {
            for c in certs {
                roots.add(c).map_err(|e| {
                    err(
                        "ca_file",
                        format!("{}: unusable CA ({e})", f.ca_file.unwrap_or_default()),
                    )
                })?;
            }
        }
        None => {
            // What Pingora's connector loads: rustls-native-certs (honours SSL_CERT_FILE/DIR).
            // Unparsable system certificates are skipped, as an empty store only fails checks.
            if let Ok(native) = pingora::tls::load_native_certs() {
                let _ = roots.add_parsable_certificates(native);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| err("ca_file", e.to_string()))?;
    let lenient = |inner| Lenient {
        inner,
        provider: Arc::clone(&provider),
    };
    let builder = if !f.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(lenient(None)))
    } else {
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| {
            err(
                "ca_file",
                format!("no usable root certificate ({e}); set ca_file"),
            )
        })?;
        if f.verify_hostname {
            builder.with_webpki_verifier(webpki)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(lenient(Some(webpki))))
        }
    };
    let config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| err("client_key", e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `verify: false` (no `inner`: any certificate) or `verify_hostname: false` (the chain is
/// verified, the name is not). Handshake signatures are always checked.
#[derive(Debug)]
struct Lenient {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_may_be_served() {
        for ok in ["a.test", "*.example.org", "x-1.y", "localhost"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "*.", "a..b", "*.*.a", "-a.b", "a_b.c", "a b", "*a.b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
