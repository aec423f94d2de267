//! HTTPS: the certificate from a PEM file (chain and key), reloaded when the file changes so
//! new connections get the new one while open ones carry on, and the TLS settings.

use rustls::crypto::ring;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How often the certificate file is checked for changes.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The certificate served to every client, from `--cert-path` (or, with ACME, none until
/// the first is obtained: handshakes fail until then).
#[derive(Debug)]
pub struct CertFile {
    path: PathBuf,
    current: RwLock<Option<Loaded>>,
}

/// A usable certificate chain and key, with the leaf's validity.
#[derive(Clone, Debug)]
pub struct Loaded {
    key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What the file looked like when it was last loaded (modified time, length, inode): a
/// change of any means reload. The inode catches a file replaced by rename within one tick
/// of the filesystem's clock.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

/// Reads a PEM file holding the certificate chain (leaf first) and its private key.
pub fn load(path: &Path) -> Result<Loaded, String> {
    let pem =
        std::fs::read(path).map_err(|err| format!("--cert-path {}: {err}", path.display()))?;
    parse(&pem).map_err(|err| format!("--cert-path {}: {err}", path.display()))
}

/// Parses a PEM certificate chain (leaf first) and its private key.
pub fn parse(pem: &[u8]) -> Result<Loaded, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| err.to_string())?;
    let Some(leaf) = certificates.first() else {
        return Err("no certificate in the file".to_string());
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|err| format!("the leaf certificate does not parse: {err}"))?;
    let time = |at: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(at.timestamp().max(0) as u64)
    };
    let (not_before, not_after) = (
        time(parsed.validity().not_before),
        time(parsed.validity().not_after),
    );
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|err| format!("no usable private key: {err}"))?;
    let signing_key = ring::sign::any_supported_type(&key).map_err(|err| err.to_string())?;
    Ok(Loaded {
        key: Arc::new(CertifiedKey::new(certificates, signing_key)),
        not_before,
        not_after,
    })
}

impl CertFile {
    /// Loads the file; an unusable one is an error naming the flag.
    pub fn open(path: &Path) -> Result<Arc<Self>, String> {
        let loaded = load(path)?;
        Ok(Self::with(path, Some(loaded)))
    }

    /// Loads the file if there is a usable one (with ACME, which fills it otherwise).
    pub fn open_if_usable(path: &Path) -> Arc<Self> {
        let loaded = match load(path) {
            Ok(loaded) => Some(loaded),
            Err(error) => {
                if path.exists() {
                    tracing::warn!(%error, "the certificate file is unusable; a new certificate will be ordered");
                }
                None
            }
        };
        Self::with(path, loaded)
    }

    fn with(path: &Path, loaded: Option<Loaded>) -> Arc<Self> {
        Arc::new(Self {
            path: path.to_path_buf(),
            current: RwLock::new(loaded),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The certificate served now, if any.
    pub fn current(&self) -> Option<Loaded> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves `loaded` to new handshakes from now on.
    pub fn install(&self, loaded: Loaded) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(loaded);
    }

    /// Checks the file every second until `cancel`; a changed file that loads replaces the
    /// certificate for new connections, one that does not is logged and the old kept.
    pub async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        let mut last = stamp(&self.path);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_CHECK_INTERVAL) => {}
            }
            let now = stamp(&self.path);
            if now == last {
                continue;
            }
            last = now;
            match load(&self.path) {
                // The certificate manager wrote it and serves it already.
                Ok(loaded)
                    if self
                        .current()
                        .is_some_and(|current| current.key.cert == loaded.key.cert) => {}
                Ok(loaded) => {
                    self.install(loaded);
                    tracing::info!(path = %self.path.display(), "certificate reloaded");
                }
                Err(error) => {
                    tracing::warn!(%error, "the changed certificate file is unusable; keeping the previous certificate")
                }
            }
        }
    }
}

impl ResolvesServerCert for CertFile {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|loaded| Arc::clone(&loaded.key))
    }
}

/// TLS 1.2 and 1.3 with ring, the certificate from `cert`, and ALPN `h2` then `http/1.1`.
pub fn server_config(cert: Arc<CertFile>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_refused_naming_the_flag() {
        let error = load(Path::new("/nonexistent/cert.pem")).expect_err("missing file");
        assert!(
            error.contains("--cert-path /nonexistent/cert.pem"),
            "{error}"
        );

        let dir = std::env::temp_dir().join(format!("plane-proxy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let only_cert = dir.join("only-cert.pem");
        std::fs::write(&only_cert, cert.pem()).expect("write");
        let error = load(&only_cert).expect_err("no key");
        assert!(error.contains("no usable private key"), "{error}");

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let error = load(&empty).expect_err("empty");
        assert!(error.contains("no certificate"), "{error}");

        let both = dir.join("both.pem");
        std::fs::write(&both, format!("{}{}", cert.pem(), key.serialize_pem())).expect("write");
        assert!(load(&both).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
