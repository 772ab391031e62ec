//! The app spec: parsed from TOML or YAML, validated once, then stored and
//! sent as the domain type below.
//!
//! Validation reports every problem at once, each with its field path, so a
//! user fixes a spec in one round trip.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::duration;
use crate::error::{Error, FieldError};

pub const MAX_REPLICAS: u32 = 1000;
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);

/// Caps on what one spec may hold: a spec is stored, sent to every agent
/// that runs it and logged about, so none of it may be unbounded. The
/// README's "Limits" table lists these with the servers' limits.
pub mod limits {
    pub const MAX_SPEC_BYTES: usize = 256 * 1024;
    pub const MAX_ENV_VARS: usize = 128;
    pub const MAX_ENV_NAME_LEN: usize = 128;
    pub const MAX_ENV_VALUE_LEN: usize = 32 * 1024;
    pub const MAX_ARGS: usize = 256;
    pub const MAX_ARG_LEN: usize = 4096;
    pub const MAX_IMAGE_LEN: usize = 512;
    pub const MAX_PORTS: usize = 16;
    pub const MAX_HOSTS: usize = 32;
    pub const MAX_HEALTH_PATH_LEN: usize = 1024;
    pub const MAX_CONSTRAINTS: usize = 32;
    pub const MAX_CONSTRAINT_LEN: usize = 256;
    pub const MAX_SPREAD_TARGETS: usize = 64;
    pub const MAX_ATTRIBUTE_LEN: usize = 128;
    /// Node labels (checked by the scheduler when a node registers).
    pub const MAX_NODE_LABELS: usize = 64;
    pub const MAX_LABEL_KEY_LEN: usize = 128;
    pub const MAX_LABEL_VALUE_LEN: usize = 256;
}
use limits::*;

/// `Debug` shows env names but never their values: they hold credentials,
/// and a spec reaches logs through `{:?}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// A DNS label; the type holds only valid names.
    pub name: crate::AppName,
    /// The project the app belongs to. `None` in a spec that does not say:
    /// the platform puts the app in its deployer's project (or keeps the
    /// one it is in); an app's record always names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<crate::ProjectName>,
    pub replicas: u32,
    pub run: Run,
    pub resources: Resources,
    pub ports: Vec<PortSpec>,
    pub env: BTreeMap<String, String>,
    pub health: HealthSpec,
    pub route: RouteSpec,
    pub update: UpdateSpec,
    /// Where instances may run and how they are spread.
    #[serde(default)]
    pub placement: PlacementSpec,
    /// Replicas follow load within bounds; `None`: `replicas` is fixed.
    #[serde(default)]
    pub autoscale: Option<AutoscaleSpec>,
    /// Rolling restarts asked for (`RestartApp`): part of the template, so
    /// each one replaces every instance. The platform's, never a spec
    /// file's: a deploy keeps the count the app has.
    #[serde(default)]
    pub restarts: u32,
}

/// `[autoscale]`: the autoscaler keeps the replica count within
/// `[min, max]`, following whichever target asks for the most instances
/// (Kubernetes HPA's ratio rule), with cooldowns and a scale-down
/// stabilisation window. With `min = 0` and `scale_to_zero_after`, an app
/// with no requests for that long goes to zero replicas and the edge proxy
/// wakes it on the next request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleSpec {
    pub min: u32,
    pub max: u32,
    pub target_cpu_percent: Option<u32>,
    pub target_rps_per_instance: Option<u32>,
    pub target_p95_ms: Option<u32>,
    pub scale_up_cooldown: Duration,
    pub scale_down_cooldown: Duration,
    pub stabilization: Duration,
    pub scale_to_zero_after: Option<Duration>,
}

impl Eq for AutoscaleSpec {}

impl AutoscaleSpec {
    pub const DEFAULT_SCALE_UP_COOLDOWN: Duration = Duration::from_secs(15);
    pub const DEFAULT_SCALE_DOWN_COOLDOWN: Duration = Duration::from_secs(120);
    pub const DEFAULT_STABILIZATION: Duration = Duration::from_secs(60);

    /// `replicas` kept within `[min, max]`, and at least one unless the
    /// app may scale to zero.
    pub fn clamp(&self, replicas: u32) -> u32 {
        replicas.clamp(self.min, self.max.max(self.min))
    }

    fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if self.max == 0 || self.max > MAX_REPLICAS {
            bad(
                "autoscale.max",
                format!("must be between 1 and {MAX_REPLICAS}, got {}", self.max),
            );
        }
        if self.min > self.max {
            bad(
                "autoscale.min",
                format!(
                    "must be at most autoscale.max ({}), got {}",
                    self.max, self.min
                ),
            );
        }
        if self.target_cpu_percent.is_none()
            && self.target_rps_per_instance.is_none()
            && self.target_p95_ms.is_none()
        {
            bad(
                "autoscale",
                "set at least one target: target_cpu_percent, target_rps_per_instance or target_p95_ms".into(),
            );
        }
        for (field, value, range) in [
            (
                "autoscale.target_cpu_percent",
                self.target_cpu_percent,
                1..=1000,
            ),
            (
                "autoscale.target_rps_per_instance",
                self.target_rps_per_instance,
                1..=1_000_000,
            ),
            ("autoscale.target_p95_ms", self.target_p95_ms, 1..=600_000),
        ] {
            if let Some(value) = value
                && !range.contains(&value)
            {
                bad(
                    field,
                    format!(
                        "must be between {} and {}, got {value}",
                        range.start(),
                        range.end()
                    ),
                );
            }
        }
        for (field, value) in [
            ("autoscale.scale_up_cooldown", self.scale_up_cooldown),
            ("autoscale.scale_down_cooldown", self.scale_down_cooldown),
            ("autoscale.stabilization", self.stabilization),
        ] {
            if value > Duration::from_secs(3600) {
                bad(field, "must be at most 1h".into());
            }
        }
        match (self.min, self.scale_to_zero_after) {
            (0, None) => bad(
                "autoscale.min",
                "0 needs `scale_to_zero_after` (10s to 24h): how long without requests before the app goes to zero".into(),
            ),
            (0, Some(after)) if after < Duration::from_secs(10) || after > Duration::from_secs(86_400) => bad(
                "autoscale.scale_to_zero_after",
                "must be between 10s and 24h".into(),
            ),
            (min, Some(_)) if min > 0 => bad(
                "autoscale.scale_to_zero_after",
                format!("only with min = 0 (min is {min})"),
            ),
            _ => {}
        }
    }
}

pub use capstan_placement::{Constraint, Strategy};

/// Placement preferences and rules, checked by the scheduler's engine.
/// Parsed once where the spec enters (file or wire); stored as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementSpec {
    /// None takes the cluster's default (or spread, with `spread_by`).
    #[serde(with = "strategy_text")]
    pub strategy: Option<Strategy>,
    /// Rules every node must meet, like `zone == eu`.
    #[serde(with = "constraints_text")]
    pub constraints: Vec<Constraint>,
    /// At most one instance per node.
    pub distinct_hosts: bool,
    /// With strategy spread: spread across this node attribute instead of
    /// across nodes.
    pub spread_by: Option<String>,
    /// Percent of instances per value of `spread_by`.
    pub spread_targets: BTreeMap<String, u32>,
    /// Prefer nodes that do not already run an instance of the app.
    pub anti_affinity: bool,
}

impl std::fmt::Debug for AppSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: BTreeMap<&str, &str> = self
            .env
            .keys()
            .map(|k| (k.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("AppSpec")
            .field("name", &self.name)
            .field("replicas", &self.replicas)
            .field("run", &self.run)
            .field("resources", &self.resources)
            .field("ports", &self.ports)
            .field("env", &env)
            .field("health", &self.health)
            .field("route", &self.route)
            .field("update", &self.update)
            .field("placement", &self.placement)
            .field("autoscale", &self.autoscale)
            .finish()
    }
}

/// Reports `count` items over `max` at `field`.
fn too_many(bad: &mut impl FnMut(&str, String), field: &str, count: usize, max: usize) {
    if count > max {
        bad(field, format!("at most {max} allowed, got {count}"));
    }
}

/// Reports a string longer than `max` bytes at `field`.
fn too_long(bad: &mut impl FnMut(&str, String), field: &str, text: &str, max: usize) -> bool {
    if text.len() > max {
        bad(
            field,
            format!("at most {max} bytes allowed, got {}", text.len()),
        );
        true
    } else {
        false
    }
}

impl Default for PlacementSpec {
    fn default() -> Self {
        PlacementSpec {
            strategy: None,
            constraints: Vec::new(),
            distinct_hosts: false,
            spread_by: None,
            spread_targets: BTreeMap::new(),
            anti_affinity: true,
        }
    }
}

impl PlacementSpec {
    pub fn is_default(&self) -> bool {
        *self == PlacementSpec::default()
    }

    /// The strategy in force: the spec's, else spread when spreading by an
    /// attribute, else the cluster's `default`.
    pub fn strategy_or(&self, default: Strategy) -> Strategy {
        match self.strategy {
            Some(strategy) => strategy,
            None if self.spread_by.is_some() => Strategy::Spread,
            None => default,
        }
    }
}

