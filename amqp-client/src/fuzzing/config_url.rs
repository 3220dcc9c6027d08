//! The URL parser against properties any input must keep: it never panics,
//! and what it accepts is usable and round-trips.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use url::Url;

use crate::config::{Config, UrlError};

/// Every byte but the unreserved ones of RFC 3986 is escaped when a URL is
/// rebuilt.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'~')
    .remove(b'.');

/// Parses `text` as a [`Config`] and checks:
///
/// - it gives a config or a [`UrlError`] (a panic fails the fuzz target);
/// - neither the config's `Debug` nor the error depends on the password: the
///   same URL with another password gives the same result but for the
///   password itself (so the password shows in neither, unless its text is
///   also that of another part);
/// - a config's [`Config::address`] is `host:port` (brackets around an IPv6
///   host) and, for an IP host, a socket address;
/// - a URL rebuilt from the config's fields parses into the same config;
/// - for a plain URL (ASCII host, one path segment, no query), host, port
///   and vhost are the ones written, the vhost percent-decoded.
pub fn check_url(text: &str) {
    let parsed = Config::from_str(text);
    check_password_is_not_shown(text, &parsed);
    match &parsed {
        Ok(config) => {
            check_address(config);
            check_rebuilt_url(config);
            check_plain_url(text, config);
        }
        Err(error) => {
            // Display and Debug of every error must not panic either.
            let _ = (error.to_string(), format!("{error:?}"));
        }
    }
}

/// `Debug` of a config, pretty and not, which must cover every field but the
/// password: two configs with equal renderings and passwords are equal.
fn rendering(config: &Config) -> (String, String) {
    (format!("{config:?}"), format!("{config:#?}"))
}

fn check_password_is_not_shown(text: &str, parsed: &Result<Config, UrlError>) {
    if let Ok(config) = parsed {
        let mut other = config.clone();
        other.password = format!("{}-other", config.password);
        assert_eq!(
            rendering(config),
            rendering(&other),
            "the Debug of a config depends on its password"
        );
    }
    // The URL parser's own syntax errors are fixed texts that quote nothing
    // of the input; beyond them, the same URL with another password must fail
    // (or not) in the same way.
    let Ok(mut url) = Url::parse(text) else {
        return;
    };
    let Some(password) = url.password().map(str::to_owned) else {
        return;
    };
    // Compared with the URL as re-serialised, not `text`: only the password
    // differs between the two parses.
    let same = Config::from_str(url.as_str());
    let replacement = if password == "0" { "1" } else { "0" };
    if url.set_password(Some(replacement)).is_err() {
        return;
    }
    let swapped = Config::from_str(url.as_str());
    match (&same, &swapped) {
        (Ok(same), Ok(swapped)) => {
            assert_eq!(
                rendering(same),
                rendering(swapped),
                "a config depends on the password beyond its password field: {text:?}"
            );
            assert_eq!(swapped.password, replacement);
        }
        // The password itself was refused; the error names only the part.
        (Err(UrlError::Encoding { part: "password" }), _) => {}
        (Err(same), Err(swapped)) => assert_eq!(
            same, swapped,
            "an error depends on the password: {text:?}"
        ),
        (same, swapped) => panic!(
            "whether a URL parses depends on its password: {text:?} gave {:?}, with another password {:?}",
            same.as_ref().map(|_| ()),
            swapped.as_ref().map(|_| ())
        ),
    }
}

fn check_address(config: &Config) {
    assert!(!config.host.is_empty(), "empty host from a URL");
    let address = config.address();
    let port = format!(":{}", config.port);
    let host = address
        .strip_suffix(&port)
        .unwrap_or_else(|| panic!("address {address:?} does not end with the port"));
    if config.host.contains(':') {
        assert_eq!(
            host,
            format!("[{}]", config.host),
            "IPv6 host not bracketed"
        );
    } else {
        assert_eq!(host, config.host);
    }
    if let Ok(ip) = config.host.parse::<IpAddr>() {
        assert_eq!(
            address.parse::<SocketAddr>().ok(),
            Some(SocketAddr::new(ip, config.port)),
            "address {address:?} of an IP host is not a socket address"
        );
    }
}

/// The URL that says everything a URL can say of `config`.
fn rebuilt_url(config: &Config) -> String {
    let escape = |text: &str| utf8_percent_encode(text, ESCAPED).to_string();
    // `amqp://…?cacertfile=…` also turns TLS on: `amqps` with the same
    // parameters and an explicit port gives the same config.
    let scheme = if config.tls.is_some() {
        "amqps"
    } else {
        "amqp"
    };
    let host = if config.host.contains(':') {
        format!("[{}]", config.host)
    } else {
        config.host.clone()
    };
    let call_timeout = config.call_timeout.map_or(0, |t| t.as_millis());
    let mut url = format!(
        "{scheme}://{}:{}@{host}:{}/{}?heartbeat={}&frame_max={}&channel_max={}&connection_timeout={}&call_timeout={call_timeout}&auth_mechanism={}",
        escape(&config.user),
        escape(&config.password),
        config.port,
        escape(&config.vhost),
        config.heartbeat,
        config.frame_max,
        config.channel_max,
        config.connection_timeout.as_millis(),
        config.auth_mechanism.name(),
    );
    if let Some(tls) = &config.tls {
        if let Some(ca_file) = &tls.ca_file {
            let ca_file = ca_file.to_str().expect("a path from a URL is UTF-8");
            url.push_str(&format!("&cacertfile={}", escape(ca_file)));
        }
        if let Some(server_name) = &tls.server_name {
            url.push_str(&format!("&server_name_indication={}", escape(server_name)));
        }
    }
    if let Some(name) = &config.connection_name {
        url.push_str(&format!("&connection_name={}", escape(name)));
    }
    url
}

