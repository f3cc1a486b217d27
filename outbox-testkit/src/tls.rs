//! Certificates for TLS tests, and a TLS terminator for servers that speak no TLS.
//!
//! [`Certificates::generate`] writes a certificate authority, a server certificate for
//! `localhost` and `127.0.0.1` signed by it, and a second, unrelated authority for the tests
//! that check that a client trusting another authority is refused.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_testkit::tls::{Certificates, TlsTerminator};
//!
//! let dir = std::env::temp_dir().join(outbox_testkit::env::unique_name("doc_tls"));
//! let certs = Certificates::generate(&dir)?;
//! assert!(certs.ca.is_file() && certs.cert.is_file() && certs.key.is_file());
//! assert!(certs.other_ca.is_file());
//!
//! // A server that speaks no TLS, reached over TLS through the terminator.
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let terminator = TlsTerminator::start(server.local_addr()?, &certs).await?;
//! assert_ne!(terminator.addr(), server.local_addr()?);
//! # drop(terminator);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The files [`Certificates::generate`] wrote, all PEM.
#[derive(Clone, Debug)]
pub struct Certificates {
    /// The directory holding the files.
    pub dir: PathBuf,
    /// The authority that signed the server certificate (`ca.pem`).
    pub ca: PathBuf,
    /// The server certificate, for `localhost` and `127.0.0.1` (`server.pem`).
    pub cert: PathBuf,
    /// The server certificate's private key, PKCS#8 (`server-key.pem`).
    pub key: PathBuf,
    /// Another authority, which signed nothing here (`other-ca.pem`): a client trusting it
    /// only must refuse the server.
    pub other_ca: PathBuf,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl Certificates {
    /// Creates `dir` if needed and writes the authority, the server certificate and key, and
    /// the other authority into it.
    pub fn generate(dir: &Path) -> Result<Self, String> {
        let fail = |what: &str, err: &dyn std::fmt::Display| format!("{what}: {err}");
        std::fs::create_dir_all(dir).map_err(|e| fail(&dir.display().to_string(), &e))?;
        let write = |name: &str, pem: String| -> Result<PathBuf, String> {
            let path = dir.join(name);
            std::fs::write(&path, pem).map_err(|e| fail(&path.display().to_string(), &e))?;
            Ok(path)
        };
        let (ca, ca_key) = authority("outbox test CA")?;
        let (other, _) = authority("outbox test CA (untrusted)")?;
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(|e| fail("server certificate parameters", &e))?;
        let key = KeyPair::generate().map_err(|e| fail("server key", &e))?;
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .map_err(|e| fail("server certificate", &e))?;
        Ok(Self {
            dir: dir.to_owned(),
            ca: write("ca.pem", ca.pem())?,
            cert: write("server.pem", cert.pem())?,
            key: write("server-key.pem", key.serialize_pem())?,
            other_ca: write("other-ca.pem", other.pem())?,
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// A rustls server configuration presenting the server certificate.
    pub fn server_config(&self) -> Result<ServerConfig, String> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .map_err(|e| format!("server certificate: {e}"))
    }
}

fn authority(name: &str) -> Result<(rcgen::Certificate, KeyPair), String> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| format!("CA parameters: {e}"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().map_err(|e| format!("CA key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("CA certificate: {e}"))?;
    Ok((cert, key))
}

/// A TLS server on a free loopback port that forwards the plaintext of each connection to one
/// upstream address: TLS in front of a server that has none. Stops when dropped.
#[derive(Debug)]
pub struct TlsTerminator {
    addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl TlsTerminator {
    /// Starts a terminator presenting `certs`' server certificate, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr, certs: &Certificates) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::on(listener, upstream, certs)
    }

    /// Starts a terminator on `listener` (to choose its address beforehand).
    pub fn on(
        listener: TcpListener,
        upstream: SocketAddr,
        certs: &Certificates,
    ) -> std::io::Result<Self> {
        let config = certs.server_config().map_err(std::io::Error::other)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let addr = listener.local_addr()?;
        let handshakes = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            acceptor,
            upstream,
            Arc::clone(&handshakes),
        ));
        Ok(Self {
            addr,
            handshakes,
            accept,
        })
    }

    /// The address clients connect to over TLS.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TLS handshakes completed so far (a client that refused the certificate adds none).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    upstream: SocketAddr,
    handshakes: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let handshakes = Arc::clone(&handshakes);
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Ok(mut client) = acceptor.accept(client).await else {
                return;
            };
            handshakes.fetch_add(1, Ordering::SeqCst);
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    fn client(ca: &Path) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca).expect("CA"))
            .expect("add");
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    #[tokio::test]
    async fn forwards_for_the_trusted_authority_only() {
        let dir = std::env::temp_dir().join(crate::env::unique_name("tls_unit"));
        let certs = Certificates::generate(&dir).expect("certificates");
        let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = server.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let terminator = TlsTerminator::start(upstream, &certs)
            .await
            .expect("terminator");
        for name in ["localhost", "127.0.0.1"] {
            let tcp = TcpStream::connect(terminator.addr()).await.expect("tcp");
            let mut tls = client(&certs.ca)
                .connect(ServerName::try_from(name).expect("name"), tcp)
                .await
                .expect("handshake");
            tls.write_all(b"ping").await.expect("write");
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.expect("echo");
            assert_eq!(&buf, b"ping");
        }
        let tcp = TcpStream::connect(terminator.addr()).await.expect("tcp");
        let refused = client(&certs.other_ca)
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await;
        assert!(refused.is_err(), "another authority is refused");
        assert_eq!(terminator.handshakes(), 2);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
