//! TLS 1.3 with mutual authentication on every migration channel (rustls, ring as the crypto
//! provider), with QEMU's interface: a `tls-creds-x509` object names a directory holding
//! `ca-cert.pem` and the endpoint's `server-cert.pem`/`server-key.pem` or
//! `client-cert.pem`/`client-key.pem`; the migration parameters `tls-creds`, `tls-hostname`
//! (the name the target's certificate must carry; by default the URI's host) and `tls-authz` (a
//! name the source's certificate must carry).
//!
//! The handshake runs on each connection before a byte of the stream is read. TLS 1.3 finishes
//! the client's side of the handshake before the server has looked at the client's certificate,
//! so the target then sends one byte, [`ACCEPTED`], and the source waits for it: a refused
//! source learns why (the alert) instead of finding its first write cut.
//!
//! The session is shared by the connection's handles (the sender, the return-path reader, the
//! canceller): plaintext goes through rustls under a short lock, and the socket is read and
//! written outside it, so that a reader blocked on the socket never holds up a writer, nor a
//! writer blocked on a full socket a reader. Session tickets are not sent (nothing resumes).

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Connection, Endpoint};
use crate::MigrateError;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

mod stream;
pub use stream::{Sock, TlsStream};

/// What the target sends once it has accepted the source's certificate.
pub const ACCEPTED: u8 = 1;
/// How long the target gives one connection for its handshake: a peer that dawdles (or never
/// finishes) holds the listener no longer than this.
const SERVER_HANDSHAKE: Duration = Duration::from_secs(10);
/// How long the source waits for its handshake and the target's acceptance: longer than the
/// target's, so that a connection queued behind a dawdling one still gets its turn.
const CLIENT_HANDSHAKE: Duration = Duration::from_secs(30);

/// Which side of a migration the credentials are for (QEMU's `endpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// The target (it listens).
    Server,
    /// The source (it connects).
    Client,
}

impl TlsEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsEndpoint::Server => "server",
            TlsEndpoint::Client => "client",
        }
    }
}

/// A loaded `tls-creds-x509` object.
#[derive(Clone)]
pub struct TlsCreds {
    pub id: String,
    pub dir: PathBuf,
    pub endpoint: TlsEndpoint,
    /// The server asks for, and checks, the client's certificate (QEMU's default: on).
    pub verify_peer: bool,
    roots: Arc<RootCertStore>,
    /// `ca-crl.pem`, if the directory has one (as QEMU's): revoked peers are refused.
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// Our certificate chain and key (a client without them can only talk to a server that does
    /// not verify peers).
    identity: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
}

impl fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCreds")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

/// ring as the provider. rustls 0.23.48 deprecates ring's provider for lacking post-quantum key
/// exchange; aws-lc-rs has it but brings a C library build of its own into every build of tern.
/// A migration session lives seconds and carries no secret meant to outlive the guest's move, so
/// ring stays until a post-quantum ring or a lighter aws-lc build is there.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

