//! Group `batch`: a page of 50 rows through `get_or_set_many`, against 50 sequential
//! `get_or_set` calls and against the raw client doing the same work (one `MGET` and the JSON
//! decode of each value; on a cold cache, `MGET` then a pipeline of `SET`s).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use criterion::Criterion;
use redis::AsyncCommands;
use speedlayer::config::Transport;
use speedlayer::ttl::Ttl;
use speedlayer::{Cache, Key};

use crate::common::{Dashboard, dashboard, key, redis_cache, runtime};
use crate::support::RedisServer;

/// Every bench of this group, as `group/name` (for the filter).
pub const IDS: &[&str] = &[
    "batch/get_or_set_many_50",
    "batch/sequential_get_or_set_50",
    "batch/raw_mget_50",
];

const TTL: Ttl = Ttl::seconds(3_600);
const NEGATIVE: Ttl = Ttl::seconds(30);

/// The loader of a page: one query for all the missing ids.
async fn load_page(ids: Vec<u64>) -> Result<HashMap<u64, Dashboard>, std::io::Error> {
    Ok(ids.into_iter().map(|id| (id, dashboard(id))).collect())
}

async fn ours(cache: &Cache, page: &[(u64, Key)]) {
    let batch = cache.get_or_set_many(page, TTL, NEGATIVE, load_page).await;
    assert_eq!(batch.found().count(), page.len());
}

async fn sequential(cache: &Cache, page: &[(u64, Key)]) {
    for (id, k) in page {
        let id = *id;
        let v = cache
            .get_or_set(
                k,
                TTL,
                || async move { Ok::<_, std::io::Error>(dashboard(id)) },
            )
            .await
            .expect("loads");
        assert_eq!(v.student_id, id);
    }
}

async fn raw_mget(conn: &mut redis::aio::ConnectionManager, page: &[(u64, Key)]) {
    let names: Vec<&str> = page.iter().map(|(_, k)| k.as_str()).collect();
    let found: Vec<Option<Vec<u8>>> = conn.mget(&names).await.expect("MGET");
    for bytes in found {
        let bytes = bytes.expect("warm");
        serde_json::from_slice::<Dashboard>(&bytes).expect("decodes");
    }
}

/// The raw cold path: `MGET`, then the rows of the misses stored in one pipeline.
async fn raw_mget_set(conn: &mut redis::aio::ConnectionManager, page: &[(u64, Key)]) {
    let names: Vec<&str> = page.iter().map(|(_, k)| k.as_str()).collect();
    let found: Vec<Option<Vec<u8>>> = conn.mget(&names).await.expect("MGET");
    let missing: Vec<u64> = page
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|((id, _), _)| *id)
        .collect();
    let rows = load_page(missing).await.unwrap();
    let mut pipe = redis::pipe();
    for (id, row) in &rows {
        pipe.cmd("SET")
            .arg(key(*id).as_str())
            .arg(serde_json::to_vec(row).unwrap())
            .arg("PX")
            .arg(TTL.as_millis())
            .ignore();
    }
    let () = pipe.query_async(conn).await.expect("pipeline");
}

pub fn benches(c: &mut Criterion, server: &RedisServer) {
    let rt = runtime();
    let cache = rt.block_on(redis_cache(server, Transport::Multiplexed));
    let page: Vec<(u64, Key)> = (9_000..9_050).map(|id| (id, key(id))).collect();
    rt.block_on(ours(&cache, &page));
    let raw = rt
        .block_on(redis::aio::ConnectionManager::new(server.client()))
        .expect("raw connection manager");

    let mut group = c.benchmark_group("batch");
    group.sample_size(60);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("get_or_set_many_50", |b| {
        b.to_async(&rt).iter(|| ours(&cache, &page))
    });
    group.bench_function("sequential_get_or_set_50", |b| {
        b.to_async(&rt).iter(|| sequential(&cache, &page))
    });
    group.bench_function("raw_mget_50", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            let page = &page;
            async move { raw_mget(&mut conn, page).await }
        })
    });
    group.finish();

    // Paired rounds (see report::paired): warm pages, alternating, 21 times.
    let time = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        f();
        started.elapsed()
    };
    crate::report::paired_if_selected(
        ("batch/get_or_set_many_50", "batch/raw_mget_50"),
        "time",
        "<= 1.2",
        || {
            time(&mut || {
                rt.block_on(async {
                    for _ in 0..200 {
                        ours(&cache, &page).await
                    }
                })
            })
        },
        || {
            time(&mut || {
                rt.block_on(async {
                    let mut conn = raw.clone();
                    for _ in 0..200 {
                        raw_mget(&mut conn, &page).await
                    }
                })
            })
        },
    );
    crate::report::paired_if_selected(
        ("batch/get_or_set_many_50", "batch/sequential_get_or_set_50"),
        "time",
        "(for reference)",
        || {
            time(&mut || {
                rt.block_on(async {
                    for _ in 0..100 {
                        ours(&cache, &page).await
                    }
                })
            })
        },
        || {
            time(&mut || {
                rt.block_on(async {
                    for _ in 0..100 {
                        sequential(&cache, &page).await
                    }
                })
            })
        },
    );
    // Cold pages: every round starts from 50 missing keys (deleted outside the timing).
    if crate::any_selected(&IDS[..1]) {
        let names: Vec<String> = page.iter().map(|(_, k)| k.as_str().to_owned()).collect();
        let clear = || {
            rt.block_on(async {
                let mut conn = raw.clone();
                let _: u64 = conn.del(&names).await.expect("DEL");
            })
        };
        let cold = |f: &mut dyn FnMut()| {
            let mut total = Duration::ZERO;
            for _ in 0..50 {
                clear();
                total += time(f);
            }
            total
        };
        let ratio = crate::report::paired(
            21,
            || cold(&mut || rt.block_on(ours(&cache, &page))),
            || {
                cold(&mut || {
                    rt.block_on(async {
                        let mut conn = raw.clone();
                        raw_mget_set(&mut conn, &page).await
                    })
                })
            },
        );
        crate::report::remember_paired(
            "batch/get_or_set_many_50 (cold) vs raw MGET + pipelined SETs",
            "time",
            "(for reference)",
            ratio,
        );
    }
}
