//! TLS to the server with libpq's settings and meanings: `sslmode`
//! (`disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`),
//! `sslrootcert`, `sslcert` and `sslkey`, with libpq's environment
//! (`PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`) and default
//! files (`~/.postgresql/root.crt`, `postgresql.crt`, `postgresql.key`).
//!
//! rustls on the ring provider, through tokio-postgres-rustls. What each
//! mode checks of the server's certificate, as libpq does:
//! - `disable`: no TLS; `allow`: none first, TLS if the server refuses
//!   that; `prefer` (the default): TLS if the server offers it, else none.
//! - `allow`, `prefer`, `require`: nothing, unless a root certificate file
//!   exists (given or the default one): then the chain, as `verify-ca`.
//! - `verify-ca`: the chain up to a root of `sslrootcert` (which must
//!   exist), not the name.
//! - `verify-full`: the chain and the host name (its subjectAltName).
//!
//! The handshake's signatures are always checked. Unix sockets never use
//! TLS (libpq ignores `sslmode` for them). Errors name files, never what
//! is in them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::TlsError;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS settings of a target, defaults filled in.
#[derive(Clone, Debug)]
pub(crate) struct Tls {
    pub mode: SslMode,
    /// Whether `sslmode` was given (in the target or `PGSSLMODE`).
    pub mode_given: bool,
    pub rootcert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The settings given in a target, before defaults.
#[derive(Default)]
pub(crate) struct Given {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

impl Given {
    /// Takes `key=value` if it is one of ours; whether it was.
    pub fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

fn env_or(given: Option<String>, var: &str) -> Option<String> {
    given.or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()))
}

impl Tls {
    /// The settings, with libpq's environment and default files; `Err`
    /// with what is wrong.
    pub fn resolve(given: Given) -> Result<Tls, String> {
        let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql"));
        let file = |v: Option<String>, var: &str, default: &str| match env_or(v, var) {
            Some(p) => Some(PathBuf::from(p)),
            None => home.as_ref().map(|h| h.join(default)),
        };
        let mode_text = env_or(given.sslmode, "PGSSLMODE");
        let mode = match &mode_text {
            Some(m) => SslMode::parse(m).ok_or_else(|| {
                format!(
                    "invalid sslmode {m:?}: disable, allow, prefer, require, verify-ca or verify-full"
                )
            })?,
            None => SslMode::Prefer,
        };
        let rootcert = file(given.sslrootcert, "PGSSLROOTCERT", "root.crt");
        if rootcert.as_deref() == Some(Path::new("system")) {
            return Err(
                "sslrootcert=system (the system's roots) is not supported: name a file".into(),
            );
        }
        Ok(Tls {
            mode,
            mode_given: mode_text.is_some(),
            rootcert,
            cert: file(given.sslcert, "PGSSLCERT", "postgresql.crt"),
            key: file(given.sslkey, "PGSSLKEY", "postgresql.key"),
        })
    }

    /// The client configuration for a handshake under these settings.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        // ring has no post-quantum key exchange (rustls deprecates its
        // provider for that); aws-lc-rs, which has, needs cmake to build,
        // which the manylinux wheel's cross-build lacks.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // The roots: needed to verify; with a weaker mode, used when the
        // file exists (libpq: `require` with a root file acts as
        // `verify-ca`).
        let verify = matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull);
        let root_path = self.rootcert.as_deref().filter(|p| verify || p.exists());
        let verifier: Arc<dyn ServerCertVerifier> =
            match root_path {
                None if verify => return Err(TlsError::Files(
                    "no root certificate file (sslrootcert, or ~/.postgresql/root.crt) to verify \
                     the server with: give one, or choose sslmode=require"
                        .into(),
                )),
                None => Arc::new(AnyCertificate(provider.clone())),
                Some(path) => {
                    let mut roots = RootCertStore::empty();
                    for cert in read_certs(path, "root certificate")? {
                        roots.add(cert).map_err(|e| {
                            TlsError::Files(format!(
                                "root certificate file {}: unusable certificate ({e})",
                                path.display()
                            ))
                        })?;
                    }
                    let webpki = WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| {
                        TlsError::Files(format!("root certificate file {}: {e}", path.display()))
                    })?;
                    if self.mode == SslMode::VerifyFull {
                        webpki
                    } else {
                        Arc::new(ChainOnly(webpki))
                    }
                }
            };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Handshake(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match self.client_cert()? {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
                TlsError::Files(format!(
                    "client certificate {} and key {} do not go together: {}",
                    shown_path(&self.cert),
                    shown_path(&self.key),
                    scrub(&e)
                ))
            })?,
            None => builder.with_no_client_auth(),
        };
        // As libpq 17 does; needed for `sslnegotiation=direct`.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(config)
    }

    /// The client certificate and key, when the certificate file exists
    /// (libpq goes on without one otherwise).
    #[allow(clippy::type_complexity)]
    fn client_cert(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
        let Some(cert) = self.cert.as_deref().filter(|p| p.exists()) else {
            return Ok(None);
        };
        let certs = read_certs(cert, "client certificate")?;
        let Some(key) = self.key.as_deref().filter(|p| p.exists()) else {
            return Err(TlsError::Files(format!(
                "client certificate {} present, but no private key file {}",
                cert.display(),
                shown_path(&self.key)
            )));
        };
        check_key_mode(key)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            TlsError::Files(format!(
                "private key file {}: {}",
                key.display(),
                pem_problem(&e)
            ))
        })?;
        Ok(Some((certs, key)))
    }
}

