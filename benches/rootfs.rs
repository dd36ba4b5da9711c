//! Rootfs figures, printed in one run (`cargo bench --bench rootfs`; root, e2fsprogs, buildah):
//!
//! 1. Packing a generated tree (~20k files, ~300 MB) into a fresh image file in the same
//!    directory: chvkit's fast path (`ext4::pack`: mkfs of the empty filesystem without
//!    metadata_csum, chvkit's own writer filling it (`rootfs::populate`: metadata in large
//!    writes, file data in contiguous extents) with overlapped writeback, tune2fs -O
//!    metadata_csum, e2fsck -fyD only when a directory spans several blocks, one fsync)
//!    against plain `mkfs.ext4 -d` with the host's default features (the named baseline), and
//!    against `mkfs.ext4 -d` creating the fast path's final feature set with metadata_csum on from
//!    the start. Both end durable (mkfs fsyncs its output; pack fsyncs once at the end).
//!    Fairness: the tree is read once before timing (it is in the page cache for every run, as
//!    right after `umoci unpack`); caches are not dropped (that is machine-wide); before each
//!    timed run the previous image is removed and the filesystem synced, so no run pays for
//!    another's writeback; the variants are interleaved. Medians of `CHVKIT_BENCH_RUNS` (5) runs,
//!    ratios, final feature lists, the fast path's per-step medians and the load average.
//! 2. Optionally (`CHVKIT_BENCH_LARGE=FILES:MB`, e.g. `100000:2000`) the same comparison on a
//!    larger tree, to show how the checksum penalty scales.
//! 3. A cache hit: `chvkit rootfs` on an unchanged context whose image holds that tree.
//!
//! `CHVKIT_BENCH_FILES` / `CHVKIT_BENCH_MB` change the tree size, `CHVKIT_BENCH_DIR` the place
//! (default /var/tmp: a disk, like a real OUT; not tmpfs), `CHVKIT_BENCH_PACK_ONLY=1` skips 3.

mod support;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use chvkit::rootfs::ext4;
use support::{loadavg, median};

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// `files` files, sizes spread around the mean, pseudo-random bytes: the first 1000 in one
/// directory (like /usr/bin: real rootfs trees always have directories that span several blocks,
/// which the fast path must index with e2fsck -D), the rest in 100-file directories; 50 symlinks.
fn make_tree(root: &Path, files: u64, total: u64) {
    let mean = total / files;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; (mean * 2 + 1) as usize];
    for b in buf.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *b = state as u8;
    }
    for i in 0..files {
        let d = if i < 1000 {
            root.join("bin")
        } else {
            root.join(format!("d{:03}", i / 100))
        };
        if i == 0 || (i >= 1000 && i % 100 == 0) {
            fs::create_dir_all(&d).unwrap();
        }
        let size = (mean / 2 + (i * 7919) % mean) as usize;
        let off = (i as usize * 31) % (buf.len() - size).max(1);
        let mut f = fs::File::create(d.join(format!("f{i}"))).unwrap();
        f.write_all(&buf[off..off + size]).unwrap();
    }
    for i in 0..50 {
        std::os::unix::fs::symlink(format!("bin/f{i}"), root.join(format!("l{i}"))).unwrap();
    }
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn mkfs_plain(tree: &Path, img: &Path, size: u64, inodes: u64, features: Option<&str>) {
    let mut c = Command::new("mkfs.ext4");
    c.args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0"])
        .args(["-N", &inodes.to_string()]);
    if let Some(f) = features {
        c.args(["-O", f]);
    }
    c.arg("-d")
        .arg(tree)
        .arg(img)
        .arg(format!("{}k", size / 1024));
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "mkfs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Remove `img` and flush the filesystem holding `dir`, so the next timed run starts with no
/// writeback pending from an earlier one.
fn settle(dir: &Path, img: &Path) {
    let _ = fs::remove_file(img);
    let d = fs::File::open(dir).unwrap();
    // SAFETY: syncfs on an fd we own.
    unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)) };
}

