//! Connection limits as permits: `--max-connections`, `--max-connections-per-ip` and
//! `--max-buffered-bytes`.
//!
//! The acceptor takes a [`ConnPermit`] for every connection it hands to a worker, and
//! the permit gives its counts back when it is dropped: when the connection closes,
//! when a worker cannot register it, when a dead worker's channel is dropped with the
//! connection still in it. No path counts a connection out by hand, so no path can
//! forget to.

use std::collections::HashMap;
use std::net::IpAddr;
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
        if self.open.load(Ordering::Relaxed) >= self.max_connections {
            return Err(RejectReason::MaxConnections);
        }
        // An IPv4 client on a dual-stack socket appears as ::ffff:a.b.c.d; count it as
        // the IPv4 address it is.
        let ip = ip.to_canonical();
        let counted_ip = match &self.per_ip {
            Some(per_ip) => {
                let mut open = per_ip.open.lock();
                let n = open.entry(ip).or_insert(0);
                if *n >= per_ip.limit {
                    if *n == 0 {
                        open.remove(&ip);
                    }
                    return Err(RejectReason::PerIpLimit);
                }
                *n += 1;
                Some(ip)
            }
            None => None,
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(ConnPermit {
            limits: Arc::clone(self),
            ip: counted_ip,
        })
    }

    /// Counts a connection that arrived established from the process a reload
    /// replaced. It is never refused: it was admitted once, and refusing it now would
    /// cut it. Over a limit lowered by the reload, new connections are refused until
    /// the count falls below it.
    pub fn acquire_moved(self: &Arc<Self>, ip: Option<IpAddr>) -> ConnPermit {
        let counted_ip = match (&self.per_ip, ip) {
            (Some(per_ip), Some(ip)) => {
                let ip = ip.to_canonical();
                *per_ip.open.lock().entry(ip).or_insert(0) += 1;
                Some(ip)
            }
            _ => None,
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        ConnPermit {
            limits: Arc::clone(self),
            ip: counted_ip,
        }
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
#[derive(Debug)]
pub struct ConnPermit {
    limits: Arc<Limits>,
    /// The address counted against `--max-connections-per-ip`, when that is set.
    ip: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
        if let (Some(ip), Some(per_ip)) = (self.ip, &self.limits.per_ip) {
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
}