fn shown_path(p: &Option<PathBuf>) -> String {
    p.as_deref()
        .map_or_else(|| "(none)".into(), |p| p.display().to_string())
}

/// rustls's message for a bad client key, which names no key material.
fn scrub(e: &rustls::Error) -> String {
    match e {
        rustls::Error::General(_) => "the key is not usable with the certificate".into(),
        e => e.to_string(),
    }
}

/// libpq refuses a private key that others may read: with group or world
/// access, unless owned by root and at most group-readable.
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        TlsError::Files(format!("private key file {}: {}", path.display(), e.kind()))
    })?;
    let mode = meta.mode();
    let loose = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if loose {
        return Err(TlsError::Files(format!(
            "private key file {} has group or world access; permissions should be u=rw (0600) or less",
            path.display()
        )));
    }
    Ok(())
}

/// What is wrong with a PEM file, without any of its text (some of
/// rustls's messages quote a line of it).
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(e) => format!("cannot be read ({})", e.kind()),
        E::NoItemsFound => "no PEM item of the expected kind in it".into(),
        _ => "not a well-formed PEM file".into(),
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::Files(format!("{what} file {}: {why}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(pem_problem(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

/// `require` and `prefer` without roots: any certificate, but the
/// handshake's signatures are still checked (the session is encrypted to
/// whoever holds the certificate's key).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain, not the name (webpki checks the name last, once
/// the chain is good).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Ask the server for TLS over a fresh connection (the `SSLRequest`):
/// whether it agreed.
pub(crate) async fn negotiate<S>(s: &mut S) -> io::Result<bool>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Length 8, then the code 1234 5679.
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8u32.to_be_bytes());
    req[4..].copy_from_slice(&80_877_103u32.to_be_bytes());
    s.write_all(&req).await?;
    s.flush().await?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok(true),
        b'N' => Ok(false),
        // An error message: a server too old for the request (none now).
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected answer to the request for TLS",
        )),
    }
}

/// The handshake over `s`, for `host`.
pub(crate) async fn handshake<S>(
    tls: &Tls,
    host: &str,
    s: S,
) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = tls.client_config()?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::Handshake(format!("{host:?} is not a host name for TLS")))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, s)
        .await
        .map_err(|e| match classify(&e, host) {
            TlsError::NotTrusted(why) => TlsError::NotTrusted(match &tls.rootcert {
                Some(roots) if roots.exists() => format!("{why} (roots: {})", roots.display()),
                _ => why,
            }),
            e => e,
        })
}

/// What a failed handshake was.
fn classify(e: &io::Error, host: &str) -> TlsError {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => TlsError::NameMismatch(host.to_string()),
        Some(rustls::Error::InvalidCertificate(c)) => TlsError::NotTrusted(format!("{c:?}")),
        Some(e) => TlsError::Handshake(e.to_string()),
        None => TlsError::Handshake(format!("{} ({})", e, e.kind())),
    }
}
