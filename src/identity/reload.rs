//! Certificate renewal without a restart: the certificate and key files are
//! read again every `identity.reload_interval`, and when they change (as when
//! cert-manager or a Secret volume renews them) the new pair is checked and
//! used for new handshakes. Live connections keep theirs. A pair that does
//! not load, or that carries another SPIFFE ID, is refused with a warning and
//! the current one stays.

use std::sync::Arc;

use tokio::sync::watch;

use super::Identity;
use crate::config::IdentityConfig;

impl Identity {
    /// Watches the files until `stop` turns true.
    pub async fn keep_current(self: Arc<Self>, config: IdentityConfig, mut stop: watch::Receiver<bool>) {
        let read =
            |config: &IdentityConfig| Some((std::fs::read(&config.cert).ok()?, std::fs::read(&config.key).ok()?));
        let mut seen = read(&config);
        let mut ticks = tokio::time::interval(config.reload_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = crate::proxy::stopped(&mut stop) => return,
            }
            let current = read(&config);
            if current.is_none() || current == seen {
                continue;
            }
            seen = current.clone();
            let (cert, key) = current.expect("checked above");
            let bundle = std::fs::read(&config.trust_bundle).unwrap_or_default();
            match Identity::from_pem(&cert, &key, &bundle) {
                Ok(renewed) if renewed.id == self.id => {
                    self.cert.replace(&renewed.cert);
                    tracing::info!(identity = %self.id, cert = %config.cert.display(), "certificate renewed");
                }
                Ok(renewed) => tracing::warn!(
                    current = %self.id,
                    renewed = %renewed.id,
                    cert = %config.cert.display(),
                    "refusing a renewed certificate for another identity; restart to change identity"
                ),
                Err((field, problem)) => tracing::warn!(
                    field = %format!("identity.{field}"),
                    cert = %config.cert.display(),
                    key = %config.key.display(),
                    %problem,
                    "keeping the current certificate: the renewed files do not load"
                ),
            }
        }
    }
}
