//! Where the real data sets and weights fetched by `scripts/fetch-assets.sh` live.
//!
//! Nothing here downloads: tests and tools that need an asset ask [`asset`] and decide
//! themselves whether its absence means "skip" or, under [`require_assets`], "fail".
use std::path::PathBuf;

/// `$ADAPTIVENET_ASSETS` if set and non-empty, else `<workspace root>/.assets` (the folder the
/// fetch script fills by default).
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("ADAPTIVENET_ASSETS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            // This crate sits at <root>/shared/core.
            let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest
                .ancestors()
                .nth(2)
                .unwrap_or(manifest)
                .join(".assets")
        }
    }
}

/// True when `ADAPTIVENET_REQUIRE_ASSETS=1`: a missing asset must fail a test, not skip it
/// (so a CI that fetched assets cannot pass vacuously).
pub fn require_assets() -> bool {
    std::env::var("ADAPTIVENET_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// The asset at `rel` (relative to [`assets_dir`], e.g.
/// `efficientnet-lite0/efficientnet-lite0-57934424.pth`) if that file exists.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = assets_dir().join(rel);
    p.is_file().then_some(p)
}
