//! The endpoint registry: where the sidecars of each workload identity can be dialled.
//!
//! An entry is one (SPIFFE ID, address) pair with a lease. The ID is always the one the
//! registering client's certificate carries (the HTTP layer passes it in; nothing in a request
//! body names it), so a sidecar can add or remove endpoints only under its own identity.
//! Replicas of one service share the ID and each file their own address. A lease lasts at most
//! [`MAX_LEASE`] and never past the client certificate's NotAfter: an endpoint that is not
//! refreshed (a replica killed with -9) leaves by itself. Every function takes `now`, so the
//! clock is the caller's (tests inject one).
//!
//! The entries live in the store, shared by every replica: registration, refresh, removal and
//! the sweep work from any of them. Each replica keeps a copy of the rows, written through on
//! its own changes and reloaded ([`Registry::reload`]) when the store's endpoint change counter
//! moves, so watch streams read memory, and keep their last view while the store is down.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::identity::api::{self, EndpointError};
use crate::server::store::{Store, StoreError};

/// Default lease of a registration (`mayfly-ca run --endpoint-lease`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The longest lease granted.
pub const MAX_LEASE: Duration = Duration::from_secs(60);
/// The most endpoints one SPIFFE ID may hold (all its replicas together).
pub const MAX_PER_ID: usize = 1024;
/// The most endpoints the registry holds.
pub const MAX_TOTAL: usize = 100_000;

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The request names no endpoint.
    #[error("name at least one endpoint")]
    Empty,
    /// The request names too many.
    #[error("at most {max} endpoints per request, got {got}")]
    TooMany {
        /// The limit.
        max: usize,
        /// How many were named.
        got: usize,
    },
    /// An address is not dialable.
    #[error(transparent)]
    Address(#[from] EndpointError),
    /// The identity holds [`MAX_PER_ID`] endpoints already.
    #[error("{id} holds {max} endpoints already")]
    IdFull {
        /// The SPIFFE ID.
        id: String,
        /// The limit.
        max: usize,
    },
    /// The registry holds [`MAX_TOTAL`] endpoints already.
    #[error("the registry is full ({max} endpoints)")]
    Full {
        /// The limit.
        max: usize,
    },
    /// The store cannot be written now (the database is down or full): try again later.
    #[error("store cannot write: {0}")]
    Unavailable(String),
    /// The store failed.
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unwritable(why) => RegistryError::Unavailable(why),
            other => RegistryError::Store(other.to_string()),
        }
    }
}

impl RegistryError {
    /// HTTP status: 400 for a bad request, 429 while full, 503 while the store cannot write.
    pub fn status(&self) -> u16 {
        match self {
            RegistryError::IdFull { .. } | RegistryError::Full { .. } => 429,
            RegistryError::Unavailable(_) => 503,
            RegistryError::Store(_) => 500,
            _ => 400,
        }
    }

    /// Short reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::Empty | RegistryError::TooMany { .. } => "bad_request",
            RegistryError::Address(_) => "bad_endpoint",
            RegistryError::IdFull { .. } | RegistryError::Full { .. } => "registry_full",
            RegistryError::Unavailable(_) => "store_unavailable",
            RegistryError::Store(_) => "internal",
        }
    }
}

/// One live endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    /// The SPIFFE ID it serves.
    pub spiffe_id: String,
    /// The address peers dial.
    pub address: String,
    /// When it was first registered (Unix seconds).
    pub registered_at: i64,
    /// When its lease ends unless refreshed (Unix seconds, with milliseconds).
    pub expires_at: f64,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    since: OffsetDateTime,
    until: OffsetDateTime,
}

/// The registry. Changes (an endpoint added or gone) bump a generation that
/// [`Registry::subscribe`] sees.
pub struct Registry {
    store: Arc<dyn Store>,
    /// The store's rows as last read or written by this replica.
    entries: Mutex<BTreeMap<(String, String), Lease>>,
    changed: watch::Sender<u64>,
    known: Gauge,
}

