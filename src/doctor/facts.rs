//! Everything doctor judges, read once and in parallel: the slow parts (hashing artifacts,
//! running `cloud-hypervisor --version`, creating a KVM VM) overlap with the netlink and
//! nftables reads.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::host::cpu::CpuFacts;
use crate::host::files::{self, FileFacts, KernelImage};
use crate::host::kvm::{KvmFacts, UserIdentity, DEV_KVM};
use crate::host::net::NetSnapshot;
use crate::host::nft::{NftError, Ruleset};
use crate::host::sysctl::Sysctls;
use crate::host::tools::{self, ToolFacts};
use crate::kernel::installed::{self, Installed};
use crate::lockfile::{self, ArtifactLock};
use crate::profile::KernelSource;
use crate::Context;

/// What a set of checks needs read.
pub mod need {
    pub const KVM: u32 = 1;
    pub const CPU: u32 = 1 << 1;
    pub const CHV: u32 = 1 << 2;
    pub const CHV_HASH: u32 = 1 << 3;
    pub const CHV_VERSION: u32 = 1 << 4;
    pub const FIRMWARE: u32 = 1 << 5;
    pub const LOCK: u32 = 1 << 6;
    pub const KERNEL: u32 = 1 << 7;
    pub const NET: u32 = 1 << 8;
    pub const NFT: u32 = 1 << 9;
    pub const TOOLS: u32 = 1 << 10;
    /// The guest kernel launch boots by default (`kernel.guest`). With [`CPU`] also read, on a
    /// PVM host an unrecorded ELF kernel is scanned for chvkit's PVM marker.
    pub const GUEST: u32 = 1 << 11;
}

/// Where doctor reads `/sys/module` (the `kvm_*` modules: PVM or hardware KVM) from:
/// `CHVKIT_SYS_MODULE` when set and not empty, else the running host's. A test hook, like
/// `CHVKIT_LIBNFTABLES`: integration tests point doctor at a fake PVM (`<dir>/kvm_pvm/`) or
/// hardware host. Launch and `chvkit kernel` always read the real `/sys/module`.
pub const SYS_MODULE_ENV: &str = "CHVKIT_SYS_MODULE";

fn sys_module() -> PathBuf {
    std::env::var_os(SYS_MODULE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/module"))
}

/// The rootfs tools and the Debian packages that ship them.
pub const ROOTFS_TOOLS: &[(&str, &str)] = &[
    ("buildah", "buildah"),
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    ("mkfs.ext4", "e2fsprogs"),
];

/// How long `cloud-hypervisor --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Artifact {
    /// The path on this host (with the `--root` prefix).
    pub path: PathBuf,
    pub file: FileFacts,
    pub sha256: Option<Result<String, String>>,
    pub version: Option<Result<String, String>>,
}

#[derive(Debug)]
pub struct Kernel {
    pub path: PathBuf,
    pub from_env: bool,
    pub file: FileFacts,
    pub image: Option<Result<KernelImage, String>>,
}

/// Where the kernel launch boots (when no `--kernel` is given) comes from, in launch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestOrigin {
    /// `CHV_KERNEL_PATH`: wins over everything.
    Env,
    /// The record `chvkit kernel` (or setup) wrote under `<state_dir>/kernel/`.
    Installed,
    /// The profile's `kernel.path`, as it is (nothing installed, or `kernel.source: none`).
    ProfilePath,
}

impl GuestOrigin {
    pub fn label(self) -> &'static str {
        match self {
            GuestOrigin::Env => "CHV_KERNEL_PATH",
            GuestOrigin::Installed => "installed by `chvkit kernel`",
            GuestOrigin::ProfilePath => "profile kernel.path",
        }
    }
}

/// A `CONFIG_*` value as a kernel's config file states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigValue {
    BuiltIn,
    Module,
    Unset,
}

/// The options a chvkit guest needs built in (or loaded by an initramfs).
pub const DRIVER_OPTIONS: [&str; 4] = [
    "CONFIG_VIRTIO_PCI",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_VIRTIO_NET",
    "CONFIG_EXT4_FS",
];

/// The driver options read from a kernel's config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    pub path: PathBuf,
    /// [`DRIVER_OPTIONS`] in order.
    pub options: Vec<(&'static str, ConfigValue)>,
}

