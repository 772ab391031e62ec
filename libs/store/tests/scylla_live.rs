//! The Store contract on a live ScyllaDB. Runs only when
//! CAPSTAN_TEST_SCYLLA_NODES names one (HOST:PORT[,HOST:PORT]), e.g. after
//! `docker run -d -p 9042:9042 scylladb/scylla --smp 1 --developer-mode 1`:
//!
//!   CAPSTAN_TEST_SCYLLA_NODES=127.0.0.1:9042 cargo test -p capstan-store --test scylla_live -- --ignored
//!
//! Ignored otherwise, so it shows as not run; it never counts as passed here.

use std::sync::Arc;

use capstan_store::{ScyllaStore, Store, contract};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "live ScyllaDB: set CAPSTAN_TEST_SCYLLA_NODES and run with --ignored"]
async fn live_scylla_passes_the_contract() {
    let nodes = std::env::var("CAPSTAN_TEST_SCYLLA_NODES")
        .expect("CAPSTAN_TEST_SCYLLA_NODES=HOST:PORT of a real ScyllaDB");
    let store: Arc<dyn Store> = Arc::new(
        ScyllaStore::connect(&format!("scylla://{nodes}/capstan_test?rf=1"))
            .await
            .unwrap(),
    );
    // Table names unique to the run: the suite can run again and again.
    let prefix = format!("live{}", std::process::id());
    contract::run(store.clone(), &prefix).await;
    // Connecting again applies no migration twice.
    ScyllaStore::connect(&format!("scylla://{nodes}/capstan_test?rf=1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_scylla_that_is_not_there_is_named() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let error = ScyllaStore::connect(&format!("scylla://127.0.0.1:{port}/capstan"))
        .await
        .err()
        .expect("nothing listens there")
        .to_string();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
}
