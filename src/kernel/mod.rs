//! `chvkit kernel`: provide the guest kernel the profile asks for, and say where it is.
//!
//! Sources (the profile's `kernel.source`): `path` (a vmlinux or bzImage the user gives),
//! `distro` (the host's installed linux-image package plus a generated initramfs), `build`
//! (chvkit's own recipe under `guest/kernel/` over the distribution's kernel source package).
//! The result goes to `<state_dir>/kernel/` with a record (`installed`) and a lock-file entry;
//! running it again with the same inputs changes nothing. Setup runs the same step.

pub mod build;
pub mod cmdline;
pub mod image;
pub mod initramfs;
pub mod installed;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::lockfile::{ArtifactLock, LockedArtifact};
use crate::profile::KernelSource;
use crate::Context;
use installed::Installed;

/// Lock-file keys.
pub const LOCK_KERNEL: &str = "guest_kernel";
pub const LOCK_INITRAMFS: &str = "guest_initramfs";
/// The static busybox the distro initramfs carries (Debian's `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";
/// Where the build source keeps built kernels unless `CHVKIT_KERNEL_CACHE` says otherwise
/// (a directory under the state dir, so `--root` redirects it).
pub const CACHE_ENV: &str = "CHVKIT_KERNEL_CACHE";

#[derive(Debug, clap::Args)]
pub struct KernelArgs {
    /// Where the kernel comes from, overriding the profile's `kernel.source`.
    #[arg(long, value_enum)]
    pub source: Option<SourceArg>,
    /// The kernel file for `--source path` (a PVH vmlinux or a bzImage), overriding `kernel.path`.
    #[arg(long, value_name = "FILE")]
    pub path: Option<PathBuf>,
    /// Parallel jobs for `--source build` (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Say what would be done, and do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SourceArg {
    Build,
    Distro,
    Path,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel.source is `none`: chvkit provides no guest kernel (name one with `chvkit launch --kernel FILE`, or set kernel.source)")]
    NoSource,
    #[error("kernel.source is `path` but no file is named: set kernel.path or pass --path FILE")]
    NoPath,
    #[error("no distribution kernel found: no /boot/vmlinuz-* with a matching /lib/modules/<version> (install one, e.g. `apt-get install linux-image-cloud-amd64`)")]
    NoDistroKernel,
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error(transparent)]
    Record(#[from] crate::fsutil::JsonFileError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another chvkit is installing the guest kernel into {} ({errno}); wait for it to finish", path.display())]
    Busy {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What providing the kernel did.
#[derive(Debug, Clone, Serialize)]
pub struct Provided {
    pub installed: Installed,
    /// The installed files changed.
    pub changed: bool,
    /// For `build`: the build ran (false: the cache had it).
    pub built: bool,
    /// What launch passes on this host (before the per-job env-disk argument).
    pub cmdline: String,
    pub seconds: f64,
}

/// Options of one provide run.
#[derive(Debug, Clone)]
pub struct Request {
    pub source: KernelSource,
    pub path: Option<PathBuf>,
    pub jobs: usize,
}

impl Request {
    pub fn from_profile(ctx: &Context) -> Request {
        Request {
            source: ctx.profile.kernel.source(),
            path: ctx.profile.kernel.path.as_ref().map(|p| p.0.clone()),
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// The build cache directory.
pub fn cache_dir(ctx: &Context) -> PathBuf {
    match std::env::var_os(CACHE_ENV).filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => ctx
            .root
            .path(installed::host_dir(&ctx.profile).join("build-cache")),
    }
}

/// The kernel source tarball: under `--root` when it is there (image builders), else the host's.
fn source_tarball(ctx: &Context) -> PathBuf {
    let rooted = ctx.root.path(build::SOURCE_TARBALL);
    if rooted.exists() {
        rooted
    } else {
        PathBuf::from(build::SOURCE_TARBALL)
    }
}

/// The command line launch passes for `rec` on this host, with the profile's base.
pub fn launch_cmdline(ctx: &Context, rec: &Installed, user: Option<&str>) -> String {
    cmdline::compose(&cmdline::Parts {
        base: &ctx.profile.vm.cmdline,
        kernel: &rec.cmdline,
        user,
        initramfs: rec.initramfs.is_some(),
        host: cmdline::HostKind::detect(),
    })
}

/// What the inputs of `req` are, before anything is built or written: the key that decides
/// whether the installed kernel is up to date, and a description.
pub fn describe_inputs(ctx: &Context, req: &Request) -> Result<(String, String), KernelError> {
    match req.source {
        KernelSource::None => Err(KernelError::NoSource),
        KernelSource::Path => {
            let p = req.path.as_ref().ok_or(KernelError::NoPath)?;
            let sha = crate::host::files::sha256_file(p).map_err(io("cannot read kernel", p))?;
            Ok((format!("path:{sha}"), format!("{}", p.display())))
        }
        KernelSource::Distro => {
            let k = newest_distro(ctx)?;
            let sha = crate::host::files::sha256_file(&k.vmlinuz)
                .map_err(io("cannot read kernel", &k.vmlinuz))?;
            Ok((
                format!("distro:{}:{sha}", k.version),
                format!("{} ({})", k.vmlinuz.display(), k.version),
            ))
        }
        KernelSource::Build => {
            let tarball = source_tarball(ctx);
            let key = build::cache_key(&tarball)?;
            Ok((
                format!("build:{key}"),
                format!(
                    "{} + chvkit recipe {}",
                    build::SOURCE_PACKAGE,
                    &key[..12.min(key.len())]
                ),
            ))
        }
    }
}

/// The newest distribution kernel: under `--root` when one is there (an image builder's
/// tree), else the host's (a test root holds no /boot).
fn newest_distro(ctx: &Context) -> Result<initramfs::DistroKernel, KernelError> {
    let rooted = ctx
        .root
        .prefix()
        .and_then(|r| initramfs::find_distro_kernels(r).into_iter().next());
    rooted
        .or_else(|| {
            initramfs::find_distro_kernels(Path::new("/"))
                .into_iter()
                .next()
        })
        .ok_or(KernelError::NoDistroKernel)
}

/// Whether the installed kernel is what `key` asks for, and its files are intact.
pub fn up_to_date(ctx: &Context, key: &str) -> Option<Installed> {
    let rec = installed::load(&ctx.profile, &ctx.root).ok()??;
    if rec.key != key {
        return None;
    }
    let intact = |p: &Path, sha: &str| {
        crate::host::files::sha256_file(&ctx.root.path(p)).is_ok_and(|s| s == sha)
    };
    let ok = intact(&rec.vmlinux, &rec.vmlinux_sha256)
        && match (&rec.initramfs, &rec.initramfs_sha256) {
            (Some(p), Some(s)) => intact(p, s),
            (None, None) => true,
            _ => false,
        };
    ok.then_some(rec)
}

/// Provide the kernel `req` asks for: nothing changes when it is installed already.
pub fn provide(ctx: &Context, req: &Request) -> Result<Provided, KernelError> {
    let t0 = Instant::now();
    let dir = ctx.root.path(installed::host_dir(&ctx.profile));
    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    let _lock = lock(&dir)?;
    let (key, origin) = describe_inputs(ctx, req)?;
    if let Some(rec) = up_to_date(ctx, &key) {
        return Ok(Provided {
            cmdline: launch_cmdline(ctx, &rec, None),
            installed: rec,
            changed: false,
            built: false,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    let host_dir = installed::host_dir(&ctx.profile);
    let vmlinux_host = host_dir.join(installed::VMLINUX);
    let initramfs_host = host_dir.join(installed::INITRAMFS);
    let mut built = false;
    let (vmlinux, initramfs_bytes) = match req.source {
        KernelSource::None => return Err(KernelError::NoSource),
        KernelSource::Path => {
            let p = req.path.as_ref().ok_or(KernelError::NoPath)?;
            (image::load_vmlinux(p)?, None)
        }
        KernelSource::Distro => {
            let k = newest_distro(ctx)?;
            let v = image::load_vmlinux(&k.vmlinuz)?;
            let epoch = source_date_epoch();
            let cpio = initramfs::build_initramfs(&k, Path::new(BUSYBOX), epoch)?;
            (v, Some(cpio))
        }
        KernelSource::Build => {
            // `build` checks the tools itself, and only when the cache does not have it.
            let b = build::build(&build::BuildOptions {
                tarball: source_tarball(ctx),
                cache_dir: cache_dir(ctx),
                jobs: req.jobs.max(1),
                keep_tree: false,
            })?;
            built = !b.cached;
            (image::load_vmlinux(&b.vmlinux)?, None)
        }
    };
    let vmlinux_sha = image::install_vmlinux(&vmlinux, &ctx.root.path(&vmlinux_host))?;
    let pvm_ready = installed::has_pvm_marker(&vmlinux.bytes);
    let linux_version = image::linux_version(&vmlinux.bytes).or(vmlinux.version.clone());
    let (initramfs, initramfs_sha256) = match &initramfs_bytes {
        Some(bytes) => {
            let dest = ctx.root.path(&initramfs_host);
            crate::fsutil::write_atomic(&dest, bytes, 0o644).map_err(io("cannot write", &dest))?;
            (
                Some(initramfs_host.clone()),
                Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))),
            )
        }
        None => {
            // A kernel of another source had one: it must not be booted with this kernel.
            let stale = ctx.root.path(&initramfs_host);
            match std::fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("cannot remove", &stale)(e)),
            }
            (None, None)
        }
    };
    let rec = Installed {
        schema: installed::SCHEMA,
        source: req.source.as_str().to_string(),
        origin,
        key,
        vmlinux: vmlinux_host,
        vmlinux_sha256: vmlinux_sha,
        initramfs,
        initramfs_sha256,
        cmdline: String::new(),
        linux_version,
        pvm_ready,
        installed_at: now_unix(),
    };
    record_lock(ctx, &rec)?;
    installed::save(&rec, &ctx.profile, &ctx.root)?;
    Ok(Provided {
        cmdline: launch_cmdline(ctx, &rec, None),
        installed: rec,
        changed: true,
        built,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The lock file lists the kernel (and initramfs) beside the VMM and firmware.
fn record_lock(ctx: &Context, rec: &Installed) -> Result<(), KernelError> {
    let path = ArtifactLock::path(&ctx.profile, &ctx.root);
    let mut lock = ArtifactLock::load(&path)?.unwrap_or_default();
    let entry = |p: &Path, sha: &str| LockedArtifact {
        url: format!("{}:{}", rec.source, rec.origin),
        path: p.to_path_buf(),
        sha256: sha.to_string(),
        installed_at: rec.installed_at,
    };
    lock.artifacts.insert(
        LOCK_KERNEL.to_string(),
        entry(&rec.vmlinux, &rec.vmlinux_sha256),
    );
    match (&rec.initramfs, &rec.initramfs_sha256) {
        (Some(p), Some(s)) => {
            lock.artifacts
                .insert(LOCK_INITRAMFS.to_string(), entry(p, s));
        }
        _ => {
            lock.artifacts.remove(LOCK_INITRAMFS);
        }
    }
    lock.save(&path)?;
    Ok(())
}

fn lock(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, KernelError> {
    use nix::fcntl::{Flock, FlockArg};
    let f = std::fs::File::open(dir).map_err(io("cannot open", dir))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, errno)| KernelError::Busy {
        path: dir.to_path_buf(),
        errno,
    })
}

fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Serialize)]
struct JsonOut<'a> {
    vmlinux: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: &'a str,
    sha256: &'a str,
    source: &'a str,
    origin: &'a str,
    linux_version: Option<&'a str>,
    pvm_ready: bool,
    changed: bool,
    built: bool,
    seconds: f64,
}

/// `chvkit kernel`.
pub fn run(ctx: &Context, a: KernelArgs) -> anyhow::Result<i32> {
    let mut req = Request::from_profile(ctx);
    if let Some(s) = a.source {
        req.source = match s {
            SourceArg::Build => KernelSource::Build,
            SourceArg::Distro => KernelSource::Distro,
            SourceArg::Path => KernelSource::Path,
        };
    }
    if let Some(p) = a.path {
        if a.source.is_none() {
            req.source = KernelSource::Path;
        }
        req.path = Some(std::path::absolute(&p)?);
    }
    if let Some(j) = a.jobs {
        req.jobs = j;
    }
    if a.dry_run {
        let (key, origin) = describe_inputs(ctx, &req)?;
        let state = match up_to_date(ctx, &key) {
            Some(rec) => format!(
                "installed and up to date: {}",
                ctx.root.path(&rec.vmlinux).display()
            ),
            None => format!(
                "would install the guest kernel from {origin} ({})",
                req.source.as_str()
            ),
        };
        println!("{state}");
        return Ok(crate::exit::OK);
    }
    let p = provide(ctx, &req)?;
    let rec = &p.installed;
    let vmlinux = ctx.root.path(&rec.vmlinux);
    let initramfs = rec.initramfs.as_ref().map(|i| ctx.root.path(i));
    if a.json {
        let out = JsonOut {
            vmlinux,
            initramfs,
            cmdline: &p.cmdline,
            sha256: &rec.vmlinux_sha256,
            source: &rec.source,
            origin: &rec.origin,
            linux_version: rec.linux_version.as_deref(),
            pvm_ready: rec.pvm_ready,
            changed: p.changed,
            built: p.built,
            seconds: p.seconds,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(crate::exit::OK);
    }
    let what = match (p.changed, p.built) {
        (false, _) => "unchanged".to_string(),
        (true, true) => format!("built in {:.0} s", p.seconds),
        (true, false) => "installed".to_string(),
    };
    println!("guest kernel: {} ({what})", vmlinux.display());
    println!("  source:    {} — {}", rec.source, rec.origin);
    if let Some(v) = &rec.linux_version {
        println!("  version:   {v}");
    }
    match &initramfs {
        Some(i) => println!("  initramfs: {}", i.display()),
        None => println!("  initramfs: none (the root disk's /init runs directly)"),
    }
    println!("  sha256:    {}", rec.vmlinux_sha256);
    println!("  cmdline:   {}", p.cmdline);
    if cmdline::HostKind::detect() == cmdline::HostKind::Pvm && !rec.pvm_ready {
        if rec.source == KernelSource::Distro.as_str() {
            println!(
                "  warning:   this host's /dev/kvm is PVM: the distribution's unmodified kernel \
                 cannot reach user space here (use kernel.source: build)"
            );
        } else {
            println!(
                "  warning:   this host's /dev/kvm is PVM, and this kernel lacks chvkit's PVM \
                 marker: it is not known to run here (kernel.source: build does)"
            );
        }
    }
    Ok(crate::exit::OK)
}
