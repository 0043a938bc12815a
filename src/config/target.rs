//! Where `upstream.base_url` may point, beyond being an http(s) URL: at a path the upstream
//! reads as it is written (no dot segment, no encoded slash), not under the simulator's
//! private `/_sim` controls, and not at this gateway's own listeners (a loop: every request
//! would call the gateway itself). Pure checks on the parsed URL and the configured
//! addresses; only an unspecified listen address asks the host which addresses are its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};

/// Why the gateway cannot forward under `base`, if it cannot. `listeners` are the
/// gateway's own addresses, each with the key that names it.
pub(super) fn problem(base: &http::Uri, listeners: &[(&str, SocketAddr)]) -> Option<String> {
    if let Some(why) = path_problem(base.path()) {
        return Some(why.to_string());
    }
    own_address(base, listeners).map(|listen| {
        format!(
            "points at this gateway's own {listen}: every request would call the gateway \
             itself; point it at the CX Social API (e.g. \"https://api.engagor.com\")"
        )
    })
}

/// Why the gateway cannot ask `token_url` for tokens, if it cannot: it is one of the
/// gateway's own `listeners` (found as for the base URL), which would answer every refresh
/// itself, never with a token.
pub(super) fn token_url_problem(
    token_url: &http::Uri,
    listeners: &[(&str, SocketAddr)],
) -> Option<String> {
    own_address(token_url, listeners).map(|listen| {
        format!(
            "points at this gateway's own {listen}: every token refresh would ask the \
             gateway itself, which hands out no tokens; point it at the CX Social OAuth \
             endpoint (e.g. \"https://app.engagor.com/oauth/access_token/\")"
        )
    })
}

/// Why `path` (the base URL's) cannot prefix every forwarded path, if it cannot.
fn path_problem(path: &str) -> Option<&'static str> {
    for segment in path.split('/') {
        let lower = segment.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") {
            return Some(
                "must not hold an encoded slash or backslash (%2F, %5C) in its path: servers \
                 disagree on whether it splits a segment, so no one can say where requests go",
            );
        }
        let decoded = percent_decoded(segment);
        if decoded == "." || decoded == ".." {
            return Some(
                "must not hold a dot segment (/./ or /../, raw or percent-encoded) in its \
                 path: the upstream would resolve it, and requests would leave the base",
            );
        }
        // Read as the gateway reads a client's first segment before refusing `/_sim`.
        let folded = decoded.trim().trim_end_matches(['.', ' ', '\t']);
        if folded.eq_ignore_ascii_case("_sim") {
            return Some(
                "must not point under /_sim: that is the simulator's private control prefix, \
                 which the gateway never forwards to (point it at the simulator's root)",
            );
        }
    }
    None
}

/// `text` with each `%XX` decoded (bytes that are no UTF-8 are replaced).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The listener `base` would reach (its key and address), when its host is an IP literal
/// or `localhost` and one of `listeners` serves that address and port. Port 0 listeners are
/// skipped: their port is only known once bound.
fn own_address(base: &http::Uri, listeners: &[(&str, SocketAddr)]) -> Option<String> {
    let host = base.host()?;
    let port = base
        .port_u16()
        .unwrap_or(if base.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ips: Vec<IpAddr> = match host_address(bare) {
        Some(ip) => vec![ip],
        None if is_localhost(bare) => resolved_localhost(port),
        None => return None,
    };
    for (key, listen) in listeners {
        if listen.port() == 0 || listen.port() != port {
            continue;
        }
        if ips.iter().any(|ip| serves(listen.ip(), *ip)) {
            return Some(format!("{key} ({listen})"));
        }
    }
    None
}

/// The address a host written as an IP literal names, read as the upstream client reads
/// it: hyper's connector hands a host that is not a dotted quad or an IPv6 address to the
/// system resolver, whose numeric parsing is `inet_aton`'s, so `127.1`, `2130706433`,
/// `0x7f000001` and `0177.0.0.1` are all 127.0.0.1 ([`inet_aton`]). A name: `None`.
fn host_address(host: &str) -> Option<IpAddr> {
    host.parse::<IpAddr>()
        .ok()
        .or_else(|| inet_aton(host).map(IpAddr::V4))
}

/// `text` as `inet_aton` reads an IPv4 address: one to four parts split by `.`, each
/// decimal, octal after a leading `0` or hex after `0x`/`0X`; the last part fills the bytes
/// the others leave (`a` is 32 bits, `a.b` 8.24, `a.b.c` 8.8.16), every other part is one
/// byte. Anything else (an empty part, a digit the base lacks, a part too large, a trailing
/// byte) is no address.
fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) = match part.as_bytes() {
            [b'0', b'x' | b'X', rest @ ..] if !rest.is_empty() => (&part[2..], 16),
            [b'0', _, ..] => (&part[1..], 8),
            [_, ..] => (*part, 10),
            [] => return None,
        };
        if !digits.bytes().all(|b| (b as char).is_digit(radix)) {
            return None;
        }
        values.push(u32::from_str_radix(digits, radix).ok()?);
    }
    let (last, leading) = values.split_last()?;
    let last_bits = 32 - 8 * leading.len() as u32;
    if leading.iter().any(|&v| v > 0xFF) || u64::from(*last) >= 1u64 << last_bits {
        return None;
    }
    let address = leading
        .iter()
        .enumerate()
        .fold(*last, |a, (i, &v)| a | v << (24 - 8 * i as u32));
    Some(Ipv4Addr::from(address))
}

