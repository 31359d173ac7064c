//! Who the client is: the socket peer, or, when the peer is a trusted proxy, the right-most
//! `X-Forwarded-For` address that is not itself a trusted proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pingora::http::RequestHeader;

use crate::runtime::{RuntimeState, canonical};

/// The downstream peer and the client behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInfo {
    /// The socket peer.
    pub peer: IpAddr,
    /// Whether the peer is in `trusted_proxies`.
    pub trusted: bool,
    /// The client address used for hashing, logs and (later) access rules.
    pub client_ip: IpAddr,
}

/// Resolve the client of a request arriving from `peer`.
pub fn resolve(state: &RuntimeState, peer: Option<&SocketAddr>, req: &RequestHeader) -> ClientInfo {
    let peer = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| canonical(a.ip()));
    let trusted = state.is_trusted(peer);
    let mut client_ip = peer;
    if trusted {
        let entries: Vec<&str> = req
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for entry in entries.iter().rev() {
            let Some(ip) = parse_forwarded_ip(entry) else {
                break; // garbage: believe nothing further left
            };
            client_ip = ip;
            if !state.is_trusted(ip) {
                break;
            }
        }
    }
    ClientInfo {
        peer,
        trusted,
        client_ip,
    }
}

/// Parse one `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:80`.
pub fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = e.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    e.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn state(trusted: &str) -> RuntimeState {
        let yaml = format!(
            "listeners: [{{address: 127.0.0.1:1}}]\ntrusted_proxies: {trusted}\n\
             upstreams: {{u: {{backends: [{{address: 127.0.0.1:2}}]}}}}\n"
        );
        RuntimeState::new(Config::from_yaml(&yaml, "").unwrap())
    }

    fn req(xff: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for v in xff {
            r.append_header("X-Forwarded-For", *v).unwrap();
        }
        r
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let st = state("[10.0.0.0/8]");
        let c = resolve(&st, Some(&peer("192.0.2.9:5000")), &req(&["127.0.0.1"]));
        assert!(!c.trusted);
        assert_eq!(c.client_ip, "192.0.2.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn trusted_chain_yields_rightmost_untrusted() {
        let st = state("[10.0.0.0/8]");
        let c = resolve(
            &st,
            Some(&peer("10.1.1.1:5000")),
            &req(&["6.6.6.6, 203.0.113.7", "10.2.2.2"]),
        );
        assert!(c.trusted);
        assert_eq!(c.client_ip, "203.0.113.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn garbage_stops_the_walk() {
        let st = state("[10.0.0.0/8]");
        let c = resolve(
            &st,
            Some(&peer("10.1.1.1:5000")),
            &req(&["1.2.3.4, <script>, 10.3.3.3"]),
        );
        assert_eq!(c.client_ip, "10.3.3.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            parse_forwarded_ip("[2001:db8::1]:80"),
            "2001:db8::1".parse().ok()
        );
        assert_eq!(parse_forwarded_ip(" 1.2.3.4:99 "), "1.2.3.4".parse().ok());
        let mapped = resolve(&st, Some(&peer("[::ffff:10.0.0.1]:1")), &req(&[]));
        assert!(mapped.trusted);
    }
}
