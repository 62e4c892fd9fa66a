//! Invalidation: the seed events through the registry, tags and tag rules, outages and restarts
//! (`registry`), and the race between a slow read and a write (`stale_set_race`), on the memory
//! backend and a real Redis.

#[path = "../support/mod.rs"]
mod support;

/// Runs each named `async fn(Backend)` of the invoking module on memory and on a real Redis.
macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(crate::support::Backend::memory()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(crate::support::Backend::redis().await).await;
                }
            )*
        }
    };
}

mod registry;
mod school;
mod stale_set_race;
