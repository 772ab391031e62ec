//! The contract every [`Store`] adapter passes. Adapters call [`run`] from
//! their own tests with a `prefix` unique to the run: every table name
//! starts with it, so a live cluster (the Scylla adapter's) can run the
//! suite again and again.

use std::time::Duration;

use std::sync::Arc;

use crate::{Expect, Fence, FencedStore, Mutation, Store, StoreError};

pub async fn run(shared: Arc<dyn Store>, prefix: &str) {
    let store = shared.as_ref();
    let t = |name: &str| format!("{prefix}_{name}");
    insert_if_absent(store, &t("insert")).await;
    compare_and_set(store, &t("cas")).await;
    versions_never_repeat_for_a_key(store, &t("aba")).await;
    plain_writes_and_removes(store, &t("plain")).await;
    rows_with_a_ttl_expire(store, &t("ttl")).await;
    list_by_prefix_in_key_order(store, &t("list")).await;
    scans_page_through_a_table(store, &t("scan")).await;
    tables_are_separate(store, &t("sep_a"), &t("sep_b")).await;
    concurrent_writers_never_both_win(store, &t("race")).await;
    many_writes_at_once_each_keep_their_own_outcome(store, &t("many")).await;
    fenced_writes_stop_when_the_fence_moves(store, &t("fence"), &t("fenced")).await;
    fenced_store_fences_every_write(shared.clone(), prefix).await;
}

async fn insert_if_absent(store: &dyn Store, table: &str) {
    assert_eq!(store.get(table, "a").await.unwrap(), None);
    let v1 = store
        .put(table, "a", b"1".to_vec(), Expect::Absent)
        .await
        .unwrap();
    let err = store
        .put(table, "a", b"2".to_vec(), Expect::Absent)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { found: Some(found), .. } if found == v1),
        "{err}"
    );
    let row = store.get(table, "a").await.unwrap().unwrap();
    assert_eq!((row.version, row.value.as_slice()), (v1, &b"1"[..]));
}

async fn compare_and_set(store: &dyn Store, table: &str) {
    let v1 = store
        .put(table, "a", b"1".to_vec(), Expect::Absent)
        .await
        .unwrap();
    let v2 = store
        .put(table, "a", b"2".to_vec(), Expect::Version(v1))
        .await
        .unwrap();
    assert!(v2 > v1, "versions go up");
    let stale = store
        .put(table, "a", b"3".to_vec(), Expect::Version(v1))
        .await
        .unwrap_err();
    assert!(
        matches!(stale, StoreError::Conflict { found: Some(found), .. } if found == v2),
        "{stale}"
    );
    let missing = store
        .put(table, "nope", b"x".to_vec(), Expect::Version(v1))
        .await
        .unwrap_err();
    assert!(
        matches!(missing, StoreError::Conflict { found: None, .. }),
        "{missing}"
    );
    assert_eq!(store.get(table, "a").await.unwrap().unwrap().value, b"2");
    assert!(
        store.delete(table, "a", v1).await.is_err(),
        "a stale delete"
    );
    store.delete(table, "a", v2).await.unwrap();
    assert!(
        store.delete(table, "a", v2).await.is_err(),
        "deleting twice"
    );
}

/// A deleted and re-created row never gets a version it had before, so a
/// writer holding an old version cannot overwrite the new row (ABA).
async fn versions_never_repeat_for_a_key(store: &dyn Store, table: &str) {
    let old = store
        .put(table, "k", b"old".to_vec(), Expect::Absent)
        .await
        .unwrap();
    store.delete(table, "k", old).await.unwrap();
    let new = store
        .put(table, "k", b"new".to_vec(), Expect::Absent)
        .await
        .unwrap();
    assert_ne!(new, old, "a re-created row reused version {old}");
    assert!(
        store
            .put(table, "k", b"stale".to_vec(), Expect::Version(old))
            .await
            .is_err(),
        "a stale version matched the re-created row"
    );
    store.remove(table, "k").await.unwrap();
    store
        .write(table, "k", b"plain".to_vec(), None)
        .await
        .unwrap();
    let plain = store.get(table, "k").await.unwrap().unwrap().version;
    assert!(plain != old && plain != new);
}

async fn plain_writes_and_removes(store: &dyn Store, table: &str) {
    store.write(table, "hb", b"1".to_vec(), None).await.unwrap();
    store.write(table, "hb", b"2".to_vec(), None).await.unwrap();
    assert_eq!(store.get(table, "hb").await.unwrap().unwrap().value, b"2");
    store.remove(table, "hb").await.unwrap();
    assert_eq!(store.get(table, "hb").await.unwrap(), None);
    store.remove(table, "hb").await.unwrap();
}

