//! Shared by the `setup_*` tests (`mod setup_support;`): a tiny threaded HTTP/1.1 file server
//! that counts requests and misbehaves on request, a way to run code inside a network
//! namespace, a test profile with fake artifacts, and helpers to run chvkit with them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::common::NetNs;

/// File names of the fake artifacts (as the profile's URLs end).
pub const CHV: &str = "cloud-hypervisor-static";
pub const FW: &str = "hypervisor-fw";

/// Run chvkit inside `ns` with `--profile`/`--root` of `env` and extra environment.
pub fn chvkit_env(ns: &NetNs, env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut c = ns.cmd(crate::common::chvkit());
    c.args(env.args(args)).env("NO_COLOR", "1");
    for (k, v) in vars {
        c.env(k, v);
    }
    c.output().expect("run chvkit in netns")
}

/// Run chvkit inside `ns` with `--profile`/`--root` of `env`.
pub fn chvkit(ns: &NetNs, env: &Env, args: &[&str]) -> Output {
    chvkit_env(ns, env, args, &[])
}

/// Run `f` on a thread that has joined network namespace `ns` (setns is per thread).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .expect("thread in netns panicked")
}

/// How the server answers requests for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Flip every bit of the byte at this offset.
    CorruptByte(usize),
    /// Announce the full Content-Length, send this many bytes, close the connection.
    CutShort(usize),
    /// Like CutShort, then stop listening for good (later connections are refused).
    DieAfter(usize),
}

#[derive(Default)]
struct Shared {
    files: Mutex<HashMap<String, Vec<u8>>>,
    modes: Mutex<HashMap<String, Mode>>,
    hits: Mutex<HashMap<String, usize>>,
    stop: AtomicBool,
}

