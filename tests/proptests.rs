//! Property tests of keys: every id round-trips, never changes a key's shape, never produces a
//! glob or control character, and never matches a pattern meant for another entity or tenant.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use speedlayer::key::{Ident, KeyError, MAX_SEGMENT_LEN, Namespace, Scope, escape, unescape};

const DOMAIN: Ident = Ident::from_static("dashboard");
const ENTITIES: [Ident; 3] = [
    Ident::from_static("student"),
    Ident::from_static("teacher"),
    Ident::from_static("students"),
];

/// Ids: anything, plus strings dense in the characters that matter.
fn ids() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9:*?\\[\\]\\\\{} %\n\t@.+_-]{0,40}",
        "[0-9a-f:]{2,39}",
        ".{250,300}",
    ]
}

fn scopes() -> impl Strategy<Value = (Option<&'static str>, Option<String>)> {
    (
        prop_oneof![Just(None), Just(Some("prod")), Just(Some("staging"))],
        prop_oneof![Just(None), ids().prop_map(Some)],
    )
}

fn scope_of(prefix: Option<&'static str>, tenant: &Option<String>) -> Result<Scope, KeyError> {
    let ns = match prefix {
        Some(p) => Namespace::with_prefix(Ident::from_static(p)),
        None => Namespace::root(),
    };
    match tenant {
        Some(t) => ns.tenant(t),
        None => Ok(ns.global()),
    }
}

/// Redis glob matching for globs made only of literal text and `*` (what `KeyPattern::glob`
/// produces; the property below checks that it holds no other special character).
fn glob_matches(glob: &str, text: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    if parts.len() == 1 {
        return glob == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptests.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn escaping_round_trips_and_is_clean(id in ids()) {
        let escaped = escape(&id);
        prop_assert_eq!(unescape(&escaped), Some(id.clone()));
        for c in escaped.chars() {
            prop_assert!(
                c.is_ascii_alphanumeric() || "-_.@+%".contains(c),
                "{:?} holds {:?}", escaped, c
            );
        }
    }

    #[test]
    fn ids_round_trip_and_never_change_the_shape(
        (prefix, tenant) in scopes(),
        entity in 0usize..3,
        id in ids(),
        context in proptest::option::of(ids()),
    ) {
        let scope = match scope_of(prefix, &tenant) {
            Ok(s) => s,
            Err(e) => {
                prop_assert!(matches!(e, KeyError::EmptySegment { .. } | KeyError::SegmentTooLong { .. }), "{e}");
                return Ok(());
            }
        };
        let built = scope.key(&DOMAIN, &ENTITIES[entity], &id)
            .and_then(|k| match &context { Some(c) => k.with_context(c), None => Ok(k) });
        let key = match built {
            Ok(k) => k,
            Err(KeyError::EmptySegment { .. }) => {
                prop_assert!(id.is_empty() || context.as_deref() == Some(""));
                return Ok(());
            }
            Err(KeyError::SegmentTooLong { len, .. }) => {
                prop_assert!(len > MAX_SEGMENT_LEN);
                let too_long = escape(&id).len() > MAX_SEGMENT_LEN
                    || context.as_ref().is_some_and(|c| escape(c).len() > MAX_SEGMENT_LEN);
                prop_assert!(too_long);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
        };
        let expected_segments = usize::from(prefix.is_some())
            + usize::from(tenant.is_some())
            + 3
            + usize::from(context.is_some());
        prop_assert_eq!(key.as_str().split(':').count(), expected_segments);
        prop_assert_eq!(key.segment_count(), expected_segments);
        prop_assert_eq!(key.id(), id);
        prop_assert_eq!(key.domain(), "dashboard");
        let entity_name = ENTITIES[entity].as_str().to_owned();
        prop_assert_eq!(key.entity(), entity_name.as_str());
        prop_assert_eq!(key.contexts(), context.into_iter().collect::<Vec<_>>());
        prop_assert_eq!(scope.parse(key.as_str()), Ok(key.clone()));
        for c in key.as_str().chars() {
            prop_assert!(
                c.is_ascii_alphanumeric() || "-_.@+%:".contains(c),
                "{:?} holds {:?}", key.as_str(), c
            );
        }
    }

    #[test]
    fn different_ids_give_different_keys(a in ids(), b in ids()) {
        prop_assume!(a != b);
        let scope = Namespace::root().global();
        if let (Ok(ka), Ok(kb)) = (scope.key(&DOMAIN, &ENTITIES[0], &a), scope.key(&DOMAIN, &ENTITIES[0], &b)) {
            prop_assert_ne!(ka, kb);
        }
    }

    #[test]
    fn patterns_never_reach_another_entity_or_tenant(
        tenant_a in ids(),
        tenant_b in ids(),
        entity_a in 0usize..3,
        entity_b in 0usize..3,
        id in ids(),
        other_id in ids(),
        open_id in any::<bool>(),
    ) {
        let (Ok(scope_a), Ok(scope_b)) = (Namespace::root().tenant(&tenant_a), Namespace::root().tenant(&tenant_b)) else {
            return Ok(());
        };
        let builder = scope_a.pattern(&DOMAIN).entity(&ENTITIES[entity_a]);
        let pattern = if open_id { builder.any_id().build() } else { builder.id(&id).build() };
        let Ok(pattern) = pattern else { return Ok(()) };
        prop_assert!(!pattern.glob().contains(['?', '[', ']', '\\']));
        let Ok(key) = scope_b.key(&DOMAIN, &ENTITIES[entity_b], &other_id) else { return Ok(()) };
        let same_target = tenant_a == tenant_b
            && entity_a == entity_b
            && (open_id || id == other_id);
        prop_assert_eq!(pattern.matches(&key), same_target, "{} vs {}", pattern, key);
        // The glob may match more than `matches` in general (a `*` crosses `:`), but never a key
        // of another tenant or entity.
        if tenant_a != tenant_b || entity_a != entity_b {
            prop_assert!(!glob_matches(pattern.glob(), key.as_str()), "{} vs {}", pattern, key);
        }
        if pattern.matches(&key) {
            prop_assert!(glob_matches(pattern.glob(), key.as_str()));
        }
        // A global key never matches a tenant pattern.
        if let Ok(global) = Namespace::root().global().key(&DOMAIN, &ENTITIES[entity_a], &id) {
            prop_assert!(!pattern.matches(&global));
            prop_assert!(!glob_matches(pattern.glob(), global.as_str()));
        }
    }
}
