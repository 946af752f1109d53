//! The host's image cache: each image is fetched once, verified against its
//! sha256 while streaming to a temporary file in the cache directory, and
//! renamed into place atomically, so a reader never sees a partial or
//! unverified image and a failed fetch leaves no file behind. Concurrent
//! requests for the same image wait for one fetch.
//!
//! The cache is bounded: when its files exceed `max_bytes` (after a fetch,
//! and on each resync), verified images that nothing uses are evicted, least
//! recently used first. An image is in use while a node's overlay disk
//! (`<state>/nodes/*/*.qcow2`) has it as backing file (read from the qcow2
//! header), while a VirtualNode placed here refers to it, and while its
//! per-image lock is held (a fetch, or the overlay creation that follows it:
//! [`CachedImage`] holds the lock).
//!
//! An image given by `checksumURL` is verified against the sum its list
//! gives for the image's file name (sums.rs). The list is read when no sum
//! of it is known or the known one is older than [`SUMS_REFRESH`]; each
//! sum read is kept (in memory and in `<state>/image-sums/`), so while the
//! list cannot be read the last sum stands for an image already cached — a
//! list server's outage or an agent restart never stops running nodes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Mutex, OwnedMutexGuard};
use yukumo_api::common::ImageSource;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("checksum mismatch for {url}: expected {expected}, got sha256:{actual}")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("checksumURL {list} for {url}: {reason}")]
    Sums {
        url: String,
        list: String,
        reason: String,
    },
    #[error("image cache I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// (image URL, checksum list URL).
type SumsKey = (String, String);

/// A checksum list is read again when the sum known from it is this old.
pub const SUMS_REFRESH: Duration = Duration::from_secs(600);
/// The largest checksum list read.
const MAX_SUMS_BYTES: usize = 1 << 20;

/// Prefix of in-progress downloads: `.partial-<checksum hex>-<random>`.
pub const PARTIAL_PREFIX: &str = ".partial-";

/// Image cache metrics.
#[derive(Clone)]
pub struct CacheMetrics {
    /// Image bytes fetched (progress of downloads in flight, too).
    pub fetched_bytes: Counter,
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    pub bytes: Gauge,
    /// Seconds a fetch took, to the verified file.
    pub fetch_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for CacheMetrics {
    fn default() -> Self {
        CacheMetrics {
            fetched_bytes: Counter::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            bytes: Gauge::default(),
            fetch_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.1, 2.0, 12),
            ),
        }
    }
}

/// The cache under `<state>/images`.
#[derive(Clone)]
pub struct ImageCache {
    dir: PathBuf,
    /// `<state>/nodes`: the node directories holding the overlays.
    nodes_dir: PathBuf,
    max_bytes: u64,
    /// Per-image locks, by file name.
    locks: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
    /// File names of the images VirtualNodes placed here refer to (as of the
    /// last resync).
    wanted: Arc<std::sync::Mutex<HashSet<String>>>,
    /// One eviction pass at a time.
    evicting: Arc<Mutex<()>>,
    /// Sums read from checksum lists, by (image URL, list URL), with when.
    sums: Arc<std::sync::Mutex<HashMap<SumsKey, (String, Instant)>>>,
    /// `<state>/image-sums`: the sums read, one file per (image, list).
    sums_dir: PathBuf,
    sums_refresh: Duration,
    metrics: CacheMetrics,
}

/// A verified image in the cache. While this is held, the image's lock is
/// held: no fetch of it runs and it is never evicted (hold it until the
/// overlay that uses it exists).
pub struct CachedImage {
    pub path: PathBuf,
    _lock: OwnedMutexGuard<()>,
}

/// What one eviction pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// Size of the cache's files before the pass.
    pub total_bytes: u64,
    /// File names of the evicted images.
    pub evicted: Vec<String>,
    pub freed_bytes: u64,
}

/// A cached image's file name for a checksum (`sha256:<hex>` → `sha256-<hex>`).
fn file_name_for(checksum: &str) -> String {
    checksum.replace(':', "-")
}

impl ImageCache {
    pub fn new(state_dir: &Path, max_bytes: u64, metrics: CacheMetrics) -> std::io::Result<Self> {
        let dir = state_dir.join("images");
        std::fs::create_dir_all(&dir)?;
        Ok(ImageCache {
            dir,
            nodes_dir: state_dir.join("nodes"),
            max_bytes,
            locks: Arc::default(),
            wanted: Arc::default(),
            evicting: Arc::default(),
            sums: Arc::default(),
            sums_dir: state_dir.join("image-sums"),
            sums_refresh: SUMS_REFRESH,
            metrics,
        })
    }

    /// Read checksum lists again after `d` (tests).
    #[cfg(test)]
    pub fn with_sums_refresh(mut self, d: Duration) -> Self {
        self.sums_refresh = d;
        self
    }