fn check_rebuilt_url(config: &Config) {
    let url = rebuilt_url(config);
    let again = Config::from_str(&url)
        .unwrap_or_else(|e| panic!("the URL rebuilt from a config does not parse: {url:?}: {e}"));
    assert_eq!(
        (rendering(config), &config.password),
        (rendering(&again), &again.password),
        "the URL rebuilt from a config gives another config: {url:?}"
    );
}

/// For a URL in the plain subset (`amqp[s]://host[:port][/segment]`, the host
/// ASCII letters, digits, `-` and `.`, the segment unreserved characters and
/// `%XX` escapes) the parts are checked against the text itself, not against
/// what the URL parser made of it.
fn check_plain_url(text: &str, config: &Config) {
    let Some((tls, rest)) = text
        .strip_prefix("amqp://")
        .map(|rest| (false, rest))
        .or_else(|| text.strip_prefix("amqps://").map(|rest| (true, rest)))
    else {
        return;
    };
    let (authority, segment) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let host_ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    let port = match port {
        None => Some(if tls { 5671 } else { 5672 }),
        Some(port) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            port.parse::<u16>().ok()
        }
        Some(_) => None,
    };
    let segment_ok = segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b));
    let (Some(port), true, true, false) = (port, host_ok, segment_ok, host.is_empty()) else {
        return;
    };
    // A host the URL parser reads as an IPv4 address (`1`, `0x7f.1`, …) is
    // not plain: the rule for that is the WHATWG one, not this check's.
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') || host.contains("0x") {
        return;
    }
    let Ok(vhost) = percent_encoding::percent_decode_str(segment).decode_utf8() else {
        return;
    };
    if segment.contains('%')
        && segment.split('%').skip(1).any(|escape| {
            escape.len() < 2
                || !escape.is_char_boundary(2)
                || u8::from_str_radix(&escape[..2], 16).is_err()
        })
    {
        // Not a valid escape: left to the URL parser.
        return;
    }
    let vhost = if segment.is_empty() { "/" } else { &vhost };
    assert_eq!(
        (config.host.as_str(), config.port, config.vhost.as_str()),
        (host, port, vhost),
        "{text:?} names another host, port or vhost"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_urls_of_the_config_tests_hold() {
        for url in [
            "amqp://user%40x:p%2Fw@rabbit.local:5673/my%2fvhost?heartbeat=5&frame_max=8192&channel_max=10&connection_timeout=1500&call_timeout=2500&auth_mechanism=amqplain",
            "amqp:///",
            "amqp://h/%2f",
            "amqps://h?cacertfile=%2Fetc%2Fca.pem&server_name_indication=rabbit",
            "amqp://h?cacertfile=ca.pem&connection_name=a+b%26c",
            "amqp://[::1]:5000/v",
            "amqp://127.0.0.1/.",
            "amqp://alice:s3cret@h/prod",
            "amqp://alice:%FF@h/",
            "amqp://alice:s3cret@h/a/b",
            "amqp://alice:s3cret@h/?heartbeat=x",
            "http://alice:s3cret@h/",
            "amqp:.%2E",
            "amqp://RaBBit.Local:15672/V",
            "amqp://0x7f.1/",
            "amqp://h%41st/x",
            "not a url",
            "",
        ] {
            check_url(url);
        }
    }

    /// The plain-URL check compares against the text: it must have run on
    /// these (a wrong vhost fails it).
    #[test]
    fn plain_urls_are_checked_against_their_text() {
        for (url, vhost) in [
            ("amqp://h/%2e", "."),
            ("amqp://rabbit-1.local:1/a~b", "a~b"),
        ] {
            let config: Config = url.parse().expect(url);
            assert_eq!(config.vhost, vhost);
            check_plain_url(url, &config);
        }
        let mut wrong: Config = "amqp://h/v".parse().expect("valid");
        wrong.vhost = "other".to_owned();
        let refused = std::panic::catch_unwind(|| check_plain_url("amqp://h/v", &wrong));
        assert!(refused.is_err(), "a wrong vhost went unnoticed");
    }

    /// URL-shaped strings from the parts URLs are made of.
    #[test]
    fn seeded_random_urls_hold() {
        const PARTS: [&str; 24] = [
            "amqp://",
            "amqps://",
            "amqp:",
            "//",
            "/",
            "@",
            ":",
            "user",
            "p%40ss",
            "host",
            "[::1]",
            "127.0.0.1",
            "5672",
            "%2f",
            "%2e",
            ".",
            "..",
            "?",
            "&",
            "=",
            "heartbeat",
            "cacertfile",
            "#",
            "é",
        ];
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2_000 {
            let mut url = String::new();
            for _ in 0..1 + state % 12 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                url.push_str(PARTS[(state % PARTS.len() as u64) as usize]);
            }
            check_url(&url);
        }
    }
}
