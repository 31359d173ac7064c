//! A bounded in-memory [`Storage`] for pingora-cache.
//!
//! - **Bodies** are kept as the chunks they arrived in, each copied once into an allocation of
//!   its own size (a chunk slicing a larger read buffer would otherwise pin the whole buffer).
//!   A hit hands out cheap `Bytes` clones; nothing is copied per hit.
//! - **Streaming writes.** A miss is stored while it is served: its chunks are visible at once to
//!   concurrent readers of the same key (`lookup` returns the object being written, and readers
//!   follow the writer through a `watch` channel). A writer that gives up (the response was too
//!   large, the upstream failed) makes its readers fail rather than end short, so a truncated
//!   body is never passed off as complete.
//! - **Size.** Each finished entry weighs its body, [`CHUNK_OVERHEAD`] per chunk, its
//!   serialized header, its decoded header when one is kept (estimated, `StoredMeta::len`) and
//!   a fixed overhead;
//!   pingora-cache's LRU manager admits it against `cache.max_size` and has the least recently
//!   used entries purged here (`PurgeType::Eviction`). Objects still being written are not in
//!   the weight yet: each is bounded by the route's `max_object_size`.
//! - **Meta** is stored serialized and, when it can be rebuilt
//!   exactly through pingora-cache's public API, also decoded once: a hit then builds its
//!   `CacheMeta` from the decoded copy instead of decompressing the header per hit (`CacheMeta` is
//!   not `Clone`). "Exactly" is checked at store time: the rebuilt meta must serialize to the
//!   stored bytes, or every hit decodes as before.
//! - **Entries** carry ids, so an eviction decided for an older copy never removes a newer one,
//!   and a copy replaced by a newer one is dropped from the LRU too ([`MemoryStorage::on_replace`]):
//!   it would otherwise keep its weight there, and push live entries out.
//! - **Purge** by primary key removes every variant (`Vary`) of it and abandons writes in
//!   progress, which then never land.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use pingora::cache::eviction::CacheEntryId;
use pingora::cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType, Result};
use std::time::SystemTime;
use tokio::sync::watch;

/// Bytes counted per entry on top of its body and header (maps, `Arc`s, chunk list, LRU node).
pub const ENTRY_OVERHEAD: usize = 256;

/// Bytes counted per stored chunk on top of its bytes (its `Bytes` handle and the allocator's
/// rounding): an origin flushing tiny chunks holds far more than its body.
pub const CHUNK_OVERHEAD: usize = 64;

/// Bytes counted per field of a decoded header on top of its name and value (the header map's
/// entry and index, the case map's entry, two `Bytes` handles): the same with or without a
/// case map, which over-counts a header without one a little.
const DECODED_FIELD_OVERHEAD: usize = 96;

/// Primary hash and variance hash: one stored object.
type Slot = (HashBinary, Option<HashBinary>);

fn slot_of(key: &impl CacheHashKey) -> Slot {
    (key.primary_bin(), key.variance_bin())
}

/// Finished objects of one primary key, by variance.
type Variants = HashMap<Option<HashBinary>, Arc<Entry>>;

/// An object's meta as stored: serialized, plus a decoded copy when one rebuilds it exactly.
struct StoredMeta {
    /// `CacheMeta::serialize`: internal meta and compressed header.
    bytes: (Vec<u8>, Vec<u8>),
    template: Option<MetaTemplate>,
}

/// What `CacheMeta::new` and its setters need to rebuild a meta without decoding it.
struct MetaTemplate {
    fresh_until: SystemTime,
    created: SystemTime,
    stale_while_revalidate_sec: u32,
    stale_if_error_sec: u32,
    variance: Option<HashBinary>,
    epoch_override: Option<SystemTime>,
    /// The header as decoding the stored bytes gives it, so a hit sees what it always saw;
    /// without a case map when the stored header had none.
    header: ResponseHeader,
}

