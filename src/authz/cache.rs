//! The hook's answer cache: allow, deny and lists, each reused for one fixed TTL.
//!
//! Bounded in entries ([`MAX_ENTRIES`]) and bytes ([`MAX_BYTES`]): a user naming a new id
//! per request cannot grow it without end. Since every entry lives the same TTL, insertion
//! order is expiry order, so one FIFO serves both: expired entries leave from the front on
//! every insert, and when the cache is full the oldest leave first. A key answered again
//! (after it expired) leaves a stale FIFO slot behind, recognised by its stamp and skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Kind;

pub const MAX_ENTRIES: usize = 65_536;
pub const MAX_BYTES: usize = 16 << 20;

/// Per-entry bookkeeping on top of the key and answer bytes (map slot, FIFO slot).
const OVERHEAD: usize = 96;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Question {
    /// `subscribe`: may the user follow this id?
    Subscribe { kind: Kind, id: Box<str> },
    /// `list`: which ids does the user have?
    List { kind: Kind },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub user: Box<str>,
    pub question: Question,
}

impl Key {
    fn bytes(&self) -> usize {
        self.user.len()
            + match &self.question {
                Question::Subscribe { id, .. } => id.len(),
                Question::List { .. } => 0,
            }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Allow(bool),
    Ids(Arc<[String]>),
}

impl Answer {
    fn bytes(&self) -> usize {
        match self {
            Answer::Allow(_) => 0,
            Answer::Ids(ids) => ids.iter().map(|i| i.len() + 24).sum(),
        }
    }
}

struct Entry {
    answer: Answer,
    expires: Instant,
    stamp: u64,
    bytes: usize,
}

pub struct Cache {
    ttl: Duration,
    map: HashMap<Key, Entry>,
    order: VecDeque<(Key, u64)>,
    bytes: usize,
    next_stamp: u64,
    max_entries: usize,
    max_bytes: usize,
}

impl Cache {
    pub fn new(ttl: Duration) -> Self {
        Self::bounded(ttl, MAX_ENTRIES, MAX_BYTES)
    }

    pub fn bounded(ttl: Duration, max_entries: usize, max_bytes: usize) -> Self {
        Self {
            ttl,
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            next_stamp: 0,
            max_entries,
            max_bytes,
        }
    }

    /// The answer to `key`, if one is still fresh at `now`.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Answer> {
        self.map
            .get(key)
            .filter(|e| e.expires > now)
            .map(|e| e.answer.clone())
    }

    /// Remembers `answer` until `now + ttl` (nothing with a zero TTL, or one entry too big
    /// for the whole cache).
    pub fn put(&mut self, key: Key, answer: Answer, now: Instant) {
        let bytes = key.bytes() + answer.bytes() + OVERHEAD;
        if self.ttl.is_zero() || bytes > self.max_bytes {
            return;
        }
        if let Some(old) = self.map.remove(&key) {
            self.bytes -= old.bytes;
        }
        self.evict(now, bytes);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.bytes += bytes;
        self.order.push_back((key.clone(), stamp));
        self.map.insert(
            key,
            Entry {
                answer,
                expires: now + self.ttl,
                stamp,
                bytes,
            },
        );
    }

    /// Drops expired entries, then the oldest until `incoming` more bytes and one more
    /// entry fit.
    fn evict(&mut self, now: Instant, incoming: usize) {
        while let Some((key, stamp)) = self.order.front() {
            let live = self.map.get(key).filter(|e| e.stamp == *stamp);
            let full = self.map.len() >= self.max_entries || self.bytes + incoming > self.max_bytes;
            match live {
                // A stale slot (the key was answered again since): just drop it.
                None => {}
                Some(e) if e.expires <= now || full => {
                    self.bytes -= e.bytes;
                    let key = key.clone();
                    self.map.remove(&key);
                }
                Some(_) => break,
            }
            self.order.pop_front();
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str, id: &str) -> Key {
        Key {
            user: user.into(),
            question: Question::Subscribe {
                kind: Kind::Story,
                id: id.into(),
            },
        }
    }

    #[test]
    fn answers_are_fresh_for_the_ttl_then_gone() {
        let mut c = Cache::new(Duration::from_secs(30));
        let t0 = Instant::now();
        c.put(key("u", "s1"), Answer::Allow(false), t0);
        assert_eq!(c.get(&key("u", "s1"), t0), Some(Answer::Allow(false)));
        assert_eq!(c.get(&key("u", "s2"), t0), None);
        assert_eq!(c.get(&key("v", "s1"), t0), None, "per user");
        let later = t0 + Duration::from_secs(31);
        assert_eq!(c.get(&key("u", "s1"), later), None);
        // Expired entries leave on the next insert.
        c.put(key("u", "s2"), Answer::Allow(true), later);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let mut c = Cache::new(Duration::ZERO);
        c.put(key("u", "s"), Answer::Allow(true), Instant::now());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn bounded_in_entries_and_bytes_keeping_the_newest() {
        let t0 = Instant::now();
        let mut c = Cache::bounded(Duration::from_secs(30), 100, usize::MAX);
        for i in 0..1000 {
            c.put(key("u", &format!("s{i}")), Answer::Allow(true), t0);
        }
        assert_eq!(c.len(), 100);
        assert!(c.get(&key("u", "s999"), t0).is_some());
        assert!(c.get(&key("u", "s899"), t0).is_none());

        let mut c = Cache::bounded(Duration::from_secs(30), usize::MAX, 10_000);
        let ids: Arc<[String]> = (0..100).map(|i| format!("story-{i}")).collect();
        for i in 0..100 {
            let k = Key {
                user: format!("user{i}").into(),
                question: Question::List { kind: Kind::Story },
            };
            c.put(k, Answer::Ids(ids.clone()), t0);
            assert!(c.bytes() <= 10_000, "{} bytes", c.bytes());
        }
        assert!(c.len() >= 2);
    }

    #[test]
    fn answering_a_key_again_replaces_it_and_its_stale_slot_is_skipped() {
        let t0 = Instant::now();
        let mut c = Cache::bounded(Duration::from_secs(30), 2, usize::MAX);
        c.put(key("u", "a"), Answer::Allow(true), t0);
        c.put(key("u", "a"), Answer::Allow(false), t0);
        c.put(key("u", "b"), Answer::Allow(true), t0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&key("u", "a"), t0), Some(Answer::Allow(false)));
        c.put(key("u", "c"), Answer::Allow(true), t0);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c.get(&key("u", "a"), t0),
            None,
            "the oldest live entry left"
        );
        assert!(c.get(&key("u", "b"), t0).is_some());
    }
}
