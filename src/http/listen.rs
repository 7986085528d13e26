//! The HTTP listener: accepts client connections under the connection caps and serves each
//! with hyper, under timeouts, until shutdown.
//!
//! - **Caps**: at most `maxConnections` open connections in all and `maxConnectionsPerAddress`
//!   per client address (IPv6: per /64, since one host holds a whole /64). A connection over a
//!   cap is answered with a canned 503 if the socket takes it at once, and closed; refusals are
//!   logged at most once per 10 s, with a count.
//! - **Header and keep-alive timeout** (`headerTimeout`): hyper's `header_read_timeout`, which
//!   runs from the moment a connection waits for a request head (at accept, and again after each
//!   answer) until the head is complete. So one timer closes slow-header (slowloris) and idle
//!   keep-alive connections alike, and never touches a request being answered: a long SSE
//!   answer or a tool call that takes minutes is not waiting for a head.
//! - **Body timeout** (`bodyTimeout`): a request body must arrive in full within this long of
//!   its head; the request is answered 408 and the connection closed.
//! - **Descriptors**: [`raise_nofile`] lifts mcpbox's own soft `RLIMIT_NOFILE` to the hard
//!   limit at start, and [`plan_descriptors`] shares it out: a reserve for mcpbox's own files
//!   and the sandboxes' pipes, the egress proxies' budget (two descriptors per proxied
//!   connection, all sandboxes together), and the global connection cap from what is left.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Every;

/// Descriptors kept out of the connection cap: mcpbox's own files, the runtime, listeners.
const FD_RESERVE_BASE: u64 = 128;
/// Descriptors kept per session sandbox (its stdin/stdout/stderr pipes, a pidfd, a proxy socket).
const FD_RESERVE_PER_SANDBOX: u64 = 8;
/// The default cap never goes above this, however high the descriptor limit: every idle
/// connection costs memory (a task and hyper's buffers, about 10-20 KiB).
const MAX_DEFAULT_CONNECTIONS: u64 = 16384;
/// Neither the connection cap nor the egress budget goes below this (the egress budget not
/// below what the sandboxes could ask for either), even where the limit leaves no room: then
/// [`Descriptors::fits`] is false and mcpbox warns.
const MIN_SHARE: u64 = 16;
/// hyper's buffer limit per connection, for reading and for writing: a response whose client
/// does not read it waits in hyper's write queue up to about this much (hyper's default, ~400
/// KiB, on every connection was more than mcpbox keeps per session), and a request head over
/// about this much (always over twice this) is refused with 431. Responses larger than this
/// are written as their body is read out (a JSON answer from its session's outbox, 16 KiB at a
/// time).
const CONN_BUF_BYTES: usize = 64 << 10;
/// Answer to a connection over a cap (written only if the socket takes it without waiting).
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n\
    Content-Type: text/plain\r\nContent-Length: 21\r\n\r\ntoo many connections\n";

/// The edge settings the listener applies.
#[derive(Debug, Clone)]
pub struct Settings {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub max_per_address: usize,
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Returns (soft before, soft now).
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok((soft, hard))
}

/// The hard `RLIMIT_NOFILE`: what [`raise_nofile`] raises the soft limit to.
pub fn nofile_hard() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(_, h)| h).unwrap_or(1024)
}

/// How mcpbox's descriptor limit is shared out ([`plan_descriptors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// The descriptor limit planned for.
    pub limit: u64,
    /// Kept for mcpbox's own files and the sandboxes' pipes: 128 + 8 per sandbox of `maxSandboxes`.
    pub reserve: u64,
    /// Open client connections in all (`maxConnections`), one descriptor each.
    pub connections: usize,
    /// Egress proxy connections of all sandboxes together, [`crate::netproxy::FDS_PER_CONNECTION`]
    /// descriptors each.
    pub egress: usize,
}

impl Descriptors {
    /// Descriptors the reserve, the connections and the egress budget need when all are full.
    pub fn needed(&self) -> u64 {
        self.reserve + self.connections as u64 + self.egress as u64 * crate::netproxy::FDS_PER_CONNECTION
    }

    /// Whether all of it fits under the limit at once.
    pub fn fits(&self) -> bool {
        self.needed() <= self.limit
    }
}

