//! `plane dev --https`: a local CA, kept in the data directory so it is trusted once, and a
//! `localhost` certificate from it for the proxy.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// The files `plane dev --https` uses.
pub struct DevTls {
    /// The CA certificate to trust (PEM).
    pub ca: PathBuf,
    /// The proxy's certificate and key (PEM), issued by the CA.
    pub certificate: PathBuf,
}

/// The CA's distinguished name: the same on every run, so a leaf signed by the kept key
/// chains to the CA certificate trusted earlier.
fn ca_params() -> anyhow::Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(vec![])?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Plane dev CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    Ok(params)
}

/// Makes the CA (once) and a fresh `localhost`/127.0.0.1 certificate in `dir`.
pub fn ensure(dir: &Path) -> anyhow::Result<DevTls> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key.pem");
    let ca_key = match std::fs::read_to_string(&ca_key_path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem)
            .with_context(|| format!("reading the dev CA key {}", ca_key_path.display()))?,
        Err(_) => {
            let key = rcgen::KeyPair::generate()?;
            write_private(&ca_key_path, &key.serialize_pem())?;
            key
        }
    };
    let ca = ca_params()?.self_signed(&ca_key)?;
    if !ca_path.exists() {
        std::fs::write(&ca_path, ca.pem())
            .with_context(|| format!("writing {}", ca_path.display()))?;
    }
    let key = rcgen::KeyPair::generate()?;
    let leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?
            .signed_by(&key, &ca, &ca_key)?;
    let certificate = dir.join("proxy.pem");
    write_private(
        &certificate,
        &format!("{}{}", leaf.pem(), key.serialize_pem()),
    )?;
    Ok(DevTls {
        ca: ca_path,
        certificate,
    })
}

/// Writes a file holding a private key, readable by its owner only.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
