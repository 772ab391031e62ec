//! Browser sessions. A browser signs in with an API key once
//! (`POST /ui/session`); the gateway keeps the key in memory under a random
//! session id and sets the id as a cookie (`HttpOnly`, `SameSite=Strict`,
//! `Secure` when the request came over TLS). Each later request with the
//! cookie is the key's, exchanged for a token like any bearer credential.
//! Every request that can change something (not GET/HEAD) must also carry
//! the session's CSRF token in `X-CSRF-Token`: a page of another origin
//! can make the browser send the cookie, but cannot read the token.
//!
//! Sessions live in this gateway's memory: they end when it restarts, and
//! several gateways need sticky routing (ADR 0017).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sha2::Digest;

/// The cookie's name.
pub const COOKIE: &str = "capstan_session";
/// The header mutating requests carry the session's CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(8 * 3600);
/// And none outlives this.
pub const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Sessions held at once; the oldest go first past it.
pub const MAX_SESSIONS: usize = 10_000;

#[derive(Clone)]
pub struct Session {
    /// The API key signed in with. Held only here, never logged.
    pub api_key: String,
    pub csrf: String,
    created_ms: i64,
    last_ms: i64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// Sessions by the SHA-256 of their id (so a dump of memory is not a
/// list of cookies).
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(id: &str) -> [u8; 32] {
    sha2::Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// A new session for `api_key`: (its id, its CSRF token).
    pub fn create(&self, api_key: String, now_ms: i64) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let mut sessions = self.by_id.lock().expect("sessions lock poisoned");
        sessions.retain(|_, s| live(s, now_ms));
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(k, _)| *k)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            digest(&id),
            Session {
                api_key,
                csrf: csrf.clone(),
                created_ms: now_ms,
                last_ms: now_ms,
            },
        );
        (id, csrf)
    }

    /// The live session `id`, touched.
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Session> {
        let mut sessions = self.by_id.lock().expect("sessions lock poisoned");
        let key = digest(id);
        let session = sessions.get_mut(&key)?;
        if !live(session, now_ms) {
            sessions.remove(&key);
            return None;
        }
        session.last_ms = now_ms;
        Some(session.clone())
    }

    pub fn remove(&self, id: &str) {
        self.by_id
            .lock()
            .expect("sessions lock poisoned")
            .remove(&digest(id));
    }
}

fn live(session: &Session, now_ms: i64) -> bool {
    now_ms - session.last_ms < IDLE.as_millis() as i64
        && now_ms - session.created_ms < LIFETIME.as_millis() as i64
}

/// The session id in a `Cookie` header, if any.
pub fn cookie(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value of session `id` (`None`: clears it).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            LIFETIME.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// Whether `method` can change something, and so needs the CSRF token.
pub fn mutating(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_when_idle_too_long_or_too_old() {
        let sessions = Sessions::default();
        let (id, csrf) = sessions.create("cap_key".into(), 0);
        assert_eq!(id.len(), 64);
        assert_ne!(id, csrf);
        assert_eq!(sessions.get(&id, 1000).unwrap().csrf, csrf);
        let idle = IDLE.as_millis() as i64;
        assert!(sessions.get(&id, 1000 + idle).is_none(), "idle too long");
        let (id, _) = sessions.create("cap_key".into(), 0);
        let mut at = 0;
        while at + idle / 2 < LIFETIME.as_millis() as i64 {
            at += idle / 2;
            assert!(sessions.get(&id, at).is_some());
        }
        assert!(sessions.get(&id, at + idle / 2).is_none(), "too old");
        assert!(sessions.get("nonsense", 0).is_none());
        let (id, _) = sessions.create("cap_gone".into(), 0);
        sessions.remove(&id);
        assert!(sessions.get(&id, 1).is_none());
    }

    #[test]
    fn the_cookie_is_read_only_in_its_own_shape() {
        let mut headers = http::HeaderMap::new();
        let id = "a".repeat(64);
        headers.insert(
            http::header::COOKIE,
            format!("theme=dark; {COOKIE}={id}").parse().unwrap(),
        );
        assert_eq!(cookie(&headers), Some(id.clone()));
        headers.insert(
            http::header::COOKIE,
            format!("{COOKIE}=../../etc").parse().unwrap(),
        );
        assert_eq!(cookie(&headers), None);
        let set = set_cookie(Some(&id), true);
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!set_cookie(Some(&id), false).contains("Secure"));
        assert!(mutating(&http::Method::POST) && mutating(&http::Method::DELETE));
        assert!(!mutating(&http::Method::GET));
    }
}
