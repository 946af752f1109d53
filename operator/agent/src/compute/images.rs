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
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sha2::{Digest, Sha256};
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
#[derive(Clone, Default)]
pub struct CacheMetrics {
    /// Image bytes fetched (progress of downloads in flight, too).
    pub fetched_bytes: Counter,
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    pub bytes: Gauge,
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
        let path = fetch_verified(&self.dir, image, &self.metrics.fetched_bytes).await?;
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

/// Where a fetch reads from: a local file, or HTTP(S).
enum Origin {
    File(PathBuf),
    Http(hyper::Uri),
}

fn origin(image: &ImageSource) -> Result<Origin, ImageError> {
    let bad = |reason: String| ImageError::Fetch {
        url: image.url.clone(),
        reason,
    };
    if let Some(local) = image.url.strip_prefix("file://") {
        return Ok(Origin::File(PathBuf::from(local)));
    }
    let uri: hyper::Uri = image.url.parse().map_err(|e| bad(format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => Ok(Origin::Http(uri)),
        _ => Err(bad("only http, https and file URLs are fetched".into())),
    }
}

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;
/// A fetch taking longer than this fails (and is retried by the next reconcile).
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// The HTTP(S) client of the image cache: rustls with the host's roots.
fn http_client() -> std::io::Result<HttpClient> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(tls),
    )
}

/// Fetch `image` into a temporary file of `dir`, hashing while it streams;
/// rename it into place only when the sha256 matches. `fetched` counts the
/// bytes as they arrive.
async fn fetch_verified(
    dir: &Path,
    image: &ImageSource,
    fetched: &Counter,
) -> Result<PathBuf, ImageError> {
    let fetch_err = |reason: String| ImageError::Fetch {
        url: image.url.clone(),
        reason,
    };
    let prefix = format!(
        "{PARTIAL_PREFIX}{}-",
        image.checksum.trim_start_matches("sha256:")
    );
    let tmp = tempfile::Builder::new().prefix(&prefix).tempfile_in(dir)?;
    let actual = match origin(image)? {
        Origin::File(local) => {
            let (path, counter) = (tmp.path().to_path_buf(), fetched.clone());
            tokio::task::spawn_blocking(move || copy_hashing(&local, &path, &counter))
                .await
                .map_err(|e| ImageError::Io(std::io::Error::other(e)))?
                .map_err(|e| fetch_err(e.to_string()))?
        }
        Origin::Http(uri) => {
            tokio::time::timeout(FETCH_TIMEOUT, download(uri, tmp.path(), fetched))
                .await
                .map_err(|_| {
                    fetch_err(format!(
                        "no complete answer within {}s",
                        FETCH_TIMEOUT.as_secs()
                    ))
                })?
                .map_err(fetch_err)?
        }
    };
    let expected = image.checksum.trim_start_matches("sha256:");
    if actual != expected {
        // `tmp` is removed on drop: nothing partial stays in the cache.
        return Err(ImageError::Checksum {
            url: image.url.clone(),
            expected: image.checksum.clone(),
            actual,
        });
    }
    let dest = dir.join(file_name_for(&image.checksum));
    tmp.persist(&dest).map_err(|e| ImageError::Io(e.error))?;
    Ok(dest)
}

/// Copy `from` to `to`, hashing as it goes; the hex sha256.
fn copy_hashing(from: &Path, to: &Path, fetched: &Counter) -> std::io::Result<String> {
    use std::io::Write;
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
        fetched.inc_by(n as u64);
    }
    dst.flush()?;
    Ok(format!("{:x}", h.finalize()))
}

