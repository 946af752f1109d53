//! The NoCloud config disk (`cidata`) written in-process: an ISO 9660
//! image with Rock Ridge and Joliet names (`meta-data`, `user-data`,
//! `network-config`), what `genisoimage -volid cidata -joliet -rock` made
//! before, so guests read it exactly as they did.
//!
//! ISO 9660 rather than VFAT: every cloud-init and every guest kernel with
//! `isofs` reads it (the tiny test guest mounts `-t iso9660`), it is
//! read-only by nature, and the crate chosen, `hadris-iso`, is maintained
//! (2.x releases through 2026), pure Rust (no C, no process), and writes
//! Rock Ridge and Joliet; the VFAT crates (`fatfs` 0.3) have had no release
//! since 2022.

use std::path::Path;

use hadris_iso::sync::read::PathSeparator;
use hadris_iso::sync::write::options::{CreationFeatures, IsoFormatOptions};
use hadris_iso::sync::write::{File, InputFiles, IsoImageWriter};

use crate::compute::guestconfig::GuestConfig;

/// The volume label cloud-init looks for.
pub const LABEL: &str = "cidata";

/// The ISO image of `cfg`, as bytes.
pub fn image(cfg: &GuestConfig) -> std::io::Result<Vec<u8>> {
    let file = |name: &str, text: &str| File::File {
        name: std::sync::Arc::new(name.to_string()),
        contents: text.as_bytes().to_vec(),
    };
    let files = InputFiles {
        path_separator: PathSeparator::ForwardSlash,
        files: vec![
            file("meta-data", &cfg.meta_data),
            file("network-config", &cfg.network_config),
            file("user-data", &cfg.user_data),
        ],
    };
    let ops = IsoFormatOptions {
        volume_name: LABEL.to_string(),
        system_id: None,
        volume_set_id: None,
        publisher_id: None,
        preparer_id: None,
        application_id: Some("yukumo".into()),
        sector_size: 2048,
        path_separator: PathSeparator::ForwardSlash,
        features: CreationFeatures::extensions(),
        strict_charset: false,
    };
    let out = IsoImageWriter::create(
        std::io::Cursor::new(Vec::with_capacity(64 << 10)),
        files,
        ops,
    )
    .map_err(|e| std::io::Error::other(format!("writing the config disk: {e}")))?;
    Ok(out.into_inner())
}

/// Write the config disk of `cfg` at `path` (a temporary file beside it,
/// then renamed: a guest never sees half a disk).
pub fn write(cfg: &GuestConfig, path: &Path) -> std::io::Result<()> {
    let bytes = image(cfg)?;
    let tmp = super::qcow2::tmp_path(path);
    if let Err(e) = std::fs::write(&tmp, &bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GuestConfig {
        GuestConfig {
            meta_data: "instance-id: 0b5c-uid\nlocal-hostname: qs-frontend\n".into(),
            user_data: "#cloud-config\nhostname: qs-frontend\n".into(),
            network_config: "version: 2\nethernets: {}\n".into(),
        }
    }

    /// The image has its label, and the three files under their Rock Ridge
    /// names (the kernel reads them back in the test below).
    #[test]
    fn the_image_holds_the_three_files_under_their_names() {
        let bytes = image(&cfg()).unwrap();
        assert_eq!(bytes.len() % 2048, 0);
        // The primary volume descriptor at sector 16 names the volume.
        assert_eq!(&bytes[16 * 2048 + 1..16 * 2048 + 6], b"CD001");
        let label = &bytes[16 * 2048 + 40..16 * 2048 + 72];
        assert!(
            String::from_utf8_lossy(label)
                .trim_end()
                .eq_ignore_ascii_case(LABEL)
        );
        // Each file's content, and its Rock Ridge name, are in the image.
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        let c = cfg();
        for (name, content) in [
            ("meta-data", &c.meta_data),
            ("user-data", &c.user_data),
            ("network-config", &c.network_config),
        ] {
            assert!(has(name.as_bytes()), "name {name}");
            assert!(has(content.as_bytes()), "content of {name}");
        }
        // The layout is stable; only the writer's timestamps (the current
        // second, set by the crate) may differ between two images. The
        // agent never compares images: it keeps a stamp of the config.
        let (a, b) = (image(&cfg()).unwrap(), image(&cfg()).unwrap());
        assert_eq!(a.len(), b.len(), "same layout");
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(
            differing <= 512,
            "{differing} bytes differ: more than timestamps"
        );
    }

    /// Linux's isofs reads the image (a loop mount, as a guest would):
    /// skipped, saying so, without root or loop devices.
    #[test]
    fn the_kernel_mounts_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("cidata.iso");
        write(&cfg(), &iso).unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-o", "loop,ro", "-t", "iso9660"])
            .arg(&iso)
            .arg(&mnt)
            .status();
        if !mounted.is_ok_and(|s| s.success()) {
            eprintln!("skipped: no loop device or isofs here");
            return;
        }
        let read = std::fs::read_to_string(mnt.join("meta-data"));
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        assert_eq!(read.unwrap(), cfg().meta_data);
    }
}
