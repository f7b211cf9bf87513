//! Image references as users write them (`alpine`, `ghcr.io/org/app@sha256:…`, `registry:5000/ns/app:tag`),
//! parsed with the grammar of distribution's `reference` package and normalised the way Docker does.
//!
//! Normalisation happens once, here: everything downstream sees `docker.io/library/alpine:latest`, so credentials,
//! mirrors and the store key never disagree about which image `alpine` means.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// The registry Docker Hub's short names belong to.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub actually serves the distribution API.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";
pub const DEFAULT_TAG: &str = "latest";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {input:?}: {reason}")]
    Invalid { input: String, reason: String },
}

fn invalid(input: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError::Invalid {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// A repository on a registry: `docker.io/library/alpine`, `registry.local:5000/ns/app`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    registry: String,
    path: String,
}

impl Repository {
    /// `host[:port]` as written in references (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry (`library/alpine`).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)
    }
}

/// A normalised image reference. A reference with neither tag nor digest gets the tag `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    repository: Repository,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    pub fn registry(&self) -> &str {
        &self.repository.registry
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// What goes in `/v2/<name>/manifests/<here>`: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }
}

/// The host that serves the API for `registry` (Docker Hub's name differs from its endpoint).
pub fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_ENDPOINT
    } else {
        registry
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Reference, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = d
                    .parse::<Digest>()
                    .map_err(|e| invalid(input, format!("bad digest: {e}")))?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag is the part after the last ':' provided no '/' follows it; otherwise that ':' was a port.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(t) = tag {
            check_tag(input, t)?;
        }
        if name.is_empty() {
            return Err(invalid(input, "repository name is missing"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(
                input,
                format!("repository name is longer than {MAX_NAME_LEN} characters"),
            ));
        }
        let (registry, path) = split_domain(name);
        let registry = match registry {
            Some(r) => {
                check_domain(input, r)?;
                if r == "index.docker.io" {
                    DOCKER_HUB.to_string()
                } else {
                    r.to_string()
                }
            }
            None => DOCKER_HUB.to_string(),
        };
        check_path(input, path)?;
        let path = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            repository: Repository { registry, path },
            tag,
            digest,
        })
    }
}

/// Docker's rule: the first component is a registry when it has a '.' or ':', is `localhost`, or has uppercase
/// letters (which a repository path may not have).
fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn check_tag(input: &str, tag: &str) -> Result<(), ReferenceError> {
    let bytes = tag.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(invalid(input, "tag after ':' is empty"));
    };
    if bytes.len() > MAX_TAG_LEN {
        return Err(invalid(
            input,
            format!("tag is longer than {MAX_TAG_LEN} characters"),
        ));
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    if !word(first) {
        return Err(invalid(
            input,
            format!("tag {tag:?} must start with a letter, digit or '_'"),
        ));
    }
    if let Some(bad) = tag
        .chars()
        .find(|&c| !(c.is_ascii() && (word(c as u8) || c == '.' || c == '-')))
    {
        return Err(invalid(
            input,
            format!(
                "tag {tag:?} contains {bad:?}; tags may hold letters, digits, '_', '.' and '-'"
            ),
        ));
    }
    Ok(())
}

fn check_domain(input: &str, domain: &str) -> Result<(), ReferenceError> {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid(input, format!("registry {domain:?} has an unclosed '['")))?;
        if v6.is_empty()
            || !v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(invalid(
                input,
                format!("registry {domain:?} is not a valid IPv6 address"),
            ));
        }
        let port =
            match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    invalid(input, format!("registry {domain:?}: junk after ']'"))
                })?),
            };
        (None, port)
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        for label in host.split('.') {
            let b = label.as_bytes();
            let ok = match (b.first(), b.last()) {
                (Some(f), Some(l)) => {
                    f.is_ascii_alphanumeric()
                        && l.is_ascii_alphanumeric()
                        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                }
                _ => false,
            };
            if !ok {
                return Err(invalid(
                    input,
                    format!(
                        "registry {domain:?} is not a valid host name (labels of letters, digits and inner '-')"
                    ),
                ));
            }
        }
    }
    if let Some(port) = port {
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return Err(invalid(
                input,
                format!("registry {domain:?} has an invalid port {port:?}"),
            ));
        }
    }
    Ok(())
}

fn check_path(input: &str, path: &str) -> Result<(), ReferenceError> {
    for component in path.split('/') {
        check_component(input, component)?;
    }
    Ok(())
}

