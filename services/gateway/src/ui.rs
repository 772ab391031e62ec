//! The web dashboard: static HTML, CSS and JS compiled into the binary
//! (no CDN, no build step), and the session endpoints it signs in with.
//! The pages call the same `/v1/` routes as any client, with the session
//! cookie and the CSRF token instead of a bearer key.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{Gateway, Problem, SIGN_IN_RATE, session};

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/style.css");

/// Only this origin's scripts, styles and connections; never framed.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub(crate) fn router() -> axum::Router<Gateway> {
    axum::Router::new()
        .route("/", axum::routing::get(|| async { Redirect::to("/ui/") }))
        .route(
            "/ui/",
            axum::routing::get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            axum::routing::get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/style.css",
            axum::routing::get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/ui/session",
            axum::routing::post(sign_in).get(whoami).delete(sign_out),
        )
}

/// Who a token is for: its `sub`, `role` and `project` claims. The token
/// came from the auth service a moment ago, so this only reads it.
fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .unwrap_or_default();
    json!({
        "name": claims["sub"],
        "role": claims["role"],
        "project": claims.get("project").cloned().unwrap_or(Value::String(String::new())),
    })
}

fn peer(request_extensions: &http::Extensions) -> std::net::IpAddr {
    request_extensions
        .get::<capstan_server::metrics::PeerAddr>()
        .map(|p| p.0.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// `POST /ui/session` `{"api_key": "cap_..."}`: checks the key (by getting
/// a token for it) and starts a session.
async fn sign_in(
    State(gateway): State<Gateway>,
    extensions: http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let peer = peer(&extensions);
    let client = gateway.trusted.client_ip(peer, &headers);
    let result = async {
        gateway
            .take(
                &format!("gateway/sign-in/{client}"),
                SIGN_IN_RATE,
                "signing in from this address",
            )
            .await?;
        let body: Value = serde_json::from_slice(&body)
            .map_err(|e| Problem::invalid("body", format!("not JSON: {e}")))?;
        let api_key = body["api_key"]
            .as_str()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Problem::invalid("api_key", "missing"))?;
        if api_key.matches('.').count() == 2 {
            return Err(Problem::invalid(
                "api_key",
                "sign in with an API key (cap_...), not a token",
            ));
        }
        let token = gateway.token(api_key).await?;
        let (id, csrf) = gateway
            .sessions
            .create(api_key.to_string(), capstan_server::now_ms());
        let mut who = claims_of(&token);
        who["csrf"] = csrf.into();
        tracing::info!(client = %client, name = %who["name"], "dashboard sign-in");
        Ok((id, who))
    }
    .await;
    match result {
        Ok((id, who)) => {
            let secure = gateway.trusted.forwarded_https(peer, &headers);
            let mut response = axum::Json(who).into_response();
            if let Ok(cookie) = HeaderValue::from_str(&session::set_cookie(Some(&id), secure)) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        Err(problem) => problem.into_response(),
    }
}

/// `GET /ui/session`: who the cookie's session is, and its CSRF token
/// (readable only by this origin's pages).
async fn whoami(State(gateway): State<Gateway>, headers: HeaderMap) -> Response {
    let result = async {
        let id = session::cookie(&headers)
            .ok_or_else(|| Problem::new(StatusCode::UNAUTHORIZED, "not signed in"))?;
        let session = gateway
            .sessions
            .get(&id, capstan_server::now_ms())
            .ok_or_else(|| Problem::new(StatusCode::UNAUTHORIZED, "the session has ended"))?;
        let token = gateway.token(&session.api_key).await?;
        let mut who = claims_of(&token);
        who["csrf"] = session.csrf.into();
        Ok::<_, Problem>(who)
    }
    .await;
    match result {
        Ok(who) => axum::Json(who).into_response(),
        Err(problem) => problem.into_response(),
    }
}

/// `DELETE /ui/session`: ends it (with its CSRF token, like every change).
async fn sign_out(
    State(gateway): State<Gateway>,
    extensions: http::Extensions,
    headers: HeaderMap,
) -> Response {
    if let Err(problem) = gateway.credential(&http::Method::DELETE, &headers) {
        return problem.into_response();
    }
    if let Some(id) = session::cookie(&headers) {
        gateway.sessions.remove(&id);
    }
    let secure = gateway.trusted.forwarded_https(peer(&extensions), &headers);
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session::set_cookie(None, secure)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}
