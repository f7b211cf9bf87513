//! One-shot multicast DNS (RFC 6762 §5.1) for `.local` host names.
//!
//! Raspberry Pi OS and most small Linux images name themselves `<host>.local` through avahi, and unicast DNS does
//! not know those names. flotilla asks the link itself: one query for A and AAAA from an ephemeral port (never
//! 5353, so no local responder is disturbed and no group is joined) to 224.0.0.251:5353 and, where the host has
//! IPv6, [ff02::fb]:5353; sent again once if nothing answers; the whole wait bounded by [`MdnsOptions::wait`].
//! Responders answer such a query by unicast to the port it came from (§6.7), so the socket sees only answers
//! meant for it.
//!
//! Why the socket half is written here: the crates that speak mDNS are daemons (mdns-sd runs a thread bound to
//! 5353 that joins the groups and caches all it hears), responders (libmdns), or wrappers around avahi over D-Bus
//! (zeroconf), which a static binary on a stranger's device cannot count on; hickory-proto's experimental
//! `multicast` module is built for hickory's own request multiplexer and matches answers by message id, which
//! mDNS receivers must ignore (§18.1). So hickory-proto (already here through hickory-resolver) encodes the query
//! and decodes the answers, and this module does only the sending, the bounded wait and the acceptance rules.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// The mDNS port: answers must come from it (§6), queries must not (§5.1).
pub const MDNS_PORT: u16 = 5353;
pub const MDNS_V4: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(224, 0, 0, 251)), MDNS_PORT);
pub const MDNS_V6: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb)),
    MDNS_PORT,
);

/// The largest mDNS message (§17); a longer datagram is cut by the kernel and then fails to decode.
const MAX_MESSAGE: usize = 9000;
/// Datagrams read per lookup at most, whatever arrives: a flood on the link cannot keep a lookup spinning.
const MAX_DATAGRAMS: usize = 512;

#[derive(Debug, Clone)]
pub struct MdnsOptions {
    /// The whole lookup's bound, from the first query to giving up.
    pub wait: Duration,
    /// When to send the query once more if nothing acceptable came: one lost datagram on Wi-Fi is common.
    pub resend_after: Duration,
    /// After the first answer, how long to keep listening for the other family's (A and AAAA may come apart).
    pub linger: Duration,
}

impl Default for MdnsOptions {
    fn default() -> MdnsOptions {
        MdnsOptions {
            wait: Duration::from_millis(1500),
            resend_after: Duration::from_millis(500),
            linger: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MdnsError {
    #[error("{name:?} is not a valid host name: {reason}")]
    BadName { name: String, reason: String },
    #[error(
        "no mDNS answer for {name} within {secs:.1} s (asked 224.0.0.251:5353{v6}); is the host on this network \
         segment, and avahi-daemon (or another mDNS responder) running on it?"
    )]
    NoAnswer {
        name: String,
        secs: f64,
        /// ", [ff02::fb]:5353" when the IPv6 query went out too.
        v6: &'static str,
    },
    #[error(
        "cannot send an mDNS query for {name}: {reason}; check that a network interface with multicast is up \
         (ip link) and that a route covers 224.0.0.251 (ip route get 224.0.0.251)"
    )]
    Send { name: String, reason: String },
}

/// Whether `host` is a name in the `.local` domain, which belongs to mDNS (RFC 6762 §3): case-insensitive, with or
/// without the root's trailing dot, and with at least one label before `local`.
pub fn is_local(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.len() > ".local".len()
        && host
            .get(host.len() - ".local".len()..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case(".local"))
}

/// The question name, fully qualified.
pub fn question_name(host: &str) -> Result<Name, MdnsError> {
    let mut name = Name::from_ascii(host).map_err(|e| MdnsError::BadName {
        name: host.to_string(),
        reason: e.to_string(),
    })?;
    name.set_fqdn(true);
    Ok(name)
}

/// The query: one message asking A and AAAA for `name`. The id is random although mDNS receivers ignore it
/// (§18.1): a legacy unicast responder echoes it (§6.7), and a random one costs nothing. The QU bit is left clear:
/// from a port other than 5353 the answer comes by unicast anyway (§6.7), and some responders mishandle QU.
pub fn encode_query(name: &Name, id: u16) -> Result<Vec<u8>, MdnsError> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        // §18.6: mDNS has no recursion.
        .set_recursion_desired(false);
    message.add_query(Query::query(name.clone(), RecordType::A));
    message.add_query(Query::query(name.clone(), RecordType::AAAA));
    message.to_vec().map_err(|e| MdnsError::BadName {
        name: name.to_ascii(),
        reason: format!("cannot encode an mDNS query for it: {e}"),
    })
}

