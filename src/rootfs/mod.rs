//! `chvkit rootfs`: a Dockerfile or an OCI image → a bootable raw ext4 image with a generated
//! `/init`.
//!
//! Stages: build (buildah) or import, export to an OCI layout, `umoci unpack`, prepare the tree
//! (/init, busybox, placeholders), pack (empty `mkfs.ext4`, chvkit's writer, then
//! metadata_csum), verify, and an atomic rename onto OUT. The output's temp file is created next
//! to OUT first, so a read-only or full destination fails before any work, and OUT is never
//! half-written. Scratch space lives in a temp dir removed on success, failure and Ctrl-C.

pub mod bootable;
pub mod cache;
pub mod envdisk;
pub mod envslot;
pub mod ext4;
pub mod ext4read;
pub mod init;
pub mod oci;
pub mod populate;
pub mod proc;
pub mod tree;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::Context;

/// Host busybox-static injected into every image.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

#[derive(Debug, clap::Args)]
pub struct RootfsArgs {
    /// Build context directory, or a Dockerfile (its directory is the context).
    #[arg(
        value_name = "CONTEXT_OR_DOCKERFILE",
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    pub input: Option<PathBuf>,

    /// Where to write the raw ext4 image.
    #[arg(short, long, value_name = "OUT.raw")]
    pub output: PathBuf,

    /// Start from an existing image instead of building: a local image (buildah/podman storage),
    /// an OCI layout `oci:DIR:TAG`, or an image archive file (oci-archive or docker-archive).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,

    /// Dockerfile inside the context (default: CONTEXT/Dockerfile or Containerfile).
    #[arg(short = 'f', long, value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Build argument for the Dockerfile (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub build_arg: Vec<String>,

    /// When to pull base images; `never` for offline builds.
    #[arg(long, value_enum, default_value = "missing")]
    pub pull: oci::PullPolicy,

    /// buildah storage driver.
    #[arg(long, value_enum, default_value = "auto")]
    pub storage_driver: oci::StorageDriver,

    /// Image size (e.g. 512M, 2G); default: the tree's apparent size plus headroom.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Free space to leave: a percentage of the tree (`25%`) or a size (`256M`).
    /// Default: 20% and at least 64M.
    #[arg(long, value_name = "PCT|SIZE", value_parser = parse_headroom)]
    pub headroom: Option<ext4::Headroom>,

    /// Reproducible output: fixed UUID, hash seed and timestamps.
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "SECONDS")]
    pub source_date_epoch: Option<i64>,

    /// Rebuild everything: no buildah layer cache, no rootfs cache lookup.
    #[arg(long)]
    pub no_cache: bool,

    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,

    // `--bootable` and its options, boxed: inline they would make the command enum's largest
    // variant (this one) too large for clippy's `large_enum_variant`.
    #[command(flatten)]
    pub boot: Box<BootArgs>,
}

/// `--bootable`: a GPT disk with the kernel on an EFI System Partition.
#[derive(Debug, Default, clap::Args)]
pub struct BootArgs {
    /// Write a GPT disk that firmware boots (rust-hypervisor-firmware, UEFI): an EFI System
    /// Partition with the kernel and a Boot Loader Specification entry, and this root
    /// filesystem as the second partition. See docs/rootfs.md, "Boot modes".
    #[arg(long, requires = "kernel")]
    pub bootable: bool,

    /// With --bootable: the kernel to put on the ESP (a bzImage, e.g. /boot/vmlinuz-*).
    #[arg(long, value_name = "FILE", requires = "bootable")]
    pub kernel: Option<PathBuf>,

    /// With --bootable: the initramfs to put on the ESP (for kernels with virtio as modules).
    #[arg(long, value_name = "FILE", requires = "bootable")]
    pub initramfs: Option<PathBuf>,

