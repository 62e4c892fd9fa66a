//! Invalidation: what each write event makes stale, tags, and the registry of tag rules.
//!
//! The rule: write to the database first, then invalidate; never update a cached copy of
//! persisted data in place. A write event declares its targets by implementing [`Invalidates`],
//! so an event that declares nothing does not compile when passed to
//! [`Cache::invalidate`](crate::Cache::invalidate):
//!
//! ```
//! use speedlayer::invalidation::{Invalidates, Targets};
//! use speedlayer::key::{Ident, KeyError, Namespace};
//!
//! const DASHBOARD: Ident = Ident::from_static("dashboard");
//! const STUDENT: Ident = Ident::from_static("student");
//! const AUTH: Ident = Ident::from_static("auth");
//! const ROLE: Ident = Ident::from_static("role");
//!
//! struct StudentProfileUpdated { student_id: u64 }
//!
//! impl Invalidates for StudentProfileUpdated {
//!     fn targets(&self, ns: &Namespace, t: &mut Targets) -> Result<(), KeyError> {
//!         let scope = ns.global();
//!         t.key(scope.key(&DASHBOARD, &STUDENT, self.student_id)?)
//!             .key(scope.key(&AUTH, &ROLE, self.student_id)?);
//!         Ok(())
//!     }
//! }
//! ```
//!
//! An event without a declaration is a compile error, not a silent no-op:
//!
//! ```compile_fail,E0277
//! # async fn demo(cache: speedlayer::Cache) {
//! struct ReportCardPublished { class_id: u64 }
//! // error[E0277]: `ReportCardPublished` does not declare what it invalidates
//! cache.invalidate(&ReportCardPublished { class_id: 7 }).await;
//! # }
//! ```
//!
//! # Tags and declared patterns
//!
//! A [`Tag`] groups entries invalidated together ("every dashboard that shows student 456").
//! Entries get tags when they are written ([`Cache::get_or_set_tagged`](crate::Cache::get_or_set_tagged)),
//! or from a *tag rule* of the [`InvalidationRegistry`]: every key matching a declared
//! [`KeyPattern`] gets the tag the rule derives from it. A declared pattern is invalidated through
//! its tag, so the cost is the number of entries it covers, never the size of the keyspace.
//! Scanning the keyspace with a pattern exists only as the bounded maintenance tool
//! [`Cache::sweep`](crate::Cache::sweep).
//!
//! Each tag keeps an index of its members (on Redis, a sorted set scored by the time until which
//! each member can live). Members are pruned as the index is written, the index expires with its
//! longest-lived member, and taking the index and deleting it is one atomic step: the index holds
//! live members only and cannot drift. An entry written again *without* a tag it had before can
//! still be removed by that tag until its earlier lifetime ends: a spurious miss, never stale
//! data.
//!
//! # No stale set after a race
//!
//! A reader that misses takes a *lease* on the key (the key holds a lease marker while the load
//! runs) and stores its value only if the key still holds its marker. Deleting the key or
//! invalidating one of its tags removes the marker, so a load that began before an invalidation
//! can never store what it read: it returns the value to its caller and caches nothing. Tags are
//! recorded before the load starts, so a tag invalidation that runs at any point during the load
//! finds the key.

use std::fmt;

use crate::key::{Key, KeyError, KeyPattern, Namespace, Tag};

/// A write event that knows what it makes stale.
///
/// `targets` is called by [`Cache::invalidate`](crate::Cache::invalidate) with the cache's
/// [`Namespace`]; it lists keys and tags.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not declare what it invalidates",
    label = "no invalidation is declared for this event",
    note = "implement `speedlayer::invalidation::Invalidates` for `{Self}`, listing the keys and tags it makes stale"
)]
pub trait Invalidates {
    /// Adds the keys and tags this event makes stale.
    fn targets(&self, ns: &Namespace, targets: &mut Targets) -> Result<(), KeyError>;
}

/// The keys and tags an event invalidates.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Targets {
    keys: Vec<Key>,
    tags: Vec<Tag>,
}

impl Targets {
    /// An empty list.
    pub fn new() -> Targets {
        Targets::default()
    }

    /// Adds a key.
    pub fn key(&mut self, key: Key) -> &mut Targets {
        if !self.keys.contains(&key) {
            self.keys.push(key);
        }
        self
    }

    /// Adds a tag: every entry carrying it is invalidated.
    pub fn tag(&mut self, tag: Tag) -> &mut Targets {
        if !self.tags.contains(&tag) {
            self.tags.push(tag);
        }
        self
    }

