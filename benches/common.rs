//! What the benches share: the value, the runtime, and cache constructors.

use serde::{Deserialize, Serialize};
use speedlayer::Cache;
use speedlayer::config::{Config, Transport};
use speedlayer::key::{Ident, Key, Namespace};

use crate::support::RedisServer;

/// A dashboard-sized value: about 300 bytes of JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Dashboard {
    pub student_id: u64,
    pub name: String,
    pub class: String,
    pub attendance_pct: f32,
    pub fees_due_cents: i64,
    pub recent_marks: Vec<u32>,
    pub notices: Vec<String>,
}

pub fn dashboard(id: u64) -> Dashboard {
    Dashboard {
        student_id: id,
        name: format!("Student Number {id}"),
        class: "10A".to_owned(),
        attendance_pct: 96.5,
        fees_due_cents: 125_000,
        recent_marks: vec![78, 91, 66, 88, 73, 95, 81, 70],
        notices: vec![
            "Parent-teacher meeting on Friday at 10:00".to_owned(),
            "Science fair registrations close next week".to_owned(),
            "Library books are due before the term ends".to_owned(),
        ],
    }
}

pub fn key(id: u64) -> Key {
    Namespace::root()
        .global()
        .key(
            &Ident::from_static("dashboard"),
            &Ident::from_static("student"),
            id,
        )
        .expect("valid key")
}

/// The raw moka the `raw_moka` benches read: the JSON bytes of one value under `key`.
pub async fn raw_moka_holding(
    key: &Key,
    json: bytes::Bytes,
) -> moka::future::Cache<String, bytes::Bytes> {
    let moka = moka::future::Cache::builder()
        .max_capacity(64 * 1024 * 1024)
        .build();
    moka.insert(key.as_str().to_owned(), json).await;
    moka
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A cache on the bench server. The operation timeout is raised to 2 s: with 64 tasks saturating
/// two cores, single GETs (raw redis-rs ones too) were seen to take 60 ms and more, and a bench
/// of throughput must not turn those into misses.
pub async fn redis_cache(server: &RedisServer, transport: Transport) -> Cache {
    let config = Config::redis(server.redis_config().transport(transport))
        .op_timeout(std::time::Duration::from_secs(2));
    Cache::new(config).await.expect("cache")
}