/// Parses placement text wherever it enters (a spec file, the wire),
/// naming `{field}.strategy` and `{field}.constraints[i]` in its errors.
/// Lengths are capped before anything is compiled.
pub fn parse_placement_rules(
    field: &str,
    strategy: Option<&str>,
    constraints: &[String],
    errors: &mut Vec<FieldError>,
) -> (Option<Strategy>, Vec<Constraint>) {
    let strategy = strategy.and_then(|text| {
        Strategy::parse(text)
            .map_err(|reason| errors.push(FieldError::new(format!("{field}.strategy"), reason)))
            .ok()
    });
    if constraints.len() > MAX_CONSTRAINTS {
        errors.push(FieldError::new(
            format!("{field}.constraints"),
            format!(
                "at most {MAX_CONSTRAINTS} allowed, got {}",
                constraints.len()
            ),
        ));
        return (strategy, Vec::new());
    }
    let mut parsed = Vec::new();
    for (i, text) in constraints.iter().enumerate() {
        let at = format!("{field}.constraints[{i}]");
        if text.len() > MAX_CONSTRAINT_LEN {
            errors.push(FieldError::new(
                at,
                format!(
                    "at most {MAX_CONSTRAINT_LEN} bytes allowed, got {}",
                    text.len()
                ),
            ));
            continue;
        }
        match Constraint::parse(text) {
            Ok(constraint) => parsed.push(constraint),
            Err(reason) => errors.push(FieldError::new(at, reason)),
        }
    }
    (strategy, parsed)
}

