//! The credential cache in front of the store: what keeps authentication cheap at a fleet's
//! cadence and when a whole fleet reconnects at once after a restart.
//!
//! - **Hits.** A lookup is reused for its entry's lifetime, a random 3/4 to all of the TTL, so
//!   entries filled together (a fleet reconnecting) expire spread out. An entry used past half
//!   its lifetime is refreshed in the background, so a device calling more often than the TTL
//!   (heartbeats every 30 s against the default 60 s) keeps hitting instead of paying a
//!   database round trip on its request path every TTL.
//! - **Misses are single-flight and batched.** Concurrent misses for one credential share one
//!   lookup; lookups queued while a query runs go out together in the next one (`IN (...)`,
//!   up to [`MAX_LOOKUP_BATCH`] credentials, at most [`QUERIES_IN_FLIGHT`] queries at once).
//!   A fleet reconnecting costs a few queries per batch window instead of one per device,
//!   which is what filled the request slots on PostgreSQL in the reconnect storm of
//!   `benches/fleet.rs`.
//! - **Revocation.** A revocation or rotation through this process drops the affected entries
//!   and detaches the lookups in flight at once: a query taken before the change never fills
//!   the cache, and later misses start a fresh one. One made by another process (another
//!   replica, `cloud-server token revoke-api`) applies here within the TTL: an entry is never
//!   served later than the TTL after its query started.
//! - **Memory.** At most [`CACHE_MAX`] entries (under 200 bytes each); when full, expired
//!   entries go first, then the least recently used tenth. Only valid credentials are cached:
//!   unknown, revoked and expired ones are asked every time (batched like any miss), so random
//!   tokens cannot fill the cache.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::{FutureExt, Shared};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::Principal;
use crate::domain::{now_ms, DeviceStatus};
use crate::error::{CloudError, Result};
use crate::store::{Store, MAX_LOOKUP_BATCH};

/// Most cached credentials (under 200 bytes each, so under 20 MB).
const CACHE_MAX: usize = 100_000;
/// Lookup queries one process runs at once: a second one overlaps a round trip with the
/// first's, more would only take connections from the rest of the pool.
pub const QUERIES_IN_FLIGHT: usize = 2;

/// sha256 of the token (the stored hash, unencoded).
type Key = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Device,
    Api,
}

/// What the database said about one credential.
#[derive(Clone, Copy, Debug)]
struct Found {
    principal: Principal,
    expires_ms: Option<i64>,
    revoked: bool,
}

/// A failed query as every waiter of its batch sees it (the cause is logged once).
#[derive(Clone, Copy, Debug)]
enum Failure {
    Unavailable,
    Internal,
}

type Answer = std::result::Result<Option<Found>, Failure>;
type Flight = Shared<oneshot::Receiver<Answer>>;

struct Entry {
    principal: Principal,
    expires_ms: Option<i64>,
    /// When the query that read it started.
    fetched: Instant,
    valid_for: Duration,
    last_used: Instant,
    /// A background refresh is queued or running.
    refreshing: bool,
}

impl Entry {
    fn live(&self) -> bool {
        self.fetched.elapsed() < self.valid_for
    }
}

/// A lookup waiting for a query.
struct Queued {
    key: Key,
    kind: Kind,
    flight: u64,
    tx: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct State {
    cache: HashMap<Key, Entry>,
    /// Lookups queued or running, by credential, joinable by later misses (flight id, answer).
    open: HashMap<Key, (u64, Flight)>,
    /// Lookups no query has taken yet, in arrival order.
    queued: Vec<Queued>,
    /// Query tasks running.
    drivers: usize,
    /// Counts invalidations: a query taken before one does not fill the cache.
    generation: u64,
    next_flight: u64,
}

struct Inner {
    store: Store,
    ttl: Duration,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("auth cache lock")
    }
}

