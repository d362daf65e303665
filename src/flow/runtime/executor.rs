//! Executors: what runs a step's action. Remote ones (HTTP, Rust functions, your
//! own [`TaskExecutor`]) run outside any transaction, at least once; SQL and NATS
//! actions are completed inside the transaction that records the step's success.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
#[cfg(any(feature = "http", feature = "grpc"))]
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use super::transition::{BoundStatement, SqlWork};
use crate::flow::model::definition::Action;
use crate::flow::model::events::{Phase, StepId};
use crate::flow::model::failure::TaskError;
use crate::flow::model::template::{self, Context};

/// The executor kinds this build runs (`http` needs the `http` feature).
pub(crate) const AVAILABLE: &[&str] = &[
    #[cfg(feature = "http")]
    "http",
    "sql",
    "nats",
    "amqp",
    #[cfg(feature = "grpc")]
    "grpc",
    "rust",
];

/// Everything an attempt knows.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TaskContext {
    /// The instance.
    pub instance: Uuid,
    /// The flow's name.
    pub flow: String,
    /// The step (task, participant, phase).
    pub step: StepId,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// `<instance>/<task>[.<participant>]/<phase>`: the same on every attempt of
    /// the step; send it so the receiver can deduplicate.
    pub idempotency_key: String,
    /// The task's input, templates resolved.
    pub input: Value,
    /// The flow instance's input.
    pub flow_input: Value,
    /// Outputs of the tasks done so far.
    pub outputs: BTreeMap<String, Value>,
    /// The instance's business key.
    pub business_key: Option<String>,
    /// The attempt's W3C trace context (`00-<instance>-<span>-01`): HTTP tasks
    /// send it as the `traceparent` header, NATS and AMQP messages carry it as
    /// a header; pass it on from a Rust task so that a trace crosses services.
    pub traceparent: String,
    /// A `for_each` task's item and its index (from 0).
    pub item: Option<(Value, u32)>,
}

impl TaskContext {
    /// The phase of this attempt.
    pub fn phase(&self) -> Phase {
        self.step.phase
    }
}

/// Runs a step's action outside the store's transaction. Implemented for async
/// closures `Fn(TaskContext) -> Future<Output = Result<Value, TaskError>>`; register
/// one with [`Flows::function`](crate::flow::Flows::function) and name it in an
/// `executor: rust` action.
pub trait TaskExecutor: Send + Sync + 'static {
    /// Runs one attempt; the value is the step's output.
    fn execute(&self, ctx: TaskContext) -> impl Future<Output = Result<Value, TaskError>> + Send;
}

impl<F, Fut> TaskExecutor for F
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    fn execute(&self, ctx: TaskContext) -> impl Future<Output = Result<Value, TaskError>> + Send {
        self(ctx)
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A [`TaskExecutor`] behind a pointer.
pub(crate) trait Erased: Send + Sync {
    fn call(self: Arc<Self>, ctx: TaskContext) -> BoxFuture<Result<Value, TaskError>>;
}

impl<T: TaskExecutor> Erased for T {
    fn call(self: Arc<Self>, ctx: TaskContext) -> BoxFuture<Result<Value, TaskError>> {
        Box::pin(async move { self.execute(ctx).await })
    }
}

/// What an attempt produced.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Done remotely: record the output.
    Output(Value),
    /// Run these statements in the completion transaction.
    Sql(Vec<BoundStatement>),
    /// Append this message for the outbox with the completion.
    Message { subject: String, payload: Value },
    /// A child instance started (a `flow` task): wait for its end.
    Child(uuid::Uuid),
    /// Append this AMQP message for the outbox with the completion.
    AmqpMessage {
        exchange: String,
        routing_key: String,
        payload: Value,
    },
}

fn render_err(e: String) -> TaskError {
    TaskError::fatal(e).code("template")
}

