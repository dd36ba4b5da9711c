//! Shared integration-test harness: private network namespaces, visible skips, the binary.
//!
//! Every test that touches networking creates its own namespace (unique name per test and
//! process) and removes it on drop, even when the test panics. Nothing here touches the
//! machine's own namespace or /etc.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Path of the built `chvkit` binary.
pub fn chvkit() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chvkit"))
}

/// `chvkit --root HOSTROOT rootfs ARGS` with `envs`, uncoloured, and without the caller's
/// `SOURCE_DATE_EPOCH` unless `envs` sets it.
pub fn chvkit_rootfs(hostroot: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(chvkit());
    c.arg("--root").arg(hostroot).arg("rootfs");
    c.args(args)
        .env("NO_COLOR", "1")
        .env_remove("SOURCE_DATE_EPOCH");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

// One source for visible skips, shared with the library's unit tests.
#[path = "../../src/testutil.rs"]
pub mod testutil;
pub use testutil::skip;

/// Debian's cloud kernel in /boot (`vmlinuz-*-cloud-amd64`, a bzImage), the newest.
pub fn debian_cloud_kernel() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort();
    found.pop()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn have_tool(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// `true` if the test may go on; otherwise it has reported the skip.
pub fn require(test: &str, root: bool, tools: &[&str]) -> bool {
    if root && !is_root() {
        skip(test, "needs root (network namespaces)");
        return false;
    }
    for t in tools {
        if !have_tool(t) {
            skip(
                test,
                &format!("`{t}` is not installed (make test-deps installs it)"),
            );
            return false;
        }
    }
    true
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short name: `<tag><pid><seq>` (fits interface and namespace name limits).
pub fn unique(tag: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    format!("{tag}{}x{n}", std::process::id() % 100_000)
}

/// A network namespace owned by one test.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("chvt-{}", unique(tag));
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name };
        ns.sh_ok("ip link set lo up");
        ns
    }

    /// A command inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Run a shell snippet inside the namespace.
    pub fn sh(&self, script: &str) -> Output {
        self.cmd("sh")
            .args(["-c", script])
            .output()
            .expect("run sh in netns")
    }

    /// Like [`NetNs::sh`] but the test fails with the output when the snippet fails.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in netns {}: `{script}` failed ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run chvkit inside the namespace.
    pub fn chvkit(&self, args: &[&str]) -> Output {
        self.cmd(chvkit())
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run chvkit in netns")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Kill anything a test left running in the namespace, then remove it.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Combined stdout+stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
