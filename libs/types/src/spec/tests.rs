use proptest::prelude::*;

use super::*;

const VALID: &str = r#"
name = "hello"
replicas = 3

[run]
command = ["python3", "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"]

[resources]
cpu_millis = 100
memory_mb = 64

[[ports]]
name = "http"

[env]
GREETING = "hello"

[health]
http_path = "/"
interval = "1s"
timeout = "500ms"
unhealthy_after = 3

[route]
hosts = ["hello.localhost"]

[update]
max_surge = 1
max_unavailable = 0
"#;

/// Parses `text` and checks that it fails on `field` with a reason containing `reason`.
fn check_rejected(format: SpecFormat, text: &str, field: &str, reason: &str) {
    let err = AppSpec::parse(text, format).expect_err("spec should be rejected");
    let Error::Invalid(errors) = &err else {
        panic!("expected Invalid, got {err:?}")
    };
    assert!(
        errors
            .iter()
            .any(|e| e.field == field && e.reason.contains(reason)),
        "expected `{field}: ...{reason}...`, got {err}"
    );
}

fn toml_with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "fixture lacks {from:?}");
    VALID.replacen(from, to, 1)
}

#[test]
fn parses_the_documented_example() {
    let spec = AppSpec::parse(VALID, SpecFormat::Toml).unwrap();
    assert_eq!(spec.name.as_str(), "hello");
    assert_eq!(spec.replicas, 3);
    assert_eq!(spec.health.check, HealthCheck::Http { path: "/".into() });
    assert_eq!(spec.health.timeout, Duration::from_millis(500));
    assert_eq!(spec.route.hosts, vec!["hello.localhost".to_string()]);
    assert!(!spec.is_image());
}

#[test]
fn yaml_is_the_same_spec() {
    let yaml = r#"
name: hello
replicas: 3
run:
  command: ["python3", "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"]
resources: { cpu_millis: 100, memory_mb: 64 }
ports: [{ name: http }]
env: { GREETING: hello }
health: { http_path: /, interval: 1s, timeout: 500ms, unhealthy_after: 3 }
route: { hosts: [hello.localhost] }
update: { max_surge: 1, max_unavailable: 0 }
"#;
    let from_yaml = AppSpec::parse(yaml, SpecFormat::Yaml).unwrap();
    let from_toml = AppSpec::parse(VALID, SpecFormat::Toml).unwrap();
    assert_eq!(from_yaml, from_toml);
}

#[test]
fn defaults_fill_missing_tables() {
    let spec = AppSpec::parse(
        "name = \"a\"\n[run]\ncommand = [\"sleep\", \"1\"]\n",
        SpecFormat::Toml,
    )
    .unwrap();
    assert_eq!(spec.replicas, 1);
    assert_eq!(spec.resources, Resources::default());
    assert_eq!(spec.health, HealthSpec::default());
    assert_eq!(spec.update, UpdateSpec::default());
}

