//! Routes the controller has resolved, by token, so only a token's first request pays a
//! round-trip; evicted per backend the moment the controller says the backend is going away,
//! and per backend and user the moment that user's tokens are revoked.

use crate::route::Route;
use dashmap::DashMap;
use plane_protocol::names::{BackendName, BearerToken};
use plane_protocol::time::Millis;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a removed backend is remembered. Long enough to outlast any route response that
/// was already in flight when the removal arrived; backend IDs are never reused, so keeping
/// it longer would only cost memory.
const REMOVED_BACKEND_MEMORY: Duration = Duration::from_secs(600);
/// How often the list of removed backends is pruned (pruning walks the whole list).
const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// What [`RouteCache::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    Cached,
    /// The backend was removed: the route is stale.
    BackendRemoved,
    /// The token was revoked: the route is stale.
    Revoked,
}

/// Cached positive answers only: an unknown token is asked about again each time, so nothing
/// here can keep a token failing.
#[derive(Debug)]
pub struct RouteCache {
    routes: DashMap<BearerToken, Arc<Route>>,
    /// The tokens cached for each backend, so a removal finds them all without a scan.
    by_backend: DashMap<BackendName, HashSet<BearerToken>>,
    /// Backends removed recently, and when. A route to one of them is never cached again.
    removed: DashMap<BackendName, Instant>,
    /// Users whose tokens for a backend were revoked recently: the revocation's time (tokens
    /// issued up to then are revoked) and when we heard of it (for pruning). Their routes to
    /// that backend issued before the revocation are never cached again.
    revoked: DashMap<(BackendName, String), (Millis, Instant)>,
    /// Plain lock: held only to compare and set one timestamp, never across an await.
    last_prune: Mutex<Instant>,
}

impl Default for RouteCache {
    fn default() -> Self {
        Self {
            routes: DashMap::new(),
            by_backend: DashMap::new(),
            removed: DashMap::new(),
            revoked: DashMap::new(),
            last_prune: Mutex::new(Instant::now()),
        }
    }
}

impl RouteCache {
    /// The cached route of `token` (a `&BearerToken`, or the raw `&str` of one).
    pub fn get<Q>(&self, token: &Q) -> Option<Arc<Route>>
    where
        BearerToken: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.routes.get(token).map(|route| Arc::clone(&route))
    }

    /// Caches `route` for `token` unless its backend was removed or the token revoked. Any
    /// answer but [`Inserted::Cached`] means the route is stale and must not be used either.
    pub fn insert(&self, token: BearerToken, route: Arc<Route>) -> Inserted {
        // The backend's index entry stays locked while we check for removal and insert, and
        // `remove_backend` marks the backend removed *before* taking that same lock, so
        // either we see the mark or the removal sees (and evicts) our token.
        // `revoke_user` marks in the same order, so the same holds for revocations.
        let mut tokens = self.by_backend.entry(route.backend_id.clone()).or_default();
        let refused = if self.removed.contains_key(&route.backend_id) {
            Some(Inserted::BackendRemoved)
        } else if self.is_revoked(&token, &route) {
            Some(Inserted::Revoked)
        } else {
            None
        };
        if let Some(refused) = refused {
            drop(tokens);
            self.by_backend
                .remove_if(&route.backend_id, |_, tokens| tokens.is_empty());
            return refused;
        }
        tokens.insert(token.clone());
        if let Some(previous) = self.routes.insert(token.clone(), Arc::clone(&route)) {
            // A token maps to one backend for life, but stay tidy if the controller says
            // otherwise: the old backend's index must not keep pointing at this token.
            if previous.backend_id != route.backend_id {
                drop(tokens);
                if let Some(mut old) = self.by_backend.get_mut(&previous.backend_id) {
                    old.remove(&token);
                }
            }
        }
        Inserted::Cached
    }

    /// Forgets every route to `backend` and refuses to cache it again.
    pub fn remove_backend(&self, backend: &BackendName) {
        self.removed.insert(backend.clone(), Instant::now());
        if let Some((_, tokens)) = self.by_backend.remove(backend) {
            for token in tokens {
                self.routes
                    .remove_if(&token, |_, route| &route.backend_id == backend);
            }
        }
        self.prune_removed();
    }

    /// Forgets every route to `backend` whose token was issued to `user`, and refuses to
    /// cache one issued up to `revoked_at` again (a route answer that raced with the
    /// revocation). Static tokens, shared by every user, are never revoked.
    pub fn revoke_user(&self, backend: &BackendName, user: &str, revoked_at: Millis) {
        self.revoked
            .entry((backend.clone(), user.to_string()))
            .and_modify(|(at, heard)| {
                *at = (*at).max(revoked_at);
                *heard = Instant::now();
            })
            .or_insert((revoked_at, Instant::now()));
        if let Some(mut tokens) = self.by_backend.get_mut(backend) {
            tokens.retain(|token| {
                // Whatever its issue time says: clocks of controllers may disagree, and the
                // controller no longer resolves any of the user's revoked tokens anyway.
                let evicted = self.routes.remove_if(token, |_, route| {
                    !token.is_static() && &route.backend_id == backend && is_for_user(route, user)
                });
                evicted.is_none()
            });
        }
        self.prune_removed();
    }

    fn is_revoked(&self, token: &BearerToken, route: &Route) -> bool {
        let Some(user) = route.username.as_ref() else {
            return false;
        };
        if token.is_static() {
            return false;
        }
        if self.revoked.is_empty() {
            return false;
        }
        let user = String::from_utf8_lossy(user.as_bytes()).into_owned();
        self.revoked
            .get(&(route.backend_id.clone(), user))
            .is_some_and(|entry| route.issued_at <= entry.0)
    }

    /// Whether `backend` was removed recently.
    #[cfg(test)]
    pub fn is_removed(&self, backend: &BackendName) -> bool {
        self.removed.contains_key(backend)
    }

    /// Forgets every cached route (removal marks stay). Used after the controller connection
    /// was down, because removals sent meanwhile were missed.
    pub fn clear(&self) {
        self.routes.clear();
        self.by_backend.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    fn prune_removed(&self) {
        let now = Instant::now();
        {
            let mut last = self
                .last_prune
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if now.duration_since(*last) < PRUNE_EVERY {
                return;
            }
            *last = now;
        }
        self.removed
            .retain(|_, at| now.duration_since(*at) < REMOVED_BACKEND_MEMORY);
        self.revoked
            .retain(|_, (_, heard)| now.duration_since(*heard) < REMOVED_BACKEND_MEMORY);
    }
}

