//! QEMU (TCG) guest harness: boot a raw rootfs with Debian's cloud kernel to test what runs
//! inside the guest (the generated /init, networking, exit markers).
//!
//! Debian's cloud kernel has virtio_pci/virtio_blk/virtio_net as modules (facts §4), so the
//! harness boots it with the initramfs `chvkit kernel --source distro` builds
//! (`chvkit::kernel::initramfs`: busybox-static plus those `.ko` files in `modules.dep` order;
//! its init loads them, mounts `root=` and `switch_root`s to its `/init`). The initramfs is
//! cached in the temp dir by the hash of its bytes.
//!
//! Use from a test file with `#[path = "qemu/mod.rs"] mod qemu;` (or `mod qemu;`).
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The roots of the module set; their dependencies are computed.
/// Printed once by the initramfs per boot: counting it proves the guest did not reboot.
pub const BOOT_BANNER: &str = "chvkit-initramfs: boot";

#[derive(Debug, Clone)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub version: String,
}

/// `CHVKIT_TEST_KERNEL=/boot/vmlinuz-…` or the newest `/boot/vmlinuz-*-cloud-amd64`.
pub fn find_kernel() -> Option<Kernel> {
    if let Ok(p) = std::env::var("CHVKIT_TEST_KERNEL") {
        let p = PathBuf::from(p);
        let version = p
            .file_name()?
            .to_string_lossy()
            .strip_prefix("vmlinuz-")?
            .to_string();
        return Some(Kernel {
            vmlinuz: p,
            version,
        });
    }
    let mut found: Vec<Kernel> = fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let v = name.strip_prefix("vmlinuz-")?;
            (v.ends_with("-cloud-amd64") && Path::new("/lib/modules").join(v).is_dir()).then(|| {
                Kernel {
                    vmlinuz: e.path(),
                    version: v.to_string(),
                }
            })
        })
        .collect();
    found.sort_by_key(|k| natural_key(&k.version));
    found.pop()
}

fn natural_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Why the harness cannot run here, if it cannot (for `common::skip`).
pub fn unavailable() -> Option<String> {
    for t in ["qemu-system-x86_64", "busybox"] {
        if !have(t) {
            return Some(format!(
                "`{t}` is not installed (make test-deps installs it)"
            ));
        }
    }
    if find_kernel().is_none() {
        return Some(
            "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)".into(),
        );
    }
    None
}

fn have(t: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
        .unwrap_or(false)
}

