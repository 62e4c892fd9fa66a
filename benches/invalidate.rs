//! Group `invalidate`: invalidating a tag that covers 100 entries, on a Redis holding 10,000 and
//! on one holding 1,000,000 unrelated keys. The cost must not grow with the keyspace.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use speedlayer::Cache;
use speedlayer::config::Transport;
use speedlayer::key::{Ident, Namespace, Tag};
use speedlayer::store::{CacheLayer, Entry};
use speedlayer::ttl::Ttl;

use crate::common::{key, redis_cache, runtime};
use crate::support::RedisServer;

const MEMBERS: u64 = 100;

/// Fills the server with `count` unrelated keys, 10,000 per pipeline.
async fn populate(server: &RedisServer, count: u64) {
    // No response timeout: a 10,000-command pipeline can take longer than the client's default
    // on a busy machine.
    let mut conn = server
        .client()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .expect("raw connection");
    let mut done = 0;
    while done < count {
        let mut pipe = redis::pipe();
        for i in done..(done + 10_000).min(count) {
            pipe.cmd("SET")
                .arg(format!("noise:row:{i}"))
                .arg("{\"v\":0}")
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.expect("populate");
        done = (done + 10_000).min(count);
    }
}

fn tag() -> Tag {
    Namespace::root()
        .global()
        .tag(&Ident::from_static("student"), 456)
        .unwrap()
}

/// Writes 100 entries carrying the tag (untimed), as `set_tagged` would.
async fn tag_members(cache: &Cache, round: u64) {
    let entries: Vec<Entry> = (0..MEMBERS)
        .map(|i| Entry {
            key: key(round * 1_000 + i),
            value: Bytes::from_static(b"{\"student_id\":456}"),
            ttl: Ttl::seconds(600),
        })
        .collect();
    let tags = [tag()];
    for entry in &entries {
        cache
            .store()
            .tag_add(&tags, &entry.key, Ttl::seconds(600))
            .await
            .expect("tag");
    }
    cache.store().set_many(&entries).await.expect("set");
}

/// Time of `rounds` invalidations of a 100-member tag, setup excluded.
async fn timed_invalidations(cache: &Cache, rounds: u64, first_round: u64) -> Duration {
    let mut total = Duration::ZERO;
    for r in 0..rounds {
        tag_members(cache, first_round + r).await;
        let started = Instant::now();
        let removed = cache.invalidate_tag(&tag()).await.expect("invalidate");
        total += started.elapsed();
        assert_eq!(removed, MEMBERS);
    }
    total
}

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &[
    "invalidate/tag100/keyspace_10k",
    "invalidate/tag100/keyspace_1m",
];

pub fn benches(c: &mut Criterion, _shared: &RedisServer) {
    let rt = runtime();
    let small = RedisServer::start();
    let large = RedisServer::start();
    rt.block_on(populate(&small, 10_000));
    rt.block_on(populate(&large, 1_000_000));
    let small_cache = rt.block_on(redis_cache(&small, Transport::Multiplexed));
    let large_cache = rt.block_on(redis_cache(&large, Transport::Multiplexed));

    let mut group = c.benchmark_group("invalidate");
    group.sample_size(30);
    let mut round = 0u64;
    for (name, cache) in [
        ("tag100/keyspace_10k", &small_cache),
        ("tag100/keyspace_1m", &large_cache),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                round += iters;
                let first = round;
                async move { timed_invalidations(cache, iters, first).await }
            })
        });
    }
    group.finish();

    let next = std::cell::Cell::new(10_000_000u64);
    let rounds = |cache: &Cache| {
        next.set(next.get() + 50);
        rt.block_on(timed_invalidations(cache, 50, next.get()))
    };
    let ratio = crate::report::paired(21, || rounds(&large_cache), || rounds(&small_cache));
    crate::report::remember_paired(
        "invalidate tag100 keyspace_1m vs keyspace_10k",
        "time",
        "<= 1.2",
        ratio,
    );
}
