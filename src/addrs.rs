//! The box's own network addresses, behind a trait so certificate re-issue can be tested with addresses that change;
//! and the network a client's address counts against.

use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How often the box's addresses are looked at by what follows them (the TLS certificate, the outbox). enrolld is
/// often ready before the box has its DHCP lease; the certificate names the new address, and mail held back for want
/// of a network goes out, within this rather than at the next hourly check or backoff.
pub const ADDRESS_POLL: Duration = Duration::from_secs(2);

/// Returns once `source` lists other addresses than `before` (looked at every [`ADDRESS_POLL`]).
pub async fn changed_from(source: &dyn AddressSource, before: &[IpAddr]) {
    loop {
        tokio::time::sleep(ADDRESS_POLL).await;
        if source.addresses() != before {
            return;
        }
    }
}

/// Lists the addresses clients on the LAN may use to reach this box.
pub trait AddressSource: Send + Sync + Debug {
    /// Every usable non-loopback address, sorted and without duplicates.
    fn addresses(&self) -> Vec<IpAddr>;
}

/// Reads the addresses of the host's interfaces.
#[derive(Debug, Default)]
pub struct SystemAddresses {
    /// Whether the last look failed: a failure that lasts is logged once, not at every look.
    failing: AtomicBool,
}

impl AddressSource for SystemAddresses {
    fn addresses(&self) -> Vec<IpAddr> {
        let interfaces = match if_addrs::get_if_addrs() {
            Ok(interfaces) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the network interfaces can be listed again");
                }
                interfaces
            }
            Err(error) => {
                if self.failing.swap(true, Ordering::Relaxed) {
                    tracing::debug!(%error, "still cannot list network interfaces");
                } else {
                    tracing::warn!(%error, "cannot list network interfaces; the certificate keeps the addresses it names");
                }
                Vec::new()
            }
        };
        usable(interfaces.into_iter().map(|interface| interface.ip()))
    }
}

/// Keeps the addresses a certificate can meaningfully name: loopback is added separately and IPv6 link-local
/// addresses are left out because they only work with a zone index (`fe80::1%eth0`), which no URL or SAN carries.
pub fn usable(addresses: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut kept: Vec<IpAddr> = addresses
        .into_iter()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect();
    kept.sort();
    kept.dedup();
    kept
}

/// A fixed, changeable list of addresses for tests.
#[derive(Debug, Clone, Default)]
pub struct StaticAddresses {
    addresses: Arc<Mutex<Vec<IpAddr>>>,
}

impl StaticAddresses {
    pub fn new(addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        let source = Self::default();
        source.set(addresses);
        source
    }

    pub fn set(&self, addresses: impl IntoIterator<Item = IpAddr>) {
        *self.addresses.lock().unwrap_or_else(PoisonError::into_inner) = usable(addresses);
    }
}

impl AddressSource for StaticAddresses {
    fn addresses(&self) -> Vec<IpAddr> {
        self.addresses.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The network a client counts against in connection caps and sign-in delays: an IPv4 address as it is (also when
/// it reaches a `[::]` listener as `::ffff:a.b.c.d`), an IPv6 address by its /64, the block one client is usually
/// given, so rotating addresses within it changes nothing.
pub fn client_network(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_drops_loopback_link_local_and_duplicates() {
        let input: Vec<IpAddr> = ["10.0.0.5", "127.0.0.1", "::1", "fe80::1", "fd00::2", "10.0.0.5", "0.0.0.0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let kept = usable(input);
        assert_eq!(kept, vec!["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::2".parse().unwrap()]);
    }
}
