//! The egress proxy behind network mode `proxy`.
//!
//! A server in `proxy` mode lives in a network namespace that has only loopback. `sandbox-init`
//! binds a TCP listener on `127.0.0.1:PORT` inside that namespace and hands the socket back to
//! mcpbox; [`serve`] accepts on it from the tokio side and makes the outbound connections from
//! the host's network, after checking the policy's allow-list. No extra process is involved.
//!
//! What it speaks:
//! - `CONNECT host:port HTTP/1.1` → `200 Connection established`, then a byte tunnel;
//! - absolute-form requests (`GET http://host:port/path HTTP/1.1`) → forwarded in origin-form,
//!   hop-by-hop and proxy headers removed, one request per connection (`Connection: close` to
//!   both sides), the response relayed with its body untouched.
//!
//! How a target is judged, in this order:
//! 1. The requested host name (or IP literal) and port are matched against the allow-list
//!    *before any DNS lookup*: a denied name never reaches a resolver.
//! 2. An IP literal only matches an entry with that exact address and port.
//! 3. A name is resolved. If it was allowed by a wildcard entry, every address it resolves to must
//!    be public (no loopback, private, link-local, unique-local, unspecified, multicast, …);
//!    otherwise the request is refused without connecting. A name allowed by an entry naming
//!    that exact `host:port` may resolve to private addresses (internal services), never to
//!    this host's own ([`is_host_local`]: loopback, link-local, unspecified; and the addresses
//!    of its interfaces), which only an entry naming the address reaches. In a
//!    [`ProxyConfig::refuse_internal`] proxy (the prepare sandboxes': a registry named by a
//!    package manager's configuration never leads to loopback, link-local or private
//!    addresses) no address, of a name or an IP literal, may be [`is_internal`] or the host's.
//! 4. The connection goes to the addresses just checked: nothing is resolved twice.
//!
//! Denials answer `403 Forbidden` with a one-line body that names the policy and the target, and
//! are logged once with the fields `server` and `target`.
//!
//! Descriptors: every proxied connection holds two of mcpbox's ([`FDS_PER_CONNECTION`]: the
//! sandbox's side and the origin's), so what a server can make mcpbox hold is bounded twice: by
//! [`ProxyConfig::max_connections`] per sandbox (`mcpbox.maxEgressConnections`, default
//! [`DEFAULT_MAX_CONNECTIONS`]) and by one [`SharedBudget`] that all the proxies of `serve`
//! draw from, sized with the client connections from the descriptor limit
//! (`http::listen::plan_descriptors`). A connection over either is answered `503` at once, without
//! waiting for its request, closed, and recorded as an egress denial (`accept`); it never waits
//! for a place (a waiting accept only moves the queue into the kernel's backlog, where the
//! server's connections would sit until the other side gave up).

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Most headers accepted in one request or response head.
const MAX_HEADERS: usize = 100;
/// Largest response head accepted from an origin.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Connections one sandbox's proxy serves at once unless configured otherwise.
pub use crate::config::DEFAULT_MAX_EGRESS_CONNECTIONS as DEFAULT_MAX_CONNECTIONS;
/// mcpbox's descriptors one proxied connection holds: the sandbox's side and the origin's.
pub const FDS_PER_CONNECTION: u64 = 2;

// ---------------------------------------------------------------------------------------------
// Allow-list
// ---------------------------------------------------------------------------------------------

use crate::policy::{parse_host, split_host_port, HostPattern};
pub use crate::policy::{AllowEntry, AllowEntryError as AllowListError, Host};

/// The `network.allow` entries of a policy, parsed: `host:port`, `*.example.com:443`,
/// `127.0.0.1:8080`, `[::1]:8080`. A port is always required.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    exact: HashSet<(Host, u16)>,
    wildcards: Vec<(String, u16)>,
}

/// How a target matched the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// An entry names this exact host and port: a name may resolve to any address but this
    /// host's own and link-local ones (see [`is_host_local`]); a listed address is reachable
    /// whatever it is.
    Exact,
    /// Only a wildcard entry matched: the name must resolve to public addresses only.
    Wildcard,
}

impl AllowList {
    /// Parses every entry (the policy's grammar); the first bad one is the error.
    pub fn parse(entries: &[String]) -> Result<AllowList, AllowListError> {
        let entries = entries.iter().map(|e| e.parse()).collect::<Result<Vec<AllowEntry>, _>>()?;
        Ok(AllowList::new(&entries))
    }

    /// The list of a loaded policy's entries.
    pub fn new(entries: &[AllowEntry]) -> AllowList {
        let mut list = AllowList::default();
        for e in entries {
            match &e.host {
                HostPattern::Exact(h) => {
                    list.exact.insert((h.clone(), e.port));
                }
                HostPattern::Subdomains(s) => {
                    if !list.wildcards.contains(&(s.clone(), e.port)) {
                        list.wildcards.push((s.clone(), e.port));
                    }
                }
            }
        }
        list
    }

    /// True when nothing at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty()
    }

    /// Matches a target against the entries. Pure: no DNS.
    pub fn check(&self, host: &Host, port: u16) -> Option<Match> {
        if self.exact.contains(&(host.clone(), port)) {
            return Some(Match::Exact);
        }
        let Host::Name(name) = host else { return None };
        let hit = self.wildcards.iter().any(|(suffix, p)| {
            *p == port
                && name.len() > suffix.len() + 1
                && name.ends_with(suffix.as_str())
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        });
        hit.then_some(Match::Wildcard)
    }
}

/// `host:port` (a request target, as denials name it) parsed as an exact allow-list entry is.
pub fn parse_target(s: &str) -> Option<(Host, u16)> {
    match s.trim().parse::<crate::policy::AllowEntry>().ok()? {
        crate::policy::AllowEntry { host: crate::policy::HostPattern::Exact(h), port } => Some((h, port)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Address classification
// ---------------------------------------------------------------------------------------------

/// True for addresses on the public internet; false for loopback, private, shared (CGNAT),
/// link-local, unique-local, unspecified, multicast, documentation, benchmarking and reserved
/// ranges — and for IPv6 forms that embed such an IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

/// True for addresses that lead into this host or its local networks: loopback, unspecified,
/// "this network", private (RFC 1918), shared (CGNAT), link-local (cloud metadata),
/// unique-local, site-local, multicast and broadcast — and IPv6 forms embedding such an IPv4
/// address. Narrower than `!is_public`: documentation, benchmarking and reserved ranges are not
/// internal (some resolvers answer with them for names they forward through a gateway).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_unspecified() || v6.is_loopback() {
                return true;
            }
            if let Some(v4) = embedded_v4(v6) {
                return is_internal_v4(v4);
            }
            (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] & 0xffc0) == 0xfec0
                || (seg[0] & 0xff00) == 0xff00
        }
    }
}

/// The IPv4 address inside an IPv6 address of a form that carries one, judged by both
/// [`is_internal`] and [`is_public`] as that IPv4 address (an address the kernel may route to
/// it): `::ffff:a.b.c.d` (mapped) and `::a.b.c.d` (the deprecated compatible form) in the low 32
/// bits, NAT64's well-known prefix `64:ff9b::/96` in the low 32 bits, 6to4 `2002::/16` in bits
/// 16..48. `::` and `::1` match the compatible form: callers judge them first.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let v4 = |hi: u16, lo: u16| Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    if seg[..5] == [0; 5] && (seg[5] == 0xffff || seg[5] == 0) {
        return v4(seg[6], seg[7]);
    }
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0; 4] {
        return v4(seg[6], seg[7]);
    }
    if seg[0] == 0x2002 {
        return v4(seg[1], seg[2]);
    }
    None
}

/// This host's own addresses and link-local ones: unspecified, loopback, link-local (cloud
/// metadata lives at 169.254.169.254), and IPv6 forms embedding such an IPv4 address. What an
/// exact *name* in an allow-list never reaches (a listed address does).
pub fn is_host_local(ip: IpAddr) -> bool {
    let v4 = |v4: Ipv4Addr| {
        let [a, b, _, _] = v4.octets();
        a == 0 || a == 127 || (a == 169 && b == 254)
    };
    match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(v6) => {
            if v6.is_unspecified() || v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80 {
                return true;
            }
            embedded_v4(v6).is_some_and(v4)
        }
    }
}

