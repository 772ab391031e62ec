//! A **test double** of a Consul agent's HTTP API, for wire-level tests where
//! no real Consul can be installed. It follows the documented behaviour of
//! the endpoints Capstan uses, and nothing more:
//!
//! - `PUT /v1/agent/service/register`: `ID`, `Name` (400 "Missing service
//!   name" without), `Address`, `Port`, `Tags`, `Meta`, and one `Check` with
//!   `CheckID`, `TTL` or `HTTP` + `Interval` + `Timeout`, `Status`,
//!   `DeregisterCriticalServiceAfter`. A TTL check starts critical unless
//!   `Status` says otherwise; an HTTP check is polled at its interval.
//! - `PUT /v1/agent/service/deregister/:id` (404 "Unknown service ID").
//! - `PUT /v1/agent/check/pass/:check_id` (404 "Unknown check ID"); the check
//!   turns critical when its TTL runs out.
//! - `GET /v1/health/service/:name?passing=true&index=N&wait=D`: a blocking
//!   query. It answers at once when the index is past `N` (or `N` is 0),
//!   else when something changes or `wait` runs out; `X-Consul-Index` on
//!   every answer. Entries are `{Node, Service, Checks}`.
//! - `PUT /v1/session/create` (`Name`, `TTL` between 10s and 24h or 400
//!   "Invalid Session TTL", `LockDelay`, default 15s, `Behavior`),
//!   `PUT /v1/session/renew/:id` (404 "Session id ... not found" once
//!   invalidated), `PUT /v1/session/destroy/:id`. A session whose TTL runs
//!   out is invalidated: its locks are released, and each key it held
//!   cannot be acquired for its lock-delay.
//! - `GET /v1/kv/:key` (`recurse`, blocking `index`/`wait`; 404 when no key
//!   matches), `PUT /v1/kv/:key` with `acquire`, `release` or `cas`
//!   (answers `true`/`false`; 500 "invalid session" for an unknown one),
//!   `DELETE /v1/kv/:key` (`recurse`).
//! - `PUT /v1/txn`: up to 128 KV operations (`set`, `cas`, `get`,
//!   `delete`, `delete-tree`, `check-not-exists`) applied atomically; 200
//!   with `Results`, or 409 with `Errors` and nothing applied; 413 past 128.
//!
//! Every request is recorded ([`ConsulDouble::requests`]) so tests can check
//! what a client sent. Lives in testkit: never in a shipped binary.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::go_duration;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

pub struct ConsulDouble {
    address: SocketAddr,
    state: Arc<Mutex<State>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct State {
    index: u64,
    services: BTreeMap<String, Service>,
    sessions: BTreeMap<String, Session>,
    kv: BTreeMap<String, Entry>,
    /// Keys of invalidated sessions, and until when they cannot be acquired.
    lock_delays: BTreeMap<String, Instant>,
    next_session: u64,
    requests: Vec<RecordedRequest>,
    changed: watch::Sender<u64>,
}

struct Session {
    ttl: Duration,
    lock_delay: Duration,
    expires: Instant,
    body: Value,
}

#[derive(Clone)]
struct Entry {
    value: Vec<u8>,
    session: Option<String>,
    lock_index: u64,
    create_index: u64,
    modify_index: u64,
}

struct Service {
    registration: Value,
    check_id: String,
    passing: bool,
    ttl: Option<Duration>,
    expires: Option<Instant>,
    poller: Option<tokio::task::JoinHandle<()>>,
}

impl State {
    fn bump(&mut self) {
        self.index += 1;
        let _ = self.changed.send(self.index);
    }

    /// Invalidates a session (its TTL ran out, or it was destroyed):
    /// releases its locks, which then wait out its lock-delay.
    fn invalidate(&mut self, id: &str) -> bool {
        let Some(session) = self.sessions.remove(id) else {
            return false;
        };
        let until = Instant::now() + session.lock_delay;
        let held: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, e)| e.session.as_deref() == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        self.bump();
        for key in held {
            let index = self.index;
            if let Some(entry) = self.kv.get_mut(&key) {
                entry.session = None;
                entry.modify_index = index;
            }
            self.lock_delays.insert(key, until);
        }
        true
    }

    /// Sets a key, keeping its create index and lock.
    fn set(&mut self, key: &str, value: Vec<u8>) {
        self.bump();
        let index = self.index;
        let entry = self.kv.entry(key.to_string()).or_insert(Entry {
            value: Vec::new(),
            session: None,
            lock_index: 0,
            create_index: index,
            modify_index: index,
        });
        entry.value = value;
        entry.modify_index = index;
    }
}

