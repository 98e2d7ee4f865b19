//! Webhooks, the requests EPHEMERAL dispatchers make: signed as the Standard Webhooks
//! specification says, and sent so that a URL cannot reach inside the service's network.
//!
//! - **Signature**: headers `webhook-id`, `webhook-timestamp` (Unix seconds) and
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with
//!   the dispatcher's secret (`whsec_` + base64 of 32 random bytes). The id is the same on
//!   every attempt, so a receiver can drop a repeat.
//! - **SSRF**: the host is resolved once and every address checked; loopback, private,
//!   shared, link-local (cloud metadata included), multicast, unspecified and reserved
//!   addresses are refused unless `WEBHOOK_ALLOW_NETS` lists them. The request then goes to
//!   the checked address (the client is pinned to it, so a second lookup cannot differ),
//!   through no proxy, following no redirect, with a connect and a total timeout; at most
//!   [`BODY_CAP`] bytes of the answer are read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use ipnet::IpNet;
use rand::RngCore;
use reqwest::Url;
use sha2::Sha256;

/// Most bytes of a receiver's answer read (the rest is dropped unread).
pub const BODY_CAP: usize = 16 * 1024;
/// Most characters of an answer kept in an attempt's error.
pub const ERROR_SNIPPET_CHARS: usize = 200;
/// Most characters of an attempt's error stored.
pub const MAX_ERROR_CHARS: usize = 1024;
/// Longest URL a dispatcher may have.
pub const MAX_URL_CHARS: usize = 2048;
/// The prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Text from outside (a receiver's answer), made safe to store and to show: valid UTF-8
/// (what is not is replaced), no control character but newline and tab (no NUL, which
/// Postgres text refuses, no terminal escape), at most `max` characters.
pub fn clean_text(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| !c.is_control() || matches!(c, '\n' | '\t'))
        .take(max)
        .collect()
}

/// A new signing secret: `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", B64.encode(key))
}

/// A signing secret that is not base64 after its prefix.
#[derive(Debug, thiserror::Error)]
#[error("the signing secret is not base64: {0}")]
pub struct SecretError(#[from] base64::DecodeError);

/// The `webhook-signature` header's value for a message.
pub fn sign(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SecretError> {
    let key = B64.decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes a key of any length");
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// Why a URL is not one a dispatcher may have.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("url is longer than {MAX_URL_CHARS} characters")]
    TooLong,
    #[error("url {url:?} does not parse: {source}")]
    Unparseable {
        url: String,
        source: url::ParseError,
    },
    #[error("url must be http or https, not {0:?}")]
    Scheme(String),
    #[error("url has no host")]
    NoHost,
    #[error("url must not carry credentials (sign requests with the secret instead)")]
    Credentials,
}

/// A URL a dispatcher may be created with: http or https, a host, no credentials.
pub fn check_url(url: &str) -> Result<Url, UrlError> {
    if url.chars().count() > MAX_URL_CHARS {
        return Err(UrlError::TooLong);
    }
    let parsed = Url::parse(url).map_err(|source| UrlError::Unparseable {
        url: url.to_string(),
        source,
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlError::Scheme(parsed.scheme().to_string()));
    }
    if parsed.host().is_none() {
        return Err(UrlError::NoHost);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::Credentials);
    }
    Ok(parsed)
}

/// Which addresses a webhook may reach.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Networks allowed even though they are in a refused range.
    pub allow: Vec<IpNet>,
}

impl Guard {
    /// Why `ip` is refused, `None` if it may be reached.
    /// Cloud metadata addresses are refused whatever the allow-list says.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        let mapped = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let why = refused_range(mapped)?;
        if why == METADATA {
            return Some(why);
        }
        let allowed = |a: &IpAddr| self.allow.iter().any(|net| net.contains(a));
        if allowed(&ip) || allowed(&mapped) {
            return None;
        }
        Some(why)
    }
}

/// Why a cloud metadata address is refused (no allow-list opens it).
const METADATA: &str = "cloud metadata";

/// The refused range `ip` is in, if any.
fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

