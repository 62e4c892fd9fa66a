//! Rate limiting: each algorithm against a reference model (memory, fake clock), the same
//! behaviour on memory and Redis, exactness under concurrency on a real Redis, and outages.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

#[cfg(feature = "axum")]
mod axum_layer;
mod behaviour;
mod layers;
mod outage;
mod proptests;
