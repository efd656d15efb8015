//! The data dir and the files the relay writes: created private (0700/0600) by every
//! command, written atomically through temp names nobody can plant beforehand (random,
//! `O_EXCL`, `O_NOFOLLOW`), never through a symlink; and, before `serve` trusts it,
//! checked to be writable by its owner only. No sockets here.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};

/// Creates `dir` (and its parents) as 0700 if missing. An existing dir is left as it is:
/// `check` says whether it can be trusted.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))
}

/// Fails if `path` is a symlink: the relay never writes through one (a link planted
/// where it writes would make it overwrite whatever the link points at).
pub fn refuse_symlink(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{} is a symlink; the relay does not write through symlinks (remove it)",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Replaces `path` with `bytes` atomically (a fresh temp file beside it, then rename),
/// with permissions `mode`, so a reader never sees half a file. The temp name is random
/// and created exclusively without following links; `path` itself must not be a symlink.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    refuse_symlink(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_string_lossy();
    let mut nonce = [0u8; 8];
    getrandom::getrandom(&mut nonce)?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{name}.{nonce}.tmp"));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    // The rename is durable once the directory is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `write_atomic` for the data dir's own files: owner only, in a data dir created 0700.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    write_atomic(path, bytes, 0o600)
}

/// Opens (creating it 0600 if missing) a file the relay keeps open, such as a lock,
/// without following a symlink.
pub fn open_private(path: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {} (a symlink is refused)", path.display()))
}

/// What `serve` checks before it trusts the data dir: the dir and the credentials and
/// sequence files in it are writable by their owner only, and none is a symlink.
pub fn check(data_dir: &Path, files: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let meta = std::fs::metadata(data_dir)
        .with_context(|| format!("reading data dir {}", data_dir.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        bail!(
            "data dir {} is writable by its group or others (mode {mode:o}): anyone could add a token; fix it with `chmod 700 {}`",
            data_dir.display(),
            data_dir.display()
        );
    }
    for path in files {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            continue; // not made yet
        };
        if meta.file_type().is_symlink() {
            refuse_symlink(path)?;
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            bail!(
                "{} is writable by its group or others (mode {mode:o}); fix it with `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// A private key must be readable by its owner only.
pub fn check_key(key: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(key).with_context(|| format!("reading {}", key.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "the TLS key {} is open to its group or others (mode {mode:o}); fix it with `chmod 600 {}`",
            key.display(),
            key.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_private_atomic_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("new/data");
        let file = data.join("tokens.json");
        write_private_atomic(&file, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read(&file).unwrap(), b"{}");
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = data.join("seq");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = write_private_atomic(&link, b"1").unwrap_err();
        assert!(format!("{err:#}").contains("is a symlink"), "{err:#}");
        assert!(open_private(&link).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn a_data_dir_or_file_others_can_write_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let tokens = dir.path().join("tokens.json");
        let files = [tokens.clone()];
        check(dir.path(), &files).unwrap();
        set(dir.path(), 0o777);
        let err = format!("{:#}", check(dir.path(), &[]).unwrap_err());
        assert!(err.contains("chmod 700"), "{err}");
        set(dir.path(), 0o700);
        std::fs::write(&tokens, "{}").unwrap();
        set(&tokens, 0o666);
        let err = format!("{:#}", check(dir.path(), &files).unwrap_err());
        assert!(
            err.contains("chmod 600") && err.contains("tokens.json"),
            "{err}"
        );
        set(&tokens, 0o644); // readable is fine: it holds hashes
        check(dir.path(), &files).unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "k").unwrap();
        set(&key, 0o640);
        assert!(format!("{:#}", check_key(&key).unwrap_err()).contains("chmod 600"));
        set(&key, 0o600);
        check_key(&key).unwrap();
    }
}
