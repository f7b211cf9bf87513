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
//!
//! Names in `.local` belong to multicast DNS (avahi's names on Raspberry Pi OS), which no unicast server knows:
//! for them the order is `/etc/hosts`, then a one-shot mDNS query ([`super::mdns`]), then the unicast name servers
//! all the same (some sites do serve `.local` by unicast). The registry client and the fleet link both resolve
//! through this, so neither ever reaches NSS.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_resolver::config::{LookupIpStrategy, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::Query;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::{Hosts, TokioResolver};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::sync::OnceCell;

use super::mdns::{self, MdnsError, MdnsOptions};

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The resolver of every HTTP client flotilla makes: the registry client's and the fleet link's.
#[derive(Debug, Clone, Default)]
pub struct SystemResolver {
    // Built on first use: the resolver must be created inside the Tokio runtime that runs the lookups, and a
    // registry client may be made before the runtime exists.
    state: Arc<OnceCell<Ready>>,
    mdns: MdnsOptions,
}

#[derive(Debug)]
struct Ready {
    resolver: TokioResolver,
    /// Why `/etc/resolv.conf` gave no name servers, if it did not: then only `/etc/hosts` can answer.
    no_servers: Option<String>,
    /// `/etc/hosts`, read for `.local` names, which must find it before mDNS; hickory reads it for the others.
    hosts: Option<Hosts>,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot resolve {name}: {reason}")]
    Unicast { name: String, reason: String },
    #[error(
        "cannot resolve {name}: {mdns} (and the name servers of {RESOLV_CONF} do not know it: {unicast})"
    )]
    Local {
        name: String,
        mdns: MdnsError,
        unicast: String,
    },
}

impl SystemResolver {
    /// The addresses of `host`, from `/etc/hosts`, mDNS for `.local` names, or the name servers.
    pub async fn lookup(&self, host: &str) -> Result<Vec<std::net::IpAddr>, LookupError> {
        let ready = self.state.get_or_init(build).await;
        let mut mdns_failure = None;
        if mdns::is_local(host) {
            if let Some(ips) = ready.in_hosts_file(host) {
                return Ok(ips);
            }
            match mdns::resolve(host, &self.mdns).await {
                Ok(ips) => return Ok(ips),
                Err(e) => {
                    tracing::debug!("{e}; asking the unicast name servers");
                    mdns_failure = Some(e);
                }
            }
        }
        match ready.resolver.lookup_ip(host).await {
            Ok(lookup) => Ok(lookup.iter().collect()),
            Err(e) => {
                let unicast = match &ready.no_servers {
                    Some(why) => format!(
                        "not in /etc/hosts, and there is no name server to ask ({why}); add the host to \
                         /etc/hosts or a nameserver line to {RESOLV_CONF}"
                    ),
                    None => format!("{e} (name servers from {RESOLV_CONF}, after /etc/hosts)"),
                };
                Err(match mdns_failure {
                    Some(mdns) => LookupError::Local {
                        name: host.to_string(),
                        mdns,
                        unicast,
                    },
                    None => LookupError::Unicast {
                        name: host.to_string(),
                        reason: unicast,
                    },
                })
            }
        }
    }
}

impl Ready {
    fn in_hosts_file(&self, host: &str) -> Option<Vec<std::net::IpAddr>> {
        let hosts = self.hosts.as_ref()?;
        let name = mdns::question_name(host).ok()?;
        let mut ips = Vec::new();
        for kind in [RecordType::A, RecordType::AAAA] {
            if let Some(lookup) = hosts.lookup_static_host(&Query::query(name.clone(), kind)) {
                ips.extend(lookup.iter().filter_map(|r| r.ip_addr()));
            }
        }
        (!ips.is_empty()).then_some(ips)
    }
}

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let ips = this.lookup(name.as_str()).await?;
            let addrs: Addrs = Box::new(
                ips.into_iter()
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
    let hosts = Hosts::from_system()
        .inspect_err(|e| tracing::debug!("/etc/hosts: {e}; .local names go straight to mDNS"))
        .ok();
    Ready {
        resolver: builder.build(),
        no_servers,
        hosts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `.local` names must find /etc/hosts before any mDNS query goes out: a pinned address wins, whatever case
    // either side is written in, and a name it lacks is left to mDNS.
    #[tokio::test]
    async fn local_names_are_looked_up_in_the_hosts_file_first() {
        let mut hosts = Hosts::default();
        hosts
            .read_hosts_conf(
                &b"10.9.8.7 Registry.Local\nfe80::7 registry.local\n192.0.2.9 other.lan\n"[..],
            )
            .expect("hosts text");
        let ready = Ready {
            resolver: TokioResolver::builder_with_config(
                ResolverConfig::new(),
                TokioConnectionProvider::default(),
            )
            .build(),
            no_servers: None,
            hosts: Some(hosts),
        };
        let mut got = ready
            .in_hosts_file("REGISTRY.local")
            .expect("in the hosts file");
        got.sort();
        assert_eq!(
            got,
            vec![
                "10.9.8.7".parse::<std::net::IpAddr>().expect("ip"),
                "fe80::7".parse().expect("ip"),
            ]
        );
        assert_eq!(ready.in_hosts_file("printer.local"), None);
    }

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