/// `strategy` is stored and sent by name.
mod strategy_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Strategy;

    pub fn serialize<S: Serializer>(value: &Option<Strategy>, s: S) -> Result<S::Ok, S::Error> {
        value.map(Strategy::name).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Strategy>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| Strategy::parse(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Constraints are stored and sent as their canonical text.
mod constraints_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Constraint;

    pub fn serialize<S: Serializer>(value: &[Constraint], s: S) -> Result<S::Ok, S::Error> {
        value
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Constraint>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|text| Constraint::parse(text).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// What an instance runs: a process or a container image, decided once
/// where the spec enters. Stored and hashed in the [`RunSpec`] shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RunSpec", into = "RunSpec")]
pub enum Run {
    /// argv; `${PORT}` becomes the assigned port.
    Process {
        command: Vec<String>,
    },
    Image {
        image: String,
        args: Vec<String>,
    },
}

/// The stored and wire shape of [`Run`]: exactly one of `command` and
/// `image` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RunSpec {
    pub command: Vec<String>,
    pub image: Option<String>,
    pub args: Vec<String>,
}

impl TryFrom<RunSpec> for Run {
    type Error = FieldError;

    fn try_from(run: RunSpec) -> Result<Run, FieldError> {
        match (run.image, run.command.is_empty()) {
            (Some(_), false) => Err(FieldError::new(
                "run",
                "set exactly one of `command` and `image`, not both",
            )),
            (None, true) => Err(FieldError::new(
                "run",
                "set exactly one of `command` (a process) or `image` (a container)",
            )),
            (Some(image), true) => Ok(Run::Image {
                image,
                args: run.args,
            }),
            (None, false) if !run.args.is_empty() => Err(FieldError::new(
                "run.args",
                "only for image apps; put arguments in `command`",
            )),
            (None, false) => Ok(Run::Process {
                command: run.command,
            }),
        }
    }
}

impl Run {
    /// Parses the run section, recording a problem in `errors` and answering
    /// with a stand-in of the kind it aimed at: the rest of the spec is still
    /// validated, so a user sees every problem at once.
    pub fn parse_into(run: RunSpec, errors: &mut Vec<FieldError>) -> Run {
        let image_like = run.image.is_some();
        Run::try_from(run).unwrap_or_else(|error| {
            errors.push(error);
            if image_like {
                Run::Image {
                    image: "stand-in".into(),
                    args: Vec::new(),
                }
            } else {
                Run::Process {
                    command: vec!["stand-in".into()],
                }
            }
        })
    }
}

/// Parses an app name, recording a problem in `errors` and answering with a
/// stand-in, so the rest of the spec is still validated.
pub fn parse_app_name(text: &str, errors: &mut Vec<FieldError>) -> crate::AppName {
    crate::AppName::parse("name", text).unwrap_or_else(|error| {
        if let Error::Invalid(found) = error {
            errors.extend(found);
        }
        crate::AppName::parse("name", "stand-in").expect("`stand-in` is a DNS label")
    })
}

/// An optional project name (empty: not said), reporting a bad one.
pub fn parse_project(text: &str, errors: &mut Vec<FieldError>) -> Option<crate::ProjectName> {
    if text.is_empty() {
        return None;
    }
    match crate::ProjectName::parse("project", text) {
        Ok(project) => Some(project),
        Err(error) => {
            if let Error::Invalid(found) = error {
                errors.extend(found);
            }
            None
        }
    }
}

/// The project of everything made before projects, and of what names none.
pub const DEFAULT_PROJECT: &str = "default";

impl AppSpec {
    /// The project this spec's app is in ([`DEFAULT_PROJECT`] when unsaid).
    pub fn project_name(&self) -> &str {
        self.project.as_deref().unwrap_or(DEFAULT_PROJECT)
    }

    /// Validates a spec built from parts that already reported `errors`,
    /// and answers with all of them at once.
    pub fn checked(self, mut errors: Vec<FieldError>) -> Result<AppSpec, Error> {
        if let Err(Error::Invalid(more)) = self.validate() {
            errors.extend(more);
        }
        if errors.is_empty() {
            Ok(self)
        } else {
            Err(Error::Invalid(errors))
        }
    }
}

impl From<Run> for RunSpec {
    fn from(run: Run) -> RunSpec {
        match run {
            Run::Process { command } => RunSpec {
                command,
                image: None,
                args: Vec::new(),
            },
            Run::Image { image, args } => RunSpec {
                command: Vec::new(),
                image: Some(image),
                args,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u32,
    pub memory_mb: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millis: 100,
            memory_mb: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub name: String,
    /// Set for image apps only; process apps are given `$PORT`.
    pub container_port: Option<u16>,
    /// A fixed port on the node instead of an assigned one (first port
    /// only). Two instances never share it on one node.
    #[serde(default)]
    pub host_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthCheck {
    Http { path: String },
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            check: HealthCheck::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            unhealthy_after: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RouteSpec {
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateSpec {
    pub max_surge: u32,
    pub max_unavailable: u32,
    /// A rollout with no new healthy instance for this long fails.
    pub progress_deadline: Duration,
}

impl Default for UpdateSpec {
    fn default() -> Self {
        UpdateSpec {
            max_surge: 1,
            max_unavailable: 0,
            progress_deadline: Duration::from_secs(60),
        }
    }
}

/// The formats a spec file may use, chosen by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    Toml,
    Yaml,
}

impl SpecFormat {
    pub fn from_path(path: &str) -> Result<SpecFormat, Error> {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".toml") {
            Ok(SpecFormat::Toml)
        } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            Ok(SpecFormat::Yaml)
        } else {
            Err(Error::invalid(
                "file",
                format!("`{path}` must end in .toml, .yaml or .yml"),
            ))
        }
    }
}

impl AppSpec {
    /// Parses and validates a spec document.
    pub fn parse(text: &str, format: SpecFormat) -> Result<AppSpec, Error> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(Error::invalid(
                "spec",
                format!("at most {MAX_SPEC_BYTES} bytes allowed, got {}", text.len()),
            ));
        }
        let file: SpecFile = match format {
            SpecFormat::Toml => {
                let deserializer = toml::Deserializer::parse(text).map_err(|e| {
                    Error::invalid("spec", format!("not valid TOML: {}", e.message()))
                })?;
                serde_path_to_error::deserialize(deserializer).map_err(path_error)?
            }
            SpecFormat::Yaml => {
                let deserializer = serde_yaml::Deserializer::from_str(text);
                serde_path_to_error::deserialize(deserializer).map_err(path_error)?
            }
        };
        let (spec, errors) = file.into_spec()?;
        spec.checked(errors)
    }

    /// Checks every rule and reports every violation.
    pub fn validate(&self) -> Result<(), Error> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, reason: String| errors.push(FieldError::new(field, reason));

        too_many(&mut bad, "env", self.env.len(), MAX_ENV_VARS);
        for (key, value) in &self.env {
            too_long(
                &mut bad,
                &format!("env.{}", crate::id::shorten(key)),
                key,
                MAX_ENV_NAME_LEN,
            );
            too_long(
                &mut bad,
                &format!("env.{}", crate::id::shorten(key)),
                value,
                MAX_ENV_VALUE_LEN,
            );
        }
        too_many(&mut bad, "ports", self.ports.len(), MAX_PORTS);
        too_many(&mut bad, "route.hosts", self.route.hosts.len(), MAX_HOSTS);
        if let HealthCheck::Http { path } = &self.health.check {
            too_long(&mut bad, "health.http_path", path, MAX_HEALTH_PATH_LEN);
        }
        let placement = &self.placement;
        too_many(
            &mut bad,
            "placement.spread_targets",
            placement.spread_targets.len(),
            MAX_SPREAD_TARGETS,
        );
        if let Some(attribute) = &placement.spread_by {
            too_long(
                &mut bad,
                "placement.spread_by",
                attribute,
                MAX_ATTRIBUTE_LEN,
            );
        }
        if self.replicas > MAX_REPLICAS {
            bad(
                "replicas",
                format!(
                    "must be between 0 and {MAX_REPLICAS}, got {}",
                    self.replicas
                ),
            );
        }

        let (is_image, argv): (bool, Vec<(&str, &[String])>) = match &self.run {
            Run::Image { image, args } => {
                if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
                    bad(
                        "run.image",
                        "must be an image reference like `name:tag`".into(),
                    );
                }
                too_long(&mut bad, "run.image", image, MAX_IMAGE_LEN);
                (true, vec![("run.args", args.as_slice())])
            }
            Run::Process { command } => {
                if command
                    .first()
                    .is_none_or(|program| program.trim().is_empty())
                {
                    bad("run.command[0]", "must name the program to run".into());
                }
                (false, vec![("run.command", command.as_slice())])
            }
        };
        for (field, list) in argv {
            too_many(&mut bad, field, list.len(), MAX_ARGS);
            for (i, arg) in list.iter().enumerate() {
                too_long(&mut bad, &format!("{field}[{i}]"), arg, MAX_ARG_LEN);
                if arg.contains('\0') {
                    bad(
                        &format!("{field}[{i}]"),
                        "must not contain a NUL byte".into(),
                    );
                }
            }
        }

        if !(1..=256_000).contains(&self.resources.cpu_millis) {
            bad(
                "resources.cpu_millis",
                format!(
                    "must be between 1 and 256000, got {}",
                    self.resources.cpu_millis
                ),
            );
        }
        if !(4..=1_048_576).contains(&self.resources.memory_mb) {
            bad(
                "resources.memory_mb",
                format!(
                    "must be between 4 and 1048576, got {}",
                    self.resources.memory_mb
                ),
            );
        }

        let mut port_names = BTreeSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            if let Err(reason) = check_dns_label(&port.name) {
                bad(&format!("ports[{i}].name"), reason);
            }
            if !port_names.insert(port.name.as_str()) {
                bad(
                    &format!("ports[{i}].name"),
                    format!("duplicate port name `{}`", port.name),
                );
            }
            match (is_image, port.container_port) {
                (true, None) => bad(
                    &format!("ports[{i}].container_port"),
                    "required for image apps".into(),
                ),
                (true, Some(0)) => bad(
                    &format!("ports[{i}].container_port"),
                    "must be between 1 and 65535".into(),
                ),
                (false, Some(_)) => bad(
                    &format!("ports[{i}].container_port"),
                    "only for image apps; process apps listen on $PORT".into(),
                ),
                _ => {}
            }
        }
        if is_image && self.ports.is_empty() && !self.route.hosts.is_empty() {
            bad(
                "ports",
                "an image app with route hosts needs a port with `container_port`".into(),
            );
        }

        for key in self.env.keys() {
            if !is_env_name(key) {
                bad(
                    &format!("env.{key}"),
                    "must be a name like `GREETING` (letters, digits, _)".into(),
                );
            } else if key == "PORT" {
                bad(
                    "env.PORT",
                    "is reserved: Capstan sets it to the assigned port".into(),
                );
            } else if key.starts_with("CAPSTAN_") {
                bad(
                    &format!("env.{key}"),
                    "is reserved: Capstan sets CAPSTAN_* variables (CAPSTAN_HOST_IP, CAPSTAN_ADDR, ...)"
                        .into(),
                );
            }
        }
        for (key, value) in &self.env {
            if value.contains('\0') {
                bad(&format!("env.{key}"), "must not contain a NUL byte".into());
            }
        }

        let health = &self.health;
        if let HealthCheck::Http { path } = &health.check
            && (!path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            bad(
                "health.http_path",
                "must be a path starting with `/`, without spaces".into(),
            );
        }
        if health.interval < MIN_HEALTH_INTERVAL || health.interval > Duration::from_secs(3600) {
            bad("health.interval", "must be between 100ms and 1h".into());
        }
        if health.timeout < Duration::from_millis(10) || health.timeout > health.interval {
            bad(
                "health.timeout",
                "must be at least 10ms and at most `health.interval`".into(),
            );
        }
        if !(1..=100).contains(&health.unhealthy_after) {
            bad(
                "health.unhealthy_after",
                format!("must be between 1 and 100, got {}", health.unhealthy_after),
            );
        }

        let mut hosts = BTreeSet::new();
        for (i, host) in self.route.hosts.iter().enumerate() {
            if let Err(reason) = check_hostname(host) {
                bad(&format!("route.hosts[{i}]"), reason);
            }
            if !hosts.insert(host.to_ascii_lowercase()) {
                bad(
                    &format!("route.hosts[{i}]"),
                    format!("duplicate host `{host}`"),
                );
            }
        }

        let update = &self.update;
        if update.max_surge == 0 && update.max_unavailable == 0 {
            bad(
                "update.max_surge",
                "max_surge and max_unavailable cannot both be 0: no rollout could progress".into(),
            );
        }
        if update.max_surge > MAX_REPLICAS {
            bad(
                "update.max_surge",
                format!("must be at most {MAX_REPLICAS}"),
            );
        }
        if update.progress_deadline < Duration::from_secs(1)
            || update.progress_deadline > Duration::from_secs(3600)
        {
            bad(
                "update.progress_deadline",
                "must be between 1s and 1h".into(),
            );
        }

        for (i, port) in self.ports.iter().enumerate() {
            match port.host_port {
                Some(0) => bad(
                    &format!("ports[{i}].host_port"),
                    "must be between 1 and 65535".into(),
                ),
                Some(_) if i > 0 => bad(
                    &format!("ports[{i}].host_port"),
                    "only the first port may set a fixed host port".into(),
                ),
                _ => {}
            }
        }

        let placement = &self.placement;
        let spreads = placement.spread_by.is_some() || !placement.spread_targets.is_empty();
        if spreads && !matches!(placement.strategy, None | Some(Strategy::Spread)) {
            bad(
                "placement.spread_by",
                "only with strategy = \"spread\"".into(),
            );
        }
        if let Some(attribute) = &placement.spread_by
            && (attribute.is_empty()
                || !attribute
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)))
        {
            bad(
                "placement.spread_by",
                format!("`{attribute}` is not an attribute name"),
            );
        }
        if !placement.spread_targets.is_empty() && placement.spread_by.is_none() {
            bad(
                "placement.spread_targets",
                "needs `spread_by`: the attribute whose values the targets name".into(),
            );
        }
        // u64: the targets come off the wire, and u32::MAX twice overflows.
        let mut total = 0u64;
        for (value, pct) in &placement.spread_targets {
            if !(1..=100).contains(pct) {
                bad(
                    &format!("placement.spread_targets.{value}"),
                    format!("must be a percentage between 1 and 100, got {pct}"),
                );
            }
            total += u64::from(*pct);
        }
        if total > 100 {
            bad(
                "placement.spread_targets",
                format!("percentages add up to {total}, more than 100"),
            );
        }

        if let Some(autoscale) = &self.autoscale {
            autoscale.validate(&mut bad);
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(errors))
        }
    }

    pub fn is_image(&self) -> bool {
        matches!(self.run, Run::Image { .. })
    }

    /// A line on what this spec changes from `old` (none: a new app), for
    /// the audit log. Env values are never named, only their keys.
    pub fn changes_from(&self, old: Option<&AppSpec>) -> String {
        let Some(old) = old else {
            return format!(
                "created: {} replicas, template {}",
                self.replicas,
                self.template_hash()
            );
        };
        let mut changes = Vec::new();
        if old.replicas != self.replicas {
            changes.push(format!("replicas {} -> {}", old.replicas, self.replicas));
        }
        let env: Vec<&str> = old
            .env
            .keys()
            .chain(self.env.keys())
            .filter(|k| old.env.get(*k) != self.env.get(*k))
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !env.is_empty() {
            changes.push(format!("env {}", env.join(", ")));
        }
        for (name, changed) in [
            ("run", old.run != self.run),
            ("resources", old.resources != self.resources),
            ("ports", old.ports != self.ports),
            ("health", old.health != self.health),
            ("route", old.route != self.route),
            ("update", old.update != self.update),
            ("placement", old.placement != self.placement),
            ("autoscale", old.autoscale != self.autoscale),
        ] {
            if changed {
                changes.push(name.to_string());
            }
        }
        let (from, to) = (old.template_hash(), self.template_hash());
        let template = if from == to {
            "same template".to_string()
        } else {
            format!("template {from} -> {to}")
        };
        if changes.is_empty() {
            format!("unchanged ({template})")
        } else {
            format!("{} ({template})", changes.join("; "))
        }
    }

    /// What in this spec weakens the isolation of the node or of other
    /// apps, each with why: only an admin may deploy it (the admission
    /// policy). A fixed host port below 1024 is a privileged port of the
    /// node's. (Containers never get added capabilities or a writable
    /// root, and every app has CPU and memory limits: no spec can ask.)
    pub fn privileged_fields(&self) -> Vec<FieldError> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, port)| match port.host_port {
                Some(host_port) if host_port < 1024 => Some(FieldError::new(
                    format!("ports[{i}].host_port"),
                    format!(
                        "{host_port} is a privileged port of the node: only an admin may deploy it"
                    ),
                )),
                _ => None,
            })
            .collect()
    }

    /// A digest of what a running instance is made from. Replicas, routes and
    /// update policy are not part of it: changing those restarts nothing.
    pub fn template_hash(&self) -> String {
        #[derive(Serialize)]
        struct Template<'a> {
            run: RunSpec,
            resources: &'a Resources,
            ports: &'a [PortSpec],
            env: &'a BTreeMap<String, String>,
            health: &'a HealthSpec,
            // Changing where an app may run moves its instances; left out
            // when default so that older templates keep their hash.
            #[serde(skip_serializing_if = "PlacementSpec::is_default")]
            placement: &'a PlacementSpec,
            // Left out until the first restart, for the same reason.
            #[serde(skip_serializing_if = "is_zero")]
            restarts: u32,
        }
        let template = Template {
            run: RunSpec::from(self.run.clone()),
            resources: &self.resources,
            ports: &self.ports,
            env: &self.env,
            health: &self.health,
            placement: &self.placement,
            restarts: self.restarts,
        };
        let json = serde_json::to_vec(&template).expect("a spec always serializes");
        let digest = Sha256::digest(json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn path_error<E: std::fmt::Display>(err: serde_path_to_error::Error<E>) -> Error {
    let path = err.path().to_string();
    let field = if path == "." || path.is_empty() {
        "spec".to_string()
    } else {
        path
    };
    // Serde's messages carry a "line N column M" tail for TOML; keep only the reason.
    let reason = err.inner().to_string();
    let reason = reason.lines().last().unwrap_or_default().trim().to_string();
    Error::invalid(field, reason)
}

pub fn check_dns_label(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a DNS label: use 1-63 lowercase letters, digits and `-`, starting and ending with a letter or digit"
        ))
    }
}

