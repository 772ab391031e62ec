//! The simulated driver passes the runtime contract every driver passes.

use std::time::Duration;

use capstan_runtime::{Driver, Program, contract};
use capstan_sim::SimDriver;

#[tokio::test]
async fn sim_driver_passes_the_runtime_contract() {
    let driver = SimDriver::new(Duration::from_millis(50));
    let argv = |a: &[&str]| Program::Process {
        argv: a.iter().map(|s| s.to_string()).collect(),
    };
    let again = driver.clone();
    contract::run(
        &driver,
        move || Box::new(again.reopen()) as Box<dyn Driver>,
        contract::Programs {
            serve: argv(&["serve"]),
            crash: argv(&["exit", "3"]),
            counts_network: false,
        },
        "sim",
    )
    .await;
}
