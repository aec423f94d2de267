//! The certificate manager: keeps `--cert-path` holding a valid certificate for `<cluster>`
//! and `*.<cluster>` from an ACME CA by DNS-01, loading the one another proxy of the cluster
//! stored at the controller when it can, and ordering under the cluster's certificate lease
//! (so the proxies of a cluster make one order between them) when it must.
//!
//! An order: take the lease, publish the challenge values through the controller (which
//! `plane dns` serves), wait until a DNS query sees them, ask the CA to validate, finalise,
//! store the certificate (file, then controller), release the lease.

use crate::config::AcmeConfig;
use crate::controller_connection::ControllerClient;
use crate::tls::{self, CertFile, Loaded};
use anyhow::{bail, Context};
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::TokioAsyncResolver;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use plane_protocol::names::ClusterName;
use plane_protocol::proxy::{CertRequest, CertResponse, ClusterCertificate, CERT_LEASE_SECONDS};
use plane_protocol::time::Millis;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long to wait before looking again while another proxy holds the lease.
const LEASE_BUSY_WAIT: Duration = Duration::from_secs(2);
/// The first wait after a failed attempt; it doubles up to [`MAX_FAILURE_BACKOFF`].
const FIRST_FAILURE_BACKOFF: Duration = Duration::from_secs(5);
const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// A valid certificate is looked at again at least this often (the file may have been
/// replaced, or the clock jumped).
const RECHECK_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// How long the challenge values may take to become visible in DNS.
const DNS_VISIBLE_TIMEOUT: Duration = Duration::from_secs(120);
const DNS_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long the CA may take to validate, and then to issue.
const CA_TIMEOUT: Duration = Duration::from_secs(120);

/// The account kept beside the certificate, so a restart does not register a new one.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    endpoint: String,
    credentials: AccountCredentials,
}

pub struct CertManager {
    config: AcmeConfig,
    cluster: ClusterName,
    cert: Arc<CertFile>,
    controller: ControllerClient,
    account: Option<Account>,
    /// When this manager last obtained a certificate (ordered or loaded from the
    /// controller): it is not renewed sooner than the minimum renewal interval after.
    obtained_at: Option<SystemTime>,
    failures: u32,
}

/// What the manager does next.
enum Next {
    /// Look again after this long.
    Wait(Duration),
    /// Something failed; wait with backoff and try again.
    Failed(anyhow::Error),
}

impl CertManager {
    pub fn new(
        config: AcmeConfig,
        cluster: ClusterName,
        cert: Arc<CertFile>,
        controller: ControllerClient,
    ) -> Self {
        Self {
            config,
            cluster,
            cert,
            controller,
            account: None,
            obtained_at: None,
            failures: 0,
        }
    }

