//! Delay tiers: how RabbitMQ holds a delayed job's message until it is due.
//!
//! A tier is a durable queue with one fixed `x-message-ttl` and a dead-letter exchange.
//! Every message in a tier waits exactly that TTL, so messages expire in arrival order and
//! none waits behind a longer one (per-message TTL on a shared queue would block short
//! delays behind long ones at the head of the queue).
//!
//! Tiers are grouped in levels. Level `n < 16` has three tiers, of 1, 2 and 3 times `4^n`
//! milliseconds (level 0: 1, 2, 3 ms; level 15: about 12.4, 24.9 and 37.3 days). Levels 16
//! to 29 have one tier each of `2^31` ms (about 24.9 days), because RabbitMQ refuses a TTL
//! above `2^32 - 1` ms. A delay is written as one digit per level, greedily from the top
//! (base 4 below level 16), which is the sum of at most one tier per level: any delay up to
//! [`MAX_ROUTED_DELAY_MS`] (2^35 - 1 ms, about 398 days) takes at most 30 hops, and a delay
//! of a minute at most 8.
//!
//! The digits travel in the message's routing key, one word per level from the top, then
//! the job's kind and queue: `0.0.….1.3.0.deliverEvent.events`. Each level has a topic
//! exchange; for digit `d > 0` it routes the message into that level's tier of `d`, whose
//! dead-letter exchange is the next level down; for digit 0 an exchange-to-exchange binding
//! passes it straight down. Below level 0 sits the exit exchange, where each work queue is
//! bound by its kind and queue. Dead-lettering keeps the routing key, so RabbitMQ walks the
//! message down the levels with no help from this service.
//!
//! A delay longer than [`MAX_ROUTED_DELAY_MS`] is routed for the maximum; the worker that
//! receives it early sends it back for the remainder.

use std::time::Duration;

/// Levels written in base 4.
const BASE4_LEVELS: usize = 16;
/// The longest TTL RabbitMQ accepts is `2^32 - 1` ms; the top levels repeat `2^31`.
const TOP_TTL_MS: u64 = 1 << 31;
/// How many top levels of [`TOP_TTL_MS`] there are.
const TOP_LEVELS: usize = 14;
/// How many levels in all.
pub const LEVELS: usize = BASE4_LEVELS + TOP_LEVELS;

/// The longest delay the tiers hold in one pass: `2^35 - 1` ms, about 398 days.
pub const MAX_ROUTED_DELAY_MS: u64 = (1u64 << 32) - 1 + TOP_LEVELS as u64 * TOP_TTL_MS;

/// One level: its tiers hold `unit_ms`, `2 * unit_ms`, … `max_digit * unit_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub unit_ms: u64,
    pub max_digit: u8,
}

/// Level `n`, counted from the shortest.
pub const fn level(n: usize) -> Level {
    if n < BASE4_LEVELS {
        Level {
            unit_ms: 1u64 << (2 * n),
            max_digit: 3,
        }
    } else {
        Level {
            unit_ms: TOP_TTL_MS,
            max_digit: 1,
        }
    }
}

/// Every tier: `(level, digit, ttl_ms)`, shortest level first.
pub fn tiers() -> impl Iterator<Item = (usize, u8, u64)> {
    (0..LEVELS).flat_map(|n| {
        let l = level(n);
        (1..=l.max_digit).map(move |d| (n, d, l.unit_ms * d as u64))
    })
}

/// A delay written as one digit per level (index = level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayDigits([u8; LEVELS]);

impl DelayDigits {
    /// The digits of `delay_ms`, capped at [`MAX_ROUTED_DELAY_MS`].
    pub fn of(delay_ms: u64) -> Self {
        let mut rest = delay_ms.min(MAX_ROUTED_DELAY_MS);
        let mut digits = [0u8; LEVELS];
        for n in (0..LEVELS).rev() {
            let l = level(n);
            let d = (rest / l.unit_ms).min(l.max_digit as u64);
            digits[n] = d as u8;
            rest -= d * l.unit_ms;
        }
        debug_assert_eq!(rest, 0);
        Self(digits)
    }

    /// The delay these digits add up to.
    pub fn total_ms(&self) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(n, d)| level(n).unit_ms * *d as u64)
            .sum()
    }

    /// The level the message enters: the highest with a digit, `None` for no delay.
    pub fn entry_level(&self) -> Option<usize> {
        self.0.iter().rposition(|d| *d > 0)
    }

    /// How many tiers the message passes through.
    pub fn hops(&self) -> usize {
        self.0.iter().filter(|d| **d > 0).count()
    }

    /// `d.d.….d.<kind>.<queue>`, top level first.
    pub fn routing_key(&self, kind: &str, queue: &str) -> String {
        let mut key = String::with_capacity(2 * LEVELS + kind.len() + queue.len() + 1);
        for d in self.0.iter().rev() {
            key.push(char::from(b'0' + d));
            key.push('.');
        }
        key.push_str(kind);
        key.push('.');
        key.push_str(queue);
        key
    }
}