/// Resolves an action into an effect, running it if it is remote.
pub(crate) async fn run(
    action: &Action,
    ctx: TaskContext,
    #[cfg(feature = "http")] http: &HttpTasks,
    #[cfg(feature = "grpc")] grpc: (&super::grpc::GrpcTasks, &SharedPolicy, Duration),
    functions: Option<Arc<dyn Erased>>,
) -> Result<Effect, TaskError> {
    let instance = ctx.instance.to_string();
    let t = Context {
        flow_input: &ctx.flow_input,
        outputs: &ctx.outputs,
        input: Some(&ctx.input),
        instance: &instance,
        idempotency_key: &ctx.idempotency_key,
        business_key: ctx.business_key.as_deref(),
        item: ctx.item.as_ref().map(|(v, i)| (v, *i)),
    };
    match action {
        Action::Rust { function } => match functions {
            Some(f) => f.call(ctx).await.map(Effect::Output),
            None => Err(
                TaskError::fatal(format!("rust function {function:?} is not registered"))
                    .code("unregistered"),
            ),
        },
        Action::Sql { statements } => {
            let mut out = Vec::with_capacity(statements.len());
            for s in statements {
                let params = s
                    .params
                    .iter()
                    .map(|p| {
                        Ok(match template::render(p, &t)? {
                            Value::Null => None,
                            Value::String(s) => Some(s),
                            other => Some(other.to_string()),
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(render_err)?;
                out.push(BoundStatement {
                    sql: s.sql.clone(),
                    params,
                });
            }
            Ok(Effect::Sql(out))
        }
        Action::Amqp {
            exchange,
            routing_key,
            payload,
        } => Ok(Effect::AmqpMessage {
            exchange: template::render_text(exchange, &t).map_err(render_err)?,
            routing_key: template::render_text(routing_key, &t).map_err(render_err)?,
            payload: template::render(payload, &t).map_err(render_err)?,
        }),
        Action::Nats { subject, payload } => Ok(Effect::Message {
            subject: template::render_text(subject, &t).map_err(render_err)?,
            payload: template::render(payload, &t).map_err(render_err)?,
        }),
        #[cfg(not(feature = "grpc"))]
        Action::Grpc { .. } => Err(TaskError::fatal(
            "this build of dcbflow has no gRPC executor (feature `grpc`)",
        )
        .code("unavailable")),
        #[cfg(feature = "grpc")]
        Action::Grpc {
            endpoint,
            method,
            descriptor_set,
            message,
            metadata,
        } => {
            let endpoint = template::render_text(endpoint, &t).map_err(render_err)?;
            let metadata = metadata
                .iter()
                .map(|(k, v)| Ok((k.clone(), template::render_text(v, &t)?)))
                .collect::<Result<Vec<_>, String>>()
                .map_err(render_err)?;
            let message = template::render(message, &t).map_err(render_err)?;
            let (tasks, policy, timeout) = grpc;
            tasks
                .call(
                    policy,
                    super::grpc::Call {
                        endpoint: &endpoint,
                        method,
                        descriptor_set,
                        message,
                        metadata,
                        idempotency_key: &ctx.idempotency_key,
                        traceparent: &ctx.traceparent,
                        timeout,
                    },
                )
                .await
                .map(Effect::Output)
        }
        #[cfg(not(feature = "http"))]
        Action::Http { .. } => Err(TaskError::fatal(
            "this build of dcbflow has no HTTP executor (feature `http`)",
        )
        .code("unavailable")),
        #[cfg(feature = "http")]
        Action::Http {
            method,
            url,
            headers,
            body,
        } => {
            let url = template::render_url(url, &t).map_err(render_err)?;
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
                .map_err(|e| TaskError::fatal(e.to_string()).code("http_method"))?;
            let mut header_map = reqwest::header::HeaderMap::new();
            for (name, value) in headers {
                let value = template::render_text(value, &t).map_err(render_err)?;
                // The value may be a secret: no error names it.
                let name =
                    reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        TaskError::fatal(format!("invalid header name {name:?}"))
                            .code("http_header")
                    })?;
                let value = reqwest::header::HeaderValue::from_str(&value).map_err(|_| {
                    TaskError::fatal(format!(
                        "the value of header {name} is not a valid header value"
                    ))
                    .code("http_header")
                })?;
                header_map.append(name, value);
            }
            let body = match body {
                Some(b) => Some(template::render(b, &t).map_err(render_err)?),
                None => None,
            };
            if !header_map.contains_key("traceparent")
                && let Ok(v) = reqwest::header::HeaderValue::from_str(&ctx.traceparent)
            {
                header_map.insert("traceparent", v);
            }
            http.call(method, &url, &ctx.idempotency_key, header_map, body)
                .await
                .map(Effect::Output)
        }
    }
}

/// Which targets HTTP tasks may call: the guard against server-side request
/// forgery, where a flow's input (or an upstream task's output) steers a task at
/// a service inside the network: the cloud metadata endpoint, an admin port on
/// loopback, a database on a private address.
///
/// Set it with [`Flows::http_policy`](crate::flow::Flows::http_policy). The default,
/// [`HttpPolicy::default`], lets tasks call public addresses only:
///
/// | target | default | allowed by |
/// |---|---|---|
/// | public addresses | allowed | [`allow_public`](Self::allow_public) (`false` in [`deny_all`](Self::deny_all)) |
/// | loopback: `127.0.0.0/8`, `::1` (and so `localhost`) | refused | [`allow_loopback`](Self::allow_loopback) |
/// | private: `10/8`, `172.16/12`, `192.168/16`, `100.64/10`, `fc00::/7`, `fec0::/10` | refused | [`allow_private`](Self::allow_private) |
/// | link-local: `169.254/16`, `fe80::/10` | refused | an explicit [`allow_network`](Self::allow_network) or [`allow_host`](Self::allow_host) |
/// | cloud metadata: `169.254.169.254`, `fd00:ec2::254`, `100.100.100.200` | refused | an explicit [`allow_network`](Self::allow_network) or [`allow_host`](Self::allow_host) |
/// | everything else: `0.0.0.0/8`, `::`, multicast, broadcast, documentation, benchmarking and reserved ranges | refused | an explicit [`allow_network`](Self::allow_network) or [`allow_host`](Self::allow_host) |
///
/// IPv4 addresses inside IPv6 ones (`::ffff:127.0.0.1`, NAT64 `64:ff9b::/96`,
/// 6to4 `2002::/16`) count as the IPv4 address they carry. Only `http` and `https`
/// URLs are called.
///
/// The check runs on every call, after the URL's templates are rendered: the
/// host is resolved and **every** address it resolves to must be allowed, and the
/// engine's own HTTP client (the one [`Flows::new`](crate::flow::Flows::new)
/// builds) checks again the addresses it connects to and every redirect, so
/// neither a DNS name that changes its answer nor a redirect gets around it. A
/// client given with [`Flows::with_http_client`](crate::flow::Flows::with_http_client)
/// resolves names itself and follows redirects by its own policy: the target is
/// checked before the call and the final URL after it (a response from a
/// refused one is discarded), but build such a client with
/// `.redirect(reqwest::redirect::Policy::none())` to be sure no request reaches a
/// refused target. A refused call fails, without being sent, with the fatal
/// [`TaskError`] code `http_forbidden` saying which address was refused and why.
///
/// A host allowed by name ([`allow_host`](Self::allow_host), optionally with a
/// port) is called whatever it resolves to: allow internal services by name.
///
/// It also bounds what a task reads: a response body above
/// [`max_response_bytes`](Self::max_response_bytes) (1 MiB) fails the attempt with
/// the fatal code `http_too_large`.
///
/// ```
/// use dcbflow::flow::HttpPolicy;
///
/// // Public addresses, plus two internal services.
/// let policy = HttpPolicy::default()
///     .allow_host_port("payments.internal", 8443)
///     .allow("10.20.0.0/16")
///     .unwrap();
/// // Only the listed hosts: nothing else, public or not.
/// let strict = HttpPolicy::deny_all().allow_host("api.partner.example");
/// // Tests against a local server.
/// let local = HttpPolicy::default().allow_loopback(true);
/// # let _ = (policy, strict, local);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPolicy {
    public: bool,
    loopback: bool,
    private: bool,
    hosts: Vec<HostRule>,
    networks: Vec<Network>,
    max_response_bytes: usize,
}

/// What [`HttpPolicy::allow`] could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid HTTP allow-list entry {entry:?}: {reason}")]
pub struct HttpRuleError {
    /// The entry.
    pub entry: String,
    /// What is wrong with it.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRule {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// A name, lowercase, without a trailing dot.
    Name(String),
    /// `*.suffix`: any name ending in `.suffix` (not `suffix` itself).
    Suffix(String),
    Ip(IpAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// What an address is, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressClass {
    Public,
    Loopback,
    Private,
    LinkLocal,
    Metadata,
    Special,
}

impl AddressClass {
    fn describe(self) -> &'static str {
        match self {
            AddressClass::Public => "a public address",
            AddressClass::Loopback => "a loopback address",
            AddressClass::Private => "a private address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Metadata => "a cloud metadata address",
            AddressClass::Special => "a special-purpose address",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            AddressClass::Public => "allow_public(true), allow_host or allow_network",
            AddressClass::Loopback => "allow_loopback(true), allow_host or allow_network",
            AddressClass::Private => "allow_private(true), allow_host or allow_network",
            _ => "allow_host or allow_network",
        }
    }
}

/// The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4), if any.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = |a: u16, b: u16| Ipv4Addr::from((u32::from(a) << 16) | u32::from(b));
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(low(s[1], s[2]));
    }
    None
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        AddressClass::Metadata
    } else if a == 127 {
        AddressClass::Loopback
    } else if a == 10
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 100 && (64..128).contains(&b))
    {
        AddressClass::Private
    } else if a == 169 && b == 254 {
        AddressClass::LinkLocal
    } else if a == 0
        || a >= 224
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 192 && b == 88 && c == 99)
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        AddressClass::Special
    } else {
        AddressClass::Public
    }
}

