//! Everything doctor judges, read once and in parallel: the slow parts (hashing artifacts,
//! running `cloud-hypervisor --version`, creating a KVM VM) overlap with the netlink and
//! nftables reads.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::host::cpu::CpuFacts;
use crate::host::files::{self, FileFacts, KernelImage};
use crate::host::kvm::{KvmFacts, UserIdentity, DEV_KVM};
use crate::host::net::NetSnapshot;
use crate::host::nft::{NftError, Ruleset};
use crate::host::sysctl::Sysctls;
use crate::host::tools::{self, ToolFacts};
use crate::lockfile::{self, ArtifactLock};
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
                f.cpu = Some(timed("cpu", CpuFacts::read));
            }
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
        });
        f.elapsed = start.elapsed();
        f
    }
}
