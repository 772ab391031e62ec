//! The metrics store contract: every adapter's tests call [`run`].
//! `app` is a prefix unique to the run, so a shared live store is fine.

use crate::model::{Metric, Resolution, Rollup, Row, SeriesKey};
use crate::store::{MetricsStore, Selector};

fn row(app: &str, metric: Metric, instance: &str, start_ms: i64, writer: &str, value: f64) -> Row {
    Row {
        key: SeriesKey {
            app: app.to_string(),
            metric,
            instance: instance.to_string(),
        },
        start_ms,
        writer: writer.to_string(),
        node: "node-1".to_string(),
        rollup: Rollup::of(value, Vec::new()),
    }
}

fn selector(app: &str, metric: Metric, instance: Option<&str>) -> Selector {
    Selector {
        app: app.to_string(),
        metric,
        instance: instance.map(str::to_string),
    }
}

/// Runs every case; panics with the case's name on the first failure.
pub async fn run(store: &dyn MetricsStore, app: &str) {
    let now = capstan_server::now_ms();
    let base = Resolution::Minute.bucket(now) - 10 * 60_000;
    let (a, b) = (format!("{app}-a"), format!("{app}-b"));

    // Rows come back by start, then instance, within [from, to).
    let rows: Vec<Row> = (0..10)
        .flat_map(|i| {
            [
                row(
                    &a,
                    Metric::CpuPercent,
                    "i-1",
                    base + i * 5_000,
                    "",
                    i as f64,
                ),
                row(
                    &a,
                    Metric::CpuPercent,
                    "i-2",
                    base + i * 5_000,
                    "",
                    100.0 + i as f64,
                ),
            ]
        })
        .collect();
    store
        .write(Resolution::Raw, &rows)
        .await
        .expect("write raw rows");
    let all = store
        .read(
            Resolution::Raw,
            &selector(&a, Metric::CpuPercent, None),
            base,
            base + 50_000,
        )
        .await
        .expect("read raw rows");
    assert_eq!(all.len(), 20, "range read returns every row in range");
    assert!(
        all.windows(2)
            .all(|w| (w[0].start_ms, &w[0].key.instance) <= (w[1].start_ms, &w[1].key.instance)),
        "rows are ordered by start, then instance"
    );
    assert_eq!(all[0], rows[0], "a row reads back as written");
    let window = store
        .read(
            Resolution::Raw,
            &selector(&a, Metric::CpuPercent, None),
            base + 5_000,
            base + 15_000,
        )
        .await
        .unwrap();
    assert_eq!(
        window.iter().map(|r| r.start_ms).collect::<Vec<_>>(),
        vec![base + 5_000, base + 5_000, base + 10_000, base + 10_000],
        "from is inclusive, to exclusive"
    );

    // One instance only.
    let one = store
        .read(
            Resolution::Raw,
            &selector(&a, Metric::CpuPercent, Some("i-2")),
            base,
            base + 50_000,
        )
        .await
        .unwrap();
    assert_eq!(
        one.len(),
        10,
        "an instance selector keeps that instance's rows"
    );
    assert!(
        one.iter()
            .all(|r| r.key.instance == "i-2" && r.rollup.sum >= 100.0)
    );

    // Apps, metrics and resolutions do not mix.
    for (resolution, sel) in [
        (Resolution::Raw, selector(&b, Metric::CpuPercent, None)),
        (Resolution::Raw, selector(&a, Metric::MemoryBytes, None)),
        (Resolution::Minute, selector(&a, Metric::CpuPercent, None)),
    ] {
        let rows = store
            .read(resolution, &sel, base, base + 50_000)
            .await
            .unwrap();
        assert!(
            rows.is_empty(),
            "{resolution:?} {sel:?} read another series' rows"
        );
    }

    // An upsert by (series, start, writer) replaces; another writer adds.
    let minute = base;
    store
        .write(
            Resolution::Minute,
            &[row(&a, Metric::Requests, "i-1", minute, "w1", 5.0)],
        )
        .await
        .unwrap();
    store
        .write(
            Resolution::Minute,
            &[
                row(&a, Metric::Requests, "i-1", minute, "w1", 7.0),
                row(&a, Metric::Requests, "i-1", minute, "w2", 3.0),
            ],
        )
        .await
        .unwrap();
    let rollups = store
        .read(
            Resolution::Minute,
            &selector(&a, Metric::Requests, None),
            minute,
            minute + 60_000,
        )
        .await
        .unwrap();
    let mut seen: Vec<(String, f64)> = rollups
        .iter()
        .map(|r| (r.writer.clone(), r.rollup.sum))
        .collect();
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        seen,
        vec![("w1".to_string(), 7.0), ("w2".to_string(), 3.0)],
        "the same writer's row is replaced, another writer's is kept"
    );

    // Histograms and every field survive the trip.
    let mut histogram = row(&a, Metric::LatencyMs, "i-1", base, "", 123.5);
    histogram.rollup = Rollup {
        count: 4,
        sum: 123.5,
        min: 1.5,
        max: 90.0,
        buckets: (0..crate::model::LATENCY_BUCKETS as u64).collect(),
    };
    store
        .write(Resolution::Raw, std::slice::from_ref(&histogram))
        .await
        .unwrap();
    let back = store
        .read(
            Resolution::Raw,
            &selector(&a, Metric::LatencyMs, Some("i-1")),
            base,
            base + 1,
        )
        .await
        .unwrap();
    assert_eq!(back, vec![histogram], "a histogram row reads back whole");

    // An empty or inverted range reads nothing.
    let none = store
        .read(
            Resolution::Raw,
            &selector(&a, Metric::CpuPercent, None),
            base + 10,
            base,
        )
        .await
        .unwrap();
    assert!(none.is_empty(), "an inverted range reads nothing");

    // Rows older than the retention are not returned.
    let stale = base - Resolution::Raw.retention_ms() - 60_000;
    store
        .write(
            Resolution::Raw,
            &[row(&b, Metric::CpuPercent, "i-1", stale, "", 1.0)],
        )
        .await
        .unwrap();
    let expired = store
        .read(
            Resolution::Raw,
            &selector(&b, Metric::CpuPercent, None),
            stale - 1,
            stale + 1,
        )
        .await
        .unwrap();
    assert!(
        expired.is_empty(),
        "a row past the retention is not read: {expired:?}"
    );
}
