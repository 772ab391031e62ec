//! The engine must stay pure: no async runtime, no network, no disk, no
//! clock. This fails when a dependency outside the allow-list appears in
//! its Cargo.toml.

#[test]
fn cargo_toml_has_only_pure_dependencies() {
    capstan_testkit::assert_only_dependencies(
        include_str!("../Cargo.toml"),
        &["regex"],
        "the pure placement engine",
    );
}
