//! A server started with `--ready-file`: wait for the file, read its addresses.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Waits (at most `within`) for `child` to write its ready file (JSON) and returns it; an
/// error if the child exits first. The server writes the file whole (write, then rename),
/// so a file that parses is complete.
pub fn wait_ready_file(
    child: &mut Child,
    ready: &Path,
    name: &str,
    within: Duration,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = std::fs::read_to_string(ready)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            return Ok(v);
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited before it was ready: {status}");
        }
        if Instant::now() > deadline {
            bail!("{name} not ready within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The address a ready file gives for `key` (`ws`, `ingest`, `admin`).
pub fn ready_addr(info: &serde_json::Value, key: &str) -> anyhow::Result<SocketAddr> {
    info[key]
        .as_str()
        .with_context(|| format!("no {key:?} in the ready file {info}"))?
        .parse()
        .with_context(|| format!("{key:?} in the ready file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_exits_before_it_is_ready_is_an_error_not_a_wait() {
        let dir = std::env::temp_dir().join(format!("krux-testkit-{}", std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let t0 = Instant::now();
        let err = wait_ready_file(
            &mut child,
            &dir.join("ready.json"),
            "true",
            Duration::from_secs(20),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("exited before it was ready"),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn reads_the_addresses() {
        let info = serde_json::json!({"ws": "127.0.0.1:7701", "pid": 1});
        assert_eq!(ready_addr(&info, "ws").unwrap().port(), 7701);
        assert!(ready_addr(&info, "admin").is_err());
    }
}
