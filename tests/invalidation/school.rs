//! The seed's keys and write events, as a service would declare them.

use speedlayer::Cache;
use speedlayer::invalidation::{Invalidates, InvalidationRegistry, Targets};
use speedlayer::key::{Ident, Key, KeyError, Namespace, Tag};

pub const DASHBOARD: Ident = Ident::from_static("dashboard");
pub const STUDENT: Ident = Ident::from_static("student");
pub const PARENT: Ident = Ident::from_static("parent");
pub const TEACHER: Ident = Ident::from_static("teacher");
pub const FEES: Ident = Ident::from_static("fees");
pub const SUMMARY: Ident = Ident::from_static("summary");
pub const AUTH: Ident = Ident::from_static("auth");
pub const ROLE: Ident = Ident::from_static("role");
pub const USER: Ident = Ident::from_static("user");
pub const SHOWS_STUDENT: Ident = Ident::from_static("shows-student");

pub fn dashboard(ns: &Namespace, role: &Ident, user: u64) -> Key {
    ns.global().key(&DASHBOARD, role, user).unwrap()
}

pub fn fees(ns: &Namespace, student: u64) -> Key {
    ns.global().key(&FEES, &SUMMARY, student).unwrap()
}

pub fn role(ns: &Namespace, user: u64) -> Key {
    ns.global().key(&AUTH, &ROLE, user).unwrap()
}

/// Entries that show a student's data (their dashboard, their parents' dashboards).
pub fn shows_student(ns: &Namespace, student: u64) -> Tag {
    ns.global().tag(&SHOWS_STUDENT, student).unwrap()
}

pub fn user_tag(ns: &Namespace, user: &str) -> Result<Tag, KeyError> {
    ns.global().tag(&USER, user)
}

pub struct StudentProfileUpdated {
    pub student_id: u64,
}

impl Invalidates for StudentProfileUpdated {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        let scope = ns.global();
        t.key(scope.key(&DASHBOARD, &STUDENT, self.student_id)?)
            .key(scope.key(&AUTH, &ROLE, self.student_id)?);
        Ok(())
    }
}

pub struct FeePaymentRecorded {
    pub student_id: u64,
}

impl Invalidates for FeePaymentRecorded {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        let scope = ns.global();
        t.key(scope.key(&FEES, &SUMMARY, self.student_id)?)
            // The dashboards that show it: the student's and the parents'.
            .tag(scope.tag(&SHOWS_STUDENT, self.student_id)?);
        Ok(())
    }
}

pub struct RoleChanged {
    pub user_id: u64,
}

impl Invalidates for RoleChanged {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        t.key(ns.global().key(&AUTH, &ROLE, self.user_id)?);
        Ok(())
    }
}

pub struct UserSuspended {
    pub user_id: u64,
}

impl Invalidates for UserSuspended {
    fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
        t.key(ns.global().key(&AUTH, &ROLE, self.user_id)?)
            // Every dashboard of the user, whatever the role: the tag rule's tag.
            .tag(user_tag(ns, &self.user_id.to_string())?);
        Ok(())
    }
}

/// The registry: every `dashboard:<role>:<id>` key carries the tag `user:<id>`.
pub fn registry(ns: &Namespace) -> InvalidationRegistry {
    let scope = ns.global();
    let rule_ns = ns.clone();
    InvalidationRegistry::builder()
        .tag_rule(
            scope
                .pattern(&DASHBOARD)
                .any_entity()
                .any_id()
                .build()
                .unwrap(),
            move |key| user_tag(&rule_ns, &key.id()),
        )
        .build()
}

pub async fn cache_with_registry(config: speedlayer::Config) -> Cache {
    let cache = Cache::new(config).await.unwrap();
    let ns = cache.namespace().clone();
    cache.with_registry(registry(&ns))
}