    /// With --bootable: appended to the entry's options (after
    /// `root=PARTUUID=… rw console=ttyS0 init=/init`).
    #[arg(
        long,
        value_name = "ARGS",
        requires = "bootable",
        allow_hyphen_values = true
    )]
    pub cmdline: Option<String>,

    /// With --bootable: the EFI program to install as \EFI\BOOT\BOOTX64.EFI (default:
    /// systemd-boot from Debian's systemd-boot-efi, when installed).
    #[arg(
        long,
        value_name = "FILE",
        requires = "bootable",
        conflicts_with = "no_systemd_boot"
    )]
    pub systemd_boot: Option<PathBuf>,

    /// With --bootable: no \EFI\BOOT\BOOTX64.EFI (rust-hypervisor-firmware needs none;
    /// UEFI firmware does).
    #[arg(long, requires = "bootable")]
    pub no_systemd_boot: bool,
}

impl RootfsArgs {
    /// The `--bootable` options, if given.
    pub fn boot_opts(&self) -> Option<bootable::BootOpts> {
        let b = &self.boot;
        let kernel = b.kernel.clone().filter(|_| b.bootable)?;
        Some(bootable::BootOpts {
            kernel,
            initramfs: b.initramfs.clone(),
            cmdline: b.cmdline.clone(),
            systemd_boot: if b.no_systemd_boot {
                Some(None)
            } else {
                b.systemd_boot.clone().map(Some)
            },
        })
    }
}

/// `512M`, `2G`, `1048576` (bytes), `64K`; binary units.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("`{s}`: unknown unit (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512M or 2G"))?;
    n.checked_mul(mul)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("`{s}`: size out of range"))
}

pub fn parse_headroom(s: &str) -> Result<ext4::Headroom, String> {
    if let Some(p) = s.trim().strip_suffix('%') {
        let v: u32 = p
            .parse()
            .map_err(|_| format!("`{s}` is not a percentage like 25%"))?;
        if v > 1000 {
            return Err(format!("`{s}`: more than 1000% headroom"));
        }
        return Ok(ext4::Headroom::Percent(v));
    }
    if s.trim() == "0" {
        return Ok(ext4::Headroom::Bytes(0));
    }
    parse_size(s).map(ext4::Headroom::Bytes)
}

#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    pub name: &'static str,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub output: PathBuf,
    pub image_digest: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub cache: &'static str,
    pub init_shell: String,
    pub reproducible: bool,
    pub stages: Vec<StageTime>,
    pub total_seconds: f64,
    /// `--bootable`: the disk's partitions and boot entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootable: Option<bootable::Report>,
}

/// Per-stage progress: a spinner while it runs, one line with its duration when done.
struct Stages {
    times: Vec<StageTime>,
    quiet_bars: bool,
}

impl Stages {
    fn run<T>(
        &mut self,
        name: &'static str,
        label: &str,
        f: impl FnOnce(&indicatif::ProgressBar) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        proc::check().context("stopped")?;
        let pb = if self.quiet_bars {
            indicatif::ProgressBar::hidden()
        } else {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {prefix:.bold} {wide_msg} {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        };
        pb.set_prefix(name);
        pb.set_message(label.to_string());
        let t = Instant::now();
        let r = f(&pb);
        let secs = t.elapsed().as_secs_f64();
        pb.finish_and_clear();
        match &r {
            Ok(_) => {
                eprintln!("  {name:<8} {secs:>7.2}s  {label}");
                self.times.push(StageTime {
                    name,
                    seconds: secs,
                });
            }
            Err(_) => eprintln!("  {name:<8} failed after {secs:.2}s"),
        }
        r
    }
}

enum Source {
    Dockerfile {
        context: PathBuf,
        dockerfile: Option<PathBuf>,
    },
    Local(String),
    Layout {
        dir: PathBuf,
        tag: String,
    },
    Archive(PathBuf),
}

fn classify(a: &RootfsArgs) -> anyhow::Result<Source> {
    if let Some(r) = &a.image {
        if let Some(rest) = r.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') => (d, t),
                _ => (rest, "latest"),
            };
            let dir = PathBuf::from(dir);
            if !dir.join("index.json").is_file() {
                bail!(
                    "--image {r}: {} is not an OCI layout (no index.json)",
                    dir.display()
                );
            }
            return Ok(Source::Layout {
                dir,
                tag: tag.to_string(),
            });
        }
        for prefix in ["oci-archive:", "docker-archive:"] {
            if let Some(p) = r.strip_prefix(prefix) {
                return Ok(Source::Archive(PathBuf::from(p)));
            }
        }
        let p = Path::new(r);
        if p.is_file() {
            return Ok(Source::Archive(p.to_path_buf()));
        }
        return Ok(Source::Local(r.clone()));
    }
    let Some(input) = &a.input else {
        bail!("give a build context or Dockerfile, or --image REF");
    };
    let md =
        std::fs::metadata(input).with_context(|| format!("build context {}", input.display()))?;
    if md.is_dir() {
        Ok(Source::Dockerfile {
            context: input.clone(),
            dockerfile: a.file.clone(),
        })
    } else {
        let ctx = input
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Ok(Source::Dockerfile {
            context: ctx,
            dockerfile: Some(input.clone()),
        })
    }
}