#[test]
fn rejects_bad_input_naming_the_field() {
    use SpecFormat::Toml;
    check_rejected(
        Toml,
        &toml_with("replicas = 3", "replicas = 3\ncolour = \"red\""),
        "colour",
        "unknown field `colour`",
    );
    check_rejected(
        Toml,
        &toml_with("memory_mb = 64", "memory_mb = 64\nswap = 1"),
        "resources.swap",
        "unknown field `swap`",
    );
    check_rejected(
        Toml,
        &toml_with("replicas = 3", "replicas = \"three\""),
        "replicas",
        "invalid type",
    );
    check_rejected(
        Toml,
        &toml_with("replicas = 3", "replicas = 5000"),
        "replicas",
        "between 0 and 1000",
    );
    check_rejected(
        Toml,
        &toml_with("replicas = 3", "replicas = -1"),
        "replicas",
        "invalid value",
    );
    check_rejected(Toml, "name = \"a\"\n", "run", "missing");
    check_rejected(
        Toml,
        &toml_with("[run]\n", "[run]\nimage = \"busybox:latest\"\n"),
        "run",
        "not both",
    );
    check_rejected(
        Toml,
        &toml_with("interval = \"1s\"", "interval = \"1 sec\""),
        "health.interval",
        "unit",
    );
    check_rejected(
        Toml,
        &toml_with("interval = \"1s\"", "interval = \"10ms\""),
        "health.interval",
        "between 100ms",
    );
    check_rejected(
        Toml,
        &toml_with("timeout = \"500ms\"", "timeout = \"5s\""),
        "health.timeout",
        "at most",
    );
    check_rejected(
        Toml,
        &toml_with("name = \"hello\"", "name = \"Hello_World\""),
        "name",
        "DNS label",
    );
    check_rejected(
        Toml,
        &toml_with("name = \"hello\"", "name = \"-x\""),
        "name",
        "DNS label",
    );
    check_rejected(
        Toml,
        &toml_with(
            "name = \"http\"\n",
            "name = \"http\"\n\n[[ports]]\nname = \"http\"\n",
        ),
        "ports[1].name",
        "duplicate",
    );
    check_rejected(
        Toml,
        &toml_with("max_surge = 1", "max_surge = 0"),
        "update.max_surge",
        "both be 0",
    );
    check_rejected(
        Toml,
        &toml_with("GREETING = \"hello\"", "PORT = \"1\""),
        "env.PORT",
        "reserved",
    );
    check_rejected(
        Toml,
        &toml_with("GREETING = \"hello\"", "CAPSTAN_HOST_IP = \"0.0.0.0\""),
        "env.CAPSTAN_HOST_IP",
        "reserved",
    );
    check_rejected(
        Toml,
        &toml_with("hello.localhost", "bad host!"),
        "route.hosts[0]",
        "valid host",
    );
    check_rejected(Toml, "name = [", "spec", "TOML");
}

#[test]
fn image_apps_need_container_ports_and_process_apps_must_not_have_them() {
    let image = "name = \"web\"\n[run]\nimage = \"busybox:latest\"\n[[ports]]\nname = \"http\"\n";
    check_rejected(
        SpecFormat::Toml,
        image,
        "ports[0].container_port",
        "required for image apps",
    );
    let process = "name = \"web\"\n[run]\ncommand = [\"x\"]\n[[ports]]\nname = \"http\"\ncontainer_port = 80\n";
    check_rejected(
        SpecFormat::Toml,
        process,
        "ports[0].container_port",
        "only for image apps",
    );
}

#[test]
fn reports_every_problem_at_once() {
    let text = toml_with("name = \"hello\"", "name = \"UPPER\"")
        .replace("replicas = 3", "replicas = 9999");
    let Err(Error::Invalid(errors)) = AppSpec::parse(&text, SpecFormat::Toml) else {
        panic!("accepted")
    };
    let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["name", "replicas"]);
}

#[test]
fn format_comes_from_the_extension() {
    assert_eq!(SpecFormat::from_path("app.TOML").unwrap(), SpecFormat::Toml);
    assert_eq!(SpecFormat::from_path("app.yml").unwrap(), SpecFormat::Yaml);
    assert!(SpecFormat::from_path("app.json").is_err());
}

#[test]
fn template_hash_ignores_scale_and_routes_but_not_the_command() {
    let spec = AppSpec::parse(VALID, SpecFormat::Toml).unwrap();
    let mut scaled = spec.clone();
    scaled.replicas = 7;
    scaled.route.hosts.push("other.localhost".into());
    assert_eq!(spec.template_hash(), scaled.template_hash());
    let mut changed = spec.clone();
    changed.env.insert("GREETING".into(), "bye".into());
    assert_ne!(spec.template_hash(), changed.template_hash());
}

#[test]
fn a_restart_is_a_new_template_and_a_spec_file_cannot_set_one() {
    let spec = AppSpec::parse(VALID, SpecFormat::Toml).unwrap();
    assert_eq!(spec.restarts, 0);
    let mut restarted = spec.clone();
    restarted.restarts = 1;
    assert_ne!(spec.template_hash(), restarted.template_hash());
    let with_field = format!("restarts = 3\n{VALID}");
    assert!(
        AppSpec::parse(&with_field, SpecFormat::Toml).is_err(),
        "restarts is the platform's, not a spec field"
    );
}

