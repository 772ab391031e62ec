//! `docker-compose.yml` and the `infra/` files it mounts, checked without
//! the images (Consul, Vault, ScyllaDB and the rest cannot be pulled here):
//! the real `docker-compose` accepts the file, so does the Compose JSON
//! schema, every Capstan command, flag and variable in it is accepted by the
//! real binaries, and the Traefik and RabbitMQ files match what Capstan
//! expects.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::services::service_binary;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn contract(name: &str) -> Value {
    let path = root().join("../shared/contracts").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e}; shared/ must sit beside the repo", path.display())
        }),
    )
    .unwrap()
}

fn yaml_to_json(text: &str) -> Value {
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(text).expect("YAML");
    yaml.apply_merge().expect("merge keys");
    serde_json::to_value(yaml).expect("YAML as JSON")
}

fn validate(schema: &Value, document: &Value, what: &str) {
    let validator = jsonschema::validator_for(schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(document)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{what} breaks the schema: {errors:#?}");
}

/// `docker-compose config`: the file as the real tool resolves it (with
/// `.env.example`'s values), as JSON.
fn resolved() -> Value {
    capstan_testkit::require_tool("docker-compose", "apt-get install -y docker-compose");
    let out = Command::new("docker-compose")
        .current_dir(root())
        .args([
            "-f",
            "docker-compose.yml",
            "--env-file",
            ".env.example",
            "config",
        ])
        .output()
        .expect("run docker-compose");
    assert!(
        out.status.success(),
        "docker-compose config refused the file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_to_json(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn docker_compose_and_the_compose_schema_accept_the_file() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    validate(
        &contract("compose-spec.schema.json"),
        &yaml_to_json(&text),
        "docker-compose.yml",
    );
    let resolved = resolved();
    validate(
        &contract("compose-spec.schema.json"),
        &resolved,
        "docker-compose config's output",
    );
    let services = resolved["services"].as_object().unwrap();
    let backends = [
        "consul",
        "vault",
        "vault-init",
        "rabbitmq",
        "redis",
        "scylla",
        "traefik",
    ];
    for name in backends.into_iter().chain(common::COMPOSE_CAPSTAN_SERVICES) {
        assert!(services.contains_key(name), "no service {name}");
    }
    // Every long-running service has a health check, and what depends on a
    // service waits for it to be healthy (or, for one-shots, done).
    for (name, service) in services {
        let one_shot = service["restart"] == "no";
        assert!(
            one_shot
                || service["healthcheck"].is_object()
                || service["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("capstan")),
            "{name} has no health check"
        );
        for (dependency, condition) in service["depends_on"].as_object().into_iter().flatten() {
            let wanted = if services[dependency]["restart"] == "no" {
                "service_completed_successfully"
            } else {
                "service_healthy"
            };
            assert_eq!(condition["condition"], wanted, "{name} -> {dependency}");
        }
    }
    // Every tunable the file reads is in .env.example.
    let example = std::fs::read_to_string(root().join(".env.example")).unwrap();
    let documented: Vec<&str> = example
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| !k.starts_with('#'))
        .collect();
    let used = regex::Regex::new(r"\$\{([A-Z0-9_]+)").unwrap();
    for variable in used.captures_iter(&text) {
        assert!(
            documented.contains(&&variable[1]),
            "{} is used by docker-compose.yml but not in .env.example",
            &variable[1]
        );
    }
}

/// Runs a Capstan binary with `args` and `env` (nothing else but PATH)
/// until it gets past its argument parsing: still running after a while,
/// or ended with an error of its own. A clap error fails the test.
fn parses(binary: &Path, args: &[String], env: &BTreeMap<String, String>, what: &str) {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        // The container's paths do not exist here; parsing comes first.
        .env("CAPSTAN_DATA_DIR", data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: start {}: {e}", binary.display()));
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for clap_error in [
        "unexpected argument",
        "invalid value",
        "unrecognized subcommand",
        "required arguments were not provided",
        "Usage:",
    ] {
        assert!(
            !stderr.contains(clap_error),
            "{what}: {} refused its command line or environment: {stderr}",
            binary.display()
        );
    }
}

fn string_list(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().unwrap_or_default().to_string())
            .collect(),
        Value::String(text) => vec![text.clone()],
        _ => Vec::new(),
    }
}

#[test]
fn every_capstan_command_flag_and_variable_in_the_compose_file_is_accepted() {
    let resolved = resolved();
    let mut checked = 0;
    for (name, service) in resolved["services"].as_object().unwrap() {
        if !service["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("capstan"))
        {
            continue;
        }
        let env: BTreeMap<String, String> = service["environment"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), String::from),
                )
            })
            .collect();
        let entrypoint = string_list(&service["entrypoint"]);
        let command = string_list(&service["command"]);
        if entrypoint == ["bash", "-c"] || command.first().is_some_and(|c| c == "bash") {
            // A one-shot script: it must parse, and the scripts it runs exist.
            let script = if entrypoint.is_empty() {
                let path = command[1].replace("/infra/", &format!("{}/infra/", root().display()));
                assert!(Path::new(&path).exists(), "{name}: {path} is missing");
                std::fs::read_to_string(&path).unwrap()
            } else {
                command.join(" ")
            };
            let syntax = Command::new("bash")
                .args(["-n", "-c", &script])
                .output()
                .unwrap();
            assert!(
                syntax.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&syntax.stderr)
            );
            if script.contains("capstan key create") {
                let args: Vec<String> = ["key", "create", "--role", "node", "--name", "agent-1"]
                    .map(String::from)
                    .to_vec();
                parses(&service_binary("capstan"), &args, &env, name);
            }
            checked += 1;
            continue;
        }
        let (binary, args) = command
            .split_first()
            .unwrap_or_else(|| panic!("{name} has no command"));
        assert!(binary.starts_with("capstan"), "{name} runs {binary}");
        parses(&service_binary(binary), args, &env, name);
        // The image's health check, as this service's container runs it.
        parses(
            &service_binary("capstan"),
            &["health".into()],
            &env,
            &format!("{name} health check"),
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} Capstan services found");
}

