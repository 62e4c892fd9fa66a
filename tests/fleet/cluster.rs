//! Fleet behaviour on a Redis Cluster: the same cross-process tests, with every process reaching
//! a local 3-primary cluster through a `redis+cluster://` URL. A batch's leases there are taken
//! per slot (and kept only below the lowest slot another process holds), invalidations and
//! idempotency records live on whichever primary owns their slot.

use crate::support::cluster::RedisCluster;

fn cluster() -> RedisCluster {
    RedisCluster::start(3, 0)
}

#[test]
fn an_invalidation_in_one_process_stops_a_load_in_another() {
    super::an_invalidation_in_one_process_stops_a_load_in_another_on(&cluster().url());
}

#[test]
fn duplicate_payments_over_two_processes_run_once() {
    super::duplicate_payments_over_two_processes_run_once_on(&cluster().url());
}

#[test]
fn overlapping_batches_across_processes_load_each_row_once() {
    super::overlapping_batches_across_processes_load_each_row_once_on(&cluster().url());
}

#[test]
fn a_revoked_token_is_refused_by_every_process_at_once() {
    super::a_revoked_token_is_refused_by_every_process_at_once_on(&cluster().url());
}
