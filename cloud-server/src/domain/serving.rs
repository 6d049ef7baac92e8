//! What agents say about the supernet they serve (heartbeats) and what the cloud tells them
//! (a device's desired state): closed sets numbered as on the wire.
use crate::error::{CloudError, Result};

/// Why a device serves its supernet, numbered as on the wire (`ServingReason`, 0..=6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServingReason(pub i32);

impl ServingReason {
    pub const UNSPECIFIED: ServingReason = ServingReason(0);
    pub const LABEL: ServingReason = ServingReason(1);
    pub const PINNED: ServingReason = ServingReason(2);
    pub const ROLLOUT_COHORT: ServingReason = ServingReason(3);
    pub const ROLLOUT_CONTROL: ServingReason = ServingReason(4);
    pub const ROLLED_BACK: ServingReason = ServingReason(5);
    pub const INSTALL_FAILED: ServingReason = ServingReason(6);

    pub fn new(field: &str, v: i32) -> Result<Self> {
        if (0..=Self::INSTALL_FAILED.0).contains(&v) {
            Ok(ServingReason(v))
        } else {
            Err(CloudError::invalid(
                field,
                format!("unknown serving reason {v}"),
            ))
        }
    }
}

/// Why a device could not serve a supernet it was sent (`InstallFailure`, 0..=3; 0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InstallFailure(pub i32);

impl InstallFailure {
    pub fn new(field: &str, v: i32) -> Result<Self> {
        if (0..=3).contains(&v) {
            Ok(InstallFailure(v))
        } else {
            Err(CloudError::invalid(
                field,
                format!("unknown install failure {v}"),
            ))
        }
    }

    pub fn as_str(self) -> &'static str {
        match self.0 {
            1 => "verification",
            2 => "budget",
            3 => "other",
            _ => "unspecified",
        }
    }
}
