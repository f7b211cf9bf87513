//! When to try again and how long to wait: exponential backoff with jitter, `Retry-After`, and the bandwidth cap.
//!
//! The schedule is plain arithmetic over the injected [`Clock`] (time, sleep and randomness), so it is tested
//! without sleeping.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::clock::Clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included; at least 1.
    pub attempts: u32,
    /// The wait before the second attempt; doubled each time after.
    pub base: Duration,
    /// No computed backoff waits longer than this.
    pub max_backoff: Duration,
    /// A server's `Retry-After` is honoured up to this; a registry asking for an hour should not stall a device.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): the server's `Retry-After` when it gave one
    /// (capped), else "full jitter" backoff, a random point in [base·2^(attempt-1) / 2, base·2^(attempt-1)], capped.
    /// Half the step is kept fixed so a retry never fires at once into a registry that just refused.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, random: f64) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.max_retry_after);
        }
        let exp = attempt.saturating_sub(1).min(20);
        let step = self.base.saturating_mul(1u32 << exp).min(self.max_backoff);
        let r = random.clamp(0.0, 1.0);
        step / 2 + step.mul_f64(r / 2.0)
    }
}

/// `Retry-After` is either delay-seconds or an HTTP date; a date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What one attempt came to.
#[derive(Debug)]
pub enum Outcome<T, E> {
    Done(T),
    /// Worth trying again, after the server's `Retry-After` if it sent one.
    Retry(E, Option<Duration>),
    Fail(E),
}

/// Runs `op` (given the 1-based attempt number) until it is done, fails for good, or the attempts run out; the
/// last error is returned then.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, clock: &dyn Clock, mut op: F) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Outcome<T, E>>,
{
    let attempts = policy.attempts.max(1);
    let mut attempt = 1;
    loop {
        match op(attempt).await {
            Outcome::Done(v) => return Ok(v),
            Outcome::Fail(e) => return Err(e),
            Outcome::Retry(e, retry_after) => {
                if attempt >= attempts {
                    return Err(e);
                }
                let d = policy.delay(attempt, retry_after, clock.random());
                tracing::debug!(attempt, delay_ms = d.as_millis() as u64, "retrying");
                clock.sleep(d).await;
                attempt += 1;
            }
        }
    }
}

/// A token bucket holding at most one second of tokens, shared by every download of one client.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// May go negative: a caller takes what it read and waits off the debt, so big reads are not starved.
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(bytes_per_second: u64) -> TokenBucket {
        TokenBucket {
            rate: bytes_per_second.max(1),
            state: Mutex::new(BucketState {
                tokens: bytes_per_second.max(1) as f64,
                last: None,
            }),
        }
    }

    /// Takes `n` bytes' worth of tokens at time `now` and says how long the caller must wait before going on.
    pub fn take(&self, n: u64, now: Instant) -> Duration {
        let rate = self.rate as f64;
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(last) = s.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            s.tokens = (s.tokens + elapsed * rate).min(rate);
        }
        s.last = Some(now);
        s.tokens -= n as f64;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = policy(10);
        let lo: Vec<u64> = (1..=6)
            .map(|a| p.delay(a, None, 0.0).as_millis() as u64)
            .collect();
        let hi: Vec<u64> = (1..=6)
            .map(|a| p.delay(a, None, 0.999_999).as_millis() as u64)
            .collect();
        assert_eq!(lo, [500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(hi, [999, 1999, 3999, 7999, 7999, 7999]);
        // Huge attempt numbers neither overflow nor exceed the cap.
        assert!(p.delay(u32::MAX, None, 0.5) <= Duration::from_secs(8));
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let p = policy(3);
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(7)), 0.3),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), 0.3),
            Duration::from_secs(60)
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after(" 12 ", now),
            Some(Duration::from_secs(12))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[tokio::test]
    async fn retry_loop_follows_the_schedule_and_stops() {
        let clock = FakeClock::new(0.0);
        let mut calls = Vec::new();
        // The error is the attempt that failed, so the last one is what the loop returns.
        let r: Result<(), u32> = retry(&policy(4), clock.as_ref(), |a| {
            calls.push(a);
            let retry_after = (a == 2).then_some(Duration::from_secs(5));
            async move { Outcome::Retry(a, retry_after) }
        })
        .await;
        assert_eq!(r.unwrap_err(), 4);
        assert_eq!(calls, [1, 2, 3, 4]);
        let slept = clock.slept();
        assert_eq!(
            slept,
            [
                Duration::from_millis(500),
                Duration::from_secs(5),
                Duration::from_secs(2)
            ]
        );
    }

    #[tokio::test]
    async fn retry_loop_stops_on_success_and_on_fatal() {
        let clock = FakeClock::new(0.5);
        let r: Result<u32, &str> = retry(&policy(5), clock.as_ref(), |a| async move {
            if a < 3 {
                Outcome::Retry("busy", None)
            } else {
                Outcome::Done(a)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(clock.slept().len(), 2);

        let clock = FakeClock::new(0.5);
        let r: Result<u32, &str> = retry(&policy(5), clock.as_ref(), |_| async {
            Outcome::Fail("404")
        })
        .await;
        assert_eq!(r.unwrap_err(), "404");
        assert!(clock.slept().is_empty());
    }

    #[test]
    fn token_bucket_paces_to_the_rate() {
        let b = TokenBucket::new(1000);
        let t0 = Instant::now();
        // The first second's worth passes at once, then the debt must be waited off.
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // Half a second later the debt is paid; 250 more bytes cost a quarter second.
        assert_eq!(
            b.take(250, t0 + Duration::from_millis(500)),
            Duration::from_millis(250)
        );
        // A long idle time refills at most one second of tokens.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.take(1000, later), Duration::ZERO);
        assert_eq!(b.take(1, later), Duration::from_millis(1));
    }
}
