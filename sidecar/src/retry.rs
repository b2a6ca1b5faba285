//! When to try again: the SVID renewal and bootstrap retry schedules, as pure functions of the
//! time left, the attempt number and a jitter value, so that they are tested without a clock.
//!
//! Renewal retries are **bounded by the time left**: a wait is never longer than
//! [`RENEW_FRACTION`] of the SVID's remaining life, so attempts come closer together as expiry
//! nears and a control plane that comes back with `x` seconds left is found with at least
//! `(1 - RENEW_FRACTION) * x` left. A wait once grew to 8 s with 5 s left, and the sidecar
//! failed closed although the control plane was back.

use std::time::Duration;

/// A renewal retry never waits more than this fraction of the SVID's remaining life.
pub const RENEW_FRACTION: f64 = 0.25;
/// The first renewal retry's wait (doubled after every failed attempt)...
pub const RENEW_BASE: Duration = Duration::from_millis(500);
/// ...up to this, while the SVID has plenty of life left.
pub const RENEW_CAP: Duration = Duration::from_secs(30);
/// The shortest wait between two renewal attempts.
pub const RENEW_MIN: Duration = Duration::from_millis(50);
/// No renewal attempt starts with less life left than this (an attempt needs a handshake and
/// a signature); the sidecar then waits for expiry and fails closed.
pub const RENEW_LAST_CALL: Duration = Duration::from_millis(200);

/// The first bootstrap retry's wait (doubled after every failed attempt)...
pub const BOOTSTRAP_BASE: Duration = Duration::from_millis(250);
/// ...up to this: a new join token is also picked up as soon as its file changes, but a
/// token in the environment or a control plane that comes back is only seen by an attempt.
pub const BOOTSTRAP_CAP: Duration = Duration::from_secs(3);

/// An endpoint's first ejection after a failure (doubled after every consecutive failure)...
pub const EJECT_BASE: Duration = Duration::from_secs(1);
/// ...up to this.
pub const EJECT_CAP: Duration = Duration::from_secs(30);

/// Scales `d` by a factor between 1/2 and 1 chosen by `jitter` (0..=1; anything else counts
/// as 1), so that sidecars that failed together do not retry together.
fn jittered(d: Duration, jitter: f64) -> Duration {
    let j = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        1.0
    };
    d.mul_f64(0.5 + 0.5 * j)
}

/// `base * 2^attempt`, at most `cap`.
fn exponential(base: Duration, cap: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16)).min(cap)
}

/// How long to wait after failed renewal attempt number `attempt` (0 for the first) when the
/// SVID has `left` to live: between [`RENEW_MIN`] and `RENEW_FRACTION * left`, or `None` when
/// the next attempt would start with less than [`RENEW_LAST_CALL`] left (then the sidecar
/// waits for expiry; this happens only with less than `RENEW_LAST_CALL / (1 - RENEW_FRACTION)`
/// left).
pub fn renew_delay(left: Duration, attempt: u32, jitter: f64) -> Option<Duration> {
    let bound = exponential(RENEW_BASE, RENEW_CAP, attempt).min(left.mul_f64(RENEW_FRACTION));
    let d = jittered(bound, jitter).max(RENEW_MIN);
    (left.saturating_sub(d) >= RENEW_LAST_CALL).then_some(d)
}

/// How long to wait before reconnecting the policy watch after failed attempt number
/// `attempt` (0 for the first): the same schedule as bootstrap, so that a control plane that
/// comes back is followed within [`BOOTSTRAP_CAP`] (grants and revocations it holds reach the
/// sidecar within seconds, not after a backoff that grew while it was away).
pub fn reconnect_delay(attempt: u32, jitter: f64) -> Duration {
    bootstrap_delay(attempt, jitter)
}

/// How long to wait after failed bootstrap attempt number `attempt` (0 for the first):
/// between [`BOOTSTRAP_BASE`]/2 and [`BOOTSTRAP_CAP`].
pub fn bootstrap_delay(attempt: u32, jitter: f64) -> Duration {
    jittered(exponential(BOOTSTRAP_BASE, BOOTSTRAP_CAP, attempt), jitter)
}

