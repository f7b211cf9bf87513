//! Per-credential rate limiting: a token bucket per authenticated credential, in memory.
//!
//! Only credentials the server accepted get a bucket, so the map is bounded by the fleet's size (devices and admin
//! tokens), not by what strangers send. Buckets that have filled up again are forgotten by [`RateLimiter::forget_idle`]:
//! a full bucket and no bucket behave the same.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How many requests a credential may make: `rate` a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    rate: Rate,
    buckets: HashMap<String, Bucket>,
}

impl RateLimiter {
    pub fn new(rate: Rate) -> RateLimiter {
        RateLimiter {
            rate,
            buckets: HashMap::new(),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate.per_second).min(f64::from(self.rate.burst));
        b.at = now;
    }

    /// Takes one request from `key`'s bucket; when it is empty, how long until it holds one again.
    pub fn check(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.rate.burst);
        let mut bucket = self.buckets.remove(key).unwrap_or(Bucket {
            tokens: burst,
            at: now,
        });
        self.refill(&mut bucket, now);
        let verdict = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else if self.rate.per_second > 0.0 {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.rate.per_second,
            ))
        } else {
            Err(Duration::MAX)
        };
        self.buckets.insert(key.to_string(), bucket);
        verdict
    }

    /// Drops the buckets that are full again.
    pub fn forget_idle(&mut self, now: Instant) {
        let (rate, burst) = (self.rate.per_second, f64::from(self.rate.burst));
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_gets_its_burst_then_its_rate_and_others_are_untouched() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Rate {
            per_second: 10.0,
            burst: 5,
        });
        for _ in 0..5 {
            assert_eq!(l.check("a", t0), Ok(()));
        }
        let wait = l.check("a", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert_eq!(
            l.check("b", t0),
            Ok(()),
            "another credential has its own bucket"
        );
        // 100 ms later one request is allowed again, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(l.check("a", t1), Ok(()));
        assert!(l.check("a", t1).is_err());
        // Idle buckets that filled up are forgotten; a busy one stays.
        l.forget_idle(t1 + Duration::from_millis(200));
        assert_eq!(l.tracked(), 1, "b is full again, a is not");
        l.forget_idle(t1 + Duration::from_secs(1));
        assert_eq!(l.tracked(), 0);
    }
}
