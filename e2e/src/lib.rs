//! Helpers for yukumo's end-to-end tests.
//!
//! The tests run against an environment started by `e2e/run.sh` (real etcd,
//! kube-apiserver, kube-controller-manager, libvirtd per simulated host, the
//! yukumo controller and agents as processes). `YUKUMO_ENV_DIR` points at it.
//! Every wait is bounded and says what it waited for when it gives up.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod net;
pub mod vm;

/// The tiny guest image built by e2e/run.sh: (path, checksum).
pub fn tiny_image() -> (String, String) {
    let tiny = std::env::var("YUKUMO_TINY_IMAGE").expect("YUKUMO_TINY_IMAGE (set by e2e/run.sh)");
    let (path, checksum) = tiny.trim().split_once(' ').expect("<path> <checksum>");
    (path.to_string(), checksum.to_string())
}

/// The environment under test.
pub struct Env {
    pub dir: PathBuf,
    pub root: PathBuf,
}

impl Env {
    /// The environment named by `YUKUMO_ENV_DIR`; panics with instructions when unset.
    pub fn get() -> Env {
        let dir = std::env::var("YUKUMO_ENV_DIR")
            .expect("YUKUMO_ENV_DIR is not set: run the e2e tests with e2e/run.sh (or `make e2e`)");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        Env {
            dir: PathBuf::from(dir),
            root,
        }
    }

    /// The simulated hosts (with libvirtd and networking), sorted:
    /// `host-1`, `host-2`, ... (test-driver agents are not among them).
    pub fn hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("hosts"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("netns").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Run kubectl as the cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// Run kubectl and return stdout, failing with stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl(args);
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// kubectl with stdin.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().expect("kubectl output")
    }

