//! Where the supernet comes from: `--artifact` as is, or (cloud mode) enrollment and a
//! verified sync of the fleet's desired supernet, falling back to the cached one when the
//! cloud cannot serve it.
use std::sync::Arc;

use adaptivenet_edge::client::{
    local_device_class, BlobSelection, BudgetPolicy, CloudClient, ServingReason, SyncOptions,
    TlsOptions,
};
use adaptivenet_edge::serve::ArtifactSource;
use adaptivenet_edge::EdgeError;
use anyhow::{bail, Context, Result};

use super::args::Common;

/// A cloud session: the client and what the last sync applied.
pub struct CloudSession {
    pub client: Arc<CloudClient>,
    pub supernet_id: String,
    pub generation: u64,
    /// The fleet's latency budget policy (None when serving from the cache offline).
    pub budget: Option<BudgetPolicy>,
    /// Why the cloud sends this device its supernet (unknown when serving offline).
    pub reason: ServingReason,
    /// Whether an active rollout decided the supernet (`None`: unknown, serving offline).
    pub rollout_active: Option<bool>,
}

/// The artifact to work on: `--artifact` as is, or (cloud mode) enroll once and sync the
/// fleet's desired supernet into the cache.
pub fn open_source(
    c: &Common,
    rt: &tokio::runtime::Runtime,
) -> Result<(ArtifactSource, Option<CloudSession>)> {
    let Some(url) = &c.cloud else {
        let dir = c
            .artifact
            .as_ref()
            .context("--artifact or --cloud is required")?;
        return Ok((
            ArtifactSource::open(dir).context("opening the artifact")?,
            None,
        ));
    };
    let deadline = std::time::Duration::from_millis(c.cloud_timeout_ms.max(1));
    let cache = c.cache.clone().unwrap_or_else(|| c.state.join("cache"));
    let token = enroll_token(c)?;
    let tls = TlsOptions {
        ca_file: c.ca_file.clone(),
        client_cert: c.tls_cert.clone(),
        client_key: c.tls_key.clone(),
    };
    let synced = rt.block_on(async {
        let mut client = CloudClient::connect_tls(url, deadline, &tls)
            .await?
            .with_state_dir(&c.state)?
            .with_min_quality_samples(c.min_quality_samples)
            .with_re_enroll(c.re_enroll);
        let new = client
            .enroll(
                token.as_deref(),
                local_device_class(),
                env!("CARGO_PKG_VERSION"),
            )
            .await?;
        if !new {
            tracing::info!("using the stored device identity");
        }
        let rep = client
            .sync(&cache, &BlobSelection::All, &SyncOptions::default())
            .await?;
        Ok::<_, EdgeError>((client, rep))
    });
    let (client, rep) = match synced {
        Ok(v) => v,
        Err(e) if e.is_transient() => {
            // The cloud is unreachable or served a blob that failed verification: serve
            // the last synced supernet, if any, and keep trying in the background
            // (heartbeats, reports, re-sync).
            let Some((cur, dir)) = adaptivenet_edge::client::sync::cached_current(&cache) else {
                return Err(anyhow::Error::new(e).context(format!(
                    "syncing the supernet from {url} (nothing cached yet)"
                )));
            };
            let why = match &e {
                EdgeError::BlobMismatch { .. } => "a downloaded blob failed verification",
                EdgeError::Interrupted { .. } => "the download was interrupted",
                EdgeError::Cloud { .. } => "the cloud answered with a retryable error",
                _ => "the cloud is unreachable",
            };
            tracing::warn!(
                "sync failed, {why} ({e}); serving the cached supernet {} from {}",
                cur.supernet_id,
                dir.display()
            );
            let client = rt
                .block_on(async {
                    CloudClient::connect_lazy_tls(url, deadline, &tls)?.with_state_dir(&c.state)
                })
                .context("reading the device identity")?
                .with_min_quality_samples(c.min_quality_samples);
            if client.identity().is_none() {
                bail!("not enrolled and the cloud {url} is unreachable");
            }
            client.check_identity_endpoint()?;
            let src = ArtifactSource::open(&dir).context("opening the cached supernet")?;
            return Ok((
                src,
                Some(CloudSession {
                    client: Arc::new(client),
                    supernet_id: cur.supernet_id,
                    generation: cur.generation,
                    budget: None,
                    reason: ServingReason::Unspecified,
                    rollout_active: None,
                }),
            ));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("syncing the supernet from {url}")))
        }
    };
    let s = &rep.stats;
    tracing::info!(
        "synced supernet {} v{} into {}: {} blobs needed, {} cached, {} downloaded ({} bytes, {} resumed, {} restarted)",
        rep.supernet_id,
        rep.supernet_version,
        rep.dir.display(),
        s.blobs_needed,
        s.blobs_skipped,
        s.blobs_downloaded,
        s.bytes_received,
        s.resumed,
        s.restarts_from_zero
    );
    let src = ArtifactSource::open(&rep.dir).context("opening the synced supernet")?;
    Ok((
        src,
        Some(CloudSession {
            client: Arc::new(client),
            supernet_id: rep.supernet_id,
            generation: rep.generation,
            budget: rep.budget,
            reason: rep.reason,
            rollout_active: Some(rep.rollout_id.is_some()),
        }),
    ))
}

/// The enrollment token: `--enroll-token-file`, else `--enroll-token` (or its environment
/// variable, which clap resolves below the flag).
fn enroll_token(c: &Common) -> Result<Option<String>> {
    match &c.enroll_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --enroll-token-file {}", path.display()))?;
            let token = text.trim();
            anyhow::ensure!(
                !token.is_empty(),
                "--enroll-token-file {} is empty",
                path.display()
            );
            Ok(Some(token.to_string()))
        }
        None => Ok(c.enroll_token.clone()),
    }
}
