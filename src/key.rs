//! Validated cache keys: `[<prefix>:][@<tenant>:]<domain>:<entity>:<id>[:<context>...]`.
//!
//! A [`Key`] can only be built through a [`Scope`] (a deployment [`Namespace`], optionally narrowed
//! to one tenant), from a domain and an entity that are [`Ident`]s (short lowercase identifiers,
//! validated once), and from ids that are escaped. There is no way to turn an arbitrary string into
//! a `Key`.
//!
//! # Escaping ids
//!
//! Ids (and context parts, and tenant ids) are arbitrary user data: emails, IPv6 addresses, names
//! with spaces, strings with newlines. They are percent-encoded byte by byte (UTF-8), except for
//! the characters `A-Z a-z 0-9 - _ . @ +`, which are kept as they are. So:
//!
//! | id | segment |
//! | --- | --- |
//! | `student_456` | `student_456` |
//! | `2026-02-04` | `2026-02-04` |
//! | `192.168.1.1` | `192.168.1.1` |
//! | `ana@school.org` | `ana@school.org` |
//! | `2001:db8::1` | `2001%3Adb8%3A%3A1` |
//! | `a*b` | `a%2Ab` |
//! | `50%` | `50%25` |
//!
//! The escaping is injective (only `%` followed by two upper-case hex digits is ever produced for
//! an escaped byte, and `%` itself is escaped), so two different ids never give the same key.
//! An escaped segment never contains `:` (so no id can add or remove a segment), the glob
//! characters `* ? [ ] \` (so no id can widen a [`KeyPattern`]), `{ }` (so no id can choose a
//! Redis Cluster hash slot), spaces or control characters. A Node service reads an id back with
//! `decodeURIComponent`; in Rust, [`Key::id`] does it.
//!
//! # Length bounds
//!
//! An escaped id, context or tenant segment is at most [`MAX_SEGMENT_LEN`] bytes (256) and a whole
//! key at most [`MAX_KEY_LEN`] bytes (1024); a key has at most [`MAX_CONTEXTS`] context segments.
//! Longer input is refused with a [`KeyError`] naming the limit: the bound applies to the escaped
//! form, so 256 ASCII letters fit but only 28 four-byte emoji do. Hash a long id yourself (with a
//! collision-resistant hash) if it must be used as a key.
//!
//! # Prefix and tenant
//!
//! A [`Namespace`] may carry a deployment prefix (`staging`, `prod`) so that deployments sharing
//! one Redis, or one Redis Cluster where database numbers do not exist, never see each other's
//! keys. When deployments share a server, give every one of them a prefix: a prefix is a segment
//! like any other, so an unprefixed deployment whose domain is named like another's prefix would
//! share its keys.
//!
//! A tenant [`Scope`] (`@<tenant>` segment, after the prefix) is the only way to build keys of that
//! tenant, and it cannot build keys of another tenant nor tenant-less ones: hand the scope to the
//! code that serves one organization and it cannot reach another organization's entries.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::sync::Arc;

/// Maximum length of one escaped id, context or tenant segment, in bytes.
pub const MAX_SEGMENT_LEN: usize = 256;
/// Maximum length of a whole key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Maximum number of context segments after the id.
pub const MAX_CONTEXTS: usize = 4;
/// Maximum length of an [`Ident`] (prefix, domain, entity), in bytes.
pub const MAX_IDENT_LEN: usize = 32;

/// Why a key, identifier or pattern could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A prefix, domain or entity is not a short lowercase identifier.
    #[error(
        "invalid key identifier {value:?}: {reason} (use 1 to {max} characters of a-z, 0-9, \
         '_' or '-', starting with a letter)",
        max = MAX_IDENT_LEN
    )]
    InvalidIdent {
        /// The rejected text (cut to a few bytes over [`MAX_IDENT_LEN`] so logs stay small).
        value: String,
        /// What rule it broke.
        reason: &'static str,
    },
    /// An id, context or tenant is empty.
    #[error("the {part} of a key must not be empty")]
    EmptySegment {
        /// Which part was empty: `"id"`, `"context"` or `"tenant"`.
        part: &'static str,
    },
    /// An escaped id, context or tenant segment is longer than [`MAX_SEGMENT_LEN`].
    #[error(
        "the {part} of a key is {len} bytes once escaped, more than the {max} allowed; hash \
         long ids before using them in keys"
    )]
    SegmentTooLong {
        /// Which part was too long.
        part: &'static str,
        /// Its escaped length in bytes (counted up to the point where escaping stopped).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The whole key is longer than [`MAX_KEY_LEN`].
    #[error("the key is {len} bytes, more than the {max} allowed")]
    KeyTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More than [`MAX_CONTEXTS`] context segments.
    #[error("a key takes at most {max} context segments after its id, {count} were given")]
    TooManyContexts {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A pattern that leaves out the entity or the id, or a string given to [`Scope::parse`]
    /// that is not a key of that scope.
    #[error("malformed key: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// A key in a domain the namespace declares never cached ([`Namespace::never_cache`]).
    #[error(
        "the domain {domain:?} is declared never cached: its data is read from the database on \
         every request, and no cache key can be built in it (coordination state about it, such \
         as an idempotency record or a lock, lives in speedlayer's own domains and stays allowed)"
    )]
    NeverCached {
        /// The domain.
        domain: String,
    },
    /// A domain speedlayer keeps its own coordination state in cannot be declared never cached.
    #[error(
        "the domain {domain:?} holds speedlayer's coordination state and cannot be declared never cached"
    )]
    ReservedDomain {
        /// The domain.
        domain: String,
    },
}

/// Domains that hold speedlayer's own coordination state (idempotency records, locks, rate-limit
/// counters, token revocations, the session index, presence, drafts): never declared
/// never-cached.
pub const COORDINATION_DOMAINS: &[&str] = &[
    "form", "idem", "lock", "presence", "rate", "revoked", "session",
];