fn is_for_user(route: &Route, user: &str) -> bool {
    route
        .username
        .as_ref()
        .is_some_and(|name| name.as_bytes() == user.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use plane_protocol::names::SecretToken;
    use plane_protocol::proxy::RouteInfo;

    fn cached(cache: &RouteCache, token: BearerToken, route: Arc<Route>) -> bool {
        cache.insert(token, route) == Inserted::Cached
    }

    fn route(backend: &BackendName) -> Arc<Route> {
        route_for(backend, None)
    }

    fn route_for(backend: &BackendName, user: Option<&str>) -> Arc<Route> {
        issued_route(backend, user, Millis(1))
    }

    fn issued_route(backend: &BackendName, user: Option<&str>, issued_at: Millis) -> Arc<Route> {
        let info = RouteInfo {
            backend_id: backend.clone(),
            address: "127.0.0.1:1".parse().expect("test address"),
            secret_token: SecretToken::new_random(),
            user: user.map(str::to_string),
            user_data: serde_json::Value::Null,
            issued_at,
            expires_at: None,
            host: None,
            protocol: Default::default(),
        };
        Arc::new(Route::new(info).expect("valid test route"))
    }

    #[test]
    fn removing_a_backend_evicts_all_its_tokens_and_only_those() {
        let cache = RouteCache::default();
        let (a, b) = (BackendName::new_random(), BackendName::new_random());
        let (t1, t2, t3) = (
            BearerToken::new_random(),
            BearerToken::new_random(),
            BearerToken::new_random(),
        );
        assert!(cached(&cache, t1.clone(), route(&a)));
        assert!(cached(&cache, t2.clone(), route(&a)));
        assert!(cached(&cache, t3.clone(), route(&b)));

        cache.remove_backend(&a);

        assert_eq!(cache.get(&t1), None);
        assert_eq!(cache.get(&t2), None);
        assert_eq!(cache.get(&t3).map(|r| r.backend_id.clone()), Some(b));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_late_route_to_a_removed_backend_is_refused() {
        let cache = RouteCache::default();
        let backend = BackendName::new_random();
        cache.remove_backend(&backend);

        let token = BearerToken::new_random();
        assert!(!cached(&cache, token.clone(), route(&backend)));
        assert_eq!(cache.get(&token), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn revoking_a_user_evicts_only_that_users_routes_to_that_backend() {
        let cache = RouteCache::default();
        let (a, b) = (BackendName::new_random(), BackendName::new_random());
        let alice_a = BearerToken::new_random();
        let bob_a = BearerToken::new_random();
        let alice_b = BearerToken::new_random();
        assert!(cached(
            &cache,
            alice_a.clone(),
            route_for(&a, Some("alice"))
        ));
        assert!(cached(&cache, bob_a.clone(), route_for(&a, Some("bob"))));
        assert!(cached(
            &cache,
            alice_b.clone(),
            route_for(&b, Some("alice"))
        ));

        cache.revoke_user(&a, "alice", Millis(5));

        assert_eq!(cache.get(&alice_a), None);
        assert!(cache.get(&bob_a).is_some());
        assert!(cache.get(&alice_b).is_some());
        // A route answer for an older token that raced with the revocation is refused; a
        // token issued to alice after it, or one of another user, is cached.
        assert!(!cached(
            &cache,
            BearerToken::new_random(),
            route_for(&a, Some("alice"))
        ));
        assert!(cached(
            &cache,
            BearerToken::new_random(),
            issued_route(&a, Some("alice"), Millis(6))
        ));
        assert!(cached(
            &cache,
            BearerToken::new_random(),
            route_for(&a, Some("carol"))
        ));
    }

    #[test]
    fn clear_keeps_removal_marks() {
        let cache = RouteCache::default();
        let backend = BackendName::new_random();
        assert!(cached(&cache, BearerToken::new_random(), route(&backend)));
        cache.remove_backend(&backend);
        cache.clear();
        assert!(cache.is_removed(&backend));
        assert!(!cached(&cache, BearerToken::new_random(), route(&backend)));
    }
}
