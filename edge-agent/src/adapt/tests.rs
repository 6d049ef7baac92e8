//! The controller against simulated windows: p50 = table latency x load x (1 + noise), with
//! noise drawn from a seeded RNG, one observation per window.
use super::*;
use adaptivenet_core::supernet::{Choice, Subnet};
use rand::{Rng, SeedableRng};

/// 30 closely spaced entries (2.5% apart, so neighbours are within measurement noise).
fn front() -> Vec<Candidate> {
    (0..30)
        .map(|i| Candidate {
            subnet: Subnet(vec![
                Choice::ALL[i as usize % 6],
                Choice::ALL[i as usize / 6],
            ]),
            latency_ms: 4.0 * 1.025f64.powi(i),
            quality: 80.0 + i as f64 * 0.3,
        })
        .collect()
}

/// Runs `windows` checks; `p50(t, front index)` gives the measured p50. Returns the switches
/// as (window, from, to).
fn simulate(
    c: &mut Controller,
    windows: usize,
    mut p50: impl FnMut(usize, usize) -> f64,
) -> Vec<(usize, usize, usize)> {
    let mut log = Vec::new();
    for t in 0..windows {
        let from = c.current;
        if let Decision::Switch(j) = c.observe(p50(t, from)) {
            assert_ne!(j, from, "a switch to the current entry");
            c.switched(j);
            log.push((t, from, j));
        }
    }
    log
}

fn uniform(rng: &mut rand_chacha::ChaCha8Rng, a: f64) -> f64 {
    rng.random_range(-a..=a)
}

/// No pair of entries is visited back and forth more than once (A→B→A→B is oscillation).
fn assert_no_ping_pong(log: &[(usize, usize, usize)]) {
    for w in log.windows(3) {
        let ((_, a, b), (_, b2, a2), (_, a3, b3)) = (w[0], w[1], w[2]);
        assert!(
            !(b == b2 && a == a2 && a == a3 && b == b3),
            "oscillation {a} <-> {b}: {log:?}"
        );
    }
}

#[test]
fn stationary_noise_of_15_percent_causes_no_switch_in_1000_windows() {
    let f = front();
    // Budgets just above an entry, halfway between two, and just below one.
    for (seed, budget) in [(1u64, 7.01), (2, 6.5), (3, 5.99), (4, 8.2)] {
        let start = Controller::initial_index(&f, budget);
        let mut c = Controller::new(AdaptConfig::new(budget), f.clone(), start);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let log = simulate(&mut c, 1000, |_, i| {
            f[i].latency_ms * (1.0 + uniform(&mut rng, 0.15))
        });
        assert!(log.is_empty(), "budget {budget}: {log:?}");
        // The noise estimate found the noise (uniform ±15% has sd 0.087).
        assert!((0.06..0.13).contains(&c.noise()), "{}", c.noise());
    }
}

#[test]
fn load_step_under_15_percent_noise_steps_down_fast_and_back_up_after() {
    let f = front();
    let budget = 7.0;
    let start = Controller::initial_index(&f, budget);
    for seed in 0..5u64 {
        let mut c = Controller::new(AdaptConfig::new(budget), f.clone(), start);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let log = simulate(&mut c, 400, |t, i| {
            let load = if (100..200).contains(&t) { 1.6 } else { 1.0 };
            f[i].latency_ms * load * (1.0 + uniform(&mut rng, 0.15))
        });
        let first = log.first().copied().expect("stepped down");
        assert!((100..106).contains(&first.0) && first.2 < start, "{log:?}");
        // The entry stepped to holds the budget under the load: nothing more until it ends.
        assert!(
            log.iter().all(|&(t, _, _)| !(106..200).contains(&t)),
            "switches under steady load: {log:?}"
        );
        // Back up within 40 windows after the load, to an entry it can hold with confidence
        // under ±15% noise (>= 0.8 of the budget), and no ping-pong on the way.
        let up = log.iter().find(|&&(t, _, _)| t >= 200).expect("stepped up");
        assert!(up.0 < 240, "{log:?}");
        assert!(f[c.current].latency_ms >= 0.8 * budget, "{log:?}");
        assert!(f[c.current].latency_ms <= budget, "{log:?}");
        assert!(log.len() <= 4, "{log:?}");
        assert_no_ping_pong(&log);
    }
}

