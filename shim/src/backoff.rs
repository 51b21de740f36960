//! Reconnecting: exponential backoff with jitter, and the retry loop around opening a
//! session.

use std::time::{Duration, Instant};

use pgvpn_core::rng::Rng;

use crate::error::{DbError, ErrorClass};

/// Exponential backoff with jitter. The nominal delay goes 100 ms, 200 ms, 400 ms, 800 ms,
/// then stays at 1 s ([`Backoff::CAP`]): a standby promoted after a failover is found
/// within about a second of the promotion. An outage longer than [`Backoff::SLOW_AFTER`]
/// is no failover (maintenance, a dead cluster): then the cap rises to 5 s
/// ([`Backoff::SLOW_CAP`]), so that many shims waiting for it do not cost the server a
/// connection attempt each per second for nothing. The delay actually returned is drawn
/// uniformly from [`Backoff::bounds`] of the nominal one (its upper half), so that shims
/// cut off by the same database restart do not all reconnect in the same millisecond, while
/// none waits longer than the nominal delay.
#[derive(Debug)]
pub struct Backoff {
    attempts: u32,
    rng: Rng,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    /// The longest nominal delay while the outage is young.
    pub const CAP: Duration = Duration::from_secs(1);
    /// The longest nominal delay once the database has been away for `SLOW_AFTER`.
    pub const SLOW_CAP: Duration = Duration::from_secs(5);
    pub const SLOW_AFTER: Duration = Duration::from_secs(60);

    /// Seeded differently in every process (and every call).
    pub fn new() -> Backoff {
        Backoff::with_rng(Rng::from_entropy())
    }

    pub fn with_rng(rng: Rng) -> Backoff {
        Backoff { attempts: 0, rng }
    }

    /// The range (inclusive) a delay with this nominal value is drawn from.
    pub fn bounds(nominal: Duration) -> (Duration, Duration) {
        (nominal / 2, nominal)
    }

    /// The nominal delay after `attempts` earlier ones, `down_for` into the outage: 100 ms
    /// doubling, capped at 1 s, or at 5 s after a minute.
    pub fn nominal_after(attempts: u32, down_for: Duration) -> Duration {
        let cap = if down_for >= Self::SLOW_AFTER {
            Self::SLOW_CAP
        } else {
            Self::CAP
        };
        Self::FIRST
            .saturating_mul(2u32.saturating_pow(attempts))
            .min(cap)
    }

    /// The next delay, `down_for` into the outage.
    pub fn next_delay(&mut self, down_for: Duration) -> Duration {
        let nominal = Self::nominal_after(self.attempts, down_for);
        self.attempts = self.attempts.saturating_add(1);
        let (lo, hi) = Self::bounds(nominal);
        let span_us = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(self.rng.below(span_us + 1))
    }
}

/// How a reconnect loop ended without a session.
#[derive(Debug)]
pub enum GaveUp {
    /// Shutdown was requested while waiting.
    Stopped,
    /// A fatal error (class Denied, or Other at startup).
    Fatal(DbError),
}

