//! The contract every [`SecretStore`] adapter passes (the Vault adapter runs
//! it against a live server when one is configured). `prefix` makes every
//! path of a run unique, so a live store can run it again and again.

use crate::{Cas, Secret, SecretError, SecretStore, get_or_create};

pub async fn run(store: &dyn SecretStore, reopen: impl Fn() -> Box<dyn SecretStore>, prefix: &str) {
    let path = format!("{prefix}/signing-key");
    assert!(
        store.get(&path).await.unwrap().is_none(),
        "a missing secret is None, not an error"
    );

    // Check-and-set: create once, then only from the version read.
    let v1 = store
        .put(&path, Secret::new("one"), Cas::Absent)
        .await
        .unwrap();
    assert!(matches!(
        store.put(&path, Secret::new("again"), Cas::Absent).await,
        Err(SecretError::Conflict { .. })
    ));
    let v2 = store
        .put(&path, Secret::new("two"), Cas::Version(v1))
        .await
        .unwrap();
    assert!(v2 > v1, "versions go up");
    assert!(matches!(
        store.put(&path, Secret::new("stale"), Cas::Version(v1)).await,
        Err(SecretError::Conflict { found: Some(found), .. }) if found == v2
    ));
    let read = store.get(&path).await.unwrap().unwrap();
    assert_eq!((read.value.expose(), read.version), ("two", v2));
    let v3 = store
        .put(&path, Secret::new("three"), Cas::Any)
        .await
        .unwrap();
    assert!(v3 > v2);

    // Another client of the same store sees the same secret and version.
    let other = reopen();
    let seen = other.get(&path).await.unwrap().unwrap();
    assert_eq!((seen.value.expose(), seen.version), ("three", v3));

    // Bootstraps racing from many clients agree on one value.
    let shared = format!("{prefix}/service-key");
    let clients: Vec<Box<dyn SecretStore>> = (0..8).map(|_| reopen()).collect();
    let values = futures::future::join_all(clients.iter().enumerate().map(|(i, client)| {
        let shared = shared.clone();
        async move {
            get_or_create(client.as_ref(), &shared, || {
                Secret::new(format!("candidate-{i}"))
            })
            .await
            .unwrap()
        }
    }))
    .await;
    assert!(
        values.windows(2).all(|w| w[0] == w[1]),
        "racing bootstraps disagreed"
    );

    assert!(matches!(
        store.get("../escape").await,
        Err(SecretError::InvalidPath(_))
    ));
    assert!(matches!(
        store.put("a//b", Secret::new("x"), Cas::Any).await,
        Err(SecretError::InvalidPath(_))
    ));
}
