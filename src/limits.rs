//! Connection caps: global and per client IP (PROTOCOL §8 defaults 100,000 and 10,000).
//!
//! A [`ConnectionGuard`] is taken before the upgrade is answered and held by the session
//! for its whole life; dropping it gives the slot back. Counting is lock-free for the
//! global cap and one short map lock per handshake for the per-IP cap; the map only holds
//! IPs that currently have connections, so it cannot grow beyond the live connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

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
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionGuard, LimitError> {
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
            ip,
        })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut per_ip = self.limits.per_ip.lock();
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
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
}
