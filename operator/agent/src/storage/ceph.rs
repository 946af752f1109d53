//! `rbd` pools: a volume is an image in a Ceph pool. The pool's host's agent
//! manages the images with Ceph's own tools (`rbd`, and `qemu-img` for an
//! image's copy) and reads the pool's capacity with the monitors' `df`
//! command (through librados: [`rados`]), each run in the host's network
//! namespace as the pool's Ceph user, with the key of the agent's keyring
//! (`--ceph-keyring`). QEMU on every host reaches the images with librbd;
//! the key is in each host's libvirt secret `yukumo-ceph-client.<user>`
//! ([`ensure_secrets`], from the same keyring).
//!
//! File names of the storage decision map to image names one to one, except
//! that a snapshot's `@` (a snapshot separator in RBD) is stored as `+`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use yukumo_api::site::{CephPool, StoragePool};

use super::decide::{PoolSeen, StorageOp, VolSeen};
use super::rados;
use crate::hypervisor::{Hypervisor, HypervisorError};

/// The Ceph tools of an agent.
#[derive(Clone, Debug)]
pub struct Ceph {
    /// The keyring holding the pools' users' keys; `None`: `rbd` pools
    /// report that the agent has none.
    pub keyring: Option<PathBuf>,
    /// The host's network namespace (where the monitors are reachable).
    pub netns: Option<String>,
    /// Where the per-pool client configurations are written.
    pub conf_dir: PathBuf,
}

fn err(message: impl Into<String>) -> HypervisorError {
    HypervisorError::Storage {
        message: message.into(),
    }
}

/// A storage tool's standard output once it exits (killed after 120 s), or
/// its last line of errors, after `what`.
pub async fn finish(child: tokio::process::Child, what: &str) -> Result<Vec<u8>, HypervisorError> {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .map_err(|_| err(format!("{what}: no answer in 120 s")))?
    .map_err(|e| err(format!("{what}: {e}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg = msg
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("failed")
            .trim();
        return Err(err(format!("{what}: {msg}")));
    }
    Ok(out.stdout)
}

/// An image name for a decision's file name.
pub fn image_of(file: &str) -> String {
    file.replace('@', "+")
}

/// A decision's file name for an image.
pub fn file_of(image: &str) -> String {
    image.replace('+', "@")
}

fn ceph_of(pool: &StoragePool) -> Result<&CephPool, HypervisorError> {
    pool.ceph
        .as_ref()
        .ok_or_else(|| err(format!("pool {:?} has no ceph settings", pool.name)))
}

/// The client configuration of a Ceph pool: its monitors and the keyring.
fn conf_text(c: &CephPool, keyring: &Path) -> String {
    format!(
        "[global]\nmon host = {}\nkeyring = {}\nlog file = /dev/null\nadmin socket =\n",
        c.monitors.join(","),
        keyring.display()
    )
}

/// One image of `rbd ls -l --format json` (snapshots have `snapshot`).
#[derive(serde::Deserialize)]
struct Listed {
    image: String,
    size: u64,
    #[serde(default)]
    snapshot: Option<String>,
}

/// The images of a pool, as decision files (snapshot entries skipped).
pub fn parse_ls(json: &[u8], pool: &str) -> Result<Vec<(String, VolSeen)>, String> {
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(vec![]);
    }
    let listed: Vec<Listed> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    Ok(listed
        .into_iter()
        .filter(|l| l.snapshot.is_none())
        .map(|l| {
            (
                file_of(&l.image),
                VolSeen {
                    path: format!("{pool}/{}", l.image),
                    capacity: l.size,
                    // Thin: what an image takes is not read (`rbd du` reads
                    // every object); free space comes from the monitors' `df`.
                    allocation: 0,
                },
            )
        })
        .collect())
}

/// (capacity, available) of a Ceph pool from the monitors' `df` (JSON, as
/// `ceph df --format json` prints it):
/// what it stores plus what it may still take, and the latter.
pub fn parse_df(json: &[u8], pool: &str) -> Result<(u64, u64), String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let p = v["pools"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == pool))
        .ok_or_else(|| format!("Ceph has no pool {pool:?}"))?;
    let used = p["stats"]["bytes_used"].as_u64().unwrap_or(0);
    let avail = p["stats"]["max_avail"].as_u64().unwrap_or(0);
    Ok((used + avail, avail))
}

