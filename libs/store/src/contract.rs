//! The contract every [`Store`] adapter passes. Adapters call [`run`] from
//! their own tests; a future Scylla adapter runs it against a live cluster.

use crate::{Expect, Store, StoreError, Versioned};

pub async fn run(store: &dyn Store) {
    insert_if_absent(store).await;
    compare_and_set(store).await;
    delete_semantics(store).await;
    list_by_prefix_in_key_order(store).await;
    tables_are_separate(store).await;
    concurrent_writers_never_both_win(store).await;
}

async fn insert_if_absent(store: &dyn Store) {
    assert_eq!(store.get("c1", "a").await.unwrap(), None);
    assert_eq!(
        store
            .put("c1", "a", b"1".to_vec(), Expect::Absent)
            .await
            .unwrap(),
        1
    );
    let err = store
        .put("c1", "a", b"2".to_vec(), Expect::Absent)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { found: Some(1), .. }),
        "{err}"
    );
    assert_eq!(
        store.get("c1", "a").await.unwrap(),
        Some(Versioned {
            version: 1,
            value: b"1".to_vec()
        })
    );
}

async fn compare_and_set(store: &dyn Store) {
    store
        .put("c2", "a", b"1".to_vec(), Expect::Absent)
        .await
        .unwrap();
    assert_eq!(
        store
            .put("c2", "a", b"2".to_vec(), Expect::Version(1))
            .await
            .unwrap(),
        2
    );
    let stale = store
        .put("c2", "a", b"3".to_vec(), Expect::Version(1))
        .await
        .unwrap_err();
    assert!(
        matches!(stale, StoreError::Conflict { found: Some(2), .. }),
        "{stale}"
    );
    assert_eq!(
        store
            .put("c2", "a", b"4".to_vec(), Expect::Any)
            .await
            .unwrap(),
        3
    );
    let missing = store
        .put("c2", "nope", b"x".to_vec(), Expect::Version(1))
        .await
        .unwrap_err();
    assert!(
        matches!(missing, StoreError::Conflict { found: None, .. }),
        "{missing}"
    );
    assert_eq!(store.get("c2", "a").await.unwrap().unwrap().value, b"4");
}

async fn delete_semantics(store: &dyn Store) {
    store
        .put("c3", "a", b"1".to_vec(), Expect::Absent)
        .await
        .unwrap();
    assert!(store.delete("c3", "a", Expect::Version(2)).await.is_err());
    assert!(store.delete("c3", "a", Expect::Version(1)).await.unwrap());
    assert!(!store.delete("c3", "a", Expect::Any).await.unwrap());
    assert!(store.delete("c3", "a", Expect::Version(1)).await.is_err());
    // A deleted row starts again at version 1.
    assert_eq!(
        store
            .put("c3", "a", b"2".to_vec(), Expect::Absent)
            .await
            .unwrap(),
        1
    );
}

async fn list_by_prefix_in_key_order(store: &dyn Store) {
    for key in ["b/2", "a/1", "b/1", "c", "b/10"] {
        store
            .put("c4", key, key.as_bytes().to_vec(), Expect::Any)
            .await
            .unwrap();
    }
    let keys: Vec<String> = store
        .list("c4", "b/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["b/1", "b/10", "b/2"]);
    assert_eq!(store.list("c4", "").await.unwrap().len(), 5);
    assert!(store.list("c4", "z").await.unwrap().is_empty());
}

async fn tables_are_separate(store: &dyn Store) {
    store
        .put("c5a", "k", b"a".to_vec(), Expect::Absent)
        .await
        .unwrap();
    store
        .put("c5b", "k", b"b".to_vec(), Expect::Absent)
        .await
        .unwrap();
    assert_eq!(store.get("c5a", "k").await.unwrap().unwrap().value, b"a");
    assert_eq!(store.list("c5b", "").await.unwrap().len(), 1);
}

async fn concurrent_writers_never_both_win(store: &dyn Store) {
    store
        .put("c6", "k", b"0".to_vec(), Expect::Absent)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        store.put("c6", "k", b"a".to_vec(), Expect::Version(1)),
        store.put("c6", "k", b"b".to_vec(), Expect::Version(1)),
    );
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one CAS must win: {a:?} {b:?}"
    );
    assert_eq!(store.get("c6", "k").await.unwrap().unwrap().version, 2);
}
