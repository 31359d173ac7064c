//! The response cache: storage, key, policy and purge, on pingora-cache.
//!
//! One [`Cache`] per process holds the storage ([`storage::MemoryStorage`]), pingora-cache's
//! sharded LRU manager (the byte limit) and its cache lock (one upstream request per key at a
//! time). Routes opt in with `cache:`; [`policy`] decides what of theirs is stored and for how
//! long. See `docs/cache.md`.

pub mod key;
pub mod policy;
pub mod storage;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pingora::cache::CacheKey;
use pingora::cache::NoCacheReason;
use pingora::cache::eviction::lru::Manager;
use pingora::cache::eviction::{CacheEntryId, CacheEntryKey, EvictionManager};
use pingora::cache::key::CompactCacheKey;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::predictor::{CacheablePredictor, Predictor};
use pingora::cache::storage::PurgeTarget;

use crate::config::CacheConfig;
use storage::{MemoryStorage, StorageStats, primary_target};

/// LRU shards (each with its own lock).
const SHARDS: usize = 16;

/// URLs remembered as too large, per predictor shard ([`SHARDS`] of them).
const PREDICTED_PER_SHARD: usize = 1024;

/// pingora-cache's predictor, remembering only responses too large to store.
///
/// Pingora's own would also remember every response its origin marked uncacheable (and every
/// custom reason), so that one request carrying `Authorization`, or a body, would take its URL
/// out of the cache for the requests after it. A URL is forgotten when a response to it is
/// cacheable again, or by the LRU.
pub struct SizePredictor(Predictor<SHARDS>);

impl CacheablePredictor for SizePredictor {
    fn cacheable_prediction(&self, key: &CacheKey) -> bool {
        self.0.cacheable_prediction(key)
    }

    fn predicted_uncacheable_reason(&self, key: &CacheKey) -> Option<NoCacheReason> {
        self.0.predicted_uncacheable_reason(key)
    }

    fn mark_cacheable(&self, key: &CacheKey) -> bool {
        self.0.mark_cacheable(key)
    }

    fn mark_uncacheable(&self, key: &CacheKey, reason: NoCacheReason) -> Option<bool> {
        match reason {
            NoCacheReason::ResponseTooLarge => self.0.mark_uncacheable(key, reason),
            _ => None,
        }
    }
}

/// The LRU tracks each object by key and id: forget exactly that one.
fn forget(eviction: &Manager<SHARDS>, key: CompactCacheKey, id: u64) {
    let entry = CacheEntryKey::identified(key, CacheEntryId::new(id));
    eviction.remove((&entry).into());
}

/// The process's cache.
pub struct Cache {
    /// Where objects live.
    pub storage: &'static MemoryStorage,
    /// What to drop when full.
    pub eviction: &'static Manager<SHARDS>,
    /// One filler per key.
    pub lock: &'static CacheKeyLockImpl,
    /// How long the others wait for it.
    pub lock_timeout: Duration,
    /// URLs whose last response was too large to store: looked up no more (so that a
    /// `Range` request reaches the origin, and a body without `Content-Length` is not cut).
    pub predictor: &'static SizePredictor,
    /// Entries purged through the admin API or invalidated by unsafe requests.
    purged: AtomicU64,
    /// The configured limit.
    max_size: usize,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("max_size", &self.max_size)
            .field("stats", &self.storage.stats())
            .finish()
    }
}

/// Common response header text, so pingora-cache compresses stored headers well (and does not
/// warn that it has no dictionary).
const HEADER_DICTIONARY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
content-type: application/json\r\ncontent-length: \r\ncache-control: public, max-age=\r\n\
cache-control: no-cache\r\netag: \"\"\r\nlast-modified: \r\ndate: \r\nexpires: \r\n\
vary: Accept-Encoding\r\nvary: Origin\r\naccept-ranges: bytes\r\nserver: \r\nx-request-id: \r\n\
content-encoding: gzip\r\ncontent-encoding: br\r\nage: \r\nconnection: keep-alive\r\n";

static CACHE: std::sync::OnceLock<&'static Cache> = std::sync::OnceLock::new();

