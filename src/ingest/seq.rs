//! Durable sequence numbers: `seq` never repeats and never goes backwards, across restarts
//! and crashes. Before handing out a block of numbers, the allocator records the block's
//! end in `<data-dir>/seq` (written, fsynced, renamed); a restart continues from that end,
//! skipping whatever the previous run reserved but did not use.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Numbers reserved per disk write: at a million events per second, one fsync a second.
const BLOCK: u64 = 1 << 20;

pub struct SeqAllocator {
    next: u64,
    reserved_end: u64,
    path: PathBuf,
    previous_last: Option<u64>,
}

/// Where a clean stop records the last seq it published (see `record_clean_stop`).
fn clean_stop_path(data_dir: &Path) -> PathBuf {
    data_dir.join("clean-stop")
}

/// Records, at a graceful stop, that nothing after `last` was published. The next run
/// reads and removes it, so a crash after that leaves no stale claim behind.
pub fn record_clean_stop(data_dir: &Path, last: u64) -> anyhow::Result<()> {
    crate::datadir::write_private_atomic(&clean_stop_path(data_dir), format!("{last}\n").as_bytes())
}

impl SeqAllocator {
    pub fn open(data_dir: &Path) -> anyhow::Result<SeqAllocator> {
        let path = data_dir.join("seq");
        let next = match std::fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{} does not hold a number", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let stop = clean_stop_path(data_dir);
        let previous_last = std::fs::read_to_string(&stop)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&last| last < next);
        match std::fs::remove_file(&stop) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", stop.display()))
            }
            _ => {}
        }
        Ok(SeqAllocator {
            next,
            reserved_end: next,
            path,
            previous_last,
        })
    }

    /// The last seq the previous run published, if it stopped cleanly.
    pub fn previous_last(&self) -> Option<u64> {
        self.previous_last
    }

    /// The seq the next event will get.
    pub fn peek(&self) -> u64 {
        self.next
    }

    pub fn allocate(&mut self) -> anyhow::Result<u64> {
        if self.next == self.reserved_end {
            self.reserve(self.next + BLOCK)?;
        }
        let s = self.next;
        self.next += 1;
        Ok(s)
    }

    fn reserve(&mut self, end: u64) -> anyhow::Result<()> {
        crate::datadir::write_private_atomic(&self.path, format!("{end}\n").as_bytes())?;
        self.reserved_end = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_never_reuse_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = SeqAllocator::open(dir.path()).unwrap();
        assert_eq!(a.allocate().unwrap(), 1);
        assert_eq!(a.allocate().unwrap(), 2);
        drop(a); // as after a crash: the rest of the block is skipped
        let mut b = SeqAllocator::open(dir.path()).unwrap();
        let s = b.allocate().unwrap();
        assert_eq!(s, 1 + BLOCK);
        assert_eq!(b.allocate().unwrap(), s + 1);
        assert_eq!(b.previous_last(), None, "a crash leaves no claim");
        drop(b);
        record_clean_stop(dir.path(), s + 1).unwrap();
        let c = SeqAllocator::open(dir.path()).unwrap();
        assert_eq!(c.previous_last(), Some(s + 1));
        drop(c);
        let d = SeqAllocator::open(dir.path()).unwrap();
        assert_eq!(d.previous_last(), None, "read once, then removed");
    }
}
