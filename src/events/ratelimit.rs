//! Ingest rate limits per environment (`max_events_per_second`), in this process: a token
//! bucket per environment holding at most a second's worth. A call may take more events
//! than the bucket holds when it is full (a bulk call larger than the rate), leaving it in
//! debt, so the rate still holds on average. The HTTP API answers `429` past it; AMQP ingest
//! sends the message round the delay tiers. Several processes each allow the rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// At most this many environments are tracked; past it, buckets idle for over a second
/// (full again) are dropped.
const MAX_BUCKETS: usize = 10_000;

#[derive(Clone, Default)]
pub struct RateLimiter {
    buckets: Arc<Mutex<HashMap<Uuid, Bucket>>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Events refused since the bucket was made.
    refused: u64,
}

impl RateLimiter {
    /// Take `n` events of `env`'s allowance of `rate` per second at `now`, or say how long
    /// until they may be sent.
    pub fn take(&self, env: Uuid, rate: u32, n: usize, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(rate.max(1));
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&env) {
            buckets.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(1));
        }
        let bucket = buckets.entry(env).or_insert(Bucket {
            tokens: rate,
            at: now,
            refused: 0,
        });
        let refilled =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        let wanted = (n as f64).min(rate);
        if refilled >= wanted {
            *bucket = Bucket {
                tokens: refilled - n as f64,
                at: now,
                ..*bucket
            };
            Ok(())
        } else {
            *bucket = Bucket {
                tokens: refilled,
                at: now,
                refused: bucket.refused + n as u64,
            };
            Err(Duration::from_secs_f64((wanted - refilled) / rate))
        }
    }
}

impl RateLimiter {
    /// Events of `env` this limiter refused (while it tracks the environment: an idle one
    /// may be dropped past [`MAX_BUCKETS`]).
    pub fn refused(&self, env: Uuid) -> u64 {
        let buckets = self.buckets.lock().expect("rate limiter lock");
        buckets.get(&env).map_or(0, |b| b.refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_of_events_then_the_rate() {
        let limiter = RateLimiter::default();
        let (env, t0) = (Uuid::from_u128(1), Instant::now());
        for _ in 0..5 {
            assert!(limiter.take(env, 5, 1, t0).is_ok());
        }
        let wait = limiter.take(env, 5, 1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(200));
        assert!(
            limiter
                .take(env, 5, 1, t0 + Duration::from_millis(200))
                .is_ok()
        );
        // Another environment has its own bucket.
        assert!(limiter.take(Uuid::from_u128(2), 5, 5, t0).is_ok());
        assert_eq!(limiter.refused(env), 1, "the one refused");
        assert_eq!(limiter.refused(Uuid::from_u128(2)), 0);
    }

    #[test]
    fn a_call_larger_than_the_rate_goes_when_the_bucket_is_full_and_leaves_a_debt() {
        let limiter = RateLimiter::default();
        let (env, t0) = (Uuid::from_u128(1), Instant::now());
        assert!(limiter.take(env, 10, 100, t0).is_ok());
        // 90 events in debt: the next one waits 9.1 s.
        let wait = limiter.take(env, 10, 1, t0).unwrap_err();
        assert_eq!(wait.as_millis(), 9_100);
        assert!(
            limiter
                .take(env, 10, 1, t0 + Duration::from_millis(9_100))
                .is_ok()
        );
    }
}
