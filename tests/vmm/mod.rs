//! The VMM under test, for integration tests: the real Cloud Hypervisor when one is available,
//! otherwise the stand-in (`examples/chv_standin.rs`), plus a small HTTP/1.1-over-Unix-socket
//! client and an event-log reader.
//!
//! Choice, in order: `CHVKIT_TEST_VMM=standin` forces the stand-in (to run a suite against it
//! on a machine that has the real binary); `CHV_BIN` (a path); `cloud-hypervisor` on `PATH`;
//! otherwise the stand-in. Every spawn says which one it uses on stderr, where `cargo test`
//! shows it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Which VMM a test talks to.
#[derive(Clone, Debug)]
pub struct Binary {
    pub path: PathBuf,
    pub real: bool,
}

impl Binary {
    pub fn describe(&self) -> String {
        if self.real {
            format!("using real cloud-hypervisor at {}", self.path.display())
        } else {
            format!("using stand-in {}", self.path.display())
        }
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `<target>/<profile>` of the running test binary (`<target>/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// Path of the stand-in, built on first use if `cargo test` did not build examples (it skips
/// them when a single `--test` target is selected) or if it is older than its source.
pub fn standin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let path = profile_dir().join("examples").join("chv-standin");
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/chv_standin.rs");
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            // The stand-in uses nothing from the crate, so its own source decides freshness;
            // calling cargo regardless would relink it whenever the library changes.
            if let (Some(bin), Some(src)) = (modified(&path), modified(&source)) {
                if bin >= src {
                    return path;
                }
            }
            let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
            cmd.args(["build", "--quiet", "--example", "chv-standin"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if let Some(target) = profile_dir().parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            if profile_dir().file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let out = cmd.output().expect("run cargo build --example chv-standin");
            assert!(
                out.status.success() && path.is_file(),
                "building the stand-in failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            path
        })
        .clone()
}

/// The VMM binary tests should drive.
pub fn binary() -> Binary {
    if std::env::var("CHVKIT_TEST_VMM").is_ok_and(|v| v == "standin") {
        return Binary {
            path: standin(),
            real: false,
        };
    }
    if let Some(p) = std::env::var_os("CHV_BIN").filter(|p| !p.is_empty()) {
        return Binary {
            path: PathBuf::from(p),
            real: true,
        };
    }
    if let Some(p) = on_path("cloud-hypervisor") {
        return Binary {
            path: p,
            real: true,
        };
    }
    Binary {
        path: standin(),
        real: false,
    }
}

/// A notice on stderr, written directly so libtest's capture does not hide it.
pub fn notice(test: &str, msg: &str) {
    let _ = std::io::stderr().write_all(format!("notice: {test}: {msg}\n").as_bytes());
}

/// A guest kernel: `CHV_KERNEL_PATH`, else Debian's cloud kernel in /boot.
pub fn kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHV_KERNEL_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    crate::common::debian_cloud_kernel()
}

/// How to start a VMM.
pub struct Spawn {
    test: String,
    netns: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    binary: Binary,
}

impl Spawn {
    pub fn new(test: &str) -> Spawn {
        Spawn {
            test: test.to_string(),
            netns: None,
            args: vec![],
            env: vec![],
            binary: binary(),
        }
    }

    /// Run it inside a network namespace (the caller owns the namespace).
    pub fn netns(mut self, name: &str) -> Spawn {
        self.netns = Some(name.to_string());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Spawn {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Spawn {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// The snapshot-capable build (`CHV_BIN_SNAP`) when the real VMM is under test and one is
    /// named: on PVM hosts the stock v50.0 cannot snapshot (its PROVENANCE.md). glibc keeps one
    /// malloc arena there, which avoids that build's known SIGSYS at exit.
    pub fn snapshot_capable(mut self) -> Spawn {
        if self.binary.real {
            if let Some(p) = std::env::var_os("CHV_BIN_SNAP").filter(|p| !p.is_empty()) {
                self.binary = Binary {
                    path: PathBuf::from(p),
                    real: true,
                };
                self.env.push(("MALLOC_ARENA_MAX".into(), "1".into()));
            }
        }
        self
    }

    pub fn binary(&self) -> &Binary {
        &self.binary
    }

    /// Start it with `--api-socket path=<dir>/api.sock --event-monitor path=<dir>/events.json`
    /// and return once the socket accepts connections.
    pub fn start(self) -> Vmm {
        let vmm = self.start_no_wait();
        vmm.wait_for_socket(Duration::from_secs(10));
        vmm
    }

    /// Like [`Spawn::start`] without waiting for the socket (for start-up failures).
    pub fn start_no_wait(self) -> Vmm {
        let dir = tempfile::Builder::new()
            .prefix("chvt-vmm-")
            .tempdir()
            .expect("tempdir");
        let api = dir.path().join("api.sock");
        let events = dir.path().join("events.json");
        self.start_in(dir, api, events)
    }

    /// Start with an API socket path chosen by the caller (e.g. one left over on purpose).
    pub fn start_in(self, dir: tempfile::TempDir, api: PathBuf, events: PathBuf) -> Vmm {
        notice(&self.test, &self.binary.describe());
        let stdout = dir.path().join("vmm.stdout");
        let stderr = dir.path().join("vmm.stderr");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.binary.path);
                c
            }
            None => Command::new(&self.binary.path),
        };
        cmd.arg("--api-socket")
            .arg(format!("path={}", api.display()))
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn the VMM");
        Vmm {
            child: Some(child),
            status: None,
            api,
            events,
            stderr,
            binary: self.binary,
            test: self.test,
            dir,
        }
    }
}

/// A running VMM, killed (SIGKILL, only this child) and reaped on drop.
pub struct Vmm {
    child: Option<Child>,
    status: Option<ExitStatus>,
    pub api: PathBuf,
    pub events: PathBuf,
    stderr: PathBuf,
    pub binary: Binary,
    pub test: String,
    pub dir: tempfile::TempDir,
}

impl Vmm {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wait_for_socket(&self, budget: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < budget {
            if UnixStream::connect(&self.api).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "{}: the VMM's API socket {} did not come up within {budget:?}\n{}",
            self.test,
            self.api.display(),
            self.stderr_text()
        );
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.api).unwrap_or_else(|e| {
            panic!(
                "connect to {}: {e}\n{}",
                self.api.display(),
                self.stderr_text()
            )
        })
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<Event> {
        read_events(&self.events)
    }

    /// `source:event` for every event so far, e.g. `vm:booted`.
    pub fn event_names(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| format!("{}:{}", e.source, e.event))
            .collect()
    }

    /// Waits until an event `source:event` has been logged.
    pub fn wait_event(&self, name: &str, budget: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < budget {
            if self.event_names().iter().any(|n| n == name) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Waits for the process to end; `None` if it is still running after `budget`.
    pub fn wait_exit(&mut self, budget: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let t0 = Instant::now();
        let child = self.child.as_mut()?;
        while t0.elapsed() < budget {
            if let Ok(Some(st)) = child.try_wait() {
                self.status = Some(st);
                return self.status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.pid() as libc::pid_t, sig);
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.status.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// One event-monitor record.
#[derive(Clone, Debug)]
pub struct Event {
    pub source: String,
    pub event: String,
    pub properties: serde_json::Value,
    pub secs: u64,
    pub nanos: u64,
}

/// Parses an event log: pretty-printed JSON objects separated by blank lines.
pub fn read_events(path: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .map(|v| Event {
            source: v["source"].as_str().unwrap_or_default().to_string(),
            event: v["event"].as_str().unwrap_or_default().to_string(),
            properties: v["properties"].clone(),
            secs: v["timestamp"]["secs"].as_u64().unwrap_or(0),
            nanos: v["timestamp"]["nanos"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// An HTTP/1.1 response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    /// The error chain of a Cloud Hypervisor error response.
    pub fn errors(&self) -> Vec<String> {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not a JSON string array ({e}): {:?}", self.text()))
    }
}

/// A keep-alive HTTP/1.1 client over the VMM's Unix socket.
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn get(&mut self, endpoint: &str) -> Reply {
        self.request("GET", endpoint, None)
            .unwrap_or_else(|e| panic!("GET {endpoint}: {e}"))
    }

    pub fn put(&mut self, endpoint: &str, body: Option<&str>) -> Reply {
        self.request("PUT", endpoint, body)
            .unwrap_or_else(|e| panic!("PUT {endpoint}: {e}"))
    }

    pub fn put_json(&mut self, endpoint: &str, body: &serde_json::Value) -> Reply {
        self.put(endpoint, Some(&body.to_string()))
    }

    pub fn request(
        &mut self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
    ) -> std::io::Result<Reply> {
        let mut req = format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n");
        if let Some(b) = body {
            req.push_str("Content-Type: application/json\r\n");
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        self.send_raw(req.as_bytes())?;
        self.read_reply()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response (status line, headers, then `Content-Length` bytes).
    pub fn read_reply(&mut self) -> std::io::Result<Reply> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while self.buf.len() < len {
            self.fill()?;
        }
        let body = self.buf.drain(..len).collect();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16384];
        // A signal delivered to this test process while it waits (a long vm.snapshot) must
        // not read as a failed call: `read` does not retry EINTR by itself.
        let n = loop {
            match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Serialises tests that must not overlap on a 2-core host (real guests spin a vCPU each).
pub fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