/// Shares a descriptor limit of `nofile` out: first the reserve for mcpbox and `max_sandboxes`
/// sandboxes; then the egress proxies, whose budget is what `max_sandboxes` sandboxes of
/// `egress_per_sandbox` connections could hold, but at most half of what the reserve left (with
/// `max_connections` set: at most what that leaves); the connection cap, unless set, gets the
/// rest, at most 16384. Neither share goes below 16; where the limit is too small for that,
/// [`Descriptors::fits`] says so.
pub fn plan_descriptors(
    nofile: u64,
    max_sandboxes: usize,
    egress_per_sandbox: usize,
    max_connections: Option<usize>,
) -> Descriptors {
    let fds = crate::netproxy::FDS_PER_CONNECTION;
    let reserve = FD_RESERVE_BASE.saturating_add(FD_RESERVE_PER_SANDBOX.saturating_mul(max_sandboxes as u64));
    let left = nofile.saturating_sub(reserve);
    let wanted = (max_sandboxes as u64).saturating_mul(egress_per_sandbox as u64);
    let egress_room = match max_connections {
        Some(n) => left.saturating_sub(n as u64) / fds,
        None => left / 2 / fds,
    };
    let egress = wanted.min(egress_room).max(wanted.min(MIN_SHARE));
    let connections = match max_connections {
        Some(n) => n,
        None => left.saturating_sub(egress * fds).clamp(MIN_SHARE, MAX_DEFAULT_CONNECTIONS) as usize,
    };
    Descriptors { limit: nofile, reserve, connections, egress: egress as usize }
}

/// What the per-address cap counts by: IPv4 addresses as they are (an IPv4-mapped IPv6 peer
/// is its IPv4 address), IPv6 by /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Total,
    PerAddress,
}

/// Open connections, in all and per address.
struct Caps {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; counted until dropped.
struct Admitted {
    caps: Arc<Caps>,
    key: IpAddr,
}

impl Caps {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let key = address_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.max_total {
            return Err(Refused::Total);
        }
        let n = open.1.entry(key).or_insert(0);
        if *n >= self.max_per_address {
            return Err(Refused::PerAddress);
        }
        *n += 1;
        open.0 += 1;
        Ok(Admitted { caps: self.clone(), key })
    }

    fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.caps.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.key);
            }
        }
    }
}

/// Accept and serve connections until `stop` fires; then ask every open connection to finish
/// (graceful shutdown: the answer in progress completes, keep-alive ends) and return. The
/// connection tasks are in `conns`, to be awaited by the caller as long as it likes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: Settings,
    stop: CancellationToken,
    conns: TaskTracker,
) {
    let caps = Arc::new(Caps {
        max_total: settings.max_connections,
        max_per_address: settings.max_per_address,
        open: Mutex::new((0, HashMap::new())),
    });
    let refused_total = Every::new(Duration::from_secs(10));
    let refused_address = Every::new(Duration::from_secs(10));
    let accept_failed = Every::new(Duration::from_secs(10));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or memory: wait a moment rather than spin.
                    if let Some(n) = accept_failed.hit() {
                        tracing::error!(open = caps.open(), "accepting connections failed {n} time(s) in the last 10 s: {e}");
                    }
                    if !matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR)) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let admitted = match caps.admit(peer.ip()) {
            Ok(a) => a,
            Err(why) => {
                refuse(&tcp);
                let (every, what, max) = match why {
                    Refused::Total => (&refused_total, "mcpbox.maxConnections", settings.max_connections),
                    Refused::PerAddress => {
                        (&refused_address, "mcpbox.maxConnectionsPerAddress", settings.max_per_address)
                    }
                };
                if let Some(n) = every.hit() {
                    tracing::warn!(peer = %peer.ip(), open = caps.open(), "refused {n} connection(s) in the last 10 s: over {what} ({max})");
                }
                continue;
            }
        };
        // TCP_NODELAY: an SSE answer is written as several small chunks (headers, the event, the
        // end of the stream); with Nagle's algorithm on, each waits for the client's delayed ACK
        // and every request answered as a stream took ~40 ms instead of ~0.1 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        conns.spawn(connection(tcp, peer, admitted, app.clone(), settings.clone(), stop.clone()));
    }
}

/// Best effort: tell a refused client why, without waiting on its socket; then close it.
fn refuse(tcp: &TcpStream) {
    let _ = tcp.try_write(REFUSED);
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    app: Router,
    settings: Settings,
    stop: CancellationToken,
) {
    let _admitted = admitted;
    let app = TowerToHyperService::new(app);
    let body_timeout = settings.body_timeout;
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| handle(app.clone(), body_timeout, req));
    // http1_only: otherwise the builder first reads until it can tell HTTP/2's preface from
    // HTTP/1 (up to 24 bytes), with no timer running, and a client that sends fewer bytes than
    // that, or none at all, holds the connection for ever (axum::serve has exactly this gap).
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true)
        .max_buf_size(CONN_BUF_BYTES);
    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Timeouts and clients that go away are routine: not worth more than debug.
        tracing::debug!(peer = %peer, "connection ended: {e}");
    }
}