/// A row written with a TTL disappears from reads and scans once it has
/// passed; one without stays. Waits on the condition, not a fixed sleep.
async fn rows_with_a_ttl_expire(store: &dyn Store, table: &str) {
    store
        .write(
            table,
            "lease",
            b"x".to_vec(),
            Some(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    store
        .write(table, "stays", b"y".to_vec(), None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get(table, "lease").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a row outlived its TTL by 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys: Vec<String> = store
        .list(table, "")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["stays"]);
    // An expired row is absent for compare-and-set too.
    store
        .write(table, "gone", b"z".to_vec(), Some(Duration::from_millis(1)))
        .await
        .unwrap();
    while store.get(table, "gone").await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store
        .put(table, "gone", b"again".to_vec(), Expect::Absent)
        .await
        .unwrap();
}

async fn list_by_prefix_in_key_order(store: &dyn Store, table: &str) {
    for key in ["b/2", "a/1", "b/1", "c", "b/10"] {
        store
            .write(table, key, key.as_bytes().to_vec(), None)
            .await
            .unwrap();
    }
    let keys: Vec<String> = store
        .list(table, "b/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["b/1", "b/10", "b/2"]);
    assert_eq!(store.list(table, "").await.unwrap().len(), 5);
    assert!(store.list(table, "z").await.unwrap().is_empty());
}

async fn scans_page_through_a_table(store: &dyn Store, table: &str) {
    let keys: Vec<String> = (0..23).map(|i| format!("k{i:03}")).collect();
    for key in &keys {
        store.write(table, key, b"v".to_vec(), None).await.unwrap();
    }
    store
        .write(table, "other", b"v".to_vec(), None)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.scan(table, "k", after.as_deref(), 5).await.unwrap();
        assert!(page.rows.len() <= 5, "a page holds at most its limit");
        seen.extend(page.rows.into_iter().map(|(k, _)| k));
        pages += 1;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, keys, "pages cover every key once, in order");
    assert_eq!(pages, 5);
}

async fn tables_are_separate(store: &dyn Store, a: &str, b: &str) {
    store
        .put(a, "k", b"a".to_vec(), Expect::Absent)
        .await
        .unwrap();
    store
        .put(b, "k", b"b".to_vec(), Expect::Absent)
        .await
        .unwrap();
    assert_eq!(store.get(a, "k").await.unwrap().unwrap().value, b"a");
    assert_eq!(store.list(b, "").await.unwrap().len(), 1);
}

async fn concurrent_writers_never_both_win(store: &dyn Store, table: &str) {
    let v1 = store
        .put(table, "k", b"0".to_vec(), Expect::Absent)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        store.put(table, "k", b"a".to_vec(), Expect::Version(v1)),
        store.put(table, "k", b"b".to_vec(), Expect::Version(v1)),
    );
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one CAS must win: {a:?} {b:?}"
    );
    let winner = a.or(b).unwrap();
    assert_eq!(
        store.get(table, "k").await.unwrap().unwrap().version,
        winner
    );
}

/// Hundreds of writes in flight together (an adapter may commit them as
/// one group): every create of a distinct key lands, exactly one of the
/// creates racing for one key wins, and a write that fails its check
/// leaves the rest, and the row it aimed at, as they were.
async fn many_writes_at_once_each_keep_their_own_outcome(store: &dyn Store, table: &str) {
    let stale = store
        .put(table, "held", b"kept".to_vec(), Expect::Absent)
        .await
        .unwrap();
    let current = store
        .put(table, "held", b"kept".to_vec(), Expect::Version(stale))
        .await
        .unwrap();
    let keys: Vec<String> = (0..300).map(|i| format!("key-{i:03}")).collect();
    let distinct = keys
        .iter()
        .enumerate()
        .map(|(i, key)| store.put(table, key, i.to_string().into_bytes(), Expect::Absent));
    let racing =
        (0..100).map(|i| store.put(table, "one", i.to_string().into_bytes(), Expect::Absent));
    let refused = (0..50).map(|_| {
        store.put(
            table,
            "held",
            b"overwritten".to_vec(),
            Expect::Version(stale),
        )
    });
    let (distinct, racing, refused) = tokio::join!(
        futures::future::join_all(distinct),
        futures::future::join_all(racing),
        futures::future::join_all(refused),
    );
    assert!(distinct.iter().all(Result::is_ok), "{distinct:?}");
    let winners: Vec<u64> = racing
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    assert_eq!(winners.len(), 1, "creates of one key: {racing:?}");
    assert!(
        refused
            .iter()
            .all(|r| matches!(r, Err(StoreError::Conflict { .. }))),
        "{refused:?}"
    );
    let rows = store.list(table, "key-").await.unwrap();
    assert_eq!(rows.len(), 300);
    for (i, (key, versioned)) in rows.iter().enumerate() {
        assert_eq!(key, &format!("key-{i:03}"));
        assert_eq!(versioned.value, i.to_string().into_bytes());
        assert_eq!(Some(&versioned.version), distinct[i].as_ref().ok());
    }
    let one = store.get(table, "one").await.unwrap().unwrap();
    assert_eq!(one.version, winners[0]);
    let held = store.get(table, "held").await.unwrap().unwrap();
    assert_eq!((held.version, held.value), (current, b"kept".to_vec()));
}