/// Calls `open` until it succeeds. Between attempts calls `wait(delay)`, which sleeps (or
/// does useful work) for about `delay` and returns false if the shim is shutting down.
/// Transient errors are retried forever; `Denied` always gives up; `Other` gives up only if
/// `other_is_fatal` (at startup), else is retried with a warning.
pub fn retry_open<T>(
    what: &str,
    other_is_fatal: bool,
    mut open: impl FnMut() -> Result<T, DbError>,
    mut wait: impl FnMut(Duration) -> bool,
) -> Result<T, GaveUp> {
    let mut backoff = Backoff::new();
    let mut attempt = 0u64;
    let start = Instant::now();
    loop {
        match open() {
            Ok(s) => return Ok(s),
            Err(e) => {
                attempt += 1;
                match e.class {
                    ErrorClass::Denied => return Err(GaveUp::Fatal(e)),
                    ErrorClass::Other if other_is_fatal => return Err(GaveUp::Fatal(e)),
                    ErrorClass::Other => log::warn!("{what}: {e}; retrying"),
                    ErrorClass::Transient if attempt == 1 && other_is_fatal => {
                        // At startup say once why nothing happens (a wrong socket path looks
                        // exactly like a database that is still starting).
                        log::warn!("{what}: database not reachable yet ({e}); retrying")
                    }
                    ErrorClass::Transient => log::debug!("{what}: attempt {attempt}: {e}"),
                }
            }
        }
        if !wait(backoff.next_delay(start.elapsed())) {
            return Err(GaveUp::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOMINAL_MS: [u128; 9] = [100, 200, 400, 800, 1000, 1000, 1000, 1000, 1000];
    const YOUNG: Duration = Duration::ZERO;

    fn within(d: Duration, nominal: Duration) -> bool {
        let (lo, hi) = Backoff::bounds(nominal);
        lo <= d && d <= hi
    }

    #[test]
    fn nominal_delay_doubles_to_one_second_and_to_five_after_a_minute() {
        let ms: Vec<u128> = (0..9)
            .map(|i| Backoff::nominal_after(i, YOUNG).as_millis())
            .collect();
        assert_eq!(ms, NOMINAL_MS);
        let almost = Backoff::SLOW_AFTER - Duration::from_millis(1);
        assert_eq!(Backoff::nominal_after(1000, almost), Duration::from_secs(1));
        assert_eq!(
            Backoff::nominal_after(1000, Backoff::SLOW_AFTER),
            Duration::from_secs(5)
        );
        // The first delays stay short even late in an outage (a new retry loop).
        assert_eq!(
            Backoff::nominal_after(0, Backoff::SLOW_AFTER),
            Duration::from_millis(100)
        );
        assert_eq!(
            Backoff::bounds(Duration::from_secs(1)),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
    }

    #[test]
    fn a_failover_is_found_within_a_second_of_the_promotion() {
        // Attempts every <= 1 s while the database is down: whenever the standby becomes
        // writable, the next attempt comes at most 1 s later.
        for seed in 0..50 {
            let mut b = Backoff::with_rng(Rng::new(seed));
            let mut t = Duration::ZERO;
            while t < Duration::from_secs(50) {
                let d = b.next_delay(t);
                assert!(d <= Duration::from_secs(1), "seed {seed} at {t:?}: {d:?}");
                t += d;
            }
        }
    }

    #[test]
    fn every_delay_is_within_the_bounds_of_its_nominal_value() {
        for seed in 0..200 {
            let mut b = Backoff::with_rng(Rng::new(seed));
            for (i, _) in NOMINAL_MS.iter().enumerate() {
                let d = b.next_delay(YOUNG);
                let nominal = Backoff::nominal_after(i as u32, YOUNG);
                assert!(within(d, nominal), "seed {seed}, step {i}: {d:?}");
            }
        }
    }

    #[test]
    fn shims_do_not_reconnect_in_step() {
        // 200 shims (differently seeded) after the same restart: their first retries spread
        // over the whole 50..=100 ms window, and hardly any two share a millisecond.
        let firsts: Vec<Duration> = (0..200)
            .map(|seed| Backoff::with_rng(Rng::new(seed)).next_delay(YOUNG))
            .collect();
        let min = firsts.iter().min().unwrap();
        let max = firsts.iter().max().unwrap();
        assert!(*min < Duration::from_millis(55), "{min:?}");
        assert!(*max > Duration::from_millis(95), "{max:?}");
        let mut ms: Vec<u128> = firsts.iter().map(Duration::as_millis).collect();
        ms.sort();
        ms.dedup();
        assert!(ms.len() > 40, "only {} distinct milliseconds", ms.len());
        // Entropy seeding differs between two backoffs made one after the other.
        let a: Vec<Duration> = {
            let mut b = Backoff::new();
            (0..8).map(|_| b.next_delay(YOUNG)).collect()
        };
        std::thread::sleep(Duration::from_millis(1));
        let b: Vec<Duration> = {
            let mut b = Backoff::new();
            (0..8).map(|_| b.next_delay(YOUNG)).collect()
        };
        assert_ne!(a, b);
    }

    #[test]
    fn retry_open_behaviour() {
        let transient = || DbError::new(ErrorClass::Transient, "connection refused");
        // transient errors are retried with growing delays until success
        let mut n = 0;
        let mut waits = vec![];
        let r = retry_open(
            "t",
            true,
            || {
                n += 1;
                if n < 4 {
                    Err(transient())
                } else {
                    Ok(n)
                }
            },
            |d| {
                waits.push(d);
                true
            },
        );
        assert_eq!(r.unwrap(), 4);
        assert_eq!(waits.len(), 3);
        for (i, d) in waits.iter().enumerate() {
            assert!(
                within(*d, Backoff::nominal_after(i as u32, YOUNG)),
                "{waits:?}"
            );
        }
        // stop requested while waiting
        let r: Result<(), _> = retry_open("t", true, || Err(transient()), |_| false);
        assert!(matches!(r, Err(GaveUp::Stopped)));
        // Denied gives up at once, at startup and later
        for startup in [true, false] {
            let r: Result<(), _> = retry_open(
                "t",
                startup,
                || Err(DbError::new(ErrorClass::Denied, "no")),
                |_| panic!("must not wait"),
            );
            assert!(
                matches!(&r, Err(GaveUp::Fatal(e)) if e.class == ErrorClass::Denied),
                "{r:?}"
            );
        }
        // Other: fatal at startup, retried later
        let other = || DbError::new(ErrorClass::Other, "function pgvpn.send does not exist");
        let r: Result<(), _> = retry_open("t", true, || Err(other()), |_| panic!("no wait"));
        assert!(matches!(r, Err(GaveUp::Fatal(_))));
        let mut n = 0;
        let r = retry_open(
            "t",
            false,
            || {
                n += 1;
                if n < 3 {
                    Err(other())
                } else {
                    Ok("open")
                }
            },
            |_| true,
        );
        assert_eq!(r.unwrap(), "open");
    }
}
