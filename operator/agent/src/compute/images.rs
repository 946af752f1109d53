//! The host's image cache: each image is fetched once, verified against its
//! sha256 while streaming to a temporary file in the cache directory, and
//! renamed into place atomically, so a reader never sees a partial or
//! unverified image and a failed fetch leaves no file behind. Concurrent
//! requests for the same image wait for one fetch.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
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

/// The cache under `<state>/images`.
#[derive(Clone)]
pub struct ImageCache {
    dir: PathBuf,
    locks: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
}

impl ImageCache {
    pub fn new(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("images");
        std::fs::create_dir_all(&dir)?;
        Ok(ImageCache {
            dir,
            locks: Arc::default(),
        })
    }

    /// Where a verified image with this checksum lives.
    pub fn path_for(&self, checksum: &str) -> PathBuf {
        self.dir.join(checksum.replace(':', "-"))
    }

    /// The verified local copy of `image`, fetching it if needed.
    pub async fn ensure(&self, image: &ImageSource) -> Result<PathBuf, ImageError> {
        let path = self.path_for(&image.checksum);
        let lock = {
            let mut locks = self.locks.lock().await;
            locks.entry(image.checksum.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if path.exists() {
            return Ok(path);
        }
        let (dir, image) = (self.dir.clone(), image.clone());
        tokio::task::spawn_blocking(move || fetch_verified(&dir, &image))
            .await
            .map_err(|e| ImageError::Io(std::io::Error::other(e)))?
    }
}

fn fetch_verified(dir: &Path, image: &ImageSource) -> Result<PathBuf, ImageError> {
    let fetch_err = |reason: String| ImageError::Fetch {
        url: image.url.clone(),
        reason,
    };
    let prefix = format!(
        "{PARTIAL_PREFIX}{}-",
        image.checksum.trim_start_matches("sha256:")
    );
    let tmp = tempfile::Builder::new().prefix(&prefix).tempfile_in(dir)?;
    if let Some(local) = image.url.strip_prefix("file://") {
        std::fs::copy(local, tmp.path()).map_err(|e| fetch_err(e.to_string()))?;
    } else {
        let out = std::process::Command::new("curl")
            .args([
                "-fsSL",
                "--retry",
                "2",
                "--connect-timeout",
                "10",
                "--max-time",
                "1800",
                "-o",
            ])
            .arg(tmp.path())
            .arg(&image.url)
            .output()
            .map_err(|e| fetch_err(format!("running curl: {e}")))?;
        if !out.status.success() {
            return Err(fetch_err(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
    }
    let actual = sha256_file(tmp.path())?;
    let expected = image.checksum.trim_start_matches("sha256:");
    if actual != expected {
        // `tmp` is removed on drop: nothing partial stays in the cache.
        return Err(ImageError::Checksum {
            url: image.url.clone(),
            expected: image.checksum.clone(),
            actual,
        });
    }
    let dest = dir.join(image.checksum.replace(':', "-"));
    tmp.persist(&dest).map_err(|e| ImageError::Io(e.error))?;
    Ok(dest)
}

/// Hex sha256 of a file.
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

    fn src(path: &Path, checksum: String) -> ImageSource {
        ImageSource {
            url: format!("file://{}", path.display()),
            checksum,
            format: Default::default(),
        }
    }

    #[tokio::test]
    async fn verified_once_and_wrong_checksum_leaves_nothing() {
        let state = tempfile::tempdir().unwrap();
        let origin = state.path().join("origin.img");
        std::fs::write(&origin, b"a tiny image").unwrap();
        let good = format!("sha256:{}", sha256_file(&origin).unwrap());
        let cache = ImageCache::new(state.path()).unwrap();
        let img = src(&origin, good.clone());
        let (a, b) = tokio::join!(cache.ensure(&img), cache.ensure(&img));
        assert_eq!(a.unwrap(), b.unwrap());
        let bad = format!("sha256:{}", "0".repeat(64));
        let err = cache.ensure(&src(&origin, bad)).await.unwrap_err();
        assert!(matches!(err, ImageError::Checksum { .. }), "{err}");
        let files: Vec<_> = std::fs::read_dir(state.path().join("images"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(files.len(), 1, "only the verified image remains: {files:?}");
        let missing = cache.ensure(&src(&state.path().join("nope"), good)).await;
        assert!(missing.is_ok(), "cached by checksum already");
    }
}
