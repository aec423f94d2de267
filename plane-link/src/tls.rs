//! TLS for `https` controllers: the web's public roots (Mozilla's, built in, so a node needs
//! no system certificate store) plus the CA certificates of an optional PEM file.

use crate::ConfigError;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;

pub(crate) fn connector(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let fail = |detail: String| ConfigError::CaFile {
            path: path.to_path_buf(),
            detail,
        };
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|err| fail(err.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| fail(err.to_string()))?;
        if certificates.is_empty() {
            return Err(fail("no PEM certificate in the file".to_string()));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|err| fail(format!("not a usable CA certificate: {err}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| ConfigError::Tls(err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