/// A validated identifier: a deployment prefix, a domain or an entity.
///
/// 1 to 32 bytes of `a-z`, `0-9`, `_` and `-`, starting with a letter. Build one from a literal in
/// a `const` with [`Ident::from_static`] (an invalid literal is then a compile error), or from
/// configuration with [`Ident::new`].
///
/// ```
/// use speedlayer::key::Ident;
///
/// const FEES: Ident = Ident::from_static("fees");
/// assert_eq!(FEES.as_str(), "fees");
/// assert!(Ident::new("Fees").is_err());
/// assert!(Ident::new("fees:summary").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(Cow<'static, str>);

const fn ident_problem(bytes: &[u8]) -> Option<&'static str> {
    if bytes.is_empty() {
        return Some("it is empty");
    }
    if bytes.len() > MAX_IDENT_LEN {
        return Some("it is too long");
    }
    if !bytes[0].is_ascii_lowercase() {
        return Some("it must start with a lowercase letter");
    }
    let mut i = 1;
    while i < bytes.len() {
        let b = bytes[i];
        if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
            return Some("it may only hold a-z, 0-9, '_' and '-'");
        }
        i += 1;
    }
    None
}

impl Ident {
    /// Validates `value` as an identifier.
    pub fn new(value: &str) -> Result<Ident, KeyError> {
        match ident_problem(value.as_bytes()) {
            None => Ok(Ident(Cow::Owned(value.to_owned()))),
            Some(reason) => Err(KeyError::InvalidIdent {
                value: value.chars().take(MAX_IDENT_LEN + 8).collect(),
                reason,
            }),
        }
    }

    /// Builds an identifier from a literal.
    ///
    /// # Panics
    ///
    /// If `value` is not a valid identifier. Used to initialize a `const`, this is a compile-time
    /// error instead; use [`Ident::new`] for values that are not literals.
    pub const fn from_static(value: &'static str) -> Ident {
        if ident_problem(value.as_bytes()).is_some() {
            panic!(
                "invalid speedlayer identifier: use 1 to 32 characters of a-z, 0-9, '_' or '-', starting with a letter"
            );
        }
        Ident(Cow::Borrowed(value))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for Ident {
    type Error = KeyError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Ident::new(value)
    }
}

/// True for the bytes an escaped segment keeps as they are.
const fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends the escaped form of `raw` to `out`.
fn escape_into(raw: &str, out: &mut String) {
    // Most ids need no escaping: copy the plain run at once.
    let plain = raw.bytes().take_while(|b| is_plain(*b)).count();
    out.push_str(&raw[..plain]);
    for &b in &raw.as_bytes()[plain..] {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0x0f) as usize] as char);
        }
    }
}

/// Escapes one id the way keys do. Exposed so that other code (a Node service, a migration) can
/// be checked against it; building keys never needs it.
///
/// ```
/// assert_eq!(speedlayer::key::escape("2001:db8::1"), "2001%3Adb8%3A%3A1");
/// assert_eq!(speedlayer::key::escape("student_456"), "student_456");
/// ```
pub fn escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    escape_into(raw, &mut out);
    out
}

/// The lowercase hex of the first `bytes` bytes (at most 32) of `data`'s SHA-256: how ids too
/// long or too secret for a key (a session token, a long search text) are named in one.
pub(crate) fn sha256_hex(data: &[u8], bytes: usize) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data);
    let mut out = String::with_capacity(bytes * 2);
    for b in &digest[..bytes.min(digest.len())] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Reverses [`escape`]. Returns `None` for text that [`escape`] cannot have produced.
pub fn unescape(escaped: &str) -> Option<String> {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            let decoded = hi << 4 | lo;
            if is_plain(decoded) {
                // escape() never encodes a plain byte; accepting it would make two spellings
                // decode to the same id.
                return None;
            }
            out.push(decoded);
            i += 3;
        } else if is_plain(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Formats `value` and appends its escaped form to `out`, without an intermediate `String` for
/// plain ids.
/// Appends `id` escaped, as an id segment: not empty, at most [`MAX_SEGMENT_LEN`] escaped.
fn push_escaped_id(out: &mut String, id: &str) -> Result<(), KeyError> {
    let start = out.len();
    escape_into(id, out);
    let len = out.len() - start;
    if len == 0 {
        return Err(KeyError::EmptySegment { part: "id" });
    }
    if len > MAX_SEGMENT_LEN {
        return Err(KeyError::SegmentTooLong {
            part: "id",
            len,
            max: MAX_SEGMENT_LEN,
        });
    }
    Ok(())
}

/// Appends a hash tag segment, `:{tag}`.
fn push_hash_tag(out: &mut String, tag: &Ident) {
    out.push_str(":{");
    out.push_str(tag.as_str());
    out.push('}');
}

/// Fails when a key's text is longer than [`MAX_KEY_LEN`].
fn check_key_len(key: &str) -> Result<(), KeyError> {
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::KeyTooLong {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

fn push_escaped_display(
    out: &mut String,
    value: &dyn fmt::Display,
    part: &'static str,
) -> Result<(), KeyError> {
    struct Escaper<'a> {
        out: &'a mut String,
        written: usize,
        limit_hit: bool,
    }
    impl fmt::Write for Escaper<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let before = self.out.len();
            escape_into(s, self.out);
            self.written += self.out.len() - before;
            if self.written > MAX_SEGMENT_LEN {
                // Stop formatting huge values early instead of escaping all of them.
                self.limit_hit = true;
                return Err(fmt::Error);
            }
            Ok(())
        }
    }
    let start = out.len();
    let mut escaper = Escaper {
        out,
        written: 0,
        limit_hit: false,
    };
    let result = write!(escaper, "{value}");
    let (written, limit_hit) = (escaper.written, escaper.limit_hit);
    if limit_hit || written > MAX_SEGMENT_LEN {
        out.truncate(start);
        return Err(KeyError::SegmentTooLong {
            part,
            len: written,
            max: MAX_SEGMENT_LEN,
        });
    }
    if result.is_err() {
        out.truncate(start);
        return Err(KeyError::Malformed {
            reason: "formatting the id failed",
        });
    }
    if written == 0 {
        return Err(KeyError::EmptySegment { part });
    }
    Ok(())
}