    /// Runs until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let next = tokio::select! {
                // An order cut short leaves the lease to expire, or to be freed when the
                // controller sees this proxy's session end.
                _ = cancel.cancelled() => return,
                next = self.step() => next,
            };
            let wait = match next {
                Next::Wait(wait) => {
                    self.failures = 0;
                    wait
                }
                Next::Failed(err) => {
                    self.failures = self.failures.saturating_add(1);
                    let wait = failure_backoff(self.failures);
                    error!(cluster = %self.cluster, error = format!("{err:#}"), retry_in = ?wait, "could not obtain a certificate");
                    wait
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// When `loaded` should be replaced.
    fn renew_at(&self, loaded: &Loaded) -> SystemTime {
        renew_at(
            loaded.not_before,
            loaded.not_after,
            self.config.renew_before_seconds.map(Duration::from_secs),
            self.obtained_at
                .map(|at| at + Duration::from_millis(self.config.min_renewal_interval_ms)),
        )
    }

    async fn step(&mut self) -> Next {
        // Every step below needs the controller; waiting for it is not a failure.
        let mut connected = self.controller.connection_status();
        if connected.wait_for(|connected| *connected).await.is_err() {
            return Next::Wait(RECHECK_INTERVAL);
        }
        let now = SystemTime::now();
        let current = self.cert.current();
        if let Some(current) = &current {
            let due = self.renew_at(current);
            if due > now {
                let wait = due.duration_since(now).unwrap_or_default();
                return Next::Wait(wait.min(RECHECK_INTERVAL));
            }
        }

        // Missing or due: another proxy of the cluster may have stored a newer one.
        match self.controller.cert_request(CertRequest::Fetch).await {
            Ok(CertResponse::Certificate {
                certificate: Some(stored),
            }) => match tls::parse(format!("{}{}", stored.chain_pem, stored.key_pem).as_bytes()) {
                Ok(loaded)
                    if loaded.not_after > now
                        && current
                            .as_ref()
                            .is_none_or(|current| loaded.not_after > current.not_after) =>
                {
                    let fresh = self.renew_at(&loaded) > now;
                    if let Err(err) = self.install(&stored, loaded) {
                        return Next::Failed(err);
                    }
                    info!(cluster = %self.cluster, "loaded the certificate another proxy of the cluster obtained");
                    if fresh {
                        self.obtained_at = Some(now);
                        return Next::Wait(Duration::ZERO);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    warn!(cluster = %self.cluster, error = %err, "the controller's stored certificate is unusable")
                }
            },
            Ok(CertResponse::Certificate { certificate: None }) => {}
            Ok(other) => return Next::Failed(anyhow::anyhow!("unexpected answer {other:?}")),
            Err(err) => return Next::Failed(err.into()),
        }

        match self.controller.cert_request(CertRequest::TakeLease).await {
            Ok(CertResponse::Lease { granted: true }) => {}
            Ok(CertResponse::Lease { granted: false }) => {
                info!(cluster = %self.cluster, "another proxy of the cluster is ordering the certificate; waiting for it");
                return Next::Wait(LEASE_BUSY_WAIT);
            }
            Ok(other) => return Next::Failed(anyhow::anyhow!("lease refused: {other:?}")),
            Err(err) => return Next::Failed(err.into()),
        }
        info!(cluster = %self.cluster, endpoint = %self.config.endpoint, "ordering a certificate");
        let ordered = self.order_holding_lease().await;
        let released = self
            .controller
            .cert_request(CertRequest::ReleaseLease)
            .await;
        if let Err(err) = released {
            warn!(cluster = %self.cluster, error = %err, "could not release the certificate lease; it expires on its own");
        }
        match ordered {
            Ok(()) => Next::Wait(Duration::ZERO),
            Err(err) => Next::Failed(err),
        }
    }

    /// Orders while keeping the lease taken; stops if the lease is lost.
    async fn order_holding_lease(&mut self) -> anyhow::Result<()> {
        let controller = self.controller.clone();
        let keep_lease = async move {
            let period = Duration::from_secs(CERT_LEASE_SECONDS / 3);
            loop {
                tokio::time::sleep(period).await;
                match controller.cert_request(CertRequest::TakeLease).await {
                    Ok(CertResponse::Lease { granted: true }) => {}
                    Ok(other) => return anyhow::anyhow!("lost the certificate lease: {other:?}"),
                    // A brief loss of the controller: the lease outlasts a few of these.
                    Err(err) => warn!(error = %err, "could not extend the certificate lease"),
                }
            }
        };
        tokio::select! {
            result = self.order() => result,
            lost = keep_lease => Err(lost),
        }
    }

    async fn order(&mut self) -> anyhow::Result<()> {
        let account = self.account().await?;
        let host = self.cluster.hostname().to_string();
        let identifiers = [
            Identifier::Dns(host.clone()),
            Identifier::Dns(format!("*.{host}")),
        ];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .context("creating the order")?;

        let mut values = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.context("fetching an authorization")?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => bail!("an authorization of the order is {status:?}"),
            }
            let challenge = authorization
                .challenge(ChallengeType::Dns01)
                .context("the CA offers no dns-01 challenge")?;
            values.push(challenge.key_authorization().dns_value());
        }

        if !values.is_empty() {
            match self
                .controller
                .cert_request(CertRequest::PublishTxt {
                    values: values.clone(),
                })
                .await?
            {
                CertResponse::TxtPublished { published: true } => {}
                other => bail!("the controller did not publish the challenge values: {other:?}"),
            }
            self.wait_until_visible(&host, &values).await?;
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization.context("fetching an authorization")?;
                if authorization.status != AuthorizationStatus::Pending {
                    continue;
                }
                let mut challenge = authorization
                    .challenge(ChallengeType::Dns01)
                    .context("the CA offers no dns-01 challenge")?;
                challenge
                    .set_ready()
                    .await
                    .context("asking the CA to validate")?;
            }
        }

        let retries = RetryPolicy::new().timeout(CA_TIMEOUT);
        let status = order
            .poll_ready(&retries)
            .await
            .context("waiting for validation")?;
        if status != OrderStatus::Ready {
            let problem = order
                .state()
                .error
                .as_ref()
                .map(|problem| problem.to_string())
                .unwrap_or_default();
            bail!("the order is {status:?} after validation {problem}");
        }
        let key_pem = order.finalize().await.context("finalising the order")?;
        let chain_pem = order
            .poll_certificate(&retries)
            .await
            .context("waiting for the certificate")?;
        let loaded = tls::parse(format!("{chain_pem}{key_pem}").as_bytes())
            .map_err(|err| anyhow::anyhow!("the CA's certificate is unusable: {err}"))?;
        let certificate = ClusterCertificate {
            chain_pem,
            key_pem,
            not_after: Millis(
                loaded
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as i64,
            ),
        };
        self.install(&certificate, loaded)?;
        self.obtained_at = Some(SystemTime::now());
        info!(cluster = %self.cluster, path = %self.cert.path().display(), "certificate obtained");
        // Kept for the cluster's other proxies before the lease is released (the controller
        // answers in order), so none of them orders again.
        match self
            .controller
            .cert_request(CertRequest::Store { certificate })
            .await
        {
            Ok(CertResponse::Stored { .. }) => {}
            Ok(other) => warn!(?other, "the controller did not keep the certificate"),
            Err(err) => warn!(error = %err, "could not give the certificate to the controller"),
        }
        Ok(())
    }

    /// Writes the certificate to `--cert-path` (whole, then renamed into place, readable only
    /// by us) and serves it to new handshakes.
    fn install(&self, certificate: &ClusterCertificate, loaded: Loaded) -> anyhow::Result<()> {
        let pem = format!("{}{}", certificate.chain_pem, certificate.key_pem);
        write_private(self.cert.path(), pem.as_bytes())
            .with_context(|| format!("writing --cert-path {}", self.cert.path().display()))?;
        self.cert.install(loaded);
        Ok(())
    }

    /// The ACME account: the one kept beside the certificate for this endpoint, or a new one.
    async fn account(&mut self) -> anyhow::Result<Account> {
        if let Some(account) = &self.account {
            return Ok(account.clone());
        }
        let builder = || -> anyhow::Result<_> {
            Ok(match &self.config.root_ca {
                Some(path) => Account::builder_with_root(path)
                    .with_context(|| format!("--acme-root-ca {}", path.display()))?,
                None => Account::builder().context("building the ACME client")?,
            })
        };
        let path = account_path(self.cert.path());
        let endpoint = self.config.endpoint.to_string();
        let stored = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<StoredAccount>(&bytes).ok())
            .filter(|stored| stored.endpoint == endpoint);
        let account = match stored {
            Some(stored) => builder()?
                .from_credentials(stored.credentials)
                .await
                .context("restoring the ACME account")?,
            None => {
                let contact = self
                    .config
                    .mailto
                    .as_ref()
                    .map(|mail| format!("mailto:{mail}"));
                let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
                let eab = self
                    .config
                    .eab()?
                    .map(|(kid, key)| ExternalAccountKey::new(kid, &key));
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        endpoint.clone(),
                        eab.as_ref(),
                    )
                    .await
                    .with_context(|| format!("registering an account at {endpoint}"))?;
                let stored = serde_json::to_vec(&StoredAccount {
                    endpoint,
                    credentials,
                })?;
                if let Err(err) = write_private(&path, &stored) {
                    warn!(path = %path.display(), error = %err, "could not keep the ACME account; a restart registers a new one");
                }
                info!(id = account.id(), "ACME account registered");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    /// Waits until a DNS query for `_acme-challenge.<host>` answers every value.
    async fn wait_until_visible(&self, host: &str, values: &[String]) -> anyhow::Result<()> {
        let name = format!("_acme-challenge.{host}.");
        let deadline = tokio::time::Instant::now() + DNS_VISIBLE_TIMEOUT;
        loop {
            // A resolver per look, so nothing cached hides the new values.
            let resolver = self.resolver()?;
            let last_seen: Vec<String> = match resolver.txt_lookup(name.as_str()).await {
                Ok(lookup) => {
                    let seen: Vec<String> = lookup
                        .iter()
                        .map(|txt| {
                            txt.txt_data()
                                .iter()
                                .map(|part| String::from_utf8_lossy(part).into_owned())
                                .collect::<String>()
                        })
                        .collect();
                    if values.iter().all(|value| seen.contains(value)) {
                        return Ok(());
                    }
                    seen
                }
                Err(err) => vec![format!("({err})")],
            };
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the challenge values did not become visible at {name} within {DNS_VISIBLE_TIMEOUT:?} (last seen: {last_seen:?}); is `plane dns` serving the zone?"
                );
            }
            tokio::time::sleep(DNS_POLL_INTERVAL).await;
        }
    }

    fn resolver(&self) -> anyhow::Result<TokioAsyncResolver> {
        let mut options = ResolverOpts::default();
        options.cache_size = 0;
        options.attempts = 1;
        options.timeout = Duration::from_secs(2);
        Ok(match self.config.dns_resolver {
            Some(address) => TokioAsyncResolver::tokio(
                ResolverConfig::from_parts(
                    None,
                    vec![],
                    NameServerConfigGroup::from_ips_clear(&[address.ip()], address.port(), true),
                ),
                options,
            ),
            None => {
                let (config, _) = hickory_resolver::system_conf::read_system_conf()
                    .context("reading the system's DNS configuration")?;
                TokioAsyncResolver::tokio(config, options)
            }
        })
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed: `window` before it
/// expires (a third of its lifetime by default), but not before `not_before_renewal`.
fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    window: Option<Duration>,
    not_before_renewal: Option<SystemTime>,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let window = window.unwrap_or(lifetime / 3);
    let by_window = not_after
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    match not_before_renewal {
        Some(floor) => by_window.max(floor),
        None => by_window,
    }
}

