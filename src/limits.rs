//! Connection limits as permits: `--max-connections`, `--max-connections-per-ip` and
//! `--max-buffered-bytes`.
//!
//! The acceptor takes a [`ConnPermit`] for every connection it hands to a worker, and
//! the permit gives its counts back when it is dropped: when the connection closes,
//! when a worker cannot register it, when a dead worker's channel is dropped with the
//! connection still in it. No path counts a connection out by hand, so no path can
//! forget to.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::metrics::RejectReason;

/// The counts every thread of a server shares. Each is touched once per connection
/// (open, per-address) or when an outbound buffer grows or shrinks (buffered), never
/// per byte moved.
#[derive(Debug)]
pub struct Limits {
    /// Connections handed to workers and not yet closed.
    open: AtomicUsize,
    /// `--max-connections`.
    max_connections: usize,
    /// Open connections per client address, with `--max-connections-per-ip`.
    per_ip: Option<PerIp>,
    /// Bytes in all outbound buffers; written by a worker only when one of its buffers
    /// grows or shrinks, read once per loop turn.
    buffered: AtomicI64,
    /// `--max-buffered-bytes`.
    max_buffered: i64,
}

#[derive(Debug)]
struct PerIp {
    limit: u32,
    /// Only addresses with an open connection are kept.
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl Limits {
    pub fn new(
        max_connections: usize,
        max_per_ip: Option<usize>,
        max_buffered: usize,
    ) -> Arc<Limits> {
        Arc::new(Limits {
            open: AtomicUsize::new(0),
            max_connections,
            per_ip: max_per_ip.map(|limit| PerIp {
                limit: limit.min(u32::MAX as usize) as u32,
                open: Mutex::new(HashMap::new()),
            }),
            buffered: AtomicI64::new(0),
            max_buffered: max_buffered.min(i64::MAX as usize) as i64,
        })
    }

    /// A permit for a new connection from `ip`, or why there is none.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, RejectReason> {
        let mut permit = self.try_acquire_unattributed()?;
        permit.attribute(SocketAddr::new(ip, 0), false)?;
        Ok(permit)
    }

    /// A permit for a new connection whose client is not known yet (with
    /// `--accept-proxy`, its PROXY header will name it): counted against
    /// `--max-connections` now, and against `--max-connections-per-ip` by
    /// [`ConnPermit::attribute`] once the client is known.
    pub fn try_acquire_unattributed(self: &Arc<Self>) -> Result<ConnPermit, RejectReason> {
        if self.open.load(Ordering::Relaxed) >= self.max_connections {
            return Err(RejectReason::MaxConnections);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(ConnPermit {
            limits: Arc::clone(self),
            ip: None,
            port: 0,
            counted: false,
            proxied: false,
        })
    }

    /// Counts a connection that arrived established from the process a reload
    /// replaced, as `client` (None for one still awaiting its PROXY header, attributed
    /// later); `proxied`: that address came from a PROXY header. It is never refused:
    /// it was admitted once, and refusing it now would cut it. Over a limit lowered by
    /// the reload, new connections are refused until the count falls below it.
    pub fn acquire_moved(
        self: &Arc<Self>,
        client: Option<SocketAddr>,
        proxied: bool,
    ) -> ConnPermit {
        self.open.fetch_add(1, Ordering::Relaxed);
        let mut permit = ConnPermit {
            limits: Arc::clone(self),
            ip: None,
            port: 0,
            counted: false,
            proxied: false,
        };
        if let Some(client) = client {
            permit.count(client, proxied, false);
        }
        permit
    }

    /// Connections holding a permit now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Open connections from `ip` (0 when no per-address limit is set).
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.per_ip
            .as_ref()
            .and_then(|p| p.open.lock().get(&ip.to_canonical()).copied())
            .unwrap_or(0)
    }

    /// Bytes held in outbound buffers across workers now.
    pub fn buffered(&self) -> i64 {
        self.buffered.load(Ordering::Relaxed)
    }

    /// Room left under `--max-buffered-bytes` (negative when over it).
    pub fn buffered_room(&self) -> i64 {
        self.max_buffered - self.buffered.load(Ordering::Relaxed)
    }

    /// Books a change in one worker's outbound buffers.
    pub fn add_buffered(&self, delta: i64) {
        if delta != 0 {
            self.buffered.fetch_add(delta, Ordering::Relaxed);
        }
    }
}

/// One open connection's share of the limits; dropping it counts the connection out.
/// It also keeps the address the connection counts as: the socket's peer, or the
/// client a PROXY header named, which a reload carries to the next process. 32 bytes,
/// like the single address it held before it kept a port and two flags too.
#[derive(Debug)]
pub struct ConnPermit {
    limits: Arc<Limits>,
    /// The address the connection counts as (canonical: IPv4-mapped IPv6 as IPv4);
    /// None until it is known.
    ip: Option<IpAddr>,
    /// The client's port, when a PROXY header named it (0 otherwise: the socket's
    /// peer tells its own).
    port: u16,
    /// `ip` is counted against `--max-connections-per-ip` (and given back on drop).
    counted: bool,
    /// `ip` and `port` came from a PROXY header.
    proxied: bool,
}

