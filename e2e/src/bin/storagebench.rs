//! yukumo-storagebench: the storage part of `make bench` (run by
//! `e2e/bench.sh` in the environment it starts).
//!
//! For each pool type (`dir`: pool `default`, `iscsi`: pool `san`, both of
//! host-1 in `examples/local-site.yaml`; `rbd`: pool `ceph`, the
//! environment's single-node Ceph; network guests run wherever they are
//! placed, reaching the target or Ceph over the underlay): a Volume is created
//! (`create_ms`: apply → `Ready`), hot-plugged into a running tiny guest
//! (`attach_ms`: the cluster's spec names it → the guest sees the disk), and
//! `blkbench` (e2e/lib/blkbench.c: O_DIRECT, one request at a time, writes
//! end with fdatasync) runs sequential 1 MiB and random 4 KiB reads and
//! writes on it inside the guest; the baseline is the same program on the
//! host on a raw file of the same size in the same pool folder (`rbd`:
//! `rbd bench` with one I/O thread on an image of the same size in the same
//! Ceph pool, librbd from the host). Prints
//! the figures and writes `target/bench/storage.json` (`--out`): one row
//! per pool and operation with `pool`, `op`, `guest_mbps`, `raw_mbps`,
//! `ratio`, `attach_ms`, `create_ms`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use yukumo_e2e::{Env, condition, guest_sh, tiny_image};

const NS: &str = "storagebench";

fn poll<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<(T, Duration)> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(v) = f() {
            return Ok((v, start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn cluster(volumes: &str) -> String {
    let (path, sum) = tiny_image();
    format!(
        "apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: bench, namespace: {NS}}}
spec:
  networkGroup: net
  frontend:
    size: {{cpu: 1, memory: 192Mi}}
    image: {{url: 'file://{path}', checksum: '{sum}'}}
    volumes: [{volumes}]
"
    )
}

/// Parse blkbench's "MBPS x IOPS y BYTES z" (the shell's prompts around it).
fn mbps(out: &str) -> Result<f64> {
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "MBPS")
        .with_context(|| format!("no MBPS in {out:?}"))?;
    Ok(words.get(i + 1).context("MBPS value")?.parse()?)
}

struct Op {
    name: &'static str,
    mode: &'static str,
    block: u64,
    /// MiB moved (the span is the whole volume).
    total_mib: u64,
}

fn main() -> Result<()> {
    let mut out = PathBuf::from("target/bench/storage.json");
    let mut size_mib: u64 = 128;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().context(format!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = PathBuf::from(val()?),
            "--size-mib" => size_mib = val()?.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    let env = Env::get();
    let ops = [
        Op {
            name: "seq_write_1m",
            mode: "seqwrite",
            block: 1 << 20,
            total_mib: size_mib,
        },
        Op {
            name: "seq_read_1m",
            mode: "seqread",
            block: 1 << 20,
            total_mib: size_mib,
        },
        Op {
            name: "rand_write_4k",
            mode: "randwrite",
            block: 4096,
            total_mib: (size_mib / 8).max(2),
        },
        Op {
            name: "rand_read_4k",
            mode: "randread",
            block: 4096,
            total_mib: (size_mib / 8).max(2),
        },
    ];
    env.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {NS}}}
spec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan}}, homeSite: local}}
"
    ));
    let mut rows = Vec::new();
    for (pool, type_) in [("default", "dir"), ("san", "iscsi"), ("ceph", "rbd")] {
        let result = run(&env, size_mib, &ops, pool, type_);
        let _ = env.kubectl(&[
            "-n",
            NS,
            "delete",
            "vc",
            "bench",
            "--wait=true",
            "--timeout=120s",
        ]);
        let _ = env.kubectl(&[
            "-n",
            NS,
            "delete",
            "volume",
            "bench",
            "--wait=true",
            "--timeout=120s",
        ]);
        let mut r = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = env.kubectl(&["delete", "namespace", NS, "--wait=false"]);
                return Err(e);
            }
        };
        println!("storage ({size_mib} MiB volume, pool type {type_}):");
        println!(
            "{:<14} {:>12} {:>12} {:>7}",
            "op", "guest MB/s", "raw MB/s", "ratio"
        );
        for r in &r {
            println!(
                "{:<14} {:>12.1} {:>12.1} {:>7.2}",
                r["op"].as_str().unwrap_or(""),
                r["guest_mbps"].as_f64().unwrap_or(0.0),
                r["raw_mbps"].as_f64().unwrap_or(0.0),
                r["ratio"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(r) = r.first() {
            println!(
                "create_ms {} (apply → Ready), attach_ms {} (spec → the guest sees the disk)",
                r["create_ms"], r["attach_ms"]
            );
        }
        rows.append(&mut r);
    }
    let _ = env.kubectl(&["delete", "namespace", NS, "--wait=false"]);
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&json!({
            "size_mib": size_mib,
            "note": "guest: blkbench in a TCG tiny guest on the Volume (dir: a qcow2 file, QEMU's default cache; iscsi: the pool host's tgtd through QEMU's libiscsi over the underlay; rbd: a single-node Ceph (1 bluestore OSD on a file) through QEMU's librbd over the underlay); raw: the same program on the pool's host on a raw file in the same pool folder (rbd: rbd bench, librbd, 1 I/O thread, on an image of the same size in the same Ceph pool); O_DIRECT, queue depth 1",
            "rows": rows,
        }))?,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}