/// The addresses a datagram from `from` gives for `name`; empty when it is not an acceptable answer. Nothing here
/// trusts the datagram: anything that does not decode, or that breaks a rule, is dropped without a panic.
///
/// Rules, from RFC 6762: the source port must be 5353 (§6: other responses are silently ignored); it must be a
/// standard query response with response code 0 (§18.3, §18.11); the message id is not checked (§18.1); records
/// may be in the answer or the additional section (§6.2 puts the other family's address there), must name the
/// question exactly, compared case-insensitively (§16), be of class IN with or without the cache-flush bit (§10.2),
/// of type A or AAAA, and not be a goodbye (TTL 0, §10.1). Unspecified addresses are no destination and dropped.
pub fn accept_answer(datagram: &[u8], from: SocketAddr, name: &Name) -> Vec<IpAddr> {
    if from.port() != MDNS_PORT {
        return Vec::new();
    }
    let Ok(message) = Message::from_vec(datagram) else {
        return Vec::new();
    };
    if message.message_type() != MessageType::Response
        || message.op_code() != OpCode::Query
        || message.response_code() != ResponseCode::NoError
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    for record in message.answers().iter().chain(message.additionals()) {
        if let Some(ip) = address_for(record, name) {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

fn address_for(record: &Record, name: &Name) -> Option<IpAddr> {
    // The top bit of the class is mDNS's cache-flush flag, not part of the class.
    let class = u16::from(record.dns_class()) & 0x7fff;
    if class != 1 || record.ttl() == 0 || !same_name(record.name(), name) {
        return None;
    }
    let ip = match record.data() {
        RData::A(a) => IpAddr::V4(a.0),
        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
        _ => return None,
    };
    (!ip.is_unspecified()).then_some(ip)
}

fn same_name(a: &Name, b: &Name) -> bool {
    let text = |n: &Name| n.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    text(a) == text(b)
}

/// One socket per family; the IPv6 one is absent where the host has no IPv6.
struct Sockets {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
}

impl Sockets {
    async fn open() -> Sockets {
        Sockets {
            v4: ephemeral(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await,
            v6: ephemeral(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).await,
        }
    }

    /// Sends the query for `name` to each group; Ok when at least one send went out, else why none did.
    async fn send(&mut self, name: &str, query: &[u8]) -> Result<(), MdnsError> {
        let mut reasons = Vec::new();
        let mut sent = false;
        for (slot, group) in [(&mut self.v4, MDNS_V4), (&mut self.v6, MDNS_V6)] {
            let Some(socket) = slot.as_ref() else {
                continue;
            };
            match socket.send_to(query, group).await {
                Ok(_) => sent = true,
                Err(e) => {
                    reasons.push(format!("{group}: {e}"));
                    // A family that cannot send now (no IPv6 route, for one) will not later: stop listening on it.
                    if group.is_ipv6() {
                        *slot = None;
                    }
                }
            }
        }
        if sent {
            return Ok(());
        }
        let reason = if reasons.is_empty() {
            "no UDP socket could be opened".to_string()
        } else {
            reasons.join("; ")
        };
        Err(MdnsError::Send {
            name: name.to_string(),
            reason,
        })
    }

    async fn recv(
        &self,
        buf4: &mut [u8],
        buf6: &mut [u8],
    ) -> std::io::Result<(usize, SocketAddr, bool)> {
        tokio::select! {
            r = recv_on(self.v4.as_ref(), buf4) => r.map(|(n, from)| (n, from, false)),
            r = recv_on(self.v6.as_ref(), buf6) => r.map(|(n, from)| (n, from, true)),
        }
    }
}

async fn recv_on(
    socket: Option<&UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A UDP socket on an ephemeral port, never 5353 (§5.1: a one-shot querier must not send from it, or responders
/// would take it for a full mDNS peer and answer by multicast). IP TTL 255 as §11 asks of mDNS senders.
async fn ephemeral(any: SocketAddr) -> Option<UdpSocket> {
    for _ in 0..4 {
        let socket = UdpSocket::bind(any).await.ok()?;
        if socket.local_addr().ok()?.port() == MDNS_PORT {
            continue;
        }
        let ttl = match any {
            SocketAddr::V4(_) => socket.set_multicast_ttl_v4(255),
            // tokio has no hop-limit setter; link-local scope keeps the query on the link all the same.
            SocketAddr::V6(_) => Ok(()),
        };
        if let Err(e) = ttl {
            tracing::debug!("mDNS: cannot set the multicast TTL: {e}");
        }
        return Some(socket);
    }
    None
}

/// Asks the link for `host`'s addresses: A and AAAA, answers as [`accept_answer`] allows, within `options.wait`.
pub async fn resolve(host: &str, options: &MdnsOptions) -> Result<Vec<IpAddr>, MdnsError> {
    let name = question_name(host)?;
    let query = encode_query(&name, rand::random())?;
    let mut sockets = Sockets::open().await;
    let started = Instant::now();
    let mut deadline = started + options.wait;
    let mut resend = Some(started + options.resend_after);
    sockets.send(host, &query).await?;
    let mut found: Vec<IpAddr> = Vec::new();
    let mut buf4 = vec![0u8; MAX_MESSAGE];
    let mut buf6 = vec![0u8; MAX_MESSAGE];
    for _ in 0..MAX_DATAGRAMS {
        let until = match resend {
            Some(at) if at < deadline => at,
            _ => deadline,
        };
        match tokio::time::timeout_at(until, sockets.recv(&mut buf4, &mut buf6)).await {
            Ok(Ok((n, from, v6))) => {
                let datagram = if v6 { &buf6[..n] } else { &buf4[..n] };
                let ips = accept_answer(datagram, from, &name);
                if !ips.is_empty() && found.is_empty() {
                    deadline = deadline.min(Instant::now() + options.linger);
                    resend = None;
                }
                for ip in ips {
                    if !found.contains(&ip) {
                        found.push(ip);
                    }
                }
            }
            // An ICMP error on one socket (port unreachable from a previous send) is no reason to stop listening.
            Ok(Err(e)) => tracing::debug!("mDNS: receive error while asking for {host}: {e}"),
            Err(_) if Some(until) == resend => {
                resend = None;
                if let Err(e) = sockets.send(host, &query).await {
                    tracing::debug!("mDNS: resending failed: {e}");
                }
            }
            Err(_) => break,
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    if found.is_empty() {
        return Err(MdnsError::NoAnswer {
            name: host.to_string(),
            secs: options.wait.as_secs_f64(),
            v6: if sockets.v6.is_some() {
                ", [ff02::fb]:5353"
            } else {
                ""
            },
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_resolver::proto::rr::{DNSClass, RecordType};

    fn name(s: &str) -> Name {
        question_name(s).expect("valid name")
    }

    fn responder() -> SocketAddr {
        "192.168.1.20:5353".parse().expect("addr")
    }

    fn response(records: Vec<Record>, additionals: Vec<Record>) -> Message {
        let mut m = Message::new();
        m.set_id(0)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_authoritative(true);
        for r in records {
            m.add_answer(r);
        }
        for r in additionals {
            m.add_additional(r);
        }
        m
    }

    fn a(owner: &str, ip: [u8; 4], ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A::from(Ipv4Addr::from(ip))))
    }

    fn bytes(m: &Message) -> Vec<u8> {
        m.to_vec().expect("encode")
    }

    #[test]
    fn local_names_are_recognised_case_insensitively() {
        for yes in [
            "pi.local",
            "Registry.LOCAL",
            "a.b.local.",
            "registry-test.local",
        ] {
            assert!(is_local(yes), "{yes}");
        }
        for no in [
            "local",
            ".local",
            "localhost",
            "pi.locals",
            "pi.local.lan",
            "example.com",
            "",
        ] {
            assert!(!is_local(no), "{no}");
        }
    }

    #[test]
    fn the_query_asks_a_and_aaaa_without_recursion() {
        let q = encode_query(&name("Registry.local"), 0x1234).expect("encode");
        let m = Message::from_vec(&q).expect("decodes");
        assert_eq!(m.id(), 0x1234);
        assert_eq!(m.message_type(), MessageType::Query);
        assert!(!m.recursion_desired());
        let asked: Vec<(String, RecordType, DNSClass)> = m
            .queries()
            .iter()
            .map(|q| (q.name().to_ascii(), q.query_type(), q.query_class()))
            .collect();
        assert_eq!(
            asked,
            vec![
                ("Registry.local.".to_string(), RecordType::A, DNSClass::IN),
                (
                    "Registry.local.".to_string(),
                    RecordType::AAAA,
                    DNSClass::IN
                ),
            ]
        );
        // The header says two questions and nothing else (bytes 4..12).
        assert_eq!(&q[4..12], &[0, 2, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_matching_answer_gives_both_families_from_answers_and_additionals() {
        let v6 = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 7);
        let m = response(
            vec![a("REGISTRY.Local", [192, 168, 1, 20], 120)],
            vec![Record::from_rdata(
                name("registry.local"),
                120,
                RData::AAAA(AAAA::from(v6)),
            )],
        );
        let got = accept_answer(&bytes(&m), responder(), &name("registry.local"));
        assert_eq!(
            got,
            vec![IpAddr::V4(Ipv4Addr::new(192, 168, 1, 20)), IpAddr::V6(v6)]
        );
    }

    #[test]
    fn the_cache_flush_bit_is_not_part_of_the_class() {
        let mut wire = bytes(&response(
            vec![a("registry.local", [10, 0, 0, 5], 120)],
            vec![],
        ));
        // The class of the only record sits right after its name and type: find "\x00\x01\x00\x01" (type A,
        // class IN) after the header and the owner name, and set the top bit of the class.
        let at = wire
            .windows(4)
            .rposition(|w| w == [0, 1, 0, 1])
            .expect("type and class");
        wire[at + 2] |= 0x80;
        let got = accept_answer(&wire, responder(), &name("registry.local"));
        assert_eq!(got, vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))]);
    }

    #[test]
    fn answers_for_another_name_or_type_are_ignored() {
        let q = name("registry.local");
        let other = response(vec![a("printer.local", [192, 168, 1, 9], 120)], vec![]);
        assert!(accept_answer(&bytes(&other), responder(), &q).is_empty());
        let suffix = response(vec![a("x.registry.local", [192, 168, 1, 9], 120)], vec![]);
        assert!(accept_answer(&bytes(&suffix), responder(), &q).is_empty());
        let cname = response(
            vec![Record::from_rdata(
                q.clone(),
                120,
                RData::CNAME(CNAME(name("printer.local"))),
            )],
            vec![],
        );
        assert!(accept_answer(&bytes(&cname), responder(), &q).is_empty());
    }

    #[test]
    fn queries_errors_goodbyes_and_wrong_ports_are_ignored() {
        let q = name("registry.local");
        let good = response(vec![a("registry.local", [192, 168, 1, 20], 120)], vec![]);
        // From a port other than 5353 (§6).
        let from_elsewhere: SocketAddr = "192.168.1.20:40000".parse().expect("addr");
        assert!(accept_answer(&bytes(&good), from_elsewhere, &q).is_empty());
        // A query, not a response, even with records in it.
        let mut query = good.clone();
        query.set_message_type(MessageType::Query);
        assert!(accept_answer(&bytes(&query), responder(), &q).is_empty());
        // A non-zero response code (§18.11).
        let mut refused = good.clone();
        refused.set_response_code(ResponseCode::Refused);
        assert!(accept_answer(&bytes(&refused), responder(), &q).is_empty());
        // A goodbye: TTL 0 (§10.1).
        let goodbye = response(vec![a("registry.local", [192, 168, 1, 20], 0)], vec![]);
        assert!(accept_answer(&bytes(&goodbye), responder(), &q).is_empty());
        // An unspecified address is no place to connect to.
        let zero = response(vec![a("registry.local", [0, 0, 0, 0], 120)], vec![]);
        assert!(accept_answer(&bytes(&zero), responder(), &q).is_empty());
        // And the good one is taken, so the cases above failed for their own reason.
        assert_eq!(accept_answer(&bytes(&good), responder(), &q).len(), 1);
    }

    #[test]
    fn truncated_and_garbage_datagrams_are_ignored_not_panics() {
        let q = name("registry.local");
        let wire = bytes(&response(
            vec![a("registry.local", [192, 168, 1, 20], 120)],
            vec![],
        ));
        for cut in 0..wire.len() {
            assert!(
                accept_answer(&wire[..cut], responder(), &q).is_empty(),
                "cut at {cut}"
            );
        }
        // A compression pointer to itself, and random bytes.
        let mut looping = wire[..12].to_vec();
        looping[7] = 1; // one answer
        looping.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 120, 0, 4, 1, 2, 3, 4]);
        assert!(accept_answer(&looping, responder(), &q).is_empty());
        let mut seed: u32 = 0x2545_f491;
        for len in [1usize, 12, 13, 64, 512] {
            let noise: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let _ = accept_answer(&noise, responder(), &q);
        }
    }
}
