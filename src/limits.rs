//! Connection caps: global and per client IP (docs/protocol.md §8 defaults 100,000 and 10,000).
//!
//! A [`ConnectionGuard`] is taken before the upgrade is answered and held by the session
//! for its whole life; dropping it gives the slot back. Counting is lock-free for the
//! global cap and one short map lock per handshake for the per-IP cap; the map only holds
//! IPs that currently have connections, so it cannot grow beyond the live connections.
//!
//! "Per IP" means per [`limit_key`]: IPv6 clients are counted per prefix of
//! `server.ipv6_prefix_len` bits (64 by default), since one host usually owns a whole /64.
//! The server uses a second instance of the same counter for connections still speaking
//! HTTP (`server.max_pending_connections` and its per-source share
//! `server.max_pending_per_ip`), so one source cannot take every pending slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use switchboard_middleware::limit_key;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("this instance is at its connection limit")]
    Global,
    #[error("too many connections from this address")]
    PerIp,
}

pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    v6_prefix_len: u8,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    /// The per-IP key counted, or `None` when only the total was.
    ip: Option<IpAddr>,
}

impl ConnectionLimits {
    /// IPv6 keyed on the /64; see [`ConnectionLimits::keyed`].
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Self::keyed(max_total, max_per_ip, 64)
    }

    /// Caps of `max_total` in all and `max_per_ip` per client key, IPv6 clients keyed on
    /// their first `v6_prefix_len` bits.
    pub fn keyed(max_total: usize, max_per_ip: usize, v6_prefix_len: u8) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            v6_prefix_len,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionGuard, LimitError> {
        let ip = limit_key(ip, self.v6_prefix_len);
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Global);
        }
        let mut per_ip = self.per_ip.lock();
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::PerIp);
        }
        *count += 1;
        Ok(ConnectionGuard {
            limits: self.clone(),
            ip: Some(ip),
        })
    }

    /// A slot counted in the total only (a trusted proxy's connection, which carries many
    /// clients under one address).
    pub fn acquire_total_only(self: &Arc<Self>) -> Result<ConnectionGuard, LimitError> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Global);
        }
        Ok(ConnectionGuard {
            limits: self.clone(),
            ip: None,
        })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Connections currently counted for `ip`'s key.
    pub fn count_for(&self, ip: IpAddr) -> usize {
        let key = limit_key(ip, self.v6_prefix_len);
        self.per_ip.lock().get(&key).copied().unwrap_or(0)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self.limits.per_ip.lock();
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_enforced_and_released() {
        let l = ConnectionLimits::new(3, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let g1 = l.acquire(a).unwrap();
        let _g2 = l.acquire(a).unwrap();
        assert_eq!(l.acquire(a).err(), Some(LimitError::PerIp));
        let _g3 = l.acquire(b).unwrap();
        assert_eq!(l.acquire(b).err(), Some(LimitError::Global));
        drop(g1);
        let _g4 = l.acquire(a).unwrap();
        assert_eq!(l.total(), 3);
    }

    #[test]
    fn ipv6_clients_are_counted_per_prefix() {
        let l = ConnectionLimits::keyed(100, 2, 64);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _g1 = l.acquire(a).unwrap();
        let _g2 = l.acquire(b).unwrap();
        // Same /64: a third address of it is the same client.
        assert_eq!(
            l.acquire("2001:db8:1:2::3".parse().unwrap()).err(),
            Some(LimitError::PerIp)
        );
        assert_eq!(l.count_for(a), 2);
        let _g3 = l.acquire(c).unwrap();

        // /128: every address is its own client.
        let full = ConnectionLimits::keyed(100, 1, 128);
        let _h1 = full.acquire(a).unwrap();
        let _h2 = full.acquire(b).unwrap();
        assert_eq!(full.acquire(a).err(), Some(LimitError::PerIp));
    }

    #[test]
    fn slots_of_a_prefix_are_released() {
        let l = ConnectionLimits::keyed(100, 1, 64);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let g = l.acquire(a).unwrap();
        drop(g);
        assert_eq!(l.count_for(a), 0);
        assert!(l.per_ip.lock().is_empty());
        let _g = l.acquire("2001:db8::2".parse().unwrap()).unwrap();
    }
}