proptest! {
    /// Whatever the input, parsing never panics, and what it accepts is valid.
    #[test]
    fn parse_never_panics_and_accepts_only_valid_specs(text in "\\PC{0,200}") {
        if let Ok(spec) = AppSpec::parse(&text, SpecFormat::Toml) {
            prop_assert!(spec.validate().is_ok());
        }
        let _ = AppSpec::parse(&text, SpecFormat::Yaml);
    }

    #[test]
    fn replicas_are_accepted_exactly_in_range(replicas in 0u32..5000) {
        let text = toml_with("replicas = 3", &format!("replicas = {replicas}"));
        let result = AppSpec::parse(&text, SpecFormat::Toml);
        prop_assert_eq!(result.is_ok(), replicas <= MAX_REPLICAS);
    }

    #[test]
    fn names_are_accepted_iff_dns_labels(name in "[a-zA-Z0-9_.-]{0,70}") {
        let text = toml_with("name = \"hello\"", &format!("name = \"{name}\""));
        let is_label = !name.is_empty() && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-') && !name.ends_with('-');
        prop_assert_eq!(AppSpec::parse(&text, SpecFormat::Toml).is_ok(), is_label);
    }
}

#[test]
fn placement_section_parses_and_validates() {
    let text = format!(
        "{VALID}\n[placement]\nstrategy = \"spread\"\nconstraints = [\"zone != ap\", \"kernel.version >= 5.10\"]\ndistinct_hosts = true\nspread = {{ attribute = \"zone\", targets = {{ eu = 70, us = 30 }} }}\n"
    );
    let spec = AppSpec::parse(&text, SpecFormat::Toml).unwrap();
    assert_eq!(spec.placement.constraints.len(), 2);
    assert!(spec.placement.distinct_hosts);
    assert!(spec.placement.anti_affinity);
    assert_eq!(spec.placement.spread_by.as_deref(), Some("zone"));
    assert_eq!(spec.placement.spread_targets["eu"], 70);

    let with = |section: &str| format!("{VALID}\n[placement]\n{section}\n");
    let toml = SpecFormat::Toml;
    check_rejected(
        toml,
        &with("strategy = \"fastest\""),
        "placement.strategy",
        "unknown strategy `fastest`",
    );
    check_rejected(
        toml,
        &with("constraints = [\"zone == eu\", \"zone <> eu\"]"),
        "placement.constraints[1]",
        "unknown operator `<>`",
    );
    check_rejected(
        toml,
        &with("strategy = \"binpack\"\nspread = { attribute = \"zone\" }"),
        "placement.spread_by",
        "only with strategy = \"spread\"",
    );
    check_rejected(
        toml,
        &with("spread = { attribute = \"zone\", targets = { eu = 80, us = 30 } }"),
        "placement.spread_targets",
        "add up to 110",
    );
    check_rejected(
        toml,
        &with("colour = \"red\""),
        "placement.colour",
        "unknown field `colour`",
    );
}

#[test]
fn placement_changes_the_template_only_when_set() {
    let spec = AppSpec::parse(VALID, SpecFormat::Toml).unwrap();
    let mut placed = spec.clone();
    placed.placement.constraints = vec![Constraint::parse("zone == eu").unwrap()];
    assert_ne!(spec.template_hash(), placed.template_hash());
}

fn valid() -> AppSpec {
    AppSpec::parse(VALID, SpecFormat::Toml).unwrap()
}

/// Validates `spec` and checks that it fails on `field` with `reason`.
fn check_invalid(spec: &AppSpec, field: &str, reason: &str) {
    let Err(Error::Invalid(errors)) = spec.validate() else {
        panic!("expected Invalid for {field}");
    };
    assert!(
        errors
            .iter()
            .any(|e| e.field == field && e.reason.contains(reason)),
        "no `{field}: …{reason}…` in {errors:?}"
    );
}