fn classify(ip: IpAddr) -> AddressClass {
    let v6 = match ip {
        IpAddr::V4(v4) => return classify_v4(v4),
        IpAddr::V6(v6) => v6,
    };
    if let Some(v4) = embedded_v4(v6) {
        return classify_v4(v4);
    }
    let s = v6.segments();
    if v6 == Ipv6Addr::LOCALHOST {
        AddressClass::Loopback
    } else if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        AddressClass::Metadata
    } else if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 || s[..3] == [0x64, 0xff9b, 1] {
        AddressClass::Private
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if s[0] & 0xe000 != 0x2000 || s[0] == 0x2001 && s[1] < 0x200 || s[..2] == [0x2001, 0xdb8]
    {
        // Outside global unicast 2000::/3 (including ::, ::/96, 100::/64,
        // multicast), IETF protocol assignments 2001::/23, documentation.
        AddressClass::Special
    } else {
        AddressClass::Public
    }
}

/// `host` as the policy compares it: lowercase, without brackets or a trailing dot.
#[cfg_attr(not(feature = "http"), allow(dead_code))]
fn normalize_host(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn parse_host_pattern(host: &str) -> HostPattern {
    let host = normalize_host(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        HostPattern::Ip(ip)
    } else if let Some(suffix) = host.strip_prefix("*.") {
        HostPattern::Suffix(suffix.to_owned())
    } else {
        HostPattern::Name(host)
    }
}

impl Default for HttpPolicy {
    /// Public addresses only (see the table above); 1 MiB responses.
    fn default() -> Self {
        HttpPolicy {
            public: true,
            loopback: false,
            private: false,
            hosts: Vec::new(),
            networks: Vec::new(),
            max_response_bytes: 1024 * 1024,
        }
    }
}

impl HttpPolicy {
    /// The default policy: public addresses only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A strict allow-list: no target at all, not even public ones, except the
    /// hosts and networks then allowed.
    pub fn deny_all() -> Self {
        HttpPolicy {
            public: false,
            ..Self::default()
        }
    }

    /// Whether public addresses may be called (default `true`).
    #[must_use]
    pub fn allow_public(mut self, allow: bool) -> Self {
        self.public = allow;
        self
    }

    /// Whether loopback addresses (`127.0.0.0/8`, `::1`, and so `localhost`) may
    /// be called (default `false`; tests against a local server set it).
    #[must_use]
    pub fn allow_loopback(mut self, allow: bool) -> Self {
        self.loopback = allow;
        self
    }

    /// Whether private addresses (`10/8`, `172.16/12`, `192.168/16`, `100.64/10`,
    /// `fc00::/7`, `fec0::/10`) may be called (default `false`). Link-local and
    /// metadata addresses stay refused.
    #[must_use]
    pub fn allow_private(mut self, allow: bool) -> Self {
        self.private = allow;
        self
    }

    /// Allows `host` on any port, whatever it resolves to: a name
    /// (case-insensitive; `*.example.com` allows every name under `example.com`)
    /// or an IP address.
    #[must_use]
    pub fn allow_host(mut self, host: &str) -> Self {
        self.hosts.push(HostRule {
            host: parse_host_pattern(host),
            port: None,
        });
        self
    }

    /// Allows `host` (as in [`allow_host`](Self::allow_host)) on `port` only.
    #[must_use]
    pub fn allow_host_port(mut self, host: &str, port: u16) -> Self {
        self.hosts.push(HostRule {
            host: parse_host_pattern(host),
            port: Some(port),
        });
        self
    }

    /// Allows every address in the network `addr/prefix` (any port).
    ///
    /// # Panics
    /// If `prefix` is longer than the address (32 for IPv4, 128 for IPv6).
    #[must_use]
    pub fn allow_network(mut self, addr: IpAddr, prefix: u8) -> Self {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        assert!(prefix <= max, "prefix /{prefix} is longer than {addr}");
        self.networks.push(Network { addr, prefix });
        self
    }

    /// Allows one entry of a configuration's allow-list: `host`, `host:port`,
    /// `*.domain`, an IP address (`10.0.0.5`, `::1`, `[::1]:8080`) or a network in
    /// CIDR notation (`10.0.0.0/8`, `fd00::/8`).
    ///
    /// # Errors
    /// An entry that is none of these.
    pub fn allow(self, entry: &str) -> Result<Self, HttpRuleError> {
        let bad = |reason: &str| HttpRuleError {
            entry: entry.to_owned(),
            reason: reason.to_owned(),
        };
        let e = entry.trim();
        if e.is_empty() {
            return Err(bad("empty"));
        }
        if let Some((addr, prefix)) = e.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP network"))?;
            let prefix: u8 = prefix.parse().map_err(|_| bad("not a prefix length"))?;
            if prefix > if addr.is_ipv4() { 32 } else { 128 } {
                return Err(bad("prefix longer than the address"));
            }
            return Ok(self.allow_network(addr, prefix));
        }
        if let Ok(ip) = e.parse::<IpAddr>() {
            return Ok(self.allow_host(&ip.to_string()));
        }
        let port = |p: &str| p.parse::<u16>().map_err(|_| bad("not a port"));
        let (host, port) = if let Some(rest) = e.strip_prefix('[') {
            // `[v6]` or `[v6]:port`.
            let Some((v6, after)) = rest.split_once(']') else {
                return Err(bad("unclosed ["));
            };
            if v6.parse::<Ipv6Addr>().is_err() {
                return Err(bad("not an IPv6 address"));
            }
            match after.strip_prefix(':') {
                Some(p) => (v6, Some(port(p)?)),
                None if after.is_empty() => (v6, None),
                None => return Err(bad("not a host name, an IP address or a network")),
            }
        } else {
            let (host, p) = match e.rsplit_once(':') {
                Some((h, p)) => (h, Some(port(p)?)),
                None => (e, None),
            };
            let name = host.strip_prefix("*.").unwrap_or(host);
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            if !valid {
                return Err(bad("not a host name, an IP address or a network"));
            }
            (host, p)
        };
        Ok(match port {
            Some(p) => self.allow_host_port(host, p),
            None => self.allow_host(host),
        })
    }

    /// The largest response body a task reads (default 1 MiB); beyond it the
    /// attempt fails with the fatal code `http_too_large`.
    #[must_use]
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Whether a host rule allows `host` (normalized) on `port` (`None`: any rule
    /// for the host, whatever its port).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    fn host_allowed(&self, host: &str, port: Option<u16>) -> bool {
        let ip = host.parse::<IpAddr>().ok();
        self.hosts.iter().any(|r| {
            let host_matches = match &r.host {
                HostPattern::Name(n) => n == host,
                HostPattern::Suffix(s) => host
                    .strip_suffix(s.as_str())
                    .is_some_and(|p| p.ends_with('.')),
                HostPattern::Ip(a) => ip == Some(*a),
            };
            host_matches && (port.is_none() || r.port.is_none() || r.port == port)
        })
    }

    /// Whether `ip` may be called, or why not.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let carried = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        if self
            .networks
            .iter()
            .any(|n| n.contains(ip) || carried.is_some_and(|c| n.contains(c)))
        {
            return Ok(());
        }
        let class = classify(ip);
        let allowed = match class {
            AddressClass::Public => self.public,
            AddressClass::Loopback => self.loopback,
            AddressClass::Private => self.private,
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "{ip} is {} that the HTTP policy does not allow (HttpPolicy::{})",
                class.describe(),
                class.hint()
            ))
        }
    }

    /// The most bytes a task may read of a response.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn response_limit(&self) -> usize {
        self.max_response_bytes
    }

    /// Whether any address at all could pass (so a name is worth resolving).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    fn allows_any_address(&self) -> bool {
        self.public || self.loopback || self.private || !self.networks.is_empty()
    }
}

