//! The school ERP demo: an axum service on a real database with speedlayer in front of it, and
//! a built-in workload that shows what the cache saves.
//!
//! ```sh
//! cargo run --release --features axum --example school_erp             # SQLite + in-memory cache
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --release --features axum --example school_erp
//! DATABASE_URL=postgres://user:pass@127.0.0.1/erp cargo run --release --features axum --example school_erp
//! cargo run --release --features axum --example school_erp -- --serve  # keep serving on 127.0.0.1:3000
//! cargo run --release --features axum --example school_erp -- --requests 100000 --duration 60
//! cargo run --release --features axum --example school_erp -- --instances 3 --restart-redis
//! ```
//!
//! The workload run prints a readable report and, last, one JSON line. It exits 0 when every
//! request succeeded, no read was stale, no payment or attendance mark was doubled or lost and no
//! logged-out token was accepted; 1 otherwise, and 2 on bad arguments or setup.

mod app;
mod db;
mod fleet;
mod workload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use speedlayer::Cache;

use crate::app::AppState;
use crate::db::{Db, SchoolSize};
use crate::workload::Workload;

const USAGE: &str =
    "usage: school_erp [--serve] [--port N] [--requests N] [--duration SECONDS] [--concurrency N]

  (default)        start the service on a free loopback port, run the workload, print the report
  --serve          keep serving on 127.0.0.1:PORT (default 3000) instead of running the workload
  --requests N     workload size (default 100000)
  --duration S     stop the workload after S seconds even if requests remain (default 120)
  --concurrency N  virtual users sending at once (default 32)
  --instances N    run N instances of the service as separate processes sharing the database
                   and Redis (REDIS_URL, or a redis-server started on a free loopback port),
                   each with an in-process tier; the workload sends to each in turn (default 1)
  --no-tier        no in-process tier (to compare)
  --restart-redis  with --instances and no REDIS_URL: stop the fleet's Redis 2 s into the
                   workload (SIGTERM; its append-only file keeps what it held), leave it down
                   for 1 s, and start it again on the same port

environment: DATABASE_URL=postgres://... (default: embedded SQLite), REDIS_URL=redis://...
(default: in-memory cache), RUST_LOG (default: warn)";

struct Args {
    serve: bool,
    instances: usize,
    no_tier: bool,
    restart_redis: bool,
    /// Set for the extra instances `--instances` starts: the database to attach to.
    attach_db: Option<String>,
    port: u16,
    port_set: bool,
    workload: Workload,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        serve: false,
        instances: 1,
        no_tier: false,
        restart_redis: false,
        attach_db: None,
        port: 3000,
        port_set: false,
        workload: Workload::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--serve" => args.serve = true,
            "--port" => {
                args.port = parse(&value("--port")?, "--port")?;
                args.port_set = true;
            }
            "--requests" => {
                let n: u64 = parse(&value("--requests")?, "--requests")?;
                if !(1..=10_000_000).contains(&n) {
                    return Err("--requests must be between 1 and 10000000".into());
                }
                args.workload.requests = n;
            }
            "--duration" => {
                let secs: f64 = parse(&value("--duration")?, "--duration")?;
                if !(secs > 0.0 && secs <= 86_400.0) {
                    return Err("--duration must be between 0 and 86400 seconds".into());
                }
                args.workload.duration = Duration::from_secs_f64(secs);
            }
            "--concurrency" => {
                let n: usize = parse(&value("--concurrency")?, "--concurrency")?;
                if !(1..=1_000).contains(&n) {
                    return Err("--concurrency must be between 1 and 1000".into());
                }
                args.workload.concurrency = n;
            }
            "--instances" => {
                let n: usize = parse(&value("--instances")?, "--instances")?;
                if !(1..=8).contains(&n) {
                    return Err("--instances must be between 1 and 8".into());
                }
                args.instances = n;
            }
            "--no-tier" => args.no_tier = true,
            "--restart-redis" => args.restart_redis = true,
            "--attach-db" => args.attach_db = Some(value("--attach-db")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.instances > 1 && args.serve {
        return Err("--instances runs the workload; it does not combine with --serve".into());
    }
    if args.restart_redis && args.instances < 2 {
        return Err(
            "--restart-redis restarts the fleet's Redis: use it with --instances 2 or more".into(),
        );
    }
    if args.port_set && !args.serve {
        return Err("--port applies to --serve only (the workload uses a free port)".into());
    }
    Ok(args)
}

fn parse<T: std::str::FromStr>(text: &str, name: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{name}: {text:?} is not a valid number"))
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("error: {message}\n");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    // Before anything is counted: /metrics renders what this recorder saw.
    app::prometheus();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match run(args).await {
        Ok(code) => std::process::exit(code),
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    }
}

/// Ctrl-C, or SIGTERM (what a container runtime or systemd sends).
async fn shutdown_signal() -> Result<(), String> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot wait for SIGTERM: {e}"))?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.map_err(|e| format!("cannot wait for Ctrl-C: {e}")),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| format!("cannot wait for Ctrl-C: {e}"))
    }
}

