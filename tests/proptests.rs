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

mod query_keys {
    use proptest::prelude::*;
    use proptest::test_runner::FileFailurePersistence;
    use speedlayer::key::{Ident, MAX_KEY_LEN, Namespace};
    use speedlayer::query::{Dimension, QueryShape};

    fn shape() -> QueryShape {
        let space = Namespace::with_prefix(Ident::from_static("prod"))
            .tenant("north-school")
            .unwrap()
            .keyspace(
                &Ident::from_static("reports"),
                &Ident::from_static("students"),
            );
        QueryShape::builder(&space)
            .dimension(Dimension::text("org").required())
            .dimension(Dimension::text("term").case_fold())
            .dimension(Dimension::integer("grade", 1..=12))
            .dimension(Dimension::page_size("limit", 1..=100, 20))
            .dimension(Dimension::search("q"))
            .ignore("_")
            .build()
            .unwrap()
    }

    /// A query in normal form: values as the shape keeps them (trimmed, lower case where folded,
    /// in bounds, search text single-spaced and lower case), dense in separator characters.
    #[derive(Clone, Debug, PartialEq)]
    struct Normal {
        org: String,
        term: Option<String>,
        grade: Option<i64>,
        limit: i64,
        q: Option<String>,
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-zé&=%#?+ 0-9]{1,12}"
            .prop_map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .prop_filter("not blank", |s| !s.is_empty())
    }

    fn normal() -> impl Strategy<Value = Normal> {
        (
            "[A-Za-z0-9&=%#.: -]{1,20}".prop_map(|s| s.trim().to_owned()),
            proptest::option::of(word()),
            proptest::option::of(1i64..=12),
            1i64..=100,
            proptest::option::of(prop_oneof![
                word(),
                "[a-z ]{60,200}"
                    .prop_map(|s| { s.split_whitespace().collect::<Vec<_>>().join(" ") })
            ]),
        )
            .prop_filter("org not blank", |(org, ..)| !org.is_empty())
            .prop_filter("q not blank", |(.., q)| q.as_deref() != Some(""))
            .prop_map(|(org, term, grade, limit, q)| Normal {
                org,
                term,
                grade,
                limit,
                q,
            })
    }

    fn params(n: &Normal) -> Vec<(String, String)> {
        let mut p = vec![
            ("org".to_owned(), n.org.clone()),
            ("limit".to_owned(), n.limit.to_string()),
        ];
        if let Some(t) = &n.term {
            p.push(("term".into(), t.clone()));
        }
        if let Some(g) = n.grade {
            p.push(("grade".into(), g.to_string()));
        }
        if let Some(q) = &n.q {
            p.push(("q".into(), q.clone()));
        }
        p
    }

    /// The same query written another way: parameters shuffled, padded with whitespace, folded
    /// values in other cases, search text with other spacing and case, a default page size left
    /// out, an out-of-range page size clamped, an ignored parameter added.
    fn rewrite(n: &Normal, seed: u64) -> Vec<(String, String)> {
        let mut p = params(n);
        let upper = seed & 1 == 1;
        for (name, value) in &mut p {
            match name.as_str() {
                "org" | "grade" => *value = format!("  {value}\t"),
                "term" if upper => *value = format!(" {} ", value.to_uppercase()),
                "q" => {
                    let spaced = value.replace(' ', "  \t ");
                    *value = format!(" {} ", if upper { spaced.to_uppercase() } else { spaced });
                }
                "limit" if n.limit == 100 && seed & 2 == 2 => *value = "100000".into(),
                "limit" if n.limit == 1 && seed & 2 == 2 => *value = "-3".into(),
                _ => {}
            }
        }
        if n.limit == 20 && seed & 4 == 4 {
            p.retain(|(name, _)| name != "limit");
        }
        if seed & 8 == 8 {
            p.push(("_".into(), seed.to_string()));
        }
        let len = p.len();
        p.rotate_left((seed as usize) % len);
        if seed & 16 == 16 {
            p.reverse();
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
            ..ProptestConfig::default()
        })]

        #[test]
        fn equivalent_queries_give_one_key(n in normal(), seed in any::<u64>()) {
            let s = shape();
            let a = s.key(params(&n)).unwrap();
            let b = s.key(rewrite(&n, seed)).unwrap();
            prop_assert_eq!(a.key(), b.key());
            prop_assert_eq!(a.tag(), b.tag());
            prop_assert!(a.key().as_str().len() <= MAX_KEY_LEN);
        }

        #[test]
        fn different_queries_never_collide(a in normal(), b in normal()) {
            // Search text is compared as the shape folds it.
            prop_assume!(a != b);
            let s = shape();
            let ka = s.key(params(&a)).unwrap();
            let kb = s.key(params(&b)).unwrap();
            prop_assert_ne!(ka.key(), kb.key(), "{:?} and {:?}", a, b);
        }

        #[test]
        fn any_input_is_a_key_or_a_clear_error(
            pairs in proptest::collection::vec(("[a-z_]{1,6}", any::<String>()), 0..8)
        ) {
            // No panic, and every key is bounded.
            if let Ok(k) = shape().key(pairs) {
                prop_assert!(k.key().as_str().len() <= MAX_KEY_LEN);
            }
        }
    }
}
