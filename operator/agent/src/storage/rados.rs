//! One Ceph monitor command through librados, without Ceph's Python CLI.
//!
//! `ceph df` is a Python program (the `ceph` CLI and the rados bindings:
//! tens of megabytes, and an interpreter, in the image). What the agent
//! needs of it is one monitor command, `df`, whose JSON answer is the same;
//! librados (`librados.so.2`, which `rbd` needs anyway) sends it. The
//! library is opened at run time, so an agent without `rbd` pools needs no
//! Ceph library at all, and the call runs in a child process of the agent
//! (`yukumo-agent rados-mon-command CONF USER JSON`, [`child_main`]): like
//! the other Ceph tools it is killed when it takes too long, enters the
//! host's namespace by inheritance, and a client library's abort cannot
//! take the agent down.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;

/// The argument that makes `yukumo-agent` this helper instead of the agent.
pub const SUBCOMMAND: &str = "rados-mon-command";

type Rados = *mut c_void;

type CreateFn = unsafe extern "C" fn(*mut Rados, *const c_char) -> c_int;
type ReadFileFn = unsafe extern "C" fn(Rados, *const c_char) -> c_int;
type ConfSetFn = unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int;
type ConnectFn = unsafe extern "C" fn(Rados) -> c_int;
type MonCommandFn = unsafe extern "C" fn(
    Rados,
    *mut *const c_char,
    usize,
    *const c_char,
    usize,
    *mut *mut c_char,
    *mut usize,
    *mut *mut c_char,
    *mut usize,
) -> c_int;
type BufferFreeFn = unsafe extern "C" fn(*mut c_char);
type ShutdownFn = unsafe extern "C" fn(Rados);

/// The functions of librados.h the helper calls.
struct Lib {
    create: CreateFn,
    conf_read_file: ReadFileFn,
    conf_set: ConfSetFn,
    connect: ConnectFn,
    mon_command: MonCommandFn,
    buffer_free: BufferFreeFn,
    shutdown: ShutdownFn,
}

/// The library's last error, from `dlerror`.
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by libc.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

fn open() -> Result<Lib, String> {
    let name = c"librados.so.2";
    // SAFETY: a constant NUL-terminated name; the handle is never closed
    // (the helper process exits after one command).
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!(
            "librados.so.2 (Ceph's client library, package librados2) cannot be loaded: {}",
            dl_error()
        ));
    }
    macro_rules! sym {
        ($name:literal, $t:ty) => {{
            // SAFETY: a NUL-terminated symbol name of an open handle.
            let p = unsafe { libc::dlsym(h, concat!($name, "\0").as_ptr().cast()) };
            if p.is_null() {
                return Err(format!("librados.so.2 has no {}: {}", $name, dl_error()));
            }
            // SAFETY: the symbol is librados's function of this C signature
            // (librados.h), which the field's type states.
            unsafe { std::mem::transmute::<*mut c_void, $t>(p) }
        }};
    }
    Ok(Lib {
        create: sym!("rados_create", CreateFn),
        conf_read_file: sym!("rados_conf_read_file", ReadFileFn),
        conf_set: sym!("rados_conf_set", ConfSetFn),
        connect: sym!("rados_connect", ConnectFn),
        mon_command: sym!("rados_mon_command", MonCommandFn),
        buffer_free: sym!("rados_buffer_free", BufferFreeFn),
        shutdown: sym!("rados_shutdown", ShutdownFn),
    })
}

/// A librados return code as a message (they are negative errnos).
fn errno(what: &str, rc: c_int) -> String {
    format!("{what}: {}", std::io::Error::from_raw_os_error(-rc))
}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

/// Send `cmd` (a monitor command as JSON, e.g. `{"prefix":"df","format":"json"}`)
/// to the cluster of configuration file `conf` as Ceph user `user` (its id,
/// without `client.`); the command's output.
pub fn mon_command(conf: &Path, user: &str, cmd: &str) -> Result<Vec<u8>, String> {
    let lib = open()?;
    let c_user = cstring("the user", user)?;
    let c_conf = cstring("the configuration path", &conf.to_string_lossy())?;
    let c_cmd = cstring("the command", cmd)?;
    let mut r: Rados = std::ptr::null_mut();
    // SAFETY: librados's documented calling sequence: create, configure,
    // connect, command, free the buffers it allocated, shut down; every
    // pointer passed is valid for the call.
    unsafe {
        let rc = (lib.create)(&mut r, c_user.as_ptr());
        if rc < 0 {
            return Err(errno("rados_create", rc));
        }
        let result = (|| {
            let rc = (lib.conf_read_file)(r, c_conf.as_ptr());
            if rc < 0 {
                return Err(errno(&format!("reading {}", conf.display()), rc));
            }
            // Bounded: an unreachable monitor is an error after 30 s, not a
            // hang (the agent also kills this process at 120 s).
            for (k, v) in [
                (c"client_mount_timeout", c"30"),
                (c"rados_mon_op_timeout", c"30"),
            ] {
                let rc = (lib.conf_set)(r, k.as_ptr(), v.as_ptr());
                if rc < 0 {
                    return Err(errno(&format!("setting {k:?}"), rc));
                }
            }
            let rc = (lib.connect)(r);
            if rc < 0 {
                return Err(errno("connecting to the monitors", rc));
            }
            let mut cmds = [c_cmd.as_ptr()];
            let (mut out, mut out_len) = (std::ptr::null_mut(), 0usize);
            let (mut status, mut status_len) = (std::ptr::null_mut(), 0usize);
            let rc = (lib.mon_command)(
                r,
                cmds.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            );
            let text = |p: *mut c_char, n: usize| -> Vec<u8> {
                if p.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(p.cast::<u8>(), n).to_vec()
                }
            };
            let (o, s) = (text(out, out_len), text(status, status_len));
            for p in [out, status] {
                if !p.is_null() {
                    (lib.buffer_free)(p);
                }
            }
            if rc < 0 {
                let s = String::from_utf8_lossy(&s);
                let s = s.trim();
                // (the caller's message names the command)
                return Err(if s.is_empty() {
                    errno("refused", rc)
                } else {
                    format!("{}: {s}", errno("refused", rc))
                });
            }
            Ok(o)
        })();
        (lib.shutdown)(r);
        result
    }
}

/// `yukumo-agent rados-mon-command CONF USER JSON`: the command's output
/// on standard output; exit status 1 and the error on standard error.
pub fn child_main(args: &[std::ffi::OsString]) -> ! {
    use std::io::Write;
    let args: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    let code = match args[..] {
        [conf, user, cmd] => match mon_command(Path::new(conf), user, cmd) {
            Ok(out) => std::io::stdout()
                .write_all(&out)
                .and_then(|_| std::io::stdout().flush())
                .map_or(1, |_| 0),
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        _ => {
            eprintln!("usage: yukumo-agent {SUBCOMMAND} CONF USER JSON");
            2
        }
    };
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_that_cannot_be_read_is_an_error_naming_it() {
        // Where librados is installed (it is on the machines the agent is
        // built on), a missing file fails at reading it; elsewhere the
        // library's absence is named. Either way: an error, never a hang.
        let e = mon_command(Path::new("/nonexistent/yk.conf"), "u", "{}").unwrap_err();
        assert!(
            e.contains("/nonexistent/yk.conf") || e.contains("librados.so.2"),
            "{e}"
        );
    }

    #[test]
    fn nul_bytes_are_refused() {
        let e = mon_command(Path::new("/x"), "u\0v", "{}").unwrap_err();
        assert!(e.contains("NUL") || e.contains("librados.so.2"), "{e}");
    }
}
