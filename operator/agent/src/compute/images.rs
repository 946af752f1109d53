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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

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
    #[error("image cache I/O: {0}")]
    Io(#[from] std::io::Error),
}

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
            metrics,
        })
    }

    async fn lock_for(&self, name: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().await;
        locks.entry(name.to_string()).or_default().clone()
    }

    /// The verified local copy of `image`, fetching it if needed (then
    /// evicting unused images if the cache outgrew its bound). A cache hit
    /// marks the image used now (its mtime), for the LRU order.
    pub async fn ensure(&self, image: &ImageSource) -> Result<CachedImage, ImageError> {
        let name = file_name_for(&image.checksum);
        let lock = self.lock_for(&name).await.lock_owned().await;
        let path = self.dir.join(&name);
        if path.exists() {
            touch(&path);
            return Ok(CachedImage { path, _lock: lock });
        }
        let started = std::time::Instant::now();
        let path = fetch_verified(&self.dir, image, &self.metrics.fetched_bytes).await?;
        self.metrics
            .fetch_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(image = %image.url, checksum = %image.checksum, "image fetched and verified");
        // This image's lock is held: it is not a candidate.
        if let Err(e) = self.evict().await {
            tracing::warn!(error = %e, "image cache eviction failed");
        }
        Ok(CachedImage { path, _lock: lock })
    }

    /// Record the checksums of the images VirtualNodes placed here refer to;
    /// they are never evicted.
    pub fn set_wanted<'a>(&self, checksums: impl IntoIterator<Item = &'a str>) {
        let names = checksums.into_iter().map(file_name_for).collect();
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
        out.push(CacheFile {
            verified: !name.starts_with('.'),
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
use fetch::fetch_verified;

#[cfg(test)]
mod tests;