/// Whether `ip` is one of the addresses of this host's own interfaces (as the proxy, in the
/// host's network, sees them now): a service bound to all addresses answers there as it does
/// on loopback. Asked at each check, so that an address added later counts too.
fn is_own_interface(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return false };
    addrs.filter_map(|a| a.address).any(|a| {
        let own = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
            (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
            _ => None,
        };
        own.is_some_and(|o| o.to_canonical() == ip)
    })
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, _, _] = ip.octets();
    a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (224..240).contains(&a)
        || ip == Ipv4Addr::BROADCAST
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let non_public = a == 0                                  // "this network", 0.0.0.0
        || a == 10                                           // private
        || a == 127                                          // loopback
        || (a == 100 && (64..128).contains(&b))              // shared address space (CGNAT)
        || (a == 169 && b == 254)                            // link-local
        || (a == 172 && (16..32).contains(&b))               // private
        || (a == 192 && b == 0 && c == 0)                    // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)                    // documentation
        || (a == 192 && b == 168)                            // private
        || (a == 198 && (b == 18 || b == 19))                // benchmarking
        || (a == 198 && b == 51 && c == 100)                 // documentation
        || (a == 203 && b == 0 && c == 113)                  // documentation
        || a >= 224; // multicast, reserved, broadcast
    !non_public
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() {
        return false;
    }
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    let non_public = (seg[0] & 0xfe00) == 0xfc00            // unique-local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80                       // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0                       // site-local (deprecated)
        || (seg[0] & 0xff00) == 0xff00                       // multicast
        || (seg[0] == 0x2001 && seg[1] == 0x0db8)            // documentation
        || (seg[0] == 0x0100 && seg[1..4] == [0; 3])         // discard-only 100::/64
        || seg[0] == 0; // the rest of ::/16 is reserved
    !non_public
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Turns a host name into addresses. The system resolver in production; tests substitute one
/// that records what it was asked.
pub trait Resolve: Send + Sync {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The host's resolver (`getaddrinfo` on a blocking thread, through tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((name, port)).await?.collect()) })
    }
}

/// Everything one server's proxy needs.
pub struct ProxyConfig {
    pub allow: AllowList,
    /// The policy's name or path, quoted in denials (`fetch.toml`).
    pub policy_name: String,
    /// The server's name, for logs.
    pub server: String,
    /// The session the sandbox serves, if it serves one (for denial lines).
    pub session: Option<String>,
    /// Where refusals are recorded and counted; without it they are only logged.
    pub denials: Option<Arc<crate::denials::ServerDenials>>,
    /// Resolving plus connecting to the origin.
    pub connect_timeout: Duration,
    /// Reading the whole request head from the sandboxed client.
    pub header_timeout: Duration,
    /// Largest request head accepted (request line plus headers).
    pub max_header_bytes: usize,
    /// Connections this proxy (one sandbox's) serves at once; one more is refused (`503`).
    pub max_connections: usize,
    /// The budget all the proxies of this process draw from, if there is one (`serve`'s); a
    /// connection it has no place for is refused as one over `max_connections` is.
    pub shared: Option<SharedBudget>,
    /// No target may resolve to an [`is_internal`] address, whatever entry it matched.
    pub refuse_internal: bool,
    pub resolver: Arc<dyn Resolve>,
    /// Record mode (`mcpbox policy learn`): a target the allow-list does not name is let through
    /// as a wildcard match is (every address it resolves to must be public: internal ones stay
    /// refused), and every connection made is recorded here.
    pub record: Option<Arc<dyn RecordConnect>>,
}

/// Where record mode writes each target that passed the checks (`mcpbox policy learn`'s
/// observations implement it; the proxy needs nothing else of them).
pub trait RecordConnect: Send + Sync {
    fn connect(&self, target: &str);
}

impl ProxyConfig {
    /// The defaults: 10 s connect, 10 s header read, 16 KiB heads, [`DEFAULT_MAX_CONNECTIONS`]
    /// connections and no shared budget, system DNS.
    pub fn new(allow: AllowList, policy_name: impl Into<String>, server: impl Into<String>) -> Self {
        ProxyConfig {
            allow,
            policy_name: policy_name.into(),
            server: server.into(),
            session: None,
            denials: None,
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shared: None,
            refuse_internal: false,
            resolver: Arc::new(SystemResolver),
            record: None,
        }
    }
}

impl ProxyConfig {
    /// Records an egress denial in the server's denial records (which log it, rate-limited,
    /// with the session); `false` where this proxy keeps none, for the caller to log it.
    fn record_denial(&self, access: &str, object: &str, reason: &str) -> bool {
        let Some(d) = &self.denials else { return false };
        d.record(
            self.session.as_deref(),
            Some(&self.policy_name),
            crate::denials::Denial {
                layer: crate::denials::Layer::Egress,
                access: access.into(),
                object: object.into(),
                reason: Some(reason.into()),
            },
        );
        true
    }
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("allow", &self.allow)
            .field("policy_name", &self.policy_name)
            .field("server", &self.server)
            .field("session", &self.session)
            .field("connect_timeout", &self.connect_timeout)
            .field("header_timeout", &self.header_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_connections", &self.max_connections)
            .field("shared", &self.shared)
            .field("refuse_internal", &self.refuse_internal)
            .finish_non_exhaustive()
    }
}

/// Connections all the egress proxies of a process may hold together: one place per proxied
/// connection, taken at accept and given back when the connection ends. Cloned handles share
/// the places.
#[derive(Clone)]
pub struct SharedBudget {
    places: Arc<Semaphore>,
    max: usize,
}

impl SharedBudget {
    pub fn new(max: usize) -> Self {
        SharedBudget { places: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))), max }
    }

    /// The places in all.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The places taken now.
    pub fn in_use(&self) -> usize {
        self.max.saturating_sub(self.places.available_permits())
    }
}

impl fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBudget({} of {})", self.in_use(), self.max)
    }
}

