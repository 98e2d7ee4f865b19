//! The console's sessions: signing in with the operator token, the session cookie, the
//! token every form carries against cross-site requests, signing out. Sessions live in
//! `console_sessions` (any API replica can serve any page); the cookie's value is never
//! stored, only its SHA-256.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::tenants::constant_time_eq;

/// The session cookie's name.
pub const COOKIE: &str = "kongflow_console";

/// A signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token its forms carry (`csrf`), checked on every change.
    pub csrf: String,
}

fn random_text(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

fn digest(value: &str) -> Vec<u8> {
    Sha256::digest(value.as_bytes()).to_vec()
}

/// Start a session of `ttl`; returns the cookie's value. Sessions past their end are
/// deleted first.
pub async fn start(pool: &PgPool, ttl: Duration) -> Result<String, sqlx::Error> {
    let value = random_text(32);
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    sqlx::query!("DELETE FROM console_sessions WHERE expires_at <= now()")
        .execute(pool)
        .await?;
    sqlx::query!(
        r#"INSERT INTO console_sessions (id, csrf, expires_at)
           VALUES ($1, $2, now() + make_interval(secs => $3::float8 / 1000))"#,
        digest(&value),
        random_text(18),
        ttl_ms as f64
    )
    .execute(pool)
    .await?;
    Ok(value)
}

/// The session a request's cookie names, if it is one and has not ended.
pub async fn find(pool: &PgPool, headers: &HeaderMap) -> Result<Option<Session>, sqlx::Error> {
    let Some(value) = cookie(headers, COOKIE) else {
        return Ok(None);
    };
    let csrf = sqlx::query_scalar!(
        "SELECT csrf FROM console_sessions WHERE id = $1 AND expires_at > now()",
        digest(value)
    )
    .fetch_optional(pool)
    .await?;
    Ok(csrf.map(|csrf| Session { csrf }))
}

/// End the session a request's cookie names.
pub async fn end(pool: &PgPool, headers: &HeaderMap) -> Result<(), sqlx::Error> {
    if let Some(value) = cookie(headers, COOKIE) {
        sqlx::query!("DELETE FROM console_sessions WHERE id = $1", digest(value))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// The value of the cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` of a new session (`Some(value)`) or of signing out (`None`): HttpOnly,
/// SameSite=Strict, scoped to the console's paths, Secure when `secure`.
pub fn set_cookie(value: Option<&str>, ttl: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = match value {
        Some(v) => format!(
            "{COOKIE}={v}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            ttl.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    };
    HeaderValue::from_str(&text).expect("a cookie of URL-safe characters")
}

/// Whether a form's `csrf` field is the session's token.
pub fn csrf_ok(session: &Session, given: Option<&str>) -> bool {
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), session.csrf.as_bytes()))
}

/// Whether a request that changes something comes from the console's own pages: a browser
/// sends `Origin` with every POST, and it must name the host the request was sent to
/// (`Sec-Fetch-Site`, when sent, must say `same-origin`).
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // Not a browser's cross-site request (those carry Origin); the form token decides.
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o == h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_cookie_is_found_among_others_and_empty_is_none() {
        let h = headers(&[("cookie", "a=1; kongflow_console=abc; b=2")]);
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        let h = headers(&[("cookie", "a=1"), ("cookie", "kongflow_console=x")]);
        assert_eq!(cookie(&h, COOKIE), Some("x"));
        assert_eq!(
            cookie(&headers(&[("cookie", "kongflow_console=")]), COOKIE),
            None
        );
        assert_eq!(cookie(&headers(&[]), COOKIE), None);
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_when_asked() {
        let c = set_cookie(Some("v"), Duration::from_secs(60), true);
        let c = c.to_str().unwrap();
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=60",
            "Path=/console",
        ] {
            assert!(c.contains(part), "{c}");
        }
        let c = set_cookie(None, Duration::from_secs(60), false);
        assert!(c.to_str().unwrap().contains("Max-Age=0"));
        assert!(!c.to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn only_the_same_origin_may_change_things() {
        assert!(same_origin(&headers(&[
            ("host", "ops.example:3030"),
            ("origin", "http://ops.example:3030")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "ops.example:3030"),
            ("origin", "https://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "ops.example"),
            ("origin", "null")
        ])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(same_origin(&headers(&[])));
    }

    #[test]
    fn the_form_token_must_match() {
        let s = Session { csrf: "tok".into() };
        assert!(csrf_ok(&s, Some("tok")));
        assert!(!csrf_ok(&s, Some("to")));
        assert!(!csrf_ok(&s, None));
    }
}
