//! Fetching an image into the cache: from a local file, or over HTTP(S)
//! in-process (hyper with rustls and the host's roots; no `curl`), hashed
//! while it streams, renamed into place only when its sha256 matches.

use std::io::Read;
use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};
use yukumo_api::common::ImageSource;

use super::{ImageError, PARTIAL_PREFIX, file_name_for};

/// Where a fetch reads from: a local file, or HTTP(S).
enum Origin {
    File(PathBuf),
    Http(hyper::Uri),
}

fn origin(url: &str) -> Result<Origin, String> {
    if let Some(local) = url.strip_prefix("file://") {
        return Ok(Origin::File(PathBuf::from(local)));
    }
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => Ok(Origin::Http(uri)),
        _ => Err("only http, https and file URLs are fetched".into()),
    }
}

/// The text at `url` (a checksum list), at most `max` bytes.
pub(super) async fn read_small(url: &str, max: usize) -> Result<String, String> {
    use http_body_util::BodyExt;
    let bytes = match origin(url)? {
        Origin::File(local) => {
            let meta = tokio::fs::metadata(&local)
                .await
                .map_err(|e| e.to_string())?;
            if meta.len() > max as u64 {
                return Err(format!("{} bytes: over the {max} allowed", meta.len()));
            }
            tokio::fs::read(&local).await.map_err(|e| e.to_string())?
        }
        Origin::Http(uri) => {
            let read = async {
                let mut body = get(uri).await?.into_body();
                let mut out = Vec::new();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| e.to_string())?;
                    if let Ok(data) = frame.into_data() {
                        if out.len() + data.len() > max {
                            return Err(format!("over the {max} bytes allowed"));
                        }
                        out.extend_from_slice(&data);
                    }
                }
                Ok(out)
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), read)
                .await
                .map_err(|_| "no complete answer within 60s".to_string())??
        }
    };
    String::from_utf8(bytes).map_err(|_| "not text (UTF-8)".to_string())
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
pub(super) async fn fetch_verified(
    dir: &Path,
    image: &ImageSource,
    checksum: &str,
    fetched: &Counter,
) -> Result<PathBuf, ImageError> {
    let fetch_err = |reason: String| ImageError::Fetch {
        url: image.url.clone(),
        reason,
    };
    let prefix = format!(
        "{PARTIAL_PREFIX}{}-",
        checksum.trim_start_matches("sha256:")
    );
    let tmp = tempfile::Builder::new().prefix(&prefix).tempfile_in(dir)?;
    let actual = match origin(&image.url).map_err(fetch_err)? {
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
    let expected = checksum.trim_start_matches("sha256:");
    if actual != expected {
        // `tmp` is removed on drop: nothing partial stays in the cache.
        return Err(ImageError::Checksum {
            url: image.url.clone(),
            expected: checksum.to_string(),
            actual,
        });
    }
    let dest = dir.join(file_name_for(checksum));
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

/// GET `uri`, following redirects: a successful answer, or why not.
async fn get(mut uri: hyper::Uri) -> Result<hyper::Response<hyper::body::Incoming>, String> {
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
    Ok(resp)
}

/// GET `uri` (following redirects) into `to`, hashing as it streams; the
/// hex sha256, or why not.
async fn download(uri: hyper::Uri, to: &Path, fetched: &Counter) -> Result<String, String> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let resp = get(uri).await?;
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
