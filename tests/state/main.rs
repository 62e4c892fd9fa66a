//! Short-lived state without losing facts, each capability's suite run on the memory backend and
//! on a real Redis: never-cached domains, token revocations, the session index.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

mod never_cached;
mod revocation;
mod scratch;
mod session;
mod switches;
