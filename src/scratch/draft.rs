//! Drafts: a half-filled form's progress, `form:progress:<user>:<form>`, as JSON for 24 hours,
//! the TTL refreshed on every save.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Cache;
use crate::error::Result;
use crate::key::{Ident, Key, KeySpace};
use crate::ttl::Ttl;

const FORM: Ident = Ident::from_static("form");
const PROGRESS: Ident = Ident::from_static("progress");

/// Form drafts. Cheap to clone.
///
/// A draft is convenience, not a fact: while Redis is unusable a save goes to the process's
/// fallback (or nowhere) and still returns `Ok`, so keep the form in the browser too. A draft
/// that no longer decodes (the form changed between deploys) loads as `None` and is removed, as
/// every value of the typed cache that does not decode.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use speedlayer::scratch::Drafts;
/// use speedlayer::Cache;
///
/// #[derive(Serialize, Deserialize, PartialEq, Debug)]
/// struct Enrolment { step: u8, guardian: String }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let drafts = Drafts::new(&Cache::memory());
/// drafts.save("p42", "enrolment", &Enrolment { step: 2, guardian: "Ana".into() }).await?;
/// let back: Option<Enrolment> = drafts.load("p42", "enrolment").await?;
/// assert_eq!(back.map(|d| d.step), Some(2));
/// # Ok::<(), speedlayer::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Drafts {
    cache: Cache,
    keys: KeySpace,
    ttl: Ttl,
}

impl Drafts {
    /// Drafts on `cache`, kept 24 hours after their last save.
    pub fn new(cache: &Cache) -> Drafts {
        Drafts {
            cache: cache.clone(),
            keys: cache.namespace().global().keyspace(&FORM, &PROGRESS),
            ttl: Ttl::hours(24),
        }
    }

    /// How long a draft lives after its last save.
    pub fn ttl(mut self, ttl: Ttl) -> Drafts {
        self.ttl = ttl;
        self
    }

    /// The key of `user`'s draft of `form`.
    pub fn key_of(&self, user: &str, form: &str) -> Result<Key> {
        Ok(self.keys.key_str(user)?.with_context(form)?)
    }

    /// Saves the progress, for the draft TTL from now. Errors when it cannot be encoded or is
    /// larger than the cache's largest value.
    pub async fn save<T: Serialize + ?Sized>(
        &self,
        user: &str,
        form: &str,
        progress: &T,
    ) -> Result<()> {
        let key = self.key_of(user, form)?;
        if !self.cache.store().is_on(crate::switch::Capability::Scratch) {
            return Err(crate::Error::new(
                crate::ErrorKind::Unavailable,
                "drafts are switched off (scratch): the draft was not saved",
            ));
        }
        self.cache.set(&key, progress, self.ttl).await
    }

    /// The saved progress, if any.
    pub async fn load<T: DeserializeOwned>(&self, user: &str, form: &str) -> Result<Option<T>> {
        let key = self.key_of(user, form)?;
        if !self.cache.store().is_on(crate::switch::Capability::Scratch) {
            return Ok(None);
        }
        Ok(self.cache.get(&key).await)
    }

    /// Drops the draft (the form was submitted). True when one was removed.
    pub async fn discard(&self, user: &str, form: &str) -> Result<bool> {
        let key = self.key_of(user, form)?;
        Ok(self.cache.delete(&key).await)
    }
}
