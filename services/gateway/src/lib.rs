//! The HTTP gateway: REST and JSON under `/v1/` over Capstan's gRPC
//! services, for clients that do not speak gRPC (scripts, browsers, the
//! dashboard, Traefik in front).
//!
//! Each route is a gRPC method ([`routes::ROUTES`]); request and response
//! bodies are the methods' messages in the proto3 JSON mapping, with the
//! proto field names. The gateway holds no authority of its own: it turns
//! the caller's `Authorization: Bearer <API key or token>` into a token
//! (an API key is exchanged at auth, and the token cached until shortly
//! before it expires) and calls the service with it, so every service's
//! own policy decides, exactly as for a gRPC client. Errors are
//! `application/problem+json` (RFC 9457) with the field paths of gRPC
//! validation errors. `GET /openapi.json` is generated from the same route
//! table and the services' descriptors.

pub mod openapi;
pub mod routes;
pub mod session;
mod ui;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes};
use capstan_server::Platform;
use capstan_types::Error;
use futures::StreamExt;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::routes::{Body, Route};

/// The largest request body taken.
pub const MAX_BODY: usize = 1024 * 1024;
/// How long one unary call may take, end to end.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests served at once; past it, 503.
pub const MAX_IN_FLIGHT: usize = 512;
/// Tokens cached for API keys, at most.
const MAX_CACHED_TOKENS: usize = 1024;

/// Passes protobuf bytes through tonic untouched: the gateway encodes and
/// decodes messages itself, by descriptor.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// An RFC 9457 problem.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub title: String,
    pub detail: String,
    /// Rejected fields, as gRPC validation names them.
    pub errors: Vec<capstan_types::FieldError>,
    /// Seconds, for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl Problem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            title: status.canonical_reason().unwrap_or("error").to_string(),
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    fn timed_out() -> Problem {
        Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the service did not answer within {CALL_TIMEOUT:?}"),
        )
    }

    fn invalid(field: &str, reason: impl Into<String>) -> Problem {
        let reason = reason.into();
        Problem {
            errors: vec![capstan_types::FieldError::new(field, reason.clone())],
            ..Problem::new(StatusCode::BAD_REQUEST, format!("{field}: {reason}"))
        }
    }

    /// The problem of a gRPC status, with its field errors.
    fn of_status(status: &tonic::Status) -> Problem {
        use tonic::Code;
        let code = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let errors = match capstan_proto::into_error(status.clone()) {
            Error::Invalid(fields) => fields,
            _ => Vec::new(),
        };
        Problem {
            errors,
            ..Problem::new(code, status.message())
        }
    }

    pub fn to_json(&self) -> Value {
        let mut body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if !self.errors.is_empty() {
            body["errors"] = self
                .errors
                .iter()
                .map(|e| json!({"field": e.field, "reason": e.reason}))
                .collect();
        }
        body
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.to_json().to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after
            && let Ok(value) = http::HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// SHA-256 of an API key -> (its token, until when it is handed out).
type TokenCache = HashMap<[u8; 32], (String, i64)>;

#[derive(Clone)]
pub(crate) struct Gateway {
    platform: Platform,
    pool: DescriptorPool,
    tokens: Arc<Mutex<TokenCache>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    openapi: Arc<String>,
    /// Requests per credential (API key or token).
    rate: capstan_cache::RateLimit,
    sessions: Arc<session::Sessions>,
    /// Whose `X-Forwarded-For` and `-Proto` are believed.
    trusted: capstan_server::trusted::TrustedProxies,
}

/// Sign-ins per client address: a burst of 10, then one a second (API
/// keys are 256 random bits, so this is about load, not guessing).
const SIGN_IN_RATE: capstan_cache::RateLimit = capstan_cache::RateLimit {
    burst: 10,
    per_second: 1.0,
};

/// What `capstan dev --api-rate` and `capstan-gateway --api-rate` set.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Requests a second per credential, with bursts of twice as many.
    pub requests_per_second: u32,
    /// Proxies in front (Traefik) whose `X-Forwarded-*` are believed.
    pub trusted_proxies: capstan_server::trusted::TrustedProxies,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            requests_per_second: 50,
            trusted_proxies: Default::default(),
        }
    }
}

