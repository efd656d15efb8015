//! The data dir against another local user: what the relay creates is private, a data dir
//! or credentials file others can write is refused at start (with the `chmod` that fixes
//! it), a TLS key others can read too, and a symlink planted where the relay writes is
//! never followed. Real files, real symlinks, the real binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn set_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// `serve` on `dir` with `extra`, expected to exit at start: its output.
fn serve_exits(dir: &Path, extra: &[&str]) -> Output {
    let child = Command::new(bin())
        .arg("serve")
        .args(ANY_PORTS)
        .args(extra)
        .env("KRUX_DATA_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish_within(child, Duration::from_secs(15), "serve that must refuse");
    assert!(!out.status.success(), "serve started");
    out
}

/// `serve` on `data` writing its ready file at `ready`, once it is up; killed on drop.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_ready(data: &Path, ready: &Path) -> Served {
    let child = Command::new(bin())
        .arg("serve")
        .args(ANY_PORTS)
        .arg("--ready-file")
        .arg(ready)
        .env("KRUX_DATA_DIR", data)
        .env("KRUX_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut served = Served(child);
    krux_testkit::wait_ready_file(&mut served.0, ready, "relay", Duration::from_secs(20)).unwrap();
    served
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn every_command_creates_the_data_dir_and_its_files_private() {
    let root = tempfile::tempdir().unwrap();
    for (i, args) in [
        &["user-token", "create", "--name", "a"][..],
        &["passphrase", "set"][..],
    ]
    .iter()
    .enumerate()
    {
        let dir = root.path().join(format!("d{i}/data"));
        let mut child = Command::new(bin())
            .args(*args)
            .env("KRUX_DATA_DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "a passphrase long enough").unwrap();
        assert_success(&child.wait_with_output().unwrap());
        assert_eq!(mode(&dir), 0o700, "{args:?}");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
}

#[test]
fn a_data_dir_or_credentials_file_others_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    create_token(dir.path(), "ops");
    set_mode(dir.path(), 0o777);
    let out = serve_exits(dir.path(), &[]);
    assert!(
        stderr(&out).contains(&format!("chmod 700 {}", dir.path().display())),
        "{}",
        stderr(&out)
    );
    set_mode(dir.path(), 0o700);
    let tokens = dir.path().join("tokens.json");
    set_mode(&tokens, 0o666);
    let out = serve_exits(dir.path(), &[]);
    assert!(
        stderr(&out).contains(&format!("chmod 600 {}", tokens.display())),
        "{}",
        stderr(&out)
    );
    // Fixed as told, it starts.
    set_mode(&tokens, 0o600);
    serve_ready(dir.path(), &dir.path().join("ready.json"));
}

#[test]
fn a_tls_key_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    set_mode(&key, 0o644);
    let data = dir.path().join("data");
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let out = serve_exits(&data, &["--tls-cert", c, "--tls-key", k]);
    assert!(
        stderr(&out).contains(&format!("chmod 600 {k}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn symlinks_planted_where_the_relay_writes_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // The ready file's old temp name: a link there used to be written through.
    let ready = dir.path().join("ready.json");
    std::os::unix::fs::symlink(&victim, dir.path().join("ready.tmp")).unwrap();
    let served = serve_ready(&dir.path().join("d"), &ready);
    assert!(std::fs::read_to_string(&ready).unwrap().contains("\"ws\""));
    drop(served);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    // A link where the self-signed certificate goes: refused at start, not followed.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o700);
    std::os::unix::fs::symlink(&victim, data.join("tls-self-signed.pem")).unwrap();
    let out = serve_exits(&data, &["--tls-self-signed"]);
    assert!(stderr(&out).contains("is a symlink"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    // And where the tokens go.
    let data2 = dir.path().join("data2");
    std::fs::create_dir(&data2).unwrap();
    std::os::unix::fs::symlink(&victim, data2.join("tokens.json")).unwrap();
    let out = Command::new(bin())
        .args(["user-token", "create", "--name", "x"])
        .env("KRUX_DATA_DIR", &data2)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}
