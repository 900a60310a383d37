//! The process's open-file limit: raised to the hard limit at start, and the share of it client connections may
//! take.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept for everything but client connections: the store, certificates and keys being written, the
/// listeners, mDNS, the control socket, mail, SMS and push connections, uploads and backups being written, logs.
pub const RESERVED: u64 = 128;

/// No higher soft limit is asked for, even when the hard limit allows it (or is unlimited).
const WANTED: u64 = 1 << 20;

/// Raises the soft limit on open files towards the hard limit (enrolld uses epoll, so a low soft limit only
/// protects programs using `select`), and returns the limit in force, or `None` if it cannot be read.
pub fn raise_limit() -> Option<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let wanted = hard.min(WANTED);
    if soft < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
        return Some(wanted);
    }
    Some(soft)
}

/// How many client connections may be open at once: `configured`, but no more than `limit` (open files) leaves
/// after [`RESERVED`], and at least 1.
pub fn connection_cap(configured: usize, limit: Option<u64>) -> usize {
    let room = limit.map_or(usize::MAX, |limit| usize::try_from(limit.saturating_sub(RESERVED)).unwrap_or(usize::MAX));
    configured.min(room).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_room_below_the_file_limit() {
        assert_eq!(connection_cap(4096, Some(1024)), 1024 - 128);
        assert_eq!(connection_cap(4096, Some(65_536)), 4096);
        assert_eq!(connection_cap(4096, None), 4096);
        assert_eq!(connection_cap(4096, Some(100)), 1);
    }

    #[test]
    fn the_limit_in_force_is_at_least_the_soft_limit() {
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(raise_limit().unwrap() >= soft);
    }
}
