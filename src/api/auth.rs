//! Access control: who may spend the GPU.
//!
//! Keys come from `API_KEYS` (comma-separated) and/or `API_KEYS_FILE` (one a line, `#` comments);
//! the file is re-read on SIGHUP and whenever its contents change. Only SHA-256 digests of the
//! keys are kept, compared in constant time; a key is known elsewhere only by its id, a short
//! domain-separated hash that is safe to put in metrics and logs. When no key is configured the
//! service is open, as the original was, and says so loudly.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use crate::config::Secret;
use crate::telemetry::{Metrics, labels};

/// The key id shown in metrics and logs: 8 hex digits of a hash that is not the stored digest,
/// so the id says which key was used without helping anyone guess it.
pub fn key_id(key: &str) -> String {
    let d = Sha256::new()
        .chain_update(b"imagegen key id\0")
        .chain_update(key.as_bytes())
        .finalize();
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// One set of accepted keys (replaced whole on reload).
#[derive(Default)]
struct KeySet {
    entries: Vec<([u8; 32], String)>,
}

impl KeySet {
    fn from_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        let mut entries: Vec<([u8; 32], String)> = Vec::new();
        for k in keys.into_iter().map(str::trim).filter(|k| !k.is_empty()) {
            let d = digest(k);
            if !entries.iter().any(|(e, _)| *e == d) {
                entries.push((d, key_id(k)));
            }
        }
        Self { entries }
    }

    /// The id of the matching key. Every entry is compared, each in constant time, so the time
    /// taken says nothing about which key (or which prefix) matched.
    fn find(&self, presented: &str) -> Option<String> {
        let d = digest(presented);
        let mut found = None;
        for (entry, id) in &self.entries {
            #[cfg(test)]
            tests::COMPARED.with(|c| c.set(c.get() + 1));
            if bool::from(entry.ct_eq(&d)) {
                found = Some(id.clone());
            }
        }
        found
    }
}

/// Splits a key file: one key a line, blank lines and `#` comments ignored.
fn file_keys(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// How callers are admitted, as /health reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No key configured: anyone who can reach the port may use the service.
    None,
    /// `Authorization: Bearer <key>` or `X-API-Key: <key>` required.
    ApiKey,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::ApiKey => "api_key",
        }
    }
}

/// What configures access control (read from `ServeArgs`).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub keys: Option<Secret>,
    pub keys_file: Option<PathBuf>,
    pub rate_limit_per_key: Option<NonZeroU32>,
}

