//! Both cache adapters pass one contract; Redis is a real, throwaway
//! `redis-server` (apt-get install -y redis-server).

use capstan_cache::{MemoryCache, RedisCache, contract};
use capstan_testkit::redis::Redis;

#[tokio::test]
async fn memory_cache_passes_the_contract() {
    contract::run(&MemoryCache::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cache_passes_the_contract() {
    let redis = Redis::start().await;
    let cache = RedisCache::connect(&redis.url(), "capstan-test")
        .await
        .unwrap();
    contract::run(&cache).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_redis_clients_share_claims_buckets_and_the_denylist() {
    // Two replicas: one server, two connections.
    let redis = Redis::start().await;
    let a = RedisCache::connect(&redis.url(), "shared").await.unwrap();
    let b = RedisCache::connect(&redis.url(), "shared").await.unwrap();
    let ttl = std::time::Duration::from_secs(5);
    assert!(a.claim("event-7", ttl).await.unwrap());
    assert!(!b.claim("event-7", ttl).await.unwrap(), "b sees a's claim");
    use capstan_cache::Cache;
    let mut heard = b.revocations().await.unwrap();
    a.revoke("jti-1", ttl).await.unwrap();
    assert!(b.is_revoked("jti-1").await.unwrap());
    use futures::StreamExt;
    assert_eq!(heard.next().await.as_deref(), Some("jti-1"));
}

#[tokio::test]
async fn a_server_that_is_not_there_is_named() {
    let port = capstan_testkit::free_port();
    let error = RedisCache::connect(&format!("redis://127.0.0.1:{port}/0"), "x")
        .await
        .err()
        .expect("nothing listens there");
    assert!(
        error.to_string().contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
}
