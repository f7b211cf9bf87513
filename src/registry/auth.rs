//! The pure parts of registry authentication: `WWW-Authenticate` challenges, token responses, and the token cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// What a registry asked for in its 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses a `WWW-Authenticate` value (possibly several challenges) and returns the one flotilla should answer:
/// Bearer when offered, else Basic. Unknown schemes are skipped; `None` when nothing usable is offered.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let mut bearer = None;
    let mut basic = false;
    for (scheme, params) in parse_challenges(header) {
        if scheme.eq_ignore_ascii_case("bearer") {
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(pk, _)| pk.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            if let Some(realm) = get("realm") {
                bearer.get_or_insert(Challenge::Bearer {
                    realm,
                    service: get("service"),
                    scope: get("scope"),
                });
            }
        } else if scheme.eq_ignore_ascii_case("basic") {
            basic = true;
        }
    }
    bearer.or(basic.then_some(Challenge::Basic))
}

type Params = Vec<(String, String)>;

/// RFC 7235: `scheme k=v, k="v", scheme2 k=v`. A token not followed by '=' starts a new challenge.
fn parse_challenges(s: &str) -> Vec<(String, Params)> {
    let mut out: Vec<(String, Params)> = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| c == '=' || c == ',' || c.is_whitespace())
            .unwrap_or(rest.len());
        let word = &rest[..end];
        let after = rest[end..].trim_start();
        if let Some(value_part) = after.strip_prefix('=').filter(|_| !out.is_empty()) {
            let value_part = value_part.trim_start();
            let (value, remaining) = if let Some(q) = value_part.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = q.char_indices();
                let mut consumed = q.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            consumed = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &q[consumed..])
            } else {
                let e = value_part.find(',').unwrap_or(value_part.len());
                (value_part[..e].trim().to_string(), &value_part[e..])
            };
            if let Some((_, params)) = out.last_mut() {
                params.push((word.to_string(), value));
            }
            rest = remaining.trim_start();
        } else if word.is_empty() {
            // A stray ',' or '='.
            rest = after.get(1..).unwrap_or("").trim_start();
            continue;
        } else {
            out.push((word.to_string(), Vec::new()));
            rest = after;
        }
        rest = rest.trim_start_matches([',', ' ', '\t']);
    }
    out
}

/// The token endpoint's answer (distribution's token spec; `access_token` is the OAuth2 spelling).
#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// A token and how long it lives. The spec's floor is 60 s, which is also the default.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    pub lifetime: Duration,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// Why a token endpoint's answer is not a token. Either way the endpoint is not a registry's token service.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the answer is not token JSON: {0}; check the realm the registry names")]
    NotJson(#[source] serde_json::Error),
    #[error("the answer has no \"token\"; check the realm the registry names")]
    NoToken,
}

pub fn parse_token(body: &[u8]) -> Result<Token, TokenError> {
    let r: TokenResponse = serde_json::from_slice(body).map_err(TokenError::NotJson)?;
    let value = r
        .token
        .or(r.access_token)
        .filter(|t| !t.is_empty())
        .ok_or(TokenError::NoToken)?;
    Ok(Token {
        value,
        lifetime: Duration::from_secs(r.expires_in.unwrap_or(60).max(60)),
    })
}

/// Tokens per (registry host, scope) until they expire, less a margin so none expires in flight.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
}

const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

impl TokenCache {
    pub fn get(&self, host: &str, scope: &str, now: Instant) -> Option<String> {
        let mut map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let key = (host.to_string(), scope.to_string());
        match map.get(&key) {
            Some((t, until)) if now < *until => Some(t.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn put(&self, host: &str, scope: &str, token: &Token, now: Instant) {
        let until = crate::clock::after(now, token.lifetime.saturating_sub(EXPIRY_MARGIN));
        let mut map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            (host.to_string(), scope.to_string()),
            (token.value.clone(), until),
        );
    }

    pub fn forget(&self, host: &str, scope: &str) {
        let mut map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&(host.to_string(), scope.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_challenges() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            parse_challenge(hub),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        // GHCR and Harbor spell it the same; unquoted values and odd spacing are allowed by RFC 7235.
        let odd = r#"bearer  realm=https://h.io/service/token , service=harbor-registry,scope="repository:a/b:pull,push""#;
        assert_eq!(
            parse_challenge(odd),
            Some(Challenge::Bearer {
                realm: "https://h.io/service/token".into(),
                service: Some("harbor-registry".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        let both = r#"Basic realm="x", Bearer realm="https://t/\"q\"",service=s"#;
        assert!(
            matches!(parse_challenge(both), Some(Challenge::Bearer { realm, .. }) if realm == "https://t/\"q\"")
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(""), None);
        assert_eq!(parse_challenge("Bearer service=s"), None);
        assert_eq!(
            parse_challenge(r#"Bearer realm="unterminated"#),
            Some(Challenge::Bearer {
                realm: "unterminated".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenge(",,=,"), None);
    }

    #[test]
    fn token_answers() {
        let t =
            parse_token(br#"{"token":"abc","expires_in":300,"issued_at":"2024-01-01T00:00:00Z"}"#)
                .unwrap();
        assert_eq!(
            (t.value.as_str(), t.lifetime),
            ("abc", Duration::from_secs(300))
        );
        let t = parse_token(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(
            (t.value.as_str(), t.lifetime),
            ("xyz", Duration::from_secs(60))
        );
        assert_eq!(
            parse_token(br#"{"token":"a","expires_in":5}"#)
                .unwrap()
                .lifetime,
            Duration::from_secs(60)
        );
        assert!(
            parse_token(b"<html>")
                .unwrap_err()
                .to_string()
                .contains("not token JSON")
        );
        assert!(
            parse_token(br#"{"token":""}"#)
                .unwrap_err()
                .to_string()
                .contains("no \"token\"")
        );
        assert!(!format!("{t:?}").contains("xyz"));
    }

    #[test]
    fn cache_expires() {
        let c = TokenCache::default();
        let t0 = Instant::now();
        let tok = Token {
            value: "v".into(),
            lifetime: Duration::from_secs(60),
        };
        c.put("h", "repository:a:pull", &tok, t0);
        assert_eq!(
            c.get("h", "repository:a:pull", t0 + Duration::from_secs(49))
                .as_deref(),
            Some("v")
        );
        assert_eq!(c.get("h", "repository:b:pull", t0), None);
        assert_eq!(c.get("other", "repository:a:pull", t0), None);
        assert_eq!(
            c.get("h", "repository:a:pull", t0 + Duration::from_secs(50)),
            None
        );
    }
}
