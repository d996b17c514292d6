//! Looking up an upstream's name: in a hosts(5)-format file first (`--hosts-file`),
//! then through the system resolver (getaddrinfo).
//!
//! getaddrinfo blocks, for seconds when a DNS server does not answer: [`lookup`] runs
//! on the main thread while the configuration is built, and on the resolver thread
//! (`upstream::resolve`) after that, never on a worker.
//!
//! This module uses nothing of the crate but std, so that the configuration (at
//! start-up) and the resolver (every `--resolve-interval`) share it without either
//! importing the other.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;

/// A hosts(5) file as it was when read: each name with its addresses, in file order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Hosts {
    /// Names lower-cased: names are case-insensitive, as in DNS.
    names: HashMap<String, Vec<IpAddr>>,
}

impl Hosts {
    /// Reads and parses the file at `path`. The error is read(2)'s, with the path.
    pub fn read(path: &Path) -> io::Result<Hosts> {
        let bytes = std::fs::read(path)
            .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", path.display())))?;
        Ok(Hosts::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// Parses hosts(5) text: per line an address, then one or more names; `#` starts a
    /// comment. A line whose first field is not an IPv4 or IPv6 address (or an IPv6
    /// address with a `%zone`, which names an interface and not an upstream) is
    /// skipped, as glibc skips it. Several lines for one name give it several
    /// addresses, each once.
    pub fn parse(text: &str) -> Hosts {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut fields = line.split_ascii_whitespace();
            let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
                continue;
            };
            for name in fields {
                let ips = names.entry(normalize(name)).or_default();
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        Hosts { names }
    }

    /// The addresses the file gives `name`, if it names it.
    pub fn get(&self, name: &str) -> Option<&[IpAddr]> {
        self.names.get(&normalize(name)).map(Vec::as_slice)
    }
}

/// `name` as the file's map keys it: lower-case, without a trailing dot (`db.svc.` is
/// the fully qualified spelling of `db.svc`).
fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Every address of `host` at `port`: the address itself for an IP literal; those
/// `hosts` gives the name, if it names it; otherwise what the system resolver answers.
/// Each address once, in the order found; `Ok` and empty when the source knew the name
/// but gave it no address.
pub fn lookup(host: &str, port: u16, hosts: Option<&Hosts>) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if let Some(ips) = hosts.and_then(|h| h.get(host)) {
        return Ok(ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect());
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for addr in (host, port).to_socket_addrs()? {
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn names_aliases_comments_and_several_lines_for_one_name() {
        let hosts = Hosts::parse(
            "# a comment line\n\
             127.0.0.2\tsvc.test  Alias.Test   # trailing comment\n\
             \n\
             ::1 svc.test six.test\n\
             127.0.0.3 svc.test\n\
             127.0.0.2 svc.test\n\
             # 127.0.0.9 svc.test\n",
        );
        assert_eq!(
            hosts.get("svc.test"),
            Some(&ips(&["127.0.0.2", "::1", "127.0.0.3"])[..])
        );
        assert_eq!(hosts.get("alias.test"), Some(&ips(&["127.0.0.2"])[..]));
        assert_eq!(hosts.get("ALIAS.test."), Some(&ips(&["127.0.0.2"])[..]));
        assert_eq!(hosts.get("six.test"), Some(&ips(&["::1"])[..]));
        assert_eq!(hosts.get("other.test"), None);
    }

    #[test]
    fn lines_that_are_not_entries_are_skipped_without_harm() {
        let hosts = Hosts::parse(
            "not-an-address svc.test\n\
             300.1.2.3 svc.test\n\
             fe80::1%eth0 svc.test\n\
             127.0.0.2\n\
             \u{0}\u{1}\u{7f}\u{fffd}\u{fffd}\n\
             #127.0.0.5 svc.test\n\
             127.0.0.4 svc.test\r\n",
        );
        assert_eq!(hosts.get("svc.test"), Some(&ips(&["127.0.0.4"])[..]));
        assert_eq!(Hosts::parse(""), Hosts::default());
    }

    #[test]
    fn a_literal_is_itself_and_a_listed_name_never_reaches_the_system_resolver() {
        assert_eq!(
            lookup("::1", 80, None).unwrap(),
            vec!["[::1]:80".parse().unwrap()]
        );
        // `.invalid` is reserved (RFC 6761): the system resolver would fail; the file
        // answers first.
        let hosts = Hosts::parse("127.0.0.2 svc.invalid\n127.0.0.3 svc.invalid\n");
        assert_eq!(
            lookup("svc.invalid", 6379, Some(&hosts)).unwrap(),
            vec![
                "127.0.0.2:6379".parse().unwrap(),
                "127.0.0.3:6379".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_missing_file_names_the_call_and_the_path() {
        let err = Hosts::read(Path::new("/nonexistent/hosts")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().starts_with("read /nonexistent/hosts: "),
            "{err}"
        );
    }
}