/// Authenticates bearer tokens against the store, through the cache described above.
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// `ttl` zero caches nothing (every call is a lookup, still single-flight and batched).
    pub fn new(store: Store, ttl: Duration) -> Self {
        Authenticator {
            inner: Arc::new(Inner {
                store,
                ttl,
                state: Mutex::default(),
            }),
        }
    }

    /// Drops every cached lookup of a device (revoked, or its credential rotated).
    pub fn invalidate_device(&self, device_id: Uuid) {
        self.invalidate(|p| matches!(p, Principal::Device { device_id: d, .. } if *d == device_id));
    }

    /// Drops the cached lookup of an API token (revoked).
    pub fn invalidate_api_token(&self, token_id: Uuid) {
        self.invalidate(|p| matches!(p, Principal::Api { token_id: t, .. } if *t == token_id));
    }

    fn invalidate(&self, affected: impl Fn(&Principal) -> bool) {
        let mut s = self.inner.lock();
        s.generation += 1;
        // A lookup in flight may have read the row before the change: later misses must not
        // join it. (Its own waiters were concurrent with the change and get its answer.)
        s.open.clear();
        s.cache.retain(|_, e| !affected(&e.principal));
    }

    /// Credential lookups queued or running (background refreshes included).
    pub fn lookups_in_flight(&self) -> usize {
        self.inner.lock().open.len()
    }

    /// Extracts `authorization: Bearer <token>` and resolves it.
    pub async fn authenticate(&self, md: &tonic::metadata::MetadataMap) -> Result<Principal> {
        self.authenticate_token(super::bearer(md)?).await
    }

    /// Resolves a bearer token.
    pub async fn authenticate_token(&self, token: &str) -> Result<Principal> {
        if token.is_empty() || token.len() > 200 {
            return Err(CloudError::Unauthenticated("malformed token".into()));
        }
        let kind = if token.starts_with("anv1_dev_") {
            Kind::Device
        } else if token.starts_with("anv1_api_") {
            Kind::Api
        } else {
            return Err(CloudError::Unauthenticated(
                "not an API token or device credential".into(),
            ));
        };
        let key: Key = Sha256::digest(token.as_bytes()).into();
        let flight = {
            let mut s = self.inner.lock();
            let mut refresh = false;
            if let Some(e) = s.cache.get_mut(&key) {
                if e.live() {
                    if e.expires_ms.is_some_and(|x| x <= now_ms()) {
                        return Err(CloudError::Unauthenticated("credential expired".into()));
                    }
                    e.last_used = Instant::now();
                    let principal = e.principal;
                    if !e.refreshing && e.fetched.elapsed() >= e.valid_for / 2 {
                        e.refreshing = true;
                        refresh = true;
                    }
                    if refresh && !s.open.contains_key(&key) {
                        // Nobody waits for it: the answer only renews (or drops) the entry.
                        enqueue(&self.inner, &mut s, key, kind);
                    }
                    return Ok(principal);
                }
            }
            match s.open.get(&key) {
                Some((_, f)) => f.clone(),
                None => {
                    enqueue(&self.inner, &mut s, key, kind);
                    s.open[&key].1.clone()
                }
            }
        };
        let answer = flight.await.unwrap_or(Err(Failure::Internal));
        let what = match kind {
            Kind::Device => "device credential",
            Kind::Api => "API token",
        };
        match answer {
            Err(Failure::Unavailable) => Err(CloudError::Unavailable(
                "credential lookup: the database is unavailable, retry with backoff".into(),
            )),
            Err(Failure::Internal) => Err(CloudError::Internal("credential lookup failed".into())),
            Ok(None) => Err(CloudError::Unauthenticated(format!("unknown {what}"))),
            Ok(Some(f)) if f.revoked => Err(CloudError::Unauthenticated(format!("{what} revoked"))),
            Ok(Some(f)) if f.expires_ms.is_some_and(|x| x <= now_ms()) => {
                Err(CloudError::Unauthenticated("credential expired".into()))
            }
            Ok(Some(f)) => Ok(f.principal),
        }
    }
}

/// Queues a lookup of `key` (joinable through `open`) and makes sure a query task will take
/// it.
fn enqueue(inner: &Arc<Inner>, s: &mut State, key: Key, kind: Kind) {
    let (tx, rx) = oneshot::channel();
    let flight = rx.shared();
    s.next_flight += 1;
    let id = s.next_flight;
    s.open.insert(key, (id, flight));
    s.queued.push(Queued {
        key,
        kind,
        flight: id,
        tx,
    });
    if s.drivers < QUERIES_IN_FLIGHT {
        s.drivers += 1;
        tokio::spawn(drive(DriverGuard(Some(inner.clone()))));
    }
}

/// A running query task. If the task ends abnormally (its runtime shutting down), the guard
/// gives its place back and fails what is still queued rather than leave callers waiting.
struct DriverGuard(Option<Arc<Inner>>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            let mut s = inner.lock();
            s.drivers -= 1;
            if s.drivers == 0 {
                for q in std::mem::take(&mut s.queued) {
                    s.open.remove(&q.key);
                }
            }
        }
    }
}

/// Takes batches off the queue until it is empty.
async fn drive(mut guard: DriverGuard) {
    let inner = guard.0.clone().expect("driver guard armed");
    loop {
        let (batch, generation) = {
            let mut s = inner.lock();
            if s.queued.is_empty() {
                // Leaving in the same critical section that saw the queue empty: a lookup
                // queued after it sees a free place and starts another task.
                s.drivers -= 1;
                guard.0 = None;
                return;
            }
            let n = s.queued.len().min(MAX_LOOKUP_BATCH);
            (s.queued.drain(..n).collect::<Vec<_>>(), s.generation)
        };
        let started = Instant::now();
        let answers = lookup(&inner.store, &batch).await;
        let now = now_ms();
        let mut s = inner.lock();
        for (q, answer) in batch.into_iter().zip(answers) {
            if s.open.get(&q.key).is_some_and(|(id, _)| *id == q.flight) {
                s.open.remove(&q.key);
            }
            if generation == s.generation {
                fill(&mut s.cache, inner.ttl, q.key, &answer, started, now);
            } else if let Some(e) = s.cache.get_mut(&q.key) {
                e.refreshing = false;
            }
            let _ = q.tx.send(answer);
        }
    }
}