impl KernelConfig {
    /// Read [`DRIVER_OPTIONS`] from a config file (`CONFIG_X=y`, `=m`, `# CONFIG_X is not set`).
    pub fn read(path: &Path) -> std::io::Result<KernelConfig> {
        let text = std::fs::read_to_string(path)?;
        Ok(KernelConfig::parse(path, &text))
    }

    pub fn parse(path: &Path, text: &str) -> KernelConfig {
        let mut options: Vec<(&'static str, ConfigValue)> = DRIVER_OPTIONS
            .iter()
            .map(|o| (*o, ConfigValue::Unset))
            .collect();
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once('=') else {
                continue;
            };
            if let Some(slot) = options.iter_mut().find(|(o, _)| *o == k) {
                slot.1 = match v.trim() {
                    "y" => ConfigValue::BuiltIn,
                    "m" => ConfigValue::Module,
                    _ => ConfigValue::Unset,
                };
            }
        }
        KernelConfig {
            path: path.to_path_buf(),
            options,
        }
    }
}

/// The kernel file launch would boot, as read (stat and headers only; never hashed).
#[derive(Debug, Clone)]
pub struct GuestKernel {
    pub origin: GuestOrigin,
    /// The record, for [`GuestOrigin::Installed`].
    pub record: Option<Installed>,
    /// The kernel on this host (with the `--root` prefix).
    pub path: PathBuf,
    pub file: FileFacts,
    /// Modification time, Unix seconds.
    pub mtime: Option<u64>,
    pub image: Option<Result<KernelImage, String>>,
    /// For an ELF: the size its headers say the file has at least (end of the section header
    /// table and of every segment). A smaller file is truncated.
    pub implied_size: Option<u64>,
    /// The record's initramfs (with the prefix) and its stat.
    pub initramfs: Option<(PathBuf, FileFacts)>,
    /// Read only on a PVM host for a kernel without a record: whether the file carries
    /// [`installed::PVM_MARKER`] (an ~18 MiB scan).
    pub pvm_marker: Option<Result<bool, String>>,
    /// For a kernel of unknown recipe (no record, or a record of source `path`): the config
    /// found beside it or in `/boot`, and where doctor looked.
    pub config: Option<KernelConfig>,
    pub config_searched: Vec<PathBuf>,
    /// With [`GuestOrigin::Env`]: the installed kernel `CHV_KERNEL_PATH` overrides.
    pub overrides: Option<PathBuf>,
}

/// What launch would boot without `--kernel`.
#[derive(Debug, Clone)]
pub enum GuestChoice {
    /// `kernel.source: none` and nothing named: each launch names its kernel.
    Unprovided,
    /// The profile asks for a source but nothing is installed and no `kernel.path` is set.
    NotInstalled {
        /// For `build`: whether the kernel source tarball is present.
        source_tarball: bool,
    },
    /// The record exists but cannot be read.
    RecordError {
        path: PathBuf,
        error: String,
    },
    Kernel(Box<GuestKernel>),
}

#[derive(Debug, Clone)]
pub struct Guest {
    /// The profile's `kernel.source` in force.
    pub source: KernelSource,
    pub choice: GuestChoice,
}

#[derive(Debug)]
pub struct Facts {
    pub user: UserIdentity,
    pub kvm: Option<KvmFacts>,
    pub cpu: Option<CpuFacts>,
    pub chv: Option<Artifact>,
    pub firmware: Option<Artifact>,
    pub lock_path: PathBuf,
    pub lock: Option<Result<Option<ArtifactLock>, String>>,
    /// `None` inside when no kernel is configured.
    pub kernel: Option<Option<Kernel>>,
    pub guest: Option<Guest>,
    pub net: Option<Result<NetSnapshot, String>>,
    pub sysctl: Sysctls,
    pub ruleset: Option<Result<Ruleset, NftError>>,
    pub tools: Option<Vec<ToolFacts>>,
    /// Time spent reading, for `-v` logs.
    pub elapsed: Duration,
}

/// Run `f`, logging how long it took at debug level (`chvkit -vv doctor`).
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    tracing::debug!(elapsed_us = t.elapsed().as_micros() as u64, "read {what}");
    r
}

