//! The crate's one source of time: wall-clock and monotonic time, sleeping, and the randomness that jitters
//! waits. Retries, the bandwidth cap, timestamps, the supervisor's and the agent's backoff and deadlines take a
//! [`Clock`], so their schedules are tested without sleeping; only [`SystemClock`] touches the real clock, and
//! [`FakeClock`] is the test fixture.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// `at + d`, or as far ahead as an `Instant` reaches. Durations from outside (a container's grace period or health
/// interval as stored, a configuration file, a registry token's lifetime) must not overflow into a panic, which
/// with `panic = "abort"` makes the agent a crash loop.
pub fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(u64::from(u32::MAX))))
        .unwrap_or(at)
}

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Wall-clock time: timestamps, and `Retry-After` given as an HTTP date.
    fn now(&self) -> SystemTime;
    /// Monotonic time: token lifetimes, the bandwidth cap.
    fn instant(&self) -> Instant;
    /// A number in [0, 1) for jitter.
    fn random(&self) -> f64;
    /// Wall-clock seconds since the Unix epoch, as reports, tokens and rollouts count them (0 before 1970).
    fn unix_seconds(&self) -> u64 {
        self.now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// The real clock and tokio's timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(d))
    }
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
    fn instant(&self) -> Instant {
        Instant::now()
    }
    fn random(&self) -> f64 {
        rand::random::<f64>()
    }
}

/// A clock for tests: sleeping returns at once and records the wait, and time advances by exactly what was
/// "slept", from a fixed wall-clock start (2023-11-14T22:13:20Z).
#[derive(Debug)]
pub struct FakeClock {
    slept: Mutex<Vec<Duration>>,
    random: f64,
    start: Instant,
    /// Seconds the wall clock was stepped by, as NTP steps a board without a real-time clock.
    stepped: Mutex<i64>,
}

impl FakeClock {
    /// `random` is what every jitter draw returns.
    pub fn new(random: f64) -> Arc<FakeClock> {
        Arc::new(FakeClock {
            slept: Mutex::new(Vec::new()),
            random,
            start: Instant::now(),
            stepped: Mutex::new(0),
        })
    }

    /// Steps the wall clock by `secs` (back when negative); monotonic time does not move.
    pub fn step(&self, secs: i64) {
        *self.stepped.lock().unwrap_or_else(|p| p.into_inner()) += secs;
    }

    /// Every wait so far, in order.
    pub fn slept(&self) -> Vec<Duration> {
        self.slept.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn total(&self) -> Duration {
        self.slept().iter().sum()
    }
}

impl Clock for FakeClock {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.slept.lock().unwrap_or_else(|p| p.into_inner()).push(d);
        Box::pin(std::future::ready(()))
    }
    fn now(&self) -> SystemTime {
        let stepped = *self.stepped.lock().unwrap_or_else(|p| p.into_inner());
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + self.total();
        if stepped >= 0 {
            base + Duration::from_secs(stepped.unsigned_abs())
        } else {
            base - Duration::from_secs(stepped.unsigned_abs())
        }
    }
    fn instant(&self) -> Instant {
        self.start + self.total()
    }
    fn random(&self) -> f64 {
        self.random
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_past_what_an_instant_holds_is_far_away_not_a_panic() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = after(now, Duration::MAX);
        assert!(
            far >= now + Duration::from_secs(100 * 365 * 24 * 3600),
            "{:?}",
            far - now
        );
        let grace = Duration::try_from_secs_f64(1e19).unwrap();
        assert!(after(now, grace) > now);
    }
}