/// The `[client.<id>]` keys of a keyring file: (user id, base64 key).
pub fn keyring_keys(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut entity: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(e) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            entity = e.strip_prefix("client.").map(str::to_string);
        } else if let (Some(user), Some((k, v))) = (&entity, line.split_once('='))
            && k.trim() == "key"
        {
            out.push((user.clone(), v.trim().to_string()));
        }
    }
    out
}

impl Ceph {
    /// The client configuration file of a Ceph pool (by pool and monitors:
    /// two clusters may have pools of one name).
    fn conf_path(&self, c: &CephPool) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        c.monitors.hash(&mut h);
        self.conf_dir
            .join(format!("{}-{:016x}.conf", c.pool, h.finish()))
    }

    fn keyring(&self) -> Result<&Path, HypervisorError> {
        self.keyring.as_deref().ok_or_else(|| {
            err("this host's agent has no Ceph keyring (--ceph-keyring) for rbd pools")
        })
    }

    /// Run a Ceph tool (killed after 120 s) as the pool's user in the host's
    /// namespace; its standard output.
    async fn run(
        &self,
        c: &CephPool,
        tool: &str,
        args: Vec<String>,
    ) -> Result<Vec<u8>, HypervisorError> {
        let keyring = self.keyring()?.to_path_buf();
        std::fs::create_dir_all(&self.conf_dir).map_err(|e| err(e.to_string()))?;
        let conf = self.conf_path(c);
        let text = conf_text(c, &keyring);
        if std::fs::read_to_string(&conf).ok().as_deref() != Some(text.as_str()) {
            // Written whole, then renamed: a concurrent reader never sees
            // half of it.
            let tmp =
                tempfile::NamedTempFile::new_in(&self.conf_dir).map_err(|e| err(e.to_string()))?;
            std::fs::write(tmp.path(), text).map_err(|e| err(e.to_string()))?;
            tmp.persist(&conf).map_err(|e| err(e.to_string()))?;
        }
        let netns = self.netns.clone();
        let (tool, user) = (tool.to_string(), c.user.clone());
        let what = if tool == rados::SUBCOMMAND {
            format!("Ceph monitor command {}", args.join(" "))
        } else {
            format!("{tool} {}", args.join(" "))
        };
        // Started from a thread in the host's namespace (the child inherits
        // it), awaited here; dropped (killed) when it takes too long.
        let handle = tokio::runtime::Handle::current();
        let child = tokio::task::spawn_blocking(move || {
            yukumo_agent::netns::in_netns_opt(netns.as_deref(), || {
                let _rt = handle.enter();
                let mut cmd;
                if tool == "qemu-img" {
                    // The image's options carry the user and configuration.
                    cmd = tokio::process::Command::new(&tool);
                    cmd.args(&args);
                } else if tool == rados::SUBCOMMAND {
                    // This very program, as librados's helper (rados.rs).
                    cmd = tokio::process::Command::new("/proc/self/exe");
                    cmd.arg(&tool).arg(&conf).arg(&user).args(&args);
                } else {
                    cmd = tokio::process::Command::new(&tool);
                    cmd.arg("-c").arg(&conf).arg("--id").arg(&user).args(&args);
                }
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
            })
        })
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(|e| err(format!("{what}: {e}")))?;
        finish(child, &what).await
    }

    async fn rbd(&self, c: &CephPool, args: &[&str]) -> Result<Vec<u8>, HypervisorError> {
        // `--no-progress` is an option of each subcommand that writes
        // (not of `ls`): it goes last.
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if args.first() != Some(&"ls") {
            a.push("--no-progress".into());
        }
        self.run(c, "rbd", a).await
    }

    pub async fn observe(&self, pool: &StoragePool) -> Result<PoolSeen, HypervisorError> {
        let c = ceph_of(pool)?;
        let ls = self
            .rbd(c, &["ls", "-l", "--format", "json", "-p", &c.pool])
            .await?;
        let volumes = parse_ls(&ls, &c.pool).map_err(err)?.into_iter().collect();
        let df = self
            .run(
                c,
                rados::SUBCOMMAND,
                vec![r#"{"prefix":"df","format":"json"}"#.into()],
            )
            .await?;
        let (capacity, available) = parse_df(&df, &c.pool).map_err(err)?;
        Ok(PoolSeen {
            active: true,
            path: c.pool.clone(),
            capacity,
            available,
            volumes,
        })
    }

    pub async fn apply(&self, pool: &StoragePool, op: StorageOp) -> Result<(), HypervisorError> {
        let c = ceph_of(pool)?;
        let spec = |file: &str| format!("{}/{}", c.pool, image_of(file));
        match op {
            // The Ceph pool is the fleet operator's: observing it proves it.
            StorageOp::EnsurePool { .. } => {}
            StorageOp::Create { name, bytes } => {
                self.rbd(c, &["create", "--size", &format!("{bytes}B"), &spec(&name)])
                    .await?;
            }
            StorageOp::Grow { name, bytes } => {
                self.rbd(c, &["resize", "--size", &format!("{bytes}B"), &spec(&name)])
                    .await?;
            }
            StorageOp::Delete { name } => {
                let s = spec(&name);
                match self.rbd(c, &["snap", "purge", &s]).await {
                    Err(e) if e.to_string().contains("No such file") => return Ok(()),
                    r => r?,
                };
                self.rbd(c, &["rm", &s]).await?;
            }
            StorageOp::Clone { from, name } => {
                // A point-in-time copy, also of an image a guest writes: a
                // snapshot of the source, copied, then removed.
                let src = spec(&from);
                let snap = format!("{src}@yk-copy-{}", image_of(&name));
                let _ = self.rbd(c, &["snap", "rm", &snap]).await;
                self.rbd(c, &["snap", "create", &snap]).await?;
                let copied = self.rbd(c, &["cp", &snap, &spec(&name)]).await;
                if copied.is_err() {
                    let _ = self.rbd(c, &["rm", &spec(&name)]).await;
                }
                let removed = self.rbd(c, &["snap", "rm", &snap]).await;
                copied?;
                removed?;
            }
            StorageOp::CopyImage { image, name, .. } => {
                let conf = self.conf_path(c);
                let target = format!("rbd:{}:id={}:conf={}", spec(&name), c.user, conf.display());
                // The configuration file is written by the first call.
                self.rbd(c, &["ls", "-p", &c.pool]).await?;
                let copied = self
                    .run(
                        c,
                        "qemu-img",
                        vec![
                            "convert".into(),
                            "-O".into(),
                            "raw".into(),
                            image.to_string_lossy().into_owned(),
                            target,
                        ],
                    )
                    .await;
                if copied.is_err() {
                    let _ = self.rbd(c, &["rm", &spec(&name)]).await;
                }
                copied?;
            }
        }
        Ok(())
    }
}