/// The environment a server in `proxy` mode gets, for a proxy on `127.0.0.1:port`.
///
/// Both spellings are set (curl reads only the lowercase `http_proxy`), `NODE_USE_ENV_PROXY=1`
/// makes Node's fetch honour them, and `NO_PROXY` is set empty so that nothing inherited exempts
/// loopback or anything else.
pub fn proxy_env(port: u16) -> Vec<(&'static str, String)> {
    let url = format!("http://127.0.0.1:{port}");
    vec![
        ("HTTP_PROXY", url.clone()),
        ("HTTPS_PROXY", url.clone()),
        ("http_proxy", url.clone()),
        ("https_proxy", url.clone()),
        ("ALL_PROXY", url.clone()),
        ("all_proxy", url),
        ("NO_PROXY", String::new()),
        ("no_proxy", String::new()),
        ("NODE_USE_ENV_PROXY", "1".to_string()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

/// [`serve`] on a thread and runtime of its own, for callers that run on blocking threads or
/// have no runtime at all (prepare steps, `mcpbox run`). Stopped and joined when dropped.
pub struct ProxyThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProxyThread {
    pub fn start(listener: std::net::TcpListener, cfg: ProxyConfig) -> io::Result<ProxyThread> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = cfg.server.clone();
        let thread = std::thread::Builder::new().name("mcpbox-egress-proxy".into()).spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    r = serve(listener, Arc::new(cfg)) => {
                        if let Err(e) = r {
                            tracing::warn!(server = %server, "egress proxy stopped: {e}");
                        }
                    }
                    _ = stopped => {}
                }
            });
        })?;
        Ok(ProxyThread { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for ProxyThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves the proxy on `listener` (already bound, normally inside the server's namespace) until
/// the listener fails or the task is aborted. One task per connection, owned by this one: when
/// it ends (the sandbox is gone and its supervisor aborts it), every tunnel and exchange of
/// the sandbox ends with it. Detached, a tunnel to an upstream that never closes outlived its
/// sandbox with two of mcpbox's descriptors, up to `max_connections` per sandbox ever started,
/// until mcpbox ran out of descriptors for everything else.
///
/// Every connection is accepted at once; one over `max_connections` or the shared budget is
/// refused there (see [`refuse_over`]) rather than left waiting in the kernel's backlog.
pub async fn serve(listener: std::net::TcpListener, cfg: Arc<ProxyConfig>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let own = Arc::new(Semaphore::new(cfg.max_connections.min(Semaphore::MAX_PERMITS)));
    // Refusals without a denial record are logged here, at most once per 10 s.
    let refusals = crate::budget::Every::new(Duration::from_secs(10));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Forget the connections that ended (the set would otherwise keep their results).
        while connections.try_join_next().is_some() {}
        let (stream, _peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) if is_transient_accept_error(&e) => {
                tracing::warn!(server = %cfg.server, error = %e, "egress proxy: accept failed, retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let places = match admit(&own, &cfg) {
            Ok(p) => p,
            Err(over) => {
                refuse_over(stream, &cfg, over, &refusals);
                continue;
            }
        };
        let cfg = cfg.clone();
        connections.spawn(async move {
            handle(stream, &cfg).await;
            drop(places);
        });
    }
}

/// Which cap a connection was refused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    /// The sandbox's own, [`ProxyConfig::max_connections`].
    Sandbox(usize),
    /// The budget of all sandboxes, [`ProxyConfig::shared`].
    Shared(usize),
}

/// A connection's places: its sandbox's and, under `serve`, the shared budget's.
struct Places {
    _own: tokio::sync::OwnedSemaphorePermit,
    _shared: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Takes a place in the sandbox's cap and then in the shared budget, or says which is full
/// (nothing is kept then: a refusal by the shared budget gives the sandbox's place back).
fn admit(own: &Arc<Semaphore>, cfg: &ProxyConfig) -> Result<Places, Over> {
    let own = own.clone().try_acquire_owned().map_err(|_| Over::Sandbox(cfg.max_connections))?;
    let shared = match &cfg.shared {
        Some(b) => Some(b.places.clone().try_acquire_owned().map_err(|_| Over::Shared(b.max))?),
        None => None,
    };
    Ok(Places { _own: own, _shared: shared })
}

/// Answers a connection over a cap `503` and closes it, without waiting on it: what the client
/// sent already is read first (a close with unread data would reset the connection, and the
/// client might lose the answer), the answer is written only if the socket takes it at once.
/// Recorded as an egress denial (`accept`, the cap as the object), or logged rate-limited.
fn refuse_over(stream: TcpStream, cfg: &ProxyConfig, over: Over, refusals: &crate::budget::Every) {
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        match stream.try_read(&mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let (object, body) = match over {
        Over::Sandbox(n) => (
            format!("over {n} open connections (mcpbox.maxEgressConnections)"),
            format!("mcpbox: this server holds its maximum of {n} proxied connections at once (mcpbox.maxEgressConnections)"),
        ),
        Over::Shared(n) => (
            format!("over {n} open connections of all sandboxes (the descriptor budget)"),
            format!("mcpbox: the egress proxies of all servers hold their maximum of {n} connections at once"),
        ),
    };
    let body = body + "\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
    drop(stream);
    if !cfg.record_denial("accept", &object, "too many connections at once") {
        if let Some(n) = refusals.hit() {
            tracing::warn!(server = %cfg.server, "egress proxy refused {n} connection(s) in the last 10 s: {object}");
        }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
        || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// A refusal to send back to the sandboxed client: status and a one-line body.
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn new(status: u16, body: impl Into<String>) -> Self {
        Reply { status, body: body.into() }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) {
    let mut body = reply.body.clone();
    body.push('\n');
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reason_phrase(reply.status),
        body.len()
    );
    let _ = w.write_all(head.as_bytes()).await;
    let _ = w.write_all(body.as_bytes()).await;
    let _ = w.shutdown().await;
}

async fn handle(mut client: TcpStream, cfg: &ProxyConfig) {
    if let Err(reply) = handle_inner(&mut client, cfg).await {
        write_reply(&mut client, &reply).await;
    }
}

/// What the client asked for, after parsing its head.
enum Request {
    Connect { host: Host, port: u16 },
    Forward { method: String, host: Host, port: u16, path: String, headers: Vec<(String, Vec<u8>)> },
}

async fn handle_inner(client: &mut TcpStream, cfg: &ProxyConfig) -> Result<(), Reply> {
    let (head, rest) = match tokio::time::timeout(
        cfg.header_timeout,
        read_head(client, cfg.max_header_bytes, HeadKind::Request, Vec::new()),
    )
    .await
    {
        Err(_) => return Err(Reply::new(408, "mcpbox: timed out reading the request head")),
        Ok(Err(HeadError::Closed)) => return Ok(()),
        Ok(Err(HeadError::TooLarge)) => {
            return Err(Reply::new(431, "mcpbox: request head too large"));
        }
        Ok(Err(HeadError::Malformed)) => return Err(Reply::new(400, "mcpbox: malformed request")),
        Ok(Ok(v)) => v,
    };
    let request = parse_request(&head).map_err(|why| Reply::new(400, format!("mcpbox: {why}")))?;

    let (method, host, port) = match &request {
        Request::Connect { host, port } => ("CONNECT", host.clone(), *port),
        Request::Forward { method, host, port, .. } => (method.as_str(), host.clone(), *port),
    };
    let target = format!("{host}:{port}");
    let origin = connect_checked(cfg, method, &host, port, &target).await?;

    match request {
        Request::Connect { .. } => {
            let mut origin = origin;
            if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
                return Ok(());
            }
            if !rest.is_empty() && origin.write_all(&rest).await.is_err() {
                return Ok(());
            }
            let _ = tokio::io::copy_bidirectional(client, &mut origin).await;
            Ok(())
        }
        Request::Forward { method, host, port, path, headers } => {
            forward(client, origin, &method, &host, port, &path, &headers, &rest).await;
            Ok(())
        }
    }
}

/// Applies the allow-list, resolves, applies the address rule, connects. Every refusal is
/// logged here, once.
async fn connect_checked(
    cfg: &ProxyConfig,
    method: &str,
    host: &Host,
    port: u16,
    target: &str,
) -> Result<TcpStream, Reply> {
    let deny = |why: &str, detail: &str| {
        if !cfg.record_denial("connect", target, detail) {
            tracing::warn!(server = %cfg.server, target = %target, method, reason = detail, "egress denied");
        }
        Reply::new(403, format!("mcpbox: {method} {target} denied by policy {} ({why})", cfg.policy_name))
    };

    // 1. The allow-list, on the name as requested: nothing is resolved for a denied name.
    let how = match cfg.allow.check(host, port) {
        Some(how) => how,
        // Record mode: public addresses only, as for a wildcard entry.
        None if cfg.record.is_some() => Match::Wildcard,
        None => return Err(deny("network.allow", "not in the allow-list")),
    };

    // 2. Addresses.
    let addrs: Vec<SocketAddr> = match host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        Host::Name(name) => match tokio::time::timeout(cfg.connect_timeout, cfg.resolver.resolve(name, port)).await {
            Err(_) => return Err(upstream_error(cfg, target, 504, "DNS lookup timed out")),
            Ok(Err(e)) => {
                tracing::info!(server = %cfg.server, target = %target, error = %e, "egress: DNS lookup failed");
                return Err(Reply::new(502, format!("mcpbox: cannot resolve {host}")));
            }
            Ok(Ok(a)) if a.is_empty() => {
                return Err(Reply::new(502, format!("mcpbox: cannot resolve {host}")));
            }
            Ok(Ok(a)) => a,
        },
    };
    if cfg.refuse_internal {
        if let Some(bad) = addrs.iter().find(|a| is_internal(a.ip()) || is_own_interface(a.ip())) {
            return Err(deny(
                "loopback, link-local, private and this host's own addresses are not reachable from here",
                &format!("resolves to internal address {}", bad.ip()),
            ));
        }
    } else if how == Match::Wildcard {
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip()) || is_own_interface(a.ip())) {
            return Err(deny(
                "network.allow: resolves to a non-public address; list the exact host:port to permit it",
                &format!("wildcard match resolves to non-public address {}", bad.ip()),
            ));
        }
    } else if matches!(host, Host::Name(_)) {
        // An exact name: whoever answers for it in DNS decides where it leads, and a name can
        // be pointed at this host's loopback or its own interface addresses (mcpbox's own
        // listener, local services bound to all addresses) or at link-local addresses (cloud
        // metadata) at any time. Those take the address itself.
        if let Some(bad) = addrs.iter().find(|a| is_host_local(a.ip()) || is_own_interface(a.ip())) {
            return Err(deny(
                "network.allow: a name never leads to loopback, link-local or this host's own addresses; list the address itself (e.g. 127.0.0.1:8080) to permit it",
                &format!("resolves to host-local address {}", bad.ip()),
            ));
        }
    }

    // Record mode: what passed the checks is what the server needs, reachable or not.
    if let Some(r) = &cfg.record {
        r.connect(target);
    }

    // 3. Connect, trying each address in turn.
    match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&addrs[..])).await {
        Err(_) => Err(upstream_error(cfg, target, 504, "connect timed out")),
        Ok(Err(e)) => {
            tracing::info!(server = %cfg.server, target = %target, error = %e, "egress: connect failed");
            Err(Reply::new(502, format!("mcpbox: cannot connect to {target}")))
        }
        Ok(Ok(s)) => {
            tracing::debug!(server = %cfg.server, target = %target, method, "egress allowed");
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

fn upstream_error(cfg: &ProxyConfig, target: &str, status: u16, what: &str) -> Reply {
    tracing::info!(server = %cfg.server, target = %target, "egress: {what}");
    Reply::new(status, format!("mcpbox: {target}: {what}"))
}

// ---------------------------------------------------------------------------------------------
// HTTP/1 heads
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The peer closed before sending a byte.
    Closed,
    TooLarge,
    Malformed,
}

#[derive(Clone, Copy)]
enum HeadKind {
    Request,
    Response,
}

/// Reads until a complete head has arrived, starting from `buf` (bytes already read). Returns the
/// head bytes and whatever followed them (the start of a body, or of a tunnelled stream).
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    kind: HeadKind,
    mut buf: Vec<u8>,
) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut chunk = [0u8; 4096];
    let mut read_first = buf.is_empty();
    loop {
        if read_first {
            let n = r.read(&mut chunk).await.map_err(|_| HeadError::Malformed)?;
            if n == 0 {
                return Err(if buf.is_empty() { HeadError::Closed } else { HeadError::Malformed });
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        read_first = true;
        let parsed = {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match kind {
                HeadKind::Request => httparse::Request::new(&mut headers).parse(&buf),
                HeadKind::Response => httparse::Response::new(&mut headers).parse(&buf),
            }
        };
        match parsed {
            Ok(httparse::Status::Complete(len)) if len <= max => {
                let rest = buf.split_off(len);
                return Ok((buf, rest));
            }
            Ok(httparse::Status::Complete(_)) => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) if buf.len() > max => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

/// Headers that concern one hop only and never travel on, in either direction. `Transfer-Encoding`
/// is not among them: bodies pass through byte for byte, so their framing goes with them.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// Keeps the end-to-end headers: drops the hop-by-hop ones and those that `Connection` names.
fn end_to_end(headers: &[httparse::Header<'_>], also_drop: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut named: Vec<String> = Vec::new();
    for h in headers {
        if h.name.eq_ignore_ascii_case("connection") || h.name.eq_ignore_ascii_case("proxy-connection") {
            for token in String::from_utf8_lossy(h.value).split(',') {
                let t = token.trim().to_ascii_lowercase();
                if !t.is_empty() {
                    named.push(t);
                }
            }
        }
    }
    headers
        .iter()
        .filter(|h| {
            let n = h.name.to_ascii_lowercase();
            !HOP_BY_HOP.contains(&n.as_str()) && !also_drop.contains(&n.as_str()) && !named.contains(&n)
        })
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect()
}

fn parse_request(head: &[u8]) -> Result<Request, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("malformed request".into()),
    }
    let method = req.method.ok_or("no method")?;
    let target = req.path.ok_or("no request target")?;

    if method == "CONNECT" {
        let (h, port) = split_host_port(target).map_err(|_| format!("bad CONNECT target `{target}`"))?;
        let port = port.ok_or_else(|| format!("CONNECT target `{target}` needs a port"))?;
        let host = parse_host(h).map_err(|why| format!("bad CONNECT target `{target}`: {why}"))?;
        return Ok(Request::Connect { host, port });
    }

    // Absolute form, http only: https goes through CONNECT.
    let Some(after_scheme) = strip_prefix_ignore_case(target, "http://") else {
        if strip_prefix_ignore_case(target, "https://").is_some() {
            return Err("this proxy does not originate TLS; use CONNECT for https".into());
        }
        return Err("a proxy request needs an absolute http:// URL or CONNECT".into());
    };
    let end = after_scheme.find(['/', '?', '#']).unwrap_or(after_scheme.len());
    let authority = &after_scheme[..end];
    if authority.contains('@') {
        return Err("credentials in the URL are not supported".into());
    }
    let mut path = after_scheme[end..].split('#').next().unwrap_or_default().to_string();
    if path.is_empty() {
        path = "/".into();
    } else if path.starts_with('?') {
        path.insert(0, '/');
    }
    let (h, port) = split_host_port(authority).map_err(|_| format!("bad URL authority `{authority}`"))?;
    let host = parse_host(h).map_err(|why| format!("bad URL host `{h}`: {why}"))?;
    let port = port.unwrap_or(80);

    // Both framings at once is the classic smuggling shape: refuse it.
    let has = |name: &str| req.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    if has("transfer-encoding") && has("content-length") {
        return Err("both Transfer-Encoding and Content-Length".into());
    }
    let headers = end_to_end(req.headers, &["host"]);
    Ok(Request::Forward { method: method.to_string(), host, port, path, headers })
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes()))
        .then(|| &s[prefix.len()..])
}