#[test]
fn oversized_specs_are_refused_with_the_field_named() {
    let mut spec = valid();
    spec.env = (0..=limits::MAX_ENV_VARS)
        .map(|i| (format!("V{i}"), "x".into()))
        .collect();
    check_invalid(&spec, "env", "at most 128 allowed, got 129");

    let mut spec = valid();
    spec.env
        .insert("BIG".into(), "x".repeat(limits::MAX_ENV_VALUE_LEN + 1));
    check_invalid(&spec, "env.BIG", "at most 32768 bytes");

    let mut spec = valid();
    spec.run = Run::Process {
        command: vec!["x".into(); limits::MAX_ARGS + 1],
    };
    check_invalid(&spec, "run.command", "at most 256 allowed");

    let mut spec = valid();
    if let Run::Process { command } = &mut spec.run {
        command.push("y".repeat(limits::MAX_ARG_LEN + 1));
    }
    check_invalid(&spec, "run.command[6]", "at most 4096 bytes");

    let mut spec = valid();
    spec.route.hosts = (0..=limits::MAX_HOSTS)
        .map(|i| format!("h{i}.localhost"))
        .collect();
    check_invalid(&spec, "route.hosts", "at most 32 allowed");

    // Too many constraints are refused before any is compiled.
    let many = vec!["\"zone == a\""; limits::MAX_CONSTRAINTS + 1].join(", ");
    check_rejected(
        SpecFormat::Toml,
        &format!("{VALID}\n[placement]\nconstraints = [{many}]\n"),
        "placement.constraints",
        "at most 32 allowed",
    );

    let mut spec = valid();
    spec.ports = (0..=limits::MAX_PORTS)
        .map(|i| PortSpec {
            name: format!("p{i}"),
            container_port: None,
            host_port: None,
        })
        .collect();
    check_invalid(&spec, "ports", "at most 16 allowed");

    let huge = format!("{VALID}\n# {}\n", "x".repeat(limits::MAX_SPEC_BYTES));
    check_rejected(SpecFormat::Toml, &huge, "spec", "at most 262144 bytes");
}

#[test]
fn spread_targets_that_overflow_u32_are_an_error_not_a_panic() {
    let mut spec = valid();
    spec.placement.strategy = Some(super::Strategy::Spread);
    spec.placement.spread_by = Some("zone".into());
    spec.placement.spread_targets =
        [("a".to_string(), u32::MAX), ("b".to_string(), u32::MAX)].into();
    check_invalid(&spec, "placement.spread_targets", "add up to 8589934590");
}

#[test]
fn debug_output_never_shows_env_values() {
    let mut spec = valid();
    spec.env
        .insert("DB_PASSWORD".into(), "hunter2-canary".into());
    let shown = format!("{spec:?} {spec:#?}");
    assert!(!shown.contains("hunter2-canary"), "{shown}");
    assert!(shown.contains("DB_PASSWORD"), "names stay visible: {shown}");
}

proptest! {
    /// Whatever a user writes, parsing answers with a spec or an error.
    #[test]
    fn parsing_arbitrary_text_never_panics(text in ".{0,400}") {
        let _ = AppSpec::parse(&text, SpecFormat::Toml);
        let _ = AppSpec::parse(&text, SpecFormat::Yaml);
        let _ = crate::duration::parse(&text);
    }

    /// Specs with wild numbers in every field validate without panicking.
    #[test]
    fn validating_extreme_values_never_panics(
        replicas in any::<u32>(),
        cpu in any::<u32>(),
        memory in any::<u32>(),
        surge in any::<u32>(),
        unavailable in any::<u32>(),
        unhealthy_after in any::<u32>(),
        targets in proptest::collection::btree_map("[a-z]{1,3}", any::<u32>(), 0..6),
        host_port in any::<u16>(),
    ) {
        let mut spec = AppSpec::parse(VALID, SpecFormat::Toml).unwrap();
        spec.replicas = replicas;
        spec.resources.cpu_millis = cpu;
        spec.resources.memory_mb = memory;
        spec.update.max_surge = surge;
        spec.update.max_unavailable = unavailable;
        spec.health.unhealthy_after = unhealthy_after;
        spec.placement.spread_by = Some("zone".into());
        spec.placement.spread_targets = targets;
        spec.ports[0].host_port = Some(host_port);
        let _ = spec.validate();
        let _ = spec.template_hash();
    }
}

#[test]
fn a_bad_run_section_does_not_hide_other_problems() {
    let text = "name = \"Bad Name\"\n[run]\ncommand = [\"x\"]\nimage = \"y\"\n[placement]\nconstraints = [\"zone ~= a\"]\n";
    let Err(Error::Invalid(errors)) = AppSpec::parse(text, SpecFormat::Toml) else {
        panic!("the spec should be rejected");
    };
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    for field in ["name", "run", "placement.constraints[0]"] {
        assert!(fields.contains(&field), "{field} missing from {errors:?}");
    }
}

const AUTOSCALE: &str = r#"
[autoscale]
min = 1
max = 10
target_cpu_percent = 70
target_rps_per_instance = 200
target_p95_ms = 250
scale_up_cooldown = "15s"
scale_down_cooldown = "2m"
stabilization = "1m"
"#;