/// Where the ACME account is kept: beside the certificate.
fn account_path(cert_path: &Path) -> PathBuf {
    let mut name = cert_path.file_name().unwrap_or_default().to_os_string();
    name.push(".acme-account.json");
    cert_path.with_file_name(name)
}

/// Writes `bytes` to `path` whole: to a temporary file beside it (mode 0600), then renamed
/// over it, so readers (the reload check, another process) never see half a file.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut partial = path.as_os_str().to_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

/// The wait after `failures` failed attempts in a row.
fn failure_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_FAILURE_BACKOFF * 2u32.pow(doublings)).min(MAX_FAILURE_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_to_a_cap() {
        assert_eq!(failure_backoff(1), Duration::from_secs(5));
        assert_eq!(failure_backoff(2), Duration::from_secs(10));
        assert_eq!(failure_backoff(3), Duration::from_secs(20));
        assert_eq!(failure_backoff(40), MAX_FAILURE_BACKOFF);
    }

    #[test]
    fn renewal_is_due_when_a_third_of_the_lifetime_is_left_or_the_window_says() {
        let day = Duration::from_secs(86_400);
        let issued = SystemTime::UNIX_EPOCH + 1000 * day;
        let expires = issued + 90 * day;
        assert_eq!(renew_at(issued, expires, None, None), issued + 60 * day);
        assert_eq!(
            renew_at(issued, expires, Some(7 * day), None),
            issued + 83 * day
        );
        // A window longer than the lifetime: due at once, but not before the floor.
        assert!(renew_at(issued, expires, Some(365 * day), None) < issued);
        assert_eq!(
            renew_at(issued, expires, Some(365 * day), Some(issued + day)),
            issued + day
        );
    }

    #[test]
    fn the_account_is_kept_beside_the_certificate() {
        assert_eq!(
            account_path(Path::new("/var/lib/plane/cert.pem")),
            Path::new("/var/lib/plane/cert.pem.acme-account.json")
        );
    }
}