    /// The keys.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The tags.
    pub fn tags(&self) -> &[Tag] {
        &self.tags
    }

    /// The keys and tags, moved out.
    pub(crate) fn into_parts(self) -> (Vec<Key>, Vec<Tag>) {
        (self.keys, self.tags)
    }
}

type Derive = Box<dyn Fn(&Key) -> Result<Tag, KeyError> + Send + Sync>;

struct TagRule {
    pattern: KeyPattern,
    derive: Derive,
}

/// The tag rules of a cache, declared once at start-up: which keys carry which derived tags.
///
/// ```
/// use speedlayer::invalidation::InvalidationRegistry;
/// use speedlayer::key::{Ident, Namespace};
///
/// const DASHBOARD: Ident = Ident::from_static("dashboard");
/// const USER: Ident = Ident::from_static("user");
///
/// let scope = Namespace::root().global();
/// // `dashboard:*:<id>` for every role: each such key carries the tag `user:<id>`, so that
/// // invalidating that tag removes every dashboard of the user.
/// let rule_scope = scope.clone();
/// let registry = InvalidationRegistry::builder()
///     .tag_rule(
///         scope.pattern(&DASHBOARD).any_entity().any_id().build()?,
///         move |key| rule_scope.tag(&USER, key.id()),
///     )
///     .build();
/// let teacher = scope.key(&DASHBOARD, &Ident::from_static("teacher"), 9)?;
/// assert_eq!(registry.tags_for(&teacher), vec![scope.tag(&USER, 9)?]);
/// # Ok::<(), speedlayer::key::KeyError>(())
/// ```
#[derive(Default)]
pub struct InvalidationRegistry {
    rules: Vec<TagRule>,
}

impl InvalidationRegistry {
    /// Starts an empty registry.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// The tags the rules give `key` (in rule order, without duplicates). A rule whose
    /// derivation fails for this key gives it no tag.
    pub fn tags_for(&self, key: &Key) -> Vec<Tag> {
        let mut tags = Vec::new();
        self.extend_tags(key, &mut tags);
        tags
    }

    pub(crate) fn extend_tags(&self, key: &Key, tags: &mut Vec<Tag>) {
        for rule in &self.rules {
            if rule.pattern.matches(key) {
                match (rule.derive)(key) {
                    Ok(tag) if !tags.contains(&tag) => tags.push(tag),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(key = %key, error = %e, "tag rule failed for key"),
                }
            }
        }
    }

    /// Number of tag rules.
    pub fn rules(&self) -> usize {
        self.rules.len()
    }
}

impl fmt::Debug for InvalidationRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.rules.iter().map(|r| r.pattern.glob()))
            .finish()
    }
}

/// Builds an [`InvalidationRegistry`].
#[derive(Default)]
#[must_use]
pub struct RegistryBuilder {
    rules: Vec<TagRule>,
}

impl RegistryBuilder {
    /// Declares that every key matching `pattern` carries the tag `derive` gives it.
    pub fn tag_rule(
        mut self,
        pattern: KeyPattern,
        derive: impl Fn(&Key) -> Result<Tag, KeyError> + Send + Sync + 'static,
    ) -> RegistryBuilder {
        self.rules.push(TagRule {
            pattern,
            derive: Box::new(derive),
        });
        self
    }

    /// The registry.
    pub fn build(self) -> InvalidationRegistry {
        InvalidationRegistry { rules: self.rules }
    }
}

/// What [`Cache::invalidate`](crate::Cache::invalidate) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidationReport {
    /// The event's type name.
    pub event: &'static str,
    /// The keys the event named.
    pub keys: Vec<Key>,
    /// The tags the event named.
    pub tags: Vec<Tag>,
    /// Entries removed by key.
    pub keys_removed: u64,
    /// Entries removed through tags.
    pub tag_entries_removed: u64,
    /// The backend was unusable: the invalidation was applied to the fallback and queued for the
    /// backend. A background task applies it as soon as the backend answers, before any read
    /// reaches it ([`Cache::flush_invalidations`](crate::Cache::flush_invalidations) waits for
    /// it).
    pub deferred: bool,
}

impl InvalidationReport {
    /// All entries removed.
    pub fn removed(&self) -> u64 {
        self.keys_removed + self.tag_entries_removed
    }

    /// True when the backend applied the invalidation before this call returned; false when it
    /// was queued for the backend ([`InvalidationReport::deferred`]).
    pub fn applied(&self) -> bool {
        !self.deferred
    }
}