/// A deployment's key namespace: an optional prefix shared by every key it builds.
///
/// ```
/// use speedlayer::key::{Ident, Namespace};
///
/// let ns = Namespace::with_prefix(Ident::from_static("staging"));
/// let key = ns.global().key(&Ident::from_static("fees"), &Ident::from_static("summary"), 456)?;
/// assert_eq!(key.as_str(), "staging:fees:summary:456");
/// # Ok::<(), speedlayer::key::KeyError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Namespace {
    prefix: Option<Ident>,
    /// Domains whose data is never cached.
    never_cached: Vec<Ident>,
}

impl Namespace {
    /// A namespace without prefix: keys start with their domain.
    pub fn root() -> Namespace {
        Namespace::default()
    }

    /// A namespace whose keys all start with `prefix:`.
    pub fn with_prefix(prefix: Ident) -> Namespace {
        Namespace {
            prefix: Some(prefix),
            never_cached: Vec::new(),
        }
    }

    /// Declares domains whose data must never be cached (payments, marks, exam results, audit
    /// logs): every key built in them, in every scope of this namespace, is refused with
    /// [`KeyError::NeverCached`]. Coordination state about them stays allowed: idempotency
    /// records, locks and rate limits live in speedlayer's own domains
    /// ([`COORDINATION_DOMAINS`]), which cannot be declared here. Give this namespace to
    /// [`Config::namespace`](crate::Config::namespace) and build keys from
    /// [`Cache::namespace`](crate::Cache::namespace).
    ///
    /// ```
    /// use speedlayer::key::{Ident, KeyError, Namespace};
    ///
    /// const PAYMENTS: Ident = Ident::from_static("payments");
    /// let ns = Namespace::root().never_cache(&[PAYMENTS])?;
    /// let refused = ns.global().key(&PAYMENTS, &Ident::from_static("receipt"), 7);
    /// assert!(matches!(refused, Err(KeyError::NeverCached { .. })));
    /// # Ok::<(), KeyError>(())
    /// ```
    pub fn never_cache(mut self, domains: &[Ident]) -> Result<Namespace, KeyError> {
        for domain in domains {
            if COORDINATION_DOMAINS.contains(&domain.as_str()) {
                return Err(KeyError::ReservedDomain {
                    domain: domain.as_str().to_owned(),
                });
            }
            if !self.never_cached.contains(domain) {
                self.never_cached.push(domain.clone());
            }
        }
        Ok(self)
    }

    /// True when `domain` is declared never cached.
    pub fn is_never_cached(&self, domain: &Ident) -> bool {
        self.never_cached.contains(domain)
    }

    /// True when `key` lies in a domain this namespace declares never cached (a key built from
    /// another namespace, which the cache then refuses too).
    pub fn refuses(&self, key: &Key) -> bool {
        !self.never_cached.is_empty()
            && self.never_cached.iter().any(|d| d.as_str() == key.domain())
    }

    /// The prefix, if any.
    pub fn prefix(&self) -> Option<&Ident> {
        self.prefix.as_ref()
    }

    /// The scope of keys that belong to no tenant.
    pub fn global(&self) -> Scope {
        let mut base = String::new();
        if let Some(p) = &self.prefix {
            base.push_str(p.as_str());
            base.push(':');
        }
        Scope {
            inner: Arc::new(ScopeInner {
                has_prefix: self.prefix.is_some(),
                has_tenant: false,
                never_cached: self.never_cached.clone(),
                base,
            }),
        }
    }

    /// The scope of one tenant (organization, school, clinic). Its keys carry an `@<tenant>`
    /// segment after the prefix; the tenant id is escaped like any id.
    pub fn tenant(&self, tenant_id: impl fmt::Display) -> Result<Scope, KeyError> {
        let mut base = String::new();
        if let Some(p) = &self.prefix {
            base.push_str(p.as_str());
            base.push(':');
        }
        base.push('@');
        push_escaped_display(&mut base, &tenant_id, "tenant")?;
        base.push(':');
        Ok(Scope {
            inner: Arc::new(ScopeInner {
                has_prefix: self.prefix.is_some(),
                has_tenant: true,
                never_cached: self.never_cached.clone(),
                base,
            }),
        })
    }
}

/// Where keys are built: a namespace, and possibly one tenant of it.
///
/// Cloning is cheap. A tenant scope builds only keys of its tenant.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    inner: Arc<ScopeInner>,
}

#[derive(PartialEq, Eq, Hash)]
struct ScopeInner {
    has_prefix: bool,
    has_tenant: bool,
    /// The namespace's never-cached domains.
    never_cached: Vec<Ident>,
    /// `prefix:@tenant:` (each part only when present), ready to be followed by a domain.
    base: String,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Scope").field(&self.inner.base).finish()
    }
}

impl Scope {
    /// Builds `<domain>:<entity>:<id>` in this scope.
    pub fn key(
        &self,
        domain: &Ident,
        entity: &Ident,
        id: impl fmt::Display,
    ) -> Result<Key, KeyError> {
        self.keyspace(domain, entity).key(id)
    }

