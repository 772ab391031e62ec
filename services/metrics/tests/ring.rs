//! The embedded metrics store passes the store contract, and stays bounded.

use capstan_metrics::model::{Metric, Resolution, Rollup, Row, SeriesKey};
use capstan_metrics::{MetricsStore, RingStore, Selector};

#[tokio::test]
async fn the_ring_passes_the_contract() {
    let store = RingStore::default();
    capstan_metrics::contract::run(&store, "contract").await;
}

#[tokio::test]
async fn the_ring_keeps_at_most_max_rows_and_drops_the_oldest_raw_rows_first() {
    let store = RingStore::new(1_000);
    let now = capstan_server::now_ms();
    let row = |resolution_start: i64, i: i64| Row {
        key: SeriesKey {
            app: "web".into(),
            metric: Metric::CpuPercent,
            instance: format!("web-{}", i % 7),
        },
        start_ms: resolution_start,
        writer: String::new(),
        node: String::new(),
        rollup: Rollup::of(i as f64, Vec::new()),
    };
    let hour: Vec<Row> = (0..10)
        .map(|i| row(Resolution::Hour.bucket(now) - i * 3_600_000, i))
        .collect();
    store.write(Resolution::Hour, &hour).await.unwrap();
    for batch in 0..50 {
        let rows: Vec<Row> = (0..100)
            .map(|i| row(now - 3_000_000 + batch * 1000 + i, i))
            .collect();
        store.write(Resolution::Raw, &rows).await.unwrap();
        assert!(
            store.rows() <= 1_000,
            "{} rows after batch {batch}",
            store.rows()
        );
    }
    let selector = Selector {
        app: "web".into(),
        metric: Metric::CpuPercent,
        instance: None,
    };
    let hours = store
        .read(Resolution::Hour, &selector, 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(hours.len(), 10, "rollups outlive raw rows");
    let raw = store
        .read(Resolution::Raw, &selector, 0, i64::MAX)
        .await
        .unwrap();
    let newest = raw.iter().map(|r| r.start_ms).max().unwrap();
    assert_eq!(
        newest,
        now - 3_000_000 + 49 * 1000 + 99,
        "the newest raw rows are kept"
    );
    assert!(raw.len() < 990);
}
