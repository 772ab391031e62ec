//! Wire <-> domain conversions. A wire spec with zero durations or resources
//! takes the defaults, like a spec file that leaves those keys out.

use std::time::Duration;

use capstan_types::spec::{
    AutoscaleSpec, HealthCheck, HealthSpec, PlacementSpec, PortSpec, Resources, RouteSpec, Run,
    RunSpec, UpdateSpec,
};
use capstan_types::{AppSpec, Error, Event, EventKind, FieldError, InstanceState};

use crate::v1;

pub fn spec_from_wire(wire: v1::AppSpec) -> Result<AppSpec, Error> {
    let run = wire.run.unwrap_or_default();
    let resources = wire.resources.unwrap_or_default();
    let default_resources = Resources::default();
    let default_health = HealthSpec::default();
    let health = match wire.health {
        None => default_health,
        Some(h) => {
            if !h.http_path.is_empty() && h.tcp {
                return Err(Error::invalid(
                    "health",
                    "set `http_path` or `tcp`, not both",
                ));
            }
            HealthSpec {
                check: if h.http_path.is_empty() {
                    HealthCheck::Tcp
                } else {
                    HealthCheck::Http { path: h.http_path }
                },
                interval: millis_or(h.interval_ms, default_health.interval),
                timeout: millis_or(h.timeout_ms, default_health.timeout),
                unhealthy_after: if h.unhealthy_after == 0 {
                    default_health.unhealthy_after
                } else {
                    h.unhealthy_after
                },
            }
        }
    };
    let default_update = UpdateSpec::default();
    let update = match wire.update {
        None => default_update,
        Some(u) => UpdateSpec {
            max_surge: u.max_surge,
            max_unavailable: u.max_unavailable,
            progress_deadline: millis_or(u.progress_deadline_ms, default_update.progress_deadline),
        },
    };
    let mut ports = Vec::with_capacity(wire.ports.len());
    for (i, port) in wire.ports.into_iter().enumerate() {
        // 0 is proto3's "unset".
        let optional_port = |value: u32, field: &str| match value {
            0 => Ok(None),
            p => u16::try_from(p).map(Some).map_err(|_| {
                Error::invalid(format!("ports[{i}].{field}"), "must be between 1 and 65535")
            }),
        };
        ports.push(PortSpec {
            container_port: optional_port(port.container_port, "container_port")?,
            host_port: optional_port(port.host_port, "host_port")?,
            name: port.name,
        });
    }
    let mut errors = Vec::new();
    let run = Run::parse_into(
        RunSpec {
            command: run.command,
            image: if run.image.is_empty() {
                None
            } else {
                Some(run.image)
            },
            args: run.args,
        },
        &mut errors,
    );
    let spec = AppSpec {
        name: capstan_types::spec::parse_app_name(&wire.name, &mut errors),
        project: capstan_types::spec::parse_project(&wire.project, &mut errors),
        replicas: wire.replicas,
        run,
        resources: Resources {
            cpu_millis: nonzero_or(resources.cpu_millis, default_resources.cpu_millis),
            memory_mb: nonzero_or(resources.memory_mb, default_resources.memory_mb),
        },
        ports,
        env: wire.env.into_iter().collect(),
        health,
        route: RouteSpec {
            hosts: wire.route.map(|r| r.hosts).unwrap_or_default(),
        },
        update,
        placement: placement_parts(wire.placement.unwrap_or_default(), &mut errors),
        autoscale: wire.autoscale.map(autoscale_from_wire),
        restarts: wire.restarts,
    };
    spec.checked(errors)
}

/// Zero targets are unset; zero durations take the defaults.
fn autoscale_from_wire(wire: v1::AutoscaleSpec) -> AutoscaleSpec {
    let target = |value: u32| (value > 0).then_some(value);
    AutoscaleSpec {
        min: wire.min,
        max: wire.max,
        target_cpu_percent: target(wire.target_cpu_percent),
        target_rps_per_instance: target(wire.target_rps_per_instance),
        target_p95_ms: target(wire.target_p95_ms),
        scale_up_cooldown: millis_or(
            wire.scale_up_cooldown_ms,
            AutoscaleSpec::DEFAULT_SCALE_UP_COOLDOWN,
        ),
        scale_down_cooldown: millis_or(
            wire.scale_down_cooldown_ms,
            AutoscaleSpec::DEFAULT_SCALE_DOWN_COOLDOWN,
        ),
        stabilization: millis_or(wire.stabilization_ms, AutoscaleSpec::DEFAULT_STABILIZATION),
        scale_to_zero_after: (wire.scale_to_zero_after_ms > 0)
            .then(|| Duration::from_millis(wire.scale_to_zero_after_ms)),
    }
}