async fn run(args: Args) -> Result<i32, String> {
    let size = SchoolSize::default();
    let started = Instant::now();
    let database_url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    let db = match &args.attach_db {
        Some(target) => Db::attach(target).await,
        None => Db::open(database_url.as_deref(), size).await,
    }
    .map_err(|e| format!("cannot open the database: {e}"))?;
    // A fleet needs one Redis: REDIS_URL, or one started here.
    let owned_redis = if args.instances > 1 && std::env::var("REDIS_URL").is_err() {
        Some(fleet::OwnedRedis::start()?)
    } else {
        None
    };
    if args.restart_redis && owned_redis.is_none() {
        return Err(
            "--restart-redis restarts the Redis this program starts: unset REDIS_URL".into(),
        );
    }
    let config = match &owned_redis {
        Some(redis) => speedlayer::Config::redis(
            speedlayer::config::RedisConfig::from_url(&redis.url()).map_err(|e| e.to_string())?,
        ),
        None => speedlayer::Config::from_env().map_err(|e| e.to_string())?,
    };
    // In a fleet, a process's memory fallback would answer reads during an outage that no
    // other instance's write can invalidate: the instances read the database instead.
    let config = if args.instances > 1 || args.attach_db.is_some() {
        config.fallback(speedlayer::config::Fallback::None)
    } else {
        config
    };
    let config = if args.no_tier {
        config
    } else {
        config.local_tier(app::local_tier(&speedlayer::Namespace::root()))
    };
    let cache = Cache::new(config).await.map_err(|e| e.to_string())?;
    // With in-process tiers (on Redis only), another instance may show a write's old value for
    // the tier's stated lag after it returned.
    let tier_lag = if cache.tier_stats().is_some() {
        workload::TIER_LAG
    } else {
        Duration::ZERO
    };
    let backend = cache.stats().backend.to_string();
    let database = db.kind().name();
    println!(
        "seeded {database} with {} students, {} teachers, {} parents, fee plans, payments and attendance in {:.1} s; cache on {backend}",
        size.students,
        size.teachers,
        size.students,
        started.elapsed().as_secs_f64()
    );
    let db_target = db.target(database_url.as_deref());
    let state = Arc::new(AppState::new(db, cache));
    // The roll-call sink fails on purpose every fourth call: no mark may be lost or doubled.
    state.fail_roll_sink_every(4);
    // An attached instance leaves the cache to the first one, which has just cleared it.
    let forget = if args.attach_db.is_some() {
        Ok(0)
    } else {
        state.forget_cached_copies().await
    };
    match forget {
        Ok(0) => {}
        Ok(n) => println!("removed {n} cached entries left by an earlier run"),
        // Redis down at start: the service runs on the fallback, and a Redis that comes back
        // may hold copies of an earlier run's database for up to their TTL.
        Err(e) => eprintln!("warning: cannot clear cached copies of an earlier run: {e}"),
    }

    if args.serve {
        let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
        let service = app::start(state, addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!(
            "serving on http://{} (try: curl -H 'x-user-id: s42' http://{}/api/dashboard/student/s42); Ctrl-C or SIGTERM stops",
            service.addr, service.addr
        );
        shutdown_signal().await?;
        println!("stopping: finishing requests in flight");
        service.stop().await.map_err(|e| e.to_string())?;
        return Ok(0);
    }

    let service = app::start(state, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let mut workload = args.workload;
    workload.students = size.students;
    workload.teachers = size.teachers;
    workload.tier_lag = tier_lag;
    println!(
        "running {} requests ({} virtual users, at most {:.0} s) against http://{}",
        workload.requests,
        workload.concurrency,
        workload.duration.as_secs_f64(),
        service.addr
    );
    let mut addrs = vec![service.addr];
    let mut others = Vec::new();
    if args.instances > 1 {
        let url = match &owned_redis {
            Some(redis) => redis.url(),
            None => std::env::var("REDIS_URL").unwrap_or_default(),
        };
        for i in 1..args.instances {
            let other = fleet::Instance::start(i, &db_target, &url, args.no_tier)?;
            addrs.push(other.addr);
            others.push(other);
        }
        println!(
            "{} instances (separate processes) on one {database} database and one Redis: {}",
            args.instances,
            addrs
                .iter()
                .map(|a| format!("http://{a}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (restarter, kept_redis) = match owned_redis {
        Some(redis) if args.restart_redis => {
            let finished = finished.clone();
            let task = Some(tokio::task::spawn_blocking(move || {
                let mut redis = redis;
                let at = Instant::now() + Duration::from_secs(2);
                while Instant::now() < at {
                    if finished.load(std::sync::atomic::Ordering::Relaxed) {
                        return (redis, Err("the workload ended before it".to_owned()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let refused = redis.restart(Duration::from_secs(1));
                (redis, refused)
            }));
            (task, None)
        }
        redis => (None, redis),
    };
    let report = workload::run(&addrs, workload).await;
    finished.store(true, std::sync::atomic::Ordering::Relaxed);
    let restarted = match restarter {
        Some(task) => {
            let (redis, refused) = task
                .await
                .map_err(|e| format!("the Redis restart panicked: {e}"))?;
            Some((redis, refused))
        }
        None => None,
    };
    drop(others);
    service.stop().await.map_err(|e| e.to_string())?;
    let restart_failed = match &restarted {
        Some((_, Ok(refused))) => {
            println!(
                "Redis restarted 2 s into the workload: connections refused for {} ms",
                refused.as_millis()
            );
            false
        }
        Some((_, Err(e))) => {
            eprintln!("Redis was not restarted: {e}");
            true
        }
        None => false,
    };
    drop(restarted);
    drop(kept_redis);
    let report = report?;
    println!();
    let backend = if args.instances > 1 {
        let tiers = if args.no_tier { "without" } else { "with" };
        format!(
            "{backend}, {} instances {tiers} in-process tiers",
            args.instances
        )
    } else {
        backend
    };
    report.print(&backend, database);
    println!("{}", report.json_line());
    Ok(
        if report.failed_requests == 0
            && !restart_failed
            && report.stale_reads == 0
            && report.duplicate_payments == 0
            && report.drifted_counters == 0
            && report.attendance_lost == 0
            && report.attendance_doubled == 0
            && report.logged_out_accepted == 0
        {
            0
        } else {
            1
        },
    )
}