/// Sends the request in origin-form, then relays the response. The request body (if any) is
/// streamed as it comes; the exchange ends when the origin has sent its response and closed.
#[allow(clippy::too_many_arguments)]
async fn forward(
    client: &mut TcpStream,
    origin: TcpStream,
    method: &str,
    host: &Host,
    port: u16,
    path: &str,
    headers: &[(String, Vec<u8>)],
    rest: &[u8],
) {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(format!("{method} {path} HTTP/1.1\r\n").as_bytes());
    if port == 80 {
        head.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
    } else {
        head.extend_from_slice(format!("Host: {host}:{port}\r\n").as_bytes());
    }
    for (name, value) in headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");

    let (mut origin_r, mut origin_w) = origin.into_split();
    if origin_w.write_all(&head).await.is_err() || origin_w.write_all(rest).await.is_err() {
        write_reply(client, &Reply::new(502, "mcpbox: the origin closed the connection")).await;
        return;
    }
    let (mut client_r, mut client_w) = client.split();
    let upload = async {
        // The client's EOF is not passed on as a half-close (some origins take that as an abort);
        // the exchange ends when the response does.
        if tokio::io::copy(&mut client_r, &mut origin_w).await.is_ok() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = upload => {}
        _ = relay_response(&mut origin_r, &mut client_w) => {}
    }
    let _ = client_w.shutdown().await;
}