/// Records one answer: a valid credential is (re)cached, anything else drops the entry; a
/// failed query leaves the entry to expire or be refreshed again.
fn fill(
    cache: &mut HashMap<Key, Entry>,
    ttl: Duration,
    key: Key,
    answer: &Answer,
    started: Instant,
    now: i64,
) {
    match answer {
        Ok(Some(f)) if !f.revoked && f.expires_ms.is_none_or(|x| x > now) && !ttl.is_zero() => {
            let last_used = cache.get(&key).map_or(started, |e| e.last_used);
            if !cache.contains_key(&key) && cache.len() >= CACHE_MAX {
                make_room(cache, CACHE_MAX);
            }
            cache.insert(
                key,
                Entry {
                    principal: f.principal,
                    expires_ms: f.expires_ms,
                    fetched: started,
                    valid_for: ttl.mul_f64(0.75 + 0.25 * rand::random::<f64>()),
                    last_used,
                    refreshing: false,
                },
            );
        }
        Ok(_) => {
            cache.remove(&key);
        }
        Err(_) => {
            if let Some(e) = cache.get_mut(&key) {
                e.refreshing = false;
            }
        }
    }
}

/// Frees at least a tenth of `max`: expired entries first, then the least recently used.
fn make_room(cache: &mut HashMap<Key, Entry>, max: usize) {
    cache.retain(|_, e| e.live());
    let target = max - max / 10;
    if cache.len() <= target {
        return;
    }
    let mut used: Vec<Instant> = cache.values().map(|e| e.last_used).collect();
    let excess = cache.len() - target;
    let (_, cutoff, _) = used.select_nth_unstable(excess - 1);
    let cutoff = *cutoff;
    cache.retain(|_, e| e.last_used > cutoff);
}

/// One query per kind present in the batch; answers in the batch's order.
async fn lookup(store: &Store, batch: &[Queued]) -> Vec<Answer> {
    let hashes = |kind| -> Vec<String> {
        batch
            .iter()
            .filter(|q| q.kind == kind)
            .map(|q| hex::encode(q.key))
            .collect()
    };
    let failure = |e: CloudError| {
        tracing::warn!(error = %e, "credential lookup failed");
        if e.code() == tonic::Code::Unavailable {
            Failure::Unavailable
        } else {
            Failure::Internal
        }
    };
    let devices = store
        .devices_by_credentials(&hashes(Kind::Device))
        .await
        .map_err(failure);
    let tokens = store
        .api_tokens_by_hashes(&hashes(Kind::Api))
        .await
        .map_err(failure);
    batch
        .iter()
        .map(|q| {
            let hash = hex::encode(q.key);
            match q.kind {
                Kind::Device => devices.as_ref().map_err(|f| *f).map(|rows| {
                    rows.get(&hash).map(|r| Found {
                        principal: Principal::Device {
                            device_id: r.device_id,
                            fleet_id: r.fleet_id,
                        },
                        expires_ms: r.expires_ms,
                        revoked: r.status == DeviceStatus::Revoked,
                    })
                }),
                Kind::Api => tokens.as_ref().map_err(|f| *f).map(|rows| {
                    rows.get(&hash).map(|r| Found {
                        principal: Principal::Api {
                            token_id: r.id,
                            role: r.role,
                            fleet: r.fleet_id,
                        },
                        expires_ms: r.expires_ms,
                        revoked: r.revoked,
                    })
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(age: Duration, valid_for: Duration, used_ago: Duration) -> Entry {
        let now = Instant::now();
        Entry {
            principal: Principal::Device {
                device_id: Uuid::nil(),
                fleet_id: Uuid::nil(),
            },
            expires_ms: None,
            fetched: now - age,
            valid_for,
            last_used: now - used_ago,
            refreshing: false,
        }
    }

    #[test]
    fn make_room_drops_expired_entries_before_recently_used_ones() {
        let min = Duration::from_secs(60);
        let mut cache = HashMap::new();
        // 5 expired entries, used more recently than any live one.
        for i in 0..5u8 {
            cache.insert([i; 32], entry(2 * min, min, Duration::ZERO));
        }
        // 15 live entries, used 1..=15 s ago.
        for i in 0..15u8 {
            let used = Duration::from_secs(u64::from(i) + 1);
            cache.insert([100 + i; 32], entry(Duration::ZERO, min, used));
        }
        make_room(&mut cache, 20);
        // Expired ones gone; that freed 5 >= 20/10, so every live entry stays.
        assert_eq!(cache.len(), 15);
        assert!(cache.keys().all(|k| k[0] >= 100));

        make_room(&mut cache, 15);
        // Room for 15 - 1 = 14 kept: the least recently used (15 s ago) is the one dropped.
        assert_eq!(cache.len(), 14);
        assert!(!cache.contains_key(&[114; 32]));

        make_room(&mut cache, 10);
        // Down to 9: the 5 least recently used of the 14 are gone.
        assert_eq!(cache.len(), 9);
        assert!((100..109u8).all(|i| cache.contains_key(&[i; 32])));
    }
}