/// The descriptors of every Capstan service.
pub fn descriptors() -> DescriptorPool {
    DescriptorPool::decode(capstan_proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled descriptors decode")
}

fn method_of(pool: &DescriptorPool, rpc: &str) -> Option<prost_reflect::MethodDescriptor> {
    let (service, method) = rpc.split_once('/')?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)
}

const SERIALIZE: prost_reflect::SerializeOptions = prost_reflect::SerializeOptions::new()
    .use_proto_field_name(true)
    .skip_default_fields(false)
    .stringify_64_bit_integers(false);

fn to_json(message: &DynamicMessage) -> Value {
    message
        .serialize_with_options(serde_json::value::Serializer, &SERIALIZE)
        .unwrap_or(Value::Null)
}

/// Sets a scalar field from a path or query parameter.
fn set_text(
    message: &mut DynamicMessage,
    field: &FieldDescriptor,
    text: &str,
) -> Result<(), Problem> {
    use prost_reflect::Value as V;
    let bad = |what: &str| Problem::invalid(field.name(), format!("`{text}` is not {what}"));
    let value = match field.kind() {
        Kind::String => V::String(text.to_string()),
        Kind::Bool => V::Bool(text.parse().map_err(|_| bad("true or false"))?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            V::I32(text.parse().map_err(|_| bad("an integer"))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            V::I64(text.parse().map_err(|_| bad("an integer"))?)
        }
        Kind::Uint32 | Kind::Fixed32 => V::U32(text.parse().map_err(|_| bad("an integer >= 0"))?),
        Kind::Uint64 | Kind::Fixed64 => V::U64(text.parse().map_err(|_| bad("an integer >= 0"))?),
        Kind::Double => V::F64(text.parse().map_err(|_| bad("a number"))?),
        Kind::Float => V::F32(text.parse().map_err(|_| bad("a number"))?),
        Kind::Enum(e) => {
            let value = e
                .values()
                .find(|v| {
                    v.name() == text || v.name().ends_with(&format!("_{}", text.to_uppercase()))
                })
                .or_else(|| text.parse().ok().and_then(|n| e.get_value(n)))
                .ok_or_else(|| bad("one of this field's values"))?;
            V::EnumNumber(value.number())
        }
        _ => return Err(Problem::invalid(field.name(), "cannot be set from the URL")),
    };
    if field.is_list() || field.is_map() {
        return Err(Problem::invalid(field.name(), "cannot be set from the URL"));
    }
    message.set_field(field, value);
    Ok(())
}

/// The request message of `route` from its path, query and body.
fn request_of(
    route: &Route,
    input: &MessageDescriptor,
    path: &HashMap<String, String>,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<DynamicMessage, Problem> {
    let mut message = DynamicMessage::new(input.clone());
    match route.body {
        Body::None => {}
        Body::Whole | Body::Field(_) if body.is_empty() => {}
        Body::Whole => {
            let mut de = serde_json::Deserializer::from_slice(body);
            message = DynamicMessage::deserialize(input.clone(), &mut de)
                .map_err(|e| Problem::invalid("body", format!("not a {}: {e}", input.name())))?;
        }
        Body::Field(name) => {
            let field = input
                .get_field_by_name(name)
                .ok_or_else(|| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "route body"))?;
            let Kind::Message(kind) = field.kind() else {
                return Err(Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "route body",
                ));
            };
            let toml = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/toml"));
            let value = if toml && kind.full_name() == "capstan.v1.AppSpec" {
                let text = std::str::from_utf8(body)
                    .map_err(|_| Problem::invalid("body", "a TOML spec is UTF-8"))?;
                let spec =
                    capstan_types::AppSpec::parse(text, capstan_types::spec::SpecFormat::Toml)
                        .map_err(|e| match e {
                            Error::Invalid(fields) => Problem {
                                errors: fields,
                                ..Problem::new(StatusCode::BAD_REQUEST, "the spec is not valid")
                            },
                            other => Problem::new(StatusCode::BAD_REQUEST, other.to_string()),
                        })?;
                let bytes = capstan_proto::spec_to_wire(&spec).encode_to_vec();
                DynamicMessage::decode(kind.clone(), bytes.as_slice())
                    .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            } else {
                let mut de = serde_json::Deserializer::from_slice(body);
                DynamicMessage::deserialize(kind.clone(), &mut de)
                    .map_err(|e| Problem::invalid(name, format!("not a {}: {e}", kind.name())))?
            };
            message.set_field(&field, prost_reflect::Value::Message(value));
        }
    }
    for (name, text) in query.iter().chain(path.iter()) {
        let field = input
            .get_field_by_name(name)
            .ok_or_else(|| Problem::invalid(name, format!("{} has no such field", input.name())))?;
        set_text(&mut message, &field, text)?;
    }
    Ok(message)
}