fn artifact(path: PathBuf, hash: bool, version: bool) -> Artifact {
    let file = FileFacts::stat(&path);
    // Hash and `--version` overlap: the child runs while this thread hashes.
    let (sha256, version) = std::thread::scope(|s| {
        let v = (version && file.executable()).then(|| {
            s.spawn(|| {
                timed("--version", || {
                    files::binary_version(&path, VERSION_TIMEOUT).map_err(|e| e.to_string())
                })
            })
        });
        let h = (hash && file.is_file).then(|| {
            timed("sha256", || {
                files::sha256_file(&path).map_err(|e| e.to_string())
            })
        });
        let v = v.and_then(|j| j.join().ok());
        (h, v)
    });
    Artifact {
        path,
        file,
        sha256,
        version,
    }
}

impl Facts {
    pub fn gather(ctx: &Context, needs: u32) -> Facts {
        let start = Instant::now();
        let p = &ctx.profile;
        let has = |n: u32| needs & n != 0;
        let lock_path = ArtifactLock::path(p, &ctx.root);
        let chv_path = ctx.root.path(p.cloud_hypervisor.install_path.as_path());
        let fw_path = ctx.root.path(p.firmware.path.as_path());

        let mut f = Facts {
            // Only kvm.access needs the real identity (an NSS lookup): read in the KVM thread.
            user: UserIdentity {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                groups: Vec::new(),
                name: None,
                via_sudo: false,
            },
            kvm: None,
            cpu: None,
            chv: None,
            firmware: None,
            lock_path: lock_path.clone(),
            lock: None,
            kernel: None,
            guest: None,
            net: None,
            sysctl: Sysctls::new(),
            ruleset: None,
            tools: None,
            elapsed: Duration::ZERO,
        };
        std::thread::scope(|s| {
            // Files: hashing a ~4 MiB binary and running it are the slowest reads.
            let files_job = (has(need::CHV) || has(need::FIRMWARE) || has(need::LOCK)).then(|| {
                s.spawn(|| {
                    let lock = has(need::LOCK)
                        .then(|| ArtifactLock::load(&lock_path).map_err(|e| e.to_string()));
                    // Hash only what can be compared with something (a pin or a lock entry; an
                    // unreadable lock file is reported with the actual hash).
                    let comparable = |pinned: bool, key: &str| {
                        pinned
                            || match &lock {
                                Some(Ok(Some(l))) => l.artifacts.contains_key(key),
                                Some(Err(_)) => true,
                                _ => false,
                            }
                    };
                    let chv_hash = has(need::CHV_HASH)
                        && comparable(
                            p.cloud_hypervisor.sha256.is_some(),
                            lockfile::CLOUD_HYPERVISOR,
                        );
                    let fw_hash = comparable(p.firmware.sha256.is_some(), lockfile::FIRMWARE);
                    let chv = has(need::CHV).then(|| {
                        timed("cloud-hypervisor binary", || {
                            artifact(chv_path, chv_hash, has(need::CHV_VERSION))
                        })
                    });
                    let fw = has(need::FIRMWARE)
                        .then(|| timed("firmware", || artifact(fw_path, fw_hash, false)));
                    (chv, fw, lock)
                })
            });
            // Destroying the probe VM waits for an RCU grace period (up to milliseconds).
            let kvm_job = has(need::KVM).then(|| {
                s.spawn(|| {
                    let user = UserIdentity::current();
                    let kvm = timed("/dev/kvm", || {
                        KvmFacts::probe(std::path::Path::new(DEV_KVM))
                    });
                    (kvm, user)
                })
            });
            let tools_job = has(need::TOOLS)
                .then(|| s.spawn(|| timed("rootfs tools", || tools::probe(ROOTFS_TOOLS))));

            if has(need::CPU) {
                f.cpu = Some(timed("cpu", || {
                    CpuFacts::read_from(Path::new("/proc/cpuinfo"), &sys_module())
                }));
            }
            // After the CPU facts: on a PVM host an unrecorded kernel is scanned for the marker.
            let scan_pvm = f.cpu.as_ref().is_some_and(|c| c.pvm);
            let guest_job = has(need::GUEST)
                .then(|| s.spawn(move || timed("guest kernel", || guest(ctx, scan_pvm))));
            if has(need::NET) {
                f.net = Some(timed("netlink", || {
                    NetSnapshot::read().map_err(|e| e.to_string())
                }));
            }
            if has(need::NFT) {
                f.ruleset = Some(timed("nftables ruleset", Ruleset::read));
            }
            if has(need::KERNEL) {
                f.kernel = Some(p.kernel_path().map(|kp| {
                    let path = ctx.root.path(&kp);
                    let file = FileFacts::stat(&path);
                    let image = file
                        .is_file
                        .then(|| files::sniff_kernel(&path).map_err(|e| e.to_string()));
                    Kernel {
                        path,
                        from_env: std::env::var_os("CHV_KERNEL_PATH")
                            .is_some_and(|v| !v.is_empty()),
                        file,
                        image,
                    }
                }));
            }
            if let Some(j) = files_job {
                if let Ok((chv, fw, lock)) = j.join() {
                    f.chv = chv;
                    f.firmware = fw;
                    f.lock = lock;
                }
            }
            if let Some(j) = kvm_job {
                if let Ok((kvm, user)) = j.join() {
                    f.kvm = Some(kvm);
                    f.user = user;
                }
            }
            if let Some(j) = tools_job {
                f.tools = j.join().ok();
            }
            if let Some(j) = guest_job {
                f.guest = j.join().ok();
            }
        });
        f.elapsed = start.elapsed();
        f
    }
}

