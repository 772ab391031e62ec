//! Compiles proto/capstan/v1 in pure Rust (protox): no protoc needed.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &[
    "capstan/v1/types.proto",
    "capstan/v1/orchestrator.proto",
    "capstan/v1/scheduler.proto",
    "capstan/v1/agent.proto",
    "capstan/v1/router_config.proto",
    "capstan/v1/auth.proto",
    "capstan/v1/metrics.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile(FILES, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("capstan_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