/// The policy an engine and its HTTP client share (set after the client is built).
pub(crate) type SharedPolicy = Arc<RwLock<Arc<HttpPolicy>>>;

#[cfg_attr(not(feature = "http"), allow(dead_code))]
fn current(policy: &SharedPolicy) -> Arc<HttpPolicy> {
    policy.read().expect("HTTP policy lock").clone()
}

#[cfg(feature = "http")]
mod http_tasks {
    use std::net::{IpAddr, SocketAddr};
    use std::time::Duration;

    use serde_json::Value;

    use super::{HttpPolicy, SharedPolicy, current, normalize_host, parse_retry_after};
    use crate::flow::model::failure::TaskError;

    /// A target the policy refused: found in a `reqwest::Error`'s sources when the
    /// engine's client refused a connection or a redirect.
    #[derive(Debug)]
    struct Forbidden(String);

    impl std::fmt::Display for Forbidden {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Forbidden {}

    /// What the policy says of a URL before any name is resolved.
    enum Verdict {
        Allowed,
        Resolve(String, u16),
    }

    impl HttpPolicy {
        /// The checks that need no DNS: scheme, host rules, IP literals.
        fn check_url(&self, url: &reqwest::Url) -> Result<Verdict, String> {
            let shown = shown(url);
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!("{shown}: only http and https URLs may be called"));
            }
            let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
                return Err(format!("{shown}: the URL has no host"));
            };
            let host = normalize_host(host);
            if self.host_allowed(&host, Some(port)) {
                return Ok(Verdict::Allowed);
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                return self
                    .check_ip(ip)
                    .map(|()| Verdict::Allowed)
                    .map_err(|why| format!("{shown}: {why}"));
            }
            if !self.allows_any_address() {
                return Err(format!(
                    "{shown}: {host} is not on the HTTP policy's allow-list (HttpPolicy::allow_host)"
                ));
            }
            Ok(Verdict::Resolve(host, port))
        }

        /// Every check: the URL, then every address its host resolves to.
        pub(crate) async fn check(&self, url: &reqwest::Url) -> Result<(), TaskError> {
            let (host, port) = match self.check_url(url).map_err(forbidden)? {
                Verdict::Allowed => return Ok(()),
                Verdict::Resolve(host, port) => (host, port),
            };
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| {
                    TaskError::retryable(format!("{}: cannot resolve {host}: {e}", shown(url)))
                        .code("http_connect")
                })?
                .collect();
            if addrs.is_empty() {
                return Err(TaskError::retryable(format!(
                    "{}: {host} resolves to no address",
                    shown(url)
                ))
                .code("http_connect"));
            }
            for a in addrs {
                self.check_ip(a.ip()).map_err(|why| {
                    forbidden(format!("{}: {host} resolves to {why}", shown(url)))
                })?;
            }
            Ok(())
        }
    }

    fn forbidden(message: String) -> TaskError {
        tracing::warn!(reason = %message, "HTTP task refused by the HTTP policy");
        TaskError::fatal(format!("refused: {message}")).code("http_forbidden")
    }

    /// A URL as errors and logs show it: without user info, query or fragment
    /// (they may carry credentials).
    pub(super) fn shown(url: &reqwest::Url) -> String {
        let mut s = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
        if let Some(port) = url.port() {
            s.push_str(&format!(":{port}"));
        }
        s.push_str(url.path());
        if url.query().is_some() {
            s.push_str("?…");
        }
        s
    }

    /// Resolves names for the engine's own client, refusing a name any of whose
    /// addresses the policy does not allow: the addresses connected to are the
    /// ones checked, whatever the name answers the next time.
    struct PolicyResolver(SharedPolicy);

    impl reqwest::dns::Resolve for PolicyResolver {
        fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
            let policy = current(&self.0);
            let host = name.as_str().to_owned();
            Box::pin(async move {
                let addrs: Vec<SocketAddr> =
                    tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
                if !policy.host_allowed(&normalize_host(&host), None) {
                    for a in &addrs {
                        policy.check_ip(a.ip()).map_err(|why| {
                            Box::new(Forbidden(format!("{host} resolves to {why}")))
                                as Box<dyn std::error::Error + Send + Sync>
                        })?;
                    }
                }
                Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
            })
        }
    }

    /// `builder` resolving through the policy and re-checking every redirect (at
    /// most 10).
    pub(crate) fn guarded(
        builder: reqwest::ClientBuilder,
        policy: &SharedPolicy,
    ) -> reqwest::ClientBuilder {
        let redirects = policy.clone();
        builder
            .dns_resolver(PolicyResolver(policy.clone()))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > 10 {
                    return attempt.error(Forbidden("more than 10 redirects".into()));
                }
                match current(&redirects).check_url(attempt.url()) {
                    Ok(_) => attempt.follow(),
                    Err(why) => attempt.error(Forbidden(format!("redirect to {why}"))),
                }
            }))
    }

    /// The engine's HTTP client and policy, as workers hand them to executors.
    #[derive(Clone)]
    pub(crate) struct HttpTasks {
        client: reqwest::Client,
        policy: SharedPolicy,
    }

    impl HttpTasks {
        pub(crate) fn new(client: reqwest::Client, policy: SharedPolicy) -> Self {
            HttpTasks { client, policy }
        }

        /// One call: checked, sent, its response read within bounds.
        pub(super) async fn call(
            &self,
            method: reqwest::Method,
            url: &str,
            idempotency_key: &str,
            headers: reqwest::header::HeaderMap,
            body: Option<Value>,
        ) -> Result<Value, TaskError> {
            let policy = current(&self.policy);
            let url = reqwest::Url::parse(url)
                .map_err(|e| TaskError::fatal(format!("invalid URL: {e}")).code("http_url"))?;
            let shown = shown(&url);
            policy.check(&url).await?;
            let mut request = self
                .client
                .request(method, url.clone())
                .headers(headers)
                .header("Idempotency-Key", idempotency_key);
            if let Some(body) = body {
                request = request.json(&body);
            }
            let response = request.send().await.map_err(|e| send_error(&shown, e))?;
            if response.url() != &url {
                // A client of the application's own followed redirects.
                policy.check(response.url()).await?;
            }
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            if status.is_success() {
                let bytes = read_bounded(response, policy.max_response_bytes)
                    .await
                    .map_err(|e| match e {
                        Read::TooLarge => TaskError::fatal(format!(
                            "{shown}: HTTP {status}: the response is larger than {} bytes",
                            policy.max_response_bytes
                        ))
                        .code("http_too_large"),
                        Read::Failed(e) => TaskError::retryable(format!(
                            "{shown}: HTTP {status}: reading the response failed: {}",
                            chain(e)
                        ))
                        .code("http_body"),
                    })?;
                return Ok(serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    if bytes.is_empty() {
                        Value::Null
                    } else {
                        Value::String(String::from_utf8_lossy(&bytes).into_owned())
                    }
                }));
            }
            // An error's body only goes into the message: read a little of it.
            let text = read_prefix(response, 4096).await;
            let code = status.as_u16();
            let message = format!(
                "{shown}: HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            );
            let mut err = if matches!(code, 408 | 425 | 429) || status.is_server_error() {
                TaskError::retryable(message)
            } else {
                TaskError::fatal(message)
            }
            .code(format!("http_{code}"));
            err.retry_after = retry_after;
            Err(err)
        }
    }

    /// A sent request's failure: refused by the policy (fatal), timed out, or
    /// could not connect (retryable).
    fn send_error(shown: &str, e: reqwest::Error) -> TaskError {
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(f) = s.downcast_ref::<Forbidden>() {
                return forbidden(format!("{shown}: {f}"));
            }
            source = s.source();
        }
        let (timeout, redirect) = (e.is_timeout(), e.is_redirect());
        let message = format!("{shown}: {}", chain(e));
        if timeout {
            TaskError::retryable(message).code("timeout")
        } else if redirect {
            TaskError::fatal(message).code("http_redirect")
        } else {
            TaskError::retryable(message).code("http_connect")
        }
    }

    /// An error and its sources, without the URL reqwest puts in its own text
    /// (its query may carry credentials).
    fn chain(e: reqwest::Error) -> String {
        let e = e.without_url();
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    enum Read {
        TooLarge,
        Failed(reqwest::Error),
    }

    /// The body, or `TooLarge` as soon as it passes `limit` bytes (nothing more is
    /// read: the connection is dropped).
    async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, Read> {
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(Read::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(Read::Failed)? {
            if body.len() + chunk.len() > limit {
                return Err(Read::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// At most `limit` bytes of the body, as text (errors end it quietly).
    async fn read_prefix(mut response: reqwest::Response, limit: usize) -> String {
        let mut body = Vec::new();
        while body.len() < limit {
            match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
                Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(limit);
        String::from_utf8_lossy(&body).into_owned()
    }
}

#[cfg(feature = "http")]
pub(crate) use http_tasks::{HttpTasks, guarded};

/// `Retry-After`: delta seconds or an HTTP date.
#[cfg(feature = "http")]
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

impl Effect {
    /// The SQL work of a SQL step, with the step's timeout.
    pub(crate) fn sql_work(&self, timeout_ms: u64) -> Option<SqlWork> {
        match self {
            Effect::Sql(statements) => Some(SqlWork {
                statements: statements.clone(),
                timeout_ms,
            }),
            _ => None,
        }
    }
}

#[cfg(all(test, feature = "http"))]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = parse_retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30));
        assert_eq!(parse_retry_after("soon"), None);
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_classified_including_the_ipv4_inside_ipv6() {
        use AddressClass::*;
        for (addr, class) in [
            ("93.184.216.34", Public),
            ("2606:4700::1111", Public),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("64:ff9b::7f00:1", Loopback),
            ("2002:7f00:1::", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Private),
            ("fd12::1", Private),
            ("::ffff:10.0.0.1", Private),
            ("169.254.1.1", LinkLocal),
            ("fe80::1", LinkLocal),
            ("169.254.169.254", Metadata),
            ("::ffff:169.254.169.254", Metadata),
            ("fd00:ec2::254", Metadata),
            ("100.100.100.200", Metadata),
            ("0.0.0.0", Special),
            ("0.1.2.3", Special),
            ("::", Special),
            ("::7f00:1", Special),
            ("224.0.0.1", Special),
            ("255.255.255.255", Special),
            ("192.0.2.1", Special),
            ("198.18.0.1", Special),
            ("2001:db8::1", Special),
            ("ff02::1", Special),
            ("172.32.0.1", Public),
            ("100.128.0.1", Public),
        ] {
            assert_eq!(classify(ip(addr)), class, "{addr}");
        }
    }

    #[test]
    fn the_default_allows_public_addresses_only() {
        let p = HttpPolicy::default();
        assert!(p.check_ip(ip("93.184.216.34")).is_ok());
        for refused in [
            "127.0.0.1",
            "::1",
            "10.0.0.1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
        ] {
            let why = p.check_ip(ip(refused)).unwrap_err();
            assert!(why.contains(refused), "{why}");
        }
        let p = p.allow_loopback(true).allow_private(true);
        assert!(p.check_ip(ip("127.0.0.1")).is_ok());
        assert!(p.check_ip(ip("::ffff:10.1.1.1")).is_ok());
        assert!(
            p.check_ip(ip("169.254.169.254")).is_err(),
            "metadata stays refused"
        );
        assert!(
            p.check_ip(ip("fd00:ec2::254")).is_err(),
            "metadata stays refused"
        );
        let p = HttpPolicy::deny_all();
        assert!(p.check_ip(ip("93.184.216.34")).is_err());
        assert!(!p.allows_any_address());
    }

    #[test]
    fn hosts_and_networks_are_allowed_explicitly() {
        let p = HttpPolicy::deny_all()
            .allow("api.example.com")
            .unwrap()
            .allow("Pay.Internal:8443")
            .unwrap()
            .allow("*.svc.local")
            .unwrap()
            .allow("10.20.0.0/16")
            .unwrap()
            .allow("[::1]:8080")
            .unwrap()
            .allow("[fd00::5]")
            .unwrap()
            .allow("10.9.9.9:81")
            .unwrap()
            .allow("169.254.169.254")
            .unwrap();
        assert!(p.host_allowed("api.example.com", Some(443)));
        assert!(p.host_allowed("pay.internal", Some(8443)));
        assert!(!p.host_allowed("pay.internal", Some(80)));
        assert!(p.host_allowed("pay.internal", None));
        assert!(p.host_allowed("a.svc.local", Some(80)));
        assert!(!p.host_allowed("svc.local", Some(80)));
        assert!(!p.host_allowed("evilsvc.local", Some(80)));
        assert!(p.host_allowed("::1", Some(8080)));
        assert!(!p.host_allowed("::1", Some(8081)));
        assert!(p.host_allowed("169.254.169.254", Some(80)));
        assert!(p.host_allowed("fd00::5", Some(1)));
        assert!(p.host_allowed("10.9.9.9", Some(81)));
        assert!(!p.host_allowed("10.9.9.9", Some(80)));
        assert!(p.check_ip(ip("10.20.3.4")).is_ok());
        assert!(p.check_ip(ip("::ffff:10.20.3.4")).is_ok());
        assert!(p.check_ip(ip("10.21.0.1")).is_err());
        assert_eq!(normalize_host("[::1]"), "::1");
        assert_eq!(normalize_host("Localhost."), "localhost");
        for bad in [
            "",
            "10.0.0.0/33",
            "x/8",
            "host:port",
            "a b",
            "[::1",
            "http://x",
            "h:99999",
        ] {
            assert!(HttpPolicy::default().allow(bad).is_err(), "{bad:?}");
        }
        let all_v4 = HttpPolicy::deny_all().allow_network(ip("0.0.0.0"), 0);
        assert!(all_v4.check_ip(ip("127.0.0.1")).is_ok());
        assert!(all_v4.check_ip(ip("::1")).is_err());
    }
}