/// The initramfs for `k`, as `chvkit kernel --source distro` builds it, written once to the
/// temp dir (by the hash of its bytes: reproducible, so every test of a run shares one file).
pub fn initramfs(k: &Kernel) -> Result<PathBuf, String> {
    use sha2::{Digest, Sha256};
    let distro = chvkit::kernel::initramfs::DistroKernel {
        version: k.version.clone(),
        vmlinuz: k.vmlinuz.clone(),
        modules_dir: Path::new("/lib/modules").join(&k.version),
    };
    let bytes = chvkit::kernel::initramfs::build_initramfs(&distro, Path::new("/bin/busybox"), 0)
        .map_err(|e| e.to_string())?;
    let tag = &hex::encode(Sha256::digest(&bytes))[..16];
    let dir = std::env::temp_dir().join("chvkit-test-initramfs");
    let out = dir.join(format!("{}-{tag}.cpio.gz", k.version));
    if !out.is_file() {
        chvkit::fsutil::write_atomic(&out, &bytes, 0o644)
            .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub format: Format,
    pub readonly: bool,
}

impl Disk {
    pub fn raw(path: impl Into<PathBuf>) -> Disk {
        Disk {
            path: path.into(),
            format: Format::Raw,
            readonly: false,
        }
    }
    pub fn raw_ro(path: impl Into<PathBuf>) -> Disk {
        Disk {
            readonly: true,
            ..Disk::raw(path)
        }
    }
}

#[derive(Debug, Clone)]
pub struct QemuOpts {
    /// First disk is `/dev/vda` (the root), then vdb, …
    pub disks: Vec<Disk>,
    /// `(tap ifname, guest mac)`: a virtio-net NIC on an existing TAP.
    pub tap: Option<(String, String)>,
    /// Run QEMU inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Extra kernel command line (after `console=ttyS0 root=/dev/vda rw quiet`).
    pub append: String,
    pub timeout: Duration,
    pub memory_mib: u32,
    /// Pass `-no-reboot` (off by default: tests prove the guest powers off by itself).
    pub no_reboot: bool,
}

impl Default for QemuOpts {
    fn default() -> Self {
        QemuOpts {
            disks: vec![],
            tap: None,
            netns: None,
            append: String::new(),
            timeout: Duration::from_secs(180),
            memory_mib: 512,
            no_reboot: false,
        }
    }
}

#[derive(Debug)]
pub struct QemuRun {
    pub serial: String,
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl QemuRun {
    /// Values of every `CHVKIT_EXIT=<n>` line on the console.
    pub fn exit_markers(&self) -> Vec<i32> {
        self.serial
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("CHVKIT_EXIT="))
            .filter_map(|v| v.trim().parse().ok())
            .collect()
    }

    /// How many times the guest booted (initramfs banners).
    pub fn boots(&self) -> usize {
        self.serial.matches(BOOT_BANNER).count()
    }

    /// QEMU ended on its own (guest power-off), not killed at the timeout.
    pub fn powered_off(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }
}

/// Boot and wait for QEMU to exit (or kill it at the timeout). The serial log is returned.
pub fn run(o: &QemuOpts) -> Result<QemuRun, String> {
    let k = find_kernel().ok_or("no cloud kernel in /boot")?;
    let initrd = initramfs(&k)?;
    let logdir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let log = logdir.path().join("serial.log");
    let mut c = match &o.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    tcg_args(&mut c, o.memory_mib, &log)
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 root=/dev/vda rw quiet {}", o.append));
    if o.no_reboot {
        c.arg("-no-reboot");
    }
    for (i, d) in o.disks.iter().enumerate() {
        let fmt = match d.format {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        };
        let mut spec = format!(
            "file={},format={fmt},if=none,id=d{i},cache=unsafe",
            d.path.display()
        );
        if d.readonly {
            spec.push_str(",readonly=on");
        }
        c.arg("-drive").arg(spec);
        c.arg("-device").arg(format!("virtio-blk-pci,drive=d{i}"));
    }
    if let Some((tap, mac)) = &o.tap {
        c.arg("-netdev")
            .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={mac}"));
    }
    spawn_and_wait(c, &log, o.timeout)
}

/// The arguments every harness boot shares: q35 under TCG, no default devices, no display, one
/// vCPU, `memory_mib` of memory, the serial console into `log`.
pub fn tcg_args<'c>(c: &'c mut Command, memory_mib: u32, log: &Path) -> &'c mut Command {
    c.args([
        "-machine",
        "q35,accel=tcg",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-display", "none", "-monitor", "none", "-smp", "1"])
    .args(["-m", &memory_mib.to_string()])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
}

/// Start QEMU (`c`, serial to `log`) and wait for it to exit, or kill it at `timeout`; the
/// serial log, with QEMU's own error appended when it failed. Shared with `ovmf.rs`.
pub fn spawn_and_wait(mut c: Command, log: &Path, timeout: Duration) -> Result<QemuRun, String> {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = c.spawn().map_err(|e| format!("qemu: {e}"))?;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = start.elapsed();
    let mut serial = String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned();
    if let Some(s) = &status {
        if !s.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            serial.push_str(&format!("\n[qemu exited {s}: {err}]\n"));
        }
    }
    Ok(QemuRun {
        serial,
        status,
        elapsed,
        timed_out,
    })
}

/// Write `text` to a file in `dir` (helper for building test contexts).
pub fn write_exec(path: &Path, text: &str) {
    let mut f = fs::File::create(path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Build a guest image with `chvkit rootfs` from a busybox-static context: `dockerfile` may
/// `COPY busybox` and `COPY workload.sh`, which hold the host's /bin/busybox and `workload`.
/// Scratch lives under `dir`; the image is written to `out`.
/// [`build_busybox_image`] into `<tmp>/<prefix><pid>/<name>`, for an image a test binary
/// builds once and keeps in a static: a static is never dropped, so the directories that
/// earlier (finished) runs left are removed first.
pub fn build_busybox_image_once(
    prefix: &str,
    name: &str,
    dockerfile: &str,
    workload: &str,
) -> PathBuf {
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = file.strip_prefix(prefix) {
            if !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let out = dir.join(name);
    build_busybox_image(&dir, dockerfile, workload, &out);
    out
}

pub fn build_busybox_image(dir: &Path, dockerfile: &str, workload: &str, out: &Path) {
    let ctx = dir.join("ctx");
    fs::create_dir_all(&ctx).expect("create build context");
    fs::copy("/bin/busybox", ctx.join("busybox")).expect("copy /bin/busybox");
    write_exec(&ctx.join("workload.sh"), workload);
    fs::write(ctx.join("Dockerfile"), dockerfile).expect("write Dockerfile");
    let o = Command::new(env!("CARGO_BIN_EXE_chvkit"))
        .arg("--root")
        .arg(dir.join("root"))
        .args(["rootfs", "--pull", "never", "-o"])
        .arg(out)
        .arg(&ctx)
        .output()
        .expect("run chvkit rootfs");
    assert!(
        o.status.success(),
        "chvkit rootfs: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
