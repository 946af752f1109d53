//! The transport of libvirt's remote protocol: length-prefixed packets on
//! the daemon's unix socket, calls matched to replies by serial, and the
//! daemon's event messages handed to one callback.
//!
//! One reader thread per connection reads every packet; callers block on
//! their own reply only. When the socket closes, every pending call fails
//! and the connection reports itself dead.
//!
//! Keepalive, as libvirt's own client does it: once the daemon is told the
//! client speaks the keepalive program ([`Rpc::start_keepalive`]), it pings
//! the client when the connection is idle (every 5 s by default) and the
//! reader answers each ping. A daemon that sends nothing at all for
//! [`DEAD_AFTER`] — hung, or its host gone — is taken for dead: the socket
//! is shut, and the calls waiting on it fail instead of blocking forever.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::Error;
use super::xdr::{Dec, Enc};

/// `REMOTE_PROGRAM` and its version.
const PROGRAM: u32 = 0x2000_8086;
const VERSION: u32 = 1;
/// Message types and statuses of the header.
const CALL: i32 = 0;
const REPLY: i32 = 1;
const MESSAGE: i32 = 2;
const OK: i32 = 0;
const ERROR: i32 = 1;
/// The length word and the six header words.
const HEADER: usize = 28;
/// libvirt's own limit is 32 MiB; anything larger is a broken stream.
const MAX_PACKET: usize = 64 << 20;
/// The keepalive program: the daemon's PING, the client's PONG.
const KEEPALIVE: u32 = 0x6b65_6570;
const PING: i32 = 1;
const PONG: i32 = 2;
/// Silence after which a daemon that pings is taken for dead: libvirt's
/// client gives up after 5 unanswered pings 5 s apart.
pub const DEAD_AFTER: Duration = Duration::from_secs(30);

/// Where a connection's event messages go: (procedure, payload).
pub type EventSink = Box<dyn Fn(i32, &[u8]) + Send>;

type Reply = Result<Vec<u8>, Error>;

struct Shared {
    pending: Mutex<HashMap<u32, mpsc::Sender<Reply>>>,
    dead: AtomicBool,
    events: Mutex<Option<EventSink>>,
    writer: Mutex<UnixStream>,
    /// When the last packet arrived.
    heard: Mutex<Instant>,
}

/// One open socket to a libvirt daemon.
pub struct Rpc {
    serial: AtomicU32,
    shared: Arc<Shared>,
}

impl Rpc {
    pub fn connect(socket: &str) -> Result<Rpc, Error> {
        let stream = UnixStream::connect(socket).map_err(|e| {
            Error::new(
                -1,
                format!("cannot connect to libvirt's socket {socket}: {e}"),
            )
        })?;
        let reader = stream
            .try_clone()
            .map_err(|e| Error::new(-1, format!("libvirt's socket {socket}: {e}")))?;
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            dead: AtomicBool::new(false),
            events: Mutex::default(),
            writer: Mutex::new(stream),
            heard: Mutex::new(Instant::now()),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("libvirt-rpc".into())
            .spawn(move || read_loop(reader, &s))
            .map_err(|e| Error::new(-1, format!("cannot start libvirt's reader thread: {e}")))?;
        Ok(Rpc {
            serial: AtomicU32::new(1),
            shared,
        })
    }

