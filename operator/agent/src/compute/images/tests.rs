use super::*;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::time::Duration;

fn src(path: &Path, checksum: String) -> ImageSource {
    ImageSource {
        url: format!("file://{}", path.display()),
        checksum: Some(checksum),
        checksum_url: None,
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
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                )
            } else if line.starts_with("GET /moved ") {
                "HTTP/1.1 302 Found\r\nlocation: /img\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_string()
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
        checksum: Some(checksum.to_string()),
        checksum_url: None,
        format: Default::default(),
    };
    let bad = format!("sha256:{}", "1".repeat(64));
    let err = cache.ensure(&img("/img", &bad)).await.err().unwrap();
    assert!(matches!(err, ImageError::Checksum { .. }), "{err}");
    let err = cache.ensure(&img("/nope", &sum)).await.err().unwrap();
    assert!(err.to_string().contains("404"), "{err}");
    let files = std::fs::read_dir(state.path().join("images"))
        .unwrap()
        .count();
    assert_eq!(files, 0, "nothing partial is left");
    let got = cache.ensure(&img("/moved", &sum)).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), body);
    assert_eq!(
        metrics.fetched_bytes.get(),
        2 * body.len() as u64,
        "both full downloads counted"
    );
    let err = cache
        .ensure(&ImageSource {
            url: "ftp://example.invalid/x".into(),
            checksum: Some(bad),
            checksum_url: None,
            format: Default::default(),
        })
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("only http, https and file"),
        "{err}"
    );
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
    // Files staged in the cache's folder by someone else are not the cache's.
    let staged = state.path().join("images/yukumo-tiny-guest.qcow2");
    std::fs::write(&staged, [0u8; 100]).unwrap();
    overlay(state.path(), "node-1", &overlaid);
    cache.set_wanted([&wanted]);
    // Held as during an overlay creation.
    let guard = cache.ensure(&held).await.unwrap();
    let ev = cache.evict().await.unwrap();
    assert_eq!(ev.evicted, vec![name(&unused)]);
    assert!(overlaid.exists() && pw.exists() && ph.exists() && !unused.exists());
    assert!(staged.exists(), "a staged file is never evicted");
    assert_eq!(ev.total_bytes, 400, "nor counted");
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

/// An image given by a checksum list: verified against the list's line for
/// its file name; the list followed when it changes; the last sum standing
/// (also for a new agent on the same state) while the list is unreadable;
/// refusals naming the list and the reason; kept from eviction by it.
#[tokio::test]
async fn images_by_checksum_list() {
    let state = tempfile::tempdir().unwrap();
    let pubdir = state.path().join("pub");
    std::fs::create_dir_all(&pubdir).unwrap();
    let (image, list) = (pubdir.join("tiny.qcow2"), pubdir.join("SHA256SUMS"));
    let publish = |bytes: &[u8]| {
        std::fs::write(&image, bytes).unwrap();
        let sum = sha256_file(&image).unwrap();
        std::fs::write(
            &list,
            format!("{}  other.img\n{sum}  tiny.qcow2\n", "ab".repeat(32)),
        )
        .unwrap();
        format!("sha256:{sum}")
    };
    let src = ImageSource {
        url: format!("file://{}", image.display()),
        checksum: None,
        checksum_url: Some(format!("file://{}", list.display())),
        format: Default::default(),
    };
    let v1 = publish(b"version one");
    let cache = ImageCache::new(state.path(), u64::MAX, Default::default())
        .unwrap()
        .with_sums_refresh(Duration::ZERO);
    let got = cache.ensure(&src).await.unwrap().path;
    assert_eq!(
        got.file_name().unwrap().to_str().unwrap(),
        file_name_for(&v1)
    );
    assert_eq!(std::fs::read(&got).unwrap(), b"version one");

    // A new image published with its sum: taken.
    let v2 = publish(b"version two");
    let got = cache.ensure(&src).await.unwrap().path;
    assert_eq!(
        got.file_name().unwrap().to_str().unwrap(),
        file_name_for(&v2)
    );

    // The list unreadable: the last sum stands, also for a new agent.
    std::fs::remove_file(&list).unwrap();
    assert_eq!(cache.checksum_of(&src).await.unwrap(), v2);
    let restarted = ImageCache::new(state.path(), u64::MAX, Default::default())
        .unwrap()
        .with_sums_refresh(Duration::ZERO);
    let got = restarted.ensure(&src).await.unwrap().path;
    assert_eq!(
        got.file_name().unwrap().to_str().unwrap(),
        file_name_for(&v2)
    );

    // An image the list does not name, or whose sum it does not match.
    std::fs::write(&list, format!("{}  other.img\n", "ab".repeat(32))).unwrap();
    let err = cache.ensure(&src).await.err().unwrap().to_string();
    assert_eq!(
        err,
        format!(
            "checksumURL file://{} for {}: no line for tiny.qcow2 (it lists other.img)",
            list.display(),
            src.url
        )
    );
    std::fs::write(&list, format!("{}  tiny.qcow2\n", "cd".repeat(32))).unwrap();
    let err = cache.ensure(&src).await.err().unwrap();
    assert!(matches!(err, ImageError::Checksum { .. }), "{err}");

    // Never read and unreadable: refused, naming the list.
    let fresh = tempfile::tempdir().unwrap();
    let other = ImageCache::new(fresh.path(), u64::MAX, Default::default()).unwrap();
    let missing = ImageSource {
        checksum_url: Some("file:///nonexistent/SHA256SUMS".into()),
        ..src.clone()
    };
    let err = other.ensure(&missing).await.err().unwrap().to_string();
    assert!(
        err.starts_with("checksumURL file:///nonexistent/SHA256SUMS for file://")
            && err.contains("No such file"),
        "{err}"
    );

    // Wanted by the sum last read: not evicted, the older version is.
    assert_eq!(publish(b"version two"), v2);
    let bounded = ImageCache::new(state.path(), 0, Default::default())
        .unwrap()
        .with_sums_refresh(Duration::ZERO);
    assert_eq!(bounded.checksum_of(&src).await.unwrap(), v2);
    bounded.set_wanted([&src]);
    let ev = bounded.evict().await.unwrap();
    assert_eq!(ev.evicted, vec![file_name_for(&v1)]);
}
