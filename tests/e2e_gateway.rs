//! The HTTP gateway end to end on `capstan dev`: deploy (a TOML spec), get,
//! scale, logs, events over SSE, keys and roles, rollback and delete over
//! REST; errors as problem+json naming the field; responses that match the
//! gateway's own /openapi.json.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// One HTTP/1.0 request (the answer ends at close).
fn call(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<(&str, &str)>,
) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect to the gateway");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: api.localhost\r\n");
    if let Some(key) = key {
        request += &format!("Authorization: Bearer {key}\r\n");
    }
    let (content_type, text) = body.unwrap_or(("application/json", ""));
    request += &format!(
        "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    Reply {
        status,
        content_type,
        body: body.to_string(),
    }
}

/// Checks `value` against a schema of the gateway's document.
fn conforms(document: &Value, schema: &str, value: &Value) {
    let mut root = json!({ "$ref": format!("#/components/schemas/{schema}") });
    root["components"] = document["components"].clone();
    let validator = jsonschema::validator_for(&root).expect("the document's schemas compile");
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{schema}: {errors:?} in {value}");
}

fn problem(reply: &Reply, status: u16) -> Value {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(
        reply.content_type, "application/problem+json",
        "{}",
        reply.body
    );
    let body = reply.json();
    assert_eq!(body["status"], status);
    body
}