/// How long an endpoint is ejected after its `failures`-th consecutive failure (1 for the
/// first): between half of and [`EJECT_BASE`]` * 2^(failures-1)`, at most [`EJECT_CAP`].
pub fn eject_delay(failures: u32, jitter: f64) -> Duration {
    jittered(
        exponential(EJECT_BASE, EJECT_CAP, failures.saturating_sub(1)),
        jitter,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The renewal attempts (as time left at each) when the control plane never answers,
    /// starting with `left` and drawing jitter from `jitters` in turn.
    fn attempts(mut left: Duration, jitters: &[f64]) -> Vec<Duration> {
        let mut out = Vec::new();
        let mut attempt = 0;
        loop {
            out.push(left);
            let j = jitters[attempt as usize % jitters.len()];
            let Some(d) = renew_delay(left, attempt, j) else {
                return out;
            };
            left = left.saturating_sub(d);
            attempt += 1;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_renewal_wait_is_at_most_a_quarter_of_the_time_left(
            left_ms in 0u64..7_200_000,
            attempt in 0u32..100,
            jitter in -1.0f64..2.0,
        ) {
            let left = Duration::from_millis(left_ms);
            match renew_delay(left, attempt, jitter) {
                None => prop_assert!(left < RENEW_LAST_CALL.mul_f64(1.0 / (1.0 - RENEW_FRACTION))),
                Some(d) => {
                    prop_assert!(d <= left.mul_f64(RENEW_FRACTION), "{d:?} with {left:?} left");
                    prop_assert!(d >= RENEW_MIN && d <= RENEW_CAP);
                    prop_assert!(left - d >= RENEW_LAST_CALL);
                }
            }
        }

        #[test]
        fn renewal_attempts_keep_coming_until_just_before_expiry(
            ttl_s in 10u64..3600,
            jitters in proptest::collection::vec(0.0f64..=1.0, 1..16),
        ) {
            // Renewal starts at 40 % of the life at the earliest; the control plane is away.
            let ttl = Duration::from_secs(ttl_s);
            let seen = attempts(ttl.mul_f64(0.6), &jitters);
            let last_tenth = seen.iter().filter(|l| **l <= ttl / 10).count();
            prop_assert!(last_tenth >= 3, "{last_tenth} attempts in the last tenth of {ttl:?}");
            let last = *seen.last().unwrap();
            prop_assert!(last >= RENEW_LAST_CALL);
            prop_assert!(last < RENEW_LAST_CALL.mul_f64(1.0 / (1.0 - RENEW_FRACTION)));
            // A control plane back with `x` left is tried again with >= 3/4 of `x` left.
            for w in seen.windows(2) {
                prop_assert!(w[0] - w[1] <= w[0].mul_f64(RENEW_FRACTION));
            }
        }

        #[test]
        fn ejections_grow_with_consecutive_failures_and_never_exceed_the_cap(
            failures in 0u32..10_000,
            jitter in -1.0f64..2.0,
            jitter2 in 0.0f64..=1.0,
        ) {
            let d = eject_delay(failures, jitter);
            prop_assert!(d <= EJECT_CAP && d >= EJECT_BASE / 2, "{d:?}");
            // One more failure never shortens the bound, and the next one at least doubles
            // it until the cap.
            let bound = |f: u32| eject_delay(f, 1.0);
            prop_assert!(bound(failures + 1) >= bound(failures));
            prop_assert!(bound(failures + 1) == EJECT_CAP || bound(failures + 1) >= bound(failures) * 2 || failures == 0);
            prop_assert!(eject_delay(failures, jitter2) <= bound(failures));
        }

        #[test]
        fn bootstrap_waits_never_exceed_the_cap(attempt in 0u32..1000, jitter in -1.0f64..2.0) {
            let d = bootstrap_delay(attempt, jitter);
            prop_assert!(d <= BOOTSTRAP_CAP && d >= BOOTSTRAP_BASE / 2);
        }
    }

    #[test]
    fn the_first_ejection_lasts_a_second_and_the_thirtieth_thirty() {
        assert_eq!(eject_delay(1, 1.0), EJECT_BASE);
        assert_eq!(eject_delay(2, 1.0), EJECT_BASE * 2);
        assert_eq!(eject_delay(30, 1.0), EJECT_CAP);
        assert_eq!(eject_delay(1, 0.0), EJECT_BASE / 2);
    }

    #[test]
    fn the_wait_that_outlived_the_svid_is_now_bounded_by_the_time_left() {
        // The fault: 5 s left, 5th failed attempt, the next try 8 s later, after expiry.
        let d = renew_delay(Duration::from_secs(5), 4, 1.0).unwrap();
        assert!(d <= Duration::from_millis(1250), "{d:?}");
        assert_eq!(renew_delay(Duration::from_millis(240), 0, 0.5), None);
        assert_eq!(
            renew_delay(Duration::from_secs(600), 0, 1.0),
            Some(RENEW_BASE)
        );
        assert_eq!(
            renew_delay(Duration::from_secs(600), 30, 1.0),
            Some(RENEW_CAP)
        );
    }
}