impl Gateway {
    /// Takes a request from the caller's bucket (by the credential's
    /// SHA-256: the bearer value, or a session's API key), in the
    /// platform's cache, so several gateways share it. Callers without a
    /// credential are refused before this, at no cost to any service. 429 with Retry-After when it is
    /// empty; a cache that does not answer limits nothing.
    async fn limit(&self, credential: &str) -> Result<(), Problem> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(credential.as_bytes());
        let bucket: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        self.take(
            &format!("gateway/{bucket}"),
            self.rate,
            "with this credential",
        )
        .await
    }

    /// Takes from `bucket`; 429 with Retry-After when it is empty.
    async fn take(
        &self,
        bucket: &str,
        rate: capstan_cache::RateLimit,
        what: &str,
    ) -> Result<(), Problem> {
        match self.platform.cache.take(bucket, rate).await {
            Ok(capstan_cache::Admit::Allowed) => Ok(()),
            Ok(capstan_cache::Admit::Limited { retry_after }) => Err(Problem {
                retry_after: Some(retry_after.as_secs().max(1)),
                ..Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "more than {} requests a second {what}; retry in {} ms",
                        rate.per_second,
                        retry_after.as_millis().max(1)
                    ),
                )
            }),
            Err(e) => {
                tracing::warn!("rate limiter unavailable, not limiting: {e}");
                Ok(())
            }
        }
    }

    /// The caller's credential: `Authorization: Bearer`, else the API key
    /// of the session in the cookie, whose CSRF token a request that can
    /// change something must carry.
    fn credential(&self, method: &http::Method, headers: &HeaderMap) -> Result<String, Problem> {
        let unauthorized = |why: &str| Problem::new(StatusCode::UNAUTHORIZED, why);
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            return value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or_else(|| unauthorized("send Authorization: Bearer <API key or token>"));
        }
        let session = session::cookie(headers)
            .and_then(|id| self.sessions.get(&id, capstan_server::now_ms()))
            .ok_or_else(|| {
                unauthorized("send Authorization: Bearer <API key or token>, or sign in at /ui/")
            })?;
        if session::mutating(method) {
            let sent = headers
                .get(session::CSRF_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !capstan_authn::constant_time_eq(sent, session.csrf.as_bytes()) {
                return Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    "a change made with a session cookie needs the session's X-CSRF-Token header",
                ));
            }
        }
        Ok(session.api_key)
    }

    /// The token to call with for `value` (an API key or a token).
    async fn token(&self, value: &str) -> Result<String, Problem> {
        let unauthorized = |why: &str| Problem::new(StatusCode::UNAUTHORIZED, why);
        if value.len() > 4096 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(unauthorized("the bearer credential is malformed"));
        }
        // A JWT: the services verify it themselves.
        if value.matches('.').count() == 2 {
            return Ok(value.to_string());
        }
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(value.as_bytes()).into();
        let now = capstan_server::now_ms();
        if let Some((token, until)) = self
            .tokens
            .lock()
            .expect("token cache lock poisoned")
            .get(&digest)
            && *until > now
        {
            return Ok(token.clone());
        }
        let channel = self
            .platform
            .channel("auth")
            .await
            .map_err(|e| Problem::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let issued = capstan_proto::v1::auth_client::AuthClient::new(channel)
            .issue_token(capstan_proto::v1::IssueTokenRequest {
                api_key: value.to_string(),
            })
            .await
            .map_err(|s| Problem::of_status(&s))?
            .into_inner();
        let mut tokens = self.tokens.lock().expect("token cache lock poisoned");
        if tokens.len() >= MAX_CACHED_TOKENS {
            tokens.retain(|_, (_, until)| *until > now);
            if tokens.len() >= MAX_CACHED_TOKENS {
                tokens.clear();
            }
        }
        // Handed out until 30 s before it expires (seconds on the wire).
        let until = issued.expires_at.saturating_mul(1000) - 30_000;
        tokens.insert(digest, (issued.token.clone(), until));
        Ok(issued.token)
    }

    async fn call(
        &self,
        route: &Route,
        method: http::Method,
        headers: HeaderMap,
        path: HashMap<String, String>,
        query: HashMap<String, String>,
        body: Bytes,
    ) -> Result<Response, Problem> {
        let _permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_IN_FLIGHT} requests are in flight; retry shortly"),
            )
        })?;
        let credential = self.credential(&method, &headers)?;
        let method = method_of(&self.pool, route.rpc)
            .ok_or_else(|| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "unknown method"))?;
        let mut query = query;
        if route.stream && method.input().get_field_by_name("follow").is_some() {
            query.insert("follow".into(), "true".into());
        }
        let request = request_of(route, &method.input(), &path, &query, &headers, &body)?;
        self.limit(&credential).await?;
        let token = self.token(&credential).await?;
        let channel = self
            .platform
            .channel(route.service)
            .await
            .map_err(|e| Problem::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Problem::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let rpc_path = http::uri::PathAndQuery::try_from(format!("/{}", route.rpc))
            .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut call = tonic::Request::new(Bytes::from(request.encode_to_vec()));
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| Problem::new(StatusCode::UNAUTHORIZED, "the token is malformed"))?;
        call.metadata_mut().insert("authorization", bearer);
        let output = method.output();
        if !route.stream && !method.is_server_streaming() {
            call.set_timeout(CALL_TIMEOUT);
            let response = tokio::time::timeout(CALL_TIMEOUT, grpc.unary(call, rpc_path, RawCodec))
                .await
                .map_err(|_| Problem::timed_out())?
                .map_err(|s| Problem::of_status(&s))?;
            let message = DynamicMessage::decode(output, response.into_inner())
                .map_err(|e| Problem::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
            return Ok(axum::Json(to_json(&message)).into_response());
        }
        let stream = grpc
            .server_streaming(call, rpc_path, RawCodec)
            .await
            .map_err(|s| Problem::of_status(&s))?
            .into_inner();
        if !route.stream {
            // A streaming method on a plain route (logs without follow):
            // collected into one JSON array, bounded by the method itself.
            let items: Vec<Value> = tokio::time::timeout(
                CALL_TIMEOUT,
                stream
                    .map(|item| {
                        item.map_err(|s| Problem::of_status(&s)).and_then(|bytes| {
                            DynamicMessage::decode(output.clone(), bytes)
                                .map(|m| to_json(&m))
                                .map_err(|e| Problem::new(StatusCode::BAD_GATEWAY, e.to_string()))
                        })
                    })
                    .collect::<Vec<_>>(),
            )
            .await
            .map_err(|_| Problem::timed_out())?
            .into_iter()
            .collect::<Result<_, _>>()?;
            return Ok(axum::Json(Value::Array(items)).into_response());
        }
        // Server-Sent Events: one `data:` per message; an error ends the
        // stream with an `error` event holding the problem.
        let events = stream
            .map(move |item| {
                let event = match item {
                    Ok(bytes) => match DynamicMessage::decode(output.clone(), bytes) {
                        Ok(message) => Event::default().data(to_json(&message).to_string()),
                        Err(e) => Event::default().event("error").data(
                            Problem::new(StatusCode::BAD_GATEWAY, e.to_string())
                                .to_json()
                                .to_string(),
                        ),
                    },
                    Err(status) => Event::default()
                        .event("error")
                        .data(Problem::of_status(&status).to_json().to_string()),
                };
                Ok::<_, Infallible>(event)
            })
            .chain(futures::stream::once(async {
                Ok(Event::default().event("end").data("{}"))
            }));
        Ok(Sse::new(events)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response())
    }
}