    /// A reusable builder for the keys of one domain and entity in this scope.
    pub fn keyspace(&self, domain: &Ident, entity: &Ident) -> KeySpace {
        let mut base = String::with_capacity(self.inner.base.len() + 32);
        base.push_str(&self.inner.base);
        base.push_str(domain.as_str());
        base.push(':');
        base.push_str(entity.as_str());
        base.push(':');
        let refused = self
            .inner
            .never_cached
            .contains(domain)
            .then(|| domain.as_str().to_owned());
        KeySpace {
            inner: Arc::new(KeySpaceInner {
                scope: self.clone(),
                base,
                refused,
            }),
        }
    }

    /// Starts a [`KeyPattern`] over keys of `domain` in this scope.
    pub fn pattern(&self, domain: &Ident) -> PatternBuilder {
        PatternBuilder {
            scope: self.clone(),
            segments: vec![PatSeg::Exact(domain.as_str().to_owned())],
            error: None,
        }
    }

    /// A tag of this scope: `name` and a value (escaped like an id). Entries written with a tag
    /// are removed together when the tag is invalidated.
    ///
    /// ```
    /// use speedlayer::key::{Ident, Namespace};
    ///
    /// let tag = Namespace::root().global().tag(&Ident::from_static("student"), 456)?;
    /// assert_eq!(tag.as_str(), "~tag:student:456");
    /// # Ok::<(), speedlayer::key::KeyError>(())
    /// ```
    pub fn tag(&self, name: &Ident, value: impl fmt::Display) -> Result<Tag, KeyError> {
        let mut index = String::with_capacity(self.inner.base.len() + 32);
        index.push_str(&self.inner.base);
        index.push_str(TAG_MARKER);
        index.push(':');
        index.push_str(name.as_str());
        index.push(':');
        push_escaped_display(&mut index, &value, "tag value")?;
        Ok(Tag { index })
    }

    /// True when this scope belongs to a tenant.
    pub fn is_tenant(&self) -> bool {
        self.inner.has_tenant
    }

    /// Number of leading segments (prefix, tenant) this scope puts before the domain.
    fn leading(&self) -> usize {
        usize::from(self.inner.has_prefix) + usize::from(self.inner.has_tenant)
    }

    /// Parses a key string of this scope back into a [`Key`] (for maintenance tools that list
    /// keys). Fails for strings this scope cannot have built.
    pub fn parse(&self, text: &str) -> Result<Key, KeyError> {
        let rest = text
            .strip_prefix(self.inner.base.as_str())
            .ok_or(KeyError::Malformed {
                reason: "the key does not start with this scope's prefix and tenant",
            })?;
        let mut parts = rest.split(':');
        let domain = parts.next().unwrap_or_default();
        let entity = parts.next().ok_or(KeyError::Malformed {
            reason: "no entity segment",
        })?;
        let id = parts.next().ok_or(KeyError::Malformed {
            reason: "no id segment",
        })?;
        let domain = Ident::new(domain)?;
        let entity = Ident::new(entity)?;
        let mut key = self.keyspace(&domain, &entity).key(RawSegment(id))?;
        for context in parts {
            key = key.with_context(RawSegment(context))?;
        }
        if key.as_str() != text {
            return Err(KeyError::Malformed {
                reason: "a segment is not in escaped form",
            });
        }
        Ok(key)
    }
}

/// Displays an already-escaped segment by unescaping it, so that re-escaping gives it back; used
/// by [`Scope::parse`], which then checks the round trip.
struct RawSegment<'a>(&'a str);

impl fmt::Display for RawSegment<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match unescape(self.0) {
            Some(raw) => f.write_str(&raw),
            None => Err(fmt::Error),
        }
    }
}

/// The keys of one domain and entity in one scope, e.g. `fees:summary:*`.
///
/// ```
/// use speedlayer::key::{Ident, Namespace};
///
/// let fees = Namespace::root()
///     .global()
///     .keyspace(&Ident::from_static("fees"), &Ident::from_static("summary"));
/// assert_eq!(fees.key("student_456")?.as_str(), "fees:summary:student_456");
/// assert_eq!(fees.key("a:b")?.as_str(), "fees:summary:a%3Ab");
/// # Ok::<(), speedlayer::key::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeySpace {
    inner: Arc<KeySpaceInner>,
}

#[derive(PartialEq, Eq, Hash)]
struct KeySpaceInner {
    scope: Scope,
    /// `prefix:@tenant:domain:entity:`.
    base: String,
    /// The domain, when it is declared never cached: no key can be built.
    refused: Option<String>,
}

impl fmt::Debug for KeySpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("KeySpace").field(&self.inner.base).finish()
    }
}

impl KeySpace {
    /// The key of `id` in this keyspace.
    pub fn key(&self, id: impl fmt::Display) -> Result<Key, KeyError> {
        self.check_cacheable()?;
        let base = &self.inner.base;
        let mut full = String::with_capacity(base.len() + 24);
        full.push_str(base);
        push_escaped_display(&mut full, &id, "id")?;
        check_key_len(&full)?;
        Ok(Key {
            full,
            leading: self.inner.scope.leading() as u8,
            contexts: 0,
        })
    }

    /// Writes the text of `id`'s key followed by `suffix` into `out` (cleared first), with the
    /// checks of [`KeySpace::key_str`] and the length bound; for lookups that need the text
    /// only. `suffix` must be segments built from validated parts (`:<context>:{<tag>}`).
    pub(crate) fn write_with_suffix(
        &self,
        id: &str,
        suffix: &str,
        out: &mut String,
    ) -> Result<(), KeyError> {
        self.check_cacheable()?;
        out.clear();
        out.push_str(&self.inner.base);
        push_escaped_id(out, id)?;
        out.push_str(suffix);
        check_key_len(out)
    }