impl TlsCreds {
    /// Reads `dir`'s files for `endpoint` now, so that a missing or bad file is named when the
    /// object is made, not when a migration starts.
    pub fn load(
        id: &str,
        dir: &Path,
        endpoint: TlsEndpoint,
        verify_peer: bool,
    ) -> Result<TlsCreds, String> {
        if !dir.is_dir() {
            return Err(format!(
                "tls-creds-x509 {id}: {} is not a directory",
                dir.display()
            ));
        }
        let mut roots = RootCertStore::empty();
        for c in certs(&dir.join("ca-cert.pem"))? {
            roots
                .add(c)
                .map_err(|e| format!("{}/ca-cert.pem: {e}", dir.display()))?;
        }
        let crl = dir.join("ca-crl.pem");
        let crls = if crl.exists() {
            CertificateRevocationListDer::pem_file_iter(&crl)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", crl.display()))?
        } else {
            Vec::new()
        };
        let name = endpoint.as_str();
        let (cert, key) = (
            dir.join(format!("{name}-cert.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        let identity = if endpoint == TlsEndpoint::Client && !cert.exists() && !key.exists() {
            None
        } else {
            let chain = certs(&cert)?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| format!("{}: {e}", key.display()))?;
            Some((chain, Arc::new(key)))
        };
        let creds = TlsCreds {
            id: id.into(),
            dir: dir.into(),
            endpoint,
            verify_peer,
            roots: Arc::new(roots),
            crls,
            identity,
        };
        // Build a configuration once: a key that does not match its certificate is named now.
        TlsSettings::new(Arc::new(creds.clone()), None, None)?;
        Ok(creds)
    }
}

/// A migration's TLS: the credentials, the names to check, and the configuration built from them
/// once (every connection of the migration uses it).
#[derive(Clone)]
pub struct TlsSettings {
    pub creds: Arc<TlsCreds>,
    /// The name the target's certificate must carry (the source's `tls-hostname`).
    pub hostname: Option<String>,
    /// A name the source's certificate must carry (the target's `tls-authz`).
    pub authz: Option<String>,
    config: Config,
}

#[derive(Clone)]
enum Config {
    Server(Arc<ServerConfig>),
    Client(Arc<ClientConfig>),
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("creds", &self.creds)
            .field("hostname", &self.hostname)
            .field("authz", &self.authz)
            .finish()
    }
}

/// The client-certificate verifier with `tls-authz`: WebPKI's checks, then the name.
#[derive(Debug)]
struct Authz {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for Authz {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_is_valid_for_subject_name(&self.name)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn name_of(s: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(s.to_string()).map_err(|_| format!("'{s}' is not a host name or address"))
}

impl TlsSettings {
    /// Checks the names and builds the configuration for the credentials' endpoint: every
    /// mistake is the operator's and is named now, not at each connection.
    pub fn new(
        creds: Arc<TlsCreds>,
        hostname: Option<String>,
        authz: Option<String>,
    ) -> Result<TlsSettings, String> {
        if let Some(h) = &hostname {
            name_of(h).map_err(|e| format!("tls-hostname: {e}"))?;
        }
        let config = match creds.endpoint {
            TlsEndpoint::Server => Config::Server(server_config(&creds, authz.as_deref())?),
            TlsEndpoint::Client => Config::Client(client_config(&creds)?),
        };
        Ok(TlsSettings {
            creds,
            hostname,
            authz,
            config,
        })
    }

    /// Which side these credentials are for.
    pub fn endpoint(&self) -> TlsEndpoint {
        self.creds.endpoint
    }

    /// Refuses credentials made for the other side (QEMU: "Expecting TLS credentials with a
    /// server endpoint").
    pub fn expect(&self, endpoint: TlsEndpoint) -> Result<(), String> {
        if self.creds.endpoint == endpoint {
            return Ok(());
        }
        Err(format!(
            "tls-creds {} has endpoint={}; the {} of a migration needs endpoint={}",
            self.creds.id,
            self.creds.endpoint.as_str(),
            match endpoint {
                TlsEndpoint::Server => "target",
                TlsEndpoint::Client => "source",
            },
            endpoint.as_str()
        ))
    }

    /// The source's handshake on `sock`, connected to `host` (the URI's; `tls-hostname` takes
    /// precedence); returns once the target has accepted us.
    pub fn client(&self, mut sock: Sock, host: Option<&str>) -> Result<TlsStream, String> {
        let host =
            self.hostname.as_deref().or(host).ok_or(
                "tls-hostname is needed for this URI (the name in the target's certificate)",
            )?;
        let name = name_of(host).map_err(|e| format!("tls-hostname: {e}"))?;
        self.expect(TlsEndpoint::Client)?;
        let Config::Client(cfg) = &self.config else {
            return Err("tls-creds: not a client's".into());
        };
        let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
        let mut conn = rustls::Connection::from(conn);
        let deadline = Instant::now() + CLIENT_HANDSHAKE;
        handshake(&mut conn, &mut sock, deadline).map_err(|e| explain(&e, TlsEndpoint::Client))?;
        set_timeouts(&sock, deadline).map_err(|e| e.to_string())?;
        let s = TlsStream::new(sock, conn);
        let mut b = [0u8; 1];
        match (&s).read(&mut b) {
            Ok(1) if b[0] == ACCEPTED => Ok(s),
            Ok(_) => Err("the target closed the connection after the TLS handshake".into()),
            Err(e) => Err(format!(
                "the target refused us after the TLS handshake: {}",
                explain(&e, TlsEndpoint::Client)
            )),
        }
    }

