//! Build chvkit's guest kernel from the distribution's kernel source package (helper-owned).
//!
//! The recipe (`guest/kernel/`: a kconfig fragment over `allnoconfig` and three small patches
//! for PVM hosts) is embedded, so the binary builds the same kernel wherever it runs. Results are
//! cached under `<cache_dir>/<key>/` where the key hashes the source tarball and the recipe.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::host::files::{sniff_kernel, KernelImage};
use crate::host::tools::find_in_path;

/// Debian 12 `linux-source-6.12` (bookworm-security) installs this.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// The kconfig fragment applied over `allnoconfig`.
pub const FRAGMENT: &str = include_str!("../../guest/kernel/chvkit-guest.config");
macro_rules! p {
    ($n:literal) => {
        ($n, include_str!(concat!("../../guest/kernel/patches/", $n)))
    };
}
/// The patches, applied in order with `patch -p1`: (file name, text).
pub const PATCHES: &[(&str, &str)] = &[
    p!("0001-x86-alternative-skip-int3-selftest.patch"),
    p!("0002-x86-fpu-no-fwait-in-fpu-drop.patch"),
    p!("0003-x86-mm-pvm-user-syscall-as-page-fault.patch"),
];

/// Bumped when the build procedure itself changes what it produces.
const RECIPE_FORMAT: &str = "chvkit-guest-kernel-recipe-v1";
/// The tarball is hashed by name, size and this much of each end (hashing all of it costs
/// seconds in a debug build; a different Debian upload has a different size or name).
const EDGE: u64 = 1 << 20;

pub struct BuildOptions {
    pub tarball: PathBuf,
    pub cache_dir: PathBuf,
    pub jobs: usize,
    pub keep_tree: bool,
}