#[test]
fn with_low_noise_a_small_load_step_is_enough_and_the_start_is_re_entered() {
    let f = front();
    let budget = 7.2;
    let start = Controller::initial_index(&f, budget);
    let mut c = Controller::new(AdaptConfig::new(budget), f.clone(), start);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let log = simulate(&mut c, 300, |t, i| {
        let load = if (100..200).contains(&t) { 1.2 } else { 1.0 };
        f[i].latency_ms * load * (1.0 + uniform(&mut rng, 0.02))
    });
    assert!((100..106).contains(&log[0].0), "{log:?}");
    // Down to an entry that clears the budget by the margin under the 1.2x load.
    assert!(
        f[log[0].2].latency_ms * 1.2 <= budget / 1.05 * 1.02,
        "{log:?}"
    );
    // Under the load only moves up towards the budget (never back over it), then back to
    // the start once the load is gone.
    for &(t, from, to) in &log[1..] {
        if t < 200 {
            assert!(to > from && f[to].latency_ms * 1.2 <= budget, "{log:?}");
        }
    }
    assert!(
        log.iter().any(|&(t, _, _)| (200..240).contains(&t)),
        "{log:?}"
    );
    assert_eq!(c.current, start, "{log:?}");
    assert!(log.len() <= 4, "{log:?}");
    assert_no_ping_pong(&log);
}

#[test]
fn an_entry_slower_than_its_table_is_not_re_entered_in_a_loop() {
    let f = front();
    let budget = 7.0;
    let start = Controller::initial_index(&f, budget) - 4;
    let liar = Controller::initial_index(&f, budget);
    let mut c = Controller::new(AdaptConfig::new(budget), f.clone(), start);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    // Every entry from `liar` up really runs 30% slower than the table says.
    let log = simulate(&mut c, 1000, |_, i| {
        let err = if i >= liar { 1.3 } else { 1.0 };
        f[i].latency_ms * err * (1.0 + uniform(&mut rng, 0.03))
    });
    assert!(log.len() <= 2, "{log:?}");
    assert_no_ping_pong(&log);
    assert!(f[c.current].latency_ms <= budget, "{log:?}");
}

#[test]
fn near_duplicates_are_never_targets_and_the_cheapest_holds_under_any_load() {
    let mut f = front();
    // Insert a near-duplicate just below entry 10.
    f.insert(
        10,
        Candidate {
            subnet: Subnet(vec![Choice::Covered, Choice::Covered]),
            latency_ms: f[10].latency_ms * 0.995,
            quality: f[10].quality - 0.1,
        },
    );
    let ladder = Controller::ladder(&f, 0.03);
    assert!(!ladder.contains(&10), "{ladder:?}");
    let budget = 7.0;
    let start = Controller::initial_index(&f, budget);
    let mut c = Controller::new(AdaptConfig::new(budget), f.clone(), start);
    let log = simulate(&mut c, 200, |_, i| f[i].latency_ms * 5.0);
    // One step to the cheapest entry, then nothing more to do.
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(c.current, ladder[0]);
    assert!(log.iter().all(|&(_, _, to)| ladder.contains(&to)));
}

#[test]
fn cooldown_discards_windows_after_a_switch_and_bad_samples_are_ignored() {
    let f = front();
    let mut cfg = AdaptConfig::new(7.0);
    cfg.cooldown = 3;
    let start = Controller::initial_index(&f, 7.0);
    let mut c = Controller::new(cfg, f.clone(), start);
    assert_eq!(c.observe(f64::NAN), Decision::Stay);
    assert_eq!(c.observe(-1.0), Decision::Stay);
    c.switched(start);
    // Three huge windows inside the cooldown, then three more are needed.
    for _ in 0..3 {
        assert_eq!(c.observe(100.0), Decision::Stay);
    }
    assert_eq!(c.observe(100.0), Decision::Stay);
    assert_eq!(c.observe(100.0), Decision::Stay);
    assert!(matches!(c.observe(100.0), Decision::Switch(_)));
}