impl ConnPermit {
    /// Counts the connection as `client`'s against `--max-connections-per-ip`, or says
    /// why it may not be (the permit stays unattributed, and dropping it gives back
    /// its `--max-connections` share only). `proxied`: the address came from a PROXY
    /// header.
    pub fn attribute(&mut self, client: SocketAddr, proxied: bool) -> Result<(), RejectReason> {
        debug_assert!(self.ip.is_none(), "a permit is attributed once");
        if self.count(client, proxied, true) {
            Ok(())
        } else {
            Err(RejectReason::PerIpLimit)
        }
    }

    /// Records `client` and counts it per address (if that limit is set); with
    /// `enforce`, only while under the limit. Returns whether it was recorded.
    fn count(&mut self, client: SocketAddr, proxied: bool, enforce: bool) -> bool {
        // An IPv4 client on a dual-stack socket appears as ::ffff:a.b.c.d; count it as
        // the IPv4 address it is.
        let ip = client.ip().to_canonical();
        if let Some(per_ip) = &self.limits.per_ip {
            let mut open = per_ip.open.lock();
            let n = open.entry(ip).or_insert(0);
            if enforce && *n >= per_ip.limit {
                if *n == 0 {
                    open.remove(&ip);
                }
                return false;
            }
            *n += 1;
            self.counted = true;
        }
        self.ip = Some(ip);
        self.port = client.port();
        self.proxied = proxied;
        true
    }

    /// The client a PROXY header named (address and port), if one did.
    pub fn proxied_client(&self) -> Option<SocketAddr> {
        match (self.proxied, self.ip) {
            (true, Some(ip)) => Some(SocketAddr::new(ip, self.port)),
            _ => None,
        }
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
        if let (true, Some(ip), Some(per_ip)) = (self.counted, self.ip, &self.limits.per_ip) {
            let mut open = per_ip.open.lock();
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_themselves_out_on_drop() {
        let limits = Limits::new(3, Some(2), 1 << 20);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let p1 = limits.try_acquire(a).unwrap();
        let p2 = limits.try_acquire(b).unwrap();
        assert_eq!(
            limits.open_from(a),
            2,
            "the mapped address is the same client"
        );
        assert_eq!(limits.try_acquire(a).unwrap_err(), RejectReason::PerIpLimit);
        let c: IpAddr = "10.0.0.2".parse().unwrap();
        let p3 = limits.try_acquire(c).unwrap();
        assert_eq!(
            limits.try_acquire(c).unwrap_err(),
            RejectReason::MaxConnections
        );
        assert_eq!(limits.open(), 3);
        drop((p1, p2, p3));
        assert_eq!(limits.open(), 0);
        assert_eq!(limits.open_from(a), 0);
        assert!(limits.per_ip.as_ref().unwrap().open.lock().is_empty());
    }

    #[test]
    fn an_unattributed_permit_counts_per_address_once_its_client_is_known() {
        let limits = Limits::new(10, Some(1), 1 << 20);
        let client: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut a = limits.try_acquire_unattributed().unwrap();
        let mut b = limits.try_acquire_unattributed().unwrap();
        assert_eq!((limits.open(), limits.open_from(client.ip())), (2, 0));
        assert_eq!(a.proxied_client(), None);
        a.attribute(client, true).unwrap();
        assert_eq!(a.proxied_client(), Some(client));
        assert_eq!(
            b.attribute("[::ffff:192.0.2.7]:1".parse().unwrap(), true),
            Err(RejectReason::PerIpLimit)
        );
        assert_eq!(limits.open_from(client.ip()), 1);
        drop(b);
        assert_eq!(
            limits.open(),
            1,
            "the refused one gave back its global share"
        );
        assert_eq!(
            limits.open_from(client.ip()),
            1,
            "and took nothing per address"
        );
        drop(a);
        assert_eq!((limits.open(), limits.open_from(client.ip())), (0, 0));
        // A moved connection is counted over the limit, never refused.
        let m1 = limits.acquire_moved(Some(client), true);
        let m2 = limits.acquire_moved(Some(client), false);
        assert_eq!(limits.open_from(client.ip()), 2);
        assert_eq!(m1.proxied_client(), Some(client));
        assert_eq!(m2.proxied_client(), None);
        let m3 = limits.acquire_moved(None, false);
        drop((m1, m2, m3));
        assert_eq!((limits.open(), limits.open_from(client.ip())), (0, 0));
        assert!(limits.per_ip.as_ref().unwrap().open.lock().is_empty());
    }
}
