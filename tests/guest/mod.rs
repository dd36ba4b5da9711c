//! What the end-to-end test (`tests/guest_e2e.rs`) and bench (`benches/guest.rs`) share: the
//! job image built with `chvkit rootfs`, and the guest kernel that runs on this host.
//!
//! Use with `#[path = "guest/mod.rs"] mod guest;` next to `mod common;` and `mod qemu;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::qemu;

pub const WORKLOAD: &str = r#"#!/bin/sh
echo "workload: start uptime=$(cut -d' ' -f1 /proc/uptime) args=$(printf '[%s]' "$@") cwd=$(pwd) greeting=$GREETING"
case "$CHECKER_MODE" in
main)
	if [ "$CHECKER_EVIL" != "'; touch /pwned; '" ]; then
		echo "workload: CHECKER_EVIL arrived changed: [$CHECKER_EVIL]"
		exit 12
	fi
	if [ -e /pwned ]; then
		echo "workload: /pwned exists"
		exit 11
	fi
	echo "workload: evil value inert"
	echo "workload: env file bytes=$(wc -c </etc/checker.env)"
	ip -6 addr show dev eth0
	if ping -c 1 -W 20 fdcd::1; then echo "workload: gateway ping ok"; else exit 10; fi
	exit 7
	;;
quick)
	exit 0
	;;
sleep)
	i=0
	while :; do
		i=$((i + 1))
		echo "workload: tick $i"
		sleep 1
	done
	;;
esac
echo "workload: unknown mode [$CHECKER_MODE]"
exit 99
"#;

pub const DOCKERFILE: &str = "FROM scratch
COPY busybox /bin/busybox
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]
COPY workload.sh /usr/local/bin/workload
ENV GREETING=hello
WORKDIR /srv
CMD [\"/usr/local/bin/workload\", \"arg-one\", \"arg two\"]
";

/// The image, built once per test binary with `chvkit rootfs`.
pub fn image() -> &'static PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        qemu::build_busybox_image_once("chvkit-e2e-img-", "job.raw", DOCKERFILE, WORKLOAD)
    })
}

/// The profile's `kernel:` section for these tests, or why no guest can run.
pub fn kernel_section() -> Result<(String, &'static str), String> {
    let cache = std::env::var_os(chvkit::kernel::CACHE_ENV).filter(|v| !v.is_empty());
    let tarball = Path::new(chvkit::kernel::build::SOURCE_TARBALL);
    if let (Some(cache), true) = (&cache, tarball.exists()) {
        let key = chvkit::kernel::build::cache_key(tarball).map_err(|e| e.to_string())?;
        if Path::new(cache).join(&key).join("vmlinux").is_file() {
            return Ok(("source: build".into(), "chvkit's build kernel (cached)"));
        }
    }
    if let Some(k) = std::env::var_os("CHVKIT_FIXTURE_KERNEL").filter(|v| !v.is_empty()) {
        if Path::new(&k).is_file() {
            return Ok((
                format!("source: path\n  path: {}", Path::new(&k).display()),
                "the fixture kernel (chvkit's build kernel is not in the cache)",
            ));
        }
    }
    Err(
        "no guest kernel that runs here: run `make guest-kernel` (chvkit's build kernel, \
         CHVKIT_KERNEL_CACHE) or set CHVKIT_FIXTURE_KERNEL"
            .into(),
    )
}

/// The default profile with `kernel:` set to [`kernel_section`]'s answer.
pub fn profile_yaml(kernel: &str) -> String {
    let y = chvkit::profile::DEFAULT_PROFILE_YAML
        .replace("  source: build\n  path: null", &format!("  {kernel}"));
    assert!(
        y.contains(kernel),
        "the default profile has no kernel section"
    );
    y
}

/// The printk time of the first line containing `what` (`[   12.345678] …`).
pub fn printk_time(serial: &str, what: &str) -> Option<f64> {
    serial.lines().find(|l| l.contains(what)).and_then(|l| {
        let inner = l.trim_start().strip_prefix('[')?;
        inner.split(']').next()?.trim().parse().ok()
    })
}

/// A line on stderr that `cargo test` shows even for a passing test (libtest captures
/// `eprintln!`, not direct writes): which VMM and kernel ran, and what the guest printed.
pub fn notice(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("notice: {text}\n").as_bytes());
}