/// Launch's choice of kernel without `--kernel` (see `launch::config::installed_boot`):
/// `CHV_KERNEL_PATH`, else the installed record (unless `kernel.source` is `none`), else the
/// profile's `kernel.path`.
pub fn guest(ctx: &Context, scan_pvm: bool) -> Guest {
    let p = &ctx.profile;
    let source = p.kernel.source();
    let record = || match installed::load(p, &ctx.root) {
        Ok(r) => Ok(r),
        Err(e) => Err((installed::record_path(p, &ctx.root), e.to_string())),
    };
    let env = std::env::var_os("CHV_KERNEL_PATH")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let choice = if let Some(e) = env {
        let mut k = guest_kernel(ctx, GuestOrigin::Env, ctx.root.path(e), None, scan_pvm);
        if source != KernelSource::None {
            k.overrides = record().ok().flatten().map(|r| ctx.root.path(&r.vmlinux));
        }
        GuestChoice::Kernel(Box::new(k))
    } else {
        let rec = if source == KernelSource::None {
            Ok(None)
        } else {
            record()
        };
        match rec {
            Err((path, error)) => GuestChoice::RecordError { path, error },
            Ok(Some(r)) => GuestChoice::Kernel(Box::new(guest_kernel(
                ctx,
                GuestOrigin::Installed,
                ctx.root.path(&r.vmlinux),
                Some(r),
                scan_pvm,
            ))),
            Ok(None) => match &p.kernel.path {
                Some(kp) => GuestChoice::Kernel(Box::new(guest_kernel(
                    ctx,
                    GuestOrigin::ProfilePath,
                    ctx.root.path(kp.as_path()),
                    None,
                    scan_pvm,
                ))),
                None if source == KernelSource::None => GuestChoice::Unprovided,
                None => GuestChoice::NotInstalled {
                    source_tarball: source == KernelSource::Build && {
                        let t = crate::kernel::build::SOURCE_TARBALL;
                        ctx.root.path(t).is_file() || Path::new(t).is_file()
                    },
                },
            },
        }
    };
    Guest { source, choice }
}

