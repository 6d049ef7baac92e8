//! TLS for an `https://` cloud endpoint (the `tls` feature): the cloud's CA named
//! explicitly (no built-in root store), and the device's certificate for mutual TLS.
use std::path::PathBuf;

use tonic::transport::Endpoint;

use crate::{EdgeError, Result};

/// Environment variable naming the PEM file of the CA that signed the cloud's certificate:
/// the fallback when [`TlsOptions::ca_file`] (`--ca-file`) is not given.
pub const CA_FILE_ENV: &str = "ADAPTIVENET_CA_FILE";

/// TLS settings for an `https://` cloud endpoint (builds with the `tls` feature; there is no
/// built-in root store, so the cloud's CA is always named explicitly).
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM of the CA that signed the cloud's certificate (`--ca-file`); [`CA_FILE_ENV`]
    /// when unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and its key (PEM, `--tls-cert` / `--tls-key`): the device's
    /// identity for a cloud that requires mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl TlsOptions {
    pub(super) fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }
}

/// Appends which flags to check when an `https://` connection failed on a certificate.
pub(crate) fn tls_hint(endpoint: &str, reason: String) -> String {
    let l = reason.to_ascii_lowercase();
    if endpoint.starts_with("https://") && (l.contains("certificate") || l.contains("tls")) {
        format!(
            "{reason} (TLS: --ca-file must be the CA that signed the cloud's certificate; a cloud \
             that requires mutual TLS needs --tls-cert and --tls-key)"
        )
    } else {
        reason
    }
}

/// What a PEM file must hold.
#[cfg(feature = "tls")]
#[derive(Clone, Copy)]
enum Pem {
    Certificate,
    PrivateKey,
}

/// Reads a PEM file given by `field`: missing, unreadable or not PEM is an `InvalidConfig`
/// naming the field and the path, not a handshake failure later.
#[cfg(feature = "tls")]
fn read_pem(field: &str, path: &std::path::Path, kind: Pem) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|e| EdgeError::config(field, format!("{}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let (ok, want) = match kind {
        Pem::Certificate => (
            text.contains("-----BEGIN CERTIFICATE-----"),
            "a PEM certificate (-----BEGIN CERTIFICATE-----)",
        ),
        Pem::PrivateKey => (
            text.lines().any(|l| {
                l.starts_with("-----BEGIN ") && l.trim_end().ends_with("PRIVATE KEY-----")
            }),
            "a PEM private key (-----BEGIN ... PRIVATE KEY-----)",
        ),
    };
    if !ok {
        return Err(EdgeError::config(
            field,
            format!("{}: not {want}", path.display()),
        ));
    }
    Ok(bytes)
}

/// TLS for an `https://` endpoint: trusts the CA of `--ca-file` (else [`CA_FILE_ENV`]) and,
/// for mutual TLS, presents the client certificate.
#[cfg(feature = "tls")]
pub(super) fn tls(ep: Endpoint, endpoint: &str, opts: &TlsOptions) -> Result<Endpoint> {
    let (field, ca) = match &opts.ca_file {
        Some(p) => ("--ca-file", p.clone()),
        None => match std::env::var_os(CA_FILE_ENV) {
            Some(p) => (CA_FILE_ENV, PathBuf::from(p)),
            None => {
                return Err(EdgeError::config(
                    "--ca-file",
                    format!(
                        "{endpoint} is https: give --ca-file (or {CA_FILE_ENV}), the PEM of the CA that signed the cloud's certificate"
                    ),
                ))
            }
        },
    };
    let mut cfg = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(read_pem(field, &ca, Pem::Certificate)?),
    );
    match (&opts.client_cert, &opts.client_key) {
        (Some(c), Some(k)) => {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(
                read_pem("--tls-cert", c, Pem::Certificate)?,
                read_pem("--tls-key", k, Pem::PrivateKey)?,
            ));
        }
        (None, None) => {}
        (Some(_), None) => return Err(EdgeError::config("--tls-key", "--tls-cert needs its key")),
        (None, Some(_)) => {
            return Err(EdgeError::config(
                "--tls-cert",
                "--tls-key needs its certificate",
            ))
        }
    }
    ep.tls_config(cfg)
        .map_err(|e| EdgeError::config("cloud endpoint", format!("{endpoint}: TLS: {e}")))
}

#[cfg(not(feature = "tls"))]
pub(super) fn tls(_ep: Endpoint, endpoint: &str, _opts: &TlsOptions) -> Result<Endpoint> {
    Err(EdgeError::config(
        "cloud endpoint",
        format!("{endpoint}: this build has no TLS support (rebuild with --features tls)"),
    ))
}