fn file_sha256(p: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(p).with_context(|| format!("read {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        proc::check()?;
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

const TAG: &str = "chvkit";

/// A cheap fingerprint of a Dockerfile build's inputs, to recognise an unchanged build without
/// running buildah (whose layer cache re-hashes the whole context: ~30 s for 300 MB on vfs).
/// Covers the Dockerfile, build args, pull policy, storage driver, the local image ID of every
/// `FROM` image, and every context entry's path, type, mode, owner, size, mtime and link
/// target. `None` (no shortcut) when a `FROM` uses a variable or an image not in local storage.
fn context_fingerprint(
    context: &Path,
    dockerfile: Option<&Path>,
    a: &RootfsArgs,
    driver: &str,
) -> Option<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let df = match dockerfile {
        Some(f) if f.is_absolute() || f.exists() => f.to_path_buf(),
        Some(f) => context.join(f),
        None => ["Dockerfile", "Containerfile"]
            .iter()
            .map(|n| context.join(n))
            .find(|p| p.is_file())?,
    };
    let text = std::fs::read_to_string(&df).ok()?;
    let mut h = Sha256::new();
    h.update(format!("{:?}\0{:?}\0{driver}\0", a.build_arg, a.pull).as_bytes());
    h.update(text.as_bytes());
    let mut stages: Vec<String> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            continue;
        }
        let rest: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
        let image = *rest.first()?;
        if let (Some(kw), Some(name)) = (rest.get(1), rest.get(2)) {
            if kw.eq_ignore_ascii_case("AS") {
                stages.push(name.to_lowercase());
            }
        }
        if image.contains('$') {
            return None;
        }
        if image == "scratch"
            || stages[..stages.len().saturating_sub(1)].contains(&image.to_lowercase())
        {
            continue;
        }
        let id = oci::local_image_id(image, driver).ok()??;
        h.update(format!("FROM {image} {id}\0").as_bytes());
    }
    let mut stack = vec![context.to_path_buf()];
    let mut entries = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()? {
            let p = e.ok()?.path();
            let m = std::fs::symlink_metadata(&p).ok()?;
            let rel = p.strip_prefix(context).ok()?.to_string_lossy().into_owned();
            let link = if m.file_type().is_symlink() {
                std::fs::read_link(&p).ok()?.to_string_lossy().into_owned()
            } else {
                String::new()
            };
            entries.push(format!(
                "{rel}\0{:o}\0{}\0{}\0{}\0{}.{}\0{link}\n",
                m.mode(),
                m.uid(),
                m.gid(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    entries.sort();
    for e in entries {
        h.update(e.as_bytes());
    }
    Some(hex::encode(h.finalize()))
}

/// A cache hit: OUT already holds this image untouched (nothing to do), or gets a copy.
#[allow(clippy::too_many_arguments)]
fn serve_hit(
    a: &RootfsArgs,
    cache: &cache::Cache,
    key: &str,
    raw: &Path,
    entry: cache::Entry,
    digest: String,
    mut out: crate::fsutil::AtomicFile,
    mut st: Stages,
    started: Instant,
) -> anyhow::Result<Summary> {
    if entry.wrote_unchanged(&a.output) {
        st.run(
            "cache",
            "unchanged image, output already up to date",
            |_| Ok(()),
        )?;
        // The temp file beside OUT is removed on drop.
        drop(out);
    } else {
        st.run(
            "cache",
            "unchanged image: copying the cached rootfs",
            |_| {
                cache::copy_sparse(raw, out.file()).context("copy the cached image")?;
                Ok(())
            },
        )?;
        out.commit()
            .with_context(|| format!("cannot write the output {}", a.output.display()))?;
    }
    cache.record_output(key, &a.output);
    Ok(Summary {
        output: a.output.clone(),
        image_digest: digest,
        size_bytes: entry.size_bytes,
        allocated_bytes: allocated(&a.output),
        cache: "hit",
        init_shell: entry.init_shell,
        reproducible: a.source_date_epoch.is_some(),
        stages: st.times,
        total_seconds: started.elapsed().as_secs_f64(),
        bootable: entry.bootable.map(|mut b| {
            b.placement = "cache".into();
            b
        }),
    })
}

/// Everything `run` does, returning the summary.
pub fn build(ctx: &Context, a: &RootfsArgs) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let source = classify(a)?;
    // --bootable's files are read and checked before any work: a bad kernel, a missing
    // initramfs or an oversized command line fails here, with no output written.
    let boot = match a.boot_opts() {
        Some(o) => Some(bootable::Inputs::load(&o)?),
        None => None,
    };
    // Fail on a read-only or missing destination before any work; this temp file becomes OUT.
    let mut out = crate::fsutil::AtomicFile::create(&a.output, 0o644)
        .with_context(|| format!("cannot write the output {}", a.output.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("chvkit-rootfs-")
        .tempdir()
        .context("cannot create scratch space in the temp dir ($TMPDIR)")?;
    let driver = a.storage_driver.resolve();
    let busybox = Path::new(HOST_BUSYBOX);
    let mut st = Stages {
        times: Vec::new(),
        quiet_bars: a.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let layout = scratch.path().join("oci");

    let headroom = a.headroom;
    let busybox_id = file_sha256(busybox).unwrap_or_else(|_| "missing".into());
    let key_for = |digest: &str| {
        cache::key(&serde_json::json!({
            "generator": init::GENERATOR_VERSION,
            "digest": digest,
            "busybox": busybox_id,
            "features": ext4::PORTABLE_FEATURES,
            "size": a.size,
            "headroom": format!("{headroom:?}"),
            "epoch": a.source_date_epoch,
            "chvkit": env!("CARGO_PKG_VERSION"),
            "bootable": boot.as_ref().map(bootable::Inputs::key_json),
        }))
    };
    let cache = cache::Cache::new(
        ctx.root
            .path(&ctx.profile.paths.state_dir.0)
            .join("rootfs-cache"),
    );

    // 0. An unchanged build context whose image is cached: no buildah run at all.
    let fingerprint = match &source {
        Source::Dockerfile {
            context,
            dockerfile,
        } if !a.no_cache && matches!(a.pull, oci::PullPolicy::Missing | oci::PullPolicy::Never) => {
            context_fingerprint(context, dockerfile.as_deref(), a, driver)
        }
        _ => None,
    };
    if let Some(fp) = &fingerprint {
        if let Some(digest) = cache.context_digest(fp) {
            let key = key_for(&digest);
            if let Some((raw, entry)) = cache.lookup(&key) {
                return serve_hit(a, &cache, &key, &raw, entry, digest, out, st, started);
            }
        }
    }

    // 1. Build or identify the image; its digest is the cache key's core.
    let (digest, layout_dir, tag) = match &source {
        Source::Dockerfile {
            context,
            dockerfile,
        } => {
            let iid = scratch.path().join("iid");
            let id = st.run(
                "build",
                &format!("buildah bud {}", context.display()),
                |pb| {
                    let o = oci::BuildOpts {
                        context,
                        dockerfile: dockerfile.as_deref(),
                        build_args: &a.build_arg,
                        pull: a.pull,
                        driver,
                        no_cache: a.no_cache,
                        epoch: a.source_date_epoch,
                        iidfile: &iid,
                    };
                    Ok(oci::build(&o, |l| {
                        if l.starts_with("STEP") || l.starts_with("-->") {
                            pb.set_message(l.to_string());
                        }
                    })?)
                },
            )?;
            (id, None, TAG.to_string())
        }
        Source::Local(r) => {
            let id = st.run("inspect", r, |_| {
                oci::local_image_id(r, driver)?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "--image {r}: no such image in local storage (storage driver {driver}); \
                         `buildah images` lists them"
                    )
                })
            })?;
            (id, None, TAG.to_string())
        }
        Source::Layout { dir, tag } => {
            let d = st.run("inspect", &dir.display().to_string(), |_| {
                Ok(oci::layout_digest(dir, tag)?)
            })?;
            (d, Some(dir.clone()), tag.clone())
        }
        Source::Archive(p) => {
            let d = st.run("inspect", &p.display().to_string(), |_| file_sha256(p))?;
            (d, None, TAG.to_string())
        }
    };

    if let Some(fp) = &fingerprint {
        cache.set_context_digest(fp, &digest);
    }
    let key = key_for(&digest);
    if !a.no_cache {
        if let Some((raw, entry)) = cache.lookup(&key) {
            return serve_hit(a, &cache, &key, &raw, entry, digest, out, st, started);
        }
    }

    // 2. Export to an OCI layout.
    let layout_dir = match (&source, layout_dir) {
        (_, Some(d)) => d,
        (Source::Archive(p), None) => {
            st.run("export", "skopeo copy to an OCI layout", |_| {
                Ok(oci::import_archive(p, &layout, TAG)?)
            })?;
            layout.clone()
        }
        (_, None) => {
            st.run("export", "buildah push to an OCI layout", |_| {
                Ok(oci::push(&digest, driver, &layout, TAG)?)
            })?;
            layout.clone()
        }
    };

    // 3. Unpack.
    let bundle = scratch.path().join("bundle");
    st.run("unpack", "umoci unpack", |_| {
        Ok(oci::unpack(&layout_dir, &tag, &bundle)?)
    })?;
    let root = bundle.join("rootfs");

    // 4. /init and friends.
    let prepared = st.run("init", "generate /init, inject busybox", |_| {
        let w = oci::read_runtime_config(&bundle)?;
        let p = tree::prepare(&root, w, busybox)?;
        if let Some(t) = a.source_date_epoch {
            tree::stamp(&root, t);
        }
        Ok(p)
    })?;
    let init_shell = match prepared.shell {
        init::InitShell::Image => "/bin/sh".to_string(),
        init::InitShell::Busybox => format!("{} sh", init::BUSYBOX_PATH),
    };

    // 5. Pack.
    let usage = ext4::tree_usage(&root)?;
    let (planned, inodes) = ext4::plan_size(usage, headroom.unwrap_or(ext4::Headroom::Percent(20)));
    let planned = if headroom.is_none() {
        // Default headroom is 20% but at least 64 MiB.
        planned.max(ext4::plan_size(usage, ext4::Headroom::Bytes(64 << 20)).0)
    } else {
        planned
    };
    let size = a.size.unwrap_or(planned);
    if a.size.is_some() && size < usage.bytes {
        bail!(
            "--size {} is smaller than the tree ({} bytes of files): give at least {}M",
            size,
            usage.bytes,
            planned.div_ceil(1 << 20)
        );
    }
    let tmp_img = out.tmp_path().to_path_buf();
    st.run(
        "pack",
        &format!("ext4, {} MiB, {} inodes", size >> 20, inodes),
        |_| {
            out.file()
                .set_len(size)
                .with_context(|| format!("size {}", tmp_img.display()))?;
            let o = ext4::PackOpts {
                size_bytes: size,
                inodes,
                epoch: a.source_date_epoch,
                seed: key.clone(),
                label: None,
            };
            ext4::pack(&root, &tmp_img, &o).map_err(|e| match e {
                ext4::Ext4Error::NoSpace(m) => anyhow::anyhow!(
                    "no space left for the image next to {}: {m}",
                    a.output.display()
                ),
                e => e.into(),
            })
        },
    )?;
    st.run("verify", "e2fsck -fn", |_| Ok(ext4::verify(&tmp_img)?))?;
    drop(scratch);

    // 5b. --bootable: the ESP and the GPTs, to be put around the ext4 image.
    let prepared = match &boot {
        None => None,
        Some(inputs) => {
            let ids = bootable::Ids::new(&key, a.source_date_epoch);
            Some(st.run("disk", "GPT and EFI System Partition", |_| {
                Ok(bootable::prepare(size, inputs, &ids)?)
            })?)
        }
    };
    let size = prepared.as_ref().map_or(size, |p| p.layout.total);

    // 6. Cache, then rename into place.
    let entry = cache::Entry {
        key: key.clone(),
        image_digest: digest.clone(),
        size_bytes: size,
        init_shell: init_shell.clone(),
        outputs: vec![],
        bootable: None,
    };
    let boot_report = match &prepared {
        None => {
            st.run("cache", "store a copy in the rootfs cache", |_| {
                if let Err(e) = cache.store(&tmp_img, &entry) {
                    // A cache that cannot be written costs speed, not correctness.
                    tracing::warn!("rootfs cache not updated: {e}");
                }
                Ok(())
            })?;
            None
        }
        Some(p) => {
            // The cache's copy is made from the ext4 image while its pages are still cached
            // (moving it into its partition drops them), then turned into the disk the same
            // way as OUT: both end with the same bytes.
            let mut entry = entry.clone();
            entry.bootable = Some(p.report());
            st.run("cache", "store a copy in the rootfs cache", |_| {
                let r = cache.store_with(&entry, |f, path| {
                    cache::copy_sparse(&tmp_img, f)?;
                    p.apply(path).map(drop).map_err(std::io::Error::other)
                });
                if let Err(e) = r {
                    tracing::warn!("rootfs cache not updated: {e}");
                }
                Ok(())
            })?;
            Some(
                st.run("place", "move the root filesystem into partition 2", |_| {
                    Ok(p.apply(&tmp_img)?)
                })?,
            )
        }
    };
    proc::check().context("stopped")?;
    out.commit()
        .with_context(|| format!("cannot write the output {}", a.output.display()))?;
    cache.record_output(&key, &a.output);
    Ok(Summary {
        output: a.output.clone(),
        image_digest: digest,
        size_bytes: size,
        allocated_bytes: allocated(&a.output),
        cache: if a.no_cache { "disabled" } else { "miss" },
        init_shell,
        reproducible: a.source_date_epoch.is_some(),
        stages: st.times,
        total_seconds: started.elapsed().as_secs_f64(),
        bootable: boot_report,
    })
}

pub fn run(ctx: &Context, a: RootfsArgs) -> anyhow::Result<i32> {
    proc::install_handlers();
    match build(ctx, &a) {
        Ok(s) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                eprintln!(
                    "wrote {} ({} MiB, {} MiB allocated, cache {}) in {:.2}s",
                    s.output.display(),
                    s.size_bytes >> 20,
                    s.allocated_bytes >> 20,
                    s.cache,
                    s.total_seconds
                );
            }
            Ok(crate::exit::OK)
        }
        Err(e) => {
            if let Some(sig) = proc::interrupted() {
                eprintln!("chvkit: rootfs interrupted; scratch space and partial output removed");
                return Ok(128 + sig);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_headroom() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").unwrap_err().contains("12Q"));
        assert!(parse_size("x").is_err());
        assert_eq!(parse_headroom("25%"), Ok(ext4::Headroom::Percent(25)));
        assert_eq!(parse_headroom("64M"), Ok(ext4::Headroom::Bytes(64 << 20)));
        assert!(parse_headroom("abc%").is_err());
    }
}