    /// `kubectl apply -f -` of `text`; panics with kubectl's error on failure.
    pub fn apply(&self, text: &str) {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], text);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `kubectl yukumo` as kubectl finds it (a `kubectl-yukumo` on the
    /// PATH), with the environment's kubeconfig.
    pub fn plugin(&self, args: &[&str]) -> Output {
        self.plugin_command(&self.kubeconfig(), args)
            .output()
            .expect("run kubectl yukumo")
    }

    /// `kubectl yukumo -n NS ARGS…` as the admin, which must succeed; its
    /// output, trimmed.
    pub fn plugin_ok(&self, ns: &str, args: &[&str]) -> String {
        let mut a = vec!["-n", ns];
        a.extend_from_slice(args);
        let out = self.plugin(&a);
        assert!(
            out.status.success(),
            "kubectl yukumo {a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A kubeconfig for ServiceAccount `sa` of `ns`, bound to `role` there,
    /// with a fresh token (`e2e/env.sh user`, as the README shows).
    pub fn token_kubeconfig(&self, ns: &str, sa: &str, role: &str) -> PathBuf {
        PathBuf::from(self.env_sh_stdout(&["user", ns, sa, role]))
    }

    /// `kubectl yukumo` with another kubeconfig (another user).
    pub fn plugin_command(&self, kubeconfig: &Path, args: &[&str]) -> Command {
        let bin = self.root.join("target/release");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new("kubectl");
        c.arg("yukumo")
            .args(args)
            .env("PATH", path)
            .env("KUBECONFIG", kubeconfig);
        c
    }

    /// A libvirt test-driver instance of its own for an agent without
    /// guests (`e2e/env.sh test-libvirt-uri`): its `--libvirt-uri`.
    pub fn test_libvirt_uri(&self, host: &str) -> String {
        self.env_sh_stdout(&["test-libvirt-uri", host])
    }

    /// `e2e/env.sh ARGS…` against this environment, which must succeed;
    /// its output, trimmed.
    fn env_sh_stdout(&self, args: &[&str]) -> String {
        let out = Command::new(self.root.join("e2e/env.sh"))
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .expect("run e2e/env.sh");
        assert!(
            out.status.success(),
            "e2e/env.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Run `e2e/env.sh` with a subcommand against this environment.
    pub fn env_sh(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(self.root.join("e2e/env.sh"))
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .context("run e2e/env.sh")?;
        if !out.status.success() {
            bail!(
                "env.sh {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// PID of a process the environment started.
    pub fn pid(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("pids").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The metrics port of a component (`controller-1`, `agent-host-1`).
    pub fn metrics_port(&self, name: &str) -> Option<u16> {
        std::fs::read_to_string(self.dir.join("ports").join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// GET http://127.0.0.1:port/path, returning (status, body).
    pub fn http_get(&self, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        let out = Command::new("curl")
            .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse().unwrap_or(0), body.to_string()))
    }

    /// A JSONPath field of an object (empty when absent).
    pub fn jsonpath(&self, resource: &[&str], path: &str) -> String {
        let mut args: Vec<&str> = vec!["get"];
        args.extend_from_slice(resource);
        let jp = format!("jsonpath={path}");
        args.extend_from_slice(&["-o", &jp]);
        let out = self.kubectl(&args);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Env {
    /// `kubectl get … -o json`, parsed; panics with kubectl's error.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&a).expect("kubectl get")).expect("json")
    }

    /// `virsh ARGS` against a host's libvirtd; its standard output.
    pub fn virsh(&self, host: &str, args: &[&str]) -> String {
        let sock = self.dir.join(format!("hosts/{host}/run/libvirt-sock"));
        let out = std::process::Command::new("virsh")
            .arg("-c")
            .arg(format!("qemu:///system?socket={}", sock.display()))
            .args(args)
            .output()
            .expect("virsh");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Set the `local` Site's host grace period.
    pub fn set_site_grace(&self, seconds: u64) {
        let patch = format!("{{\"spec\":{{\"hostGraceSeconds\":{seconds}}}}}");
        self.kubectl_ok(&["patch", "site", "local", "--type", "merge", "-p", &patch])
            .expect("patch site");
    }
}

/// (status, reason, message) of a condition in an object's status.
pub fn condition(obj: &serde_json::Value, type_: &str) -> Option<(String, String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
}

/// Poll `f` every 250 ms until it returns `Some`, or fail after `timeout`
/// with `what` and the last observation.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, String>,
) -> anyhow::Result<(T, Duration)> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        match f() {
            Ok(v) => return Ok((v, start.elapsed())),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
}

/// Send a signal to a process by PID (only PIDs the environment recorded).
pub fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Whether a process is alive.
pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
}

/// The `# expect:` lines at the top of a test manifest.
pub fn expectations(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|s| s.trim().to_string())
        .collect()
}

/// Base64 (standard alphabet, padded): how a command travels to a guest.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Run a shell command inside a tiny guest (or a VM host) through its second
/// serial port (a unix socket on the host): returns the output and the exit
/// status. One command at a time per guest.
///
/// The command travels as one line `<marker> <base64 of the command>`; the
/// guest's loop on ttyS1 decodes it, runs it with `sh -c` (stdin from
/// /dev/null) and answers `__<marker>__<status>`. Bytes sent before the
/// guest opened its port are lost (the UART's FIFO is cleared on open): such
/// a line only fails on its own, it never leaves a half-read quote or
/// here-document in a shell that swallows every later command.
pub fn guest_sh(socket: &Path, cmd: &str, timeout: Duration) -> anyhow::Result<(String, i32)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let marker = format!(
        "END{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    s.write_all(format!("{marker} {}\n", base64(cmd.as_bytes())).as_bytes())?;
    let pat = format!("__{marker}__");
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while start.elapsed() < timeout {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.into()),
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(i) = text.find(&pat) {
            let rest = &text[i + pat.len()..];
            if let Some(nl) = rest.find('\n') {
                let code = rest[..nl].trim().parse().unwrap_or(-1);
                return Ok((text[..i].to_string(), code));
            }
        }
    }
    bail!("guest command timed out after {timeout:?}: {cmd}")
}