/// The process's cache, built from `c` on first use (later calls return the same one: the
/// storage outlives reloads).
pub fn init(c: &CacheConfig) -> &'static Cache {
    CACHE.get_or_init(|| Cache::new(c))
}

/// The process's cache, if built.
pub fn get() -> Option<&'static Cache> {
    CACHE.get().copied()
}

impl Cache {
    /// Build a cache (leaked: pingora-cache wants `&'static`). Use [`init`] for the process's.
    pub fn new(c: &CacheConfig) -> &'static Cache {
        pingora::cache::set_compression_dict_content(HEADER_DICTIONARY.into());
        // Capacity: a guess of the entry count, for preallocation only.
        let items = (c.max_size / 16_384).clamp(1024, 1 << 20);
        let lock: Box<CacheKeyLockImpl> = CacheLock::new_boxed(c.lock_timeout);
        let storage: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new()));
        let eviction: &'static Manager<SHARDS> =
            Box::leak(Box::new(Manager::with_capacity(c.max_size, items)));
        // A replaced copy leaves the LRU with the storage (the LRU tracks key and id).
        storage.on_replace(move |key, id| forget(eviction, key.clone(), id));
        Box::leak(Box::new(Cache {
            storage,
            eviction,
            lock: Box::leak(lock),
            lock_timeout: c.lock_timeout,
            predictor: Box::leak(Box::new(SizePredictor(Predictor::new(
                PREDICTED_PER_SHARD,
                None,
            )))),
            purged: AtomicU64::new(0),
            max_size: c.max_size,
        }))
    }

    /// The configured limit in bytes.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Storage contents and purge count, for metrics.
    pub fn stats(&self) -> (StorageStats, u64) {
        (self.storage.stats(), self.purged.load(Ordering::Relaxed))
    }

    /// Remove every stored variant of `key`'s URL; how many objects were stored.
    pub fn purge(&self, key: &CacheKey) -> usize {
        use pingora::cache::key::CacheHashKey;
        let target = primary_target(key.primary_bin());
        let removed = self.storage.remove(PurgeTarget::Active(&target));
        for (variance, id) in &removed {
            let key = CompactCacheKey {
                variance: variance.map(Box::new),
                ..target.clone()
            };
            forget(self.eviction, key, *id);
        }
        self.purged
            .fetch_add(removed.len() as u64, Ordering::Relaxed);
        removed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::storage::Storage;
    use pingora::cache::trace::Span;

    #[tokio::test]
    async fn a_replaced_copy_leaves_the_lru() {
        let cache = Cache::new(&CacheConfig {
            max_size: 1 << 20,
            lock_timeout: Duration::from_secs(1),
        });
        let key = CacheKey::new("/r", "");
        let meta = || {
            let header = pingora::http::ResponseHeader::build(200, None).unwrap();
            let now = std::time::SystemTime::now();
            pingora::cache::CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header)
        };
        let span = Span::inactive().handle();
        let mut admitted = 0;
        for body in [&b"first copy"[..], b"second copy, longer"] {
            let mut w = cache
                .storage
                .get_miss_handler(&key, &meta(), &span)
                .await
                .unwrap();
            w.write_body(bytes::Bytes::copy_from_slice(body), true)
                .await
                .unwrap();
            let id = w.entry_id().unwrap();
            let pingora::cache::storage::MissFinishType::Created(weight) =
                w.finish().await.unwrap()
            else {
                unreachable!()
            };
            // As pingora-cache admits a finished write.
            let entry = CacheEntryKey::identified(key.to_compact(), id);
            let _ = cache.eviction.admit(
                entry,
                weight,
                std::time::SystemTime::now() + Duration::from_secs(60),
            );
            admitted = weight;
        }
        let (_, hit) = cache.storage.lookup(&key, &span).await.unwrap().unwrap();
        assert_eq!(hit.get_eviction_weight(), admitted);
        // Only the second copy is left to weigh.
        assert_eq!(cache.eviction.total_size(), admitted);
        assert_eq!(cache.eviction.total_items(), 1);
    }
}