    /// The key of a text id followed by `suffix`, already-formed segments (context segments and
    /// a hash tag) that count as `contexts` context segments: one allocation, for keys whose
    /// tail is built once and reused.
    pub(crate) fn key_with_suffix(
        &self,
        id: &str,
        suffix: &str,
        contexts: u8,
    ) -> Result<Key, KeyError> {
        let mut full = String::with_capacity(self.inner.base.len() + id.len() + suffix.len() + 8);
        self.write_with_suffix(id, suffix, &mut full)?;
        Ok(Key {
            full,
            leading: self.inner.scope.leading() as u8,
            contexts,
        })
    }

    /// The keys of `ids`, each paired with its id: the input of
    /// [`Cache::get_or_set_many`](crate::Cache::get_or_set_many). Fails on the first id that
    /// cannot make a key, naming the problem; nothing is read or written then.
    ///
    /// ```
    /// use speedlayer::key::{Ident, Namespace};
    ///
    /// let students = Namespace::root()
    ///     .global()
    ///     .keyspace(&Ident::from_static("school"), &Ident::from_static("student"));
    /// let keys = students.keys([7, 8])?;
    /// assert_eq!(keys[1].0, 8);
    /// assert_eq!(keys[1].1.as_str(), "school:student:8");
    /// # Ok::<(), speedlayer::key::KeyError>(())
    /// ```
    pub fn keys<Id: fmt::Display>(
        &self,
        ids: impl IntoIterator<Item = Id>,
    ) -> Result<Vec<(Id, Key)>, KeyError> {
        ids.into_iter()
            .map(|id| {
                let key = self.key(&id)?;
                Ok((id, key))
            })
            .collect()
    }

    /// The key of a text id: [`KeySpace::key`] without going through `Display`.
    pub fn key_str(&self, id: &str) -> Result<Key, KeyError> {
        self.check_cacheable()?;
        let base = &self.inner.base;
        let mut full = String::with_capacity(base.len() + id.len() + 24);
        full.push_str(base);
        push_escaped_id(&mut full, id)?;
        check_key_len(&full)?;
        Ok(Key {
            full,
            leading: self.inner.scope.leading() as u8,
            contexts: 0,
        })
    }

    /// Every key of this keyspace starts with this (`<prefix>:<domain>:<entity>:`).
    pub(crate) fn base(&self) -> &str {
        &self.inner.base
    }

    /// A pattern matching every key of this keyspace (any id, with or without context segments).
    pub fn pattern_all(&self) -> KeyPattern {
        let mut segs = self.inner.base.trim_end_matches(':').split(':');
        for _ in 0..self.inner.scope.leading() {
            segs.next();
        }
        let domain = segs.next().unwrap_or_default().to_owned();
        let entity = segs.next().unwrap_or_default().to_owned();
        KeyPattern::new(
            &self.inner.scope,
            vec![PatSeg::Exact(domain), PatSeg::Exact(entity), PatSeg::Any],
            true,
        )
    }