    /// The sum `image` is verified against (`sha256:<hex>`): its `checksum`,
    /// or what its `checksumURL` list gives for its file name.
    pub async fn checksum_of(&self, image: &ImageSource) -> Result<String, ImageError> {
        let err = |list: &str, reason: String| ImageError::Sums {
            url: image.url.clone(),
            list: list.to_string(),
            reason,
        };
        let list = match (&image.checksum, &image.checksum_url) {
            (Some(c), _) => return Ok(c.clone()),
            (None, Some(l)) => l.clone(),
            (None, None) => {
                return Err(err(
                    "(none)",
                    "the image has neither checksum nor checksumURL".into(),
                ));
            }
        };
        let key = (image.url.clone(), list.clone());
        let known = self.known_sum(&key);
        if let Some((c, at)) = &known
            && at.elapsed() < self.sums_refresh
        {
            return Ok(c.clone());
        }
        let name = sums::file_name(&image.url).to_string();
        match fetch::read_small(&list, MAX_SUMS_BYTES).await {
            Ok(text) => {
                let sum = format!(
                    "sha256:{}",
                    sums::lookup(&text, &name).map_err(|r| err(&list, r))?
                );
                self.remember_sum(&key, &sum);
                Ok(sum)
            }
            Err(reason) => match known {
                // The last sum read stands for an image already cached.
                Some((c, _)) if self.dir.join(file_name_for(&c)).exists() => {
                    tracing::warn!(list = %list, image = %image.url, %reason,
                        "checksum list unreadable: the image's last sum stands");
                    Ok(c)
                }
                _ => Err(err(&list, reason)),
            },
        }
    }

    /// The sum last read for `key`: in memory, else as kept on disk (then
    /// as old as its file).
    fn known_sum(&self, key: &SumsKey) -> Option<(String, Instant)> {
        if let Some(k) = self.sums.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            return Some(k.clone());
        }
        let path = self.sums_dir.join(sums_file(key));
        let sum = std::fs::read_to_string(&path).ok()?.trim().to_string();
        let valid = sum
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return None;
        }
        let age = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .unwrap_or(Duration::MAX);
        let at = Instant::now().checked_sub(age).unwrap_or_else(|| {
            Instant::now()
                .checked_sub(self.sums_refresh)
                .unwrap_or_else(Instant::now)
        });
        Some((sum, at))
    }

    fn remember_sum(&self, key: &SumsKey, sum: &str) {
        self.sums
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), (sum.to_string(), Instant::now()));
        let write = std::fs::create_dir_all(&self.sums_dir).and_then(|()| {
            let tmp = self.sums_dir.join(format!(".{}.tmp", sums_file(key)));
            std::fs::write(&tmp, sum)?;
            std::fs::rename(&tmp, self.sums_dir.join(sums_file(key)))
        });
        if let Err(e) = write {
            tracing::warn!(error = %e, "keeping a checksum list's sum");
        }
    }

    async fn lock_for(&self, name: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().await;
        locks.entry(name.to_string()).or_default().clone()
    }

    /// The verified local copy of `image`, fetching it if needed (then
    /// evicting unused images if the cache outgrew its bound). A cache hit
    /// marks the image used now (its mtime), for the LRU order.
    pub async fn ensure(&self, image: &ImageSource) -> Result<CachedImage, ImageError> {
        let checksum = self.checksum_of(image).await?;
        let name = file_name_for(&checksum);
        let lock = self.lock_for(&name).await.lock_owned().await;
        let path = self.dir.join(&name);
        if path.exists() {
            touch(&path);
            return Ok(CachedImage { path, _lock: lock });
        }
        let started = std::time::Instant::now();
        let path = fetch_verified(&self.dir, image, &checksum, &self.metrics.fetched_bytes).await?;
        self.metrics
            .fetch_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(image = %image.url, %checksum, "image fetched and verified");
        // This image's lock is held: it is not a candidate.
        if let Err(e) = self.evict().await {
            tracing::warn!(error = %e, "image cache eviction failed");
        }
        Ok(CachedImage { path, _lock: lock })
    }

    /// Record the images VirtualNodes placed here refer to; they are never
    /// evicted (one given by a checksum list: by the sum last read from it).
    pub fn set_wanted<'a>(&self, images: impl IntoIterator<Item = &'a ImageSource>) {
        let names = images
            .into_iter()
            .filter_map(|i| match (&i.checksum, &i.checksum_url) {
                (Some(c), _) => Some(c.clone()),
                (None, Some(l)) => self.known_sum(&(i.url.clone(), l.clone())).map(|(c, _)| c),
                (None, None) => None,
            })
            .map(|c| file_name_for(&c))
            .collect();
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// If the cache is over its bound, evict the least recently used
    /// verified images that are not in use until it is within the bound (or
    /// nothing more can go).
    pub async fn evict(&self) -> std::io::Result<Eviction> {
        let _one = self.evicting.lock().await;
        let dir = self.dir.clone();
        let files = tokio::task::spawn_blocking(move || cache_files(&dir))
            .await
            .map_err(std::io::Error::other)??;
        let total: u64 = files.iter().map(|f| f.size).sum();
        self.metrics
            .bytes
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        let mut out = Eviction {
            total_bytes: total,
            ..Default::default()
        };
        if total <= self.max_bytes {
            return Ok(out);
        }
        // Take the lock of every verified image without waiting: one held
        // is being fetched or used for an overlay right now. Holding them,
        // no new overlay on a candidate can appear while the overlays are
        // read below.
        let mut candidates = Vec::new();
        {
            let mut locks = self.locks.lock().await;
            for f in files.into_iter().filter(|f| f.verified) {
                let lock = locks.entry(f.name.clone()).or_default().clone();
                if let Ok(guard) = lock.try_lock_owned() {
                    candidates.push((f, guard));
                }
            }
        }
        let wanted = self
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (dir, nodes_dir, max) = (self.dir.clone(), self.nodes_dir.clone(), self.max_bytes);
        let evicted = tokio::task::spawn_blocking(move || {
            let in_use = images_in_use(&nodes_dir)?;
            candidates.sort_by_key(|(f, _)| f.used);
            let mut remaining = total;
            let mut evicted = Vec::new();
            for (f, _guard) in candidates {
                if remaining <= max {
                    break;
                }
                if in_use.contains(&f.name) || wanted.contains(&f.name) {
                    continue;
                }
                match std::fs::remove_file(dir.join(&f.name)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                remaining = remaining.saturating_sub(f.size);
                evicted.push((f.name, f.size));
            }
            Ok::<_, std::io::Error>(evicted)
        })
        .await
        .map_err(std::io::Error::other)??;
        for (name, size) in evicted {
            tracing::info!(image = %name, bytes = size, "evicted unused image from the cache");
            self.metrics.evictions.inc();
            self.metrics.evicted_bytes.inc_by(size);
            out.freed_bytes += size;
            out.evicted.push(name);
        }
        let left = total - out.freed_bytes;
        self.metrics
            .bytes
            .set(i64::try_from(left).unwrap_or(i64::MAX));
        if left > self.max_bytes {
            tracing::warn!(
                bytes = left,
                max = self.max_bytes,
                "image cache over its bound; the rest is in use"
            );
        }
        Ok(out)
    }
}

/// Mark a cached image used now (its mtime orders the eviction).
fn touch(path: &Path) {
    let touched = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!(path = %path.display(), error = %e, "cannot touch cached image");
    }
}

