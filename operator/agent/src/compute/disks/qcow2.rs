//! qcow2 images written and read in-process: the copy-on-write overlay a
//! node boots from (an empty qcow2 v3 image whose header names the cached
//! image as its backing file), and the facts the agent reads from images
//! (virtual size, backing file).
//!
//! An empty overlay is small and fully determined by its size and backing
//! file (<https://qemu-project.gitlab.io/qemu/interop/qcow2.html>):
//!
//! | cluster | content |
//! |---|---|
//! | 0 | header, header extensions (backing file format, end), backing file name |
//! | 1 | refcount table: one entry, pointing at cluster 2 |
//! | 2 | refcount block: 16-bit refcounts, 1 for each cluster the image uses |
//! | 3… | L1 table (all zero: no cluster is allocated; reads go to the backing file) |
//!
//! The file is sparse: only the header, the refcount table's entry and the
//! refcounts are written, the L1 table is zeros up to the file's end.
//! What `qemu-img create -f qcow2 -b IMAGE -F FMT SIZE` makes is equivalent
//! (`qemu-img check` accepts ours; a unit test runs it where QEMU is installed).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Header length of a version 3 image without optional fields.
const HEADER_LEN: u32 = 104;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
/// qcow2 limits a backing file name to 1023 bytes.
const MAX_BACKING_NAME: usize = 1023;

/// Format of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    Qcow2,
    Raw,
}

impl BackingFormat {
    fn name(self) -> &'static str {
        match self {
            BackingFormat::Qcow2 => "qcow2",
            BackingFormat::Raw => "raw",
        }
    }
}

/// Bytes to write at an offset.
type Run = (u64, Vec<u8>);

/// The bytes of an empty qcow2 overlay of `size` bytes on `backing`, as
/// (offset, bytes) runs, and the file's length (the rest is zeros).
fn layout(size: u64, backing: &Path, format: BackingFormat) -> std::io::Result<(Vec<Run>, u64)> {
    let name = backing.as_os_str().as_bytes();
    if name.is_empty() || name.len() > MAX_BACKING_NAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "backing file name of {} bytes (1-{MAX_BACKING_NAME})",
                name.len()
            ),
        ));
    }
    // Each L1 entry maps one L2 table: CLUSTER / 8 clusters of data.
    let per_l1 = CLUSTER * (CLUSTER / 8);
    let l1_size = size.div_ceil(per_l1);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER).max(1);
    let (refcount_table, refcount_block, l1_table) = (CLUSTER, 2 * CLUSTER, 3 * CLUSTER);
    let clusters = 3 + l1_clusters;
    // One refcount block holds CLUSTER / 2 16-bit counts: far more than the
    // clusters of an empty image of any size qcow2 allows.
    debug_assert!(clusters < CLUSTER / 2);

    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    let ext_fmt = format.name().as_bytes();
    let ext_len = 8 + ext_fmt.len().next_multiple_of(8) + 8; // format + end
    let backing_offset = u64::from(HEADER_LEN) + ext_len as u64;
    h.extend_from_slice(&backing_offset.to_be_bytes());
    h.extend_from_slice(&(name.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&(l1_size as u32).to_be_bytes());
    h.extend_from_slice(&l1_table.to_be_bytes());
    h.extend_from_slice(&refcount_table.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount table clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    h.extend_from_slice(&HEADER_LEN.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LEN as usize);
    // Header extensions: the backing file's format, then the end marker.
    h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    h.extend_from_slice(&(ext_fmt.len() as u32).to_be_bytes());
    h.extend_from_slice(ext_fmt);
    h.resize(h.len().next_multiple_of(8), 0);
    h.extend_from_slice(&[0u8; 8]);
    debug_assert_eq!(h.len() as u64, backing_offset);
    h.extend_from_slice(name);

    let refcounts: Vec<u8> = (0..clusters).flat_map(|_| 1u16.to_be_bytes()).collect();
    let runs = vec![
        (0, h),
        (refcount_table, refcount_block.to_be_bytes().to_vec()),
        (refcount_block, refcounts),
    ];
    // The file ends after the L1 table's entries (zeros, left sparse).
    let len = l1_table + (l1_size * 8).max(8);
    Ok((runs, len))
}

/// Create an empty qcow2 overlay of `size` bytes on `backing` at `path`
/// (written to a temporary file beside it, then renamed: a reader never
/// sees half an image).
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    format: BackingFormat,
    size: u64,
) -> std::io::Result<()> {
    let (runs, len) = layout(size, backing, format)?;
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        for (offset, bytes) in &runs {
            f.seek(SeekFrom::Start(*offset))?;
            f.write_all(bytes)?;
        }
        f.set_len(len)?;
        Ok::<_, std::io::Error>(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
}

/// Where an image is written before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// What an image file's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// The backing file named in a qcow2 header.
    pub backing: Option<PathBuf>,
    /// Whether it is a qcow2 image (else raw).
    pub qcow2: bool,
}

