//! A private libvirt daemon for tests: libvirtd in session mode as user
//! `nobody`, with its home, runtime and config folders in a temporary
//! folder, so it touches nothing of the machine's and needs no namespace.
//! Its drivers include libvirt's test driver (`test:///default`, in memory).
//! It exits by itself 30 s after its last client left, and pings idle
//! clients every second (so every test also proves the client answers).

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Daemon {
    pub socket: String,
    dir: std::path::PathBuf,
    /// Kept, not waited for: the daemon outlives the tests that use it and
    /// exits on its own (`--timeout`).
    pub process: std::process::Child,
}

/// The test process's daemon, started on first use.
pub fn daemon() -> &'static Daemon {
    static D: OnceLock<Daemon> = OnceLock::new();
    D.get_or_init(|| spawn("shared", true))
}

/// `test:///default` of the test daemon.
pub fn default_uri() -> String {
    format!("test+unix:///default?socket={}", daemon().socket)
}

impl Daemon {
    /// Stop a daemon of the caller's own and remove its folder.
    pub fn stop(mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const PREFIX: &str = "yk-libvirtd-test-";

/// Remove the folders of earlier test processes that are gone (a shared
/// daemon outlives its tests; its folder is swept by the next run).
fn sweep() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A daemon of the caller's own (`name` tells its folder apart); the
/// caller stops it ([`Daemon::stop`]).
pub fn start(name: &str) -> Daemon {
    spawn(name, false)
}

/// With `remove_on_exit`, a shell as `nobody` runs the daemon and removes
/// its folder once it exits (the shared daemon outlives the test process).
fn spawn(name: &str, remove_on_exit: bool) -> Daemon {
    sweep();
    let dir = std::env::temp_dir().join(format!("{PREFIX}{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["home", "run", "config/libvirt", "cache"] {
        std::fs::create_dir_all(dir.join(d)).expect("test daemon folder");
    }
    std::fs::write(
        dir.join("config/libvirt/libvirtd.conf"),
        "keepalive_interval = 1\nkeepalive_count = 5\n",
    )
    .expect("libvirtd.conf");
    let status = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(&dir)
        .status()
        .expect("chown");
    assert!(status.success(), "chown of {}", dir.display());
    let socket = dir.join("run/libvirt/libvirt-sock");
    let log = std::fs::File::create(dir.join("libvirtd.log")).expect("log file");
    let process = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "-i",
        ])
        .arg(format!("HOME={}", dir.join("home").display()))
        .arg(format!("XDG_RUNTIME_DIR={}", dir.join("run").display()))
        .arg(format!("XDG_CONFIG_HOME={}", dir.join("config").display()))
        .arg(format!("XDG_CACHE_HOME={}", dir.join("cache").display()))
        .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
        .args(if remove_on_exit {
            vec!["sh", "-c", "libvirtd --timeout 30; rm -rf -- \"$0\""]
        } else {
            vec!["libvirtd", "--timeout", "30"]
        })
        .args(remove_on_exit.then_some(&dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("libvirtd (package libvirt-daemon) and setpriv must be installed");
    let until = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < until,
            "the test libvirtd did not open {} (log: {})",
            socket.display(),
            dir.join("libvirtd.log").display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon {
        socket: socket.to_string_lossy().into_owned(),
        process,
        dir,
    }
}