#[derive(Debug)]
pub struct Built {
    pub vmlinux: PathBuf,
    pub key: String,
    /// e.g. "6.12.118", from the source tree's Makefile.
    pub source_version: String,
    pub cached: bool,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// (tool, Debian package that provides it)
    #[error("`{0}` is missing; it comes with the Debian package `{1}` (apt-get install {1})")]
    MissingTool(String, String),
    #[error("kernel source tarball {0} is unreadable ({1}); it comes with the Debian package `{SOURCE_PACKAGE}`")]
    Tarball(PathBuf, #[source] std::io::Error),
    /// (what was being done, to which path, why not)
    #[error("{0} {1}: {2}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// (command line, exit status, output tail)
    #[error("`{0}` failed ({1}):\n{2}")]
    Step(String, String, String),
    /// (patch file name, `patch` output tail)
    #[error("patch {0} did not apply:\n{1}")]
    Patch(String, String),
    /// (symbol, wanted, got)
    #[error("the final .config has {0}={2} but the recipe asks for {1} (a dependency is missing)")]
    ConfigMismatch(String, String, String),
    /// (exit status, log path, log tail)
    #[error("`make vmlinux` failed ({0}); full log: {1}\n{2}")]
    Make(String, PathBuf, String),
    #[error("{0} is not an ELF vmlinux with a Xen PVH note (found {1:?})")]
    NotPvh(PathBuf, KernelImage),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |e| BuildError::Io(what, path.to_path_buf(), e)
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Say what is missing before spending minutes: (tool, Debian package).
pub fn check_tools() -> Result<(), BuildError> {
    const TOOLS: &[(&str, &str)] = &[
        ("make", "make"),
        ("gcc", "gcc"),
        ("ld", "binutils"),
        ("flex", "flex"),
        ("bison", "bison"),
        ("bc", "bc"),
        ("tar", "tar"),
        ("xz", "xz-utils"),
        ("patch", "patch"),
    ];
    let missing = |t: &str, p: &str| Err(BuildError::MissingTool(t.into(), p.into()));
    if let Some((tool, package)) = TOOLS.iter().find(|(t, _)| find_in_path(t).is_none()) {
        return missing(tool, package);
    }
    // objtool is built against libelf.
    if !Path::new("/usr/include/gelf.h").exists() {
        return missing("libelf headers (gelf.h)", "libelf-dev");
    }
    Ok(())
}

/// sha256 over the tarball's name, size and first/last MiB, the fragment and every patch.
pub fn cache_key(tarball: &Path) -> Result<String, BuildError> {
    cache_key_with(tarball, FRAGMENT, PATCHES)
}

fn cache_key_with(
    tarball: &Path,
    fragment: &str,
    patches: &[(&str, &str)],
) -> Result<String, BuildError> {
    let err = |e| BuildError::Tarball(tarball.to_path_buf(), e);
    let mut f = fs::File::open(tarball).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(RECIPE_FORMAT.as_bytes());
    let name = tarball
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    field(name.as_bytes());
    field(&size.to_le_bytes());
    let mut buf = Vec::with_capacity(EDGE as usize);
    (&mut f).take(EDGE).read_to_end(&mut buf).map_err(err)?;
    field(&buf);
    buf.clear();
    f.seek(SeekFrom::Start(size.saturating_sub(EDGE)))
        .map_err(err)?;
    f.take(EDGE).read_to_end(&mut buf).map_err(err)?;
    field(&buf);
    field(fragment.as_bytes());
    for (name, text) in patches {
        field(name.as_bytes());
        field(text.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Run a command in `dir`, stdin from `input`; its combined output, or the failure's tail.
fn run(dir: &Path, args: &[&str], input: Option<&str>) -> Result<String, (String, String)> {
    let mut e = duct::cmd(args[0], &args[1..])
        .dir(dir)
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked();
    if let Some(text) = input {
        e = e.stdin_bytes(text.as_bytes().to_vec());
    }
    let out = e
        .run()
        .map_err(|err| (format!("could not start: {err}"), String::new()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err((out.status.to_string(), tail(&text, 30)))
    }
}

fn step(dir: &Path, args: &[&str]) -> Result<String, BuildError> {
    run(dir, args, None).map_err(|(status, tail)| BuildError::Step(args.join(" "), status, tail))
}

/// "6.12.118" from the tree's top Makefile.
fn source_version(tree: &Path) -> Result<String, BuildError> {
    let path = tree.join("Makefile");
    let text = fs::read_to_string(&path).map_err(io("reading", &path))?;
    let var = |name: &str| {
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_prefix('='));
        value.unwrap_or_default().trim()
    };
    let (v, p, s, x) = (
        var("VERSION"),
        var("PATCHLEVEL"),
        var("SUBLEVEL"),
        var("EXTRAVERSION"),
    );
    Ok(format!("{v}.{p}.{s}{x}"))
}

/// Every `CONFIG_X=v` line of the fragment must survive olddefconfig (`n` = unset).
fn verify_config(fragment: &str, config: &str) -> Result<(), BuildError> {
    let wanted = fragment
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CONFIG_")?.split_once('='));
    for (symbol, want) in wanted {
        let set = config.lines().find_map(|l| {
            l.strip_prefix("CONFIG_")?
                .strip_prefix(symbol)?
                .strip_prefix('=')
        });
        let got = set.unwrap_or("n");
        if got != want {
            let (s, w, g) = (format!("CONFIG_{symbol}"), want.into(), got.into());
            return Err(BuildError::ConfigMismatch(s, w, g));
        }
    }
    Ok(())
}

/// Build (or find in the cache) the guest kernel.
pub fn build(opts: &BuildOptions) -> Result<Built, BuildError> {
    let start = Instant::now();
    let key = cache_key(&opts.tarball)?;
    let done = opts.cache_dir.join(&key);
    let vmlinux = done.join("vmlinux");
    let built = |source_version: String, cached| {
        let seconds = start.elapsed().as_secs_f64();
        Ok(Built {
            vmlinux: vmlinux.clone(),
            key: key.clone(),
            source_version,
            cached,
            seconds,
        })
    };
    if vmlinux.is_file() {
        let version = fs::read_to_string(done.join("source-version")).unwrap_or_default();
        return built(version.trim().to_string(), true);
    }
    check_tools()?;
    fs::create_dir_all(&opts.cache_dir).map_err(io("creating", &opts.cache_dir))?;
    let pid = std::process::id();
    let tree = opts.cache_dir.join(format!("{key}.tmp-{pid}"));
    let staging = opts.cache_dir.join(format!("{key}.new-{pid}"));
    let result = build_in(opts, &key, &tree, &staging, &done);
    let _ = fs::remove_dir_all(&staging);
    if !opts.keep_tree {
        let _ = fs::remove_dir_all(&tree);
    }
    built(result?, false)
}

fn build_in(
    opts: &BuildOptions,
    key: &str,
    tree: &Path,
    staging: &Path,
    done: &Path,
) -> Result<String, BuildError> {
    let _ = fs::remove_dir_all(tree);
    fs::create_dir_all(tree).map_err(io("creating", tree))?;
    tracing::info!(tarball = %opts.tarball.display(), tree = %tree.display(), "extracting kernel source");
    let tarball = opts.tarball.to_string_lossy();
    step(tree, &["tar", "-xf", &tarball, "--strip-components=1"])?;
    let version = source_version(tree)?;
    for (name, text) in PATCHES {
        tracing::info!(patch = name, "applying");
        let patch = ["patch", "-p1", "--forward", "--batch"];
        run(tree, &patch, Some(text)).map_err(|(status, out)| {
            BuildError::Patch(name.to_string(), format!("({status})\n{out}"))
        })?;
    }
    let frag = tree.join("chvkit-guest.config");
    fs::write(&frag, FRAGMENT).map_err(io("writing", &frag))?;
    tracing::info!(version, "configuring: allnoconfig + chvkit-guest.config");
    step(tree, &["make", "ARCH=x86_64", "allnoconfig"])?;
    // A relative program path would be looked up from our directory, not the tree's.
    let merge = tree.join("scripts/kconfig/merge_config.sh");
    let merge = merge.to_string_lossy();
    step(tree, &[&merge, "-m", ".config", "chvkit-guest.config"])?;
    step(tree, &["make", "ARCH=x86_64", "olddefconfig"])?;
    let config_path = tree.join(".config");
    let config = fs::read_to_string(&config_path).map_err(io("reading", &config_path))?;
    verify_config(FRAGMENT, &config)?;

    let log = opts.cache_dir.join(format!("{key}.make.log"));
    make_vmlinux(tree, opts.jobs.max(1), &log)?;
    let built = tree.join("vmlinux");
    let found = sniff_kernel(&built).map_err(io("reading", &built))?;
    if found != KernelImage::ElfPvh {
        return Err(BuildError::NotPvh(built, found));
    }
    let _ = fs::remove_dir_all(staging);
    fs::create_dir_all(staging).map_err(io("creating", staging))?;
    for (from, to) in [
        (&built, "vmlinux"),
        (&config_path, "config"),
        (&log, "make.log"),
    ] {
        let dest = staging.join(to);
        fs::copy(from, &dest).map_err(io("copying into", &dest))?;
    }
    let sv = staging.join("source-version");
    fs::write(&sv, format!("{version}\n")).map_err(io("writing", &sv))?;
    if let Err(e) = fs::rename(staging, done) {
        // Another build of the same key finished first: its result is as good as ours.
        if !done.join("vmlinux").is_file() {
            return Err(io("renaming into", done)(e));
        }
    }
    let _ = fs::remove_file(&log);
    Ok(version)
}

/// `make -j<jobs> vmlinux`, output to `log`, a progress line every 30 s.
fn make_vmlinux(tree: &Path, jobs: usize, log: &Path) -> Result<(), BuildError> {
    let out = fs::File::create(log).map_err(io("creating", log))?;
    let err = out.try_clone().map_err(io("opening", log))?;
    let start = Instant::now();
    tracing::info!(jobs, log = %log.display(), "make vmlinux (about 8 minutes on 2 cores)");
    let mut child = std::process::Command::new("make")
        .args(["ARCH=x86_64", &format!("-j{jobs}"), "vmlinux"])
        .current_dir(tree)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io("running make in", tree))?;
    let mut last = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => return Err(io("waiting for make in", tree)(e)),
        }
        if last.elapsed() >= Duration::from_secs(30) {
            last = Instant::now();
            let text = fs::read_to_string(log).unwrap_or_default();
            tracing::info!(secs = start.elapsed().as_secs(), at = %tail(&text, 1).trim(), "building vmlinux");
        }
    };
    tracing::info!(secs = start.elapsed().as_secs(), %status, "make vmlinux finished");
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    Err(BuildError::Make(
        status.to_string(),
        log.to_path_buf(),
        tail(&text, 30),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(dir: &Path) -> PathBuf {
        let path = dir.join("linux-source-6.12.tar.xz");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        fs::write(&path, data).expect("write fake tarball");
        path
    }

    #[test]
    fn cache_key_is_deterministic_and_covers_the_recipe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tarball(dir.path());
        let a = cache_key(&t).expect("key");
        assert_eq!(a, cache_key(&t).expect("key"));
        assert_eq!(a.len(), 64);
        let mut patches: Vec<(&str, String)> =
            PATCHES.iter().map(|(n, t)| (*n, t.to_string())).collect();
        patches[2].1.push(' ');
        let changed: Vec<(&str, &str)> = patches.iter().map(|(n, t)| (*n, t.as_str())).collect();
        assert_ne!(a, cache_key_with(&t, FRAGMENT, &changed).expect("key"));
        assert_ne!(
            a,
            cache_key_with(&t, &format!("{FRAGMENT}#\n"), PATCHES).expect("key")
        );
        let mut data = fs::read(&t).expect("read");
        let last = data.len() - 1;
        data[last] ^= 1;
        fs::write(&t, data).expect("write");
        assert_ne!(a, cache_key(&t).expect("key"));
    }

    #[test]
    fn embedded_patches_are_well_formed() {
        assert_eq!(PATCHES.len(), 3);
        for (name, text) in PATCHES {
            let lines: Vec<&str> = text.lines().collect();
            let minus = lines
                .iter()
                .position(|l| l.starts_with("--- a/"))
                .unwrap_or_else(|| panic!("{name}: no diff"));
            assert!(minus > 0, "{name}: no header comment");
            assert!(lines[minus + 1].starts_with("+++ b/"), "{name}");
            assert!(lines[minus + 2].starts_with("@@ -"), "{name}");
        }
        assert!(PATCHES[2].1.contains("chvkit-pvm-syscall-fixup-v1"));
    }

    #[test]
    fn fragment_verification_and_version() {
        assert!(verify_config(
            "CONFIG_A=y\nCONFIG_B=n\n",
            "CONFIG_A=y\n# CONFIG_B is not set\n"
        )
        .is_ok());
        assert!(verify_config("CONFIG_A=y\n", "CONFIG_AB=y\n").is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("Makefile"),
            "VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 118\nEXTRAVERSION =\n",
        )
        .expect("write");
        assert_eq!(source_version(dir.path()).expect("version"), "6.12.118");
    }

    /// `cargo test --lib kernel::build::tests::build_for_real -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn build_for_real() {
        let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
        let cache_dir = std::env::var_os("CHVKIT_KERNEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root/.cache/chvkit/kernel"));
        let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
        let keep_tree = std::env::var_os("CHVKIT_KERNEL_KEEP_TREE").is_some();
        let tarball = SOURCE_TARBALL.into();
        let opts = BuildOptions {
            tarball,
            cache_dir,
            jobs,
            keep_tree,
        };
        let built = build(&opts).unwrap_or_else(|e| panic!("{e}"));
        println!("{built:?}");
    }
}