/// `localhost` and the names under it, which resolve to loopback (RFC 6761).
fn is_localhost(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// What `localhost` resolves to here, or both loopback addresses if it cannot be resolved.
fn resolved_localhost(port: u16) -> Vec<IpAddr> {
    let found: Vec<IpAddr> = ("localhost", port)
        .to_socket_addrs()
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .unwrap_or_default();
    match found.is_empty() {
        true => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
        false => found,
    }
}

/// Whether a listener bound to `listen` accepts a connection made to `ip`.
fn serves(listen: IpAddr, ip: IpAddr) -> bool {
    let ip = match ip {
        // A connection to the unspecified address goes to this host's loopback.
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        other => other,
    };
    if listen == ip {
        return true;
    }
    // An unspecified listener serves every address of this host (`0.0.0.0` the IPv4 ones,
    // `[::]` all of them on a dual-stack host): one this host can bind to is its own.
    let family = matches!(listen, IpAddr::V6(_)) || ip.is_ipv4();
    listen.is_unspecified()
        && family
        && (ip.is_loopback() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(listen: &str, admin: &str) -> [(&'static str, SocketAddr); 2] {
        [
            ("server.listen", listen.parse().expect("address")),
            ("server.admin_listen", admin.parse().expect("address")),
        ]
    }

    fn refused(base: &str, listeners: &[(&str, SocketAddr)]) -> Option<String> {
        problem(&base.parse().expect("a URI"), listeners)
    }

    #[test]
    fn paths_that_leave_the_base_or_reach_the_simulators_controls_are_refused() {
        let listeners = at("127.0.0.1:8080", "127.0.0.1:9090");
        for (base, says) in [
            ("http://127.0.0.1:4000/_sim", "/_sim"),
            ("http://127.0.0.1:4000/api/_SIM", "/_sim"),
            ("http://127.0.0.1:4000/%5Fsim", "/_sim"),
            ("http://127.0.0.1:4000/a/../b", "dot segment"),
            ("http://127.0.0.1:4000/a/./b", "dot segment"),
            ("http://127.0.0.1:4000/a/%2e%2E/b", "dot segment"),
            ("http://127.0.0.1:4000/a%2Fb", "encoded slash"),
            ("http://127.0.0.1:4000/a%5cb", "encoded slash"),
        ] {
            let why = refused(base, &listeners).unwrap_or_default();
            assert!(why.contains(says), "{base}: expected {says:?}, saw {why:?}");
        }
        for base in [
            "https://api.engagor.com",
            "http://127.0.0.1:4000/v1/simulate",
            "http://127.0.0.1:4000/a.b/_simple",
        ] {
            assert_eq!(refused(base, &listeners), None, "{base}: expected accepted");
        }
    }

    #[test]
    fn the_gateways_own_listeners_are_refused_as_the_upstream() {
        let listeners = at("127.0.0.1:8080", "0.0.0.0:9090");
        for (base, key) in [
            ("http://127.0.0.1:8080", "server.listen"),
            ("http://localhost:8080/", "server.listen"),
            ("http://0.0.0.0:8080", "server.listen"),
            ("http://[::ffff:127.0.0.1]:8080", "server.listen"),
            ("http://127.0.0.1:9090", "server.admin_listen"),
            ("http://127.0.0.2:9090", "server.admin_listen"),
        ] {
            let why = refused(base, &listeners).unwrap_or_default();
            assert!(
                why.contains(key) && why.contains("call the gateway itself"),
                "{base}: expected a loop through {key}, saw {why:?}"
            );
        }
        let default_port = at("127.0.0.1:80", "127.0.0.1:443");
        let why = refused("https://127.0.0.1", &default_port).unwrap_or_default();
        assert!(
            why.contains("server.admin_listen"),
            "https's default port: expected a loop, saw {why:?}"
        );
        for base in [
            "http://127.0.0.1:8081",
            "http://127.0.0.2:8080",
            "http://10.255.255.1:8080",
            "https://api.engagor.com:8080",
        ] {
            assert_eq!(refused(base, &listeners), None, "{base}: expected accepted");
        }
        for base in [
            "http://127.1:8080",
            "http://2130706433:8080",
            "http://0x7f000001:8080",
            "http://0177.0.0.1:8080",
            "http://[::ffff:7f00:1]:8080",
            "http://127.0.0.1:8080/",
        ] {
            let why = refused(base, &listeners).unwrap_or_default();
            assert!(
                why.contains("server.listen"),
                "{base}: expected a loop, saw {why:?}"
            );
        }
        let any_port = at("127.0.0.1:0", "127.0.0.1:0");
        assert_eq!(refused("http://127.0.0.1:8080", &any_port), None);
    }

    #[test]
    fn ipv4_is_read_in_every_spelling_inet_aton_reads() {
        let lo = Some(Ipv4Addr::LOCALHOST);
        for text in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "0x7f.1",
            "0177.0.0.1",
            "0177.0.0.01",
            "017700000001",
            "127.0x0.0.1",
        ] {
            assert_eq!(inet_aton(text), lo, "{text}");
        }
        assert_eq!(inet_aton("0"), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(inet_aton("10.0x10000"), Some(Ipv4Addr::new(10, 1, 0, 0)));
        assert_eq!(inet_aton("1.2.65535"), Some(Ipv4Addr::new(1, 2, 255, 255)));
        assert_eq!(inet_aton("4294967295"), Some(Ipv4Addr::BROADCAST));
        for text in [
            "",
            "127.",
            ".1",
            "127..1",
            "1.2.3.4.5",
            "256.1",
            "1.2.65536",
            "4294967296",
            "08",
            "0x",
            "0xg",
            "1e3",
            "+1",
            "127.0.0.1 ",
            "api.engagor.com",
            "localhost",
        ] {
            assert_eq!(inet_aton(text), None, "{text:?}");
        }
        assert_eq!(
            host_address("::1"),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            "IPv6 as before"
        );
    }
}