    /// The scope this keyspace belongs to.
    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    fn check_cacheable(&self) -> Result<(), KeyError> {
        match &self.inner.refused {
            Some(domain) => Err(KeyError::NeverCached {
                domain: domain.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// A validated key. The only way to name an entry in a store.
///
/// `Display` and [`Key::as_str`] give the exact text stored in Redis.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    full: String,
    /// Number of segments before the domain (prefix, tenant).
    leading: u8,
    /// Number of context segments after the id.
    contexts: u8,
}

impl Key {
    #[cfg(any(feature = "outbox-postgres", feature = "outbox-sqlite"))]
    /// A key read back from what [`Key::stored_parts`] gave (the outbox's rows); `None` for
    /// parts no key can have.
    pub(crate) fn from_stored(full: &str, leading: u8, contexts: u8) -> Option<Key> {
        let segments = full.split(':').count();
        (!full.is_empty()
            && full.len() <= MAX_KEY_LEN
            && usize::from(leading) + 3 + usize::from(contexts) <= segments)
            .then(|| Key {
                full: full.to_owned(),
                leading,
                contexts,
            })
    }

    #[cfg(any(feature = "outbox-postgres", feature = "outbox-sqlite"))]
    /// What [`Key::from_stored`] needs.
    pub(crate) fn stored_parts(&self) -> (&str, u8, u8) {
        (&self.full, self.leading, self.contexts)
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// Appends a context segment (`<domain>:<entity>:<id>:<context>`), escaped like an id.
    pub fn with_context(mut self, context: impl fmt::Display) -> Result<Key, KeyError> {
        self.check_context_room()?;
        self.full.push(':');
        push_escaped_display(&mut self.full, &context, "context")?;
        check_key_len(&self.full)?;
        self.contexts += 1;
        Ok(self)
    }

    /// Appends a Redis Cluster hash tag segment, `{tag}`: keys with the same tag live in the
    /// same slot, so one script can touch them all. Ids are escaped and never hold `{` or `}`,
    /// so this is the only way a key gets a hash tag. Counts as a context segment.
    ///
    /// ```
    /// use speedlayer::key::{Ident, Namespace};
    ///
    /// let key = Namespace::root()
    ///     .global()
    ///     .key(&Ident::from_static("rate"), &Ident::from_static("ip"), "10.0.0.1")?
    ///     .with_hash_tag(&Ident::from_static("auth-login"))?;
    /// assert_eq!(key.as_str(), "rate:ip:10.0.0.1:{auth-login}");
    /// # Ok::<(), speedlayer::key::KeyError>(())
    /// ```
    pub fn with_hash_tag(mut self, tag: &Ident) -> Result<Key, KeyError> {
        self.check_context_room()?;
        push_hash_tag(&mut self.full, tag);
        check_key_len(&self.full)?;
        self.contexts += 1;
        Ok(self)
    }

    /// Fails when the key already has its maximum of context segments.
    fn check_context_room(&self) -> Result<(), KeyError> {
        if usize::from(self.contexts) >= MAX_CONTEXTS {
            return Err(KeyError::TooManyContexts {
                count: usize::from(self.contexts) + 1,
                max: MAX_CONTEXTS,
            });
        }
        Ok(())
    }

    fn segments(&self) -> std::str::Split<'_, char> {
        self.full.split(':')
    }

    fn segment(&self, index: usize) -> &str {
        self.segments().nth(index).unwrap_or_default()
    }

    /// The domain segment.
    pub fn domain(&self) -> &str {
        self.segment(usize::from(self.leading))
    }

    /// The entity segment.
    pub fn entity(&self) -> &str {
        self.segment(usize::from(self.leading) + 1)
    }

    /// The id, unescaped.
    pub fn id(&self) -> String {
        unescape(self.segment(usize::from(self.leading) + 2)).unwrap_or_default()
    }

    /// The context segments, unescaped.
    pub fn contexts(&self) -> Vec<String> {
        self.segments()
            .skip(usize::from(self.leading) + 3)
            .map(|s| unescape(s).unwrap_or_default())
            .collect()
    }

    /// Total number of `:`-separated segments.
    pub fn segment_count(&self) -> usize {
        usize::from(self.leading) + 3 + usize::from(self.contexts)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.full)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

/// The segment that starts a tag's index key. It cannot be a domain (domains start with a
/// letter), so no key can collide with a tag index.
const TAG_MARKER: &str = "~tag";

/// A tag: a name for a group of entries that are invalidated together (every dashboard that shows
/// student 456, say). Built with [`Scope::tag`]; its text is the key of its member index,
/// `[<prefix>:][@<tenant>:]~tag:<name>:<value>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    index: String,
}

impl Tag {
    #[cfg(any(feature = "outbox-postgres", feature = "outbox-sqlite"))]
    /// A tag read back from its stored index key (the outbox's rows); `None` for text that is
    /// not a tag index key.
    pub(crate) fn from_stored(index: &str) -> Option<Tag> {
        (index.len() <= MAX_KEY_LEN && index.contains(TAG_MARKER)).then(|| Tag {
            index: index.to_owned(),
        })
    }

    /// The index key, as stored.
    pub fn as_str(&self) -> &str {
        &self.index
    }

    /// Reads a member of this tag's index back as a [`Key`]: `None` unless `text` is a key this
    /// tag's scope (prefix and tenant) can have built. Another client can write anything into an
    /// index; only keys of the tag's own scope are ever removed through it.
    pub(crate) fn member_key(&self, text: &str) -> Option<Key> {
        let base_len = self.index.find(TAG_MARKER)?;
        let base = &self.index[..base_len];
        let rest = text.strip_prefix(base)?;
        if text.len() > MAX_KEY_LEN {
            return None;
        }
        let parts: Vec<&str> = rest.split(':').collect();
        if parts.len() < 3 || parts.len() > 3 + MAX_CONTEXTS {
            return None;
        }
        if ident_problem(parts[0].as_bytes()).is_some()
            || ident_problem(parts[1].as_bytes()).is_some()
        {
            return None;
        }
        let last = parts.len() - 1;
        for (i, part) in parts.iter().enumerate().skip(2) {
            let hash_tag = i == last
                && i > 2
                && part
                    .strip_prefix('{')
                    .and_then(|p| p.strip_suffix('}'))
                    .is_some_and(|inner| ident_problem(inner.as_bytes()).is_none());
            if !hash_tag
                && (part.is_empty() || part.len() > MAX_SEGMENT_LEN || unescape(part).is_none())
            {
                return None;
            }
        }
        Some(Key {
            full: text.to_owned(),
            leading: base.matches(':').count() as u8,
            contexts: (parts.len() - 3) as u8,
        })
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({:?})", self.index)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.index)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    Entity,
    Id,
    Context,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PatSeg {
    Exact(String),
    Any,
}

/// Builds a [`KeyPattern`]: every segment is given or explicitly left open.
///
/// ```
/// use speedlayer::key::{Ident, Namespace};
///
/// const DASHBOARD: Ident = Ident::from_static("dashboard");
/// let scope = Namespace::root().global();
/// // Every role's dashboard of user 456: `dashboard:*:456`.
/// let pattern = scope.pattern(&DASHBOARD).any_entity().id(456).build()?;
/// assert_eq!(pattern.glob(), "dashboard:*:456");
/// let key = scope.key(&DASHBOARD, &Ident::from_static("teacher"), 456)?;
/// assert!(pattern.matches(&key));
/// // `*` in a Redis glob would also match `dashboard:student:1:456` (id 1, context 456);
/// // `matches` does not.
/// let other = scope.key(&DASHBOARD, &Ident::from_static("student"), 1)?.with_context(456)?;
/// assert!(!pattern.matches(&other));
/// # Ok::<(), speedlayer::key::KeyError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PatternBuilder {
    scope: Scope,
    segments: Vec<PatSeg>,
    error: Option<KeyError>,
}

impl PatternBuilder {
    /// Segments are given in key order: the entity right after the domain, the id after the
    /// entity, contexts after the id. A call out of order makes `build` fail.
    fn at(mut self, position: Position) -> Self {
        let ok = match position {
            Position::Entity => self.segments.len() == 1,
            Position::Id => self.segments.len() == 2,
            Position::Context => self.segments.len() >= 3,
        };
        if !ok {
            self.error.get_or_insert(KeyError::Malformed {
                reason: "pattern segments must be given in order: entity, id, then contexts",
            });
        }
        self
    }

    fn push_exact_ident(mut self, position: Position, ident: &Ident) -> Self {
        self = self.at(position);
        self.segments.push(PatSeg::Exact(ident.as_str().to_owned()));
        self
    }

    fn push_exact_display(
        mut self,
        position: Position,
        value: &dyn fmt::Display,
        part: &'static str,
    ) -> Self {
        self = self.at(position);
        let mut seg = String::new();
        match push_escaped_display(&mut seg, value, part) {
            Ok(()) => self.segments.push(PatSeg::Exact(seg)),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    fn push_any(mut self, position: Position) -> Self {
        self = self.at(position);
        self.segments.push(PatSeg::Any);
        self
    }

    /// The entity segment is `entity`.
    pub fn entity(self, entity: &Ident) -> Self {
        self.push_exact_ident(Position::Entity, entity)
    }

    /// The entity segment is left open.
    pub fn any_entity(self) -> Self {
        self.push_any(Position::Entity)
    }

    /// The id segment is `id` (escaped).
    pub fn id(self, id: impl fmt::Display) -> Self {
        self.push_exact_display(Position::Id, &id, "id")
    }

    /// The id segment is left open.
    pub fn any_id(self) -> Self {
        self.push_any(Position::Id)
    }

    /// A context segment equal to `context` (escaped).
    pub fn context(self, context: impl fmt::Display) -> Self {
        self.push_exact_display(Position::Context, &context, "context")
    }

    /// A context segment left open.
    pub fn any_context(self) -> Self {
        self.push_any(Position::Context)
    }

    /// Builds a pattern that matches keys with exactly the segments given.
    pub fn build(self) -> Result<KeyPattern, KeyError> {
        self.finish(false)
    }

    /// Builds a pattern that also matches keys with any number of further context segments.
    pub fn build_with_any_contexts(self) -> Result<KeyPattern, KeyError> {
        self.finish(true)
    }

    fn finish(self, open_tail: bool) -> Result<KeyPattern, KeyError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.segments.len() < 3 {
            return Err(KeyError::Malformed {
                reason: "a pattern names or leaves open the entity and the id",
            });
        }
        if self.segments.len() > 3 + MAX_CONTEXTS {
            return Err(KeyError::TooManyContexts {
                count: self.segments.len() - 3,
                max: MAX_CONTEXTS,
            });
        }
        Ok(KeyPattern::new(&self.scope, self.segments, open_tail))
    }
}

/// A set of keys for invalidation, e.g. `dashboard:*:456`.
///
/// Built with [`Scope::pattern`] or [`KeySpace::pattern_all`] from the same validated parts as
/// keys; a segment is open only where the builder was told so, and the prefix and tenant of the
/// scope are always fixed. [`KeyPattern::glob`] is the Redis `MATCH` glob, which may match more
/// (a Redis `*` also crosses `:`); [`KeyPattern::matches`] is exact, segment by segment, and is
/// what decides.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyPattern {
    glob: String,
    /// Fixed leading text (prefix and tenant).
    base: String,
    segments: Vec<PatSeg>,
    open_tail: bool,
}

impl KeyPattern {
    fn new(scope: &Scope, segments: Vec<PatSeg>, open_tail: bool) -> KeyPattern {
        let base = scope.inner.base.clone();
        let mut glob = base.clone();
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                glob.push(':');
            }
            match seg {
                PatSeg::Exact(s) => glob.push_str(s),
                PatSeg::Any => glob.push('*'),
            }
        }
        if open_tail && !glob.ends_with('*') {
            glob.push('*');
        }
        KeyPattern {
            glob,
            base,
            segments,
            open_tail,
        }
    }

    /// The Redis glob (`SCAN MATCH`): a superset of the keys this pattern covers.
    pub fn glob(&self) -> &str {
        &self.glob
    }

    /// The fixed text every matching key starts with.
    pub fn literal_prefix(&self) -> &str {
        let end = self.glob.find('*').unwrap_or(self.glob.len());
        &self.glob[..end]
    }

    /// Exact test of a key.
    pub fn matches(&self, key: &Key) -> bool {
        self.matches_str(key.as_str())
    }

    /// Exact test of a key's text (as returned by `SCAN`).
    pub fn matches_str(&self, key: &str) -> bool {
        let Some(rest) = key.strip_prefix(self.base.as_str()) else {
            return false;
        };
        let mut parts = rest.split(':');
        for seg in &self.segments {
            match (seg, parts.next()) {
                (_, None) => return false,
                (PatSeg::Any, Some(p)) => {
                    if p.is_empty() {
                        return false;
                    }
                }
                (PatSeg::Exact(s), Some(p)) => {
                    if s != p {
                        return false;
                    }
                }
            }
        }
        let extra = parts.count();
        let allowed = MAX_CONTEXTS + 3 - self.segments.len().min(MAX_CONTEXTS + 3);
        if self.open_tail {
            extra <= allowed
        } else {
            extra == 0
        }
    }
}

impl fmt::Debug for KeyPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPattern({:?})", self.glob)
    }
}

impl fmt::Display for KeyPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.glob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DASH: Ident = Ident::from_static("dashboard");
    const STUDENT: Ident = Ident::from_static("student");

