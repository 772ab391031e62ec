//! The trust boundary as an attacker meets it, on a real `capstan dev`:
//! internal RPCs closed to users, nodes acting only as themselves, ids that
//! are paths refused by every RPC that takes one, apps unable to read the
//! platform's keys, watch streams that end with their token, env values
//! hidden from viewers, events that name who made a change, and a data dir
//! that is the platform's alone.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use capstan_proto::v1::agent_client::AgentClient;
use capstan_proto::v1::auth_client::AuthClient;
use capstan_proto::v1::orchestrator_client::OrchestratorClient;
use capstan_proto::v1::router_config_client::RouterConfigClient;
use capstan_proto::v1::scheduler_client::SchedulerClient;
use capstan_proto::v1::{
    CreateApiKeyRequest, DeleteAppRequest, DrainNodeRequest, GetAppRequest, HeartbeatRequest,
    ListEventsRequest, ListInstancesRequest, ListNodesRequest, PlaceRequest, RegisterNodeRequest,
    ReleaseRequest, Resources, ScaleAppRequest, StartInstanceRequest, StopInstanceRequest,
    SyncRequest, WatchEventsRequest,
};
use common::*;
use serde_json::Value;
use tonic::Code;

fn secret(dev: &Dev, path: &str) -> String {
    stored_secret(dev.data_dir(), path)
}

/// Tokens for every kind of caller of one `capstan dev`.
struct Callers {
    admin: String,
    operator: String,
    viewer: String,
    service: String,
    node: String,
    node_id: String,
}

async fn callers(dev: &Dev) -> Callers {
    let key = |role: &str| {
        dev.ok(&[
            "key",
            "create",
            "--name",
            &format!("e2e-{role}"),
            "--role",
            role,
        ])
        .trim()
        .to_string()
    };
    let (operator_key, viewer_key) = (key("operator"), key("viewer"));
    let admin_key = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    let node_id = dev.node_id();
    Callers {
        admin: token(dev, admin_key.trim().to_string()).await,
        operator: token(dev, operator_key).await,
        viewer: token(dev, viewer_key).await,
        service: token(dev, secret(dev, "capstan/service-key")).await,
        node: token(dev, secret(dev, &format!("nodes/{node_id}/api-key"))).await,
        node_id,
    }
}

