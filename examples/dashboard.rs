//! Role dashboards, cache-first (`dashboard:{role}:{userId}`, 300 s), behind a role check read
//! through the cache (`auth:role:{userId}`, 1-6 h), and a profile update that drops the
//! student's role and every dashboard that shows the student through a tag rule and a tag.
//!
//! ```sh
//! cargo run --example dashboard                                   # in-memory backend
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example dashboard  # Redis
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use speedlayer::Cache;
use speedlayer::invalidation::{Invalidates, InvalidationRegistry, Targets};
use speedlayer::key::{Ident, KeyError, Namespace};
use speedlayer::ttl::{Ttl, TtlPolicy};

const DASHBOARD: Ident = Ident::from_static("dashboard");
const AUTH: Ident = Ident::from_static("auth");
const ROLE: Ident = Ident::from_static("role");
const USER: Ident = Ident::from_static("user");
const SHOWS_STUDENT: Ident = Ident::from_static("shows-student");

/// The source of truth (a stand-in for PostgreSQL), with its queries counted.
struct Database {
    student_name: Mutex<String>,
    queries: AtomicU32,
}

impl Database {
    async fn role(&self, user: &str) -> Result<String, std::io::Error> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        Ok(if user.starts_with('p') {
            "parent"
        } else {
            "student"
        }
        .to_owned())
    }

    async fn dashboard(&self, role: &str) -> Result<String, std::io::Error> {
        self.queries.fetch_add(3, Ordering::SeqCst); // profile, attendance, fees
        let name = self.student_name.lock().unwrap().clone();
        Ok(format!("{role} dashboard for {name}"))
    }
}

/// A profile update: the student's role entry, all of the student's dashboards (the registry
/// tags every `dashboard:<role>:<id>` with `user:<id>`), and the parent's (tagged at write).
struct StudentProfileUpdated {
    student: u64,
}

impl Invalidates for StudentProfileUpdated {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        let user = format!("s{}", self.student);
        t.key(ns.global().key(&AUTH, &ROLE, &user)?)
            .tag(ns.global().tag(&USER, &user)?)
            .tag(ns.global().tag(&SHOWS_STUDENT, self.student)?);
        Ok(())
    }
}

async fn dashboard(cache: &Cache, db: &Database, user: &str, student: u64) -> String {
    let scope = cache.namespace().global();
    let role_ttl = TtlPolicy::between(Ttl::hours(1), Ttl::hours(6)).expect("1 h <= 6 h");
    let role: String = cache
        .get_or_set(&scope.key(&AUTH, &ROLE, user).unwrap(), role_ttl, || {
            db.role(user)
        })
        .await
        .unwrap();
    let key = scope
        .key(&DASHBOARD, &Ident::new(&role).unwrap(), user)
        .unwrap();
    let shows = [scope.tag(&SHOWS_STUDENT, student).unwrap()];
    cache
        .get_or_set_tagged(&key, Ttl::seconds(300), &shows, || db.dashboard(&role))
        .await
        .unwrap()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = Cache::from_env().await?;
    let ns = cache.namespace().clone();
    let rule_ns = ns.clone();
    let registry = InvalidationRegistry::builder()
        .tag_rule(
            ns.global()
                .pattern(&DASHBOARD)
                .any_entity()
                .any_id()
                .build()?,
            move |key| rule_ns.global().tag(&USER, key.id()),
        )
        .build();
    let cache = cache.with_registry(registry);
    let db = Database {
        student_name: Mutex::new("Asha".into()),
        queries: AtomicU32::new(0),
    };
    println!("backend: {}", cache.stats().backend);
    cache
        .invalidate(&StudentProfileUpdated { student: 7 })
        .await?; // start clean

    for _ in 0..5 {
        dashboard(&cache, &db, "s7", 7).await;
        dashboard(&cache, &db, "p7", 7).await;
    }
    println!(
        "10 dashboard views: {} database queries",
        db.queries.load(Ordering::SeqCst)
    );

    // The write path: the database first, then the event.
    *db.student_name.lock().unwrap() = "Asha K.".into();
    let report = cache
        .invalidate(&StudentProfileUpdated { student: 7 })
        .await?;
    println!("profile updated; {} entries invalidated", report.removed());
    let (student, parent) = (
        dashboard(&cache, &db, "s7", 7).await,
        dashboard(&cache, &db, "p7", 7).await,
    );
    println!("{student}\n{parent}");
    assert!(
        student.ends_with("Asha K.") && parent.ends_with("Asha K."),
        "no stale dashboard"
    );
    let stats = cache.stats();
    println!(
        "database queries: {}; cache hit rate {:.0}%",
        db.queries.load(Ordering::SeqCst),
        stats.hit_rate() * 100.0
    );
    Ok(())
}