    #[test]
    fn readable_ids_stay_readable() {
        let ks = Namespace::root().global().keyspace(&DASH, &STUDENT);
        for id in [
            "student_456",
            "2026-02-04",
            "10A",
            "192.168.1.1",
            "auth-login",
        ] {
            assert_eq!(
                ks.key(id).unwrap().as_str(),
                format!("dashboard:student:{id}")
            );
        }
    }

    #[test]
    fn hostile_ids_are_escaped() {
        let ks = Namespace::root().global().keyspace(&DASH, &STUDENT);
        let cases = [
            ("2001:db8::1", "2001%3Adb8%3A%3A1"),
            ("a b", "a%20b"),
            ("line\nbreak", "line%0Abreak"),
            ("50%", "50%25"),
            ("*", "%2A"),
            ("[a-z]?", "%5Ba-z%5D%3F"),
            ("back\\slash", "back%5Cslash"),
            ("{tag}", "%7Btag%7D"),
            ("é", "%C3%A9"),
        ];
        for (id, escaped) in cases {
            let key = ks.key(id).unwrap();
            assert_eq!(key.as_str(), format!("dashboard:student:{escaped}"));
            assert_eq!(key.id(), id);
            assert_eq!(key.segment_count(), 3);
        }
    }

    #[test]
    fn length_is_bounded() {
        let ks = Namespace::root().global().keyspace(&DASH, &STUDENT);
        let huge = "x".repeat(10_000);
        assert!(matches!(
            ks.key(&huge),
            Err(KeyError::SegmentTooLong { part: "id", .. })
        ));
        assert!(ks.key("x".repeat(MAX_SEGMENT_LEN)).is_ok());
        assert!(ks.key("é".repeat(MAX_SEGMENT_LEN / 6 + 1)).is_err());
        assert!(matches!(ks.key(""), Err(KeyError::EmptySegment { .. })));
    }

