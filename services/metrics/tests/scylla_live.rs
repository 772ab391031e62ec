//! The metrics store on a real ScyllaDB: runs only when
//! CAPSTAN_TEST_SCYLLA_NODES names one (HOST:PORT[,HOST:PORT]):
//!
//!   CAPSTAN_TEST_SCYLLA_NODES=127.0.0.1:9042 cargo test -p capstan-metrics --test scylla_live -- --ignored

use capstan_metrics::scylla::ScyllaMetricsStore;

#[tokio::test]
#[ignore = "live ScyllaDB: set CAPSTAN_TEST_SCYLLA_NODES and run with --ignored"]
async fn live_scylla_passes_the_metrics_store_contract() {
    let nodes = std::env::var("CAPSTAN_TEST_SCYLLA_NODES")
        .expect("CAPSTAN_TEST_SCYLLA_NODES=HOST:PORT of a real ScyllaDB");
    let store = ScyllaMetricsStore::connect(&format!("scylla://{nodes}/capstan_test?rf=1"))
        .await
        .expect("connect to ScyllaDB");
    let run = capstan_server::new_id("run");
    capstan_metrics::contract::run(&store, &run).await;
}
