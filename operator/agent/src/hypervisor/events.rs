//! libvirt domain lifecycle events: the process-wide event loop and the
//! per-connection callback.
//!
//! libvirt delivers events only through an event loop implementation that is
//! registered before any connection is opened and run by some thread; the
//! default one (`virEventRegisterDefaultImpl` / `virEventRunDefaultImpl`) is
//! wrapped safely by the virt crate. The domain event callback is not (virt
//! 0.4.3 has no `domain_event_register_any`), so its registration is raw FFI
//! — the agent's only unsafe code, all of it in this module.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::sys;

/// What the libvirt connection reports to its subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HvEvent {
    /// A lifecycle event of the domain with this UUID.
    Lifecycle {
        uuid: String,
        event: Lifecycle,
        detail: i32,
    },
    /// The connection was re-opened (and the callback registered again):
    /// events of the gap are lost, so the subscriber should resync.
    Reconnected,
}

/// `virDomainEventType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lifecycle {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
    Shutdown,
    PmSuspended,
    Crashed,
    Other,
}

impl Lifecycle {
    fn from_raw(event: c_int) -> Self {
        match u32::try_from(event).unwrap_or(u32::MAX) {
            sys::VIR_DOMAIN_EVENT_DEFINED => Lifecycle::Defined,
            sys::VIR_DOMAIN_EVENT_UNDEFINED => Lifecycle::Undefined,
            sys::VIR_DOMAIN_EVENT_STARTED => Lifecycle::Started,
            sys::VIR_DOMAIN_EVENT_SUSPENDED => Lifecycle::Suspended,
            sys::VIR_DOMAIN_EVENT_RESUMED => Lifecycle::Resumed,
            sys::VIR_DOMAIN_EVENT_STOPPED => Lifecycle::Stopped,
            sys::VIR_DOMAIN_EVENT_SHUTDOWN => Lifecycle::Shutdown,
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED => Lifecycle::PmSuspended,
            sys::VIR_DOMAIN_EVENT_CRASHED => Lifecycle::Crashed,
            _ => Lifecycle::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Defined => "defined",
            Lifecycle::Undefined => "undefined",
            Lifecycle::Started => "started",
            Lifecycle::Suspended => "suspended",
            Lifecycle::Resumed => "resumed",
            Lifecycle::Stopped => "stopped",
            Lifecycle::Shutdown => "shutdown",
            Lifecycle::PmSuspended => "pmsuspended",
            Lifecycle::Crashed => "crashed",
            Lifecycle::Other => "other",
        }
    }
}

/// Register libvirt's default event loop (once per process) and start the
/// thread that runs it. Must run before the first connection is opened;
/// returns whether events can be delivered.
pub fn ensure_event_loop() -> bool {
    static LOOP: OnceLock<bool> = OnceLock::new();
    *LOOP.get_or_init(|| {
        // The agent reports libvirt's errors itself; libvirt's default
        // handler would also print each one (a reconnect loop included).
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e, "cannot register libvirt's event loop; no domain events");
            return false;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start libvirt's event thread; no domain events");
            return false;
        }
        true
    })
}

/// What the callback owns: a boxed sink, handed to libvirt as `opaque` and
/// freed by libvirt through [`free_sink`] when the callback is deregistered.
struct Sink {
    tx: UnboundedSender<HvEvent>,
}

/// A lifecycle callback registered on one connection.
#[derive(Debug)]
pub struct Registration {
    id: c_int,
}

/// Register a lifecycle callback for every domain of `conn`, sending each
/// event to `tx`. The connection must stay open until [`Registration::deregister`].
pub fn register_lifecycle(
    conn: &Connect,
    tx: UnboundedSender<HvEvent>,
) -> Result<Registration, virt::error::Error> {
    let cb: unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int = lifecycle_callback;
    // SAFETY: libvirt calls a callback registered for
    // VIR_DOMAIN_EVENT_ID_LIFECYCLE with the signature of
    // virConnectDomainEventCallback (the C API's VIR_DOMAIN_EVENT_CALLBACK
    // cast does exactly this); both are `extern "C"` function pointers of
    // the same size, and only the declared type changes.
    let generic = unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virDomainPtr,
                c_int,
                c_int,
                *mut c_void,
            ) -> c_int,
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(cb)
    };
    let opaque = Box::into_raw(Box::new(Sink { tx })).cast::<c_void>();
    // SAFETY: `conn.as_ptr()` is a live connection (borrowed for the call); a
    // null domain means "all domains"; `opaque` is a valid, uniquely owned
    // `Sink` that libvirt hands back to the callback and, once deregistered,
    // to `free_sink` exactly once.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            Some(generic),
            opaque,
            Some(free_sink),
        )
    };
    if id < 0 {
        let err = virt::error::Error::last_error();
        // SAFETY: on failure libvirt keeps no reference to `opaque` and never
        // calls `free_sink`, so ownership is still ours.
        drop(unsafe { Box::from_raw(opaque.cast::<Sink>()) });
        return Err(err);
    }
    Ok(Registration { id })
}

impl Registration {
    /// Deregister from `conn` (the connection it was registered on); libvirt
    /// frees the sink. Needed before closing: a callback holds a reference
    /// to its connection.
    pub fn deregister(self, conn: &Connect) {
        // SAFETY: `conn` is the live connection the callback was registered
        // on and `self.id` its id, used once (deregister consumes `self`).
        let ret = unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), self.id) };
        if ret < 0 {
            tracing::debug!(error = %virt::error::Error::last_error(), "deregistering the domain event callback");
        }
    }
}

/// Called by libvirt's event loop thread for each lifecycle event.
unsafe extern "C" fn lifecycle_callback(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the `Sink` given at registration; libvirt frees it
    // (free_sink) only after the last callback invocation has returned, and
    // the callback only reads it (`UnboundedSender::send` takes `&self`).
    let sink = unsafe { &*opaque.cast::<Sink>() };
    let mut buf: [c_char; sys::VIR_UUID_STRING_BUFLEN as usize] =
        [0; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: `dom` is valid for the duration of the callback, and `buf` has
    // the VIR_UUID_STRING_BUFLEN bytes the call writes (NUL-terminated).
    if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } < 0 {
        return 0;
    }
    // SAFETY: libvirt wrote a NUL-terminated string into `buf`.
    let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let _ = sink.tx.send(HvEvent::Lifecycle {
        uuid,
        event: Lifecycle::from_raw(event),
        detail,
    });
    0
}

/// libvirt's free callback for the registration's `opaque`.
unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` came from `Box::into_raw` in `register_lifecycle`
        // and libvirt calls this once, after the callback's last use.
        drop(unsafe { Box::from_raw(opaque.cast::<Sink>()) });
    }
}
