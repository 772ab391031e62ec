//! API keys through the CLI and gRPC: `capstan key ls` and `capstan key
//! revoke`, with every service refusing the revoked key's live tokens within
//! a second (in-memory cache, and a real Redis), and token exchange limited
//! per key without touching other callers.

mod common;

use std::time::{Duration, Instant};

use capstan_proto::v1::auth_client::AuthClient;
use capstan_proto::v1::orchestrator_client::OrchestratorClient;
use capstan_proto::v1::router_config_client::RouterConfigClient;
use capstan_proto::v1::scheduler_client::SchedulerClient;
use capstan_proto::v1::{
    GetRoutesRequest, IssueTokenRequest, ListApiKeysRequest, ListAppsRequest, ListNodesRequest,
};
use capstan_testkit::redis::Redis;
use common::*;
use tonic::Code;

async fn exchange(auth: &str, key: &str) -> Result<String, tonic::Status> {
    AuthClient::new(channel(auth))
        .issue_token(IssueTokenRequest {
            api_key: key.to_string(),
        })
        .await
        .map(|r| r.into_inner().token)
}

/// One authenticated read on each service with `token`: Ok(()) or the first
/// refusal.
async fn read_everywhere(dev: &Dev, token: &str) -> Vec<Result<(), tonic::Status>> {
    vec![
        OrchestratorClient::new(channel(&dev.endpoint("orchestrator")))
            .list_apps(with_token(ListAppsRequest {}, token))
            .await
            .map(drop),
        SchedulerClient::new(channel(&dev.endpoint("scheduler")))
            .list_nodes(with_token(ListNodesRequest {}, token))
            .await
            .map(drop),
        RouterConfigClient::new(channel(&dev.endpoint("router_config")))
            .get_routes(with_token(GetRoutesRequest::default(), token))
            .await
            .map(drop),
    ]
}

