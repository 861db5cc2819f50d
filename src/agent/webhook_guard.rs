//! What keeps the webhook listener answering when clients misbehave, apart from the
//! HTTP handling in [`super::webhook`]:
//!
//! - [`Waiting`]: the budget of connections that wait for request headers (a new
//!   connection before its first request, a kept-alive one between requests). Each
//!   gets a short header deadline (hyper's `header_read_timeout`), and when the budget
//!   is full a new connection evicts the one that has waited longest. Idle or trickling
//!   (slowloris) connections therefore never keep a new client from being read: the
//!   accept loop never waits for a slot.
//! - [`Recent`]: signed push deliveries seen lately (by body digest and delivery id),
//!   so that a replayed or redelivered push does not start another sync.
//!
//! Both are plain data with the clock passed in where it matters; the listener holds
//! them behind a mutex.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Connections waiting for request headers, oldest first; see the module docs.
pub struct Waiting {
    max: usize,
    state: Mutex<WaitingState>,
}

#[derive(Default)]
struct WaitingState {
    /// Grows by one for every connection that starts waiting: the order of waiting.
    next: u64,
    /// Waiting connections by the order they started waiting, with their eviction bell.
    waiting: BTreeMap<u64, Arc<Notify>>,
    /// Connections evicted since the listener started.
    evicted: u64,
}

/// One connection's place in [`Waiting`]; leaves it when dropped.
pub struct Slot {
    budget: Arc<Waiting>,
    bell: Arc<Notify>,
    key: Mutex<Option<u64>>,
}

impl Waiting {
    /// A budget of `max` waiting connections (at least one).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            state: Mutex::default(),
        })
    }

    /// A new connection, waiting for its first request. When the budget is full, the
    /// connection that has waited longest is told to close ([`Slot::evicted`]).
    pub fn join(self: &Arc<Self>) -> Slot {
        let slot = Slot {
            budget: self.clone(),
            bell: Arc::new(Notify::new()),
            key: Mutex::new(None),
        };
        slot.waiting();
        slot
    }

    /// Connections waiting now.
    pub fn len(&self) -> usize {
        self.state.lock().expect("lock").waiting.len()
    }

    /// Whether no connection waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connections evicted since the listener started.
    pub fn evicted(&self) -> u64 {
        self.state.lock().expect("lock").evicted
    }
}

impl Slot {
    /// The connection's request headers arrived: it is being answered and cannot be
    /// evicted.
    pub fn busy(&self) {
        if let Some(key) = self.key.lock().expect("lock").take() {
            self.budget.state.lock().expect("lock").waiting.remove(&key);
        }
    }

    /// The answer was given: the connection waits for its next request, as the newest.
    pub fn waiting(&self) {
        self.busy();
        let mut state = self.budget.state.lock().expect("lock");
        while state.waiting.len() >= self.budget.max {
            let Some((_, bell)) = state.waiting.pop_first() else {
                break;
            };
            // notify_one keeps the wake-up if the connection is not listening yet.
            bell.notify_one();
            state.evicted += 1;
        }
        let key = state.next;
        state.next += 1;
        state.waiting.insert(key, self.bell.clone());
        *self.key.lock().expect("lock") = Some(key);
    }

    /// Resolves when the connection was evicted: close it.
    pub async fn evicted(&self) {
        self.bell.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy();
    }
}

/// Push deliveries seen lately: at most `max`, each remembered for `ttl`.
pub struct Recent {
    max: usize,
    ttl: Duration,
    seen: VecDeque<(String, Instant)>,
}

impl Recent {
    pub fn new(max: usize, ttl: Duration) -> Self {
        Self {
            max,
            ttl,
            seen: VecDeque::new(),
        }
    }

    /// Forgets every delivery (a new secret: deliveries signed with the old one are
    /// refused anyway).
    pub fn clear(&mut self) {
        self.seen.clear();
    }

    /// Whether any of `keys` was seen within the last `ttl` before `now`; the keys are
    /// remembered either way (the oldest are forgotten beyond `max`).
    pub fn seen_before(&mut self, keys: &[String], now: Instant) -> bool {
        while let Some((_, at)) = self.seen.front() {
            if now.saturating_duration_since(*at) > self.ttl || self.seen.len() > self.max {
                self.seen.pop_front();
            } else {
                break;
            }
        }
        let repeat = keys.iter().any(|k| self.seen.iter().any(|(s, _)| s == k));
        for key in keys {
            if !self.seen.iter().any(|(s, _)| s == key) {
                self.seen.push_back((key.clone(), now));
            }
        }
        while self.seen.len() > self.max {
            self.seen.pop_front();
        }
        repeat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_budget_evicts_the_connection_that_waited_longest() {
        let budget = Waiting::new(2);
        let a = budget.join();
        let b = budget.join();
        assert_eq!(budget.len(), 2);
        // b is being answered: not evictable. c then d fill the budget: a goes first.
        b.busy();
        let c = budget.join();
        assert_eq!(budget.evicted(), 0);
        let d = budget.join();
        assert_eq!(budget.evicted(), 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // a's bell rang (kept until it listens); c's did not.
            tokio::time::timeout(Duration::from_secs(5), a.evicted())
                .await
                .expect("a evicted");
            assert!(
                tokio::time::timeout(Duration::from_millis(1), c.evicted())
                    .await
                    .is_err()
            );
        });
        // b answered: waits again as the newest, and evicts c (the oldest waiting).
        b.waiting();
        assert_eq!(budget.evicted(), 2);
        drop(d);
        assert_eq!(budget.len(), 1);
        drop((a, b, c));
        assert!(budget.is_empty());
    }

    #[test]
    fn a_delivery_is_a_repeat_within_its_ttl_by_any_of_its_keys() {
        let mut recent = Recent::new(3, Duration::from_secs(600));
        let t0 = Instant::now();
        let k = |s: &str| s.to_string();
        assert!(!recent.seen_before(&[k("body:1"), k("id:1")], t0));
        assert!(recent.seen_before(&[k("body:1")], t0 + Duration::from_secs(1)));
        // Same body under another delivery id (an attacker can change the id, not the
        // signed body); a new body under a known id (a forge's redelivery).
        assert!(recent.seen_before(&[k("body:1"), k("id:9")], t0));
        assert!(recent.seen_before(&[k("body:2"), k("id:1")], t0));
        // Forgotten after the ttl, and beyond `max` keys.
        assert!(!recent.seen_before(&[k("body:1")], t0 + Duration::from_secs(601)));
        for i in 0..5 {
            recent.seen_before(&[format!("x:{i}")], t0 + Duration::from_secs(602));
        }
        assert!(!recent.seen_before(&[k("x:0")], t0 + Duration::from_secs(603)));
    }
}