/// Read every file once so all variants find the tree in the page cache.
fn warm(dir: &Path) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            warm(&e.path());
        } else if ft.is_file() {
            let _ = fs::read(e.path());
        }
    }
}

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Fast path vs the host-default baseline (and the same-features baseline) on `tree`.
fn compare(label: &str, tree: &Path, dir: &Path, runs: usize) {
    warm(tree);
    let usage = ext4::tree_usage(tree).unwrap();
    let (size, inodes) = ext4::plan_size(usage, ext4::Headroom::Percent(20));
    println!(
        "{label}: tree of {} inodes, {} MiB; image {} MiB, -N {}; load average before: {}",
        usage.inodes,
        usage.bytes >> 20,
        size >> 20,
        inodes,
        loadavg()
    );
    let fast_img = dir.join("fast.raw");
    let host_img = dir.join("host.raw");
    let same_img = dir.join("same.raw");
    let same_features = format!("{},metadata_csum", ext4::PORTABLE_FEATURES);
    let (mut fast, mut host, mut same) = (vec![], vec![], vec![]);
    let mut reports = vec![];
    for _ in 0..runs {
        settle(dir, &fast_img);
        fast.push(time(|| {
            let o = ext4::PackOpts {
                size_bytes: size,
                inodes,
                epoch: None,
                seed: String::new(),
                label: None,
            };
            reports.push(ext4::pack_report(tree, &fast_img, &o).unwrap());
        }));
        settle(dir, &host_img);
        host.push(time(|| mkfs_plain(tree, &host_img, size, inodes, None)));
        settle(dir, &same_img);
        same.push(time(|| {
            mkfs_plain(tree, &same_img, size, inodes, Some(&same_features))
        }));
    }
    ext4::verify(&fast_img).unwrap();
    ext4::verify(&host_img).unwrap();
    ext4::verify(&same_img).unwrap();
    let ff = ext4::features(&fast_img).unwrap();
    let hf = ext4::features(&host_img).unwrap();
    let sf = ext4::features(&same_img).unwrap();
    assert_eq!(
        ff, sf,
        "fast path and same-feature baseline must end with equal features"
    );
    assert!(ff.contains(&"metadata_csum".to_string()) && hf.contains(&"metadata_csum".to_string()));
    let only_host: Vec<&String> = hf.iter().filter(|f| !ff.contains(f)).collect();
    let only_fast: Vec<&String> = ff.iter().filter(|f| !hf.contains(f)).collect();
    let (mf, mh, ms) = (
        median(&mut fast.clone()),
        median(&mut host.clone()),
        median(&mut same.clone()),
    );
    let step = |f: &dyn Fn(&ext4::PackReport) -> f64| {
        median(&mut reports.iter().map(f).collect::<Vec<_>>())
    };
    let fscks = reports.iter().filter(|r| r.e2fsck.is_some()).count();
    let r0 = &reports[0];
    println!("  pack, median of {runs} (runs: fast {fast:.2?} host {host:.2?} same {same:.2?}):");
    println!("  chvkit fast path:                                              {mf:.2}s");
    println!(
        "  mkfs.ext4 -d, host default features (baseline):                {mh:.2}s  ratio {:.2}x",
        mh / mf
    );
    println!(
        "  mkfs.ext4 -d, fast path's final features, csum at creation:    {ms:.2}s  ratio {:.2}x",
        ms / mf
    );
    println!(
        "  fast path steps (medians): mkfs (empty) {:.3}s, chvkit's writer {:.2}s, tune2fs {:.2}s, e2fsck -fyD {} ({} multi-block dirs), fsync {:.3}s",
        step(&|r| secs(r.mkfs)),
        step(&|r| secs(r.populate)),
        step(&|r| secs(r.tune2fs)),
        if fscks == 0 {
            "not needed".to_string()
        } else {
            format!(
                "{:.2}s in {fscks}/{runs} runs",
                step(&|r| r.e2fsck.map(secs).unwrap_or(0.0))
            )
        },
        r0.inodes.multiblock_dirs,
        step(&|r| secs(r.sync)),
    );
    println!("  final features, fast path:    {}", ff.join(" "));
    println!("  final features, host default: {}", hf.join(" "));
    println!("  final features, same-feature baseline equal to the fast path's: yes; e2fsck -fn clean: all three");
    println!(
        "  host defaults add {only_host:?}, lack {only_fast:?} (the fast path's set is the portable one + metadata_csum)"
    );
    println!("  load average after: {}", loadavg());
    for p in [&fast_img, &host_img, &same_img] {
        let _ = fs::remove_file(p);
    }
}