/// A fenced write lands while the fence row is at its version; once the
/// fence moves (a new leader), every kind of write is refused and nothing
/// changes.
async fn fenced_writes_stop_when_the_fence_moves(store: &dyn Store, fences: &str, table: &str) {
    let epoch = store
        .put(fences, "leader", b"old".to_vec(), Expect::Absent)
        .await
        .unwrap();
    let fence = Fence {
        table: fences.to_string(),
        key: "leader".to_string(),
        version: epoch,
    };
    let put = |key: &str, value: &[u8], expect| Mutation::Put {
        table: table.to_string(),
        key: key.to_string(),
        value: value.to_vec(),
        expect,
    };
    let v1 = store
        .fenced(&fence, put("a", b"1", Expect::Absent))
        .await
        .unwrap()
        .expect("a put returns its version");
    store
        .fenced(
            &fence,
            Mutation::Write {
                table: table.to_string(),
                key: "b".to_string(),
                value: b"1".to_vec(),
                ttl: None,
            },
        )
        .await
        .unwrap();
    // A fenced put still checks its own precondition.
    let err = store
        .fenced(&fence, put("a", b"x", Expect::Absent))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");

    // A new leader moves the fence.
    store
        .put(fences, "leader", b"new".to_vec(), Expect::Version(epoch))
        .await
        .unwrap();
    let stale = [
        put("a", b"2", Expect::Version(v1)),
        put("c", b"2", Expect::Absent),
        Mutation::Write {
            table: table.to_string(),
            key: "b".to_string(),
            value: b"2".to_vec(),
            ttl: None,
        },
        Mutation::Delete {
            table: table.to_string(),
            key: "a".to_string(),
            version: v1,
        },
        Mutation::Remove {
            table: table.to_string(),
            key: "b".to_string(),
        },
    ];
    for mutation in stale {
        let err = store.fenced(&fence, mutation.clone()).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Fenced { version, .. } if *version == epoch),
            "{mutation:?}: {err}"
        );
    }
    assert_eq!(store.get(table, "a").await.unwrap().unwrap().value, b"1");
    assert_eq!(store.get(table, "b").await.unwrap().unwrap().value, b"1");
    assert_eq!(store.get(table, "c").await.unwrap(), None);

    // A fence on a row that is gone holds nothing either.
    let gone = Fence {
        key: "nobody".to_string(),
        ..fence.clone()
    };
    let err = store
        .fenced(&gone, put("d", b"1", Expect::Absent))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { found: None, .. }),
        "{err}"
    );
}

/// [`FencedStore`] over `store`: every write through it is fenced.
async fn fenced_store_fences_every_write(store: Arc<dyn Store>, prefix: &str) {
    let fences = format!("{prefix}_fs_fence");
    let table = format!("{prefix}_fs_rows");
    let epoch = store
        .put(&fences, "leader", b"1".to_vec(), Expect::Absent)
        .await
        .unwrap();
    let leader = FencedStore::new(
        store.clone(),
        Fence {
            table: fences.clone(),
            key: "leader".into(),
            version: epoch,
        },
    );
    let v = leader
        .put(&table, "a", b"1".to_vec(), Expect::Absent)
        .await
        .unwrap();
    leader
        .write(&table, "b", b"1".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(leader.get(&table, "a").await.unwrap().unwrap().version, v);
    store
        .put(&fences, "leader", b"2".to_vec(), Expect::Version(epoch))
        .await
        .unwrap();
    for result in [
        leader
            .put(&table, "a", b"2".to_vec(), Expect::Version(v))
            .await
            .map(drop),
        leader.write(&table, "b", b"2".to_vec(), None).await,
        leader.delete(&table, "a", v).await,
        leader.remove(&table, "b").await,
    ] {
        assert!(
            matches!(result, Err(StoreError::Fenced { .. })),
            "{result:?}"
        );
    }
    assert_eq!(store.list(&table, "").await.unwrap().len(), 2);
}