fn check_hostname(host: &str) -> Result<(), String> {
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!("`{host}` is not a valid host name"))
    }
}

fn is_env_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The file form: every key optional so that missing ones get defaults, and
/// unknown keys rejected so that typos do not pass silently.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    project: Option<String>,
    #[serde(default = "one")]
    replicas: u32,
    run: Option<RunFile>,
    #[serde(default)]
    resources: ResourcesFile,
    #[serde(default)]
    ports: Vec<PortFile>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    health: Option<HealthFile>,
    #[serde(default)]
    route: RouteFile,
    #[serde(default)]
    update: UpdateFile,
    #[serde(default)]
    placement: PlacementFile,
    autoscale: Option<AutoscaleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoscaleFile {
    min: Option<u32>,
    max: u32,
    target_cpu_percent: Option<u32>,
    target_rps_per_instance: Option<u32>,
    target_p95_ms: Option<u32>,
    scale_up_cooldown: Option<String>,
    scale_down_cooldown: Option<String>,
    stabilization: Option<String>,
    scale_to_zero_after: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlacementFile {
    strategy: Option<String>,
    #[serde(default)]
    constraints: Vec<String>,
    #[serde(default)]
    distinct_hosts: bool,
    spread: Option<SpreadFile>,
    anti_affinity: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpreadFile {
    attribute: String,
    #[serde(default)]
    targets: BTreeMap<String, u32>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunFile {
    #[serde(default)]
    command: Vec<String>,
    image: Option<String>,
    #[serde(default)]
    args: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    cpu_millis: Option<u32>,
    memory_mb: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortFile {
    name: String,
    container_port: Option<u16>,
    host_port: Option<u16>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    http_path: Option<String>,
    tcp: Option<bool>,
    interval: Option<String>,
    timeout: Option<String>,
    unhealthy_after: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    #[serde(default)]
    hosts: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UpdateFile {
    max_surge: Option<u32>,
    max_unavailable: Option<u32>,
    progress_deadline: Option<String>,
}

impl SpecFile {
    /// The spec, and the problems found while building it (reported with
    /// the validation's).
    fn into_spec(self) -> Result<(AppSpec, Vec<FieldError>), Error> {
        let mut errors = Vec::new();
        let Some(run) = self.run else {
            return Err(Error::invalid(
                "run",
                "missing: add a [run] table with `command` or `image`",
            ));
        };
        let defaults = HealthSpec::default();
        fn duration_field(
            errors: &mut Vec<FieldError>,
            field: &str,
            value: Option<String>,
            default: Duration,
        ) -> Duration {
            match value {
                None => default,
                Some(text) => duration::parse(&text).unwrap_or_else(|reason| {
                    errors.push(FieldError::new(field, reason));
                    default
                }),
            }
        }
        let health = match self.health {
            None => defaults,
            Some(file) => {
                let check = match (file.http_path, file.tcp) {
                    (Some(_), Some(true)) => {
                        errors.push(FieldError::new(
                            "health",
                            "set `http_path` or `tcp = true`, not both",
                        ));
                        HealthCheck::Tcp
                    }
                    (Some(path), _) => HealthCheck::Http { path },
                    (None, Some(false)) => {
                        errors.push(FieldError::new(
                            "health.tcp",
                            "set `http_path`, or `tcp = true`",
                        ));
                        HealthCheck::Tcp
                    }
                    (None, _) => HealthCheck::Tcp,
                };
                HealthSpec {
                    check,
                    interval: duration_field(
                        &mut errors,
                        "health.interval",
                        file.interval,
                        defaults.interval,
                    ),
                    timeout: duration_field(
                        &mut errors,
                        "health.timeout",
                        file.timeout,
                        defaults.timeout,
                    ),
                    unhealthy_after: file.unhealthy_after.unwrap_or(defaults.unhealthy_after),
                }
            }
        };
        let update_defaults = UpdateSpec::default();
        let update = UpdateSpec {
            max_surge: self.update.max_surge.unwrap_or(update_defaults.max_surge),
            max_unavailable: self
                .update
                .max_unavailable
                .unwrap_or(update_defaults.max_unavailable),
            progress_deadline: duration_field(
                &mut errors,
                "update.progress_deadline",
                self.update.progress_deadline,
                update_defaults.progress_deadline,
            ),
        };
        let run = Run::parse_into(
            RunSpec {
                command: run.command,
                image: run.image,
                args: run.args,
            },
            &mut errors,
        );
        let (strategy, constraints) = parse_placement_rules(
            "placement",
            self.placement.strategy.as_deref(),
            &self.placement.constraints,
            &mut errors,
        );
        let autoscale = self.autoscale.map(|file| AutoscaleSpec {
            min: file.min.unwrap_or(1),
            max: file.max,
            target_cpu_percent: file.target_cpu_percent,
            target_rps_per_instance: file.target_rps_per_instance,
            target_p95_ms: file.target_p95_ms,
            scale_up_cooldown: duration_field(
                &mut errors,
                "autoscale.scale_up_cooldown",
                file.scale_up_cooldown,
                AutoscaleSpec::DEFAULT_SCALE_UP_COOLDOWN,
            ),
            scale_down_cooldown: duration_field(
                &mut errors,
                "autoscale.scale_down_cooldown",
                file.scale_down_cooldown,
                AutoscaleSpec::DEFAULT_SCALE_DOWN_COOLDOWN,
            ),
            stabilization: duration_field(
                &mut errors,
                "autoscale.stabilization",
                file.stabilization,
                AutoscaleSpec::DEFAULT_STABILIZATION,
            ),
            scale_to_zero_after: file.scale_to_zero_after.map(|text| {
                duration::parse(&text).unwrap_or_else(|reason| {
                    errors.push(FieldError::new("autoscale.scale_to_zero_after", reason));
                    Duration::from_secs(300)
                })
            }),
        });
        let resource_defaults = Resources::default();
        let spec = AppSpec {
            name: parse_app_name(&self.name, &mut errors),
            project: parse_project(self.project.as_deref().unwrap_or_default(), &mut errors),
            replicas: self.replicas,
            run,
            resources: Resources {
                cpu_millis: self
                    .resources
                    .cpu_millis
                    .unwrap_or(resource_defaults.cpu_millis),
                memory_mb: self
                    .resources
                    .memory_mb
                    .unwrap_or(resource_defaults.memory_mb),
            },
            ports: self
                .ports
                .into_iter()
                .map(|p| PortSpec {
                    name: p.name,
                    container_port: p.container_port,
                    host_port: p.host_port,
                })
                .collect(),
            env: self.env,
            health,
            route: RouteSpec {
                hosts: self.route.hosts,
            },
            update,
            placement: PlacementSpec {
                strategy,
                constraints,
                distinct_hosts: self.placement.distinct_hosts,
                spread_by: self.placement.spread.as_ref().map(|s| s.attribute.clone()),
                spread_targets: self.placement.spread.map(|s| s.targets).unwrap_or_default(),
                anti_affinity: self.placement.anti_affinity.unwrap_or(true),
            },
            autoscale,
            restarts: 0,
        };
        Ok((spec, errors))
    }
}

#[cfg(test)]
mod tests;