fn entry_json(key: &str, entry: &Entry, with_value: bool) -> Value {
    use base64::Engine;
    let mut json = json!({
        "Key": key, "Flags": 0, "LockIndex": entry.lock_index,
        "CreateIndex": entry.create_index, "ModifyIndex": entry.modify_index,
        "Value": if with_value { json!(base64::engine::general_purpose::STANDARD.encode(&entry.value)) } else { Value::Null },
    });
    if let Some(session) = &entry.session {
        json["Session"] = json!(session);
    }
    json
}

impl ConsulDouble {
    pub async fn start() -> ConsulDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            index: 1,
            services: BTreeMap::new(),
            sessions: BTreeMap::new(),
            kv: BTreeMap::new(),
            lock_delays: BTreeMap::new(),
            next_session: 0,
            requests: Vec::new(),
            changed: watch::channel(1).0,
        }));
        let server = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(state, request).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        let expirer = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let mut state = state.lock().unwrap();
                    let now = Instant::now();
                    let mut expired = false;
                    for service in state.services.values_mut() {
                        if service.passing && service.expires.is_some_and(|at| at <= now) {
                            service.passing = false;
                            expired = true;
                        }
                    }
                    if expired {
                        state.bump();
                    }
                    let ended: Vec<String> = state
                        .sessions
                        .iter()
                        .filter(|(_, s)| s.expires <= now)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in ended {
                        state.invalidate(&id);
                    }
                }
            }
        });
        ConsulDouble {
            address,
            state,
            tasks: vec![server, expirer],
        }
    }

    /// `consul://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("consul://{}", self.address)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The value of a KV key, as text.
    pub fn kv(&self, key: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .kv
            .get(key)
            .map(|e| String::from_utf8_lossy(&e.value).to_string())
    }

    /// Every KV key under `prefix`, with its value as text.
    pub fn kv_tree(&self, prefix: &str) -> BTreeMap<String, String> {
        self.state
            .lock()
            .unwrap()
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.clone(), String::from_utf8_lossy(&e.value).to_string()))
            .collect()
    }

    /// The session holding the lock on `key`.
    pub fn lock_holder(&self, key: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .kv
            .get(key)
            .and_then(|e| e.session.clone())
    }

    /// Invalidates a session as Consul does when its TTL runs out or an
    /// operator destroys it.
    pub fn invalidate_session(&self, id: &str) -> bool {
        self.state.lock().unwrap().invalidate(id)
    }

    /// The sessions alive, with the bodies they were created with.
    pub fn sessions(&self) -> BTreeMap<String, Value> {
        self.state
            .lock()
            .unwrap()
            .sessions
            .iter()
            .map(|(id, s)| (id.clone(), s.body.clone()))
            .collect()
    }

    /// The registration body the double holds for instance `id`.
    pub fn registration(&self, id: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .services
            .get(id)
            .map(|s| s.registration.clone())
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for service in self.state.lock().unwrap().services.values() {
            if let Some(poller) = &service.poller {
                poller.abort();
            }
        }
    }
}