fn autoscale_to_wire(spec: &AutoscaleSpec) -> v1::AutoscaleSpec {
    v1::AutoscaleSpec {
        min: spec.min,
        max: spec.max,
        target_cpu_percent: spec.target_cpu_percent.unwrap_or(0),
        target_rps_per_instance: spec.target_rps_per_instance.unwrap_or(0),
        target_p95_ms: spec.target_p95_ms.unwrap_or(0),
        scale_up_cooldown_ms: millis(spec.scale_up_cooldown),
        scale_down_cooldown_ms: millis(spec.scale_down_cooldown),
        stabilization_ms: millis(spec.stabilization),
        scale_to_zero_after_ms: spec.scale_to_zero_after.map_or(0, millis),
    }
}

/// Parses the placement rules once, naming `placement.*` fields in errors.
pub fn placement_from_wire(wire: v1::PlacementSpec) -> Result<PlacementSpec, Error> {
    let mut errors = Vec::new();
    let placement = placement_parts(wire, &mut errors);
    if errors.is_empty() {
        Ok(placement)
    } else {
        Err(Error::Invalid(errors))
    }
}

/// The placement rules that parse; what does not lands in `errors`.
fn placement_parts(wire: v1::PlacementSpec, errors: &mut Vec<FieldError>) -> PlacementSpec {
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    let strategy_text = non_empty(wire.strategy);
    let (strategy, constraints) = capstan_types::spec::parse_placement_rules(
        "placement",
        strategy_text.as_deref(),
        &wire.constraints,
        errors,
    );
    PlacementSpec {
        strategy,
        constraints,
        distinct_hosts: wire.distinct_hosts,
        spread_by: non_empty(wire.spread_by),
        spread_targets: wire.spread_targets.into_iter().collect(),
        anti_affinity: !wire.no_anti_affinity,
    }
}

pub fn placement_to_wire(placement: &PlacementSpec) -> v1::PlacementSpec {
    v1::PlacementSpec {
        strategy: placement
            .strategy
            .map(|s| s.name().to_string())
            .unwrap_or_default(),
        constraints: placement
            .constraints
            .iter()
            .map(ToString::to_string)
            .collect(),
        distinct_hosts: placement.distinct_hosts,
        spread_by: placement.spread_by.clone().unwrap_or_default(),
        spread_targets: placement.spread_targets.clone().into_iter().collect(),
        no_anti_affinity: !placement.anti_affinity,
    }
}

pub fn spec_to_wire(spec: &AppSpec) -> v1::AppSpec {
    v1::AppSpec {
        name: spec.name.to_string(),
        replicas: spec.replicas,
        run: Some({
            let run = RunSpec::from(spec.run.clone());
            v1::RunSpec {
                command: run.command,
                image: run.image.unwrap_or_default(),
                args: run.args,
            }
        }),
        resources: Some(v1::Resources {
            cpu_millis: spec.resources.cpu_millis,
            memory_mb: spec.resources.memory_mb,
        }),
        ports: spec
            .ports
            .iter()
            .map(|p| v1::PortSpec {
                name: p.name.clone(),
                container_port: p.container_port.map_or(0, u32::from),
                host_port: p.host_port.map_or(0, u32::from),
            })
            .collect(),
        env: spec.env.clone().into_iter().collect(),
        health: Some(v1::HealthSpec {
            http_path: match &spec.health.check {
                HealthCheck::Http { path } => path.clone(),
                HealthCheck::Tcp => String::new(),
            },
            tcp: spec.health.check == HealthCheck::Tcp,
            interval_ms: millis(spec.health.interval),
            timeout_ms: millis(spec.health.timeout),
            unhealthy_after: spec.health.unhealthy_after,
        }),
        route: Some(v1::RouteSpec {
            hosts: spec.route.hosts.clone(),
        }),
        update: Some(v1::UpdateSpec {
            max_surge: spec.update.max_surge,
            max_unavailable: spec.update.max_unavailable,
            progress_deadline_ms: millis(spec.update.progress_deadline),
        }),
        placement: Some(placement_to_wire(&spec.placement)),
        autoscale: spec.autoscale.as_ref().map(autoscale_to_wire),
        restarts: spec.restarts,
        project: spec.project.as_ref().map(String::from).unwrap_or_default(),
    }
}