/// Define (or correct) this host's libvirt secret of every `client.*` key
/// of the keyring, so QEMU can open any `rbd` pool's images; returns the
/// users whose secret was written.
pub async fn ensure_secrets(
    hv: &Hypervisor,
    keyring: &Path,
) -> Result<Vec<String>, HypervisorError> {
    use base64::Engine;
    let text = std::fs::read_to_string(keyring)
        .map_err(|e| err(format!("--ceph-keyring {}: {e}", keyring.display())))?;
    let mut keys = Vec::new();
    for (user, key) in keyring_keys(&text) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&key)
            .map_err(|e| err(format!("--ceph-keyring: the key of client.{user}: {e}")))?;
        keys.push((user, raw));
    }
    hv.call(move |conn| {
        use crate::libvirt::Secret;
        let mut written = Vec::new();
        for (user, raw) in keys {
            let usage = yukumo_api::site::ceph_secret_usage(&user);
            let s = match Secret::lookup_by_usage(
                conn,
                crate::libvirt::sys::VIR_SECRET_USAGE_TYPE_CEPH as i32,
                &usage,
            ) {
                Ok(s) => s,
                Err(_) => Secret::define_xml(
                    conn,
                    &format!(
                        "<secret ephemeral='no' private='yes'><description>yukumo: Ceph client.{user}</description><usage type='ceph'><name>{usage}</name></usage></secret>"
                    ),
                    0,
                )?,
            };
            if s.get_value(0).ok().as_deref() != Some(raw.as_slice()) {
                s.set_value(&raw, 0)?;
                written.push(user);
            }
        }
        Ok(written)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_files_map_one_to_one() {
        let f = "6f1c7e4a-0000-4000-8000-000000000001@nightly.raw";
        assert_eq!(
            image_of(f),
            "6f1c7e4a-0000-4000-8000-000000000001+nightly.raw"
        );
        assert_eq!(file_of(&image_of(f)), f);
    }

    #[test]
    fn rbd_ls_is_read_without_snapshots() {
        let json = br#"[{"image":"a.raw","id":"1","size":67108864,"format":2},
            {"image":"a.raw","id":"1","snapshot":"yk-copy-b.raw","snapshot_id":4,"size":67108864,"format":2},
            {"image":"a+s1.raw","id":"2","size":67108864,"format":2}]"#;
        let v = parse_ls(json, "yukumo").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0, "a.raw");
        assert_eq!(v[0].1.path, "yukumo/a.raw");
        assert_eq!(v[0].1.capacity, 64 << 20);
        assert_eq!(v[1].0, "a@s1.raw");
        assert!(parse_ls(b"\n", "yukumo").unwrap().is_empty());
        assert!(parse_ls(b"{", "yukumo").is_err());
    }

    #[test]
    fn ceph_df_gives_capacity_and_free_space() {
        let json =
            br#"{"stats":{},"pools":[{"name":"other","stats":{"bytes_used":5,"max_avail":5}},
            {"name":"yukumo","id":1,"stats":{"stored":100,"bytes_used":300,"max_avail":700}}]}"#;
        assert_eq!(parse_df(json, "yukumo").unwrap(), (1000, 700));
        assert!(parse_df(json, "nope").unwrap_err().contains("nope"));
    }

    #[test]
    fn keyring_keys_are_read() {
        let text = "[client.yukumo]\n\tkey = AQC+TRFrw+SmDhAAgsfkTmyZHuaSZQw7a0by7Q==\n\tcaps mon = \"profile rbd\"\n[mon.]\n\tkey = X==\n[client.b]\nkey=Y==\n";
        assert_eq!(
            keyring_keys(text),
            vec![
                (
                    "yukumo".into(),
                    "AQC+TRFrw+SmDhAAgsfkTmyZHuaSZQw7a0by7Q==".into()
                ),
                ("b".into(), "Y==".into())
            ]
        );
    }

    #[test]
    fn the_client_configuration_names_monitors_and_keyring() {
        let c = CephPool {
            monitors: vec!["10.0.0.1:6789".into(), "10.0.0.2:6789".into()],
            pool: "p".into(),
            user: "u".into(),
        };
        let t = conf_text(&c, Path::new("/k"));
        assert!(
            t.contains("mon host = 10.0.0.1:6789,10.0.0.2:6789\n"),
            "{t}"
        );
        assert!(t.contains("keyring = /k\n"), "{t}");
    }
}