fn reply(status: StatusCode, index: u64, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("X-Consul-Index", index.to_string())
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn handle(state: Arc<Mutex<State>>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let headers = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body_text = String::from_utf8_lossy(&body).to_string();
    let index = {
        let mut state = state.lock().unwrap();
        state.requests.push(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            headers,
            body: body_text.clone(),
        });
        state.index
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::PUT, ["v1", "agent", "service", "register"]) => register(&state, &body_text).await,
        (Method::PUT, ["v1", "agent", "service", "deregister", id]) => {
            let mut state = state.lock().unwrap();
            match state.services.remove(*id) {
                Some(service) => {
                    if let Some(poller) = service.poller {
                        poller.abort();
                    }
                    state.bump();
                    reply(StatusCode::OK, state.index, String::new())
                }
                None => reply(
                    StatusCode::NOT_FOUND,
                    state.index,
                    format!(
                        "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
                    ),
                ),
            }
        }
        (Method::PUT, ["v1", "agent", "check", "pass", check]) => {
            let mut state = state.lock().unwrap();
            let Some(service) = state
                .services
                .values_mut()
                .find(|s| s.check_id == *check && s.ttl.is_some())
            else {
                return reply(
                    StatusCode::NOT_FOUND,
                    index,
                    format!(
                        "Unknown check ID {check:?}. Ensure that the check ID is passed, not the check name."
                    ),
                );
            };
            let was_passing = service.passing;
            service.passing = true;
            service.expires = service.ttl.map(|ttl| Instant::now() + ttl);
            if !was_passing {
                state.bump();
            }
            reply(StatusCode::OK, state.index, String::new())
        }
        (Method::GET, ["v1", "health", "service", name]) => health(&state, name, &query).await,
        (Method::PUT, ["v1", "session", "create"]) => create_session(&state, &body_text),
        (Method::PUT, ["v1", "session", "renew", id]) => {
            let mut state = state.lock().unwrap();
            let index = state.index;
            match state.sessions.get_mut(*id) {
                Some(session) => {
                    session.expires = Instant::now() + session.ttl;
                    let body = json!([{"ID": id, "TTL": session.body["TTL"]}]);
                    reply(StatusCode::OK, index, body.to_string())
                }
                None => reply(
                    StatusCode::NOT_FOUND,
                    index,
                    format!("Session id '{id}' not found"),
                ),
            }
        }
        (Method::PUT, ["v1", "session", "destroy", id]) => {
            let mut state = state.lock().unwrap();
            state.invalidate(id);
            reply(StatusCode::OK, state.index, "true".into())
        }
        (method, ["v1", "kv", key @ ..]) if !key.is_empty() => {
            kv(&state, method, &key.join("/"), &query, body.to_vec()).await
        }
        (Method::PUT, ["v1", "txn"]) => txn(&state, &body_text),
        _ => reply(
            StatusCode::NOT_FOUND,
            index,
            format!("no such endpoint: {path}"),
        ),
    }
}

async fn register(state: &Arc<Mutex<State>>, body: &str) -> Response<Full<Bytes>> {
    let Ok(registration) = serde_json::from_str::<Value>(body) else {
        return reply(StatusCode::BAD_REQUEST, 0, "Request decode failed".into());
    };
    let Some(name) = registration["Name"].as_str().filter(|n| !n.is_empty()) else {
        return reply(StatusCode::BAD_REQUEST, 0, "Missing service name".into());
    };
    let id = registration["ID"].as_str().unwrap_or(name).to_string();
    let check = &registration["Check"];
    let check_id = check["CheckID"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("service:{id}"));
    let ttl = check["TTL"].as_str().and_then(go_duration);
    let http = check["HTTP"].as_str().map(str::to_string);
    if ttl.is_none() && http.is_none() && !check.is_null() {
        return reply(
            StatusCode::BAD_REQUEST,
            0,
            "Invalid check: TTL or HTTP must be set".into(),
        );
    }
    let interval = check["Interval"]
        .as_str()
        .and_then(go_duration)
        .unwrap_or(Duration::from_secs(10));
    let timeout = check["Timeout"]
        .as_str()
        .and_then(go_duration)
        .unwrap_or(Duration::from_secs(10));
    // TTL checks start critical (Consul's default); a given Status wins.
    let passing = check["Status"].as_str() == Some("passing");
    let poller = http.map(|url| {
        let state = state.clone();
        let id = id.clone();
        tokio::spawn(async move {
            loop {
                let ok = probe(&url, timeout).await;
                {
                    let mut state = state.lock().unwrap();
                    let Some(service) = state.services.get_mut(&id) else {
                        return;
                    };
                    if service.passing != ok {
                        service.passing = ok;
                        state.bump();
                    }
                }
                tokio::time::sleep(interval).await;
            }
        })
    });
    let mut state = state.lock().unwrap();
    if let Some(old) = state.services.remove(&id)
        && let Some(poller) = old.poller
    {
        poller.abort();
    }
    state.services.insert(
        id,
        Service {
            registration: registration.clone(),
            check_id,
            passing,
            ttl,
            expires: None,
            poller,
        },
    );
    state.bump();
    reply(StatusCode::OK, state.index, String::new())
}

async fn probe(url: &str, timeout: Duration) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let Ok(request) = Request::get(uri).body(Full::new(Bytes::new())) else {
        return false;
    };
    matches!(
        tokio::time::timeout(timeout, client.request(request)).await,
        Ok(Ok(response)) if response.status().is_success()
    )
}