/// Whether `ip` is in `net`/`len` (IPv4).
fn in_v4(ip: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

/// Whether `ip` is in `net`/`len` (IPv6).
fn in_v6(ip: Ipv6Addr, net: [u16; 8], len: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// The IPv4 blocks refused: every entry of the IANA IPv4 Special-Purpose Address Registry
/// that is not globally reachable, and multicast. Checked in order, after
/// [`GLOBAL_V4`].
const REFUSED_V4: &[([u8; 4], u32, &str)] = &[
    ([0, 0, 0, 0], 8, "unspecified (this network)"),
    ([10, 0, 0, 0], 8, "private"),
    ([100, 64, 0, 0], 10, "shared (carrier-grade NAT)"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private"),
    // Its service continuity prefix, dummy address and NAT64 discovery addresses among them.
    ([192, 0, 0, 0], 24, "IETF protocol assignments"),
    ([192, 0, 2, 0], 24, "documentation (TEST-NET-1)"),
    ([192, 88, 99, 0], 24, "6to4 relay anycast (deprecated)"),
    ([192, 168, 0, 0], 16, "private"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([198, 51, 100, 0], 24, "documentation (TEST-NET-2)"),
    ([203, 0, 113, 0], 24, "documentation (TEST-NET-3)"),
    ([224, 0, 0, 0], 4, "multicast"),
    // Limited broadcast (255.255.255.255) among them.
    ([240, 0, 0, 0], 4, "reserved"),
];

/// Globally reachable entries of the IPv4 registry inside a refused block: the Port Control
/// Protocol and TURN anycast addresses.
const GLOBAL_V4: &[([u8; 4], u32)] = &[([192, 0, 0, 9], 32), ([192, 0, 0, 10], 32)];

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        return Some(METADATA);
    }
    if GLOBAL_V4.iter().any(|&(net, len)| in_v4(ip, net, len)) {
        return None;
    }
    REFUSED_V4
        .iter()
        .find(|&&(net, len, _)| in_v4(ip, net, len))
        .map(|&(_, _, why)| why)
}

/// The IPv6 blocks refused: every entry of the IANA IPv6 Special-Purpose Address Registry
/// that is not globally reachable, the overlay identifiers (ORCHID, ORCHIDv2, DETs: not
/// routed as addresses), and the deprecated and multicast blocks. Checked in order, after
/// [`GLOBAL_V6`] and the forms that embed an IPv4 address; anything else outside the global
/// unicast block 2000::/3 is refused as reserved.
const REFUSED_V6: &[([u16; 8], u32, &str)] = &[
    ([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified"),
    ([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
    ([0, 0, 0, 0, 0xffff, 0, 0, 0], 96, "IPv4-translated (SIIT)"),
    ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "NAT64 (local use)"),
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only"),
    ([0x100, 0, 0, 1, 0, 0, 0, 0], 64, "dummy prefix"),
    ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo"),
    ([0x2001, 2, 0, 0, 0, 0, 0, 0], 48, "benchmarking"),
    (
        [0x2001, 0x10, 0, 0, 0, 0, 0, 0],
        28,
        "ORCHID overlay identifiers (deprecated)",
    ),
    (
        [0x2001, 0x20, 0, 0, 0, 0, 0, 0],
        28,
        "ORCHIDv2 overlay identifiers",
    ),
    (
        [0x2001, 0x30, 0, 0, 0, 0, 0, 0],
        28,
        "drone entity tags (overlay identifiers)",
    ),
    (
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments",
    ),
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation"),
    ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation"),
    (
        [0x5f00, 0, 0, 0, 0, 0, 0, 0],
        16,
        "segment routing (SRv6) identifiers",
    ),
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "private (unique local)"),
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local"),
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
];

/// Globally reachable entries of the IPv6 registry inside a refused block: the PCP, TURN
/// and DNS-SD anycast addresses, AMT, and AS112-v6.
const GLOBAL_V6: &[([u16; 8], u32)] = &[
    ([0x2001, 1, 0, 0, 0, 0, 0, 1], 128),
    ([0x2001, 1, 0, 0, 0, 0, 0, 2], 128),
    ([0x2001, 1, 0, 0, 0, 0, 0, 3], 128),
    ([0x2001, 3, 0, 0, 0, 0, 0, 0], 32),
    ([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48),
];

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let o = ip.octets();
    let embedded = || Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some(METADATA);
    }
    if GLOBAL_V6.iter().any(|&(net, len)| in_v6(ip, net, len)) {
        return None;
    }
    if let Some(why) = REFUSED_V6
        .iter()
        .find(|&&(net, len, _)| in_v6(ip, net, len))
        .map(|&(_, _, why)| why)
    {
        return Some(why);
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        // IPv4-mapped (::ffff:a.b.c.d): the IPv4 address decides.
        refused_v4(v4)
    } else if in_v6(ip, [0; 8], 96) {
        // IPv4-compatible (::a.b.c.d, deprecated): the IPv4 address decides.
        refused_v4(embedded())
    } else if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        // NAT64 (64:ff9b::/96): the embedded IPv4 address decides.
        refused_v4(embedded())
    } else if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        // 6to4: the IPv4 address in bits 16 to 48 decides.
        refused_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else if !in_v6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        Some("reserved (outside global unicast 2000::/3)")
    } else {
        None
    }
}

/// Parse networks or single addresses, comma-separated, as `WEBHOOK_ALLOW_NETS` is.
pub fn parse_nets(s: &str) -> Result<Vec<IpNet>, String> {
    s.parse::<crate::config::NetList>().map(|n| n.0)
}

/// One request to make.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub url: &'a str,
    /// The `webhook-id`: the same on every attempt of one message.
    pub msg_id: &'a str,
    pub secret: &'a str,
    pub body: Vec<u8>,
}