fn run(env: &Env, size_mib: u64, ops: &[Op], pool: &str, type_: &str) -> Result<Vec<Value>> {
    // create_ms: apply → Ready (the agent of the pool's host made the file).
    let t = Instant::now();
    env.apply(&format!(
        "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {{name: bench, namespace: {NS}}}\nspec: {{size: {size_mib}Mi, pool: {pool}}}\n"
    ));
    let (vol, _) = poll(Duration::from_secs(120), "volume Ready", || {
        // Absent for a moment after the previous pool's volume went.
        let o = env.kubectl(&["-n", NS, "get", "volume", "bench", "-o", "json"]);
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        let fresh = v["metadata"]["deletionTimestamp"].is_null() && v["spec"]["pool"] == pool;
        (fresh && matches!(condition(&v, "Ready"), Some((s, _, _)) if s == "True")).then_some(v)
    })?;
    let create_ms = t.elapsed().as_millis() as u64;
    let path = vol["status"]["backing"]["path"]
        .as_str()
        .context("backing path")?
        .to_string();
    // A running guest with the volume (so placed on the pool's host; boot
    // time is not what is measured)...
    env.apply(&cluster("{name: bench}"));
    let (uid, _) = poll(Duration::from_secs(300), "frontend running", || {
        let vc = env.get_json(&["-n", NS, "get", "vc", "bench"]);
        (vc["status"]["ready"] == "1/1").then_some(())?;
        let vn = env.get_json(&["-n", NS, "get", "vn", "bench-frontend"]);
        vn["metadata"]["uid"].as_str().map(str::to_string)
    })?;
    let socket = PathBuf::from(format!("/run/yukumo/{uid}.sock"));
    let has_disk = |want: bool| {
        guest_sh(&socket, "test -b /dev/vdc", Duration::from_secs(5))
            .ok()
            .filter(|(_, c)| (*c == 0) == want)
    };
    poll(
        Duration::from_secs(120),
        "guest shell with /dev/vdc",
        || has_disk(true),
    )?;
    // ...then unplugged, and attach_ms: the cluster names it again → the
    // running guest sees the disk (hot-plug).
    env.apply(&cluster(""));
    poll(Duration::from_secs(120), "guest without /dev/vdc", || {
        has_disk(false)
    })?;
    poll(Duration::from_secs(60), "volume released", || {
        let v = env.get_json(&["-n", NS, "get", "volume", "bench"]);
        v["status"]["attachedTo"].is_null().then_some(())
    })?;
    let t = Instant::now();
    env.apply(&cluster("{name: bench}"));
    poll(Duration::from_secs(120), "guest sees /dev/vdc", || {
        has_disk(true)
    })?;
    let attach_ms = t.elapsed().as_millis() as u64;
    // The baseline's file: raw, same size, same folder (file system); for
    // rbd an image of the same size in the same Ceph pool.
    let raw = Path::new(&path).with_file_name("storagebench-raw.img");
    let blkbench = compile_blkbench(env)?;
    if type_ == "rbd" {
        rbd_admin(env, &["rm", "--no-progress", RBD_RAW]).ok();
        rbd_admin(env, &["create", "--size", &format!("{size_mib}M"), RBD_RAW])?;
    } else {
        std::fs::File::create(&raw)?.set_len(size_mib << 20)?;
    }
    let mut rows = Vec::new();
    for op in ops {
        let args = format!("{} {size_mib} {} {}", op.mode, op.block, op.total_mib);
        let (g, code) = guest_sh(
            &socket,
            &format!("blkbench /dev/vdc {args}"),
            Duration::from_secs(600),
        )?;
        if code != 0 {
            bail!("guest blkbench {args}: {g}");
        }
        let guest = mbps(&g)?;
        let rawv = if type_ == "rbd" {
            rbd_bench(env, op)?
        } else {
            let o = std::process::Command::new(&blkbench)
                .arg(&raw)
                .args(args.split_whitespace())
                .output()?;
            if !o.status.success() {
                bail!(
                    "host blkbench {args}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            mbps(&String::from_utf8_lossy(&o.stdout))?
        };
        rows.push(json!({
            "pool": type_,
            "op": op.name,
            "block_bytes": op.block,
            "guest_mbps": guest,
            "raw_mbps": rawv,
            "ratio": guest / rawv,
            "attach_ms": attach_ms,
            "create_ms": create_ms,
        }));
    }
    let _ = std::fs::remove_file(&raw);
    if type_ == "rbd" {
        rbd_admin(env, &["rm", "--no-progress", RBD_RAW])?;
    }
    Ok(rows)
}

/// The rbd baseline's image.
const RBD_RAW: &str = "yukumo/storagebench-raw";

/// `rbd` as the environment's Ceph admin, in Ceph's namespace.
fn rbd_admin(env: &Env, args: &[&str]) -> Result<String> {
    let ns = std::fs::read_to_string(env.dir.join("ceph/netns"))
        .context("the environment runs no Ceph")?;
    let o = std::process::Command::new("timeout")
        .args(["600", "ip", "netns", "exec", ns.trim(), "rbd", "-c"])
        .arg(env.dir.join("ceph/ceph.conf"))
        .args(args)
        .output()?;
    if !o.status.success() {
        bail!(
            "rbd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// MB/s of `op` by `rbd bench` (librbd, one I/O thread: queue depth 1
/// like blkbench) on the baseline image: its `ops/sec` times the block.
fn rbd_bench(env: &Env, op: &Op) -> Result<f64> {
    let (io_type, pattern) = match op.mode {
        "seqwrite" => ("write", "seq"),
        "seqread" => ("read", "seq"),
        "randwrite" => ("write", "rand"),
        _ => ("read", "rand"),
    };
    let out = rbd_admin(
        env,
        &[
            "bench",
            "--io-type",
            io_type,
            "--io-pattern",
            pattern,
            "--io-size",
            &op.block.to_string(),
            "--io-total",
            &format!("{}M", op.total_mib),
            "--io-threads",
            "1",
            RBD_RAW,
        ],
    )?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words
        .iter()
        .rposition(|w| *w == "ops/sec:")
        .with_context(|| format!("no ops/sec in {out:?}"))?;
    let ops: f64 = words.get(i + 1).context("ops/sec value")?.parse()?;
    Ok(ops * op.block as f64 / 1e6)
}

/// The host's blkbench, built from the same source as the guest's.
fn compile_blkbench(env: &Env) -> Result<PathBuf> {
    let out = env.dir.join("blkbench");
    let st = std::process::Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(env.root.join("e2e/lib/blkbench.c"))
        .status()?;
    if !st.success() {
        bail!("gcc blkbench failed");
    }
    Ok(out)
}