/// A blocking query: with `index=N` (N > 0), waits until the index passes
/// N or `wait` (default 5m, at most 10m) runs out.
async fn block(state: &Arc<Mutex<State>>, query: &str) {
    let after: u64 = query_param(query, "index")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if after == 0 {
        return;
    }
    let wait = query_param(query, "wait")
        .and_then(go_duration)
        .unwrap_or(Duration::from_secs(300))
        .min(Duration::from_secs(600));
    let mut changed = state.lock().unwrap().changed.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    while *changed.borrow_and_update() <= after {
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn health(state: &Arc<Mutex<State>>, name: &str, query: &str) -> Response<Full<Bytes>> {
    let passing_only = query_param(query, "passing").is_some_and(|v| v != "false");
    block(state, query).await;
    let state = state.lock().unwrap();
    let entries: Vec<Value> = state
        .services
        .iter()
        .filter(|(_, s)| s.registration["Name"] == name)
        .filter(|(_, s)| !passing_only || s.passing)
        .map(|(id, s)| {
            let r = &s.registration;
            json!({
                "Node": {"ID": "double-node-id", "Node": "double", "Address": "127.0.0.1", "Datacenter": "dc1"},
                "Service": {
                    "ID": id, "Service": r["Name"], "Address": r["Address"], "Port": r["Port"],
                    "Tags": r["Tags"].as_array().cloned().unwrap_or_default(), "Meta": r["Meta"],
                },
                "Checks": [{"CheckID": s.check_id, "Status": if s.passing { "passing" } else { "critical" }}],
            })
        })
        .collect();
    reply(
        StatusCode::OK,
        state.index,
        Value::Array(entries).to_string(),
    )
}

fn create_session(state: &Arc<Mutex<State>>, body: &str) -> Response<Full<Bytes>> {
    let body: Value = if body.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str(body) {
            Ok(body) => body,
            Err(_) => return reply(StatusCode::BAD_REQUEST, 0, "Request decode failed".into()),
        }
    };
    let ttl = match body["TTL"].as_str() {
        None => Duration::from_secs(86_400),
        Some(text) => match go_duration(text) {
            Some(ttl) if (Duration::from_secs(10)..=Duration::from_secs(86_400)).contains(&ttl) => {
                ttl
            }
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    0,
                    format!("Invalid Session TTL '{text}', must be between [10s=24h0m0s]"),
                );
            }
        },
    };
    let lock_delay = body["LockDelay"]
        .as_str()
        .and_then(go_duration)
        .unwrap_or(Duration::from_secs(15));
    let mut state = state.lock().unwrap();
    state.next_session += 1;
    let id = format!("adf4238a-882b-9ddc-4a9d-{:012x}", state.next_session);
    state.sessions.insert(
        id.clone(),
        Session {
            ttl,
            lock_delay,
            expires: Instant::now() + ttl,
            body,
        },
    );
    state.bump();
    reply(StatusCode::OK, state.index, json!({ "ID": id }).to_string())
}

async fn kv(
    state: &Arc<Mutex<State>>,
    method: Method,
    key: &str,
    query: &str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let recurse = query_param(query, "recurse").is_some_and(|v| v != "false")
        || query.split('&').any(|p| p == "recurse");
    match method {
        Method::GET => {
            block(state, query).await;
            let state = state.lock().unwrap();
            let entries: Vec<Value> = state
                .kv
                .iter()
                .filter(|(k, _)| {
                    if recurse {
                        k.starts_with(key)
                    } else {
                        *k == key
                    }
                })
                .map(|(k, e)| entry_json(k, e, true))
                .collect();
            if entries.is_empty() {
                return reply(StatusCode::NOT_FOUND, state.index, String::new());
            }
            reply(
                StatusCode::OK,
                state.index,
                Value::Array(entries).to_string(),
            )
        }
        Method::PUT => {
            let mut state = state.lock().unwrap();
            if let Some(session) = query_param(query, "acquire") {
                if !state.sessions.contains_key(session) {
                    return reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        state.index,
                        format!("invalid session \"{session}\""),
                    );
                }
                let held_by_other = state
                    .kv
                    .get(key)
                    .and_then(|e| e.session.as_deref())
                    .is_some_and(|holder| holder != session);
                let delayed = state
                    .lock_delays
                    .get(key)
                    .is_some_and(|until| *until > Instant::now());
                if held_by_other || delayed {
                    return reply(StatusCode::OK, state.index, "false".into());
                }
                let already_ours =
                    state.kv.get(key).and_then(|e| e.session.as_deref()) == Some(session);
                state.set(key, body);
                let entry = state.kv.get_mut(key).expect("just set");
                if !already_ours {
                    entry.lock_index += 1;
                    entry.session = Some(session.to_string());
                }
                return reply(StatusCode::OK, state.index, "true".into());
            }
            if let Some(session) = query_param(query, "release") {
                let ours = state.kv.get(key).and_then(|e| e.session.as_deref()) == Some(session);
                if !ours {
                    return reply(StatusCode::OK, state.index, "false".into());
                }
                state.bump();
                let index = state.index;
                let entry = state.kv.get_mut(key).expect("checked");
                entry.session = None;
                entry.modify_index = index;
                return reply(StatusCode::OK, state.index, "true".into());
            }
            if let Some(cas) = query_param(query, "cas").and_then(|v| v.parse::<u64>().ok()) {
                let current = state.kv.get(key).map(|e| e.modify_index);
                let matches = match cas {
                    0 => current.is_none(),
                    n => current == Some(n),
                };
                if !matches {
                    return reply(StatusCode::OK, state.index, "false".into());
                }
            }
            state.set(key, body);
            reply(StatusCode::OK, state.index, "true".into())
        }
        Method::DELETE => {
            let mut state = state.lock().unwrap();
            let before = state.kv.len();
            state.kv.retain(|k, _| {
                if recurse {
                    !k.starts_with(key)
                } else {
                    k != key
                }
            });
            if state.kv.len() != before {
                state.bump();
            }
            reply(StatusCode::OK, state.index, "true".into())
        }
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            0,
            format!("method {method} not allowed"),
        ),
    }
}

