//! Fleet behaviour with Sentinel: the same cross-process tests, with every process finding the
//! primary through three sentinels (`redis+sentinel://` URL).

use crate::support::sentinel::RedisSentinel;

fn sentinel() -> RedisSentinel {
    RedisSentinel::start(1, 3)
}

#[test]
fn an_invalidation_in_one_process_stops_a_load_in_another() {
    super::an_invalidation_in_one_process_stops_a_load_in_another_on(&sentinel().url());
}

#[test]
fn duplicate_payments_over_two_processes_run_once() {
    super::duplicate_payments_over_two_processes_run_once_on(&sentinel().url());
}

#[test]
fn overlapping_batches_across_processes_load_each_row_once() {
    super::overlapping_batches_across_processes_load_each_row_once_on(&sentinel().url());
}

#[test]
fn a_revoked_token_is_refused_by_every_process_at_once() {
    super::a_revoked_token_is_refused_by_every_process_at_once_on(&sentinel().url());
}

#[test]
fn two_processes_contending_for_a_lock_never_overlap() {
    super::two_processes_contending_for_a_lock_never_overlap_on(&sentinel().url());
}

#[test]
fn counters_updated_from_two_processes_end_equal_to_the_database() {
    super::counters_updated_from_two_processes_end_equal_to_the_database_on(&sentinel().url());
}

#[test]
fn presence_is_shared_by_every_process() {
    super::presence_is_shared_by_every_process_on(&sentinel().url());
}

#[test]
fn a_users_sessions_revoked_in_one_process_are_gone_in_the_others() {
    super::a_users_sessions_revoked_in_one_process_are_gone_in_the_others_on(&sentinel().url());
}

#[test]
fn after_a_write_returns_the_other_instances_stop_reading_the_old_value() {
    super::tier::after_a_write_returns_the_other_instances_stop_reading_the_old_value_on(
        &super::shared(crate::support::Backend::sentinel()),
    );
}

#[test]
fn a_killed_channel_makes_every_instance_stop_serving_l1() {
    super::tier::a_killed_channel_makes_every_instance_stop_serving_l1_on(&super::shared(
        crate::support::Backend::sentinel(),
    ));
}