/// The checked, de-duplicated addresses of a request.
pub fn checked(addresses: &[String]) -> Result<Vec<String>, RegistryError> {
    if addresses.is_empty() {
        return Err(RegistryError::Empty);
    }
    if addresses.len() > api::MAX_ENDPOINTS {
        return Err(RegistryError::TooMany {
            max: api::MAX_ENDPOINTS,
            got: addresses.len(),
        });
    }
    let mut out = Vec::with_capacity(addresses.len());
    for a in addresses {
        api::check_endpoint(a)?;
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    Ok(out)
}

fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_ms(v: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The live (ID, address) pairs of a map.
fn live_keys(
    map: &BTreeMap<(String, String), Lease>,
    now: OffsetDateTime,
) -> Vec<&(String, String)> {
    map.iter()
        .filter(|(_, l)| l.until > now)
        .map(|(k, _)| k)
        .collect()
}

impl Registry {
    /// A registry on `store` that keeps `known` at the number of live endpoints; empty until
    /// [`Registry::reload`].
    pub fn new(store: Arc<dyn Store>, known: Gauge) -> Self {
        Self {
            store,
            entries: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
            known,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Lease>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settle(&self, map: &BTreeMap<(String, String), Lease>, changed: bool) {
        self.known.set(i64::try_from(map.len()).unwrap_or(i64::MAX));
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
    }

    /// Registers or refreshes `addresses` under `id` until `until`; returns the addresses that
    /// were not registered before. Nothing changes when any address is refused.
    pub fn register(
        &self,
        id: &str,
        addresses: &[String],
        until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<String>, RegistryError> {
        let addresses = checked(addresses)?;
        // Expired entries stay until `sweep` reports them; they count as absent here.
        let live = |map: &BTreeMap<(String, String), Lease>, a: &String| {
            map.get(&(id.to_owned(), a.clone()))
                .filter(|l| l.until > now)
                .copied()
        };
        {
            let map = self.lock();
            let new = addresses.iter().filter(|a| live(&map, a).is_none()).count();
            let of_id = map
                .range((id.to_owned(), String::new())..)
                .take_while(|((i, _), _)| i == id)
                .filter(|(_, l)| l.until > now)
                .count();
            if of_id + new > MAX_PER_ID {
                return Err(RegistryError::IdFull {
                    id: id.to_owned(),
                    max: MAX_PER_ID,
                });
            }
            if map.len() + new > MAX_TOTAL {
                return Err(RegistryError::Full { max: MAX_TOTAL });
            }
        }
        // The store says what is new: another replica may have registered it meanwhile. It
        // is called without the lock, which watch streams take to read the copy: a slow or
        // absent database never stalls them.
        let new = self
            .store
            .register_endpoints(id, &addresses, ms(until), ms(now))?;
        let mut map = self.lock();
        for a in addresses {
            let since = live(&map, &a).map_or(now, |l| l.since);
            map.insert((id.to_owned(), a), Lease { since, until });
        }
        self.settle(&map, !new.is_empty());
        Ok(new)
    }

    /// Removes `addresses` from under `id` (and nothing of any other identity); returns those
    /// that were registered.
    pub fn remove(
        &self,
        id: &str,
        addresses: &[String],
        now: OffsetDateTime,
    ) -> Result<Vec<String>, RegistryError> {
        let addresses = checked(addresses)?;
        let removed = self.store.remove_endpoints(id, &addresses, ms(now))?;
        let mut map = self.lock();
        let mut changed = !removed.is_empty();
        for a in addresses {
            changed |= map
                .remove(&(id.to_owned(), a))
                .is_some_and(|l| l.until > now);
        }
        self.settle(&map, changed);
        Ok(removed)
    }

    fn drop_expired(
        map: &mut BTreeMap<(String, String), Lease>,
        now: OffsetDateTime,
    ) -> Vec<(String, String)> {
        let gone: Vec<_> = map
            .iter()
            .filter(|(_, l)| l.until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            map.remove(k);
        }
        gone
    }

    /// Drops the endpoints whose lease ended by `now`, here and in the store; returns those
    /// this call removed from the store, as (ID, address): each expiry is reported by one
    /// replica. When the store fails, this replica's copy is swept all the same.
    pub fn sweep(&self, now: OffsetDateTime) -> Result<Vec<(String, String)>, RegistryError> {
        let swept = self.store.sweep_endpoints(ms(now));
        let mut map = self.lock();
        let local = Self::drop_expired(&mut map, now);
        let changed = !local.is_empty() || swept.as_ref().is_ok_and(|g| !g.is_empty());
        self.settle(&map, changed);
        Ok(swept?)
    }

    /// Replaces this replica's copy with the store's rows (another replica changed them);
    /// watchers are told when the set of live endpoints changed.
    pub fn reload(&self, now: OffsetDateTime) -> Result<(), RegistryError> {
        let rows = self.store.endpoints()?;
        let fresh: BTreeMap<(String, String), Lease> = rows
            .into_iter()
            .map(|r| {
                let lease = Lease {
                    since: from_ms(r.since_ms),
                    until: from_ms(r.until_ms),
                };
                ((r.spiffe_id, r.address), lease)
            })
            .collect();
        let mut map = self.lock();
        let changed = live_keys(&map, now) != live_keys(&fresh, now);
        *map = fresh;
        self.settle(&map, changed);
        Ok(())
    }

    /// When the next lease ends, if any endpoint is registered.
    pub fn next_expiry(&self) -> Option<OffsetDateTime> {
        self.lock().values().map(|l| l.until).min()
    }

    /// Every live endpoint, by SPIFFE ID and address.
    pub fn list(&self, now: OffsetDateTime) -> Vec<Endpoint> {
        self.lock()
            .iter()
            .filter(|(_, l)| l.until > now)
            .map(|((id, a), l)| Endpoint {
                spiffe_id: id.clone(),
                address: a.clone(),
                registered_at: l.since.unix_timestamp(),
                expires_at: (l.until.unix_timestamp_nanos() / 1_000_000) as f64 / 1000.0,
            })
            .collect()
    }

    /// The live addresses of each of `ids` (IDs without any are left out).
    pub fn addresses_of<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        now: OffsetDateTime,
    ) -> BTreeMap<String, Vec<String>> {
        let map = self.lock();
        let mut out = BTreeMap::new();
        for id in ids {
            let live: Vec<String> = map
                .range((id.to_owned(), String::new())..)
                .take_while(|((i, _), _)| i == id)
                .filter(|(_, l)| l.until > now)
                .map(|((_, a), _)| a.clone())
                .collect();
            if !live.is_empty() {
                out.insert(id.to_owned(), live);
            }
        }
        out
    }

    /// A receiver that sees every change of the set of endpoints.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: &str = "spiffe://mayfly.local/orders";
    const B: &str = "spiffe://mayfly.local/web";

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    fn addrs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn registry() -> (Registry, Gauge) {
        let g = Gauge::default();
        let store = Arc::new(crate::server::store::SqliteStore::in_memory().unwrap());
        (Registry::new(store, g.clone()), g)
    }

    #[test]
    fn an_endpoint_lives_until_its_lease_ends_unless_refreshed() {
        let (r, known) = registry();
        let new = r
            .register(A, &addrs(&["10.0.0.5:15443"]), t(30), t(0))
            .unwrap();
        assert_eq!(new, addrs(&["10.0.0.5:15443"]));
        assert_eq!(known.get(), 1);
        assert_eq!(r.list(t(29)).len(), 1);
        assert!(
            r.list(t(30)).is_empty(),
            "gone when the lease ends, unswept"
        );
        // A refresh moves the lease and keeps the first registration time.
        let new = r
            .register(A, &addrs(&["10.0.0.5:15443"]), t(50), t(20))
            .unwrap();
        assert!(new.is_empty());
        let live = r.list(t(45));
        assert_eq!(live[0].registered_at, t(0).unix_timestamp());
        assert_eq!(r.next_expiry(), Some(t(50)));
        assert!(r.sweep(t(49)).unwrap().is_empty());
        assert_eq!(
            r.sweep(t(50)).unwrap(),
            vec![(A.to_owned(), "10.0.0.5:15443".to_owned())]
        );
        assert_eq!(known.get(), 0);
        assert!(r.list(t(0)).is_empty());
    }

    #[test]
    fn replicas_of_one_identity_each_keep_their_own_endpoint() {
        let (r, _) = registry();
        r.register(A, &addrs(&["10.0.0.5:1"]), t(10), t(0)).unwrap();
        r.register(A, &addrs(&["10.0.0.6:1"]), t(20), t(0)).unwrap();
        r.register(B, &addrs(&["10.0.0.7:1"]), t(20), t(0)).unwrap();
        let of = r.addresses_of([A, "spiffe://mayfly.local/none"], t(5));
        assert_eq!(of.len(), 1);
        assert_eq!(of[A], addrs(&["10.0.0.5:1", "10.0.0.6:1"]));
        assert_eq!(r.addresses_of([A], t(15))[A], addrs(&["10.0.0.6:1"]));
    }

    #[test]
    fn removing_takes_only_the_callers_own_endpoints() {
        let (r, known) = registry();
        r.register(A, &addrs(&["10.0.0.5:1"]), t(10), t(0)).unwrap();
        // B names A's address: nothing of A's goes.
        assert!(
            r.remove(B, &addrs(&["10.0.0.5:1"]), t(1))
                .unwrap()
                .is_empty()
        );
        assert_eq!(known.get(), 1);
        assert_eq!(
            r.remove(A, &addrs(&["10.0.0.5:1"]), t(1)).unwrap(),
            addrs(&["10.0.0.5:1"])
        );
        assert_eq!(known.get(), 0);
    }

    #[test]
    fn bad_requests_change_nothing() {
        let (r, _) = registry();
        let rx = r.subscribe();
        assert_eq!(r.register(A, &[], t(10), t(0)), Err(RegistryError::Empty));
        let many: Vec<String> = (1..=17).map(|p| format!("10.0.0.5:{p}")).collect();
        assert!(matches!(
            r.register(A, &many, t(10), t(0)),
            Err(RegistryError::TooMany { max: 16, got: 17 })
        ));
        let mixed = addrs(&["10.0.0.5:1", "0.0.0.0:2"]);
        assert!(matches!(
            r.register(A, &mixed, t(10), t(0)),
            Err(RegistryError::Address(_))
        ));
        assert!(r.list(t(0)).is_empty());
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn one_identity_cannot_hold_more_than_its_share() {
        let (r, _) = registry();
        for n in 0..MAX_PER_ID / 16 {
            let batch: Vec<String> = (0..16).map(|p| format!("10.0.{n}.1:{}", p + 1)).collect();
            r.register(A, &batch, t(10), t(0)).unwrap();
        }
        let err = r
            .register(A, &addrs(&["10.9.9.9:1"]), t(10), t(0))
            .unwrap_err();
        assert_eq!(err.status(), 429);
        // Refreshing what it holds still works, and other identities are not affected.
        r.register(A, &addrs(&["10.0.0.1:1"]), t(20), t(0)).unwrap();
        r.register(B, &addrs(&["10.9.9.9:1"]), t(10), t(0)).unwrap();
        // Once its leases end, it has room again.
        r.register(A, &addrs(&["10.9.9.9:1"]), t(30), t(15))
            .unwrap();
    }

    #[test]
    fn a_change_is_signalled_and_a_refresh_is_not() {
        let (r, _) = registry();
        let mut rx = r.subscribe();
        r.register(A, &addrs(&["10.0.0.5:1"]), t(10), t(0)).unwrap();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        r.register(A, &addrs(&["10.0.0.5:1"]), t(20), t(5)).unwrap();
        assert!(!rx.has_changed().unwrap());
        r.sweep(t(20)).unwrap();
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn registries_on_one_store_share_entries_and_each_expiry_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.db");
        let open = || -> Arc<dyn Store> {
            Arc::new(crate::server::store::SqliteStore::open(&path).unwrap())
        };
        let (a, b) = (
            Registry::new(open(), Gauge::default()),
            Registry::new(open(), Gauge::default()),
        );
        let mut rx = b.subscribe();
        a.register(A, &addrs(&["10.0.0.5:1"]), t(10), t(0)).unwrap();
        // A refresh through the other replica keeps it one registration, not a new one.
        b.reload(t(1)).unwrap();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(b.addresses_of([A], t(1))[A], addrs(&["10.0.0.5:1"]));
        assert!(
            b.register(A, &addrs(&["10.0.0.5:1"]), t(20), t(2))
                .unwrap()
                .is_empty()
        );
        a.reload(t(3)).unwrap();
        assert_eq!(
            a.list(t(15)).len(),
            1,
            "the refresh reached the other replica"
        );
        // A reload that changes no live entry wakes nobody.
        b.reload(t(3)).unwrap();
        assert!(!rx.has_changed().unwrap());
        // Both sweep: the expiry is reported once, and both forget it.
        let mut gone = a.sweep(t(20)).unwrap();
        gone.extend(b.sweep(t(20)).unwrap());
        assert_eq!(gone, vec![(A.to_owned(), "10.0.0.5:1".to_owned())]);
        assert!(a.list(t(0)).is_empty() && b.list(t(0)).is_empty());
        // A removal through one replica reaches the other.
        a.register(B, &addrs(&["10.0.0.7:1"]), t(40), t(21))
            .unwrap();
        b.reload(t(22)).unwrap();
        assert_eq!(
            b.remove(B, &addrs(&["10.0.0.7:1"]), t(23)).unwrap().len(),
            1
        );
        a.reload(t(24)).unwrap();
        assert!(a.list(t(24)).is_empty());
    }
}