/// Read an image's header: a qcow2 image's virtual size and backing file,
/// or a raw image's length.
pub fn info(path: &Path) -> std::io::Result<ImageInfo> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut header = [0u8; 32];
    let n = read_up_to(&mut f, &mut header)?;
    if n < 32 || &header[..4] != MAGIC {
        return Ok(ImageInfo {
            virtual_size: len,
            backing: None,
            qcow2: false,
        });
    }
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    let offset = be64(&header[8..16]);
    let name_len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
    let virtual_size = be64(&header[24..32]);
    let backing = if offset == 0 || name_len == 0 {
        None
    } else if name_len > MAX_BACKING_NAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("qcow2 backing file name of {name_len} bytes"),
        ));
    } else {
        let mut name = vec![0u8; name_len];
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut name)?;
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(&name)))
    };
    Ok(ImageInfo {
        virtual_size,
        backing,
        qcow2: true,
    })
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
        std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .ok()
    }

    /// `qemu-io -c CMD IMAGE`: QEMU's block layer reading and writing.
    fn qemu_io(cmd: &str, image: &str) -> std::process::Output {
        std::process::Command::new("qemu-io")
            .args(["-c", cmd, image])
            .output()
            .expect("qemu-io is installed with qemu-img")
    }

    #[test]
    fn an_overlay_names_its_backing_file_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 3 << 20]).unwrap();
        assert_eq!(
            info(&base).unwrap(),
            ImageInfo {
                virtual_size: 3 << 20,
                backing: None,
                qcow2: false
            }
        );
        let overlay = dir.path().join("root.qcow2");
        create_overlay(&overlay, &base, BackingFormat::Raw, 5 << 30).unwrap();
        let i = info(&overlay).unwrap();
        assert_eq!(i.virtual_size, 5 << 30);
        assert_eq!(i.backing.as_deref(), Some(base.as_path()));
        assert!(i.qcow2);
        assert!(!tmp_path(&overlay).exists());
        // Sparse: a few pages of data, whatever the size.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&overlay).unwrap().blocks() * 512 <= 64 << 10);
        // A chain: an overlay on an overlay.
        let top = dir.path().join("top.qcow2");
        create_overlay(&top, &overlay, BackingFormat::Qcow2, i.virtual_size).unwrap();
        assert_eq!(
            info(&top).unwrap().backing.as_deref(),
            Some(overlay.as_path())
        );
        assert!(create_overlay(&top, Path::new(""), BackingFormat::Raw, 1).is_err());
    }

    /// QEMU's own checker accepts the image and reads the backing file's
    /// bytes through it; skipped, saying so, without qemu-img.
    #[test]
    fn qemu_accepts_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let Some(out) = qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "70M"])
        else {
            eprintln!("skipped: qemu-img not installed");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let w = qemu_io("write -P 0x5a 1M 64k", base.to_str().unwrap());
        assert!(w.status.success(), "{w:?}");
        for (size, fmt) in [
            (70u64 << 20, BackingFormat::Qcow2),
            (20 << 30, BackingFormat::Qcow2),
        ] {
            let overlay = dir.path().join(format!("o{size}.qcow2"));
            create_overlay(&overlay, &base, fmt, size).unwrap();
            let o = overlay.to_str().unwrap();
            let check = qemu_img(&["check", o]).unwrap();
            assert!(
                check.status.success(),
                "qemu-img check: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            let js = qemu_img(&["info", "--output=json", o]).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&js.stdout).unwrap();
            assert_eq!(v["virtual-size"], size);
            assert_eq!(v["backing-filename-format"], "qcow2");
            assert_eq!(v["full-backing-filename"], base.to_str().unwrap());
            // The backing file's data shows through; writes stay in the overlay.
            let r = qemu_io("read -P 0x5a 1M 64k", o);
            assert!(
                String::from_utf8_lossy(&r.stdout).contains("read 65536/65536"),
                "{r:?}"
            );
            let w = qemu_io("write -P 0x11 0 4k", o);
            assert!(w.status.success());
            let check = qemu_img(&["check", o]).unwrap();
            assert!(check.status.success(), "after a write: {check:?}");
        }
    }
}