    /// The target's handshake on `sock`: the source's certificate is checked (and its name,
    /// with `tls-authz`), then [`ACCEPTED`] goes out.
    pub fn server(&self, mut sock: Sock) -> Result<TlsStream, String> {
        self.expect(TlsEndpoint::Server)?;
        let Config::Server(cfg) = &self.config else {
            return Err("tls-creds: not a server's".into());
        };
        let conn = rustls::ServerConnection::new(cfg.clone()).map_err(|e| e.to_string())?;
        let mut conn = rustls::Connection::from(conn);
        let deadline = Instant::now() + SERVER_HANDSHAKE;
        handshake(&mut conn, &mut sock, deadline).map_err(|e| {
            let why = explain(&e, TlsEndpoint::Server);
            match (&self.authz, rustls_error(&e)) {
                (
                    Some(n),
                    Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)),
                ) => format!("the source's certificate is not for '{n}' (tls-authz)"),
                _ => why,
            }
        })?;
        let s = TlsStream::new(sock, conn);
        (&s).write_all(&[ACCEPTED]).map_err(|e| e.to_string())?;
        Ok(s)
    }
}

fn server_config(c: &TlsCreds, authz: Option<&str>) -> Result<Arc<ServerConfig>, String> {
    let (chain, key) = c
        .identity
        .clone()
        .ok_or_else(|| format!("tls-creds-x509 {}: no server-cert.pem/server-key.pem", c.id))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let builder = if c.verify_peer {
        let mut b = WebPkiClientVerifier::builder_with_provider(c.roots.clone(), provider());
        if !c.crls.is_empty() {
            b = b
                .with_crls(c.crls.clone())
                .allow_unknown_revocation_status();
        }
        let webpki = b
            .build()
            .map_err(|e| format!("tls-creds-x509 {}: {e}", c.id))?;
        let verifier: Arc<dyn ClientCertVerifier> = match authz {
            None => webpki,
            Some(n) => Arc::new(Authz {
                inner: webpki,
                name: name_of(n).map_err(|e| format!("tls-authz: {e}"))?,
            }),
        };
        builder.with_client_cert_verifier(verifier)
    } else {
        if authz.is_some() {
            return Err(format!(
                "tls-authz needs verify-peer=on in tls-creds-x509 {}",
                c.id
            ));
        }
        builder.with_no_client_auth()
    };
    let mut cfg = builder
        .with_single_cert(chain, key.clone_key())
        .map_err(|e| format!("tls-creds-x509 {}: {e}", c.id))?;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

fn client_config(c: &TlsCreds) -> Result<Arc<ClientConfig>, String> {
    // The target's certificate is always checked (a client's verify-peer=off is not
    // honoured: a source never sends a guest to a peer it cannot name).
    let mut v = WebPkiServerVerifier::builder_with_provider(c.roots.clone(), provider());
    if !c.crls.is_empty() {
        v = v
            .with_crls(c.crls.clone())
            .allow_unknown_revocation_status();
    }
    let verifier = v
        .build()
        .map_err(|e| format!("tls-creds-x509 {}: {e}", c.id))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_webpki_verifier(verifier);
    let cfg = match c.identity.clone() {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key.clone_key())
            .map_err(|e| format!("tls-creds-x509 {}: {e}", c.id))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// Sets the socket's timeouts to what is left until `deadline`.
fn set_timeouts(sock: &Sock, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "handshake deadline",
        ));
    }
    sock.set_read_timeout(Some(left))?;
    sock.set_write_timeout(Some(left))
}