/// How an attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered { status: u16 },
    /// The receiver answered another status; `error` says which, with the start of its
    /// answer.
    Answered { status: u16, error: String },
    /// No answer in time: the request, or the host's lookup, took longer than allowed.
    TimedOut { error: String },
    /// No answer: the host does not resolve, or the connection or the request failed.
    Failed { error: String },
    /// No request was made, and none can be: the URL, its address or the secret is
    /// refused, so no later attempt can do better.
    Refused { reason: String },
}

impl Outcome {
    /// The answer's status; `None` when none came.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Delivered { status } | Self::Answered { status, .. } => Some(*status),
            Self::TimedOut { .. } | Self::Failed { .. } | Self::Refused { .. } => None,
        }
    }

    /// Why it failed; `None` when delivered.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Delivered { .. } => None,
            Self::Answered { error, .. }
            | Self::TimedOut { error }
            | Self::Failed { error }
            | Self::Refused { reason: error } => Some(error),
        }
    }

    /// `delivered`, `refused` or `failed`: the `result` label of the webhook metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered { .. } => "delivered",
            Self::Refused { .. } => "refused",
            Self::Answered { .. } | Self::TimedOut { .. } | Self::Failed { .. } => "failed",
        }
    }
}

/// One attempt: how it went, and how long it took.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub outcome: Outcome,
    pub duration: Duration,
}

impl Attempt {
    pub fn succeeded(&self) -> bool {
        matches!(self.outcome, Outcome::Delivered { .. })
    }
}

/// Looks host names up: the system's resolver unless a test gives another. The guard checks
/// what it answers, and the client is pinned to the checked address; the client is given
/// the same resolver, so a request that were not pinned would look the name up again here.
#[derive(Clone)]
pub struct Resolver(Arc<dyn reqwest::dns::Resolve>);

impl Resolver {
    pub fn new(resolve: Arc<dyn reqwest::dns::Resolve>) -> Self {
        Self(resolve)
    }
}

impl Default for Resolver {
    /// The system's resolver (`getaddrinfo`, through tokio).
    fn default() -> Self {
        Self(Arc::new(SystemResolver))
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        self.0.resolve(name)
    }
}

/// The system's resolver.
struct SystemResolver;

impl reqwest::dns::Resolve for SystemResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let addrs: reqwest::dns::Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// Sends webhooks.
#[derive(Debug, Clone)]
pub struct Sender {
    pub guard: Guard,
    pub connect_timeout: Duration,
    /// For the whole request: connect, send, answer.
    pub timeout: Duration,
    /// How host names are looked up.
    pub resolver: Resolver,
}

impl Sender {
    /// How a worker configured so sends webhooks.
    pub fn new(config: &crate::config::WebhookConfig) -> Self {
        Self {
            guard: Guard {
                allow: config.webhook_allow_nets.clone().unwrap_or_default().0,
            },
            connect_timeout: config.webhook_connect_timeout,
            timeout: config.webhook_timeout,
            resolver: Resolver::default(),
        }
    }

