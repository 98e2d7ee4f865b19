//! The places of an external-effect kind on one consumer: at most `concurrency` attempts
//! run at once, and one environment holds at most its `share` of those places (counting
//! those waiting for one), so a slow receiver of one environment holds its own places and
//! no other's. A message over its environment's share goes back into the delay tiers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// Places each environment holds, running or waiting for a permit.
type Shares = Arc<Mutex<HashMap<Uuid, usize>>>;

/// One consumer's places.
pub struct Places {
    permits: Arc<Semaphore>,
    held: Shares,
    /// The most places one environment holds.
    share: usize,
}

impl Places {
    pub fn new(concurrency: usize, share: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            permits: Arc::new(Semaphore::new(concurrency)),
            held: Default::default(),
            share: share.clamp(1, concurrency),
        }
    }

    /// A place for a job of `env`, unless the environment holds its share already. A
    /// message of no known environment (it names no job; it is dead-lettered at once) is
    /// not counted.
    pub fn admit(&self, env: Option<Uuid>) -> Option<Place> {
        if let Some(env) = env {
            let mut held = self.held.lock().expect("places lock");
            let n = held.entry(env).or_default();
            if *n >= self.share {
                return None;
            }
            *n += 1;
        }
        Some(Place {
            env,
            held: self.held.clone(),
            permits: self.permits.clone(),
            permit: None,
        })
    }
}

/// An environment's place, given back (with its permit) when dropped.
pub struct Place {
    env: Option<Uuid>,
    held: Shares,
    permits: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Place {
    /// Wait until one of the consumer's places is free and take it.
    pub async fn taken(mut self) -> Self {
        let permit = self.permits.clone().acquire_owned().await;
        self.permit = Some(permit.expect("the semaphore is never closed"));
        self
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.permit.take();
        let Some(env) = self.env else { return };
        let mut held = self.held.lock().expect("places lock");
        if let Some(n) = held.get_mut(&env) {
            *n -= 1;
            if *n == 0 {
                held.remove(&env);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_environment_holds_at_most_its_share() {
        let places = Places::new(4, 2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = places.admit(Some(a)).unwrap();
        let _second = places.admit(Some(a)).unwrap();
        assert!(places.admit(Some(a)).is_none(), "a holds its share");
        assert!(places.admit(Some(b)).is_some(), "b has its own");
        assert!(places.admit(None).is_some(), "no environment: not counted");
        drop(first);
        assert!(places.admit(Some(a)).is_some(), "a place given back");
    }
}
