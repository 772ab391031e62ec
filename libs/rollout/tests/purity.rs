//! The rollout core must stay pure: no async runtime, no network, no disk, no
//! clock. This fails when a dependency outside the allow-list appears in
//! its Cargo.toml.

#[test]
fn cargo_toml_has_only_pure_dependencies() {
    const ALLOWED: &[&str] = &["capstan-types", "serde"];
    let manifest = include_str!("../Cargo.toml");
    let mut section = "";
    let mut found = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[dependencies]" && !line.is_empty() && !line.starts_with('#') {
            let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
            found.push(name.to_string());
        }
        assert!(
            !(section.starts_with("[dependencies.") || section.starts_with("[target")),
            "dependencies must be listed in [dependencies] only, found {section}"
        );
    }
    for name in &found {
        assert!(
            ALLOWED.contains(&name.as_str()),
            "`{name}` is not an allowed dependency of the pure rollout core"
        );
    }
    assert!(
        !found.is_empty(),
        "the manifest parse found no dependencies at all"
    );
}
