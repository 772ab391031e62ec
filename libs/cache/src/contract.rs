//! The contract every [`Cache`] adapter passes. Keys are prefixed with a
//! fresh id so runs against a shared server do not collide.

use std::time::Duration;

use futures::StreamExt;

use crate::{Admit, Cache, RateLimit};

pub async fn run(cache: &dyn Cache) {
    let prefix = format!(
        "contract-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    claims_go_to_the_first_caller_until_they_expire(cache, &prefix).await;
    buckets_admit_a_burst_then_say_when(cache, &prefix).await;
    revocations_are_denied_announced_and_expire(cache, &prefix).await;
    bad_limits_are_refused(cache, &prefix).await;
}

async fn claims_go_to_the_first_caller_until_they_expire(cache: &dyn Cache, prefix: &str) {
    let key = format!("{prefix}-event-1");
    let ttl = Duration::from_millis(300);
    assert!(
        cache.claim(&key, ttl).await.unwrap(),
        "the first claim wins"
    );
    assert!(
        !cache.claim(&key, ttl).await.unwrap(),
        "a second claim loses"
    );
    assert!(
        cache
            .claim(&format!("{prefix}-event-2"), ttl)
            .await
            .unwrap(),
        "claims are per key"
    );
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        cache.claim(&key, ttl).await.unwrap(),
        "an expired claim can be made again"
    );
}

async fn buckets_admit_a_burst_then_say_when(cache: &dyn Cache, prefix: &str) {
    let limit = RateLimit {
        burst: 3,
        per_second: 5.0,
    };
    let key = format!("{prefix}-bucket");
    for call in 0..3 {
        assert_eq!(
            cache.take(&key, limit).await.unwrap(),
            Admit::Allowed,
            "call {call} is within the burst"
        );
    }
    let Admit::Limited { retry_after } = cache.take(&key, limit).await.unwrap() else {
        panic!("the fourth call exceeds the burst");
    };
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200),
        "one token takes at most 200 ms at 5/s, got {retry_after:?}"
    );
    assert_eq!(
        cache
            .take(&format!("{prefix}-other-bucket"), limit)
            .await
            .unwrap(),
        Admit::Allowed,
        "another bucket is not affected"
    );
    tokio::time::sleep(retry_after + Duration::from_millis(20)).await;
    assert_eq!(
        cache.take(&key, limit).await.unwrap(),
        Admit::Allowed,
        "after the delay it names, a token is back"
    );
}

async fn revocations_are_denied_announced_and_expire(cache: &dyn Cache, prefix: &str) {
    let id = format!("{prefix}-token");
    assert!(!cache.is_revoked(&id).await.unwrap());
    let mut announced = cache.revocations().await.unwrap();
    let ttl = Duration::from_millis(600);
    cache.revoke(&id, ttl).await.unwrap();
    assert!(cache.is_revoked(&id).await.unwrap());
    assert!(
        !cache.is_revoked(&format!("{prefix}-other")).await.unwrap(),
        "only that id is denied"
    );
    let heard = tokio::time::timeout(Duration::from_secs(1), announced.next())
        .await
        .expect("listeners hear of a revocation within 1 s");
    assert_eq!(heard.as_deref(), Some(id.as_str()));
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        !cache.is_revoked(&id).await.unwrap(),
        "the entry goes when the token would have expired"
    );
}

async fn bad_limits_are_refused(cache: &dyn Cache, prefix: &str) {
    let error = cache
        .take(
            &format!("{prefix}-bad"),
            RateLimit {
                burst: 0,
                per_second: 1.0,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "burst: must be at least 1");
}
