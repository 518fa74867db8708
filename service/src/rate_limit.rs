//! Per-application rate limiting: a token bucket per application, so that one client cannot
//! monopolise the service's single thread. Over its rate, an application's requests are
//! refused at once (cheaply) while other applications are served as usual.

use std::collections::HashMap;
use std::time::Instant;

/// Buckets kept at most; full (idle) buckets are dropped beyond this.
const MAX_BUCKETS: usize = 4096;

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<RateLimiter> {
        (per_second > 0).then(|| RateLimiter {
            per_second: per_second as f64,
            burst: burst.max(1) as f64,
            buckets: HashMap::new(),
        })
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// Takes one request's token from `client`'s bucket; false if there is none.
    pub fn admit(&mut self, client: &str, now: Instant) -> bool {
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(client) {
            let (per_second, burst) = (self.per_second, self.burst);
            self.buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * per_second < burst
            });
        }
        let bucket = self.buckets.entry(client.to_string()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let mut limiter = RateLimiter::new(10, 5).unwrap();
        let t0 = Instant::now();
        let admitted = (0..20).filter(|_| limiter.admit("a", t0)).count();
        assert_eq!(admitted, 5, "the burst");
        // Another application has its own bucket.
        assert!(limiter.admit("b", t0));
        // 0.3 s later, three more tokens.
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!((0..20).filter(|_| limiter.admit("a", t1)).count(), 3);
        // Idle for long: never more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| limiter.admit("a", t2)).count(), 5);
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(RateLimiter::new(0, 10).is_none());
    }

    #[test]
    fn idle_buckets_are_dropped_when_there_are_too_many() {
        let mut limiter = RateLimiter::new(1000, 1).unwrap();
        let t0 = Instant::now();
        for i in 0..MAX_BUCKETS {
            limiter.admit(&format!("app-{i}"), t0);
        }
        let later = t0 + Duration::from_secs(1);
        limiter.admit("newcomer", later);
        assert!(limiter.buckets.len() < 10, "{}", limiter.buckets.len());
    }
}