#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, field: &str) {
    let status = result.expect_err("the call should have been refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(field),
        "the error does not name `{field}`: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_rpcs_are_closed_to_users_and_nodes_act_only_as_themselves() {
    let dev = tokio::task::spawn_blocking(|| Dev::start(None))
        .await
        .unwrap();
    let c = callers(&dev).await;
    let mut scheduler = SchedulerClient::new(channel(&dev.endpoint("scheduler")));
    let mut router = RouterConfigClient::new(channel(&dev.endpoint("router_config")));
    let nodes = scheduler
        .list_nodes(with_token(ListNodesRequest {}, &c.viewer))
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let mut agent = AgentClient::new(channel(&nodes[0].address));

    // Users, even admins, cannot drive agents or placement: only services can.
    for user in [&c.admin, &c.operator] {
        refused(
            agent
                .list_instances(with_token(ListInstancesRequest {}, user))
                .await,
            Code::PermissionDenied,
            "ListInstances",
        );
        refused(
            scheduler
                .release(with_token(
                    ReleaseRequest {
                        instance_ids: vec![],
                    },
                    user,
                ))
                .await,
            Code::PermissionDenied,
            "Release",
        );
        refused(
            router.sync(with_token(SyncRequest::default(), user)).await,
            Code::PermissionDenied,
            "Sync",
        );
    }
    assert!(
        agent
            .list_instances(with_token(ListInstancesRequest {}, &c.service))
            .await
            .is_ok()
    );

    // Registering a node takes a node key, and only as that node.
    let register = |id: &str| RegisterNodeRequest {
        id: id.into(),
        address: "127.0.0.1:9".into(),
        capacity: Some(Resources {
            cpu_millis: 1000,
            memory_mb: 1024,
        }),
        labels: Default::default(),
    };
    for not_a_node in [&c.admin, &c.operator, &c.service] {
        refused(
            scheduler
                .register_node(with_token(register("rogue"), not_a_node))
                .await,
            Code::PermissionDenied,
            "RegisterNode",
        );
    }
    refused(
        scheduler
            .register_node(with_token(register("rogue"), &c.node))
            .await,
        Code::PermissionDenied,
        "its own node",
    );
    refused(
        scheduler
            .heartbeat(with_token(
                HeartbeatRequest {
                    node_id: "rogue".into(),
                },
                &c.node,
            ))
            .await,
        Code::PermissionDenied,
        "its own node",
    );
    assert!(
        scheduler
            .heartbeat(with_token(
                HeartbeatRequest {
                    node_id: c.node_id.clone()
                },
                &c.node
            ))
            .await
            .unwrap()
            .into_inner()
            .known
    );
    // A node key cannot start workloads on agents either.
    refused(
        agent
            .list_instances(with_token(ListInstancesRequest {}, &c.node))
            .await,
        Code::PermissionDenied,
        "ListInstances",
    );
    // Nobody mints a service key.
    refused(
        AuthClient::new(channel(&dev.endpoint("auth")))
            .create_api_key(with_token(
                CreateApiKeyRequest {
                    name: "evil".into(),
                    role: "service".into(),
                    ..Default::default()
                },
                &c.admin,
            ))
            .await,
        Code::InvalidArgument,
        "role",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_that_takes_an_id_refuses_a_path() {
    let dev = tokio::task::spawn_blocking(|| Dev::start(None))
        .await
        .unwrap();
    let c = callers(&dev).await;
    // Where `../../../canary` lands from an agent's instances dir.
    let canary = dev.data_dir().join("canary.json");
    std::fs::write(&canary, "{}").unwrap();
    let evil = "../../../canary";

    let mut scheduler = SchedulerClient::new(channel(&dev.endpoint("scheduler")));
    let mut orchestrator = OrchestratorClient::new(channel(&dev.endpoint("orchestrator")));
    let mut auth = AuthClient::new(channel(&dev.endpoint("auth")));
    let nodes = scheduler
        .list_nodes(with_token(ListNodesRequest {}, &c.viewer))
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let mut agent = AgentClient::new(channel(&nodes[0].address));

    refused(
        agent
            .stop_instance(with_token(
                StopInstanceRequest {
                    instance_id: evil.into(),
                    grace_ms: 100,
                },
                &c.service,
            ))
            .await,
        Code::InvalidArgument,
        "instance_id",
    );
    refused(
        agent
            .start_instance(with_token(
                StartInstanceRequest {
                    instance_id: evil.into(),
                    spec_hash: "h".into(),
                    spec: None,
                },
                &c.service,
            ))
            .await,
        Code::InvalidArgument,
        "instance_id",
    );
    refused(
        scheduler
            .heartbeat(with_token(
                HeartbeatRequest {
                    node_id: evil.into(),
                },
                &c.node,
            ))
            .await,
        Code::InvalidArgument,
        "node_id",
    );
    refused(
        scheduler
            .register_node(with_token(
                RegisterNodeRequest {
                    id: evil.into(),
                    ..Default::default()
                },
                &c.node,
            ))
            .await,
        Code::InvalidArgument,
        "id",
    );
    refused(
        scheduler
            .place(with_token(
                PlaceRequest {
                    app: "web".into(),
                    instance_ids: vec![evil.into()],
                    ..Default::default()
                },
                &c.service,
            ))
            .await,
        Code::InvalidArgument,
        "instance_ids[0]",
    );
    refused(
        scheduler
            .place(with_token(
                PlaceRequest {
                    app: evil.into(),
                    instance_ids: vec!["web-1".into()],
                    ..Default::default()
                },
                &c.service,
            ))
            .await,
        Code::InvalidArgument,
        "app",
    );
    refused(
        scheduler
            .release(with_token(
                ReleaseRequest {
                    instance_ids: vec![evil.into()],
                },
                &c.service,
            ))
            .await,
        Code::InvalidArgument,
        "instance_ids[0]",
    );
    refused(
        scheduler
            .drain_node(with_token(
                DrainNodeRequest {
                    node_id: evil.into(),
                    enable: true,
                },
                &c.admin,
            ))
            .await,
        Code::InvalidArgument,
        "node_id",
    );
    refused(
        orchestrator
            .get_app(with_token(GetAppRequest { name: evil.into() }, &c.viewer))
            .await,
        Code::InvalidArgument,
        "name",
    );
    refused(
        orchestrator
            .scale_app(with_token(
                ScaleAppRequest {
                    name: evil.into(),
                    replicas: 1,
                },
                &c.operator,
            ))
            .await,
        Code::InvalidArgument,
        "name",
    );
    refused(
        orchestrator
            .delete_app(with_token(
                DeleteAppRequest { name: evil.into() },
                &c.operator,
            ))
            .await,
        Code::InvalidArgument,
        "name",
    );
    refused(
        orchestrator
            .list_events(with_token(
                ListEventsRequest {
                    app: evil.into(),
                    limit: 1,
                },
                &c.viewer,
            ))
            .await,
        Code::InvalidArgument,
        "app",
    );
    refused(
        orchestrator
            .watch_events(with_token(
                WatchEventsRequest {
                    app: evil.into(),
                    history: 0,
                },
                &c.viewer,
            ))
            .await,
        Code::InvalidArgument,
        "app",
    );
    refused(
        auth.create_api_key(with_token(
            CreateApiKeyRequest {
                name: evil.into(),
                role: "viewer".into(),
                ..Default::default()
            },
            &c.admin,
        ))
        .await,
        Code::InvalidArgument,
        "name",
    );
    assert!(
        canary.exists(),
        "a traversal id deleted a file outside the state dir"
    );
}

#[test]
fn apps_cannot_read_the_platforms_keys_or_state() {
    assert!(
        nix_is_root(),
        "process apps switch to an unprivileged user only when the agent is root; run this test as root (CI does)"
    );
    let dev = Dev::start(None);
    let data = dev.data_dir().display().to_string();
    let script = format!(
        "for f in {data}/admin.key {data}/secrets.json {data}/state.db; do /bin/busybox cat $f; done > loot.txt 2>&1; \
         /bin/busybox id -u >> loot.txt; exec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h ."
    );
    let spec = format!(
        "name = \"thief\"\nreplicas = 1\n[run]\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", {}]\n[route]\nhosts = [\"thief.localhost\"]\n",
        serde_json::to_string(&script).unwrap()
    );
    let file = spec_file(dev.data_dir(), "thief.toml", &spec);
    dev.ok(&["app", "deploy", "-f", &file, "--timeout", "60s"]);
    let (code, loot) =
        http_get(dev.http_port, "thief.localhost", "/loot.txt").expect("the app answers");
    assert_eq!(code, 200, "{loot}");
    let admin_key = std::fs::read_to_string(dev.data_dir().join("admin.key")).unwrap();
    assert!(
        !loot.contains(admin_key.trim()),
        "the app read the admin key:\n{loot}"
    );
    assert!(
        !loot.contains("capstan/service-key"),
        "the app read secrets.json:\n{loot}"
    );
    assert!(loot.contains("Permission denied"), "{loot}");
    assert_eq!(
        loot.trim().lines().last(),
        Some("65534"),
        "the app did not run as nobody:\n{loot}"
    );
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_end_with_their_token_and_are_capped() {
    let dev = tokio::task::spawn_blocking(|| Dev::start(None))
        .await
        .unwrap();
    let c = callers(&dev).await;
    // A two-second admin token, signed with the platform's own key.
    // The keyring (auth/signing-keys) holds one key until a rotation.
    let keyring: Value = serde_json::from_str(&secret(&dev, "auth/signing-keys")).unwrap();
    let key: [u8; 32] = base64_decode(keyring["keys"][0]["secret"].as_str().unwrap())
        .try_into()
        .unwrap();
    let signer = capstan_authn::TokenSigner::from_bytes(&key);
    let (short, _) = signer.issue("admin", capstan_authn::Role::Admin, Duration::from_secs(2));
    let mut orchestrator = OrchestratorClient::new(channel(&dev.endpoint("orchestrator")));
    let mut stream = orchestrator
        .watch_events(with_token(
            WatchEventsRequest {
                app: String::new(),
                history: 0,
            },
            &short,
        ))
        .await
        .unwrap()
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream outlived its token by far");
    let status = ended.expect_err("the stream should end with an error");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let mut open = Vec::new();
    for _ in 0..capstan_orchestrator::MAX_WATCHERS {
        open.push(
            orchestrator
                .watch_events(with_token(
                    WatchEventsRequest {
                        app: String::new(),
                        history: 0,
                    },
                    &c.viewer,
                ))
                .await
                .expect("a watcher under the cap"),
        );
    }
    refused(
        orchestrator
            .watch_events(with_token(
                WatchEventsRequest {
                    app: String::new(),
                    history: 0,
                },
                &c.viewer,
            ))
            .await,
        Code::ResourceExhausted,
        "watchers",
    );
    drop(open);
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn viewers_see_no_env_values_and_events_name_who_changed_what() {
    let dev = tokio::task::spawn_blocking(|| Dev::start(None))
        .await
        .unwrap();
    let c = callers(&dev).await;
    let file = spec_file(
        dev.data_dir(),
        "env.toml",
        &whoami_spec("env", 1, "s3cret-canary"),
    );
    dev.ok(&["app", "deploy", "-f", &file]);
    let mut orchestrator = OrchestratorClient::new(channel(&dev.endpoint("orchestrator")));
    let env_of = |token: String| {
        let mut orchestrator = orchestrator.clone();
        async move {
            orchestrator
                .get_app(with_token(GetAppRequest { name: "env".into() }, &token))
                .await
                .unwrap()
                .into_inner()
                .spec
                .unwrap()
                .env["GREETING"]
                .clone()
        }
    };
    assert_eq!(env_of(c.viewer.clone()).await, "<redacted>");
    assert_eq!(env_of(c.operator.clone()).await, "s3cret-canary");

    orchestrator
        .scale_app(with_token(
            ScaleAppRequest {
                name: "env".into(),
                replicas: 2,
            },
            &c.operator,
        ))
        .await
        .unwrap();
    let node = c.node_id.clone();
    dev.ok(&["node", "drain", &node, "--detach"]);
    dev.ok(&["node", "drain", &node, "--cancel"]);
    let events = || -> Vec<Value> {
        dev.ok(&["events", "-o", "json", "-n", "200"])
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    };
    wait_until(
        "a node.drain_cancelled event",
        Duration::from_secs(10),
        || events().iter().any(|e| e["kind"] == "node.drain_cancelled"),
    );
    let events = events();
    let actor_of = |kind: &str| -> Option<(String, String)> {
        events.iter().find(|e| e["kind"] == kind).map(|e| {
            (
                e["actor"].as_str().unwrap_or_default().to_string(),
                e["actor_role"].as_str().unwrap_or_default().to_string(),
            )
        })
    };
    for (kind, actor, role) in [
        ("app.created", "admin", "admin"),
        ("app.scaled", "e2e-operator", "deployer"),
        ("node.drain_started", "admin", "admin"),
        ("node.drain_cancelled", "admin", "admin"),
        ("key.created", "admin", "admin"),
    ] {
        assert_eq!(
            actor_of(kind),
            Some((actor.to_string(), role.to_string())),
            "the actor of {kind}"
        );
    }
}

#[test]
fn the_data_dir_and_its_keys_are_the_platforms_alone_on_every_start() {
    let mut dev = Dev::start(None);
    dev.stop();
    let dir = dev.data_dir().to_path_buf();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // A careless chmod between runs is undone by the next start ...
    chmod(&dir, 0o755);
    chmod(&dir.join("state.db"), 0o644);
    dev.restart();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("state.db")), 0o600);
    dev.stop();
    // ... but an admin key others could read is refused, not silently fixed.
    chmod(&dir.join("admin.key"), 0o644);
    let out = std::process::Command::new(BIN)
        .args(["dev", "--data-dir"])
        .arg(&dir)
        .args(["--http-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "capstan dev started with a readable admin key"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin.key") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

#[test]
fn following_events_outlives_its_tokens_and_prints_each_event_once() {
    let dev = Dev::start_with(None, &["--token-ttl", "2s"]);
    let out = dev.data_dir().join("follow.jsonl");
    let mut follow = std::process::Command::new(BIN)
        .args(["events", "--follow", "-o", "json", "-n", "50", "--data-dir"])
        .arg(dev.data_dir())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let kinds = || -> Vec<String> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["app"] == "follow")
            .filter_map(|e| e["kind"].as_str().map(String::from))
            .collect()
    };
    let file = spec_file(
        dev.data_dir(),
        "follow.toml",
        &whoami_spec("follow", 1, "hi"),
    );
    dev.ok(&["app", "deploy", "-f", &file]);
    wait_until(
        "the follower prints app.created",
        Duration::from_secs(10),
        || kinds().contains(&"app.created".to_string()),
    );
    // Outlive several token lifetimes (not a timing assertion: what is
    // checked below is the output, whenever it comes).
    std::thread::sleep(Duration::from_secs(5));
    dev.ok(&["app", "scale", "follow", "2"]);
    wait_until(
        "the follower prints app.scaled after its tokens expired",
        Duration::from_secs(15),
        || kinds().contains(&"app.scaled".to_string()),
    );
    assert!(
        follow.try_wait().unwrap().is_none(),
        "`capstan events --follow` exited when its token expired"
    );
    let created = kinds().iter().filter(|k| *k == "app.created").count();
    assert_eq!(
        created, 1,
        "an event was printed again after the watch resumed"
    );
    let _ = follow.kill();
    let _ = follow.wait();
}
