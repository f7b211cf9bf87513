//! Host name lookup without the C library's name service switch.
//!
//! The release binaries are static glibc builds, and a static glibc still resolves names through NSS, which
//! `dlopen`s the *device's* `libnss_*.so`: on a device whose glibc differs from the one flotilla was linked with
//! (Raspberry Pi OS bullseye, a Yocto image) that fails or crashes. So flotilla resolves registry host names
//! itself, with hickory, from the two files that NSS's usual `files dns` reads: `/etc/hosts` first, then the
//! name servers of `/etc/resolv.conf`. IP literals never reach a resolver.
//!
//! This adapter exists, instead of reqwest's `hickory-dns` feature, because that feature silently falls back to
//! Google's public resolvers when `/etc/resolv.conf` cannot be read: a device on a private network would send
//! its registry names to the Internet and fail far from the cause. Here a missing or unreadable resolv.conf
//! leaves `/etc/hosts` working and makes every other lookup fail with an error that names the file.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::sync::OnceCell;

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// A resolver shared by every HTTP client of one registry client.
#[derive(Debug, Clone, Default)]
pub struct SystemResolver {
    // Built on first use: the resolver must be created inside the Tokio runtime that runs the lookups, and a
    // registry client may be made before the runtime exists.
    state: Arc<OnceCell<Ready>>,
}

#[derive(Debug)]
struct Ready {
    resolver: TokioResolver,
    /// Why `/etc/resolv.conf` gave no name servers, if it did not: then only `/etc/hosts` can answer.
    no_servers: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {name}: {reason}")]
struct LookupError {
    name: String,
    reason: String,
}

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            let ready = state.get_or_init(build).await;
            let host = name.as_str();
            let lookup = ready.resolver.lookup_ip(host).await.map_err(|e| {
                let reason = match &ready.no_servers {
                    Some(why) => format!(
                        "not in /etc/hosts, and there is no name server to ask ({why}); add the host to \
                         /etc/hosts or a nameserver line to {RESOLV_CONF}"
                    ),
                    None => format!("{e} (name servers from {RESOLV_CONF}, after /etc/hosts)"),
                };
                LookupError {
                    name: host.to_string(),
                    reason,
                }
            })?;
            let addrs: Addrs = Box::new(
                lookup
                    .iter()
                    .map(|ip| SocketAddr::new(ip, 0))
                    .collect::<Vec<_>>()
                    .into_iter(),
            );
            Ok(addrs)
        })
    }
}

async fn build() -> Ready {
    let provider = TokioConnectionProvider::default();
    let (mut builder, no_servers) = match TokioResolver::builder(provider.clone()) {
        Ok(builder) => (builder, None),
        Err(e) => {
            let why = format!("{RESOLV_CONF}: {e}");
            tracing::warn!("{why}; host names resolve from /etc/hosts only");
            let hosts_only = ResolverConfig::new();
            (
                TokioResolver::builder_with_config(hosts_only, provider),
                Some(why),
            )
        }
    };
    // Both families, so the connector's happy-eyeballs can pick; a registry on `localhost` may listen on either.
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    Ready {
        resolver: builder.build(),
        no_servers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // /etc/hosts names `localhost` on every system this runs on, Debian's test machines included, so this checks
    // the hosts-file path without any name server.
    #[tokio::test]
    async fn localhost_resolves_to_loopback() {
        let resolver = SystemResolver::default();
        let name: Name = "localhost".parse().expect("valid name");
        let addrs: Vec<SocketAddr> = resolver.resolve(name).await.expect("resolves").collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