/// A path component is lowercase alphanumerics joined by single separators: `.`, `_`, `__` or a run of `-`.
fn check_component(input: &str, c: &str) -> Result<(), ReferenceError> {
    if c.is_empty() {
        return Err(invalid(
            input,
            "repository path has an empty component ('//' or a trailing '/')",
        ));
    }
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid(
            input,
            format!("repository path component {c:?} must be lowercase"),
        ));
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < b.len() {
        let Some(&x) = b.get(i) else { break };
        if alnum(x) {
            expect_alnum = false;
            i += 1;
            continue;
        }
        if expect_alnum {
            return Err(invalid(
                input,
                format!(
                    "repository path component {c:?} must start and end with a letter or digit, and separators ('.', '_', '__', '-') may not follow each other"
                ),
            ));
        }
        let sep_len = match x {
            b'.' => 1,
            b'_' => {
                if b.get(i + 1) == Some(&b'_') {
                    2
                } else {
                    1
                }
            }
            b'-' => b[i..].iter().take_while(|&&y| y == b'-').count(),
            other => {
                return Err(invalid(
                    input,
                    format!(
                        "repository path component {c:?} contains {:?}; allowed are a-z, 0-9, '.', '_', '-'",
                        other as char
                    ),
                ));
            }
        };
        i += sep_len;
        expect_alnum = true;
    }
    if expect_alnum {
        return Err(invalid(
            input,
            format!("repository path component {c:?} must end with a letter or digit"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn real_forms() {
        let d = D;
        let rows: &[(&str, &str, &str, Option<&str>, bool)] = &[
            // input, registry, path, tag, has digest
            (
                "alpine",
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
            ),
            (
                "alpine:3.20",
                "docker.io",
                "library/alpine",
                Some("3.20"),
                false,
            ),
            (
                "library/alpine",
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
            ),
            (
                "docker.io/alpine",
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
            ),
            (
                "index.docker.io/library/alpine:edge",
                "docker.io",
                "library/alpine",
                Some("edge"),
                false,
            ),
            (
                "bitnami/redis:7",
                "docker.io",
                "bitnami/redis",
                Some("7"),
                false,
            ),
            (
                "ghcr.io/org/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "ghcr.io",
                "org/app",
                None,
                true,
            ),
            (
                "registry:5000/ns/app:tag",
                "registry:5000",
                "ns/app",
                Some("tag"),
                false,
            ),
            ("localhost/app", "localhost", "app", Some("latest"), false),
            (
                "localhost:5000/app:v1",
                "localhost:5000",
                "app",
                Some("v1"),
                false,
            ),
            (
                "127.0.0.1:5000/a/b/c:1.0-rc_1",
                "127.0.0.1:5000",
                "a/b/c",
                Some("1.0-rc_1"),
                false,
            ),
            ("[::1]:5000/app", "[::1]:5000", "app", Some("latest"), false),
            (
                "app:tag@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "docker.io",
                "library/app",
                Some("tag"),
                true,
            ),
            (
                "Registry.Example/app",
                "Registry.Example",
                "app",
                Some("latest"),
                false,
            ),
            (
                "quay.io/my_org/my__app--x.y",
                "quay.io",
                "my_org/my__app--x.y",
                Some("latest"),
                false,
            ),
        ];
        for (input, reg, path, tag, has_digest) in rows {
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry(), *reg, "{input}");
            assert_eq!(r.repository().path(), *path, "{input}");
            assert_eq!(r.tag(), *tag, "{input}");
            assert_eq!(
                r.digest().map(|x| x.to_string()).as_deref(),
                has_digest.then_some(d),
                "{input}"
            );
        }
        assert_eq!(
            "alpine".parse::<Reference>().unwrap().to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert_eq!(api_host("ghcr.io"), "ghcr.io");
    }

    #[test]
    fn bad_forms_say_what_is_wrong() {
        let rows: &[(&str, &str)] = &[
            ("", "empty"),
            ("Alpine", "lowercase"),
            ("ns/App:1", "lowercase"),
            ("alpine:", "tag after ':' is empty"),
            ("alpine:-x", "must start with"),
            ("alpine:a+b", "contains '+'"),
            ("a//b", "empty component"),
            ("app/", "empty component"),
            ("a..b", "separators"),
            ("-a", "start and end"),
            ("a-", "end with"),
            ("a$b", "contains '$'"),
            ("app@sha256:abc", "bad digest"),
            ("app@md5:abc", "bad digest"),
            ("host:99999/app", "invalid port"),
            ("host:/app", "invalid port"),
            ("-bad.host/app", "not a valid host"),
            ("[zz]:5/app", "IPv6"),
        ];
        for (input, needle) in rows {
            let err = input.parse::<Reference>().unwrap_err().to_string();
            assert!(err.contains(needle), "{input}: {err}");
        }
        let long_tag = format!("app:{}", "a".repeat(129));
        assert!(
            long_tag
                .parse::<Reference>()
                .unwrap_err()
                .to_string()
                .contains("longer than 128")
        );
        assert!(
            format!("app:{}", "a".repeat(128))
                .parse::<Reference>()
                .is_ok()
        );
        let long_name = format!("r.io/{}", "a".repeat(260));
        assert!(
            long_name
                .parse::<Reference>()
                .unwrap_err()
                .to_string()
                .contains("longer than 255")
        );
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,4}(([._]|__|-{1,3})[a-z0-9]{1,4}){0,2}"
    }

    fn domain() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("localhost".to_string())),
            (
                "[a-z0-9]{1,5}(\\.[a-z0-9]{1,5}){1,2}",
                proptest::option::of(1u16..)
            )
                .prop_map(|(h, p)| Some(match p {
                    Some(p) => format!("{h}:{p}"),
                    None => h,
                })),
        ]
    }

    proptest! {
        #[test]
        fn parse_display_round_trips(
            domain in domain(),
            path in proptest::collection::vec(component(), 1..4),
            tag in proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
            digest in proptest::option::of("[0-9a-f]{64}"),
        ) {
            // Without a domain, a first component with '.' (or `localhost`) would be read as one: Docker's rule.
            prop_assume!(domain.is_some() || (!path[0].contains('.') && path[0] != "localhost"));
            let mut s = String::new();
            if let Some(d) = &domain {
                s.push_str(d);
                s.push('/');
            }
            s.push_str(&path.join("/"));
            if let Some(t) = &tag {
                s.push(':');
                s.push_str(t);
            }
            if let Some(d) = &digest {
                s.push_str("@sha256:");
                s.push_str(d);
            }
            let r: Reference = s.parse().map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
            let again: Reference = r.to_string().parse().map_err(|e| TestCaseError::fail(format!("{r}: {e}")))?;
            prop_assert_eq!(&again, &r);
            prop_assert_eq!(again.to_string(), r.to_string());
        }
    }
}