pub struct HttpServer {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Listen on 127.0.0.1 inside namespace `ns` (or the test's own namespace for `None`).
    pub fn start(ns: Option<&str>) -> HttpServer {
        let shared = Arc::new(Shared::default());
        let s2 = shared.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.map(str::to_string);
        let accept = std::thread::spawn(move || {
            if let Some(ns) = ns {
                let path = format!("/run/netns/{ns}");
                let fd = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            }
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            tx.send(l.local_addr().expect("addr").port())
                .expect("send port");
            while !s2.stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let s3 = s2.clone();
                        std::thread::spawn(move || serve(c, &s3));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            // The listener is dropped here: from now on connections are refused.
        });
        let port = rx.recv().expect("server port");
        HttpServer {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn put(&self, name: &str, data: &[u8]) {
        self.shared
            .files
            .lock()
            .unwrap()
            .insert(name.to_string(), data.to_vec());
    }

    pub fn set_mode(&self, name: &str, mode: Mode) {
        self.shared
            .modes
            .lock()
            .unwrap()
            .insert(name.to_string(), mode);
    }

    pub fn hits(&self, name: &str) -> usize {
        *self.shared.hits.lock().unwrap().get(name).unwrap_or(&0)
    }

    pub fn total_hits(&self) -> usize {
        self.shared.hits.lock().unwrap().values().sum()
    }

    pub fn is_dead(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve(mut c: TcpStream, s: &Shared) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let path = loop {
        let n = match c.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_string(),
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return,
        }
    };
    let name = path.trim_start_matches('/').to_string();
    *s.hits.lock().unwrap().entry(name.clone()).or_default() += 1;
    let data = s.files.lock().unwrap().get(&name).cloned();
    let Some(mut data) = data else {
        let _ = c
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let mode = s
        .modes
        .lock()
        .unwrap()
        .get(&name)
        .copied()
        .unwrap_or(Mode::Normal);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    );
    let _ = c.write_all(head.as_bytes());
    match mode {
        Mode::Normal => {
            let _ = c.write_all(&data);
        }
        Mode::CorruptByte(i) => {
            if let Some(b) = data.get_mut(i) {
                *b ^= 0xff;
            }
            let _ = c.write_all(&data);
        }
        Mode::CutShort(k) | Mode::DieAfter(k) => {
            let _ = c.write_all(&data[..k.min(data.len())]);
            let _ = c.flush();
            if matches!(mode, Mode::DieAfter(_)) {
                s.stop.store(true, Ordering::SeqCst);
            }
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).expect("random");
    v
}

/// A fake `cloud-hypervisor-static`: a script that answers `--version` like v50.0 does, so
/// doctor's version check has something real to run.
pub fn fake_chv(tag: &str) -> Vec<u8> {
    format!("#!/bin/sh\necho cloud-hypervisor v50.0.0\n# {tag}\n").into_bytes()
}

/// The default profile with the firmware pinned to `fw_sha` and a few overrides. The guest
/// kernel step is off (`kernel.source: none`): these tests are about the VMM, firmware and
/// network; `tests/setup_kernel.rs` and `tests/guest_e2e.rs` cover the kernel step.
pub fn profile_yaml(fw_sha: &str, extra: &[(&str, &str)]) -> String {
    let mut y = chvkit::profile::DEFAULT_PROFILE_YAML
        .replace(
            "4a0a1e977368f6b15d2198a216bdedf9a350bf5e5ae07e29e695373ec16ad958",
            fw_sha,
        )
        .replace("  source: build\n", "  source: none\n");
    for (from, to) in extra {
        assert!(y.contains(from), "profile has no `{from}`");
        y = y.replace(from, to);
    }
    y
}

/// A temp dir holding `profile.yaml`, a `root/` for `--root` and a `mirror/` directory.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new(profile: &str) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("chvkit-setup-test")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("profile.yaml"), profile).unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        std::fs::create_dir_all(dir.path().join("mirror")).unwrap();
        Env { dir }
    }
    pub fn profile(&self) -> String {
        self.dir.path().join("profile.yaml").display().to_string()
    }
    pub fn set_profile(&self, text: &str) {
        std::fs::write(self.dir.path().join("profile.yaml"), text).unwrap();
    }
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    pub fn root_s(&self) -> String {
        self.root().display().to_string()
    }
    pub fn mirror(&self) -> PathBuf {
        self.dir.path().join("mirror")
    }
    /// A host path under the root.
    pub fn at(&self, host: &str) -> PathBuf {
        self.root().join(host.trim_start_matches('/'))
    }
    /// `--profile P --root R` followed by `args`.
    pub fn args<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut v = vec![
            "--profile".to_string(),
            self.profile(),
            "--root".to_string(),
            self.root_s(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// `item id -> result` of a setup/teardown `--json` report.
pub fn results(v: &serde_json::Value) -> Vec<(String, String)> {
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["id"].as_str().unwrap_or("").to_string(),
                        i["result"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A fresh test environment: fake artifacts (`fw_len` bytes of firmware, pinned; the binary
/// not), served over HTTP from inside `ns`. Returns the binary and the firmware too.
pub fn env_with_server(
    ns: &NetNs,
    tag: &str,
    fw_len: usize,
) -> (Env, HttpServer, Vec<u8>, Vec<u8>) {
    let chv = fake_chv(tag);
    let fw = random_bytes(fw_len);
    let env = Env::new(&profile_yaml(&sha256_hex(&fw), &[]));
    let srv = HttpServer::start(Some(&ns.name));
    srv.put(CHV, &chv);
    srv.put(FW, &fw);
    (env, srv, chv, fw)
}

/// Ids of the items a setup/teardown `--json` report changed, in report order.
pub fn changed(v: &serde_json::Value) -> Vec<String> {
    results(v)
        .into_iter()
        .filter(|(_, r)| r == "changed")
        .map(|(id, _)| id)
        .collect()
}

/// A test environment whose artifacts come from a mirror directory: a fake binary and
/// `fw_len` random bytes of firmware, pinned in the profile (`extra` edits it further, as for
/// [`profile_yaml`]). Returns the firmware and the `--artifacts-from` argument.
pub fn env_with_mirror(tag: &str, fw_len: usize, extra: &[(&str, &str)]) -> (Env, Vec<u8>, String) {
    let fw = random_bytes(fw_len);
    let env = Env::new(&profile_yaml(&sha256_hex(&fw), extra));
    std::fs::write(env.mirror().join(CHV), fake_chv(tag)).unwrap();
    std::fs::write(env.mirror().join(FW), &fw).unwrap();
    let mirror = env.mirror().display().to_string();
    (env, fw, mirror)
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}