/// The router: every route of [`routes::ROUTES`], `/openapi.json`, and
/// problems for the rest.
fn router(gateway: Gateway) -> axum::Router {
    let mut router = axum::Router::new();
    for route in routes::ROUTES {
        let handler = move |State(gateway): State<Gateway>,
                            Path(path): Path<HashMap<String, String>>,
                            Query(query): Query<HashMap<String, String>>,
                            method: http::Method,
                            headers: HeaderMap,
                            body: Bytes| async move {
            let started = std::time::Instant::now();
            let response = match gateway
                .call(route, method, headers, path, query, body)
                .await
            {
                Ok(response) => response,
                Err(problem) => problem.into_response(),
            };
            // Per route as the gRPC method it is, under service `gateway`
            // (a stream counts when its response starts).
            capstan_server::metrics::metrics().record_rpc(
                "gateway",
                route.rpc,
                capstan_server::metrics::status_class(response.status().as_u16()),
                started.elapsed(),
            );
            response
        };
        let method_router = match route.method {
            http::Method::GET => axum::routing::get(handler),
            http::Method::POST => axum::routing::post(handler),
            http::Method::PUT => axum::routing::put(handler),
            http::Method::DELETE => axum::routing::delete(handler),
            _ => continue,
        };
        router = router.route(route.path, method_router);
    }
    router
        .route(
            "/openapi.json",
            axum::routing::get(|State(gateway): State<Gateway>| async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    gateway.openapi.as_str().to_string(),
                )
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .merge(ui::router())
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "no such route; see /openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route takes another method; see /openapi.json",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(gateway)
}

/// Serves the gateway on `listener` until `shutdown`, registered as
/// `gateway` with an HTTP check on `/healthz`. Each connection has 10 s to
/// send a request head.
pub async fn run(
    platform: Platform,
    options: GatewayOptions,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let pool = descriptors();
    let openapi = openapi::document(&pool).to_string();
    let gateway = Gateway {
        platform: platform.clone(),
        pool,
        tokens: Arc::default(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        openapi: Arc::new(openapi),
        rate: capstan_cache::RateLimit {
            burst: options.requests_per_second.saturating_mul(2).max(1),
            per_second: f64::from(options.requests_per_second.max(1)),
        },
        sessions: Arc::default(),
        trusted: options.trusted_proxies,
    };
    let address: SocketAddr = listener.local_addr().map_err(Error::internal)?;
    let advertised = platform.advertised(address)?;
    let id = capstan_server::new_id("gateway");
    platform
        .registry
        .register(capstan_registry::Registration {
            id: id.clone(),
            name: "gateway".into(),
            address: advertised.clone(),
            tags: vec!["http".into()],
            check: capstan_registry::Check::Http {
                url: format!("http://{advertised}/healthz"),
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
            },
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    tracing::info!(address = %address, "serving the HTTP gateway");
    let service = hyper_util::service::TowerToHyperService::new(router(gateway));
    capstan_server::metrics::serve_http1(
        "gateway",
        listener,
        service,
        shutdown,
        Duration::from_secs(5),
    )
    .await;
    let _ = platform.registry.deregister(&id).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_names_a_method_and_fields_its_request_has() {
        let pool = descriptors();
        for route in routes::ROUTES {
            let method = method_of(&pool, route.rpc)
                .unwrap_or_else(|| panic!("{}: no method {}", route.path, route.rpc));
            assert_eq!(
                route.stream,
                method.is_server_streaming() && route.path.ends_with("/stream"),
                "{}: streams are the /stream routes of streaming methods",
                route.path
            );
            let input = method.input();
            for field in routes::path_fields(route.path) {
                assert!(
                    input.get_field_by_name(field).is_some(),
                    "{}: {} has no field {field}",
                    route.path,
                    input.name()
                );
            }
            if let Body::Field(field) = route.body {
                assert!(input.get_field_by_name(field).is_some(), "{}", route.path);
            }
        }
    }

    #[test]
    fn a_status_with_field_errors_is_a_problem_naming_them() {
        let status = capstan_proto::status(Error::Invalid(vec![
            capstan_types::FieldError::new("health.interval", "must be between 100ms and 1h"),
            capstan_types::FieldError::new("ports[1].name", "duplicate"),
        ]));
        let problem = Problem::of_status(&status).to_json();
        assert_eq!(problem["status"], 400);
        assert_eq!(problem["errors"][0]["field"], "health.interval");
        assert_eq!(problem["errors"][1]["field"], "ports[1].name");
        assert_eq!(problem["errors"][1]["reason"], "duplicate");
    }
}