#[test]
fn the_traefik_static_config_matches_the_schema_and_routes_on_web() {
    let text = std::fs::read_to_string(root().join("infra/traefik/traefik.yml")).unwrap();
    let config = yaml_to_json(&text);
    validate(
        &contract("traefik-v3-static.schema.json"),
        &config,
        "infra/traefik/traefik.yml",
    );
    // router-config's routes attach to this entry point, and it reads the
    // API on the `traefik` one to confirm tables.
    assert!(config["entryPoints"][capstan_router_config::traefik::ENTRY_POINT].is_object());
    assert_eq!(config["entryPoints"]["traefik"]["address"], ":8080");
    assert_eq!(
        config["providers"]["consul"]["rootKey"],
        capstan_router_config::traefik::KV_ROOT
    );
}

#[test]
fn traefik_routes_api_to_the_gateway_with_a_file_provider_config_of_the_schema() {
    let text = std::fs::read_to_string(root().join("infra/traefik/dynamic/gateway.yml")).unwrap();
    let config = yaml_to_json(&text);
    validate(
        &contract("traefik-v3-file-provider.schema.json"),
        &config,
        "infra/traefik/dynamic/gateway.yml",
    );
    let router = &config["http"]["routers"]["capstan-gateway"];
    assert!(
        router["rule"]
            .as_str()
            .unwrap()
            .starts_with("Host(`api.{{ env \"CAPSTAN_DOMAIN\" }}`)"),
        "{router}"
    );
    assert_eq!(router["entryPoints"][0], "websecure");
    assert!(router["tls"].is_object(), "TLS at Traefik: {router}");
    let redirect = &config["http"]["routers"]["capstan-gateway-redirect"];
    assert_eq!(
        redirect["entryPoints"][0],
        capstan_router_config::traefik::ENTRY_POINT
    );
    let servers = &config["http"]["services"]["capstan-gateway"]["loadBalancer"]["servers"];
    assert!(
        servers[0]["url"]
            .as_str()
            .unwrap()
            .contains("default \"http://gateway:7007\""),
        "{servers}"
    );
    let static_config =
        yaml_to_json(&std::fs::read_to_string(root().join("infra/traefik/traefik.yml")).unwrap());
    assert_eq!(
        static_config["providers"]["file"]["directory"],
        "/etc/traefik/dynamic"
    );
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    assert!(compose.contains("./infra/traefik/dynamic:/etc/traefik/dynamic:ro"));
    assert!(compose.contains("CAPSTAN_LISTEN: 0.0.0.0:7007"));
    // The gateway believes Traefik's fixed address only.
    assert!(compose.contains("CAPSTAN_TRUSTED_PROXIES: ${CAPSTAN_TRAEFIK_IP:-172.28.0.2}"));
    assert!(compose.contains("ipv4_address: ${CAPSTAN_TRAEFIK_IP:-172.28.0.2}"));
}

#[test]
fn the_rabbitmq_definitions_declare_the_bus_exchange_as_the_bus_does() {
    let definitions: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("infra/rabbitmq/definitions.json")).unwrap(),
    )
    .unwrap();
    let exchange = definitions["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == capstan_events::EXCHANGE)
        .expect("the bus exchange is declared");
    // A definition that differs from the bus's own declaration would make
    // every service's exchange_declare fail with PRECONDITION_FAILED.
    assert_eq!(exchange["type"], "topic");
    assert_eq!(exchange["durable"], true);
    assert_eq!(exchange["auto_delete"], false);
    let conf = std::fs::read_to_string(root().join("infra/rabbitmq/rabbitmq.conf")).unwrap();
    assert!(conf.contains("load_definitions = /etc/rabbitmq/definitions.json"));
    let _: PathBuf = root().join("infra/rabbitmq/definitions.json");
}