/// One file of the cache directory.
#[derive(Debug)]
struct CacheFile {
    name: String,
    size: u64,
    /// Last use (mtime).
    used: SystemTime,
    /// A verified image (not an in-progress download).
    verified: bool,
}

fn cache_files(dir: &Path) -> std::io::Result<Vec<CacheFile>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(meta) = entry.metadata() else {
            continue; // removed meanwhile
        };
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        // Only the cache's own files: verified images (`sha256-<hex>`) and
        // downloads in progress. Anything else placed here (an image
        // staged for a `file://` URL, its checksum list) is not the cache's
        // to count or evict.
        let verified = name.starts_with("sha256-");
        if !verified && !name.starts_with(PARTIAL_PREFIX) {
            continue;
        }
        out.push(CacheFile {
            verified,
            size: meta.len(),
            used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            name,
        });
    }
    Ok(out)
}

/// File names of the images that node overlays (`<nodes>/*/*.qcow2`, also
/// one being created) have as backing file. An overlay that cannot be read
/// is an error: evicting then could remove an image in use.
pub fn images_in_use(nodes_dir: &Path) -> std::io::Result<HashSet<String>> {
    let mut out = HashSet::new();
    let nodes = match std::fs::read_dir(nodes_dir) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for node in nodes {
        let node = node?.path();
        let files = match std::fs::read_dir(&node) {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        for file in files {
            let path = file?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if !(name.ends_with(".qcow2") || name.ends_with(".qcow2.tmp")) {
                continue;
            }
            match super::disks::qcow2::info(&path).map(|i| i.backing) {
                Ok(Some(backing)) => {
                    if let Some(n) = backing.file_name() {
                        out.insert(n.to_string_lossy().into_owned());
                    }
                }
                Ok(None) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("reading {}: {e}", path.display()),
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Parse a size: plain bytes, or a number with a binary (`Ki`, `Mi`, `Gi`,
/// `Ti`) or decimal (`K`, `M`, `G`, `T`) suffix, optionally followed by `B`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 20Gi, 500Mi or bytes"))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix('B').unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size unit in {s:?}: use Ki, Mi, Gi, Ti, K, M, G or T"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

mod fetch;
mod sums;
use fetch::fetch_verified;

#[cfg(test)]
mod tests;

/// The file keeping the sum read for (image URL, list URL).
fn sums_file(key: &SumsKey) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(key.0.as_bytes());
    h.update(b"\n");
    h.update(key.1.as_bytes());
    format!("{:x}", h.finalize())
}