    #[test]
    fn contexts_are_bounded() {
        let ks = Namespace::root().global().keyspace(&DASH, &STUDENT);
        let mut key = ks.key(1).unwrap();
        for i in 0..MAX_CONTEXTS {
            key = key.with_context(i).unwrap();
        }
        assert!(matches!(
            key.with_context("one more"),
            Err(KeyError::TooManyContexts { .. })
        ));
    }

    #[test]
    fn tenant_and_prefix() {
        let ns = Namespace::with_prefix(Ident::from_static("prod"));
        let a = ns.tenant("acme").unwrap();
        let key = a.key(&DASH, &STUDENT, 7).unwrap();
        assert_eq!(key.as_str(), "prod:@acme:dashboard:student:7");
        assert_eq!(key.domain(), "dashboard");
        assert_eq!(key.entity(), "student");
        assert_eq!(key.id(), "7");
        let evil = ns.tenant("acme:dashboard").unwrap();
        assert_eq!(
            evil.key(&DASH, &STUDENT, 7).unwrap().as_str(),
            "prod:@acme%3Adashboard:dashboard:student:7"
        );
        assert!(ns.tenant("").is_err());
    }

    #[test]
    fn idents_are_validated() {
        for bad in ["", "Fees", "1abc", "a:b", "a*", "a b", &"a".repeat(33)] {
            assert!(Ident::new(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "fees", "auth-login", "x_1"] {
            assert!(Ident::new(good).is_ok());
        }
    }

    #[test]
    fn unescape_rejects_other_spellings() {
        assert_eq!(unescape("a%3Ab").as_deref(), Some("a:b"));
        assert_eq!(unescape("a%3ab"), None);
        assert_eq!(unescape("%41"), None);
        assert_eq!(unescape("a:b"), None);
        assert_eq!(unescape("%4"), None);
    }

    #[test]
    fn patterns() {
        let scope = Namespace::root().global();
        let p = scope.pattern(&DASH).any_entity().id(456).build().unwrap();
        assert_eq!(p.glob(), "dashboard:*:456");
        assert!(p.matches_str("dashboard:teacher:456"));
        assert!(!p.matches_str("dashboard:teacher:4567"));
        assert!(!p.matches_str("dashboard:student:1:456"));
        assert!(!p.matches_str("dashboard:teacher:456:ctx"));
        let all = scope.keyspace(&DASH, &STUDENT).pattern_all();
        assert_eq!(all.glob(), "dashboard:student:*");
        assert!(all.matches_str("dashboard:student:1"));
        assert!(all.matches_str("dashboard:student:1:x"));
        assert!(!all.matches_str("dashboard:studentx:1"));
        assert!(scope.pattern(&DASH).any_entity().build().is_err());
        // Out of order: an id where the entity goes.
        assert!(scope.pattern(&DASH).id(1).any_entity().build().is_err());
        assert!(scope.pattern(&DASH).context(1).build().is_err());
    }

    #[test]
    fn parse_round_trips() {
        let scope = Namespace::with_prefix(Ident::from_static("prod"))
            .tenant("a b")
            .unwrap();
        let key = scope
            .key(&DASH, &STUDENT, "x:y")
            .unwrap()
            .with_context("2026-01-01")
            .unwrap();
        assert_eq!(scope.parse(key.as_str()).unwrap(), key);
        assert!(scope.parse("prod:@other:dashboard:student:1").is_err());
        assert!(scope.parse("prod:@a%20b:dashboard:student:a%3ab").is_err());
    }

    #[test]
    fn tag_members_are_read_back_only_within_the_tag_scope() {
        let scope = Namespace::with_prefix(Ident::from_static("prod"))
            .tenant("acme")
            .unwrap();
        let tag = scope.tag(&Ident::from_static("student"), 7).unwrap();
        let key = scope
            .key(&DASH, &STUDENT, "x:y")
            .unwrap()
            .with_context("c")
            .unwrap();
        let back = tag.member_key(key.as_str()).unwrap();
        assert_eq!(back, key);
        assert_eq!(back.id(), "x:y");
        let tagged = scope
            .key(&DASH, &STUDENT, 1)
            .unwrap()
            .with_hash_tag(&Ident::from_static("r"))
            .unwrap();
        assert_eq!(tag.member_key(tagged.as_str()).unwrap(), tagged);
        for foreign in [
            "prod:@other:dashboard:student:1",
            "dashboard:student:1",
            "prod:@acme:dashboard:student",
            "prod:@acme:Dash:student:1",
            "prod:@acme:dashboard:student:a b",
            "prod:@acme:dashboard:student:",
            "prod:@acme:~tag:student:7",
            "prod:@acme:dashboard:student:{r}",
        ] {
            assert_eq!(tag.member_key(foreign), None, "{foreign}");
        }
    }
}