pub fn resources_from_wire(wire: Option<v1::Resources>) -> Resources {
    let wire = wire.unwrap_or_default();
    Resources {
        cpu_millis: wire.cpu_millis,
        memory_mb: wire.memory_mb,
    }
}

pub fn resources_to_wire(resources: Resources) -> v1::Resources {
    v1::Resources {
        cpu_millis: resources.cpu_millis,
        memory_mb: resources.memory_mb,
    }
}

pub fn state_to_wire(state: InstanceState) -> v1::InstanceState {
    match state {
        InstanceState::Pending => v1::InstanceState::Pending,
        InstanceState::Starting => v1::InstanceState::Starting,
        InstanceState::Healthy => v1::InstanceState::Healthy,
        InstanceState::Unhealthy => v1::InstanceState::Unhealthy,
        InstanceState::Stopping => v1::InstanceState::Stopping,
        InstanceState::Stopped => v1::InstanceState::Stopped,
        InstanceState::Failed => v1::InstanceState::Failed,
        InstanceState::Lost => v1::InstanceState::Lost,
    }
}

pub fn state_from_wire(state: i32) -> Option<InstanceState> {
    Some(match v1::InstanceState::try_from(state).ok()? {
        v1::InstanceState::Unspecified => return None,
        v1::InstanceState::Pending => InstanceState::Pending,
        v1::InstanceState::Starting => InstanceState::Starting,
        v1::InstanceState::Healthy => InstanceState::Healthy,
        v1::InstanceState::Unhealthy => InstanceState::Unhealthy,
        v1::InstanceState::Stopping => InstanceState::Stopping,
        v1::InstanceState::Stopped => InstanceState::Stopped,
        v1::InstanceState::Failed => InstanceState::Failed,
        v1::InstanceState::Lost => InstanceState::Lost,
    })
}

pub fn event_to_wire(event: &Event) -> v1::Event {
    v1::Event {
        id: event.id.clone(),
        time_ms: event.time_ms,
        kind: event.kind.as_str().to_string(),
        app: event.app.clone(),
        instance_id: event.instance_id.clone(),
        node_id: event.node_id.clone(),
        message: event.message.clone(),
        actor: event.actor.clone(),
        actor_role: event.actor_role.clone(),
    }
}

pub fn event_from_wire(wire: v1::Event) -> Result<Event, Error> {
    let kind = EventKind::parse(&wire.kind)
        .ok_or_else(|| Error::invalid("event.kind", format!("unknown kind `{}`", wire.kind)))?;
    Ok(Event {
        id: wire.id,
        time_ms: wire.time_ms,
        kind,
        app: wire.app,
        instance_id: wire.instance_id,
        node_id: wire.node_id,
        message: wire.message,
        actor: wire.actor,
        actor_role: wire.actor_role,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn millis_or(ms: u64, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms)
    }
}

fn nonzero_or(value: u32, default: u32) -> u32 {
    if value == 0 { default } else { value }
}

#[cfg(test)]
mod tests {
    use capstan_types::spec::SpecFormat;

    use super::*;

    #[test]
    fn spec_survives_the_wire() {
        let text = "name = \"web\"\nreplicas = 2\n[run]\nimage = \"busybox:latest\"\nargs = [\"httpd\"]\n\
                    [[ports]]\nname = \"http\"\ncontainer_port = 8080\n[health]\nhttp_path = \"/\"\n";
        let spec = AppSpec::parse(text, SpecFormat::Toml).unwrap();
        assert_eq!(spec_from_wire(spec_to_wire(&spec)).unwrap(), spec);
    }

    #[test]
    fn a_bad_constraint_on_the_wire_names_its_field() {
        let wire = v1::PlacementSpec {
            constraints: vec!["zone == eu".into(), "zone ~= eu".into()],
            ..Default::default()
        };
        let error = placement_from_wire(wire).unwrap_err();
        assert!(
            error.to_string().contains("placement.constraints[1]"),
            "{error}"
        );
        let wire = v1::PlacementSpec {
            strategy: "fastest".into(),
            ..Default::default()
        };
        assert!(
            placement_from_wire(wire)
                .unwrap_err()
                .to_string()
                .contains("placement.strategy")
        );
    }

    #[test]
    fn wire_spec_is_validated() {
        let wire = v1::AppSpec {
            name: "Bad Name".into(),
            ..Default::default()
        };
        let err = spec_from_wire(wire).unwrap_err().to_string();
        assert!(err.contains("name:"), "{err}");
        assert!(err.contains("run:"), "{err}");
    }
}
