//! LVM-backed `iscsi` pools: each volume (and snapshot) is a logical volume
//! of the pool's volume group, made, grown, copied and removed with LVM's
//! own tools (`lvm lvcreate|lvextend|lvremove|lvs|vgs`) and exported by the
//! host's tgtd as a block device (`/dev/VG/LV`), exactly as a file-backed
//! pool's files are.
//!
//! - The volume group is the fleet operator's and may hold other logical
//!   volumes: yukumo lists and touches only those tagged [`TAG`]; the pool's
//!   capacity is the group's size less what the others take.
//! - A logical volume is made of extents that may have held another
//!   tenant's data, so every extent a volume gets is zeroed before anything
//!   reads it: a new volume whole, a grown one from its old end. The range
//!   still to zero is kept in a tag (`yk-zero-from-N`) until it is done,
//!   and a copy under way carries `yk-copying`: such a volume is not
//!   reported (so never exported); an agent killed in between finishes the
//!   zeroing, or removes the half copy, on its next look.
//! - Changes run one at a time per agent (a copy may take minutes; other
//!   pools and hosts are not held up), and a look repairs only while none
//!   runs, so it never mistakes a copy under way for a leftover.
//! - Sizes are multiples of the group's extent size, so that a guest sees
//!   exactly the size asked for; any other size is refused with a message
//!   naming both.
//! - A copy (a snapshot taken, a restore, a volume seeded from a snapshot)
//!   is read from a temporary LVM snapshot of the source (`yk-copy-…`), so it
//!   is a point in time even while a guest writes the source.
//!
//! Names: a decision's file name is the logical volume's name, with a
//! snapshot's `@` stored as `+` (LVM allows no `@`), as in `rbd` pools.

use std::process::Stdio;

use yukumo_api::site::{LvmPool, StoragePool};

use super::ceph::{file_of, image_of};
use super::decide::{PoolSeen, StorageOp, VolSeen};
use crate::hypervisor::HypervisorError;

/// The tag of every logical volume yukumo made.
pub const TAG: &str = "yukumo";
/// The tag prefix of a volume whose extents from N on are not zeroed yet.
const ZERO_TAG: &str = "yk-zero-from-";
/// The tag of a volume whose copy is under way.
const COPYING: &str = "yk-copying";
/// The name prefix of a temporary snapshot a copy is read from.
const COPY_PREFIX: &str = "yk-copy-";

/// What LVM-backed pools need of their host: its programs (`lvm`,
/// `qemu-img`) and zeroing a range of a block device. [`Tools`] on a real
/// host; a fake volume group in tests.
pub trait LvmHost: Send + Sync + 'static {
    /// Run a program; its standard output, or its last line of errors.
    fn run(
        &self,
        program: &str,
        args: &[String],
    ) -> impl std::future::Future<Output = Result<Vec<u8>, HypervisorError>> + Send;
    /// Write zeros over bytes `from..to` of the block device at `path`.
    fn zero(
        &self,
        path: &str,
        from: u64,
        to: u64,
    ) -> impl std::future::Future<Output = Result<(), HypervisorError>> + Send;
}

/// The host's own programs and block devices.
#[derive(Clone, Debug, Default)]
pub struct Tools;

/// LVM's tools, run by the agent.
#[derive(Clone, Debug, Default)]
pub struct Lvm<H: LvmHost = Tools> {
    host: std::sync::Arc<H>,
    /// Held by each change, and by a look that repairs.
    busy: std::sync::Arc<tokio::sync::Mutex<()>>,
}

fn err(message: impl Into<String>) -> HypervisorError {
    HypervisorError::Storage {
        message: message.into(),
    }
}

fn lvm_of(pool: &StoragePool) -> Result<&LvmPool, HypervisorError> {
    pool.lvm
        .as_ref()
        .ok_or_else(|| err(format!("pool {:?} has no lvm settings", pool.name)))
}

/// A volume group as `vgs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vg {
    pub size: u64,
    pub free: u64,
    pub extent: u64,
}

/// A logical volume as `lvs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub tags: Vec<String>,
}

impl Lv {
    /// Made by yukumo (a volume, a snapshot, a copy's temporary snapshot).
    fn tagged(&self) -> bool {
        self.tags.iter().any(|t| t == TAG)
    }

    /// A volume or snapshot of yukumo's.
    fn ours(&self) -> bool {
        self.tagged() && !self.name.starts_with(COPY_PREFIX)
    }

    /// Not finished: zeroing or a copy is under way (or was cut off).
    fn pending(&self) -> bool {
        self.zero_from().is_some() || self.tags.iter().any(|t| t == COPYING)
    }

    /// Where zeroing has still to start, if it has not finished.
    fn zero_from(&self) -> Option<u64> {
        self.tags
            .iter()
            .find_map(|t| t.strip_prefix(ZERO_TAG)?.parse().ok())
    }
}