/// The accepted keys, the optional per-key rate limiter and the key file to follow.
pub struct Auth {
    mode: AuthMode,
    inline: Vec<String>,
    file: Option<PathBuf>,
    current: RwLock<Arc<KeySet>>,
    /// The key file's contents at the last (re)load, to notice changes.
    file_digest: RwLock<Option<[u8; 32]>>,
    limiter: Option<(DefaultKeyedRateLimiter<String>, u32)>,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// Reads the keys. A configured key file that cannot be read stops start-up: an operator
    /// who asked for keys must never get an open server by accident.
    pub fn new(cfg: &AuthConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let inline: Vec<String> = cfg
            .keys
            .as_ref()
            .map(|s| {
                s.expose()
                    .split(',')
                    .map(|k| k.trim().to_string())
                    .filter(|k| !k.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let file = cfg.keys_file.clone();
        let mode = if inline.is_empty() && file.is_none() {
            AuthMode::None
        } else {
            AuthMode::ApiKey
        };
        let auth = Self {
            mode,
            inline,
            file,
            current: RwLock::new(Arc::new(KeySet::default())),
            file_digest: RwLock::new(None),
            limiter: cfg
                .rate_limit_per_key
                .map(|n| (RateLimiter::keyed(Quota::per_minute(n)), n.get())),
            metrics,
        };
        let file_text = match &auth.file {
            Some(path) => Some(read_key_file(path)?),
            None => None,
        };
        auth.install(file_text.as_deref());
        if mode == AuthMode::ApiKey && auth.key_count() == 0 {
            tracing::error!(
                "API_KEYS / API_KEYS_FILE are set but hold no key: every protected request gets 401"
            );
        }
        Ok(auth)
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    pub fn key_count(&self) -> usize {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    fn install(&self, file_text: Option<&str>) {
        let keys = self
            .inline
            .iter()
            .map(String::as_str)
            .chain(file_text.into_iter().flat_map(file_keys));
        let set = Arc::new(KeySet::from_keys(keys));
        *self.file_digest.write().unwrap_or_else(|p| p.into_inner()) =
            file_text.map(|t| Sha256::digest(t.as_bytes()).into());
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = set;
    }

    /// Re-reads the key file if its contents changed (or always, when `force`). A file that
    /// cannot be read keeps the previous keys: neither locking everyone out nor opening up.
    pub fn reload(&self, force: bool) {
        let Some(path) = &self.file else { return };
        let text = match read_key_file(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("keeping the previous API keys: {e:#}");
                return;
            }
        };
        let d: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        let unchanged = *self.file_digest.read().unwrap_or_else(|p| p.into_inner()) == Some(d);
        if unchanged && !force {
            return;
        }
        self.install(Some(&text));
        tracing::info!(keys = self.key_count(), path = %path.display(), "API keys reloaded");
        self.metrics
            .inc("imagegen_auth_reloads_total", String::new(), 1);
    }

    /// Follows the key file: reloads on SIGHUP and when its contents change (checked every
    /// `poll`). Returns at once when there is no key file.
    pub fn watch(self: &Arc<Self>, poll: Duration) {
        if self.file.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::spawn(async move {
            loop {
                #[cfg(unix)]
                let forced = match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = h.recv() => true,
                        _ = tokio::time::sleep(poll) => false,
                    },
                    None => {
                        tokio::time::sleep(poll).await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let forced = {
                    tokio::time::sleep(poll).await;
                    false
                };
                let Some(auth) = weak.upgrade() else { return };
                // Reading a small file: fine on the async threads, but keep it off them anyway.
                let _ = tokio::task::spawn_blocking(move || auth.reload(forced)).await;
            }
        });
    }

    /// The key presented by a request, if any: `Authorization: Bearer <key>` (scheme in any
    /// case), else `X-API-Key`.
    fn presented(headers: &HeaderMap) -> Option<&str> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        bearer
            .or_else(|| {
                headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
            })
            .filter(|k| !k.is_empty())
    }

    /// Admits a request: `Ok(key id)` (None when the service is open) or the 401/429 answer.
    pub fn check(&self, headers: &HeaderMap) -> Result<Option<String>, AuthError> {
        if self.mode == AuthMode::None {
            return Ok(None);
        }
        let Some(key) = Self::presented(headers) else {
            return Err(AuthError::Missing);
        };
        let set = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let id = set.find(key).ok_or(AuthError::Invalid)?;
        if let Some((limiter, per_minute)) = &self.limiter
            && let Err(not_until) = limiter.check_key(&id)
        {
            let wait = not_until.wait_time_from(limiter.clock().now());
            return Err(AuthError::RateLimited {
                key_id: id,
                per_minute: *per_minute,
                retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            });
        }
        Ok(Some(id))
    }
}

fn read_key_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read API_KEYS_FILE {}: {e}", path.display()))
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Invalid,
    RateLimited {
        key_id: String,
        per_minute: u32,
        retry_after: u64,
    },
}

impl AuthError {
    fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid => "invalid",
            AuthError::RateLimited { .. } => "rate_limited",
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let body = |detail: String| axum::Json(serde_json::json!({ "detail": detail }));
        match self {
            AuthError::Missing | AuthError::Invalid => {
                let detail = if self == AuthError::Missing {
                    "Not authenticated"
                } else {
                    "Invalid API key"
                };
                let mut resp = (StatusCode::UNAUTHORIZED, body(detail.into())).into_response();
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                resp
            }
            AuthError::RateLimited {
                per_minute,
                retry_after,
                ..
            } => {
                let detail = format!(
                    "Rate limit exceeded: {per_minute} requests per minute per key (RATE_LIMIT_PER_KEY)"
                );
                let mut resp = (StatusCode::TOO_MANY_REQUESTS, body(detail)).into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
                resp
            }
        }
    }
}

/// Middleware on the protected routes: runs before the body is read, so a caller without a key
/// costs no parsing, no queue place and no download.
pub async fn require_key(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    match auth.check(req.headers()) {
        Ok(None) => next.run(req).await,
        Ok(Some(id)) => {
            auth.metrics.inc(
                "imagegen_requests_by_key_total",
                labels(&[("key_id", &id), ("route", &route)]),
                1,
            );
            tracing::debug!(key_id = %id, "authenticated");
            next.run(req).await
        }
        Err(e) => {
            let key_id = match &e {
                AuthError::RateLimited { key_id, .. } => key_id.as_str(),
                _ => "",
            };
            tracing::info!(reason = e.reason(), key_id, route, "request refused");
            auth.metrics.inc(
                "imagegen_auth_refusals_total",
                labels(&[("reason", e.reason()), ("route", &route)]),
                1,
            );
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Digest comparisons made by `KeySet::find` on this thread.
        pub(super) static COMPARED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn every_key_is_compared_whatever_matches_and_whatever_the_length() {
        let set = KeySet::from_keys(["first", "second-key", "third-key-longer"]);
        for presented in [
            "first",
            "third-key-longer",
            "f",
            "no-such-key-at-all-xxxxxxxxxxxxxxxx",
        ] {
            COMPARED.with(|c| c.set(0));
            let _ = set.find(presented);
            assert_eq!(COMPARED.with(|c| c.get()), 3, "{presented}: no early exit");
        }
        assert_eq!(set.find("first"), Some(key_id("first")));
        assert_eq!(set.find("firs"), None);
    }

    fn auth(keys: &str, file: Option<PathBuf>, rate: Option<u32>) -> Auth {
        Auth::new(
            &AuthConfig {
                keys: (!keys.is_empty()).then(|| keys.parse().unwrap()),
                keys_file: file,
                rate_limit_per_key: rate.and_then(NonZeroU32::new),
            },
            Arc::new(Metrics::default()),
        )
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn no_key_configured_is_open() {
        let a = auth("", None, None);
        assert_eq!(a.mode(), AuthMode::None);
        assert_eq!(a.check(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn bearer_and_x_api_key_are_accepted_wrong_and_missing_refused() {
        let a = auth(" k-one , k-two,,", None, None);
        assert_eq!(a.mode(), AuthMode::ApiKey);
        assert_eq!(a.key_count(), 2);
        let one = Some(key_id("k-one"));
        assert_eq!(
            a.check(&headers(&[("authorization", "Bearer k-one")])),
            Ok(one.clone())
        );
        assert_eq!(
            a.check(&headers(&[("authorization", "bearer   k-one ")])),
            Ok(one.clone())
        );
        assert_eq!(
            a.check(&headers(&[("x-api-key", "k-two")])),
            Ok(Some(key_id("k-two")))
        );
        assert_eq!(a.check(&HeaderMap::new()), Err(AuthError::Missing));
        assert_eq!(
            a.check(&headers(&[("authorization", "Basic k-one")])),
            Err(AuthError::Missing)
        );
        for wrong in ["k-on", "k-one2", "K-ONE", "k-one,k-two"] {
            assert_eq!(
                a.check(&headers(&[("authorization", &format!("Bearer {wrong}"))])),
                Err(AuthError::Invalid),
                "{wrong}"
            );
        }
    }

    #[test]
    fn key_ids_are_short_stable_and_not_the_key() {
        let id = key_id("secret-key-123");
        assert_eq!(id.len(), 8);
        assert_eq!(id, key_id("secret-key-123"));
        assert_ne!(id, key_id("secret-key-124"));
        assert!(!"secret-key-123".contains(&id));
        let d = digest("secret-key-123");
        let stored: String = d[..4].iter().map(|b| format!("{b:02x}")).collect();
        assert_ne!(id, stored, "the id must not reveal the stored digest");
    }

    #[test]
    fn secrets_do_not_print() {
        let s: Secret = "super-secret".parse().unwrap();
        assert!(!format!("{s:?}").contains("super-secret"));
        let cfg = AuthConfig {
            keys: Some(s),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("super-secret"));
    }

    #[test]
    fn key_file_is_read_and_reloaded_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# operators\nfile-key-a\n\n  file-key-b  \n").unwrap();
        let a = auth("inline", Some(path.clone()), None);
        assert_eq!(a.key_count(), 3);
        let ok = |a: &Auth, k: &str| a.check(&headers(&[("x-api-key", k)])).is_ok();
        assert!(ok(&a, "file-key-b") && ok(&a, "inline") && !ok(&a, "# operators"));

        std::fs::write(&path, "file-key-c\n").unwrap();
        a.reload(false);
        assert!(ok(&a, "file-key-c") && ok(&a, "inline"));
        assert!(!ok(&a, "file-key-a"), "a removed key must stop working");

        // An unreadable file keeps the keys it had.
        std::fs::remove_file(&path).unwrap();
        a.reload(true);
        assert!(ok(&a, "file-key-c"));
        let text = a.metrics.render(&[]);
        assert!(text.contains("\nimagegen_auth_reloads_total 1\n"), "{text}");
    }

    #[test]
    fn a_missing_key_file_stops_startup() {
        let err = Auth::new(
            &AuthConfig {
                keys_file: Some("/nonexistent/imagegen-keys".into()),
                ..Default::default()
            },
            Arc::new(Metrics::default()),
        )
        .err()
        .expect("must fail");
        assert!(err.to_string().contains("API_KEYS_FILE"), "{err}");
    }

    #[test]
    fn an_empty_key_set_refuses_everyone_instead_of_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# nobody yet\n").unwrap();
        let a = auth("", Some(path), None);
        assert_eq!(a.mode(), AuthMode::ApiKey);
        assert_eq!(
            a.check(&headers(&[("x-api-key", "anything")])),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn rate_limit_is_per_key() {
        let a = auth("a,b", None, Some(2));
        let ka = headers(&[("x-api-key", "a")]);
        assert!(a.check(&ka).is_ok());
        assert!(a.check(&ka).is_ok());
        match a.check(&ka) {
            Err(AuthError::RateLimited {
                per_minute,
                retry_after,
                key_id: id,
            }) => {
                assert_eq!(per_minute, 2);
                assert!((1..=30).contains(&retry_after), "{retry_after}");
                assert_eq!(id, key_id("a"));
            }
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(a.check(&headers(&[("x-api-key", "b")])).is_ok());
        // A wrong key is refused as such, not counted against anyone's quota.
        assert_eq!(
            a.check(&headers(&[("x-api-key", "c")])),
            Err(AuthError::Invalid)
        );
    }
}