#[test]
fn rest_deploy_get_scale_logs_events_keys_rollback_and_delete() {
    let dev = Dev::start_with(None, &["--no-docker"]);
    let addr = dev.endpoints()["gateway"].as_str().unwrap().to_string();
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let admin = admin.trim();

    let document = call(&addr, "GET", "/openapi.json", None, None).json();
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["paths"]["/v1/apps/{name}/scale"]["post"].is_object());

    // No key, a bad key: 401, as problems.
    problem(&call(&addr, "GET", "/v1/apps", None, None), 401);
    problem(
        &call(&addr, "GET", "/v1/apps", Some("not-a-key"), None),
        401,
    );
    problem(&call(&addr, "GET", "/v1/nowhere", Some(admin), None), 404);

    // A TOML spec with a bad field: 400 naming it; nothing deployed.
    let bad = whoami_spec("web", 1, "v1").replace("interval = \"500ms\"", "interval = \"5ms\"");
    let reply = call(
        &addr,
        "POST",
        "/v1/apps",
        Some(admin),
        Some(("application/toml", &bad)),
    );
    let body = problem(&reply, 400);
    assert_eq!(body["errors"][0]["field"], "health.interval", "{body}");
    let apps = call(&addr, "GET", "/v1/apps", Some(admin), None).json();
    assert_eq!(apps["apps"], json!([]), "{apps}");

    // Deploy, then wait for it over GET.
    let spec = whoami_spec("web", 1, "v1");
    let reply = call(
        &addr,
        "POST",
        "/v1/apps",
        Some(admin),
        Some(("application/toml", &spec)),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    conforms(&document, "capstan.v1.ApplyAppResponse", &reply.json());
    wait_until("web is healthy", Duration::from_secs(30), || {
        call(&addr, "GET", "/v1/apps/web", Some(admin), None).json()["healthy"] == 1
    });
    let status = call(&addr, "GET", "/v1/apps/web", Some(admin), None).json();
    conforms(&document, "capstan.v1.AppStatus", &status);
    assert_eq!(status["spec"]["env"]["GREETING"], "v1");
    problem(
        &call(&addr, "GET", "/v1/apps/nosuch", Some(admin), None),
        404,
    );

    // Scale; a body of the wrong shape is named.
    let reply = call(
        &addr,
        "POST",
        "/v1/apps/web/scale",
        Some(admin),
        Some(("application/json", r#"{"replicas": 2}"#)),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["spec"]["replicas"], 2);
    let reply = call(
        &addr,
        "POST",
        "/v1/apps/web/scale",
        Some(admin),
        Some(("application/json", r#"{"replicas": "many"}"#)),
    );
    assert_eq!(problem(&reply, 400)["errors"][0]["field"], "body");
    let reply = call(
        &addr,
        "POST",
        "/v1/apps/web/scale",
        Some(admin),
        Some(("application/json", r#"{"replicas": 1000000}"#)),
    );
    assert_eq!(problem(&reply, 400)["errors"][0]["field"], "replicas");

    // A viewer key, made over REST: reads, cannot scale.
    let reply = call(
        &addr,
        "POST",
        "/v1/keys",
        Some(admin),
        Some(("application/json", r#"{"name": "ro", "role": "viewer"}"#)),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let created = reply.json();
    conforms(&document, "capstan.v1.CreateApiKeyResponse", &created);
    let viewer = created["api_key"]
        .as_str()
        .expect("the new key, once")
        .to_string();
    assert_eq!(
        call(&addr, "GET", "/v1/apps/web", Some(&viewer), None).status,
        200
    );
    let denied = call(
        &addr,
        "POST",
        "/v1/apps/web/scale",
        Some(&viewer),
        Some(("application/json", r#"{"replicas": 3}"#)),
    );
    problem(&denied, 403);
    let keys = call(&addr, "GET", "/v1/keys", Some(admin), None).json();
    assert!(
        !keys.to_string().contains(&viewer),
        "key listings never hold keys"
    );

    // Logs, as an array of lines.
    wait_until("web has logged", Duration::from_secs(20), || {
        let reply = call(&addr, "GET", "/v1/apps/web/logs?tail=5", Some(admin), None);
        reply.status == 200 && reply.json().as_array().is_some_and(|a| !a.is_empty())
    });
    let lines = call(&addr, "GET", "/v1/apps/web/logs?tail=5", Some(admin), None).json();
    for line in lines.as_array().unwrap() {
        conforms(&document, "capstan.v1.LogLine", line);
        assert_eq!(line["app"], "web");
    }
    let reply = call(
        &addr,
        "GET",
        "/v1/apps/web/logs?tail=lots",
        Some(admin),
        None,
    );
    assert_eq!(problem(&reply, 400)["errors"][0]["field"], "tail");

    // Events over SSE: the history comes as `data:` lines.
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /v1/events/stream?app=web&history=5 HTTP/1.1\r\nHost: api.localhost\r\nAuthorization: Bearer {admin}\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let (started, mut head, mut events) = (Instant::now(), String::new(), Vec::new());
    let mut line = String::new();
    while events.len() < 3 && started.elapsed() < Duration::from_secs(10) {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            events.push(serde_json::from_str::<Value>(data).expect("an event as JSON"));
        } else if events.is_empty() {
            head.push_str(&line);
        }
    }
    assert!(
        head.to_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(events.len() >= 3, "{events:?}");
    for event in &events {
        conforms(&document, "capstan.v1.Event", event);
        assert_eq!(event["app"], "web");
    }

    // A second template, a rollback to the first, then delete.
    let v2 = whoami_spec("web", 1, "v2");
    assert_eq!(
        call(
            &addr,
            "POST",
            "/v1/apps",
            Some(admin),
            Some(("application/toml", &v2))
        )
        .status,
        200
    );
    wait_until("v2 rolled out", Duration::from_secs(30), || {
        let status = call(&addr, "GET", "/v1/apps/web", Some(admin), None).json();
        status["rollout"]["state"] == "ROLLOUT_STATE_COMPLETED"
            && status["spec"]["env"]["GREETING"] == "v2"
    });
    let reply = call(
        &addr,
        "POST",
        "/v1/apps/web/rollback",
        Some(admin),
        Some(("application/json", "{}")),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["spec"]["env"]["GREETING"], "v1");
    let reply = call(
        &addr,
        "POST",
        "/v1/apps/web/rollback",
        Some(admin),
        Some(("application/json", r#"{"to_template": "../x"}"#)),
    );
    assert_eq!(problem(&reply, 400)["errors"][0]["field"], "to_template");
    assert_eq!(
        call(&addr, "DELETE", "/v1/apps/web", Some(admin), None).status,
        200
    );
    wait_until("web is gone", Duration::from_secs(30), || {
        call(&addr, "GET", "/v1/apps/web", Some(admin), None).status == 404
    });
}

#[test]
fn a_credential_past_its_rate_gets_429_with_retry_after_and_others_go_on() {
    let dev = Dev::start_with(None, &["--no-docker", "--api-rate", "5"]);
    let addr = dev.endpoints()["gateway"].as_str().unwrap().to_string();
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let admin = admin.trim();
    // A burst of 10, then 5 a second: 30 at once cannot all pass.
    let statuses: Vec<u16> = (0..30)
        .map(|_| call(&addr, "GET", "/v1/apps", Some(admin), None).status)
        .collect();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 5, "{statuses:?}");
    assert!(
        statuses.iter().take(10).all(|s| *s == 200),
        "the burst passes: {statuses:?}"
    );
    let mut stream = TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "GET /v1/apps HTTP/1.0\r\nAuthorization: Bearer {admin}\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.contains(" 429 "), "{response}");
    assert!(
        response.to_lowercase().contains("retry-after: 1"),
        "{response}"
    );
    // Another credential has its own bucket.
    problem(
        &call(&addr, "GET", "/v1/apps", Some("another-key"), None),
        401,
    );
}