/// The handshake, all of it before `deadline` (a timeout per read would let a peer that sends a
/// byte now and then hold us for ever).
fn handshake(conn: &mut rustls::Connection, sock: &mut Sock, deadline: Instant) -> io::Result<()> {
    while conn.is_handshaking() {
        set_timeouts(sock, deadline)?;
        conn.complete_io(sock)?;
    }
    // The server's last flight (or an alert) must leave before we wait for anything.
    while conn.wants_write() {
        set_timeouts(sock, deadline)?;
        conn.write_tls(sock)?;
    }
    Ok(())
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A handshake failure in words: which side's certificate, and why.
fn explain(e: &io::Error, us: TlsEndpoint) -> String {
    let peer = match us {
        TlsEndpoint::Server => "the source",
        TlsEndpoint::Client => "the target",
    };
    match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            let why = match c {
                CertificateError::UnknownIssuer => "it is not signed by our CA (ca-cert.pem)",
                CertificateError::NotValidForName => {
                    "it is not for the name we expect (tls-hostname)"
                }
                CertificateError::Expired => "it has expired",
                CertificateError::NotValidYet => "it is not valid yet",
                CertificateError::BadSignature => "its signature is wrong",
                _ => "it is not valid",
            };
            format!("TLS: {peer}'s certificate was refused: {why} ({c:?})")
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            format!("TLS: {peer} presented no certificate (verify-peer is on here)")
        }
        Some(rustls::Error::AlertReceived(a)) => {
            let hint = match (us, a) {
                (TlsEndpoint::Client, rustls::AlertDescription::BadCertificate) => {
                    ": our certificate is not one it takes (its CA, or its tls-authz)"
                }
                (TlsEndpoint::Client, rustls::AlertDescription::UnknownCA) => {
                    ": our certificate is not signed by its CA"
                }
                (TlsEndpoint::Client, rustls::AlertDescription::CertificateRequired) => {
                    ": it wants a certificate and we have none (client-cert.pem)"
                }
                _ => "",
            };
            format!("TLS: {peer} refused us ({a:?}){hint}")
        }
        Some(other) => format!("TLS: {other}"),
        None if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) =>
        {
            format!("TLS: no answer from {peer} in time (the handshake has a deadline)")
        }
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            format!("TLS: {peer} closed the connection during the handshake (does it use TLS?)")
        }
        None => format!("TLS: {e}"),
    }
}

impl Connection {
    /// The socket under a connection nobody else holds yet (a fresh one).
    fn into_sock(self) -> crate::Result<Sock> {
        let ep = Arc::try_unwrap(self.0)
            .map_err(|_| MigrateError::Vm("TLS: the connection is already shared".into()))?;
        let sock = match ep {
            Endpoint::Tcp(s) => Sock::Tcp(s),
            Endpoint::Unix(s, _) => Sock::Unix(s),
            Endpoint::File(_) => {
                return Err(MigrateError::Vm(
                    "TLS needs a socket: tcp:, unix:, or an fd: that is a socket".into(),
                ))
            }
            Endpoint::Tls(_) => {
                return Err(MigrateError::Vm(
                    "TLS: the connection is already secured".into(),
                ))
            }
        };
        Ok(sock)
    }

    fn secured(s: TlsStream) -> crate::Result<Connection> {
        s.sock
            .set_read_timeout(None)
            .and_then(|_| s.sock.set_write_timeout(None))
            .map_err(MigrateError::io("clearing the TLS handshake's timeout"))?;
        Ok(Connection(Arc::new(Endpoint::Tls(Box::new(s)))))
    }

    /// The source's side: the handshake with the target at `host` (the URI's host, if any).
    pub fn tls_client(self, tls: &TlsSettings, host: Option<&str>) -> crate::Result<Connection> {
        let sock = self.into_sock()?;
        let s = tls.client(sock, host).map_err(MigrateError::Vm)?;
        Connection::secured(s)
    }

    /// The target's side: the handshake with a source, which must present a certificate our CA
    /// signed (and, with `tls-authz`, for that name).
    pub fn tls_server(self, tls: &TlsSettings) -> crate::Result<Connection> {
        let sock = self.into_sock()?;
        let s = tls.server(sock).map_err(MigrateError::Vm)?;
        Connection::secured(s)
    }
}