    /// Watch the daemon's keepalive pings (after it was told the client
    /// answers them): silence for `dead_after` shuts the connection.
    pub fn start_keepalive(&self, dead_after: Duration) -> Result<(), Error> {
        let shared = Arc::downgrade(&self.shared);
        std::thread::Builder::new()
            .name("libvirt-keepalive".into())
            .spawn(move || {
                loop {
                    std::thread::sleep((dead_after / 6).max(Duration::from_millis(100)));
                    let Some(s) = shared.upgrade() else { return };
                    if s.dead.load(Ordering::Acquire) {
                        return;
                    }
                    let silent = s.heard.lock().expect("heard lock").elapsed();
                    if silent > dead_after {
                        tracing::warn!(
                            silent_s = silent.as_secs(),
                            "libvirt sent nothing, not even a keepalive ping; closing the connection"
                        );
                        let _ = s
                            .writer
                            .lock()
                            .expect("writer lock")
                            .shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| Error::new(-1, format!("cannot start libvirt's keepalive thread: {e}")))
    }

    /// Whether the daemon's end is still open.
    pub fn alive(&self) -> bool {
        !self.shared.dead.load(Ordering::Acquire)
    }

    pub fn set_events(&self, sink: Option<EventSink>) {
        *self.shared.events.lock().expect("events lock") = sink;
    }

    /// Call procedure `proc_` with encoded `args`; the reply's payload.
    pub fn call(&self, proc_: i32, args: &[u8]) -> Result<Vec<u8>, Error> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.shared
            .pending
            .lock()
            .expect("pending lock")
            .insert(serial, tx);
        if !self.alive() {
            self.shared
                .pending
                .lock()
                .expect("pending lock")
                .remove(&serial);
            return Err(closed());
        }
        let mut p = Enc(Vec::with_capacity(HEADER + args.len()));
        p.u32((HEADER + args.len()) as u32)
            .u32(PROGRAM)
            .u32(VERSION)
            .i32(proc_)
            .i32(CALL)
            .u32(serial)
            .i32(OK);
        p.0.extend_from_slice(args);
        let written = self
            .shared
            .writer
            .lock()
            .expect("writer lock")
            .write_all(&p.0);
        if let Err(e) = written {
            self.shared
                .pending
                .lock()
                .expect("pending lock")
                .remove(&serial);
            return Err(Error::new(-1, format!("writing to libvirt: {e}")));
        }
        rx.recv().unwrap_or_else(|_| Err(closed()))
    }

    /// Stop reading: the reader thread sees the end and exits.
    pub fn shutdown(&self) {
        let _ = self
            .shared
            .writer
            .lock()
            .expect("writer lock")
            .shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn closed() -> Error {
    Error::new(-1, "the connection to libvirt is closed".into())
}

fn read_loop(mut sock: UnixStream, shared: &Shared) {
    let mut len = [0u8; 4];
    loop {
        if sock.read_exact(&mut len).is_err() {
            break;
        }
        let n = u32::from_be_bytes(len) as usize;
        if !(HEADER..=MAX_PACKET).contains(&n) {
            tracing::warn!(
                length = n,
                "libvirt sent a packet of impossible length; closing"
            );
            break;
        }
        let mut body = vec![0u8; n - 4];
        if sock.read_exact(&mut body).is_err() {
            break;
        }
        *shared.heard.lock().expect("heard lock") = Instant::now();
        if let Err(e) = dispatch(&body, shared) {
            tracing::warn!(error = %e, "a libvirt packet could not be read; closing");
            break;
        }
    }
    shared.dead.store(true, Ordering::Release);
    let _ = sock.shutdown(std::net::Shutdown::Both);
    // Dropping the senders fails every pending call.
    shared.pending.lock().expect("pending lock").clear();
}

fn dispatch(body: &[u8], shared: &Shared) -> Result<(), Error> {
    let mut d = Dec::new(body);
    let (prog, _vers, proc_, kind, serial, status) =
        (d.u32()?, d.u32()?, d.i32()?, d.i32()?, d.u32()?, d.i32()?);
    let payload = &body[24..];
    if prog == KEEPALIVE {
        if proc_ == PING && kind == MESSAGE {
            let mut p = Enc::default();
            p.u32(HEADER as u32)
                .u32(KEEPALIVE)
                .u32(VERSION)
                .i32(PONG)
                .i32(MESSAGE)
                .u32(0)
                .i32(OK);
            shared
                .writer
                .lock()
                .expect("writer lock")
                .write_all(&p.0)
                .map_err(|e| Error::new(-1, format!("answering libvirt's keepalive: {e}")))?;
        }
        return Ok(());
    }
    if prog != PROGRAM {
        return Ok(());
    }
    match kind {
        REPLY => {
            let reply = match status {
                OK => Ok(payload.to_vec()),
                ERROR => Err(remote_error(payload)?),
                _ => Err(Error::protocol("a reply of unknown status")),
            };
            if let Some(tx) = shared.pending.lock().expect("pending lock").remove(&serial) {
                let _ = tx.send(reply);
            }
        }
        MESSAGE if status == OK => {
            if let Some(sink) = shared.events.lock().expect("events lock").as_ref() {
                sink(proc_, payload);
            }
        }
        _ => {}
    }
    Ok(())
}

/// `remote_error`: the code, the domain and the message are what callers
/// see; the rest is read past.
fn remote_error(payload: &[u8]) -> Result<Error, Error> {
    let mut d = Dec::new(payload);
    let code = d.i32()?;
    let _domain = d.i32()?;
    let message = d.opt_string()?;
    Ok(Error::new(
        code,
        message.unwrap_or_else(|| format!("libvirt error {code}")),
    ))
}
