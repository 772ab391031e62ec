//! Mutual TLS for every gRPC server and client of a process, with
//! certificates that are renewed without a restart.
//!
//! Servers terminate TLS themselves (rustls, ring) rather than through
//! tonic's static `ServerTlsConfig`, so every new connection is accepted
//! with the certificate in force at that moment: [`Tls::reload_if_changed`]
//! swaps it when the files change (a renewal by cert-manager, Vault agent or
//! a cron job), and [`Tls::watch`] checks every [`RELOAD_EVERY`]. Clients
//! build their configuration from the material in force when a channel is
//! made, and the platform drops its cached channels when the material
//! changes ([`Tls::generation`]). Connections already open keep the
//! certificate they were made with until they close.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use capstan_types::Error;
use futures::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How often [`Tls::watch`] looks at the files.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);
/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener; more wait to be accepted.
pub const HANDSHAKES_AT_ONCE: usize = 64;

/// A process's TLS material: its certificate (whose SAN names its service,
/// e.g. DNS:scheduler), its key, and the CA every Capstan certificate comes
/// from. Servers require clients to present a certificate from that CA
/// (mutual TLS); clients check that the server's names the service they
/// called.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    /// CA, certificate and key files; `None` for material issued in memory
    /// (Vault PKI), which [`Tls::install`] replaces.
    files: Option<[PathBuf; 3]>,
    material: RwLock<Arc<Material>>,
    generation: AtomicU64,
}

struct Material {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    server: Arc<rustls::ServerConfig>,
    /// When each file was last modified, as read.
    stamps: [Option<SystemTime>; 3],
}

fn stamp(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, Error> {
    let pem = std::fs::read(path)
        .map_err(|e| Error::invalid(flag, format!("{}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN") {
        return Err(Error::invalid(
            flag,
            format!("{} is not PEM", path.display()),
        ));
    }
    Ok(pem)
}

impl Material {
    fn read(ca: &Path, cert: &Path, key: &Path) -> Result<Material, Error> {
        let stamps = [stamp(ca), stamp(cert), stamp(key)];
        let ca_pem = read_pem("tls_ca", ca)?;
        let cert_pem = read_pem("tls_cert", cert)?;
        let key_pem = read_pem("tls_key", key)?;
        Material::new(ca_pem, cert_pem, key_pem, stamps)
    }

    fn new(
        ca_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        stamps: [Option<SystemTime>; 3],
    ) -> Result<Material, Error> {
        let server = Arc::new(server_config(&ca_pem, &cert_pem, &key_pem)?);
        Ok(Material {
            ca_pem,
            cert_pem,
            key_pem,
            server,
            stamps,
        })
    }
}

/// A rustls server configuration that requires a client certificate from
/// the CA and speaks HTTP/2.
fn server_config(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<rustls::ServerConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca) {
        let der = der.map_err(|e| Error::invalid("tls_ca", format!("bad PEM: {e}")))?;
        roots
            .add(der)
            .map_err(|e| Error::invalid("tls_ca", format!("not a CA certificate: {e}")))?;
    }
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid("tls_cert", format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(Error::invalid("tls_cert", "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| Error::invalid("tls_key", format!("no private key: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| Error::invalid("tls_ca", e.to_string()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::invalid("tls_key", format!("does not match the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl Tls {
    /// Reads PEM files; an error names the flag and the file.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Tls, Error> {
        let material = Material::read(ca, cert, key)?;
        Ok(Tls::with(
            Some([ca.to_path_buf(), cert.to_path_buf(), key.to_path_buf()]),
            material,
        ))
    }

    /// Material held in memory only (issued by Vault's PKI engine).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Tls, Error> {
        let material = Material::new(ca.into(), cert.into(), key.into(), [None; 3])?;
        Ok(Tls::with(None, material))
    }

    fn with(files: Option<[PathBuf; 3]>, material: Material) -> Tls {
        Tls {
            inner: Arc::new(Inner {
                files,
                material: RwLock::new(Arc::new(material)),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// Puts new material in force (a renewed certificate); an error leaves
    /// the old one.
    pub fn install(&self, ca: &str, cert: &str, key: &str) -> Result<(), Error> {
        let material = Material::new(ca.into(), cert.into(), key.into(), [None; 3])?;
        *self.inner.material.write().expect("tls lock poisoned") = Arc::new(material);
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn material(&self) -> Arc<Material> {
        self.inner
            .material
            .read()
            .expect("tls lock poisoned")
            .clone()
    }

    /// Bumped each time new material takes effect.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    /// Reads the files again if any changed since they were read, and puts
    /// them in force if they make a valid configuration. `Ok(true)`: new
    /// material is in force. An error leaves the old material in force.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let Some([ca, cert, key]) = &self.inner.files else {
            return Ok(false);
        };
        let stamps = [stamp(ca), stamp(cert), stamp(key)];
        if stamps == self.material().stamps {
            return Ok(false);
        }
        let material = Material::read(ca, cert, key)?;
        *self.inner.material.write().expect("tls lock poisoned") = Arc::new(material);
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    /// Reloads the files whenever they change, checking every `every`,
    /// until `shutdown`.
    pub async fn watch(self, every: Duration, shutdown: CancellationToken) {
        let Some([_, cert, _]) = self.inner.files.clone() else {
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("TLS files changed but do not load; keeping the old ones: {e}")
                }
            }
        }
    }

    /// The client side, for a channel to `service`: the CA, this process's
    /// identity, and the name the server's certificate must carry.
    pub(crate) fn client(&self, service: &str) -> tonic::transport::ClientTlsConfig {
        let material = self.material();
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&material.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &material.cert_pem,
                &material.key_pem,
            ))
            .domain_name(service)
    }

    /// Completes TLS handshakes on connections from `accepted`, with the
    /// configuration in force when each arrives; failed or slow handshakes
    /// are dropped.
    pub fn accept<S>(
        &self,
        accepted: S,
    ) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>>
    where
        S: Stream<Item = std::io::Result<TcpStream>>,
    {
        let tls = self.clone();
        accepted
            .filter_map(|tcp| std::future::ready(tcp.ok()))
            .map(move |tcp| {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.material().server.clone());
                async move { tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await }
            })
            .buffer_unordered(HANDSHAKES_AT_ONCE)
            .filter_map(|handshake| {
                std::future::ready(match handshake {
                    Ok(Ok(stream)) => Some(Ok(stream)),
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake failed: {e}");
                        None
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        None
                    }
                })
            })
    }
}