    /// Make one attempt. Never fails: what went wrong is in the outcome.
    pub async fn send(&self, req: Request<'_>) -> Attempt {
        let started = Instant::now();
        let outcome = self.outcome_of(req).await;
        Attempt {
            outcome,
            duration: started.elapsed(),
        }
    }

    async fn outcome_of(&self, req: Request<'_>) -> Outcome {
        let url = match check_url(req.url) {
            Ok(u) => u,
            Err(e) => {
                return Outcome::Refused {
                    reason: e.to_string(),
                };
            }
        };
        let addr = match self.resolve(&url).await {
            Ok(a) => a,
            Err(not_sent) => return not_sent,
        };
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .dns_resolver(Arc::new(self.resolver.clone()))
            .user_agent(concat!("kongflow-events/", env!("CARGO_PKG_VERSION")));
        if let Some(url::Host::Domain(domain)) = url.host() {
            // The checked address, and no other: the client does not look the name up.
            client = client.resolve(domain, addr);
        }
        let client = match client.build() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failed {
                    error: format!("http client: {e}"),
                };
            }
        };
        let timestamp = chrono::Utc::now().timestamp();
        let signature = match sign(req.secret, req.msg_id, timestamp, &req.body) {
            Ok(s) => s,
            Err(e) => {
                return Outcome::Refused {
                    reason: e.to_string(),
                };
            }
        };
        let sent = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", req.msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(req.body)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return self.no_answer(&e, addr),
        };
        let status = response.status();
        if status.is_success() {
            // Delivered: what follows the status is not read (a receiver that took the
            // event and then streams slowly, or resets, must not get it again).
            return Outcome::Delivered {
                status: status.as_u16(),
            };
        }
        // The answer, up to the cap (a receiver cannot make the worker read without end).
        let mut answer = Vec::new();
        let read_error = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = BODY_CAP - answer.len();
                    answer.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if answer.len() >= BODY_CAP {
                        break None;
                    }
                }
                Ok(None) => break None,
                Err(e) => break self.no_answer(&e, addr).error().map(str::to_string),
            }
        };
        let text = clean_text(&answer, BODY_CAP);
        let snippet: String = text.trim().chars().take(ERROR_SNIPPET_CHARS).collect();
        let mut error = format!("answered {status}");
        if status.is_redirection() {
            error.push_str(" (redirects are not followed)");
        }
        if !snippet.is_empty() {
            error.push_str(": ");
            error.push_str(&snippet);
        }
        if let Some(e) = read_error {
            error.push_str(&format!(" (reading the answer: {e})"));
        }
        Outcome::Answered {
            status: status.as_u16(),
            error,
        }
    }

    /// The one address the request goes to: the URL's own, or the host's first, once every
    /// address the host has passed the guard.
    /// `Err`: why no request is made.
    async fn resolve(&self, url: &Url) -> Result<SocketAddr, Outcome> {
        let refused = |reason: String| Outcome::Refused { reason };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| refused("url has no port".into()))?;
        let host = url
            .host()
            .ok_or_else(|| refused("url has no host".into()))?;
        let addrs: Vec<SocketAddr> = match host {
            url::Host::Ipv4(ip) => vec![SocketAddr::new(ip.into(), port)],
            url::Host::Ipv6(ip) => vec![SocketAddr::new(ip.into(), port)],
            url::Host::Domain(name) => {
                let lookup = match name.parse::<reqwest::dns::Name>() {
                    Ok(n) => reqwest::dns::Resolve::resolve(&self.resolver, n),
                    Err(e) => return Err(refused(format!("{name:?} is no host name: {e}"))),
                };
                match tokio::time::timeout(self.connect_timeout, lookup).await {
                    Ok(Ok(found)) => found.map(|a| SocketAddr::new(a.ip(), port)).collect(),
                    Ok(Err(e)) => {
                        return Err(Outcome::Failed {
                            error: format!("{name} does not resolve: {e}"),
                        });
                    }
                    Err(_) => {
                        return Err(Outcome::TimedOut {
                            error: format!(
                                "resolving {name} took more than {:?}",
                                self.connect_timeout
                            ),
                        });
                    }
                }
            }
        };
        for a in &addrs {
            if let Some(why) = self.guard.refusal(a.ip()) {
                return Err(refused(refusal_message(&host, a.ip(), why)));
            }
        }
        addrs.first().copied().ok_or_else(|| Outcome::Failed {
            error: format!("{host} resolves to no address"),
        })
    }

    /// What a request that got no (whole) answer from `addr` came to.
    fn no_answer(&self, e: &reqwest::Error, addr: SocketAddr) -> Outcome {
        if e.is_timeout() {
            Outcome::TimedOut {
                error: format!("no answer within {:?} (from {addr})", self.timeout),
            }
        } else if e.is_connect() {
            Outcome::Failed {
                error: format!("could not connect to {addr}: {}", root_cause(e)),
            }
        } else {
            Outcome::Failed {
                error: format!("request to {addr} failed: {}", root_cause(e)),
            }
        }
    }
}