fn num(v: &serde_json::Value, key: &str) -> Result<u64, String> {
    let s = v[key]
        .as_str()
        .ok_or_else(|| format!("lvm report: no {key}"))?;
    s.trim()
        .trim_end_matches(['B', 'b'])
        .parse()
        .map_err(|_| format!("lvm report: {key} {s:?} is not a number of bytes"))
}

/// The rows of an `lvm … --reportformat json` report of `kind` (`vg`, `lv`).
fn rows(json: &[u8], kind: &str) -> Result<Vec<serde_json::Value>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("lvm report: {e}"))?;
    Ok(v["report"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r[kind].as_array().cloned().unwrap_or_default())
        .collect())
}

/// `vgs --reportformat json --units b -o vg_size,vg_free,vg_extent_size`.
pub fn parse_vgs(json: &[u8]) -> Result<Vg, String> {
    let r = rows(json, "vg")?;
    let v = r.first().ok_or("lvm report: no volume group")?;
    Ok(Vg {
        size: num(v, "vg_size")?,
        free: num(v, "vg_free")?,
        extent: num(v, "vg_extent_size")?,
    })
}

/// `lvs --reportformat json --units b -o lv_name,lv_path,lv_size,lv_tags`.
pub fn parse_lvs(json: &[u8]) -> Result<Vec<Lv>, String> {
    rows(json, "lv")?
        .iter()
        .map(|v| {
            Ok(Lv {
                name: v["lv_name"].as_str().unwrap_or_default().to_string(),
                path: v["lv_path"].as_str().unwrap_or_default().to_string(),
                size: num(v, "lv_size")?,
                tags: v["lv_tags"]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// The pool as the decision sees it: the group's room for yukumo's volumes
/// (its size less what other logical volumes take) and yukumo's finished
/// volumes.
pub fn pool_seen(vg_name: &str, vg: &Vg, lvs: &[Lv]) -> PoolSeen {
    let others: u64 = lvs.iter().filter(|l| !l.tagged()).map(|l| l.size).sum();
    PoolSeen {
        active: true,
        path: vg_name.to_string(),
        capacity: vg.size.saturating_sub(others),
        available: vg.free,
        volumes: lvs
            .iter()
            .filter(|l| l.ours() && !l.pending())
            .map(|l| {
                (
                    file_of(&l.name),
                    VolSeen {
                        path: l.path.clone(),
                        capacity: l.size,
                        allocation: l.size,
                    },
                )
            })
            .collect(),
    }
}

/// `bytes` as a volume's size in a group of `extent`-byte extents.
pub fn check_size(vg_name: &str, extent: u64, bytes: u64) -> Result<(), String> {
    if extent > 0 && !bytes.is_multiple_of(extent) {
        return Err(format!(
            "spec.size: {bytes} bytes is not a multiple of the extent size of volume group {vg_name:?} ({extent} bytes): a logical volume would be larger than asked; give a multiple of it"
        ));
    }
    Ok(())
}

/// The temporary snapshot's name for copying into `target` (an LV name).
pub fn copy_name(target: &str) -> String {
    format!("{COPY_PREFIX}{target}")
}

/// The copy-on-write room of a temporary snapshot of `size` bytes: a
/// quarter of it (the copy takes seconds), at least one extent.
pub fn copy_room(size: u64, extent: u64) -> u64 {
    let e = extent.max(1);
    (size / 4).div_ceil(e).max(1) * e
}

/// Zero bytes `from..to` of a block device in place (the kernel's
/// write-zeroes, or zero pages where the device has none).
fn zero_range(path: &str, from: u64, to: u64) -> Result<(), String> {
    use nix::fcntl::{FallocateFlags, fallocate};
    if to <= from {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("opening {path} to zero it: {e}"))?;
    // At most 1 GiB per call, so a big volume is not one uninterruptible call.
    let mut at = from;
    while at < to {
        let n = (to - at).min(1 << 30);
        fallocate(
            &f,
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            at as i64,
            n as i64,
        )
        .map_err(|e| format!("zeroing {path} from byte {at}: {e}"))?;
        at += n;
    }
    f.sync_all()
        .map_err(|e| format!("zeroing {path}: flush: {e}"))
}

impl LvmHost for Tools {
    /// Run a program (killed after 120 s); its standard output.
    async fn run(&self, program: &str, args: &[String]) -> Result<Vec<u8>, HypervisorError> {
        let what = format!("{program} {}", args.join(" "));
        let child = tokio::process::Command::new(program)
            .args(args)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => err(format!(
                    "{program} is not installed where this host's agent runs: an LVM-backed pool's host needs LVM's tools (lvm2) and qemu-img"
                )),
                _ => err(format!("{what}: {e}")),
            })?;
        super::ceph::finish(child, &what).await
    }

    async fn zero(&self, path: &str, from: u64, to: u64) -> Result<(), HypervisorError> {
        let path = path.to_string();
        tokio::task::spawn_blocking(move || zero_range(&path, from, to))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(err)
    }
}

impl<H: LvmHost> Lvm<H> {
    #[cfg(test)]
    fn on(host: H) -> Self {
        Lvm {
            host: std::sync::Arc::new(host),
            busy: Default::default(),
        }
    }

    async fn exec(&self, program: &str, args: &[String]) -> Result<Vec<u8>, HypervisorError> {
        self.host.run(program, args).await
    }

    async fn lvm(&self, args: &[&str]) -> Result<Vec<u8>, HypervisorError> {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.exec("lvm", &a).await
    }

    async fn vg(&self, vg: &str) -> Result<Vg, HypervisorError> {
        let out = self
            .lvm(&[
                "vgs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "vg_size,vg_free,vg_extent_size",
                vg,
            ])
            .await
            .map_err(|e| err(format!("volume group {vg:?}: {e}")))?;
        parse_vgs(&out).map_err(err)
    }

    async fn lvs(&self, vg: &str) -> Result<Vec<Lv>, HypervisorError> {
        let out = self
            .lvm(&[
                "lvs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "lv_name,lv_path,lv_size,lv_tags",
                vg,
            ])
            .await?;
        parse_lvs(&out).map_err(err)
    }

    async fn zero(&self, lv: &Lv, from: u64) -> Result<(), HypervisorError> {
        self.host.zero(&lv.path, from, lv.size).await
    }

    /// Zero what a volume has not had zeroed yet, then drop its mark.
    async fn finish_zeroing(&self, vg: &str, lv: &Lv) -> Result<(), HypervisorError> {
        let Some(from) = lv.zero_from() else {
            return Ok(());
        };
        self.zero(lv, from).await?;
        let full = format!("{vg}/{}", lv.name);
        self.lvm(&["lvchange", "--deltag", &format!("{ZERO_TAG}{from}"), &full])
            .await?;
        Ok(())
    }

    async fn find(&self, vg: &str, name: &str) -> Result<Option<Lv>, HypervisorError> {
        Ok(self.lvs(vg).await?.into_iter().find(|l| l.name == name))
    }

    /// A new logical volume of `bytes`, tagged, zeroed whole (`copying`:
    /// marked as a copy under way, see [`Lvm::copied`]).
    async fn create(
        &self,
        vg: &str,
        name: &str,
        bytes: u64,
        copying: bool,
    ) -> Result<Lv, HypervisorError> {
        let zero = format!("{ZERO_TAG}0");
        let mut args = vec![
            "lvcreate",
            "--yes",
            "--wipesignatures",
            "n",
            "--zero",
            "n",
            "--activate",
            "y",
            "--addtag",
            TAG,
            "--addtag",
            &zero,
        ];
        if copying {
            args.extend(["--addtag", COPYING]);
        }
        let size = format!("{bytes}b");
        args.extend(["-L", &size, "-n", name, vg]);
        self.lvm(&args).await?;
        let lv = self
            .find(vg, name)
            .await?
            .ok_or_else(|| err(format!("{vg}/{name} is not listed after lvcreate")))?;
        self.finish_zeroing(vg, &lv).await?;
        Ok(lv)
    }

    /// Before making `name` (under the lock): a volume of that name whose
    /// zeroing was cut off is finished, a cut-off copy removed; whether a
    /// finished volume is there (then nothing is to be made: a look ran
    /// while another change held the lock and did not see it).
    async fn settle(&self, vg: &str, name: &str) -> Result<bool, HypervisorError> {
        let Some(lv) = self.find(vg, name).await? else {
            return Ok(false);
        };
        if !lv.ours() {
            return Err(err(format!(
                "{vg}/{name} exists and is not yukumo's (no tag {TAG:?}): left alone"
            )));
        }
        if lv.tags.iter().any(|t| t == COPYING) {
            self.remove(vg, name).await?;
            return Ok(false);
        }
        self.finish_zeroing(vg, &lv).await?;
        Ok(true)
    }

    /// A copy is whole: the volume may be seen.
    async fn copied(&self, vg: &str, name: &str) -> Result<(), HypervisorError> {
        self.lvm(&["lvchange", "--deltag", COPYING, &format!("{vg}/{name}")])
            .await?;
        Ok(())
    }

    async fn remove(&self, vg: &str, name: &str) -> Result<(), HypervisorError> {
        if self.find(vg, name).await?.is_some() {
            self.lvm(&["lvremove", "--yes", &format!("{vg}/{name}")])
                .await?;
        }
        Ok(())
    }

    pub async fn observe(&self, pool: &StoragePool) -> Result<PoolSeen, HypervisorError> {
        let l = lvm_of(pool)?;
        let vgn = l.volume_group.as_str();
        let vg = self.vg(vgn).await?;
        let mut lvs = self.lvs(vgn).await?;
        if lvs.iter().any(|lv| lv.ours() && lv.pending()) {
            // Unfinished work: under way (leave it), or left by an agent
            // that stopped (finish the zeroing, remove a half copy).
            if let Ok(_busy) = self.busy.try_lock() {
                for lv in self.lvs(vgn).await?.iter().filter(|lv| lv.ours()) {
                    if lv.tags.iter().any(|t| t == COPYING) {
                        tracing::info!(volume = %lv.name, "removing a copy cut off by a stop");
                        self.remove(vgn, &lv.name).await?;
                    } else if lv.zero_from().is_some() {
                        tracing::info!(volume = %lv.name, "finishing zeroing cut off by a stop");
                        self.finish_zeroing(vgn, lv).await?;
                    }
                }
                lvs = self.lvs(vgn).await?;
            }
        }
        Ok(pool_seen(vgn, &vg, &lvs))
    }

    pub async fn apply(&self, pool: &StoragePool, op: StorageOp) -> Result<(), HypervisorError> {
        let l = lvm_of(pool)?;
        let vgn = l.volume_group.as_str();
        let _busy = self.busy.lock().await;
        match op {
            // The volume group is the fleet operator's: it must exist.
            StorageOp::EnsurePool { .. } => {
                self.vg(vgn).await?;
            }
            StorageOp::Create { name, bytes } => {
                let vg = self.vg(vgn).await?;
                check_size(vgn, vg.extent, bytes).map_err(err)?;
                if !self.settle(vgn, &image_of(&name)).await? {
                    self.create(vgn, &image_of(&name), bytes, false).await?;
                }
            }
            StorageOp::Grow { name, bytes } => {
                let vg = self.vg(vgn).await?;
                check_size(vgn, vg.extent, bytes).map_err(err)?;
                let lvn = image_of(&name);
                let lv = self
                    .find(vgn, &lvn)
                    .await?
                    .ok_or_else(|| err(format!("{vgn}/{lvn} does not exist")))?;
                if lv.size >= bytes {
                    return Ok(());
                }
                let full = format!("{vgn}/{lvn}");
                // Marked first: the new extents are zeroed even if this
                // agent stops right after the extension.
                self.lvm(&[
                    "lvchange",
                    "--addtag",
                    &format!("{ZERO_TAG}{}", lv.size),
                    &full,
                ])
                .await?;
                self.lvm(&["lvextend", "--yes", "-L", &format!("{bytes}b"), &full])
                    .await?;
                let lv = self
                    .find(vgn, &lvn)
                    .await?
                    .ok_or_else(|| err(format!("{full} is not listed after lvextend")))?;
                self.finish_zeroing(vgn, &lv).await?;
            }
            StorageOp::Delete { name } => {
                let lvn = image_of(&name);
                if let Some(lv) = self.find(vgn, &lvn).await? {
                    if !lv.ours() {
                        return Err(err(format!(
                            "{vgn}/{lvn} is not yukumo's (no tag {TAG:?}): left alone"
                        )));
                    }
                    self.remove(vgn, &lvn).await?;
                }
            }
            StorageOp::Clone { from, name } => {
                let vg = self.vg(vgn).await?;
                let (src, dst) = (image_of(&from), image_of(&name));
                let s = self
                    .find(vgn, &src)
                    .await?
                    .ok_or_else(|| err(format!("{vgn}/{src} does not exist")))?;
                let snap = copy_name(&dst);
                // A copy left by a stopped agent goes first.
                self.remove(vgn, &snap).await?;
                if self.settle(vgn, &dst).await? {
                    return Ok(());
                }
                self.lvm(&[
                    "lvcreate",
                    "--yes",
                    "--snapshot",
                    "--addtag",
                    TAG,
                    "-L",
                    &format!("{}b", copy_room(s.size, vg.extent)),
                    "-n",
                    &snap,
                    &format!("{vgn}/{src}"),
                ])
                .await?;
                let copied = async {
                    let d = self.create(vgn, &dst, s.size, true).await?;
                    self.exec(
                        "qemu-img",
                        &[
                            "convert".into(),
                            "-n".into(),
                            "--target-is-zero".into(),
                            "-f".into(),
                            "raw".into(),
                            "-O".into(),
                            "raw".into(),
                            format!("/dev/{vgn}/{snap}"),
                            d.path.clone(),
                        ],
                    )
                    .await?;
                    self.copied(vgn, &dst).await
                }
                .await;
                if copied.is_err() {
                    let _ = self.remove(vgn, &dst).await;
                }
                let removed = self.remove(vgn, &snap).await;
                copied?;
                removed?;
            }
            StorageOp::CopyImage { image, bytes, name } => {
                let vg = self.vg(vgn).await?;
                let lvn = image_of(&name);
                if self.settle(vgn, &lvn).await? {
                    return Ok(());
                }
                // An image's size need not be a multiple of the extent size:
                // the volume is grown to its own (checked) size next.
                let size = bytes.div_ceil(vg.extent.max(1)) * vg.extent.max(1);
                let d = self.create(vgn, &lvn, size, true).await?;
                let copied = self
                    .exec(
                        "qemu-img",
                        &[
                            "convert".into(),
                            "-n".into(),
                            "--target-is-zero".into(),
                            "-O".into(),
                            "raw".into(),
                            image.to_string_lossy().into_owned(),
                            d.path.clone(),
                        ],
                    )
                    .await;
                let copied = match copied {
                    Ok(_) => self.copied(vgn, &lvn).await,
                    Err(e) => Err(e),
                };
                if copied.is_err() {
                    let _ = self.remove(vgn, &lvn).await;
                }
                copied?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VGS: &[u8] = br#"  {
      "report": [
          {
              "vg": [
                  {"vg_size":"1069547520", "vg_free":"935329792", "vg_extent_size":"1048576"}
              ]
          }
      ]
  }
"#;

    const LVS: &[u8] = br#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"root", "lv_path":"/dev/yk/root", "lv_size":"67108864", "lv_tags":""},
                  {"lv_name":"6f1c7e4a-0000-4000-8000-000000000001.raw", "lv_path":"/dev/yk/6f1c7e4a-0000-4000-8000-000000000001.raw", "lv_size":"33554432", "lv_tags":"yukumo"},
                  {"lv_name":"6f1c7e4a-0000-4000-8000-000000000001+s1.raw", "lv_path":"/dev/yk/6f1c7e4a-0000-4000-8000-000000000001+s1.raw", "lv_size":"33554432", "lv_tags":"yk-zero-from-0,yukumo"},
                  {"lv_name":"yk-copy-x.raw", "lv_path":"/dev/yk/yk-copy-x.raw", "lv_size":"8388608", "lv_tags":"yukumo"},
                  {"lv_name":"6f1c7e4a-0000-4000-8000-000000000002.raw", "lv_path":"/dev/yk/6f1c7e4a-0000-4000-8000-000000000002.raw", "lv_size":"33554432", "lv_tags":"yk-copying,yukumo"}
              ]
          }
      ]
  }
"#;

    #[test]
    fn vgs_and_lvs_reports_are_read() {
        assert_eq!(
            parse_vgs(VGS).unwrap(),
            Vg {
                size: 1069547520,
                free: 935329792,
                extent: 1 << 20
            }
        );
        let lvs = parse_lvs(LVS).unwrap();
        assert_eq!(lvs.len(), 5);
        assert!(lvs[2].pending() && lvs[4].pending() && !lvs[1].pending());
        assert_eq!(lvs[2].tags, vec!["yk-zero-from-0", "yukumo"]);
        assert_eq!(lvs[2].zero_from(), Some(0));
        assert_eq!(lvs[1].zero_from(), None);
        assert!(parse_vgs(br#"{"report":[{"vg":[]}]}"#).is_err());
        assert!(parse_lvs(b"{").is_err());
        assert!(parse_lvs(br#"{"report":[{"lv":[]}]}"#).unwrap().is_empty());
        assert!(
            parse_lvs(br#"{"report":[{"lv":[{"lv_name":"a","lv_size":"x"}]}]}"#)
                .unwrap_err()
                .contains("lv_size")
        );
    }

    #[test]
    fn only_yukumos_volumes_are_seen_and_others_take_room() {
        let seen = pool_seen("yk", &parse_vgs(VGS).unwrap(), &parse_lvs(LVS).unwrap());
        assert!(seen.active);
        assert_eq!(seen.path, "yk");
        // The operator's `root` is not ours; its size is not the pool's.
        // Unfinished volumes (zeroing, copying) are not seen yet.
        assert_eq!(seen.capacity, 1069547520 - 67108864);
        assert_eq!(seen.available, 935329792);
        let names: Vec<&str> = seen.volumes.keys().map(String::as_str).collect();
        assert_eq!(names, vec!["6f1c7e4a-0000-4000-8000-000000000001.raw"]);
        let v = &seen.volumes["6f1c7e4a-0000-4000-8000-000000000001.raw"];
        assert_eq!(v.path, "/dev/yk/6f1c7e4a-0000-4000-8000-000000000001.raw");
        assert_eq!(v.capacity, 32 << 20);
        let mut lvs = parse_lvs(LVS).unwrap();
        lvs[2].tags.retain(|t| t == TAG);
        let seen = pool_seen("yk", &parse_vgs(VGS).unwrap(), &lvs);
        assert_eq!(
            seen.volumes["6f1c7e4a-0000-4000-8000-000000000001@s1.raw"].path,
            "/dev/yk/6f1c7e4a-0000-4000-8000-000000000001+s1.raw"
        );
    }

    #[test]
    fn sizes_must_be_whole_extents() {
        assert!(check_size("yk", 1 << 20, 64 << 20).is_ok());
        let e = check_size("yk", 4 << 20, (64 << 20) + (1 << 20)).unwrap_err();
        assert!(
            e.contains("spec.size") && e.contains("\"yk\"") && e.contains("4194304"),
            "{e}"
        );
        assert_eq!(copy_room(64 << 20, 1 << 20), 16 << 20);
        assert_eq!(copy_room(1 << 20, 4 << 20), 4 << 20);
    }

    #[test]
    fn zeroing_a_range_writes_zeros_there_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        std::fs::write(&p, vec![0xabu8; 3 * 4096]).unwrap();
        let path = p.to_string_lossy().into_owned();
        match zero_range(&path, 4096, 2 * 4096) {
            Ok(()) => {
                let b = std::fs::read(&p).unwrap();
                assert!(b[..4096].iter().all(|&x| x == 0xab));
                assert!(b[4096..8192].iter().all(|&x| x == 0));
                assert!(b[8192..].iter().all(|&x| x == 0xab));
            }
            // Some file systems (tmpfs, overlay) have no zero-range.
            Err(e) => assert!(e.contains("zeroing"), "{e}"),
        }
        assert!(zero_range(&path, 10, 10).is_ok());
        assert!(
            zero_range("/nonexistent/dev", 0, 1)
                .unwrap_err()
                .contains("opening")
        );
    }

    /// A volume group `yk` of 1 MiB extents, kept in memory, run through
    /// the `lvm` command lines this module sends; `fail` makes the next
    /// command line containing it fail once (an agent stopped there).
    #[derive(Default)]
    struct FakeVg {
        lvs: std::sync::Mutex<Vec<Lv>>,
        /// (device, from, to) of every zeroing.
        zeroed: std::sync::Mutex<Vec<(String, u64, u64)>>,
        /// (source, target) of every qemu-img copy.
        copied: std::sync::Mutex<Vec<(String, String)>>,
        fail: std::sync::Mutex<Vec<String>>,
    }

    const EXTENT: u64 = 1 << 20;
    const SIZE: u64 = 512 << 20;

    impl FakeVg {
        fn failing(&self, line: &str) -> bool {
            let mut f = self.fail.lock().unwrap();
            match f.iter().position(|p| line.contains(p.as_str())) {
                Some(i) => {
                    f.remove(i);
                    true
                }
                None => false,
            }
        }

        fn names(&self) -> Vec<String> {
            let lvs = self.lvs.lock().unwrap();
            lvs.iter()
                .map(|l| format!("{} {}", l.name, l.tags.join(",")))
                .collect()
        }
    }

    fn flag(args: &[String], f: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == f)
            .map(|w| w[1].clone())
            .collect()
    }

    fn bytes(v: &str) -> u64 {
        v.trim_end_matches('b').parse().unwrap()
    }

    impl LvmHost for FakeVg {
        async fn run(&self, program: &str, args: &[String]) -> Result<Vec<u8>, HypervisorError> {
            let line = format!("{program} {}", args.join(" "));
            if self.failing(&line) {
                return Err(err(format!("{line}: injected failure")));
            }
            let mut lvs = self.lvs.lock().unwrap();
            let target = args.last().cloned().unwrap_or_default();
            let lv_name = target.split_once('/').map(|(_, n)| n.to_string());
            let find = |lvs: &mut Vec<Lv>| -> Result<usize, HypervisorError> {
                let n = lv_name.clone().unwrap_or_default();
                lvs.iter().position(|l| l.name == n).ok_or_else(|| {
                    err(format!(
                        "{line}: Failed to find logical volume \"{target}\""
                    ))
                })
            };
            if program == "qemu-img" {
                let n = args.len();
                self.copied
                    .lock()
                    .unwrap()
                    .push((args[n - 2].clone(), args[n - 1].clone()));
                return Ok(vec![]);
            }
            match args[0].as_str() {
                "vgs" => {
                    if target != "yk" {
                        return Err(err(format!("{line}: Volume group \"{target}\" not found")));
                    }
                    let used: u64 = lvs.iter().map(|l| l.size).sum();
                    Ok(format!(
                        r#"{{"report":[{{"vg":[{{"vg_size":"{SIZE}","vg_free":"{}","vg_extent_size":"{EXTENT}"}}]}}]}}"#,
                        SIZE - used
                    )
                    .into_bytes())
                }
                "lvs" => {
                    let rows: Vec<String> = lvs
                        .iter()
                        .map(|l| {
                            format!(
                                r#"{{"lv_name":"{}","lv_path":"{}","lv_size":"{}","lv_tags":"{}"}}"#,
                                l.name,
                                l.path,
                                l.size,
                                l.tags.join(",")
                            )
                        })
                        .collect();
                    Ok(format!(r#"{{"report":[{{"lv":[{}]}}]}}"#, rows.join(",")).into_bytes())
                }
                "lvcreate" => {
                    let name = flag(args, "-n").pop().unwrap();
                    if lvs.iter().any(|l| l.name == name) {
                        return Err(err(format!(
                            "{line}: Logical Volume \"{name}\" already exists"
                        )));
                    }
                    let size = bytes(&flag(args, "-L").pop().unwrap()).div_ceil(EXTENT) * EXTENT;
                    lvs.push(Lv {
                        path: format!("/dev/yk/{name}"),
                        name,
                        size,
                        tags: flag(args, "--addtag"),
                    });
                    Ok(vec![])
                }
                "lvextend" => {
                    let i = find(&mut lvs)?;
                    lvs[i].size = bytes(&flag(args, "-L").pop().unwrap());
                    Ok(vec![])
                }
                "lvchange" => {
                    let i = find(&mut lvs)?;
                    for t in flag(args, "--addtag") {
                        lvs[i].tags.push(t);
                    }
                    for t in flag(args, "--deltag") {
                        lvs[i].tags.retain(|x| *x != t);
                    }
                    Ok(vec![])
                }
                "lvremove" => {
                    let i = find(&mut lvs)?;
                    lvs.remove(i);
                    Ok(vec![])
                }
                other => Err(err(format!("{line}: unknown command {other}"))),
            }
        }

        async fn zero(&self, path: &str, from: u64, to: u64) -> Result<(), HypervisorError> {
            if self.failing(&format!("zero {path}")) {
                return Err(err(format!("zeroing {path}: injected failure")));
            }
            self.zeroed
                .lock()
                .unwrap()
                .push((path.to_string(), from, to));
            Ok(())
        }
    }

    fn lvm_pool() -> StoragePool {
        StoragePool {
            name: "lvm".into(),
            type_: yukumo_api::site::PoolType::Iscsi,
            host: "h".into(),
            path: None,
            ceph: None,
            lvm: Some(LvmPool {
                volume_group: "yk".into(),
            }),
        }
    }

    fn fake() -> Lvm<FakeVg> {
        Lvm::on(FakeVg::default())
    }

    /// The fake and its pool, holding a finished 32 MiB volume `a.raw`.
    async fn fake_with_a_32mib_volume() -> (Lvm<FakeVg>, StoragePool) {
        let (lvm, p) = (fake(), lvm_pool());
        lvm.apply(
            &p,
            StorageOp::Create {
                name: "a.raw".into(),
                bytes: 32 << 20,
            },
        )
        .await
        .unwrap();
        (lvm, p)
    }

    #[tokio::test]
    async fn a_volume_is_zeroed_whole_and_seen_only_then() {
        let lvm = fake();
        let p = lvm_pool();
        // The agent stops while zeroing: the volume exists, marked, unseen.
        lvm.host
            .fail
            .lock()
            .unwrap()
            .push("zero /dev/yk/a.raw".into());
        let create = StorageOp::Create {
            name: "a.raw".into(),
            bytes: 64 << 20,
        };
        assert!(lvm.apply(&p, create.clone()).await.is_err());
        assert_eq!(lvm.host.names(), ["a.raw yukumo,yk-zero-from-0"]);
        // A look while a change runs leaves it (and does not see it).
        let busy = lvm.busy.clone();
        let held = busy.lock().await;
        let seen = lvm.observe(&p).await.unwrap();
        assert!(seen.volumes.is_empty());
        assert_eq!(lvm.host.names(), ["a.raw yukumo,yk-zero-from-0"]);
        drop(held);
        // The next look finishes the zeroing, then sees it.
        let seen = lvm.observe(&p).await.unwrap();
        assert_eq!(seen.volumes["a.raw"].capacity, 64 << 20);
        assert_eq!(seen.volumes["a.raw"].path, "/dev/yk/a.raw");
        assert_eq!(lvm.host.names(), ["a.raw yukumo"]);
        assert_eq!(
            *lvm.host.zeroed.lock().unwrap(),
            [("/dev/yk/a.raw".to_string(), 0, 64 << 20)]
        );
        // Asked again (a look that missed it): nothing is made twice.
        lvm.apply(&p, create).await.unwrap();
        assert_eq!(lvm.host.names(), ["a.raw yukumo"]);
        assert_eq!(lvm.host.zeroed.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_grown_volume_is_zeroed_from_its_old_end_also_after_a_stop() {
        let (lvm, p) = fake_with_a_32mib_volume().await;
        lvm.host
            .fail
            .lock()
            .unwrap()
            .push("zero /dev/yk/a.raw".into());
        let grow = StorageOp::Grow {
            name: "a.raw".into(),
            bytes: 48 << 20,
        };
        assert!(lvm.apply(&p, grow.clone()).await.is_err());
        assert!(lvm.observe(&p).await.unwrap().volumes["a.raw"].capacity == 48 << 20);
        assert_eq!(
            lvm.host.zeroed.lock().unwrap().last().cloned(),
            Some(("/dev/yk/a.raw".to_string(), 32 << 20, 48 << 20))
        );
        assert_eq!(lvm.host.names(), ["a.raw yukumo"]);
        lvm.apply(&p, grow).await.unwrap();
        assert_eq!(lvm.host.zeroed.lock().unwrap().len(), 2, "not zeroed again");
        // Not whole extents: refused, nothing changed.
        let e = lvm
            .apply(
                &p,
                StorageOp::Grow {
                    name: "a.raw".into(),
                    bytes: (64 << 20) + 512,
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("extent size"), "{e}");
        assert_eq!(
            lvm.observe(&p).await.unwrap().volumes["a.raw"].capacity,
            48 << 20
        );
    }

    #[tokio::test]
    async fn a_copy_cut_off_is_removed_and_a_copy_reads_a_temporary_snapshot() {
        let (lvm, p) = fake_with_a_32mib_volume().await;
        let clone = StorageOp::Clone {
            from: "a.raw".into(),
            name: "a@s1.raw".into(),
        };
        // Stopped during the copy: the half copy is unseen, then removed.
        lvm.host.fail.lock().unwrap().push("qemu-img".into());
        // (an injected failure returns an error like a killed qemu-img; the
        // agent's own cleanup would remove it, so make that fail too)
        lvm.host
            .fail
            .lock()
            .unwrap()
            .push("lvremove --yes yk/a+s1.raw".into());
        assert!(lvm.apply(&p, clone.clone()).await.is_err());
        assert!(
            lvm.host
                .names()
                .contains(&"a+s1.raw yukumo,yk-copying".to_string())
        );
        let seen = lvm.observe(&p).await.unwrap();
        assert_eq!(seen.volumes.keys().collect::<Vec<_>>(), ["a.raw"]);
        assert_eq!(
            lvm.host.names(),
            ["a.raw yukumo"],
            "half copy and snapshot gone"
        );
        // A whole copy: from a temporary snapshot, which goes after.
        lvm.apply(&p, clone).await.unwrap();
        assert_eq!(lvm.host.names(), ["a.raw yukumo", "a+s1.raw yukumo"]);
        assert_eq!(
            lvm.host.copied.lock().unwrap().last().cloned(),
            Some((
                "/dev/yk/yk-copy-a+s1.raw".to_string(),
                "/dev/yk/a+s1.raw".to_string()
            ))
        );
        let seen = lvm.observe(&p).await.unwrap();
        assert_eq!(seen.volumes["a@s1.raw"].capacity, 32 << 20);
    }

    #[tokio::test]
    async fn the_operators_volumes_and_a_missing_group_are_left_alone() {
        let lvm = fake();
        let p = lvm_pool();
        lvm.host.lvs.lock().unwrap().push(Lv {
            name: "b.raw".into(),
            path: "/dev/yk/b.raw".into(),
            size: 16 << 20,
            tags: vec![],
        });
        let seen = lvm.observe(&p).await.unwrap();
        assert!(seen.volumes.is_empty());
        assert_eq!(seen.capacity, SIZE - (16 << 20));
        let e = lvm
            .apply(
                &p,
                StorageOp::Delete {
                    name: "b.raw".into(),
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not yukumo's"), "{e}");
        let e = lvm
            .apply(
                &p,
                StorageOp::Create {
                    name: "b.raw".into(),
                    bytes: 16 << 20,
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not yukumo's"), "{e}");
        assert_eq!(lvm.host.names(), ["b.raw "]);
        let mut other = lvm_pool();
        other.lvm = Some(LvmPool {
            volume_group: "nope".into(),
        });
        let e = lvm.observe(&other).await.unwrap_err();
        assert!(e.to_string().contains("volume group \"nope\""), "{e}");
        assert!(
            lvm.apply(
                &other,
                StorageOp::EnsurePool {
                    path: "nope".into()
                }
            )
            .await
            .is_err()
        );
    }
}
