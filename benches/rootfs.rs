//! Rootfs figures, printed in one run (`cargo bench --bench rootfs`; root, e2fsprogs, buildah):
//!
//! 1. Packing a generated tree (~20k files, ~300 MB): chvkit's fast path (create without
//!    metadata_csum, then tune2fs + e2fsck -fyD) against plain `mkfs.ext4 -d` with the host's
//!    default features (the named baseline), and against `mkfs.ext4 -d` creating the very same
//!    final feature set with metadata_csum on from the start. Medians of 3 runs, and ratios.
//! 2. A cache hit: `chvkit rootfs` on an unchanged context whose image holds that tree.
//!
//! `CHVKIT_BENCH_FILES` / `CHVKIT_BENCH_MB` change the tree size.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use chvkit::rootfs::ext4;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// `files` files over 100-file directories, sizes spread around the mean, pseudo-random bytes.
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
        let d = root.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            fs::create_dir_all(&d).unwrap();
        }
        let size = (mean / 2 + (i * 7919) % mean) as usize;
        let off = (i as usize * 31) % (buf.len() - size).max(1);
        let mut f = fs::File::create(d.join(format!("f{i}"))).unwrap();
        f.write_all(&buf[off..off + size]).unwrap();
    }
    for i in 0..50 {
        std::os::unix::fs::symlink(format!("d000/f{i}"), root.join(format!("l{i}"))).unwrap();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn mkfs_plain(tree: &Path, img: &Path, size: u64, inodes: u64, features: Option<&str>) {
    let _ = fs::remove_file(img);
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

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: bench rootfs: needs root (owners in the tree, buildah storage)");
        return;
    }
    let files = env_num("CHVKIT_BENCH_FILES", 20_000);
    let mb = env_num("CHVKIT_BENCH_MB", 300);
    let work = tempfile::Builder::new()
        .prefix("chvkit-bench-rootfs-")
        .tempdir_in(std::env::var("CHVKIT_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .unwrap();
    let ctx = work.path().join("ctx");
    let tree = ctx.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let t = time(|| make_tree(&tree, files, mb << 20));
    let usage = ext4::tree_usage(&tree).unwrap();
    let (size, inodes) = ext4::plan_size(usage, ext4::Headroom::Percent(20));
    println!(
        "rootfs bench: tree of {} inodes, {} MiB (generated in {t:.1}s); image {} MiB, {} inodes",
        usage.inodes,
        usage.bytes >> 20,
        size >> 20,
        inodes
    );

    let fast_img = work.path().join("fast.raw");
    let host_img = work.path().join("host.raw");
    let same_img = work.path().join("same.raw");
    let same_features = format!("{},metadata_csum", ext4::PORTABLE_FEATURES);
    let (mut fast, mut host, mut same) = (vec![], vec![], vec![]);
    for _ in 0..3 {
        let _ = fs::remove_file(&fast_img);
        fast.push(time(|| {
            let o = ext4::PackOpts {
                size_bytes: size,
                inodes,
                epoch: None,
                seed: String::new(),
                label: None,
            };
            ext4::pack(&tree, &fast_img, &o).unwrap();
        }));
        host.push(time(|| mkfs_plain(&tree, &host_img, size, inodes, None)));
        same.push(time(|| {
            mkfs_plain(&tree, &same_img, size, inodes, Some(&same_features))
        }));
    }
    ext4::verify(&fast_img).unwrap();
    ext4::verify(&host_img).unwrap();
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
        median(fast.clone()),
        median(host.clone()),
        median(same.clone()),
    );
    println!("pack, median of 3 (runs: fast {fast:.2?} host {host:.2?} same {same:.2?}):");
    println!("  chvkit fast path (mkfs -d without csum + tune2fs -O metadata_csum + e2fsck -fyD): {mf:.2}s");
    println!("  mkfs.ext4 -d, host default features:                                        {mh:.2}s  ratio {:.2}x", mh / mf);
    println!("  mkfs.ext4 -d, same final features, metadata_csum at creation:               {ms:.2}s  ratio {:.2}x", ms / mf);
    println!("  final features equal (fast vs same-feature baseline): {ff:?}");
    println!(
        "  host defaults add {only_host:?}, lack {only_fast:?} (not portable to older e2fsprogs)"
    );
    for p in [&fast_img, &host_img, &same_img] {
        let _ = fs::remove_file(p);
    }

    // Cache hit on an unchanged build of an image holding the whole tree.
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
    let mh = median(hits.clone());
    println!(
        "cache: first build {cold:.2}s; unchanged rebuild (cache {state}) median {mh:.2}s (runs {hits:.2?}); goal <= 1 s: {}",
        if mh <= 1.0 { "met" } else { "NOT met" }
    );
}