/// What an attempt's error says of a refused address.
fn refusal_message(host: &url::Host<&str>, ip: IpAddr, why: &str) -> String {
    let remedy = if why == METADATA {
        "no setting allows it"
    } else {
        "WEBHOOK_ALLOW_NETS can allow it"
    };
    format!("refused: {host} is {ip} ({why}); no request was made; {remedy}")
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_reference_does() {
        // The specification's example: secret, id, timestamp, body and signature.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(sign("whsec_not base64!", "m", 1, b"").is_err());
    }

    #[test]
    fn secrets_are_fresh_32_byte_keys() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        let key = B64.decode(a.strip_prefix(SECRET_PREFIX).unwrap()).unwrap();
        assert_eq!(key.len(), 32);
    }

    #[test]
    fn the_guard_refuses_inner_ranges_unless_allowed() {
        let g = Guard::default();
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified (this network)"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd12::1", "private (unique local)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::a00:1", "private"),
            ("fd00:ec2::254", "cloud metadata"),
            ("::7f00:1", "loopback"),
            ("::a00:1", "private"),
            ("2002:a00:1::1", "private"),
            ("2002:a9fe:a9fe::1", "cloud metadata"),
            ("2001:0:4136:e378::1", "Teredo"),
            ("64:ff9b:1::a00:1", "NAT64 (local use)"),
            ("fec0::1", "site-local"),
        ] {
            assert_eq!(g.refusal(ip.parse().unwrap()), Some(why), "{ip}");
        }
        for ip in ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "172.32.0.1"] {
            assert_eq!(g.refusal(ip.parse().unwrap()), None, "{ip}");
        }
        let loopback = Guard {
            allow: parse_nets("127.0.0.0/8, ::1").unwrap(),
        };
        assert_eq!(loopback.refusal("127.0.0.1".parse().unwrap()), None);
        assert_eq!(loopback.refusal("::1".parse().unwrap()), None);
        assert_eq!(
            loopback.refusal("169.254.169.254".parse().unwrap()),
            Some("cloud metadata")
        );
        // No allow-list opens the metadata addresses; one written in IPv6 form matches the
        // IPv4-mapped address too.
        let wide = Guard {
            allow: parse_nets("0.0.0.0/0, ::/0").unwrap(),
        };
        assert_eq!(
            wide.refusal("169.254.169.254".parse().unwrap()),
            Some("cloud metadata")
        );
        assert_eq!(
            wide.refusal("fd00:ec2::254".parse().unwrap()),
            Some("cloud metadata")
        );
        assert_eq!(wide.refusal("10.0.0.1".parse().unwrap()), None);
        let mapped = Guard {
            allow: parse_nets("::ffff:10.0.0.0/104").unwrap(),
        };
        assert_eq!(mapped.refusal("::ffff:10.1.1.1".parse().unwrap()), None);
        assert!(parse_nets("10.0.0.0/8,nope").is_err());
    }

    /// Every entry of the IANA IPv4 and IPv6 Special-Purpose Address Registries that is not
    /// globally reachable, at its first and last address, is refused; the globally reachable
    /// entries (some inside refused blocks) and their neighbours are not.
    #[test]
    fn the_guard_refuses_every_non_global_special_purpose_range() {
        let g = Guard::default();
        for (ip, why) in [
            // IPv4.
            ("0.0.0.0", "unspecified"),
            ("0.255.255.255", "unspecified"),
            ("10.0.0.0", "private"),
            ("10.255.255.255", "private"),
            ("100.64.0.0", "shared"),
            ("100.127.255.255", "shared"),
            ("127.0.0.0", "loopback"),
            ("127.255.255.255", "loopback"),
            ("169.254.0.0", "link-local"),
            ("169.254.255.255", "link-local"),
            ("172.16.0.0", "private"),
            ("172.31.255.255", "private"),
            ("192.0.0.0", "IETF protocol assignments"),
            ("192.0.0.7", "IETF protocol assignments"),
            ("192.0.0.8", "IETF protocol assignments"),
            ("192.0.0.11", "IETF protocol assignments"),
            ("192.0.0.170", "IETF protocol assignments"),
            ("192.0.0.171", "IETF protocol assignments"),
            ("192.0.0.255", "IETF protocol assignments"),
            ("192.0.2.0", "documentation"),
            ("192.0.2.255", "documentation"),
            ("192.88.99.0", "6to4 relay anycast"),
            ("192.88.99.255", "6to4 relay anycast"),
            ("192.168.0.0", "private"),
            ("192.168.255.255", "private"),
            ("198.18.0.0", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("198.51.100.0", "documentation"),
            ("198.51.100.255", "documentation"),
            ("203.0.113.0", "documentation"),
            ("203.0.113.255", "documentation"),
            ("224.0.0.0", "multicast"),
            ("239.255.255.255", "multicast"),
            ("240.0.0.0", "reserved"),
            ("255.255.255.254", "reserved"),
            ("255.255.255.255", "reserved"),
            // IPv6.
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:0:808:808", "IPv4-translated"),
            ("::ffff:0:7f00:1", "IPv4-translated"),
            ("::ffff:192.0.2.1", "documentation"),
            ("::ffff:198.18.0.1", "benchmarking"),
            ("64:ff9b::c000:201", "documentation"),
            ("64:ff9b:1::", "NAT64 (local use)"),
            ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", "NAT64 (local use)"),
            ("100::", "discard-only"),
            ("100::ffff:ffff:ffff:ffff", "discard-only"),
            ("100:0:0:1::", "dummy"),
            ("100:0:0:1:ffff:ffff:ffff:ffff", "dummy"),
            ("2001::", "Teredo"),
            ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", "Teredo"),
            ("2001:1::", "IETF protocol assignments"),
            ("2001:1::4", "IETF protocol assignments"),
            ("2001:2::", "benchmarking"),
            ("2001:2:0:ffff:ffff:ffff:ffff:ffff", "benchmarking"),
            ("2001:2:1::", "IETF protocol assignments"),
            ("2001:4::", "IETF protocol assignments"),
            ("2001:4:111:ffff::", "IETF protocol assignments"),
            ("2001:4:113::", "IETF protocol assignments"),
            ("2001:10::", "overlay"),
            ("2001:1f:ffff::", "overlay"),
            ("2001:20::", "overlay"),
            ("2001:2f:ffff:ffff:ffff:ffff:ffff:ffff", "overlay"),
            ("2001:30::", "overlay"),
            ("2001:3f:ffff::", "overlay"),
            (
                "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
                "IETF protocol assignments",
            ),
            ("2001:db8::", "documentation"),
            ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
            ("2002:c000:201::1", "documentation"),
            ("3fff::", "documentation"),
            ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
            ("5f00::", "segment routing"),
            ("5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "segment routing"),
            ("fc00::", "unique local"),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "unique local"),
            ("fe80::", "link-local"),
            ("febf:ffff::", "link-local"),
            ("fec0::", "site-local"),
            ("feff:ffff::", "site-local"),
            ("ff00::", "multicast"),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "multicast"),
            // Outside the global unicast block 2000::/3: unassigned or reserved.
            ("::1:0:0:0", "reserved"),
            ("1::1", "reserved"),
            ("4000::1", "reserved"),
            ("e000::1", "reserved"),
        ] {
            let got = g.refusal(ip.parse().unwrap());
            assert!(
                got.is_some_and(|r| r.contains(why)),
                "{ip}: {got:?}, not {why:?}"
            );
        }
        for ip in [
            // Globally reachable entries of the registries, some inside refused blocks.
            "192.0.0.9",
            "192.0.0.10",
            "192.31.196.1",
            "192.52.193.1",
            "192.175.48.1",
            "2001:1::1",
            "2001:1::2",
            "2001:1::3",
            "2001:3::",
            "2001:3:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:4:112::",
            "2001:4:112:ffff:ffff:ffff:ffff:ffff",
            "2620:4f:8000::1",
            // Neighbours of refused blocks.
            "1.0.0.0",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "191.255.255.255",
            "192.0.1.0",
            "192.0.3.0",
            "192.88.98.255",
            "192.88.100.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "223.255.255.255",
            "2000::1",
            "2001:200::",
            "2001:db7:ffff::",
            "2001:db9::",
            "3ffe:ffff::",
            "3fff:1000::",
            "2606:4700::1111",
            // Global IPv4 addresses in the IPv6 forms that embed them.
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(g.refusal(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn text_from_receivers_is_cleaned_before_it_is_kept() {
        let dirty = b"bad\0news\x01\x1b[31m red\xff end\r\n\tline\x7f\xc2\x9b.";
        assert_eq!(
            clean_text(dirty, 100),
            "badnews[31m red\u{fffd} end\n\tline."
        );
        assert_eq!(clean_text("h\u{e9}llo".as_bytes(), 2), "h\u{e9}");
        assert_eq!(clean_text(b"", 10), "");
    }

    #[test]
    fn a_metadata_refusal_says_no_setting_allows_it() {
        let host = url::Host::Domain("metadata.internal");
        let ip = "169.254.169.254".parse().unwrap();
        let m = refusal_message(&host, ip, Guard::default().refusal(ip).unwrap());
        assert!(!m.contains("WEBHOOK_ALLOW_NETS"), "{m}");
        assert!(m.contains("no setting allows it"), "{m}");
        let ip = "10.0.0.1".parse().unwrap();
        let m = refusal_message(&host, ip, Guard::default().refusal(ip).unwrap());
        assert!(m.contains("WEBHOOK_ALLOW_NETS can allow it"), "{m}");
    }

    #[tokio::test]
    async fn an_attempt_that_can_make_no_request_is_refused_for_good() {
        let sender = Sender {
            guard: Guard::default(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            resolver: Resolver::default(),
        };
        for url in ["ftp://example.com/", "http://127.0.0.1:9/hook"] {
            let sent = sender
                .send(Request {
                    url,
                    msg_id: "msg_x",
                    secret: &new_secret(),
                    body: b"{}".to_vec(),
                })
                .await;
            assert!(
                matches!(sent.outcome, Outcome::Refused { .. }),
                "{url}: {sent:?}"
            );
            assert!(!sent.succeeded());
            assert_eq!(sent.outcome.label(), "refused");
            assert_eq!(sent.outcome.status(), None);
        }
    }

    #[test]
    fn outcomes_say_their_status_error_and_label() {
        let delivered = Outcome::Delivered { status: 204 };
        assert_eq!(
            (delivered.status(), delivered.error(), delivered.label()),
            (Some(204), None, "delivered")
        );
        let answered = Outcome::Answered {
            status: 500,
            error: "answered 500".into(),
        };
        assert_eq!(
            (answered.status(), answered.error(), answered.label()),
            (Some(500), Some("answered 500"), "failed")
        );
        let timed_out = Outcome::TimedOut {
            error: "no answer".into(),
        };
        assert_eq!(
            (timed_out.status(), timed_out.error(), timed_out.label()),
            (None, Some("no answer"), "failed")
        );
        let refused = Outcome::Refused {
            reason: "refused: loopback".into(),
        };
        assert_eq!(
            (refused.status(), refused.error(), refused.label()),
            (None, Some("refused: loopback"), "refused")
        );
    }

    #[test]
    fn urls_must_be_http_with_a_host_and_no_credentials() {
        assert!(check_url("https://example.com/hook").is_ok());
        assert!(check_url("http://127.0.0.1:8080/").is_ok());
        assert!(check_url("ftp://example.com/").is_err());
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("https://user:pw@example.com/").is_err());
        assert!(check_url("not a url").is_err());
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(MAX_URL_CHARS))).is_err());
    }
}