impl MetaTemplate {
    fn build(&self) -> CacheMeta {
        let mut meta = CacheMeta::new(
            self.fresh_until,
            self.created,
            self.stale_while_revalidate_sec,
            self.stale_if_error_sec,
            self.header.clone(),
        );
        if let Some(v) = self.variance {
            meta.set_variance(v);
        }
        if let Some(e) = self.epoch_override {
            meta.set_epoch_override(e);
        }
        meta
    }
}

impl StoredMeta {
    fn new(meta: &CacheMeta) -> Result<StoredMeta> {
        let bytes = meta.serialize()?;
        let decoded = CacheMeta::deserialize(&bytes.0, &bytes.1)?;
        let mut template = MetaTemplate {
            fresh_until: decoded.fresh_until(),
            created: decoded.created(),
            stale_while_revalidate_sec: decoded.stale_while_revalidate_sec(),
            stale_if_error_sec: decoded.stale_if_error_sec(),
            variance: decoded.variance(),
            epoch_override: decoded.epoch_override(),
            header: decoded.response_header_copy(),
        };
        // Decoding gives the header a case map. A header stored without one (the gateway
        // dropped it, `server.preserve_header_case: false`) is kept without one: each hit then
        // clones one map instead of two, and has none to drop.
        if !meta.response_header().has_case() {
            crate::proxy::header_case::drop_response_case(&mut template.header)?;
        }
        // `new` sets `updated` and the provenance to `created`: a meta revalidated since (or
        // with fields a later pingora-cache adds) serializes differently and is decoded per hit.
        let exact = template.build().serialize()?.0 == bytes.0;
        Ok(StoredMeta {
            bytes,
            template: exact.then_some(template),
        })
    }

    /// The meta for one hit.
    fn to_meta(&self) -> Result<CacheMeta> {
        match &self.template {
            Some(t) => Ok(t.build()),
            None => CacheMeta::deserialize(&self.bytes.0, &self.bytes.1),
        }
    }

    /// Bytes it holds: the serialized meta, plus for a decoded header its names and values, the
    /// header-case map's copy of each name (if it has one) and [`DECODED_FIELD_OVERHEAD`] per
    /// field.
    fn len(&self) -> usize {
        let decoded = self.template.as_ref().map_or(0, |t| {
            let copies = if t.header.has_case() { 2 } else { 1 };
            t.header
                .headers
                .iter()
                .map(|(name, value)| {
                    copies * name.as_str().len() + value.len() + DECODED_FIELD_OVERHEAD
                })
                .sum()
        });
        self.bytes.0.len() + self.bytes.1.len() + decoded
    }
}

/// What a finished object of `body_len` bytes in `chunks` chunks weighs against `max_size`.
fn weigh(body_len: usize, chunks: usize, meta: &StoredMeta) -> usize {
    body_len + chunks * CHUNK_OVERHEAD + meta.len() + ENTRY_OVERHEAD
}

/// A finished object.
struct Entry {
    id: u64,
    meta: Arc<StoredMeta>,
    body: Arc<[Bytes]>,
    body_len: usize,
    weight: usize,
}

/// Progress of an object being written: chunks so far, and whether it is complete.
#[derive(Clone, Copy)]
struct Progress {
    chunks: usize,
    complete: bool,
}

/// An object being written.
struct Partial {
    id: u64,
    /// Purged while being written: it never lands, and no new reader is given it (readers
    /// already following it read it to its end).
    abandoned: std::sync::atomic::AtomicBool,
    meta: Arc<StoredMeta>,
    chunks: RwLock<Vec<Bytes>>,
    progress: watch::Receiver<Progress>,
}

/// What the storage holds, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Finished objects.
    pub entries: usize,
    /// Their weight in bytes (bodies, headers, overhead).
    pub bytes: usize,
    /// Objects removed to make room.
    pub evictions: u64,
}

/// What [`MemoryStorage::on_replace`] calls.
type OnReplace = dyn Fn(&CompactCacheKey, u64) + Send + Sync;