fn txn(state: &Arc<Mutex<State>>, body: &str) -> Response<Full<Bytes>> {
    use base64::Engine;
    let Ok(Value::Array(ops)) = serde_json::from_str::<Value>(body) else {
        return reply(
            StatusCode::BAD_REQUEST,
            0,
            "Failed to parse body: not a JSON array of operations".into(),
        );
    };
    if ops.len() > 128 {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            0,
            format!(
                "Transaction contains too many operations ({} > 128)",
                ops.len()
            ),
        );
    }
    let mut guard = state.lock().unwrap();
    // Apply to a copy: all or nothing.
    let mut kv = guard.kv.clone();
    // Every write of the transaction takes the index it commits at.
    let index = guard.index + 1;
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for (at, op) in ops.iter().enumerate() {
        let kv_op = &op["KV"];
        let key = kv_op["Key"].as_str().unwrap_or_default().to_string();
        let verb = kv_op["Verb"].as_str().unwrap_or_default();
        let value = || {
            kv_op["Value"]
                .as_str()
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        };
        let mut fail = |what: String| errors.push(json!({"OpIndex": at, "What": what}));
        match verb {
            "set" | "cas" => {
                let Some(value) = value() else {
                    fail(format!("missing or non-base64 value for key {key:?}"));
                    continue;
                };
                if verb == "cas" {
                    let want = kv_op["Index"].as_u64().unwrap_or(0);
                    let current = kv.get(&key).map(|e| e.modify_index);
                    if (want == 0 && current.is_some()) || (want != 0 && current != Some(want)) {
                        fail(format!("failed to set key {key:?}, index is stale"));
                        continue;
                    }
                }
                let entry = kv.entry(key.clone()).or_insert(Entry {
                    value: Vec::new(),
                    session: None,
                    lock_index: 0,
                    create_index: index,
                    modify_index: index,
                });
                entry.value = value;
                entry.modify_index = index;
                results.push(json!({"KV": entry_json(&key, entry, false)}));
            }
            "get" => match kv.get(&key) {
                Some(entry) => results.push(json!({"KV": entry_json(&key, entry, true)})),
                None => fail(format!("key {key:?} doesn't exist")),
            },
            "check-not-exists" => {
                if kv.contains_key(&key) {
                    fail(format!("key {key:?} exists"));
                }
            }
            "delete" => {
                kv.remove(&key);
            }
            "delete-tree" => kv.retain(|k, _| !k.starts_with(&key)),
            other => fail(format!("unknown KV verb {other:?}")),
        }
    }
    if !errors.is_empty() {
        return reply(
            StatusCode::CONFLICT,
            guard.index,
            json!({"Results": null, "Errors": errors}).to_string(),
        );
    }
    guard.kv = kv;
    guard.bump();
    reply(
        StatusCode::OK,
        guard.index,
        json!({"Results": results, "Errors": null}).to_string(),
    )
}