/// GET `uri` (following redirects) into `to`, hashing as it streams; the
/// hex sha256, or why not.
async fn download(mut uri: hyper::Uri, to: &Path, fetched: &Counter) -> Result<String, String> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let client = http_client().map_err(|e| format!("TLS roots: {e}"))?;
    let mut redirects = 0;
    let resp = loop {
        let req = hyper::Request::get(uri.clone())
            .header(
                "user-agent",
                concat!("yukumo-agent/", env!("CARGO_PKG_VERSION")),
            )
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = client.request(req).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        })?;
        if resp.status().is_redirection() && redirects < MAX_REDIRECTS {
            let loc = resp
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| format!("{} without a Location", resp.status()))?;
            uri = resolve(&uri, loc)?;
            redirects += 1;
            continue;
        }
        break resp;
    };
    if !resp.status().is_success() {
        return Err(format!("the server answered {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut file = tokio::fs::File::create(to)
        .await
        .map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            h.update(&data);
            file.write_all(&data).await.map_err(|e| e.to_string())?;
            fetched.inc_by(data.len() as u64);
        }
    }
    file.flush().await.map_err(|e| e.to_string())?;
    Ok(format!("{:x}", h.finalize()))
}

/// A redirect's target: absolute, or a path on the same server.
fn resolve(base: &hyper::Uri, location: &str) -> Result<hyper::Uri, String> {
    if location.contains("://") {
        return location
            .parse()
            .map_err(|e| format!("redirect to {location:?}: {e}"));
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(
        location
            .parse()
            .map_err(|e| format!("redirect to {location:?}: {e}"))?,
    );
    hyper::Uri::from_parts(parts).map_err(|e| e.to_string())
}

/// Hex sha256 of a file.
#[cfg(test)]
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn src(path: &Path, checksum: String) -> ImageSource {
        ImageSource {
            url: format!("file://{}", path.display()),
            checksum,
            format: Default::default(),
        }
    }

    /// A one-request-at-a-time HTTP/1.1 server on loopback: `/img` the
    /// body, `/moved` a redirect to it, anything else 404.
    async fn serve(body: Vec<u8>) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut req = vec![0u8; 4096];
                let n = c.read(&mut req).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&req[..n]).to_string();
                let head = if line.starts_with("GET /img ") {
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len())
                } else if line.starts_with("GET /moved ") {
                    "HTTP/1.1 302 Found\r\nlocation: /img\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                };
                let _ = c.write_all(head.as_bytes()).await;
                if line.starts_with("GET /img ") {
                    let _ = c.write_all(&body).await;
                }
                let _ = c.shutdown().await;
            }
        });
        addr
    }

    /// Images come over HTTP in-process (no curl), through a redirect,
    /// hashed while they stream; the bytes are counted; a wrong checksum or
    /// a 404 leaves nothing in the cache.
    #[tokio::test]
    async fn http_images_stream_verified_and_counted() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let addr = serve(body.clone()).await;
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join("src"), &body).unwrap();
        let sum = format!("sha256:{}", sha256_file(&state.path().join("src")).unwrap());
        let metrics = CacheMetrics::default();
        let cache = ImageCache::new(state.path(), u64::MAX, metrics.clone()).unwrap();
        let img = |path: &str, checksum: &str| ImageSource {
            url: format!("http://{addr}{path}"),
            checksum: checksum.to_string(),
            format: Default::default(),
        };
        let bad = format!("sha256:{}", "1".repeat(64));
        let err = cache.ensure(&img("/img", &bad)).await.err().unwrap();
        assert!(matches!(err, ImageError::Checksum { .. }), "{err}");
        let err = cache.ensure(&img("/nope", &sum)).await.err().unwrap();
        assert!(err.to_string().contains("404"), "{err}");
        let files = std::fs::read_dir(state.path().join("images")).unwrap().count();
        assert_eq!(files, 0, "nothing partial is left");
        let got = cache.ensure(&img("/moved", &sum)).await.unwrap();
        assert_eq!(std::fs::read(&got.path).unwrap(), body);
        assert_eq!(metrics.fetched_bytes.get(), 2 * body.len() as u64, "both full downloads counted");
        let err = cache
            .ensure(&ImageSource {
                url: "ftp://example.invalid/x".into(),
                checksum: bad,
                format: Default::default(),
            })
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("only http, https and file"), "{err}");
    }

    #[tokio::test]
    async fn verified_once_and_wrong_checksum_leaves_nothing() {
        let state = tempfile::tempdir().unwrap();
        let origin = state.path().join("origin.img");
        std::fs::write(&origin, b"a tiny image").unwrap();
        let good = format!("sha256:{}", sha256_file(&origin).unwrap());
        let cache = ImageCache::new(state.path(), u64::MAX, Default::default()).unwrap();
        let img = src(&origin, good.clone());
        let path = |r: Result<CachedImage, ImageError>| r.unwrap().path;
        let (a, b) = tokio::join!(async { path(cache.ensure(&img).await) }, async {
            path(cache.ensure(&img).await)
        });
        assert_eq!(a, b);
        let bad = format!("sha256:{}", "0".repeat(64));
        let err = cache.ensure(&src(&origin, bad)).await.err().unwrap();
        assert!(matches!(err, ImageError::Checksum { .. }), "{err}");
        let files: Vec<_> = std::fs::read_dir(state.path().join("images"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(files.len(), 1, "only the verified image remains: {files:?}");
        let missing = cache.ensure(&src(&state.path().join("nope"), good)).await;
        assert!(missing.is_ok(), "cached by checksum already");
    }

    /// An image of `size` bytes placed in the cache as if fetched, last used
    /// at `used` seconds after the epoch; its source points at a copy.
    fn put(state: &Path, tag: &str, size: usize, used: u64) -> (ImageSource, PathBuf) {
        let origin = state.join(format!("origin-{tag}"));
        let mut content = tag.as_bytes().to_vec();
        content.resize(size, b'.');
        std::fs::write(&origin, &content).unwrap();
        let checksum = format!("sha256:{}", sha256_file(&origin).unwrap());
        let path = state.join("images").join(file_name_for(&checksum));
        std::fs::write(&path, &content).unwrap();
        set_used(&path, used);
        (src(&origin, checksum), path)
    }

    fn set_used(path: &Path, secs: u64) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs))
            .unwrap();
    }

    fn name(p: &Path) -> String {
        p.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// An overlay on `image` in a node directory, as the reconciler makes it.
    fn overlay(state: &Path, uid: &str, image: &Path) -> PathBuf {
        let dir = state.join("nodes").join(uid);
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root.qcow2");
        crate::compute::disks::qcow2::create_overlay(
            &root,
            image,
            crate::compute::disks::qcow2::BackingFormat::Raw,
            1 << 20,
        )
        .unwrap();
        root
    }

    #[test]
    fn qcow2_header_names_the_backing_file() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state.path().join("images")).unwrap();
        let (_, image) = put(state.path(), "base", 4096, 0);
        let root = overlay(state.path(), "n1", &image);
        let info = |p: &Path| crate::compute::disks::qcow2::info(p).unwrap().backing;
        assert_eq!(info(&root), Some(image.clone()));
        // Not qcow2, or too short: no backing file.
        let other = state.path().join("nodes/n1/cidata.iso");
        std::fs::write(&other, b"raw").unwrap();
        assert_eq!(info(&other), None);
        let used = images_in_use(&state.path().join("nodes")).unwrap();
        assert_eq!(used, HashSet::from([name(&image)]));
        assert!(
            images_in_use(&state.path().join("no-nodes"))
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn over_the_bound_evicts_the_least_recently_used_unused_image() {
        let state = tempfile::tempdir().unwrap();
        let metrics = CacheMetrics::default();
        let cache = ImageCache::new(state.path(), 250, metrics.clone()).unwrap();
        let (a, pa) = put(state.path(), "a", 100, 1);
        let (_, pb) = put(state.path(), "b", 100, 2);
        let (_, pc) = put(state.path(), "c", 100, 3);
        // A download in progress counts towards the size but is never evicted.
        let partial = state
            .path()
            .join("images")
            .join(format!("{PARTIAL_PREFIX}x-1"));
        std::fs::write(&partial, [0u8; 10]).unwrap();
        // Using `a` makes `b` the least recently used.
        drop(cache.ensure(&a).await.unwrap());
        let ev = cache.evict().await.unwrap();
        assert_eq!(ev.total_bytes, 310);
        assert_eq!(ev.evicted, vec![name(&pb)]);
        assert_eq!(ev.freed_bytes, 100);
        assert!(pa.exists() && !pb.exists() && pc.exists() && partial.exists());
        assert_eq!(metrics.evictions.get(), 1);
        assert_eq!(metrics.evicted_bytes.get(), 100);
        assert_eq!(metrics.bytes.get(), 210);
        // Within the bound now: a second pass evicts nothing.
        assert!(cache.evict().await.unwrap().evicted.is_empty());
    }

    #[tokio::test]
    async fn an_image_in_use_is_never_evicted() {
        let state = tempfile::tempdir().unwrap();
        // A bound of 0: everything unused goes.
        let cache = ImageCache::new(state.path(), 0, Default::default()).unwrap();
        let (_, overlaid) = put(state.path(), "overlaid", 100, 1);
        let (wanted, pw) = put(state.path(), "wanted", 100, 2);
        let (held, ph) = put(state.path(), "held", 100, 3);
        let (_, unused) = put(state.path(), "unused", 100, 4);
        overlay(state.path(), "node-1", &overlaid);
        cache.set_wanted([wanted.checksum.as_str()]);
        // Held as during an overlay creation.
        let guard = cache.ensure(&held).await.unwrap();
        let ev = cache.evict().await.unwrap();
        assert_eq!(ev.evicted, vec![name(&unused)]);
        assert!(overlaid.exists() && pw.exists() && ph.exists() && !unused.exists());
        // Released and no longer wanted, the two go; the overlaid one stays.
        drop(guard);
        cache.set_wanted([]);
        let mut ev = cache.evict().await.unwrap().evicted;
        ev.sort();
        let mut want = vec![name(&pw), name(&ph)];
        want.sort();
        assert_eq!(ev, want);
        assert!(overlaid.exists());
        // An unreadable overlay stops eviction rather than guessing.
        let bad = state.path().join("nodes/node-2");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::create_dir(bad.join("root.qcow2")).unwrap();
        let (_, extra) = put(state.path(), "extra", 100, 5);
        assert!(cache.evict().await.is_err());
        assert!(extra.exists());
    }

    #[tokio::test]
    async fn under_the_bound_nothing_is_evicted_and_a_fetch_evicts_after() {
        let state = tempfile::tempdir().unwrap();
        let metrics = CacheMetrics::default();
        let cache = ImageCache::new(state.path(), 300, metrics.clone()).unwrap();
        let (_, p1) = put(state.path(), "one", 100, 1);
        let (_, p2) = put(state.path(), "two", 100, 2);
        let ev = cache.evict().await.unwrap();
        assert_eq!((ev.total_bytes, ev.evicted.len()), (200, 0));
        assert_eq!(metrics.evictions.get(), 0);
        // Fetching a third and fourth image goes over the bound: the oldest
        // unused image goes, never the one just fetched.
        let (three, p3) = put(state.path(), "three", 100, 3);
        std::fs::remove_file(&p3).unwrap();
        drop(cache.ensure(&three).await.unwrap());
        assert!(p1.exists() && p2.exists() && p3.exists());
        let (four, p4) = put(state.path(), "four", 100, 0);
        std::fs::remove_file(&p4).unwrap();
        drop(cache.ensure(&four).await.unwrap());
        assert!(!p1.exists() && p2.exists() && p3.exists() && p4.exists());
        assert_eq!(metrics.evictions.get(), 1);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20Gi"), Ok(20 << 30));
        assert_eq!(parse_size("500Mi"), Ok(500 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size(" 7 Ti "), Ok(7 << 40));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5Xi").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }
}
