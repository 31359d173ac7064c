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
//! - **Size.** Each finished entry weighs its body, its serialized header, its decoded header
//!   when one is kept (estimated, `StoredMeta::len`) and a fixed overhead;
//!   pingora-cache's LRU manager admits it against `cache.max_size` and has the least recently
//!   used entries purged here (`PurgeType::Eviction`). Objects still being written are not in
//!   the weight yet: each is bounded by the route's `max_object_size`.
//! - **Meta** is stored serialized and, when it can be rebuilt
//!   exactly through pingora-cache's public API, also decoded once: a hit then builds its
//!   `CacheMeta` from the decoded copy instead of decompressing the header per hit (`CacheMeta` is
//!   not `Clone`). "Exactly" is checked at store time: the rebuilt meta must serialize to the
//!   stored bytes, or every hit decodes as before.
//! - **Entries** carry ids, so an eviction decided for an older copy never removes a newer one.
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
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
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
        if exact_id.is_none() {
            // Writes in progress would land after the purge: abandon them.
            self.writing
                .write()
                .retain(|(p, v), _| !(*p == primary && (variance.is_none() || *v == variance)));
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
        let partial = self
            .writing
            .read()
            .get(&slot)
            .and_then(|w| w.last().cloned());
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
            Some(p) => partial_hit(p).map(Some),
            // Finished (or purged) meanwhile: the stored copy, if any.
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
        let weight = old.body_len + meta.len() + ENTRY_OVERHEAD;
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
    /// Byte range to return.
    start: usize,
    end: usize,
}

#[async_trait]
impl HandleHit for CompleteHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        // Chunk offsets are recomputed from the front; objects have few chunks.
        let mut offset = 0;
        for (i, chunk) in self.entry.body.iter().enumerate() {
            let (from, to) = (offset, offset + chunk.len());
            offset = to;
            if i < self.next {
                continue;
            }
            self.next = i + 1;
            let (a, b) = (self.start.max(from), self.end.min(to));
            if a < b {
                return Ok(Some(chunk.slice(a - from..b - from)));
            }
            if from >= self.end {
                break;
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
        self.next = 0;
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
        let weight = self.body_len + meta.len() + ENTRY_OVERHEAD;
        let s = self.storage;
        // Still registered, or purged while being written (then it never lands).
        if !self.unregister() {
            return Ok(MissFinishType::Created(0));
        }
        let entry = Arc::new(Entry {
            id: self.partial.id,
            meta: meta.clone(),
            body: chunks.into(),
            body_len: self.body_len,
            weight,
        });
        let old = s
            .entries
            .write()
            .entry(self.slot.0)
            .or_default()
            .insert(self.slot.1, entry);
        s.bytes.fetch_add(weight, Ordering::Relaxed);
        match old {
            Some(old) => {
                s.bytes.fetch_sub(old.weight, Ordering::Relaxed);
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
    /// Take this write out of the in-progress list; whether it was still there (a purge
    /// removes it).
    fn unregister(&self) -> bool {
        let mut writing = self.storage.writing.write();
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