async fn revocation_reaches_every_service(dev: Dev) {
    let auth = dev.endpoint("auth");
    let key = dev
        .ok(&["key", "create", "--name", "ci", "--role", "admin"])
        .trim()
        .to_string();
    let token = exchange(&auth, &key).await.unwrap();
    for answer in read_everywhere(&dev, &token).await {
        answer.expect("a live key's token works everywhere");
    }
    // The auth service itself checks it too (an admin-only call).
    AuthClient::new(channel(&auth))
        .list_api_keys(with_token(ListApiKeysRequest {}, &token))
        .await
        .expect("the token works on auth");

    let listed = dev.json(&["key", "ls", "-o", "json"]);
    let names: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["name"].as_str().unwrap(), k["role"].as_str().unwrap()))
        .collect();
    assert!(names.contains(&("ci", "admin")), "{names:?}");
    assert!(names.contains(&("admin", "admin")), "{names:?}");
    let text = dev.ok(&["key", "ls"]);
    assert!(!text.contains(&key), "key ls never shows a key");

    let duplicate = dev.cli(&["key", "create", "--name", "ci", "--role", "viewer"]);
    assert!(!duplicate.status.success());
    let stderr = String::from_utf8_lossy(&duplicate.stderr);
    assert!(
        stderr.contains("name: an API key named `ci` exists"),
        "{stderr}"
    );

    let revoked_at = Instant::now();
    let said = dev.ok(&["key", "revoke", "ci"]);
    assert!(
        said.contains("revoked API key `ci` and 1 live tokens"),
        "{said}"
    );
    // Every service refuses the live token within a second of the answer.
    loop {
        let answers = read_everywhere(&dev, &token).await;
        let refused = answers.iter().all(|a| {
            a.as_ref().err().is_some_and(|s| {
                s.code() == Code::Unauthenticated && s.message().contains("revoked")
            })
        });
        if refused {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still accepted a second after revocation: {answers:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let on_auth = AuthClient::new(channel(&auth))
        .list_api_keys(with_token(ListApiKeysRequest {}, &token))
        .await
        .unwrap_err();
    assert_eq!(on_auth.code(), Code::Unauthenticated, "{on_auth:?}");
    let again = exchange(&auth, &key).await.unwrap_err();
    assert_eq!(
        again.code(),
        Code::Unauthenticated,
        "a revoked key issues nothing"
    );

    // Other keys are untouched; bad names are refused and change nothing.
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let admin_token = exchange(&auth, admin.trim()).await.unwrap();
    for answer in read_everywhere(&dev, &admin_token).await {
        answer.expect("the admin key still works");
    }
    for (name, expected) in [
        ("ci", "not found"),
        ("../../etc", "name:"),
        ("capstan-services", "the services' own key"),
    ] {
        let out = dev.cli(&["key", "revoke", name]);
        assert!(!out.status.success(), "revoke {name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "revoke {name}: {stderr}");
    }
    assert!(
        dev.json(&["key", "ls", "-o", "json"])
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "capstan-services"),
        "the refused revocation changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_key_revokes_its_tokens_everywhere_in_memory() {
    let dev = tokio::task::spawn_blocking(|| Dev::start(None))
        .await
        .unwrap();
    revocation_reaches_every_service(dev).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_key_revokes_its_tokens_everywhere_on_redis() {
    let redis = Redis::start().await;
    let url = redis.url();
    let dev = tokio::task::spawn_blocking(move || Dev::start_with(None, &["--cache", &url]))
        .await
        .unwrap();
    revocation_reaches_every_service(dev).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_token_exchanges_is_limited_and_others_are_not() {
    let dev = tokio::task::spawn_blocking(|| Dev::start(None))
        .await
        .unwrap();
    let auth = dev.endpoint("auth");
    let flooder = dev
        .ok(&["key", "create", "--name", "flood", "--role", "viewer"])
        .trim()
        .to_string();
    let mut limited = None;
    for _ in 0..100 {
        if let Err(status) = exchange(&auth, &flooder).await {
            limited = Some(status);
            break;
        }
    }
    let status = limited.expect("100 exchanges in a burst are limited");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("API key; retry in"),
        "{}",
        status.message()
    );
    let retry_ms: u64 = status
        .metadata()
        .get("retry-after-ms")
        .expect("retry-after-ms header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_ms > 0 && retry_ms <= 1000, "{retry_ms}");

    // Another caller, from the same address, is not affected.
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    exchange(&auth, admin.trim())
        .await
        .expect("another key still gets tokens");
    // And the flooder gets one again after the delay it was given.
    tokio::time::sleep(Duration::from_millis(retry_ms + 50)).await;
    exchange(&auth, &flooder)
        .await
        .expect("a token after the retry delay");
}

#[test]
fn a_bad_cache_url_names_the_flag_and_a_down_cache_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["dev", "--cache", "memcached://x"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--cache"), "{stderr}");
    assert!(stderr.contains("memcached://x"), "{stderr}");

    let port = capstan_testkit::free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["dev", "--cache", &url, "--http-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("the cache (--cache) at {url} did not answer")),
        "{stderr}"
    );
    assert!(
        stderr.contains("attempt"),
        "a log line per attempt: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotating_the_signing_key_keeps_old_tokens_valid() {
    let dev = tokio::task::spawn_blocking(|| Dev::start(None))
        .await
        .unwrap();
    let auth = dev.endpoint("auth");
    let admin = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let before = exchange(&auth, admin.trim()).await.unwrap();
    let kid = |token: &str| -> String {
        use base64::Engine;
        let header = token.split('.').next().unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap(),
        )
        .unwrap();
        header["kid"].as_str().unwrap().to_string()
    };

    let said = dev.ok(&["key", "rotate-signing"]);
    assert!(said.contains("is published now"), "{said}");
    let new_kid = said.split_whitespace().nth(1).unwrap().to_string();
    assert_ne!(new_kid, kid(&before));
    // Published before it signs: the public keys list both at once.
    let published = AuthClient::new(channel(&auth))
        .get_verification_keys(capstan_proto::v1::GetVerificationKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let kids: Vec<&str> = published.iter().map(|k| k.kid.as_str()).collect();
    assert!(
        kids.contains(&new_kid.as_str()) && kids.contains(&kid(&before).as_str()),
        "{kids:?}"
    );
    // Within its activation delay (10 s), new tokens come with the new key.
    let started = Instant::now();
    let after = loop {
        let token = exchange(&auth, admin.trim()).await.unwrap();
        if kid(&token) == new_kid {
            break token;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the new key never signed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Both verify on every service: the old key stays published.
    for token in [&before, &after] {
        for answer in read_everywhere(&dev, token).await {
            answer.expect("tokens of the old and the new key verify");
        }
    }
    let events = dev.ok(&["events", "-n", "50"]);
    assert!(events.contains("key.signing_rotated"), "{events}");
    // Only an admin may rotate.
    let viewer = dev
        .ok(&["key", "create", "--name", "v", "--role", "viewer"])
        .trim()
        .to_string();
    let out = dev.cli(&["key", "rotate-signing", "--api-key", &viewer]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("permission"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