/// The topic pattern that picks digit `digit` at level `n`.
pub fn binding_pattern(n: usize, digit: u8) -> String {
    let mut p = "*.".repeat(LEVELS - 1 - n);
    p.push(char::from(b'0' + digit));
    p.push_str(".#");
    p
}

/// The pattern that takes a message off the exit exchange into a work queue.
pub fn exit_pattern(kind: &str, queue: &str) -> String {
    format!("#.{kind}.{queue}")
}

/// The delay still to wait for a message due `remaining` from now, in whole milliseconds,
/// rounded up: a job never runs before its due time.
pub fn remaining_ms(remaining: Duration) -> u64 {
    remaining
        .as_nanos()
        .div_ceil(1_000_000)
        .min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ttl_is_one_rabbitmq_accepts() {
        for (_, _, ttl) in tiers() {
            assert!((1..=u32::MAX as u64).contains(&ttl), "{ttl}");
        }
        assert_eq!(tiers().count(), 16 * 3 + 14);
    }

    #[test]
    fn digits_add_up_to_the_delay() {
        let mut samples = vec![0, 1, 2, 3, 4, 5, 15, 16, 999, 1000, 60_000, 86_400_000];
        samples.extend([u32::MAX as u64, 1 << 33, MAX_ROUTED_DELAY_MS]);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..10_000 {
            // xorshift: deterministic delays of every size
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push((x % (MAX_ROUTED_DELAY_MS + 1)) >> (x % 35));
        }
        for ms in samples {
            let d = DelayDigits::of(ms);
            assert_eq!(d.total_ms(), ms, "{ms}");
            assert!(d.hops() <= LEVELS);
        }
    }

    #[test]
    fn hops_stay_few() {
        // A minute or less: base 4 up to 4^8 = 65,536 ms, eight levels at most.
        for ms in (0..=60_000).step_by(7) {
            assert!(DelayDigits::of(ms).hops() <= 8, "{ms}");
        }
        // A year: 14 top hops of 2^31 ms at most, plus 16 base-4 levels.
        let year = 365 * 24 * 3600 * 1000;
        let d = DelayDigits::of(year);
        assert_eq!(d.total_ms(), year);
        assert!(d.hops() <= LEVELS);
        assert_eq!(d.entry_level(), Some(LEVELS - 1));
    }

    #[test]
    fn longer_delays_are_capped() {
        let d = DelayDigits::of(u64::MAX);
        assert_eq!(d.total_ms(), MAX_ROUTED_DELAY_MS);
        const { assert!(MAX_ROUTED_DELAY_MS >= 365 * 24 * 3600 * 1000) };
    }

    #[test]
    fn remaining_time_rounds_up() {
        assert_eq!(remaining_ms(Duration::ZERO), 0);
        assert_eq!(remaining_ms(Duration::from_micros(1)), 1);
        assert_eq!(remaining_ms(Duration::from_micros(1_000)), 1);
        assert_eq!(remaining_ms(Duration::from_micros(1_001)), 2);
    }

    #[test]
    fn no_delay_has_no_entry() {
        assert_eq!(DelayDigits::of(0).entry_level(), None);
        assert_eq!(DelayDigits::of(1).entry_level(), Some(0));
        assert_eq!(DelayDigits::of(4).entry_level(), Some(1));
    }

    #[test]
    fn routing_keys_match_their_patterns() {
        let d = DelayDigits::of(6); // 1 * 4 + 2 * 1
        let key = d.routing_key("deliverEvent", "events");
        assert!(key.ends_with(".0.1.2.deliverEvent.events"), "{key}");
        assert_eq!(key.split('.').count(), LEVELS + 2);
        assert!(topic_matches(&binding_pattern(1, 1), &key));
        assert!(topic_matches(&binding_pattern(0, 2), &key));
        assert!(!topic_matches(&binding_pattern(0, 1), &key));
        assert!(topic_matches(&binding_pattern(2, 0), &key));
        assert!(topic_matches(&exit_pattern("deliverEvent", "events"), &key));
        let other = d.routing_key("events.invokeDispatcher", "events");
        assert!(!topic_matches(
            &exit_pattern("deliverEvent", "events"),
            &other
        ));
        assert!(topic_matches(
            &exit_pattern("events.invokeDispatcher", "events"),
            &other
        ));
    }

    /// AMQP topic matching (`*` one word, `#` zero or more), for the tests above.
    fn topic_matches(pattern: &str, key: &str) -> bool {
        fn go(p: &[&str], k: &[&str]) -> bool {
            match p.split_first() {
                None => k.is_empty(),
                Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
                Some((&w, rest)) => !k.is_empty() && (w == "*" || w == k[0]) && go(rest, &k[1..]),
            }
        }
        let p: Vec<&str> = pattern.split('.').collect();
        let k: Vec<&str> = key.split('.').collect();
        go(&p, &k)
    }
}
