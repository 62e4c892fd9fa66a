//! Invalidation: the seed events through the registry, tags and tag rules, outages and restarts
//! (`registry`), and the race between a slow read and a write (`stale_set_race`), on the memory
//! backend and a real Redis.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

mod registry;
mod school;
mod stale_set_race;