/// A kernel for `--bootable` figures: the newest installed distribution kernel (Debian's cloud
/// kernel here), found as `chvkit kernel --source distro` finds it, with its initramfs when
/// /boot has one.
fn boot_files() -> Option<(PathBuf, Option<PathBuf>)> {
    let k = chvkit::kernel::initramfs::find_distro_kernels(Path::new("/"))
        .into_iter()
        .next()?;
    let i = Path::new("/boot").join(format!("initrd.img-{}", k.version));
    Some((k.vmlinuz, i.is_file().then_some(i)))
}

/// `--bootable` against the plain image, on the same tree: the pack step alone (ext4::pack, then
/// bootable::assemble on the same file), interleaved, medians.
fn bootable_pack(tree: &Path, dir: &Path, runs: usize) {
    use chvkit::rootfs::bootable;
    let Some((kernel, initrd)) = boot_files() else {
        println!("bootable pack: skipped (no /boot/vmlinuz-*)");
        return;
    };
    let inputs = bootable::Inputs::load(&bootable::BootOpts {
        kernel: kernel.clone(),
        initramfs: initrd.clone(),
        cmdline: None,
        systemd_boot: None,
    })
    .unwrap();
    warm(tree);
    let usage = ext4::tree_usage(tree).unwrap();
    let (size, inodes) = ext4::plan_size(usage, ext4::Headroom::Percent(20));
    let img = dir.join("boot.raw");
    let opts = ext4::PackOpts {
        size_bytes: size,
        inodes,
        epoch: Some(1_700_000_000),
        seed: "bench".into(),
        label: None,
    };
    let (mut plain, mut boot, mut disk) = (vec![], vec![], vec![]);
    let mut placement = String::new();
    for _ in 0..runs {
        settle(dir, &img);
        plain.push(time(|| {
            let f = fs::File::create(&img).unwrap();
            f.set_len(size).unwrap();
            ext4::pack(tree, &img, &opts).unwrap();
        }));
        settle(dir, &img);
        let mut step = 0.0;
        boot.push(time(|| {
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&img)
                .unwrap();
            f.set_len(size).unwrap();
            ext4::pack(tree, &img, &opts).unwrap();
            step = time(|| {
                let ids = bootable::Ids::new("bench", Some(1_700_000_000));
                let r = bootable::assemble(&img, size, &inputs, &ids).unwrap();
                placement = r.placement;
                f.sync_all().unwrap();
            });
        }));
        disk.push(step);
    }
    let _ = fs::remove_file(&img);
    let (mp, mb, md) = (
        median(&mut plain.clone()),
        median(&mut boot.clone()),
        median(&mut disk.clone()),
    );
    println!(
        "bootable pack ({} + {}, median of {runs}): plain ext4 {mp:.2}s, --bootable {mb:.2}s \
         (GPT + ESP + moving the root {md:.3}s by {placement}); ratio {:.2}x, goal <= 1.1x: {}",
        kernel.display(),
        initrd
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "no initramfs".into()),
        mb / mp,
        if mb / mp <= 1.1 { "met" } else { "NOT met" }
    );
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: bench rootfs: needs root (owners in the tree, buildah storage)");
        return;
    }
    let files = env_num("CHVKIT_BENCH_FILES", 20_000);
    let mb = env_num("CHVKIT_BENCH_MB", 300);
    let runs = env_num("CHVKIT_BENCH_RUNS", 5).max(3) as usize;
    let work = tempfile::Builder::new()
        .prefix("chvkit-bench-rootfs-")
        .tempdir_in(std::env::var("CHVKIT_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .unwrap();
    let ctx = work.path().join("ctx");
    let tree = ctx.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let t = time(|| make_tree(&tree, files, mb << 20));
    println!("rootfs bench: generated {files} files / {mb} MB in {t:.1}s");
    compare("pack", &tree, work.path(), runs);
    bootable_pack(&tree, work.path(), runs);

    if let Some((lf, lmb)) = std::env::var("CHVKIT_BENCH_LARGE").ok().and_then(|v| {
        let (a, b) = v.split_once(':')?;
        Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
    }) {
        let big = work.path().join("large");
        fs::create_dir_all(&big).unwrap();
        make_tree(&big, lf, lmb << 20);
        compare("pack, larger tree", &big, work.path(), 3);
        fs::remove_dir_all(&big).unwrap();
    }

    // Cache hit on an unchanged build of an image holding the whole tree.
    if std::env::var_os("CHVKIT_BENCH_PACK_ONLY").is_some() {
        println!("cache hit: skipped (CHVKIT_BENCH_PACK_ONLY)");
        return;
    }
    if Command::new("buildah").arg("--version").output().is_err() {
        println!("cache hit: skipped (buildah not installed)");
        return;
    }
    fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY tree /data\nCMD [\"/bin/busybox\", \"true\"]\n",
    )
    .unwrap();
    let chvkit = PathBuf::from(env!("CARGO_BIN_EXE_chvkit"));
    let root = work.path().join("hostroot");
    let out = work.path().join("out.raw");
    let run = || {
        let o = Command::new(&chvkit)
            .arg("--root")
            .arg(&root)
            .args(["rootfs", "--pull", "never", "--json", "-o"])
            .arg(&out)
            .arg(&ctx)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        j
    };
    let cold = time(|| {
        run();
    });
    let mut hits = vec![];
    let mut state = String::new();
    for _ in 0..3 {
        let mut j = serde_json::Value::Null;
        hits.push(time(|| j = run()));
        state = j["cache"].as_str().unwrap_or("?").to_string();
    }
    let mh = median(&mut hits.clone());
    println!(
        "cache: first build {cold:.2}s; unchanged rebuild (cache {state}) median {mh:.2}s (runs {hits:.2?}); goal <= 1 s: {}",
        if mh <= 1.0 { "met" } else { "NOT met" }
    );

    // The whole `chvkit rootfs` run, plain vs --bootable: each run a rootfs-cache miss (a new
    // --headroom changes the key) on an unchanged context (its image digest is known, so
    // buildah does not rebuild: export, unpack, init, pack, verify, [disk], cache, rename), then
    // a --bootable cache hit.
    let Some((kernel, initrd)) = boot_files() else {
        println!("bootable build: skipped (no /boot/vmlinuz-*)");
        return;
    };
    let bout = work.path().join("boot.raw");
    let full = |bootable: bool, headroom: Option<String>| -> serde_json::Value {
        let mut c = Command::new(&chvkit);
        c.arg("--root")
            .arg(&root)
            .args(["rootfs", "--pull", "never", "--json"]);
        if let Some(h) = &headroom {
            c.arg("--headroom").arg(h);
        }
        c.arg("-o").arg(if bootable { &bout } else { &out });
        if bootable {
            c.arg("--bootable").arg("--kernel").arg(&kernel);
            if let Some(i) = &initrd {
                c.arg("--initramfs").arg(i);
            }
        }
        let o = c.arg(&ctx).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (mut plain, mut boot) = (vec![], vec![]);
    let stage_sum = |j: &serde_json::Value, names: &[&str]| -> f64 {
        j["stages"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|s| names.contains(&s["name"].as_str().unwrap_or("")))
                    .filter_map(|s| s["seconds"].as_f64())
                    .sum()
            })
            .unwrap_or(0.0)
    };
    let mut disk_stage = vec![];
    // Alternating which goes first: buildah's own time drifts upward run after run here, and
    // a fixed order would charge the drift to one side.
    for n in 0..4 {
        let h = format!("{}%", 30 + n);
        for bootable in if n % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            settle(work.path(), if bootable { &bout } else { &out });
            let j = full(bootable, Some(h.clone()));
            assert_eq!(j["cache"], "miss");
            let t = j["total_seconds"].as_f64().unwrap_or(0.0);
            if bootable {
                boot.push(t);
                disk_stage.push(stage_sum(&j, &["disk", "place"]));
            } else {
                plain.push(t);
            }
        }
    }
    let (mp, mb) = (median(&mut plain.clone()), median(&mut boot.clone()));
    println!(
        "bootable build (whole `chvkit rootfs`, cache miss, median of 4, order alternating; plain {plain:.2?}, \
         --bootable {boot:.2?}): plain {mp:.2}s, --bootable {mb:.2}s (its disk + place stages {:.3}s); \
         ratio {:.2}x, goal <= 1.1x: {}",
        median(&mut disk_stage),
        mb / mp,
        if mb / mp <= 1.1 { "met" } else { "NOT met" }
    );
    let mut bhits = vec![];
    let mut bstate = String::new();
    for _ in 0..3 {
        let mut j = serde_json::Value::Null;
        bhits.push(time(|| j = full(true, Some("33%".into()))));
        bstate = j["cache"].as_str().unwrap_or("?").to_string();
    }
    let mbh = median(&mut bhits.clone());
    println!(
        "bootable cache (cache {bstate}): median {mbh:.2}s (runs {bhits:.2?}); goal <= 1 s: {}",
        if mbh <= 1.0 { "met" } else { "NOT met" }
    );
}
