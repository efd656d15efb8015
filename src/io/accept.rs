//! Accepting sockets under the process's open-file limit: the transient-error pause every
//! accept loop shares, and the budget of sockets the WebSocket port may hold.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Accept errors (EMFILE, ECONNABORTED) are transient: log, pause, keep listening.
pub async fn accept_backoff(what: &str, e: std::io::Error) {
    tracing::warn!("{what}: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// How many sockets the WebSocket port may hold at once, across reactors, and how many it
/// holds. Past the limit reactors stop accepting (the rest wait in the kernel's backlog),
/// keeping open-file headroom for publishers, the admin port and data files.
#[derive(Debug)]
pub struct SocketBudget {
    pub limit: usize,
    open: AtomicUsize,
}

impl SocketBudget {
    pub fn new(limit: usize) -> Arc<SocketBudget> {
        Arc::new(SocketBudget {
            limit,
            open: AtomicUsize::new(0),
        })
    }

    /// Raises the soft open-file limit to the hard one; the budget is that limit minus a
    /// reserve, so that a flood of connections on port 7701 (idle ones waiting out the
    /// handshake timeout) cannot leave the ingest unable to accept.
    pub fn from_open_file_limit() -> Arc<SocketBudget> {
        let limit = match raise_open_file_limit() {
            Some(n) => n.saturating_sub((n / 32).clamp(64, 512)).max(1),
            None => usize::MAX, // unknown: only --max-connections applies
        };
        SocketBudget::new(limit)
    }

    pub fn exhausted(&self) -> bool {
        self.open.load(Relaxed) >= self.limit
    }

    /// Counts one accepted socket until the slot is dropped.
    pub fn take(self: &Arc<Self>) -> SocketSlot {
        self.open.fetch_add(1, Relaxed);
        SocketSlot(self.clone())
    }
}

/// One accepted socket counted in its `SocketBudget` until its connection task ends.
pub struct SocketSlot(Arc<SocketBudget>);

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// The soft open-file limit after raising it to the hard one (`None` if unknown).
fn raise_open_file_limit() -> Option<usize> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into `rl`, a valid and exclusive borrow.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return None;
    }
    if rl.rlim_cur < rl.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: rl.rlim_max,
            ..rl
        };
        // SAFETY: setrlimit only reads `raised`, a valid `rlimit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            rl = raised;
        }
    }
    Some(usize::try_from(rl.rlim_cur).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_until_dropped() {
        let budget = SocketBudget::new(2);
        let a = budget.take();
        assert!(!budget.exhausted());
        let b = budget.take();
        assert!(budget.exhausted());
        drop(a);
        assert!(!budget.exhausted());
        drop(b);
    }

    #[test]
    fn the_budget_keeps_a_reserve_below_the_open_file_limit() {
        let budget = SocketBudget::from_open_file_limit();
        let limit = raise_open_file_limit().unwrap();
        assert!(
            budget.limit < limit && budget.limit >= limit - 512,
            "{budget:?} of {limit}"
        );
    }
}
