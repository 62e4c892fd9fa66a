//! Response header fields for a rate-limit decision.
//!
//! - `RateLimit-Policy: "<policy>";q=<quota>;w=<window seconds>` and
//!   `RateLimit: "<policy>";r=<remaining>;t=<seconds until reset>`, from the IETF HTTPAPI draft
//!   *RateLimit header fields for HTTP*;
//! - the widespread `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`
//!   (seconds until reset, not an epoch time);
//! - `Retry-After` (seconds, at least 1) when the request was denied.
//!
//! Seconds are rounded up, so that a client waiting that long is never early.

use std::time::Duration;

use super::limit::{Decision, Limit};

/// Whole seconds, rounded up.
pub(crate) fn seconds_up(d: Duration) -> u64 {
    let s = d.as_secs();
    if d.subsec_nanos() > 0 { s + 1 } else { s }
}

/// The header fields (name, value) for `decision` under `limit`, for the policy named `policy`
/// (a route name; quotes and backslashes are dropped from it).
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use speedlayer::ratelimit::{headers, Decision, Limit};
///
/// let limit = Limit::fixed_window(NonZeroU32::new(100).unwrap(), Duration::from_secs(60))?;
/// let decision = Decision {
///     allowed: false,
///     limit: 100,
///     remaining: 0,
///     reset_after: Duration::from_millis(29_500),
///     retry_after: Some(Duration::from_millis(29_500)),
/// };
/// let fields = headers::fields("auth-login", &limit, &decision);
/// assert!(fields.contains(&("RateLimit-Policy", "\"auth-login\";q=100;w=60".to_owned())));
/// assert!(fields.contains(&("RateLimit", "\"auth-login\";r=0;t=30".to_owned())));
/// assert!(fields.contains(&("Retry-After", "30".to_owned())));
/// # Ok::<(), speedlayer::ratelimit::LimitError>(())
/// ```
pub fn fields(policy: &str, limit: &Limit, decision: &Decision) -> Vec<(&'static str, String)> {
    let policy: String = policy.chars().filter(|c| *c != '"' && *c != '\\').collect();
    let reset = seconds_up(decision.reset_after);
    let mut fields = vec![
        (
            "RateLimit-Policy",
            format!(
                "\"{policy}\";q={};w={}",
                limit.quota(),
                seconds_up(limit.window()).max(1)
            ),
        ),
        (
            "RateLimit",
            format!("\"{policy}\";r={};t={reset}", decision.remaining),
        ),
        ("X-RateLimit-Limit", limit.quota().to_string()),
        ("X-RateLimit-Remaining", decision.remaining.to_string()),
        ("X-RateLimit-Reset", reset.to_string()),
    ];
    if let Some(retry) = decision.retry_after.filter(|_| !decision.allowed) {
        fields.push(("Retry-After", seconds_up(retry).max(1).to_string()));
    }
    fields
}