/// Copies the origin's response to the client: heads rewritten (hop-by-hop headers out,
/// `Connection: close` in), `1xx` interim heads passed on, the body copied until the origin closes.
async fn relay_response<R, W>(origin: &mut R, client: &mut W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pending = Vec::new();
    loop {
        let pending_now = std::mem::take(&mut pending);
        let (head, rest) = match read_head(origin, MAX_RESPONSE_HEAD, HeadKind::Response, pending_now).await {
            Ok(v) => v,
            Err(_) => {
                write_reply(client, &Reply::new(502, "mcpbox: bad response from the origin")).await;
                return;
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        if !matches!(resp.parse(&head), Ok(httparse::Status::Complete(_))) {
            write_reply(client, &Reply::new(502, "mcpbox: bad response from the origin")).await;
            return;
        }
        let code = resp.code.unwrap_or(502);
        let interim = (100..200).contains(&code) && code != 101;
        let mut out = Vec::with_capacity(head.len() + 32);
        out.extend_from_slice(format!("HTTP/1.1 {code} {}\r\n", resp.reason.unwrap_or("")).as_bytes());
        for (name, value) in end_to_end(resp.headers, &[]) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
        if !interim {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if client.write_all(&out).await.is_err() {
            return;
        }
        if interim {
            pending = rest;
            continue;
        }
        if client.write_all(&rest).await.is_err() {
            return;
        }
        let _ = tokio::io::copy(origin, client).await;
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;
    use tokio::task::JoinHandle;

    const T: Duration = Duration::from_secs(5);

    fn list(entries: &[&str]) -> Result<AllowList, AllowListError> {
        AllowList::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn name(s: &str) -> Host {
        Host::Name(s.to_string())
    }

    /// A resolver that answers from a table and records every question.
    #[derive(Default)]
    struct FakeDns {
        table: HashMap<String, Vec<IpAddr>>,
        asked: Mutex<Vec<String>>,
    }

    impl FakeDns {
        fn with(pairs: &[(&str, &str)]) -> Self {
            let mut table: HashMap<String, Vec<IpAddr>> = HashMap::new();
            for (n, ip) in pairs {
                table.entry(n.to_string()).or_default().push(ip.parse().unwrap());
            }
            FakeDns { table, asked: Mutex::default() }
        }
        fn asked(&self) -> Vec<String> {
            self.asked.lock().unwrap().clone()
        }
    }

    impl Resolve for FakeDns {
        fn resolve<'a>(
            &'a self,
            name: &'a str,
            port: u16,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
            self.asked.lock().unwrap().push(name.to_string());
            let answer = match self.table.get(name) {
                Some(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
                None => Err(io::Error::new(io::ErrorKind::NotFound, "no such name")),
            };
            Box::pin(async move { answer })
        }
    }

    struct Proxy {
        addr: SocketAddr,
        dns: Arc<FakeDns>,
        task: JoinHandle<io::Result<()>>,
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn start_proxy(allow: &[String], dns: FakeDns) -> Proxy {
        start_proxy_with(allow, dns, false)
    }

    fn start_proxy_with(allow: &[String], dns: FakeDns, refuse_internal: bool) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dns = Arc::new(dns);
        let mut cfg = ProxyConfig::new(AllowList::parse(allow).unwrap(), "fetch.toml", "fetch");
        cfg.resolver = dns.clone();
        cfg.connect_timeout = Duration::from_secs(2);
        cfg.header_timeout = Duration::from_secs(2);
        cfg.refuse_internal = refuse_internal;
        let task = tokio::spawn(serve(listener, Arc::new(cfg)));
        Proxy { addr, dns, task }
    }

    /// Sends `request` to the proxy and reads until it closes.
    async fn exchange(proxy: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("proxy answered in time").unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A listener that must never see a connection; `assert_untouched` checks it.
    struct Tripwire(std::net::TcpListener);

    impl Tripwire {
        fn new() -> Self {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.set_nonblocking(true).unwrap();
            Tripwire(l)
        }
        fn port(&self) -> u16 {
            self.0.local_addr().unwrap().port()
        }
        fn assert_untouched(&self) {
            match self.0.accept() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok((_, peer)) => panic!("the proxy connected to a denied target (from {peer})"),
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, task)
    }

    /// A one-shot HTTP origin: reads one request (head plus Content-Length body), sends it back
    /// through the channel, answers with `response`.
    async fn http_origin(response: &'static str) -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let (head, mut body) = read_head(&mut s, 64 * 1024, HeadKind::Request, Vec::new()).await.unwrap();
            let head = String::from_utf8(head).unwrap();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .map(|v| v.parse::<usize>().unwrap())
                .unwrap_or(0);
            while body.len() < len {
                let mut b = [0u8; 1024];
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0, "client body cut short");
                body.extend_from_slice(&b[..n]);
            }
            let _ = tx.send(format!("{head}{}", String::from_utf8_lossy(&body)));
            s.write_all(response.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
        });
        (addr, rx)
    }

    // --- allow-list parsing ------------------------------------------------------------------

    #[test]
    fn parses_the_documented_forms() {
        let l =
            list(&["api.example.com:443", "*.example.org:443", "127.0.0.1:8080", "[::1]:8080", "Mixed.Case.COM.:80"])
                .unwrap();
        assert_eq!(l.check(&name("api.example.com"), 443), Some(Match::Exact));
        assert_eq!(l.check(&name("api.example.com"), 80), None, "the port is part of the entry");
        assert_eq!(l.check(&Host::Ip("127.0.0.1".parse().unwrap()), 8080), Some(Match::Exact));
        assert_eq!(l.check(&Host::Ip("::1".parse().unwrap()), 8080), Some(Match::Exact));
        assert_eq!(l.check(&Host::Ip("127.0.0.2".parse().unwrap()), 8080), None);
        assert_eq!(
            l.check(&name("mixed.case.com"), 80),
            Some(Match::Exact),
            "names are case-folded, trailing dot dropped"
        );
        assert!(list(&[]).unwrap().is_empty());
    }

    #[test]
    fn wildcards_match_subdomains_not_the_apex() {
        let l = list(&["*.example.com:443"]).unwrap();
        assert_eq!(l.check(&name("a.example.com"), 443), Some(Match::Wildcard));
        assert_eq!(l.check(&name("a.b.example.com"), 443), Some(Match::Wildcard));
        assert_eq!(l.check(&name("example.com"), 443), None, "the apex is not a subdomain");
        assert_eq!(l.check(&name("badexample.com"), 443), None, "suffix match is on a label boundary");
        assert_eq!(l.check(&name("a.example.com.evil.net"), 443), None);
        assert_eq!(l.check(&name("a.example.com"), 80), None);
        assert_eq!(l.check(&Host::Ip("93.184.216.34".parse().unwrap()), 443), None);
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        let err = |e: &str| list(&[e]).unwrap_err().to_string();
        assert_eq!(err("example.com"), "[network] allow `example.com`: a port is required, e.g. `example.com:443`");
        assert!(matches!(list(&["example.com:"]), Err(AllowListError::MissingPort { .. })));
        assert!(matches!(list(&["[::1]"]), Err(AllowListError::MissingPort { .. })));
        for bad_port in ["example.com:0", "example.com:65536", "example.com:https", "example.com:-1", "example.com:+80"]
        {
            assert!(matches!(list(&[bad_port]), Err(AllowListError::BadPort { .. })), "{bad_port}");
        }
        assert!(err("::1:8080").contains("brackets"));
        assert!(err("https://example.com:443").contains("without a scheme"));
        assert!(err("example.com:443/path").contains("without a scheme or a path"));
        assert!(err("").contains("empty"));
        assert!(err("exa mple.com:80").contains("only letters"));
        assert!(err("-x.example.com:80").contains("start or end"));
        assert!(err("127.1:80").contains("numeric"), "resolvers would read 127.1 as an address");
        assert!(err("0x7f:80").contains("numeric"));
        for w in ["*:443", "*.com:443", "foo.*.com:443", "*example.com:443", "*.*.example.com:443", "*.10.0.0.1:80"] {
            assert!(matches!(list(&[w]), Err(AllowListError::BadWildcard { .. })), "{w}");
        }
        assert!(err("*.com:443").contains("too broad"));
        // One bad entry spoils the list.
        assert!(list(&["ok.example.com:443", "nope"]).is_err());
    }

    #[test]
    fn address_classes() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::",
            "::1",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must not count as public");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn proxy_env_sets_both_spellings_and_empties_no_proxy() {
        let env: HashMap<_, _> = proxy_env(3128).into_iter().collect();
        assert_eq!(env["HTTPS_PROXY"], "http://127.0.0.1:3128");
        assert_eq!(env["https_proxy"], "http://127.0.0.1:3128");
        assert_eq!(env["http_proxy"], "http://127.0.0.1:3128");
        assert_eq!(env["NODE_USE_ENV_PROXY"], "1");
        assert_eq!(env["NO_PROXY"], "");
    }

    // --- CONNECT --------------------------------------------------------------------------------

    #[tokio::test]
    async fn connect_to_an_allowed_loopback_port_tunnels_bytes_both_ways() {
        let (echo, _echo_task) = echo_server().await;
        let proxy = start_proxy(&[format!("127.0.0.1:{}", echo.port())], FakeDns::default());

        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        // The first tunnelled bytes ride in the same write as the head, as TLS clients do.
        let head =
            format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\nearly-", echo.port(), echo.port());
        s.write_all(head.as_bytes()).await.unwrap();
        let expect = b"HTTP/1.1 200 Connection established\r\n\r\n";
        let mut got = vec![0u8; expect.len()];
        tokio::time::timeout(T, s.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got, expect);

        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
            payload
        });
        let mut echoed = Vec::new();
        tokio::time::timeout(T, r.read_to_end(&mut echoed)).await.unwrap().unwrap();
        let payload = writer.await.unwrap();
        assert_eq!(&echoed[..6], b"early-");
        assert_eq!(echoed[6..], payload[..], "the tunnel round-trips every byte");
        assert!(proxy.dns.asked().is_empty(), "an IP literal needs no DNS");
    }

    /// A name (exact or by wildcard) that resolves to one of this host's own interface
    /// addresses is refused: a service bound to all addresses answers there as on loopback.
    #[tokio::test]
    async fn a_name_never_leads_to_this_hosts_own_interface_addresses() {
        let own = nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter_map(|a| a.address)
            .filter_map(|a| a.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())))
            .find(|ip| !ip.is_loopback())
            .expect("the test needs an interface with a non-loopback IPv4 address");
        let trip = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        trip.set_nonblocking(true).unwrap();
        let port = trip.local_addr().unwrap().port();
        let own_s = own.to_string();
        let dns = FakeDns::with(&[("self.test", &own_s), ("a.wild.test", &own_s)]);
        let proxy = start_proxy(&[format!("self.test:{port}"), format!("*.wild.test:{port}")], dns);
        for name in ["self.test", "a.wild.test"] {
            let reply = exchange(proxy.addr, format!("CONNECT {name}:{port} HTTP/1.1\r\n\r\n").as_bytes()).await;
            assert!(reply.starts_with("HTTP/1.1 403"), "{name} -> {own}: {reply}");
        }
        match trip.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("the proxy connected to this host's own address: {other:?}"),
        }
        // The address itself, listed, is reachable.
        let proxy = start_proxy(&[format!("{own}:{port}")], FakeDns::default());
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(format!("CONNECT {own}:{port} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
        let mut got = [0u8; 12];
        tokio::time::timeout(T, s.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got, b"HTTP/1.1 200");
    }

    /// A hostile server opens tunnels to an upstream that never closes, then its sandbox ends:
    /// the tunnels end with the proxy's task (the supervisor aborts it) and no descriptor of
    /// mcpbox stays behind.
    #[tokio::test]
    async fn tunnels_end_when_the_proxy_task_ends() {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = upstream.local_addr().unwrap().port();
        let proxy = start_proxy(&[format!("127.0.0.1:{port}")], FakeDns::default());
        let mut clients = Vec::new();
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            s.write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
            let mut got = vec![0u8; 39];
            tokio::time::timeout(T, s.read_exact(&mut got)).await.unwrap().unwrap();
            assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
            let (conn, _) = tokio::time::timeout(T, upstream.accept()).await.unwrap().unwrap();
            held.push(conn);
            clients.push(s);
        }
        // The proxy's task ends (its sandbox is gone) while both ends are still open: each
        // tunnel closes on both sides, not only the half the sandbox had.
        drop(proxy);
        for mut conn in held.into_iter().chain(clients) {
            let mut buf = [0u8; 16];
            match tokio::time::timeout(T, conn.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                Ok(Ok(n)) => panic!("{n} unexpected bytes"),
                Err(_) => panic!("a tunnel outlived the proxy task"),
            }
        }
    }

    #[tokio::test]
    async fn connect_to_an_unlisted_loopback_port_is_refused_without_connecting() {
        let (echo, _t) = echo_server().await;
        let trap = Tripwire::new();
        let proxy = start_proxy(&[format!("127.0.0.1:{}", echo.port())], FakeDns::default());

        let target = format!("127.0.0.1:{}", trap.port());
        let reply = exchange(proxy.addr, format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{reply}");
        assert!(
            reply.ends_with(&format!("\r\n\r\nmcpbox: CONNECT {target} denied by policy fetch.toml (network.allow)\n")),
            "{reply}"
        );
        trap.assert_untouched();
    }

    #[tokio::test]
    async fn an_unlisted_ip_literal_is_refused() {
        let trap = Tripwire::new();
        let proxy = start_proxy(&["api.example.com:443".to_string()], FakeDns::default());
        for target in [format!("127.0.0.1:{}", trap.port()), format!("[::1]:{}", trap.port()), "192.0.2.7:443".into()] {
            let reply = exchange(proxy.addr, format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await;
            assert!(reply.starts_with("HTTP/1.1 403 "), "{target}: {reply}");
            assert!(reply.contains(&format!("CONNECT {target} denied by policy fetch.toml")), "{reply}");
        }
        let reply =
            exchange(proxy.addr, format!("GET http://127.0.0.1:{}/ HTTP/1.1\r\n\r\n", trap.port()).as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 403 "), "{reply}");
        trap.assert_untouched();
        assert!(proxy.dns.asked().is_empty());
    }

    #[tokio::test]
    async fn record_mode_lets_public_targets_through_records_them_and_still_refuses_internal_ones() {
        let (echo, _t) = echo_server().await;
        let trap = Tripwire::new();
        let dns = FakeDns::with(&[
            ("pub.example", "1.1.1.1"),
            ("sneaky.example", "127.0.0.1"),
            ("meta.example", "169.254.169.254"),
        ]);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg =
            ProxyConfig::new(AllowList::parse(&[format!("127.0.0.1:{}", echo.port())]).unwrap(), "learn", "x");
        cfg.resolver = Arc::new(dns);
        cfg.connect_timeout = Duration::from_millis(300);
        #[derive(Default)]
        struct Seen(std::sync::Mutex<Vec<String>>);
        impl RecordConnect for Seen {
            fn connect(&self, target: &str) {
                self.0.lock().unwrap().push(target.to_string());
            }
        }
        let seen = Arc::new(Seen::default());
        cfg.record = Some(seen.clone());
        let task = tokio::spawn(serve(listener, Arc::new(cfg)));
        // Internal addresses, by name or literal: refused, never contacted, not recorded.
        for target in [
            format!("sneaky.example:{}", trap.port()),
            format!("127.0.0.1:{}", trap.port()),
            "meta.example:80".to_string(),
            "10.1.2.3:443".to_string(),
        ] {
            let reply = exchange(addr, format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await;
            assert!(reply.starts_with("HTTP/1.1 403 "), "{target}: {reply}");
        }
        trap.assert_untouched();
        // A public name passes the checks (the connect itself may fail offline) and is recorded;
        // so is what the allow-list names.
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"CONNECT pub.example:443 HTTP/1.1\r\n\r\n").await.unwrap();
        let mut head = vec![0u8; 9];
        tokio::time::timeout(T, sock.read_exact(&mut head)).await.unwrap().unwrap();
        assert_eq!(&head, b"HTTP/1.1 ", "an answer, whichever (offline: 502/504)");
        let target = format!("127.0.0.1:{}", echo.port());
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
        let mut head = vec![0u8; 12];
        tokio::time::timeout(T, sock.read_exact(&mut head)).await.unwrap().unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        let mut got = seen.0.lock().unwrap().clone();
        got.sort();
        got.dedup();
        assert_eq!(got, vec![target, "pub.example:443".to_string()]);
        task.abort();
    }

    #[tokio::test]
    async fn a_denied_name_is_refused_before_any_dns_lookup() {
        let proxy =
            start_proxy(&["api.example.com:443".to_string()], FakeDns::with(&[("denied.invalid", "127.0.0.1")]));
        let started = Instant::now();
        let reply =
            exchange(proxy.addr, b"CONNECT denied.invalid:443 HTTP/1.1\r\nHost: denied.invalid:443\r\n\r\n").await;
        let plain = exchange(proxy.addr, b"GET http://denied.invalid/x HTTP/1.1\r\nHost: denied.invalid\r\n\r\n").await;
        let elapsed = started.elapsed();
        assert!(reply.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{reply}");
        assert!(
            reply.ends_with("mcpbox: CONNECT denied.invalid:443 denied by policy fetch.toml (network.allow)\n"),
            "{reply}"
        );
        assert!(
            plain.ends_with("mcpbox: GET denied.invalid:80 denied by policy fetch.toml (network.allow)\n"),
            "{plain}"
        );
        assert!(proxy.dns.asked().is_empty(), "a denied name reached DNS: {:?}", proxy.dns.asked());
        assert!(elapsed < Duration::from_millis(500), "denial took {elapsed:?}");
    }

    #[tokio::test]
    async fn a_wildcard_name_that_resolves_to_loopback_is_refused() {
        let trap = Tripwire::new();
        let port = trap.port();
        let proxy = start_proxy(
            &[format!("*.example.com:{port}")],
            FakeDns::with(&[("rebind.example.com", "93.184.216.34"), ("rebind.example.com", "127.0.0.1")]),
        );
        let reply =
            exchange(proxy.addr, format!("CONNECT rebind.example.com:{port} HTTP/1.1\r\n\r\n").as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 403 "), "{reply}");
        assert!(reply.contains("resolves to a non-public address"), "{reply}");
        assert_eq!(proxy.dns.asked(), vec!["rebind.example.com".to_string()]);
        trap.assert_untouched();
    }

    #[tokio::test]
    async fn an_exact_name_entry_may_resolve_to_a_private_address() {
        // An internal service by name (`db.internal:5432`): the policy lets it through.
        let proxy =
            start_proxy(&["svc.internal:5432".to_string()], FakeDns::with(&[("svc.internal", "10.255.255.254")]));
        let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
        sock.write_all(b"CONNECT svc.internal:5432 HTTP/1.1\r\n\r\n").await.unwrap();
        let mut head = vec![0u8; 12];
        tokio::time::timeout(T, sock.read_exact(&mut head)).await.unwrap().unwrap();
        // Not refused by the policy: connected, or the gateway's error where nothing answers.
        assert!(head != b"HTTP/1.1 403", "{}", String::from_utf8_lossy(&head));
        assert!(head.starts_with(b"HTTP/1.1 "), "{}", String::from_utf8_lossy(&head));
        assert_eq!(proxy.dns.asked(), vec!["svc.internal".to_string()]);
    }

    #[tokio::test]
    async fn an_exact_name_never_leads_to_loopback_or_link_local_but_a_listed_address_does() {
        let trap = Tripwire::new();
        let port = trap.port();
        for (name, addr) in [
            ("local.example", "127.0.0.1"),
            ("meta.example", "169.254.169.254"),
            ("v6local.example", "::1"),
            ("mapped.example", "::ffff:127.0.0.1"),
            ("zero.example", "0.0.0.0"),
        ] {
            let proxy = start_proxy(&[format!("{name}:{port}")], FakeDns::with(&[(name, addr)]));
            let reply = exchange(proxy.addr, format!("CONNECT {name}:{port} HTTP/1.1\r\n\r\n").as_bytes()).await;
            assert!(reply.starts_with("HTTP/1.1 403 "), "{name} -> {addr}: {reply}");
            assert!(reply.contains("list the address itself"), "{reply}");
        }
        trap.assert_untouched();
        // The address itself, listed, is reachable.
        let (echo, _t) = echo_server().await;
        let proxy = start_proxy(&[format!("127.0.0.1:{}", echo.port())], FakeDns::default());
        let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
        sock.write_all(format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", echo.port()).as_bytes()).await.unwrap();
        let mut head = vec![0u8; 12];
        tokio::time::timeout(T, sock.read_exact(&mut head)).await.unwrap().unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
    }

    #[test]
    fn embedded_ipv4_forms_are_judged_as_their_ipv4_address() {
        let v4 = |s: &str| embedded_v4(s.parse().unwrap());
        let ip = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        // Each form, with an internal and a public address inside.
        for (v6, inside, internal) in [
            ("::ffff:127.0.0.1", "127.0.0.1", true),
            ("::ffff:93.184.216.34", "93.184.216.34", false),
            ("::7f00:1", "127.0.0.1", true),
            ("::5db8:d822", "93.184.216.34", false),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254", true),
            ("64:ff9b::5db8:d822", "93.184.216.34", false),
            ("2002:c0a8:101::1", "192.168.1.1", true),
            ("2002:5db8:d822:1::2", "93.184.216.34", false),
        ] {
            assert_eq!(v4(v6), ip(inside), "{v6}");
            assert_eq!(is_internal(v6.parse().unwrap()), internal, "{v6} internal");
            assert_eq!(is_public(v6.parse().unwrap()), !internal, "{v6} public");
        }
        // Near misses carry none: NAT64 outside the well-known /96, a 6to4 look-alike.
        for v6 in ["64:ff9b:1::a00:1", "2003:c0a8:101::1", "2606:4700::1111", "::1:ffff:7f00:1"] {
            assert_eq!(v4(v6), None, "{v6}");
        }
    }

    #[test]
    fn internal_addresses() {
        for a in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        for a in ["93.184.216.34", "203.0.113.80", "198.18.0.1", "2606:4700::1111", "::ffff:93.184.216.34"] {
            assert!(!is_internal(a.parse().unwrap()), "{a}");
        }
    }

    /// The prepare sandboxes' proxy: an exact entry (a registry's host) that resolves to
    /// loopback, link-local or private addresses, and a listed non-public IP literal, are refused
    /// after resolution, without connecting.
    #[tokio::test]
    async fn a_refuse_internal_proxy_refuses_every_non_public_address() {
        let trap = Tripwire::new();
        let port = trap.port();
        let allow = [
            format!("registry.test:{port}"),
            format!("meta.test:{port}"),
            format!("lan.test:{port}"),
            format!("127.0.0.1:{port}"),
        ];
        let dns = FakeDns::with(&[
            ("registry.test", "93.184.216.34"),
            ("registry.test", "127.0.0.1"),
            ("meta.test", "169.254.169.254"),
            ("lan.test", "10.1.2.3"),
        ]);
        let proxy = start_proxy_with(&allow, dns, true);
        for target in ["registry.test", "meta.test", "lan.test", "127.0.0.1"] {
            let reply = exchange(proxy.addr, format!("CONNECT {target}:{port} HTTP/1.1\r\n\r\n").as_bytes()).await;
            assert!(
                reply.starts_with("HTTP/1.1 403 ") && reply.contains("not reachable from here"),
                "{target}: {reply}"
            );
            let reply = exchange(
                proxy.addr,
                format!("GET http://{target}:{port}/x HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
            )
            .await;
            assert!(reply.starts_with("HTTP/1.1 403 "), "plain GET {target}: {reply}");
        }
        assert_eq!(proxy.dns.asked().len(), 6, "names are judged after resolution: {:?}", proxy.dns.asked());
        trap.assert_untouched();
    }

    #[tokio::test]
    async fn an_unreachable_allowed_target_is_a_bad_gateway() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        }; // closed again: nothing listens there
        let proxy = start_proxy(&[format!("127.0.0.1:{port}")], FakeDns::default());
        let reply = exchange(proxy.addr, format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 502 "), "{reply}");
    }

    // --- plain requests -------------------------------------------------------------------------

    #[tokio::test]
    async fn a_plain_get_is_forwarded_in_origin_form_and_the_body_relayed() {
        let (origin, seen) = http_origin(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 17\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n\r\nhello from origin",
        )
        .await;
        let proxy = start_proxy(&[format!("127.0.0.1:{}", origin.port())], FakeDns::default());
        let request = format!(
            "GET http://127.0.0.1:{}/some/path?q=1#frag HTTP/1.1\r\nHost: wrong.example\r\nUser-Agent: t\r\n\
             Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\n\
             X-Hop: 1\r\nAccept: */*\r\n\r\n",
            origin.port()
        );
        let reply = exchange(proxy.addr, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nhello from origin"), "{reply}");
        assert!(reply.contains("\r\nConnection: close\r\n"), "{reply}");
        assert!(!reply.to_ascii_lowercase().contains("keep-alive"), "hop-by-hop response headers stripped: {reply}");

        let seen = tokio::time::timeout(T, seen).await.unwrap().unwrap();
        let lower = seen.to_ascii_lowercase();
        assert!(seen.starts_with("GET /some/path?q=1 HTTP/1.1\r\n"), "origin-form, fragment dropped: {seen}");
        assert!(seen.contains(&format!("\r\nHost: 127.0.0.1:{}\r\n", origin.port())), "Host is the URL's: {seen}");
        assert!(seen.contains("\r\nUser-Agent: t\r\n") && seen.contains("\r\nAccept: */*\r\n"), "{seen}");
        assert!(seen.contains("\r\nConnection: close\r\n"), "{seen}");
        for gone in ["proxy-authorization", "proxy-connection", "keep-alive", "x-hop", "wrong.example"] {
            assert!(!lower.contains(gone), "{gone} must not reach the origin: {seen}");
        }
    }

    #[tokio::test]
    async fn a_plain_post_carries_its_body_and_a_chunked_response_comes_back_whole() {
        let (origin, seen) = http_origin(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
        let proxy = start_proxy(&[format!("127.0.0.1:{}", origin.port())], FakeDns::default());
        let request = format!(
            "POST http://127.0.0.1:{}/submit HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{{\"a\":\"body\"}}",
            origin.port()
        );
        let reply = exchange(proxy.addr, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"), "{reply}");
        assert!(reply.contains("Transfer-Encoding: chunked\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "{reply}");
        let seen = tokio::time::timeout(T, seen).await.unwrap().unwrap();
        assert!(seen.starts_with("POST /submit HTTP/1.1\r\n"), "{seen}");
        assert!(seen.ends_with("\r\n\r\n{\"a\":\"body\"}"), "{seen}");
    }

    // --- malformed and oversized input ----------------------------------------------------------

    #[tokio::test]
    async fn bad_requests_get_400_and_huge_heads_431() {
        let trap = Tripwire::new();
        let proxy = start_proxy(&[format!("127.0.0.1:{}", trap.port())], FakeDns::default());
        let cases: Vec<(String, &str)> = vec![
            ("NOT HTTP AT ALL\r\n\r\n".into(), "400"),
            ("GET /relative HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
            ("GET https://example.com/ HTTP/1.1\r\n\r\n".into(), "400"),
            ("CONNECT example.com HTTP/1.1\r\n\r\n".into(), "400"),
            ("CONNECT 127.1:80 HTTP/1.1\r\n\r\n".into(), "400"),
            (format!("GET http://user:pw@127.0.0.1:{}/ HTTP/1.1\r\n\r\n", trap.port()), "400"),
            (
                format!(
                    "POST http://127.0.0.1:{}/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                    trap.port()
                ),
                "400",
            ),
            (format!("GET http://127.0.0.1:{}/ HTTP/1.1\r\nX-Big: {}\r\n\r\n", trap.port(), "a".repeat(20_000)), "431"),
        ];
        for (req, code) in cases {
            let reply = exchange(proxy.addr, req.as_bytes()).await;
            assert!(reply.starts_with(&format!("HTTP/1.1 {code} ")), "{req:.80} → {reply}");
        }
        trap.assert_untouched();
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_head_is_cut_off() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = ProxyConfig::new(AllowList::default(), "p.toml", "s");
        cfg.header_timeout = Duration::from_millis(200);
        let task = tokio::spawn(serve(listener, Arc::new(cfg)));
        let started = Instant::now();
        let reply = exchange(addr, b"CONNECT a.example.com:443 HTTP/1.1\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
        assert!(started.elapsed() < Duration::from_secs(2));
        task.abort();
    }

    // --- connection caps ----------------------------------------------------------------------

    /// A proxy allowing `echo`, serving at most `max` connections, drawing from `shared`.
    fn start_capped(
        echo: SocketAddr,
        max: usize,
        shared: Option<SharedBudget>,
        denials: Option<Arc<crate::denials::ServerDenials>>,
    ) -> (SocketAddr, JoinHandle<io::Result<()>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = ProxyConfig::new(list(&[&echo.to_string()]).unwrap(), "fetch.toml", "fetch");
        cfg.max_connections = max;
        cfg.shared = shared;
        cfg.denials = denials;
        (addr, tokio::spawn(serve(listener, Arc::new(cfg))))
    }

    /// A CONNECT tunnel to the echo server through `proxy`, checked to carry bytes; or the
    /// proxy's whole answer when it refuses. Either comes within `T`.
    async fn tunnel(proxy: SocketAddr, echo: SocketAddr) -> Result<TcpStream, String> {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let expect = b"HTTP/1.1 200 Connection established\r\n\r\n";
        // The head is sent only once the proxy had its chance to refuse without reading it, as
        // a refusal does not wait for it: a client whose head arrives after that sees the
        // connection closed (or reset) instead of the 503.
        let mut first = vec![0u8; expect.len()];
        match tokio::time::timeout(Duration::from_millis(100), s.peek(&mut first)).await {
            Err(_) => {}
            Ok(_) => {
                let mut out = Vec::new();
                tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("refusal in time").unwrap();
                return Err(String::from_utf8_lossy(&out).into_owned());
            }
        }
        s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes()).await.unwrap();
        let mut got = vec![0u8; expect.len()];
        tokio::time::timeout(T, s.read_exact(&mut got)).await.expect("answer in time").unwrap();
        assert_eq!(&got, expect);
        assert_echoes(&mut s).await;
        Ok(s)
    }

    async fn assert_echoes(s: &mut TcpStream) {
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(T, s.read_exact(&mut back)).await.expect("echo in time").unwrap();
        assert_eq!(&back, b"ping");
    }

    /// The refusal `tunnel` got: a prompt 503 naming `cap`.
    async fn assert_refused(proxy: SocketAddr, echo: SocketAddr, cap: &str) {
        let started = Instant::now();
        let reply = tunnel(proxy, echo).await.expect_err("a connection over the cap was served");
        assert!(reply.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{reply}");
        assert!(reply.contains(cap), "{cap:?} not in {reply}");
        assert!(started.elapsed() < Duration::from_secs(1), "refused only after {:?}", started.elapsed());
    }

    /// Opens a tunnel, retrying while the proxy still counts a connection that was just closed.
    async fn tunnel_when_free(proxy: SocketAddr, echo: SocketAddr) -> TcpStream {
        let started = Instant::now();
        loop {
            match tunnel(proxy, echo).await {
                Ok(s) => return s,
                Err(reply) if started.elapsed() < T => {
                    assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(reply) => panic!("no place came free: {reply}"),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_over_the_sandbox_cap_is_refused_at_once_and_one_closing_makes_room() {
        let (echo, _e) = echo_server().await;
        let denials = Arc::new(crate::denials::ServerDenials::new("fetch", None));
        let (proxy, _task) = start_capped(echo, 3, None, Some(denials.clone()));
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(tunnel(proxy, echo).await.expect("under the cap"));
        }
        assert_refused(proxy, echo, "maximum of 3 proxied connections at once (mcpbox.maxEgressConnections)").await;
        assert_refused(proxy, echo, "maxEgressConnections").await;
        // Recorded as egress denials, not as a target to allow.
        let egress = denials.totals().into_iter().find(|(l, _)| *l == crate::denials::Layer::Egress).unwrap().1;
        assert_eq!(egress, 2);
        let rec = denials.recent();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!((rec[0].denial.access.as_str(), rec[0].count), ("accept", 2));
        assert!(rec[0].denial.object.contains("mcpbox.maxEgressConnections"), "{rec:?}");
        // The open tunnels were not disturbed; one closing makes room for one more, no more.
        for s in &mut open {
            assert_echoes(s).await;
        }
        drop(open.pop());
        open.push(tunnel_when_free(proxy, echo).await);
        assert_refused(proxy, echo, "maxEgressConnections").await;
    }

    #[tokio::test]
    async fn proxies_sharing_a_budget_stay_within_it_and_a_full_sandbox_leaves_the_other_room() {
        let (echo, _e) = echo_server().await;
        let shared = SharedBudget::new(5);
        let (a, _ta) = start_capped(echo, 3, Some(shared.clone()), None);
        let (b, _tb) = start_capped(echo, 3, Some(shared.clone()), None);
        // A spends its own cap: refused by it, and B can still connect.
        let mut held_a = Vec::new();
        for _ in 0..3 {
            held_a.push(tunnel(a, echo).await.expect("A under its cap"));
        }
        assert_refused(a, echo, "maxEgressConnections").await;
        assert_eq!(shared.in_use(), 3);
        let mut held_b = vec![tunnel(b, echo).await.expect("B with A at its cap")];
        held_b.push(tunnel(b, echo).await.expect("B's second, the budget's fifth"));
        assert_eq!(shared.in_use(), 5);
        // The budget is spent: B is refused under its own cap, by the budget.
        assert_refused(b, echo, "egress proxies of all servers hold their maximum of 5").await;
        assert_refused(a, echo, "maxEgressConnections").await;
        assert_eq!(shared.in_use(), 5);
        // One of A's closing gives the budget a place, which B takes: B's refusal by the
        // budget did not keep one of B's own places (B now reaches exactly its cap of 3).
        drop(held_a.pop());
        held_b.push(tunnel_when_free(b, echo).await);
        assert_eq!(shared.in_use(), 5);
        assert_refused(b, echo, "maxEgressConnections").await;
        for s in held_a.iter_mut().chain(held_b.iter_mut()) {
            assert_echoes(s).await;
        }
        drop(held_a);
        drop(held_b);
        let started = Instant::now();
        while shared.in_use() > 0 {
            assert!(started.elapsed() < T, "places not given back: {shared:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