/// One request: the body under its deadline, then the app; a body that did not arrive in time
/// is answered 408 (whatever the handler made of the failed read) and the connection closed.
async fn handle(
    app: TowerToHyperService<Router>,
    body_timeout: Duration,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    use hyper::service::Service as _;
    let timed_out = Arc::new(AtomicBool::new(false));
    let req = req.map(|b| {
        if b.is_end_stream() {
            Body::new(b)
        } else {
            Body::new(Deadline {
                inner: b,
                sleep: Box::pin(tokio::time::sleep(body_timeout)),
                limit: body_timeout,
                timed_out: timed_out.clone(),
            })
        }
    });
    let resp = app.call(req).await?;
    if timed_out.load(Ordering::SeqCst) {
        let mut r = Response::new(Body::from(format!("request body not received within {body_timeout:?}\n")));
        *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(r);
    }
    Ok(resp)
}

/// A request body that fails once `limit` has passed since the request head.
struct Deadline {
    inner: Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    timed_out: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?} (mcpbox.bodyTimeout)")]
struct BodyTimeout(Duration);

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err(BodyTimeout(self.limit).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cover_the_reserve_the_egress_proxies_and_the_connections() {
        let d = |nofile| plan_descriptors(nofile, 64, 64, None);
        // 10000: 640 reserved; half of the 9360 left for 2340 proxied connections (of the 4096 that
        // 64 sandboxes of 64 could ask for), the other half for clients.
        assert_eq!(d(10000), Descriptors { limit: 10000, reserve: 640, connections: 4680, egress: 2340 });
        assert_eq!(d(1024), Descriptors { limit: 1024, reserve: 640, connections: 192, egress: 96 });
        // The shipped unit's limit: every sandbox gets its whole cap, the clients 16384.
        assert_eq!(d(65536), Descriptors { limit: 65536, reserve: 640, connections: 16384, egress: 4096 });
        assert_eq!(d(1 << 20).connections, 16384);
        // Before the proxies were counted, 10000 gave 9360 client connections: with all 64
        // sandboxes' proxies full (2 × 64 × 64 descriptors) mcpbox needed 17832 of its 10000.
        for nofile in [1024, 2048, 4096, 10000, 20000, 65536, 1 << 20] {
            for (sandboxes, per) in [(64, 64), (1, 64), (64, 1), (500, 256), (4, 10_000)] {
                let p = plan_descriptors(nofile, sandboxes, per, None);
                if p.reserve + 2 * MIN_SHARE * 2 <= nofile {
                    assert!(p.fits(), "{nofile} {sandboxes} {per}: {p:?} needs {}", p.needed());
                }
                assert!(p.egress as u64 <= sandboxes as u64 * per as u64, "{p:?}");
                assert!(p.connections >= 16 && p.egress >= 16.min(sandboxes * per), "{p:?}");
            }
        }
        // A limit too small for the sandboxes: the floors, and it says it does not fit.
        let tiny = plan_descriptors(512, 64, 64, None);
        assert_eq!((tiny.connections, tiny.egress), (16, 16));
        assert!(!tiny.fits());
        // maxConnections set: the proxies get what it leaves, up to what they could ask for.
        let set = plan_descriptors(10000, 64, 64, Some(8000));
        assert_eq!((set.connections, set.egress), (8000, 680));
        assert!(set.fits());
        assert_eq!(plan_descriptors(100_000, 64, 64, Some(8000)).egress, 4096);
        let over = plan_descriptors(10000, 64, 64, Some(20000));
        assert_eq!((over.connections, over.egress), (20000, 16));
        assert!(!over.fits());
    }

    #[test]
    fn addresses_are_counted_by_host_and_v6_by_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn caps_refuse_over_the_limits_and_give_back_on_drop() {
        let caps = Arc::new(Caps { max_total: 3, max_per_address: 2, open: Mutex::new((0, HashMap::new())) });
        let x: IpAddr = "192.0.2.1".parse().unwrap();
        let y: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = caps.admit(x).unwrap();
        let _a2 = caps.admit(x).unwrap();
        assert_eq!(caps.admit(x).err(), Some(Refused::PerAddress));
        let _b1 = caps.admit(y).unwrap();
        assert_eq!(caps.admit(y).err(), Some(Refused::Total));
        drop(a1);
        assert_eq!(caps.open(), 2);
        let _a3 = caps.admit(x).unwrap();
        assert_eq!(caps.admit(y).err(), Some(Refused::Total));
    }
}
