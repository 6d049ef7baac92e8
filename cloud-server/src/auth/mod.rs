//! Identity: token generation and hashing, authentication of request metadata, and the
//! authorisation rules of each API.
//!
//! Tokens are 256-bit random secrets (`anv1_<kind>_<64 hex>`); only their sha256 is stored,
//! which is safe for secrets of that entropy and cheap enough for the report path. Lookups
//! go through [`Authenticator`]'s cache (`cache.rs`: TTL, background refresh, single-flight
//! batched misses); revocations through this process apply at once, revocations by another
//! process within the TTL.
mod cache;

pub use cache::{Authenticator, QUERIES_IN_FLIGHT};

use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::Role;
use crate::error::{CloudError, Result};

/// Kinds of secret, visible in the token prefix so a misplaced token is recognisable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Api,
    Enrollment,
    Device,
}

impl TokenKind {
    fn tag(self) -> &'static str {
        match self {
            TokenKind::Api => "api",
            TokenKind::Enrollment => "enr",
            TokenKind::Device => "dev",
        }
    }
}

/// A fresh secret and its stored hash.
pub fn generate_token(kind: TokenKind) -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("anv1_{}_{}", kind.tag(), hex::encode(bytes));
    let hash = hash_token(&token);
    (token, hash)
}

/// The stored form of a secret.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// A management API token with a role (admin, developer, viewer), optionally limited to
    /// one fleet (developer and viewer tokens only).
    Api {
        token_id: Uuid,
        role: Role,
        fleet: Option<Uuid>,
    },
    /// An enrolled device, confined to its fleet.
    Device { device_id: Uuid, fleet_id: Uuid },
}

impl Principal {
    pub fn role(&self) -> Role {
        match self {
            Principal::Api { role, .. } => *role,
            Principal::Device { .. } => Role::Device,
        }
    }

    /// The one fleet a fleet-scoped API token is limited to.
    pub fn fleet_scope(&self) -> Option<Uuid> {
        match self {
            Principal::Api { fleet, .. } => *fleet,
            Principal::Device { .. } => None,
        }
    }
}

/// What a management method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only management (viewer, developer, admin).
    Read,
    /// Mutations of developer resources (developer, admin).
    Write,
    /// Operator actions (admin).
    Admin,
}

/// The management-API authorisation rule. Devices never pass it.
pub fn authorize_management(p: &Principal, access: Access) -> Result<()> {
    let role = match p {
        Principal::Device { .. } => {
            return Err(CloudError::PermissionDenied(
                "device credentials cannot call management APIs".into(),
            ))
        }
        Principal::Api { role, .. } => *role,
    };
    let ok = match access {
        Access::Read => matches!(role, Role::Admin | Role::Developer | Role::Viewer),
        Access::Write => matches!(role, Role::Admin | Role::Developer),
        Access::Admin => role == Role::Admin,
    };
    if ok {
        Ok(())
    } else {
        Err(CloudError::PermissionDenied(format!(
            "role {} may not perform {access:?} operations",
            role.as_str()
        )))
    }
}

/// The fleet rule of management calls about fleets: a fleet-scoped token may name only its
/// own fleet (another one is PERMISSION_DENIED naming both), and a query over every fleet
/// (`requested` = None) is narrowed to its fleet. Returns the fleet filter to apply.
pub fn authorize_fleet(p: &Principal, requested: Option<Uuid>) -> Result<Option<Uuid>> {
    match (p.fleet_scope(), requested) {
        (None, r) => Ok(r),
        (Some(own), None) => Ok(Some(own)),
        (Some(own), Some(r)) if r == own => Ok(Some(own)),
        (Some(own), Some(r)) => Err(CloudError::PermissionDenied(format!(
            "fleet {r}: this token is limited to fleet {own}"
        ))),
    }
}

/// The rule of management calls that are not about one fleet (oracles, datasets, jobs,
/// operator actions): fleet-scoped tokens may not make them, since their effects (deleting
/// an oracle, starting a job) reach every fleet.
pub fn authorize_unscoped(p: &Principal) -> Result<()> {
    match p.fleet_scope() {
        None => Ok(()),
        Some(own) => Err(CloudError::PermissionDenied(format!(
            "this token is limited to fleet {own}; the call is not about one fleet"
        ))),
    }
}

/// The device-API rule: only device credentials; returns (device, fleet).
pub fn authorize_device(p: &Principal) -> Result<(Uuid, Uuid)> {
    match p {
        Principal::Device {
            device_id,
            fleet_id,
        } => Ok((*device_id, *fleet_id)),
        Principal::Api { .. } => Err(CloudError::PermissionDenied(
            "the device API needs a device credential".into(),
        )),
    }
}

/// The token of `authorization: Bearer <token>` (not yet authenticated).
pub fn bearer(md: &tonic::metadata::MetadataMap) -> Result<&str> {
    let raw = md
        .get("authorization")
        .ok_or_else(|| CloudError::Unauthenticated("missing authorization metadata".into()))?
        .to_str()
        .map_err(|_| CloudError::Unauthenticated("authorization is not ASCII".into()))?;
    Ok(raw
        .strip_prefix("Bearer ")
        .or_else(|| raw.strip_prefix("bearer "))
        .ok_or_else(|| CloudError::Unauthenticated("expected `Bearer <token>`".into()))?
        .trim())
}
