//! Other services share the Redis. The README's "Sharing Redis with other services" snippet is
//! taken from the README as it stands and run with `node` (a separate process, with its own
//! connection) against a real Redis beside speedlayer: a Node reader written the usual way never
//! throws and is never handed a lease as data, a Node `DEL` or `SET` during a load keeps the
//! load's older value out, a Node tag invalidation reaches every entry, and Node's key escaping
//! agrees with speedlayer's.

#[path = "../support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use speedlayer::Cache;
use speedlayer::key::Ident;
use speedlayer::ttl::Ttl;
use tokio::sync::Barrier;

use support::{Backend, key};

const MINUTE: Ttl = Ttl::seconds(60);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Fees {
    due: u32,
}

/// The ```js block of the README's sharing section.
fn readme_snippet() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("## Sharing Redis with other services")
        .nth(1)
        .expect("the README has a section named \"Sharing Redis with other services\"");
    let start = section
        .find("```js\n")
        .expect("a ```js block in the section")
        + 6;
    let end = start + section[start..].find("```").expect("the block ends");
    section[start..end].to_owned()
}

/// Runs `scenario` (the body of an async function with `redis`, the README's functions and
/// `args` in scope) with node against Redis on `port`; returns what it returns, as JSON.
fn run_node(port: u16, scenario: &str, args: Value) -> Value {
    let dir = std::env::temp_dir().join(format!(
        "speedlayer-node-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let resp = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sharing/resp.js"
    ));
    let program = format!(
        "'use strict';\nconst {{ connect }} = require({resp:?});\n{snippet}\n\
         (async () => {{\n  const redis = await connect({port});\n  const args = {args};\n\
         try {{\n    const result = await (async () => {{ {scenario} }})();\n\
         process.stdout.write(JSON.stringify({{ ok: result === undefined ? null : result }}));\n\
         }} catch (e) {{\n    process.stdout.write(JSON.stringify({{ threw: String(e) }}));\n\
         }} finally {{ redis.quit(); }}\n}})();\n",
        resp = resp.display().to_string(),
        snippet = readme_snippet(),
    );
    let file = dir.join("scenario.js");
    std::fs::write(&file, program).unwrap();
    let output = Command::new("node")
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run node ({e}): install Node.js (apt-get install -y nodejs, as \
             scripts/test.sh does)"
            )
        });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "node failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "node printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    if let Some(threw) = result.get("threw") {
        panic!("the Node code threw: {threw}");
    }
    result["ok"].clone()
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// A load that holds its lease until `release` is passed; returns what `get_or_set` returned.
fn hold_a_load(
    cache: &Cache,
    key: speedlayer::Key,
    value: Fees,
) -> (Arc<Barrier>, Arc<Barrier>, tokio::task::JoinHandle<Fees>) {
    let (loading, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let task = {
        let (cache, loading, release) = (cache.clone(), loading.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_set(&key, MINUTE, || async {
                    loading.wait().await;
                    release.wait().await;
                    Ok::<_, std::io::Error>(value)
                })
                .await
                .unwrap()
        })
    };
    (loading, release, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reader_sees_a_load_in_flight_as_a_miss() {
    let backend = Backend::redis().await;
    let port = backend.server().unwrap().port();
    let cache = Cache::new(backend.config()).await.unwrap();
    let k = key("fees-1");
    let (loading, release, task) = hold_a_load(&cache, k.clone(), Fees { due: 125 });
    loading.wait().await;
    let during = run_node(
        port,
        "const raw = await redis.get(args.key);\n\
         const read = await readCached(redis, args.key, () => ({ from: 'db' }));\n\
         return { raw, read };",
        serde_json::json!({ "key": k.as_str() }),
    );
    assert_eq!(during["raw"], "", "a load in flight holds the empty string");
    assert_eq!(
        during["read"],
        serde_json::json!({ "from": "db" }),
        "a miss"
    );
    release.wait().await;
    assert_eq!(task.await.unwrap(), Fees { due: 125 });
    let after = run_node(
        port,
        "return await readCached(redis, args.key, () => ({ from: 'db' }));",
        serde_json::json!({ "key": k.as_str() }),
    );
    assert_eq!(after, serde_json::json!({ "due": 125 }), "the stored value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_delete_or_write_during_a_load_keeps_the_older_value_out() {
    let backend = Backend::redis().await;
    let port = backend.server().unwrap().port();
    let cache = Cache::new(backend.config()).await.unwrap();

    // The Node service committed a change and deleted the key while speedlayer was loading the
    // row as it was before the change.
    let k = key("fees-2");
    let (loading, release, task) = hold_a_load(&cache, k.clone(), Fees { due: 100 });
    loading.wait().await;
    run_node(
        port,
        "await invalidate(redis, args.key);",
        serde_json::json!({ "key": k.as_str() }),
    );
    release.wait().await;
    assert_eq!(
        task.await.unwrap(),
        Fees { due: 100 },
        "the caller gets its value"
    );
    assert_eq!(cache.get::<Fees>(&k).await, None, "but it is not cached");
    assert_eq!(cache.stats().stale_sets_refused, 1);

    // The Node service wrote a fresh value of its own during the load: it stays.
    let k = key("fees-3");
    let (loading, release, task) = hold_a_load(&cache, k.clone(), Fees { due: 100 });
    loading.wait().await;
    run_node(
        port,
        "await redis.call('SET', args.key, JSON.stringify({ due: 0 }), 'PX', 60000);",
        serde_json::json!({ "key": k.as_str() }),
    );
    release.wait().await;
    task.await.unwrap();
    assert_eq!(cache.get::<Fees>(&k).await, Some(Fees { due: 0 }));
    assert_eq!(cache.stats().stale_sets_refused, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_tag_invalidation_reaches_every_entry() {
    let backend = Backend::redis().await;
    let port = backend.server().unwrap().port();
    let cache = Cache::new(backend.config()).await.unwrap();
    let tag = cache
        .namespace()
        .global()
        .tag(&Ident::from_static("student"), 42)
        .unwrap();
    for i in 0..1_200u32 {
        cache
            .set_tagged(
                &key(i),
                &Fees { due: i },
                MINUTE,
                std::slice::from_ref(&tag),
            )
            .await
            .unwrap();
    }
    cache
        .set(&key("untagged"), &Fees { due: 1 }, MINUTE)
        .await
        .unwrap();
    run_node(
        port,
        "await invalidateTag(redis, args.tag);",
        serde_json::json!({ "tag": tag.as_str() }),
    );
    for i in (0..1_200u32).step_by(7) {
        assert_eq!(cache.get::<Fees>(&key(i)).await, None, "{i}");
    }
    assert_eq!(
        cache.get::<Fees>(&key("untagged")).await,
        Some(Fees { due: 1 })
    );
    assert_eq!(
        cache.invalidate_tag(&tag).await.unwrap(),
        0,
        "the index is empty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_escapes_ids_as_speedlayer_does() {
    let backend = Backend::redis().await;
    let port = backend.server().unwrap().port();
    let ids = [
        "student_456",
        "2001:db8::1",
        "ana@school.org",
        "a b*c?[d]",
        "50%",
        "line\nbreak",
        "ümlaut ✓ 🎓",
        "{hash}",
        "~tilde:colon",
        "+plus.dot-dash_",
    ];
    let escaped = run_node(
        port,
        "return args.ids.map(escapeId);",
        serde_json::json!({ "ids": ids }),
    );
    let expected: Vec<String> = ids.iter().map(|id| speedlayer::key::escape(id)).collect();
    assert_eq!(escaped, serde_json::json!(expected));
    // And the key a Node service builds is the one speedlayer reads.
    let cache = Cache::new(backend.config()).await.unwrap();
    let k = cache
        .namespace()
        .global()
        .key(
            &Ident::from_static("fees"),
            &Ident::from_static("summary"),
            "a b*c?[d]",
        )
        .unwrap();
    run_node(
        port,
        "await redis.call('SET', 'fees:summary:' + escapeId(args.id), JSON.stringify({ due: 9 }), 'PX', 60000);",
        serde_json::json!({ "id": "a b*c?[d]" }),
    );
    assert_eq!(cache.get::<Fees>(&k).await, Some(Fees { due: 9 }));
}
