//! Latency-table drift: when live latency of whatever subnet is serving stays off the table's
//! prediction for a long stretch (a new thermal or frequency regime, a permanent co-tenant, an
//! OS update), stepping along the old front is no longer enough: the table itself is stale.
//! The detector fires after `windows` consecutive maintenance windows whose live/predicted
//! ratio is outside `[1/(1+threshold), 1+threshold]`; the agent then re-profiles and
//! re-searches (warm-started from the current front) at the same budget in milliseconds.
//!
//! Short episodes (a contention burst the controller already answers by stepping down) stay
//! below `windows`; measurement noise stays inside the band. The ratio is per window and
//! relative to the serving subnet's own prediction, so switching subnets does not reset it.

/// Drift detection settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DriftConfig {
    /// Relative deviation tolerated (0.3: live latency 30% above or below the table).
    pub threshold: f64,
    /// Consecutive out-of-band windows before the table counts as stale (0 disables).
    pub windows: usize,
}

impl Default for DriftConfig {
    fn default() -> Self {
        // With 1 s windows: two minutes of sustained deviation, longer than a contention
        // burst the controller rides out on the front.
        DriftConfig {
            threshold: 0.3,
            windows: 120,
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct DriftDetector {
    cfg: DriftConfig,
    run: usize,
}

impl DriftDetector {
    pub fn new(cfg: DriftConfig) -> Self {
        DriftDetector { cfg, run: 0 }
    }

    /// Consecutive out-of-band windows so far.
    pub fn run(&self) -> usize {
        self.run
    }

    /// One window: live p50 against the table's prediction for the serving subnet (ms).
    /// True once the deviation has lasted `windows` windows; the count then starts over, so
    /// a table that stays wrong after a re-profile fires again only after as long.
    pub fn observe(&mut self, live_ms: f64, predicted_ms: f64) -> bool {
        if self.cfg.windows == 0 || !(live_ms > 0.0 && live_ms.is_finite() && predicted_ms > 0.0) {
            return false;
        }
        let dev = (live_ms / predicted_ms).ln().abs();
        if dev > self.cfg.threshold.ln_1p() {
            self.run += 1;
        } else {
            self.run = 0;
        }
        if self.run >= self.cfg.windows {
            self.run = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn detector(windows: usize) -> DriftDetector {
        DriftDetector::new(DriftConfig {
            threshold: 0.3,
            windows,
        })
    }

    #[test]
    fn noise_inside_the_band_never_fires() {
        let mut d = detector(20);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..10_000 {
            let live = 10.0 * (1.0 + rng.random_range(-0.15..0.15));
            assert!(!d.observe(live, 10.0));
        }
    }

    #[test]
    fn sustained_deviation_fires_once_per_stretch_and_a_burst_does_not() {
        let mut d = detector(20);
        // A 15-window contention burst at 1.8x: below the stretch, no re-profile.
        for _ in 0..15 {
            assert!(!d.observe(18.0, 10.0));
        }
        assert!(!d.observe(10.5, 10.0), "back in band resets the run");
        assert_eq!(d.run(), 0);
        // A lasting 1.5x regime: fires at the 20th window, then counts afresh.
        let fired: Vec<usize> = (0..45).filter(|_| d.observe(15.0, 10.0)).collect();
        assert_eq!(fired, vec![19, 39]);
        // Faster than the table is drift too.
        let mut d = detector(5);
        assert_eq!((0..5).filter(|_| d.observe(6.0, 10.0)).count(), 1);
    }

    #[test]
    fn disabled_or_meaningless_samples_never_fire() {
        let mut d = detector(0);
        assert!((0..100).all(|_| !d.observe(50.0, 10.0)));
        let mut d = detector(1);
        assert!(!d.observe(f64::NAN, 10.0));
        assert!(!d.observe(0.0, 10.0));
        assert!(!d.observe(10.0, 0.0));
    }
}
