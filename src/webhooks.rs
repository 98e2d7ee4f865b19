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
/// Longest URL a dispatcher may have.
pub const MAX_URL_CHARS: usize = 2048;
/// The prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new signing secret: `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", B64.encode(key))
}

/// The `webhook-signature` header's value for a message.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = B64
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .map_err(|e| format!("the signing secret is not base64: {e}"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// A URL a dispatcher may be created with: http or https, a host, no credentials.
pub fn check_url(url: &str) -> Result<Url, String> {
    if url.chars().count() > MAX_URL_CHARS {
        return Err(format!("url is longer than {MAX_URL_CHARS} characters"));
    }
    let parsed = Url::parse(url).map_err(|e| format!("url {url:?} does not parse: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "url must be http or https, not {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host().is_none() {
        return Err("url has no host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "url must not carry credentials (sign requests with the secret instead)".into(),
        );
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

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(if ip == Ipv4Addr::new(169, 254, 169, 254) {
        METADATA
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local"
    } else if a == 100 && (64..128).contains(&b) {
        "shared (carrier-grade NAT)"
    } else if ip.is_multicast() {
        "multicast"
    } else if ip.is_broadcast() || a >= 240 {
        "reserved"
    } else if a == 0 {
        "unspecified"
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        "IETF protocol assignments"
    } else {
        return None;
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    let o = ip.octets();
    let first = seg[0];
    Some(
        if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
            METADATA
        } else if ip.is_loopback() {
            "loopback"
        } else if ip.is_unspecified() {
            "unspecified"
        } else if ip.is_multicast() {
            "multicast"
        } else if first & 0xfe00 == 0xfc00 {
            "private (unique local)"
        } else if first & 0xffc0 == 0xfe80 {
            "link-local"
        } else if first & 0xffc0 == 0xfec0 {
            "site-local"
        } else if seg[..6] == [0; 6] {
            // IPv4-compatible (::a.b.c.d, deprecated): the IPv4 address decides.
            return refused_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
        } else if first == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0; 4] {
            // NAT64 (64:ff9b::/96): the embedded IPv4 address decides.
            return refused_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
        } else if first == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
            "NAT64 (local use)"
        } else if first == 0x2002 {
            // 6to4: the IPv4 address in bits 16 to 48 decides.
            return refused_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
        } else if first == 0x2001 && seg[1] == 0 {
            "Teredo"
        } else {
            return None;
        },
    )
}

/// Parse `WEBHOOK_ALLOW_NETS`: networks or single addresses, comma-separated.
pub fn parse_nets(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{p:?} is not a network (10.0.0.0/8) or an address"))
        })
        .collect()
}

/// Networks, written `10.0.0.0/8,::1` (`WEBHOOK_ALLOW_NETS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetList(pub Vec<IpNet>);

/// [`parse_nets`] for the command line.
pub fn parse_nets_arg(s: &str) -> Result<NetList, String> {
    parse_nets(s).map(NetList)
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
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The answer's status; `None` when none came.
    pub status: Option<u16>,
    pub duration: Duration,
    /// Why it failed; `None` for a 2xx answer.
    pub error: Option<String>,
    /// Refused before any request was made (the address, or the URL): no later attempt
    /// can do better.
    pub refused: bool,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}

/// Sends webhooks.
#[derive(Debug, Clone)]
pub struct Sender {
    pub guard: Guard,
    pub connect_timeout: Duration,
    /// For the whole request: connect, send, answer.
    pub timeout: Duration,
}

impl Sender {
    /// Make one attempt. Never fails: what went wrong is in the outcome.
    pub async fn send(&self, req: Request<'_>) -> Outcome {
        let started = Instant::now();
        let outcome = |status, error: Option<String>, refused| Outcome {
            status,
            duration: started.elapsed(),
            error,
            refused,
        };
        let url = match check_url(req.url) {
            Ok(u) => u,
            Err(e) => return outcome(None, Some(e), true),
        };
        let addr = match self.resolve(&url).await {
            Ok(a) => a,
            Err(Refused(e, refused)) => return outcome(None, Some(e), refused),
        };
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .user_agent(concat!("kongflow-events/", env!("CARGO_PKG_VERSION")));
        if let Some(url::Host::Domain(domain)) = url.host() {
            // The checked address, and no other: the client does not look the name up.
            client = client.resolve(domain, addr);
        }
        let client = match client.build() {
            Ok(c) => c,
            Err(e) => return outcome(None, Some(format!("http client: {e}")), false),
        };
        let timestamp = chrono::Utc::now().timestamp();
        let signature = match sign(req.secret, req.msg_id, timestamp, &req.body) {
            Ok(s) => s,
            Err(e) => return outcome(None, Some(e), true),
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
            Err(e) => return outcome(None, Some(self.describe(&e, addr)), false),
        };
        let status = response.status();
        let code = Some(status.as_u16());
        if status.is_success() {
            // Delivered: what follows the status is not read (a receiver that took the
            // event and then streams slowly, or resets, must not get it again).
            return outcome(code, None, false);
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
                Err(e) => break Some(self.describe(&e, addr)),
            }
        };
        let text = String::from_utf8_lossy(&answer);
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
        outcome(code, Some(error), false)
    }

    /// The one address the request goes to: the URL's own, or the host's first, once every
    /// address the host has passed the guard.
    async fn resolve(&self, url: &Url) -> Result<SocketAddr, Refused> {
        let port = url
            .port_or_known_default()
            .ok_or_else(|| Refused("url has no port".into(), true))?;
        let host = url
            .host()
            .ok_or_else(|| Refused("url has no host".into(), true))?;
        let addrs: Vec<SocketAddr> = match host {
            url::Host::Ipv4(ip) => vec![SocketAddr::new(ip.into(), port)],
            url::Host::Ipv6(ip) => vec![SocketAddr::new(ip.into(), port)],
            url::Host::Domain(name) => {
                let lookup = tokio::net::lookup_host((name, port));
                match tokio::time::timeout(self.connect_timeout, lookup).await {
                    Ok(Ok(found)) => found.collect(),
                    Ok(Err(e)) => {
                        return Err(Refused(format!("{name} does not resolve: {e}"), false));
                    }
                    Err(_) => {
                        return Err(Refused(
                            format!("resolving {name} took more than {:?}", self.connect_timeout),
                            false,
                        ));
                    }
                }
            }
        };
        for a in &addrs {
            if let Some(why) = self.guard.refusal(a.ip()) {
                return Err(Refused(
                    format!(
                        "refused: {host} is {} ({why}); no request was made. \
                         WEBHOOK_ALLOW_NETS can allow it",
                        a.ip()
                    ),
                    true,
                ));
            }
        }
        addrs
            .first()
            .copied()
            .ok_or_else(|| Refused(format!("{host} resolves to no address"), false))
    }

    fn describe(&self, e: &reqwest::Error, addr: SocketAddr) -> String {
        if e.is_timeout() {
            format!("no answer within {:?} (from {addr})", self.timeout)
        } else if e.is_connect() {
            format!("could not connect to {addr}: {}", root_cause(e))
        } else {
            format!("request to {addr} failed: {}", root_cause(e))
        }
    }
}

/// Why no request was made, and whether that is final.
struct Refused(String, bool);

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
            ("0.0.0.0", "unspecified"),
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
