//! `chvkit rootfs` end to end with the real tools (buildah, umoci, mkfs.ext4, e2fsck, debugfs):
//! what lands in the image, reproducibility, the cache, `--image` inputs, and clear errors.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOOLS: &[&str] = &[
    "buildah",
    "umoci",
    "mkfs.ext4",
    "e2fsck",
    "debugfs",
    "busybox",
];

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A context with busybox and `dockerfile`.
    fn context(&self, name: &str, dockerfile: &str) -> PathBuf {
        let ctx = self.p(name);
        fs::create_dir_all(&ctx).unwrap();
        fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
        fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        ctx
    }
    fn chvkit(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        common::chvkit_rootfs(&self.p("hostroot"), args, envs)
    }
}

fn debugfs(img: &Path, cmd: &str) -> String {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(img)
        .output()
        .unwrap();
    // stderr carries the version banner and "File not found" errors.
    let err: String = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs "))
        .map(|l| format!("{l}\n"))
        .collect();
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

/// (mode octal, uid, gid, links) of a path from `debugfs stat`.
fn stat(img: &Path, path: &str) -> (String, u32, u32, u32) {
    let s = debugfs(img, &format!("stat {path}"));
    let field = |key: &str| -> String {
        s.split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {key} in stat {path}:\n{s}"))
            .to_string()
    };
    (
        field("Mode:"),
        field("User:").parse().unwrap(),
        field("Group:").parse().unwrap(),
        field("Links:").parse().unwrap(),
    )
}

fn sha256(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn e2fsck_clean(img: &Path) {
    let o = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(o.status.success(), "e2fsck -fn: {}", common::text(&o));
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", common::text(o)))
}

const TREE_DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN mkdir -p /data /usr/bin && echo hello > /data/file && chown 1234:5678 /data/file && \
    cp /bin/busybox /usr/bin/suid && chmod 4755 /usr/bin/suid && \
    ln /data/file /data/hard && ln -s ../data/file /usr/bin/sym
USER 1234:5678
CMD ["/bin/sh", "-c", "exit 0"]
"#;

#[test]
fn rootfs_build_tree_contents_and_features() {
    let t = "rootfs_build_tree_contents_and_features";
    if !common::require(t, true, TOOLS) {
        return;
    }
    let e = Env::new();
    let ctx = e.context("ctx", TREE_DOCKERFILE);
    let out = e.p("out.raw");
    let o = e.chvkit(
        &[
            "--pull",
            "never",
            "--json",
            "-o",
            out.to_str().unwrap(),
            ctx.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", common::text(&o));
    let j = json(&o);
    assert!(j["image_digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(j["cache"], "miss");
    assert_eq!(j["init_shell"], "/bin/sh");
    let names: Vec<&str> = j["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for want in ["build", "export", "unpack", "init", "pack", "verify"] {
        assert!(names.contains(&want), "{names:?}");
    }
    e2fsck_clean(&out);

    // Files, modes, owners, setuid, hard links, symlinks.
    assert_eq!(stat(&out, "/data/file"), ("0644".into(), 1234, 5678, 2));
    assert_eq!(stat(&out, "/data/hard").3, 2);
    let ino = |p: &str| debugfs(&out, &format!("ls -l {p}"));
    assert_eq!(
        ino("/data/file").split_whitespace().next(),
        ino("/data/hard").split_whitespace().next(),
        "hard link lost"
    );
    assert_eq!(stat(&out, "/usr/bin/suid").0, "04755");
    assert!(debugfs(&out, "stat /usr/bin/sym").contains("Fast link dest: \"../data/file\""));
    assert_eq!(debugfs(&out, "cat /data/file").trim_end(), "hello");
    // What chvkit adds.
    assert_eq!(stat(&out, "/init"), ("0755".into(), 0, 0, 1));
    assert_eq!(stat(&out, "/etc/checker.env"), ("0600".into(), 0, 0, 1));
    // The env slot launch fills in the job's disk: the placeholder, whole and contiguous.
    assert_eq!(
        debugfs(&out, "cat /etc/checker.env").as_bytes(),
        chvkit::rootfs::envslot::placeholder().as_slice()
    );
    {
        let f = fs::File::open(&out).unwrap();
        let mut read =
            |b: &mut [u8], off: u64| std::os::unix::fs::FileExt::read_exact_at(&f, b, off);
        assert!(
            chvkit::rootfs::envslot::locate(&mut read)
                .unwrap()
                .is_some(),
            "launch would find no env slot in the image"
        );
    }
    assert_eq!(stat(&out, "/.chvkit/busybox").0, "0755");
    assert!(debugfs(&out, "stat /dev/console").contains("Type: character"));
    let init = debugfs(&out, "cat /init");
    assert!(init.starts_with("#!/bin/sh\n"), "{init}");
    // USER 1234 has no passwd entry in this image: one was added for start-stop-daemon.
    assert!(init.contains("start-stop-daemon -S -c 'chvkit1234:5678'"));
    assert!(debugfs(&out, "cat /etc/passwd").contains("chvkit1234:x:1234:5678:"));

    // Portable features + metadata_csum, nothing newer; no reserved blocks; sparse.
    let dump = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&out)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    let feats: Vec<&str> = dump
        .lines()
        .find_map(|l| l.strip_prefix("Filesystem features:"))
        .unwrap()
        .split_whitespace()
        .collect();
    let mut want: Vec<&str> = chvkit::rootfs::ext4::PORTABLE_FEATURES
        .split(',')
        .filter(|f| *f != "none")
        .chain(["metadata_csum"])
        .collect();
    let mut got = feats.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(dump.contains("Reserved block count:     0"), "{dump}");
    let size = j["size_bytes"].as_u64().unwrap();
    assert_eq!(fs::metadata(&out).unwrap().len(), size);
    assert!(
        j["allocated_bytes"].as_u64().unwrap() < size / 2,
        "not sparse: {j}"
    );
}

#[test]
fn rootfs_build_reproducible_with_source_date_epoch() {
    let t = "rootfs_build_reproducible_with_source_date_epoch";
    if !common::require(t, true, TOOLS) {
        return;
    }
    let e = Env::new();
    let ctx = e.context("ctx", TREE_DOCKERFILE);
    let build = |name: &str, epoch: Option<&str>| {
        let out = e.p(name);
        let envs: Vec<(&str, &str)> = epoch
            .map(|v| ("SOURCE_DATE_EPOCH", v))
            .into_iter()
            .collect();
        let o = e.chvkit(
            &[
                "--pull",
                "never",
                "--no-cache",
                "-o",
                out.to_str().unwrap(),
                ctx.to_str().unwrap(),
            ],
            &envs,
        );
        assert!(o.status.success(), "{}", common::text(&o));
        out
    };
    let a = build("a.raw", Some("1700000000"));
    // Different wall-clock second, new scratch dirs, new unpack (ctimes, readdir order).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = build("b.raw", Some("1700000000"));
    assert_eq!(
        sha256(&a),
        sha256(&b),
        "same input + SOURCE_DATE_EPOCH must be byte-identical"
    );
    e2fsck_clean(&a);
    // The comparison means something: without the epoch, two builds differ.
    let c = build("c.raw", None);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let d = build("d.raw", None);
    assert_ne!(sha256(&c), sha256(&d));
}

#[test]
fn rootfs_build_cache_hit_and_no_cache() {
    let t = "rootfs_build_cache_hit_and_no_cache";
    if !common::require(t, true, TOOLS) {
        return;
    }
    let e = Env::new();
    let ctx = e.context("ctx", TREE_DOCKERFILE);
    let run = |name: &str, extra: &[&str]| {
        let out = e.p(name);
        let mut args = vec!["--pull", "never", "--json", "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(ctx.to_str().unwrap());
        let o = e.chvkit(&args, &[]);
        assert!(o.status.success(), "{}", common::text(&o));
        (out, json(&o))
    };
    let (a, ja) = run("a.raw", &[]);
    assert_eq!(ja["cache"], "miss");
    let (b, jb) = run("b.raw", &[]);
    assert_eq!(jb["cache"], "hit", "{jb}");
    assert_eq!(ja["image_digest"], jb["image_digest"]);
    assert_eq!(sha256(&a), sha256(&b));
    let names: Vec<&str> = jb["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"unpack") && !names.contains(&"pack"),
        "{names:?}"
    );
    // Unchanged context: not even buildah runs.
    assert!(!names.contains(&"build"), "{names:?}");
    // Same command, same OUT, untouched since: nothing is rewritten.
    use std::os::unix::fs::MetadataExt;
    let before = fs::metadata(&a).unwrap();
    let (_, ja2) = run("a.raw", &[]);
    assert_eq!(ja2["cache"], "hit");
    let after = fs::metadata(&a).unwrap();
    assert_eq!(
        (before.ino(), before.ctime(), before.ctime_nsec()),
        (after.ino(), after.ctime(), after.ctime_nsec())
    );
    assert!(ja2["total_seconds"].as_f64().unwrap() < 1.0, "{ja2}");
    // A modified OUT is replaced with the cached bytes.
    let f = fs::OpenOptions::new().write(true).open(&a).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage", 1024).unwrap();
    drop(f);
    let (_, ja3) = run("a.raw", &[]);
    assert_eq!(ja3["cache"], "hit");
    assert_eq!(sha256(&a), sha256(&b));
    // A changed option is a different key.
    let (_, jc) = run("c.raw", &["--headroom", "10M"]);
    assert_eq!(jc["cache"], "miss");
    let (_, jd) = run("d.raw", &["--no-cache"]);
    assert_eq!(jd["cache"], "disabled");
    // A changed context is a different image digest.
    fs::write(ctx.join("extra"), "x").unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        format!("{TREE_DOCKERFILE}COPY extra /extra\n"),
    )
    .unwrap();
    let (_, je) = run("e.raw", &[]);
    assert_eq!(je["cache"], "miss");
    assert_ne!(je["image_digest"], ja["image_digest"]);
}

/// Run a shell snippet in a private mount namespace (for tmpfs/ro mounts), with $CHVKIT set.
fn in_mount_ns(script: &str) -> Output {
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(common::chvkit())
        .output()
        .unwrap()
}

#[test]
fn rootfs_build_errors_are_clear_and_leave_nothing() {
    let t = "rootfs_build_errors_are_clear_and_leave_nothing";
    if !common::require(
        t,
        true,
        &["buildah", "umoci", "mkfs.ext4", "unshare", "busybox"],
    ) {
        return;
    }
    let e = Env::new();
    let ctx = e.context("ctx", TREE_DOCKERFILE);
    let outdir = e.p("outdir");
    fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("x.raw");
    let empty = |d: &Path| fs::read_dir(d).unwrap().count() == 0;

    // buildah missing: PATH without it.
    let o = e.chvkit(
        &[
            "--pull",
            "never",
            "-o",
            out.to_str().unwrap(),
            ctx.to_str().unwrap(),
        ],
        &[("PATH", "/nonexistent")],
    );
    let txt = common::text(&o);
    assert_eq!(o.status.code(), Some(1), "{txt}");
    assert!(
        txt.contains("`buildah` is not installed: apt-get install buildah"),
        "{txt}"
    );
    assert!(empty(&outdir), "{txt}");

    // Dockerfile syntax error: buildah's own message comes through.
    let bad = e.context("bad", "FROM scratch\nCOPPY busybox /bin/busybox\n");
    let o = e.chvkit(
        &[
            "--pull",
            "never",
            "-o",
            out.to_str().unwrap(),
            bad.to_str().unwrap(),
        ],
        &[],
    );
    let txt = common::text(&o);
    assert_eq!(o.status.code(), Some(1), "{txt}");
    assert!(txt.contains("buildah could not build"), "{txt}");
    assert!(
        txt.to_lowercase().contains("coppy"),
        "buildah's message was lost: {txt}"
    );
    assert!(empty(&outdir), "{txt}");

    // Read-only destination: refused before any work.
    let ro = e.p("ro");
    fs::create_dir_all(&ro).unwrap();
    let o = in_mount_ns(&format!(
        "mount -t tmpfs -o ro,size=1m tmpfs {ro} && \"$1\" --root {root} rootfs --pull never -o {ro}/x.raw {ctx}",
        ro = ro.display(),
        root = e.p("hostroot").display(),
        ctx = ctx.display()
    ));
    let txt = common::text(&o);
    assert_eq!(o.status.code(), Some(1), "{txt}");
    assert!(
        txt.contains(&format!("cannot write the output {}/x.raw", ro.display())),
        "{txt}"
    );
    assert!(txt.contains("Read-only file system"), "{txt}");
    assert!(
        !txt.contains("STEP"),
        "the build ran before the output check: {txt}"
    );

    // No space at OUT (a 4 MiB tmpfs): a clear error and nothing left there.
    let small = e.p("small");
    fs::create_dir_all(&small).unwrap();
    let o = in_mount_ns(&format!(
        "mount -t tmpfs -o size=4m tmpfs {d} && \"$1\" --root {root} rootfs --pull never --no-cache -o {d}/x.raw {ctx}; rc=$?; echo \"left: [$(ls -A {d})]\"; exit $rc",
        d = small.display(),
        root = e.p("hostroot").display(),
        ctx = ctx.display()
    ));
    let txt = common::text(&o);
    assert_eq!(o.status.code(), Some(1), "{txt}");
    assert!(txt.contains("no space left"), "{txt}");
    assert!(
        txt.contains("left: []"),
        "partial output left behind: {txt}"
    );

    // Bad option values name the value.
    let o = e.chvkit(
        &[
            "--size",
            "12Q",
            "-o",
            out.to_str().unwrap(),
            ctx.to_str().unwrap(),
        ],
        &[],
    );
    assert!(common::text(&o).contains("12Q"), "{}", common::text(&o));
    let o = e.chvkit(
        &[
            "--image",
            "oci:/nonexistent/layout:x",
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(common::text(&o).contains("/nonexistent/layout is not an OCI layout"));
    assert!(empty(&outdir));
}

/// An OCI layout made with umoci (device node, xattr, owners), used through `--image oci:`.
#[test]
fn rootfs_build_from_oci_layout_keeps_nodes_and_xattrs() {
    let t = "rootfs_build_from_oci_layout_keeps_nodes_and_xattrs";
    if !common::require(t, true, TOOLS) {
        return;
    }
    let e = Env::new();
    let layout = e.p("layout");
    let bundle = e.p("bundle");
    let sh = |s: &str| {
        let o = Command::new("sh").args(["-c", s]).output().unwrap();
        assert!(o.status.success(), "{s}: {}", common::text(&o));
    };
    sh(&format!(
        "umoci init --layout {l} && umoci new --image {l}:v1 && umoci unpack --image {l}:v1 {b}",
        l = layout.display(),
        b = bundle.display()
    ));
    let root = bundle.join("rootfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("opt-busybox")).unwrap();
    sh(&format!(
        "mknod {r}/node c 1 7 && echo data > {r}/x && chown 7:8 {r}/x",
        r = root.display()
    ));
    let c = std::ffi::CString::new(root.join("x").to_str().unwrap()).unwrap();
    // SAFETY: valid C strings and buffer for the call's duration.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"user.chvkit".as_ptr(),
            b"kept".as_ptr().cast(),
            4,
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
    sh(&format!(
        "umoci repack --image {l}:v1 {b} && umoci config --image {l}:v1 --config.cmd /opt-busybox --config.cmd sh --config.cmd -c --config.cmd 'exit 0'",
        l = layout.display(),
        b = bundle.display()
    ));
    let out = e.p("out.raw");
    let o = e.chvkit(
        &[
            "--json",
            "--image",
            &format!("oci:{}:v1", layout.display()),
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", common::text(&o));
    let j = json(&o);
    // No /bin/sh in this image: /init runs on the injected busybox.
    assert_eq!(j["init_shell"], "/.chvkit/busybox sh");
    assert!(debugfs(&out, "cat /init").starts_with("#!/.chvkit/busybox sh\n"));
    let node = debugfs(&out, "stat /node");
    assert!(node.contains("Type: character"), "{node}");
    assert!(node.contains("Device major/minor number: 01:07"), "{node}");
    assert_eq!(stat(&out, "/x").1, 7);
    let xa = debugfs(&out, "ea_get /x user.chvkit");
    assert!(xa.contains("kept"), "{xa}");
    e2fsck_clean(&out);
}