fn guest_kernel(
    ctx: &Context,
    origin: GuestOrigin,
    path: PathBuf,
    record: Option<Installed>,
    scan_pvm: bool,
) -> GuestKernel {
    let md = std::fs::metadata(&path).ok();
    let file = FileFacts::stat(&path);
    let mtime = md
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let image = file
        .is_file
        .then(|| files::sniff_kernel(&path).map_err(|e| e.to_string()));
    let elf = matches!(image, Some(Ok(KernelImage::ElfPvh | KernelImage::ElfNoPvh)));
    let implied_size = elf
        .then(|| crate::host::files::elf_implied_size(&path))
        .flatten();
    let initramfs = record.as_ref().and_then(|r| r.initramfs.as_ref()).map(|i| {
        let p = ctx.root.path(i);
        let f = FileFacts::stat(&p);
        (p, f)
    });
    // The marker is plain text only in an uncompressed vmlinux; a record already says.
    let pvm_marker = (scan_pvm
        && record.is_none()
        && matches!(image, Some(Ok(KernelImage::ElfPvh))))
    .then(|| {
        timed("PVM marker scan", || {
            installed::file_has_pvm_marker(&path).map_err(|e| e.to_string())
        })
    });
    // The drivers of a kernel chvkit did not build or pair with an initramfs are unknown
    // without its config.
    let unknown_recipe = record.as_ref().is_none_or(|r| r.source == "path");
    let (config, config_searched) = if unknown_recipe && file.is_file {
        find_config(ctx, &path, record.as_ref(), image.as_ref())
    } else {
        (None, Vec::new())
    };
    GuestKernel {
        origin,
        record,
        path,
        file,
        mtime,
        image,
        implied_size,
        initramfs,
        pvm_marker,
        config,
        config_searched,
        overrides: None,
    }
}

/// The kernel release a file is for: the record's, a bzImage header's, or the file name's
/// (`vmlinuz-<release>`, `vmlinux-<release>`).
fn release_of(
    path: &Path,
    record: Option<&Installed>,
    image: Option<&Result<KernelImage, String>>,
) -> Option<String> {
    if let Some(v) = record.and_then(|r| r.linux_version.clone()) {
        return Some(v);
    }
    if let Some(Ok(KernelImage::BzImage { version: Some(v) })) = image {
        if let Some(w) = v.split_whitespace().next() {
            return Some(w.to_string());
        }
    }
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("vmlinuz-")
        .or_else(|| name.strip_prefix("vmlinux-"))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Look for the kernel's config: `config-<release>` beside it and in `/boot` (under `--root`),
/// then `.config` and `config` beside it (a build tree; the fixture layout). For a record of
/// source `path` the user's original file's directory is searched too.
fn find_config(
    ctx: &Context,
    path: &Path,
    record: Option<&Installed>,
    image: Option<&Result<KernelImage, String>>,
) -> (Option<KernelConfig>, Vec<PathBuf>) {
    let release = release_of(path, record, image);
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(r) = record {
        let o = Path::new(&r.origin);
        if o.is_absolute() {
            if let Some(d) = o.parent() {
                dirs.push(ctx.root.path(d));
            }
        }
    }
    if let Some(d) = path.parent() {
        dirs.push(d.to_path_buf());
    }
    let mut candidates = Vec::new();
    if let Some(v) = &release {
        for d in &dirs {
            candidates.push(d.join(format!("config-{v}")));
        }
        candidates.push(ctx.root.path(format!("/boot/config-{v}")));
    }
    for d in &dirs {
        candidates.push(d.join(".config"));
        candidates.push(d.join("config"));
    }
    candidates.dedup();
    for c in &candidates {
        if c.is_file() {
            if let Ok(k) = KernelConfig::read(c) {
                return (Some(k), candidates);
            }
        }
    }
    (None, candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values() {
        let k = KernelConfig::parse(
            Path::new("/boot/config-x"),
            "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\n# CONFIG_VIRTIO_NET is not set\n\
             CONFIG_EXT4_FS=y\nCONFIG_EXT4_FS_POSIX_ACL=y\n",
        );
        assert_eq!(
            k.options,
            vec![
                ("CONFIG_VIRTIO_PCI", ConfigValue::BuiltIn),
                ("CONFIG_VIRTIO_BLK", ConfigValue::Module),
                ("CONFIG_VIRTIO_NET", ConfigValue::Unset),
                ("CONFIG_EXT4_FS", ConfigValue::BuiltIn),
            ]
        );
    }

    #[test]
    fn release_from_names() {
        assert_eq!(
            release_of(Path::new("/boot/vmlinuz-6.1.0-57-cloud-amd64"), None, None).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        let bz = Ok(KernelImage::BzImage {
            version: Some("6.12.118 (x@y) #1".into()),
        });
        assert_eq!(
            release_of(Path::new("/k/bzImage"), None, Some(&bz)).as_deref(),
            Some("6.12.118")
        );
        assert_eq!(release_of(Path::new("/k/vmlinux"), None, None), None);
    }
}