#[test]
fn autoscale_parses_with_its_defaults_and_leaves_the_template_alone() {
    let spec = AppSpec::parse(&format!("{VALID}{AUTOSCALE}"), SpecFormat::Toml).unwrap();
    let autoscale = spec.autoscale.clone().unwrap();
    assert_eq!((autoscale.min, autoscale.max), (1, 10));
    assert_eq!(autoscale.target_rps_per_instance, Some(200));
    assert_eq!(autoscale.scale_down_cooldown, Duration::from_secs(120));
    assert_eq!(autoscale.scale_to_zero_after, None);
    let plain = AppSpec::parse(VALID, SpecFormat::Toml).unwrap();
    assert_eq!(
        spec.template_hash(),
        plain.template_hash(),
        "autoscaling restarts nothing"
    );

    let minimal = "\n[autoscale]\nmax = 4\ntarget_cpu_percent = 50\n";
    let spec = AppSpec::parse(&format!("{VALID}{minimal}"), SpecFormat::Toml).unwrap();
    let autoscale = spec.autoscale.unwrap();
    assert_eq!(autoscale.min, 1);
    assert_eq!(
        autoscale.scale_up_cooldown,
        AutoscaleSpec::DEFAULT_SCALE_UP_COOLDOWN
    );
    assert_eq!(
        autoscale.stabilization,
        AutoscaleSpec::DEFAULT_STABILIZATION
    );
    assert_eq!(autoscale.clamp(9), 4);
    assert_eq!(autoscale.clamp(0), 1);
}

#[test]
fn autoscale_rejects_bad_bounds_targets_and_scale_to_zero() {
    let with = |body: &str| format!("{VALID}\n[autoscale]\n{body}\n");
    for (body, field, reason) in [
        (
            "min = 5\nmax = 2\ntarget_cpu_percent = 50",
            "autoscale.min",
            "at most autoscale.max",
        ),
        (
            "max = 0\ntarget_cpu_percent = 50",
            "autoscale.max",
            "between 1 and 1000",
        ),
        ("max = 3", "autoscale", "at least one target"),
        (
            "max = 3\ntarget_cpu_percent = 0",
            "autoscale.target_cpu_percent",
            "between 1 and 1000",
        ),
        (
            "min = 0\nmax = 3\ntarget_rps_per_instance = 10",
            "autoscale.min",
            "scale_to_zero_after",
        ),
        (
            "min = 0\nmax = 3\ntarget_rps_per_instance = 10\nscale_to_zero_after = \"5s\"",
            "autoscale.scale_to_zero_after",
            "between 10s and 24h",
        ),
        (
            "min = 1\nmax = 3\ntarget_rps_per_instance = 10\nscale_to_zero_after = \"5m\"",
            "autoscale.scale_to_zero_after",
            "only with min = 0",
        ),
        (
            "max = 3\ntarget_cpu_percent = 50\nstabilization = \"soon\"",
            "autoscale.stabilization",
            "",
        ),
        (
            "max = 3\ntarget_cpu_percent = 50\ncooldown = \"1s\"",
            "autoscale.cooldown",
            "unknown field",
        ),
    ] {
        check_rejected(SpecFormat::Toml, &with(body), field, reason);
    }
    let zero = with("min = 0\nmax = 3\ntarget_rps_per_instance = 10\nscale_to_zero_after = \"5m\"");
    let spec = AppSpec::parse(&zero, SpecFormat::Toml).unwrap();
    assert_eq!(
        spec.autoscale.unwrap().scale_to_zero_after,
        Some(Duration::from_secs(300))
    );
}

#[test]
fn a_host_port_below_1024_is_privileged_and_named() {
    let mut spec = AppSpec::parse(VALID, SpecFormat::Toml).unwrap();
    assert!(spec.privileged_fields().is_empty());
    if spec.ports.is_empty() {
        spec.ports.push(PortSpec {
            name: "http".into(),
            container_port: None,
            host_port: None,
        });
    }
    spec.ports[0].host_port = Some(8080);
    assert!(spec.privileged_fields().is_empty());
    spec.ports[0].host_port = Some(80);
    let fields = spec.privileged_fields();
    assert_eq!(fields.len(), 1);
    assert_eq!(fields[0].field, "ports[0].host_port");
    assert!(
        fields[0].reason.contains("only an admin"),
        "{}",
        fields[0].reason
    );
}