/// The storage. Built once per process and leaked: pingora-cache wants `&'static`.
#[derive(Default)]
pub struct MemoryStorage {
    /// Finished objects by primary key, then variance.
    entries: RwLock<HashMap<HashBinary, Variants>>,
    /// Objects being written, by slot, newest last.
    writing: RwLock<HashMap<Slot, Vec<Arc<Partial>>>>,
    next_id: AtomicU64,
    bytes: AtomicUsize,
    count: AtomicUsize,
    evictions: AtomicU64,
    /// Told of each finished object a newer copy replaced (its key and id), so that the LRU,
    /// which tracks objects by key and id, forgets it instead of keeping its weight.
    replaced: std::sync::OnceLock<Box<OnReplace>>,
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    /// Call `f` with the key and id of every finished object a newer copy replaces (once).
    pub fn on_replace(&self, f: impl Fn(&CompactCacheKey, u64) + Send + Sync + 'static) {
        let _ = self.replaced.set(Box::new(f));
    }

    /// Current contents, for metrics.
    pub fn stats(&self) -> StorageStats {
        StorageStats {
            entries: self.count.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// Remove what `target` names; the (variance, id) of each object removed.
    pub fn remove(&self, target: PurgeTarget<'_>) -> Vec<(Option<HashBinary>, u64)> {
        let key = target.key();
        let (primary, variance) = slot_of(key);
        let exact_id = match target {
            PurgeTarget::Exact(e) => Some(e.entry_id()),
            PurgeTarget::Active(_) => None,
        };
        if exact_id.is_none() {
            // Writes in progress would land after the purge: abandon them. First, so that a
            // write finishing meanwhile either lands before the entries go, or not at all
            // (`Writer::finish` checks and stores under the `writing` lock).
            for list in self
                .writing
                .read()
                .iter()
                .filter(|((p, v), _)| *p == primary && (variance.is_none() || *v == variance))
                .map(|(_, list)| list)
            {
                for partial in list {
                    partial.abandoned.store(true, Ordering::Release);
                }
            }
        }
        let mut removed = Vec::new();
        {
            let mut entries = self.entries.write();
            if let Some(variants) = entries.get_mut(&primary) {
                let doomed: Vec<Option<HashBinary>> = variants
                    .iter()
                    .filter(|(v, e)| match exact_id {
                        // An eviction names one copy: leave a newer one alone.
                        Some(id) => **v == variance && id.is_none_or(|id| id.get() == e.id),
                        // A purge of the primary key takes every variant.
                        None => variance.is_none() || **v == variance,
                    })
                    .map(|(v, _)| *v)
                    .collect();
                for v in doomed {
                    if let Some(e) = variants.remove(&v) {
                        self.bytes.fetch_sub(e.weight, Ordering::Relaxed);
                        self.count.fetch_sub(1, Ordering::Relaxed);
                        removed.push((v, e.id));
                    }
                }
                if variants.is_empty() {
                    entries.remove(&primary);
                }
            }
        }
        removed
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let slot = slot_of(key);
        let partial = self.writing.read().get(&slot).and_then(|w| {
            w.iter()
                .rev()
                .find(|p| !p.abandoned.load(Ordering::Acquire))
                .cloned()
        });
        if let Some(p) = partial {
            return partial_hit(p).map(Some);
        }
        let entry = self
            .entries
            .read()
            .get(&slot.0)
            .and_then(|v| v.get(&slot.1).cloned());
        match entry {
            Some(e) => {
                let meta = e.meta.to_meta()?;
                let end = e.body_len;
                Ok(Some((
                    meta,
                    Box::new(CompleteHit {
                        entry: e,
                        next: 0,
                        next_at: 0,
                        start: 0,
                        end,
                    }),
                )))
            }
            None => Ok(None),
        }
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(id) = tag.and_then(|t| <[u8; 8]>::try_from(t).ok()) else {
            return self.lookup(key, trace).await;
        };
        let id = u64::from_be_bytes(id);
        let partial = self
            .writing
            .read()
            .get(&slot_of(key))
            .and_then(|w| w.iter().find(|p| p.id == id).cloned());
        match partial {
            // Its own write, purged or not (the writer's client reads what it writes).
            Some(p) => partial_hit(p).map(Some),
            // Finished meanwhile: the stored copy, if any.
            None => self.lookup(key, trace).await,
        }
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let meta = Arc::new(StoredMeta::new(meta)?);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(Progress {
            chunks: 0,
            complete: false,
        });
        let partial = Arc::new(Partial {
            id,
            abandoned: Default::default(),
            meta,
            chunks: RwLock::new(Vec::new()),
            progress: rx,
        });
        let slot = slot_of(key);
        self.writing
            .write()
            .entry(slot)
            .or_default()
            .push(partial.clone());
        Ok(Box::new(Writer {
            storage: self,
            slot,
            partial,
            progress: tx,
            tag: id.to_be_bytes(),
            body_len: 0,
            done: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let removed = self.remove(target);
        if matches!(purge_type, PurgeType::Eviction) {
            self.evictions
                .fetch_add(removed.len() as u64, Ordering::Relaxed);
        }
        Ok(match removed.as_slice() {
            [] => PurgeOutcome::NotFound,
            [(_, id)] => PurgeOutcome::Purged(Some(CacheEntryId::new(*id))),
            _ => PurgeOutcome::Purged(None),
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let (primary, variance) = slot_of(key);
        let meta = Arc::new(StoredMeta::new(meta)?);
        let mut entries = self.entries.write();
        let Some(old) = entries.get_mut(&primary).and_then(|v| v.get_mut(&variance)) else {
            return Ok(false);
        };
        let weight = weigh(old.body_len, old.body.len(), &meta);
        self.bytes.fetch_add(weight, Ordering::Relaxed);
        self.bytes.fetch_sub(old.weight, Ordering::Relaxed);
        *old = Arc::new(Entry {
            id: old.id,
            meta,
            body: old.body.clone(),
            body_len: old.body_len,
            weight,
        });
        Ok(true)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

fn partial_hit(p: Arc<Partial>) -> Result<(CacheMeta, HitHandler)> {
    let meta = p.meta.to_meta()?;
    let progress = p.progress.clone();
    Ok((
        meta,
        Box::new(PartialHit {
            partial: p,
            progress,
            next: 0,
        }),
    ))
}

/// Reading a finished object, optionally a byte range of it.
struct CompleteHit {
    entry: Arc<Entry>,
    /// Next chunk to look at.
    next: usize,
    /// The body offset where chunk `next` starts (so a read never rescans from the front: an
    /// object of many small chunks would make each hit quadratic).
    next_at: usize,
    /// Byte range to return.
    start: usize,
    end: usize,
}

#[async_trait]
impl HandleHit for CompleteHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        while let Some(chunk) = self.entry.body.get(self.next) {
            let (from, to) = (self.next_at, self.next_at + chunk.len());
            if from >= self.end {
                break;
            }
            self.next += 1;
            self.next_at = to;
            let (a, b) = (self.start.max(from), self.end.min(to));
            if a < b {
                return Ok(Some(chunk.slice(a - from..b - from)));
            }
        }
        self.next = self.entry.body.len();
        Ok(None)
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let len = self.entry.body_len;
        if start >= len {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start {start} beyond the body ({len} bytes)"),
            );
        }
        self.start = start;
        self.end = end.map_or(len, |e| e.min(len));
        // Skip the chunks before `start` once, here.
        self.next = 0;
        self.next_at = 0;
        while let Some(chunk) = self.entry.body.get(self.next) {
            if self.next_at + chunk.len() > start {
                break;
            }
            self.next_at += chunk.len();
            self.next += 1;
        }
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.entry.weight
    }

    fn entry_id(&self) -> Option<CacheEntryId> {
        Some(CacheEntryId::new(self.entry.id))
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Following an object while it is written.
struct PartialHit {
    partial: Arc<Partial>,
    progress: watch::Receiver<Progress>,
    next: usize,
}

#[async_trait]
impl HandleHit for PartialHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            let now = *self.progress.borrow_and_update();
            if now.chunks > self.next {
                let chunk = self.partial.chunks.read()[self.next].clone();
                self.next += 1;
                return Ok(Some(chunk));
            }
            if now.complete {
                return Ok(None);
            }
            if self.progress.changed().await.is_err() {
                // The writer went away before the end: fail, never end short.
                return Error::e_explain(
                    ErrorType::InternalError,
                    "the cached object being read was abandoned by its writer",
                );
            }
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        false
    }

    fn entry_id(&self) -> Option<CacheEntryId> {
        Some(CacheEntryId::new(self.partial.id))
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Writing one object.
struct Writer {
    storage: &'static MemoryStorage,
    slot: Slot,
    partial: Arc<Partial>,
    progress: watch::Sender<Progress>,
    tag: [u8; 8],
    body_len: usize,
    done: bool,
}

#[async_trait]
impl HandleMiss for Writer {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        let chunks = {
            let mut chunks = self.partial.chunks.write();
            if !data.is_empty() {
                self.body_len += data.len();
                chunks.push(Bytes::copy_from_slice(&data));
            }
            chunks.len()
        };
        self.progress.send_replace(Progress {
            chunks,
            complete: eof,
        });
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        self.done = true;
        let chunks = self.partial.chunks.read().clone();
        self.progress.send_replace(Progress {
            chunks: chunks.len(),
            complete: true,
        });
        let meta = &self.partial.meta;
        let weight = weigh(self.body_len, chunks.len(), meta);
        let s = self.storage;
        let entry = Arc::new(Entry {
            id: self.partial.id,
            meta: meta.clone(),
            body: chunks.into(),
            body_len: self.body_len,
            weight,
        });
        // Stored before it leaves the in-progress list, under its lock: a lookup meanwhile
        // finds one or the other, and a purge either sees it stored or has abandoned it.
        let old = {
            let mut writing = s.writing.write();
            let registered = self.take_from(&mut writing);
            if !registered || self.partial.abandoned.load(Ordering::Acquire) {
                return Ok(MissFinishType::Created(0));
            }
            s.entries
                .write()
                .entry(self.slot.0)
                .or_default()
                .insert(self.slot.1, entry)
        };
        s.bytes.fetch_add(weight, Ordering::Relaxed);
        match old {
            Some(old) => {
                s.bytes.fetch_sub(old.weight, Ordering::Relaxed);
                if let Some(f) = s.replaced.get() {
                    let key = CompactCacheKey {
                        variance: self.slot.1.map(Box::new),
                        ..primary_target(self.slot.0)
                    };
                    f(&key, old.id);
                }
            }
            None => {
                s.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(MissFinishType::Created(weight))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(&self.tag)
    }

    fn entry_id(&self) -> Option<CacheEntryId> {
        Some(CacheEntryId::new(self.partial.id))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Abandoned: unregister; dropping `progress` fails the readers.
        self.unregister();
    }
}

impl Writer {
    /// Take this write out of the in-progress list.
    fn unregister(&self) {
        self.take_from(&mut self.storage.writing.write());
    }

    /// Take this write out of `writing`; whether it was there.
    fn take_from(&self, writing: &mut HashMap<Slot, Vec<Arc<Partial>>>) -> bool {
        let Some(list) = writing.get_mut(&self.slot) else {
            return false;
        };
        let before = list.len();
        list.retain(|p| p.id != self.partial.id);
        let found = list.len() < before;
        if list.is_empty() {
            writing.remove(&self.slot);
        }
        found
    }
}

/// The primary-key purge target for a key built by [`super::key`].
pub fn primary_target(primary: HashBinary) -> CompactCacheKey {
    CompactCacheKey {
        primary,
        variance: None,
        user_tag: "".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn meta() -> CacheMeta {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.append_header("Content-Type", "text/plain").unwrap();
        header.append_header("x-Custom-Case", "kept").unwrap();
        header.append_header("set-thing", "a").unwrap();
        header.append_header("set-thing", "b").unwrap();
        let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        CacheMeta::new(created + Duration::from_secs(60), created, 5, 30, header)
    }

    /// What a hit gets must serialize to exactly what was stored, decoded or rebuilt.
    fn round_trip(meta: &CacheMeta) -> bool {
        let stored = StoredMeta::new(meta).unwrap();
        let hit = stored.to_meta().unwrap();
        assert_eq!(hit.serialize().unwrap(), meta.serialize().unwrap());
        assert_eq!(hit.headers(), meta.headers());
        assert_eq!(hit.epoch(), meta.epoch());
        assert_eq!(hit.provenance(), meta.provenance());
        stored.template.is_some()
    }

    #[test]
    fn a_fresh_meta_is_rebuilt_without_decoding() {
        assert!(round_trip(&meta()));
    }

    #[test]
    fn variance_and_epoch_override_are_rebuilt() {
        let mut m = meta();
        m.set_variance([7; 16]);
        assert!(round_trip(&m));
        m.set_epoch_override(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_010));
        assert!(round_trip(&m));
    }

    #[test]
    fn a_revalidated_meta_is_decoded_per_hit() {
        // `updated` moves to now, which `CacheMeta::new` cannot express.
        let mut m = meta();
        m.update_freshness(SystemTime::now() + Duration::from_secs(60), 0, 0);
        assert!(!round_trip(&m));
    }

    /// A kept decoded header is weighed too, so `cache.max_size` bounds what is really held.
    #[test]
    fn a_decoded_header_counts_in_the_weight() {
        let serialized = |s: &StoredMeta| s.bytes.0.len() + s.bytes.1.len();
        let kept = StoredMeta::new(&meta()).unwrap();
        // 4 fields: content-type/text/plain, x-custom-case/kept, set-thing/a, set-thing/b.
        let fields = (2 * 12 + 10) + (2 * 13 + 4) + (2 * 9 + 1) + (2 * 9 + 1);
        assert_eq!(
            kept.len(),
            serialized(&kept) + fields + 4 * DECODED_FIELD_OVERHEAD
        );
        let mut m = meta();
        m.update_freshness(SystemTime::now() + Duration::from_secs(60), 0, 0);
        let decoded_per_hit = StoredMeta::new(&m).unwrap();
        assert_eq!(decoded_per_hit.len(), serialized(&decoded_per_hit));
    }

    /// A header stored without a case map (the gateway's default) is rebuilt without one, and
    /// weighed with one copy of each name; one with a case map keeps it.
    #[test]
    fn a_header_without_a_case_map_is_kept_without_one() {
        let cased = StoredMeta::new(&meta()).unwrap();
        assert!(cased.to_meta().unwrap().response_header().has_case());
        let mut m = meta();
        crate::proxy::header_case::drop_response_case(m.response_header_mut()).unwrap();
        assert!(round_trip(&m));
        let plain = StoredMeta::new(&m).unwrap();
        let hit = plain.to_meta().unwrap();
        assert!(!hit.response_header().has_case());
        assert_eq!(hit.headers(), m.headers());
        let fields = (12 + 10) + (13 + 4) + (9 + 1) + (9 + 1);
        assert_eq!(
            plain.len(),
            plain.bytes.0.len() + plain.bytes.1.len() + fields + 4 * DECODED_FIELD_OVERHEAD
        );
    }

    fn span() -> SpanHandle {
        pingora::cache::trace::Span::inactive().handle()
    }

    fn leaked() -> &'static MemoryStorage {
        Box::leak(Box::new(MemoryStorage::new()))
    }

    /// Write `chunks` as one object under `key`; the finished write's weight.
    async fn store(s: &'static MemoryStorage, key: &CacheKey, chunks: &[&[u8]]) -> usize {
        let mut w = s.get_miss_handler(key, &meta(), &span()).await.unwrap();
        for c in chunks {
            w.write_body(Bytes::copy_from_slice(c), false)
                .await
                .unwrap();
        }
        w.write_body(Bytes::new(), true).await.unwrap();
        match w.finish().await.unwrap() {
            MissFinishType::Created(n) => n,
            _ => unreachable!(),
        }
    }

    async fn body(hit: &mut HitHandler) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = hit.read_body().await.unwrap() {
            out.extend_from_slice(&b);
        }
        out
    }

    #[tokio::test]
    async fn a_replaced_copy_is_reported_with_its_id_so_the_lru_forgets_it() {
        let s = leaked();
        let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = Arc::clone(&told);
        s.on_replace(move |key, id| sink.lock().push((key.primary, id)));
        let key = CacheKey::new("/a", "");
        store(s, &key, &[b"one"]).await;
        let first = s.lookup(&key, &span()).await.unwrap().unwrap().1.entry_id();
        assert!(told.lock().is_empty());
        store(s, &key, &[b"two"]).await;
        assert_eq!(
            told.lock().as_slice(),
            &[(key.primary_bin(), first.unwrap().get())]
        );
        assert_eq!(s.stats().entries, 1);
    }

    #[tokio::test]
    async fn a_write_purged_midway_never_lands_but_its_own_reader_still_follows_it() {
        let s = leaked();
        let key = CacheKey::new("/p", "");
        let mut w = s.get_miss_handler(&key, &meta(), &span()).await.unwrap();
        let tag = w.streaming_write_tag().unwrap().to_vec();
        w.write_body(Bytes::from_static(b"old "), false)
            .await
            .unwrap();
        s.remove(PurgeTarget::Active(&primary_target(key.primary_bin())));
        // Nobody new is given the abandoned write...
        assert!(s.lookup(&key, &span()).await.unwrap().is_none());
        // ...but the writer's own client is (Pingora looks it up by its tag).
        let (_, mut own) = s
            .lookup_streaming_write(&key, Some(&tag), &span())
            .await
            .unwrap()
            .expect("the writer's own stream");
        w.write_body(Bytes::from_static(b"body"), true)
            .await
            .unwrap();
        assert!(matches!(
            w.finish().await.unwrap(),
            MissFinishType::Created(0)
        ));
        assert_eq!(body(&mut own).await, b"old body");
        assert!(
            s.lookup(&key, &span()).await.unwrap().is_none(),
            "landed after the purge"
        );
        assert_eq!(s.stats().entries, 0);
    }

    #[tokio::test]
    async fn many_small_chunks_are_weighed_and_read_and_sought_in_order() {
        let s = leaked();
        let key = CacheKey::new("/c", "");
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<&[u8]> = bytes.chunks(2).collect();
        let weight = store(s, &key, &chunks).await;
        assert!(
            weight >= bytes.len() + chunks.len() * CHUNK_OVERHEAD,
            "{weight}"
        );
        let (_, mut hit) = s.lookup(&key, &span()).await.unwrap().unwrap();
        assert_eq!(body(&mut hit).await, bytes);
        let (_, mut hit) = s.lookup(&key, &span()).await.unwrap().unwrap();
        hit.seek(10_001, Some(15_000)).unwrap();
        assert_eq!(body(&mut hit).await, &bytes[10_001..15_000]);
        hit.seek(0, Some(1)).unwrap();
        assert_eq!(body(&mut hit).await, &bytes[..1]);
    }

    #[test]
    fn every_hit_gets_its_own_meta() {
        let stored = StoredMeta::new(&meta()).unwrap();
        let mut first = stored.to_meta().unwrap();
        first
            .response_header_mut()
            .insert_header("age", "3")
            .unwrap();
        let second = stored.to_meta().unwrap();
        assert!(second.headers().get("age").is_none());
    }
}
