//! Which kernel modules the initramfs carries, in what order, read from `modules.dep` and
//! `modules.builtin` (not from `modinfo`: the tree may be a test's fake, and depmod's files
//! are what modprobe itself uses). Dependencies change between kernel updates (facts §4), so
//! nothing here is a fixed list.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::InitramfsError;

/// A loadable module: its name (`virtio_pci`) and its file under the modules directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub file: PathBuf,
}

/// Module names use `_`; file names may use `-` (`virtio-rng.ko` is `virtio_rng`).
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

struct DepTable {
    /// name → (file relative to the modules dir, dependency names).
    modules: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
    dir: PathBuf,
}

impl DepTable {
    fn read(dir: &Path, version: &str) -> Result<DepTable, InitramfsError> {
        let dep_path = dir.join("modules.dep");
        let text =
            std::fs::read_to_string(&dep_path).map_err(|source| InitramfsError::ModulesDep {
                path: dep_path.clone(),
                source,
            })?;
        // Very old depmod wrote absolute paths; keep them inside `dir` all the same.
        let abs = format!("/lib/modules/{version}/");
        let rel = |p: &str| p.strip_prefix(abs.as_str()).unwrap_or(p).to_string();
        let mut modules = BTreeMap::new();
        for line in text.lines() {
            let Some((file, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(module_name).collect();
            modules.insert(module_name(file), (rel(file.trim()), deps));
        }
        // No modules.builtin just means nothing is known to be built in.
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();
        Ok(DepTable {
            modules,
            builtin,
            dir: dir.to_path_buf(),
        })
    }
}

/// The modules to load for `wanted` (all required) and `optional` (taken when the kernel has
/// them), dependencies first. Built-in modules are left out. Order: depth-first from each
/// wanted name in the order given, a module's dependencies by name, so the same tree always
/// gives the same order.
pub fn load_order(
    dir: &Path,
    version: &str,
    wanted: &[&str],
    optional: &[&str],
) -> Result<Vec<Module>, InitramfsError> {
    let t = DepTable::read(dir, version)?;
    let mut roots = Vec::new();
    for w in wanted {
        let n = module_name(w);
        if !t.modules.contains_key(&n) && !t.builtin.contains(&n) {
            return Err(InitramfsError::ModuleMissing {
                module: n,
                version: version.to_string(),
                dir: dir.to_path_buf(),
            });
        }
        roots.push(n);
    }
    roots.extend(
        optional
            .iter()
            .map(|o| module_name(o))
            .filter(|n| t.modules.contains_key(n)),
    );
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for r in &roots {
        visit(&t, r, version, &mut done, &mut Vec::new(), &mut order)?;
    }
    Ok(order
        .into_iter()
        .filter_map(|name| {
            let file = dir.join(&t.modules.get(&name)?.0);
            Some(Module { name, file })
        })
        .collect())
}

fn visit(
    t: &DepTable,
    m: &str,
    version: &str,
    done: &mut BTreeSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<String>,
) -> Result<(), InitramfsError> {
    if done.contains(m) || (t.builtin.contains(m) && !t.modules.contains_key(m)) {
        return Ok(());
    }
    if stack.iter().any(|s| s == m) {
        return Err(InitramfsError::ModuleCycle {
            module: m.to_string(),
            version: version.to_string(),
        });
    }
    let Some((_, deps)) = t.modules.get(m) else {
        // A dependency modules.dep names but does not list itself: depmod never writes that.
        return Err(InitramfsError::ModuleMissing {
            module: m.to_string(),
            version: version.to_string(),
            dir: t.dir.clone(),
        });
    };
    stack.push(m.to_string());
    let mut deps: Vec<&String> = deps.iter().collect();
    deps.sort();
    for d in deps {
        visit(t, d, version, done, stack, order)?;
    }
    stack.pop();
    done.insert(m.to_string());
    order.push(m.to_string());
    Ok(())
}

/// A module file's bytes, decompressed if it is `.ko.xz`, `.ko.zst` or `.ko.gz` (busybox
/// `insmod` loads only plain `.ko`).
pub fn read_module(file: &Path) -> Result<Vec<u8>, InitramfsError> {
    let err = |source| InitramfsError::ModuleRead {
        path: file.to_path_buf(),
        source,
    };
    let raw = std::fs::read(file).map_err(err)?;
    let name = file.to_string_lossy();
    let mut out = Vec::new();
    if name.ends_with(".ko.xz") {
        liblzma::read::XzDecoder::new_multi_decoder(&raw[..])
            .read_to_end(&mut out)
            .map_err(err)?;
    } else if name.ends_with(".ko.zst") {
        out = zstd::decode_all(&raw[..]).map_err(err)?;
    } else if name.ends_with(".ko.gz") {
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(err)?;
    } else {
        out = raw;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A fake `/lib/modules/<ver>` with a diamond: a → b, a → c, b → d, c → d; e is built in.
    fn fake_tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("kernel/x")).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/x/a.ko: kernel/x/c.ko kernel/x/b.ko kernel/x/d.ko\n\
             kernel/x/b.ko: kernel/x/d.ko\n\
             kernel/x/c.ko: kernel/x/d.ko.xz\n\
             kernel/x/d.ko.xz:\n\
             kernel/x/virtio-extra.ko:\n\
             kernel/x/loop.ko: kernel/x/loop.ko\n",
        )
        .unwrap();
        std::fs::write(dir.join("modules.builtin"), "kernel/fs/e/e.ko\n").unwrap();
        for m in ["a", "b", "c", "virtio-extra"] {
            std::fs::write(dir.join(format!("kernel/x/{m}.ko")), format!("ko {m}")).unwrap();
        }
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(b"ko d").unwrap();
        std::fs::write(dir.join("kernel/x/d.ko.xz"), xz.finish().unwrap()).unwrap();
    }

    fn names(m: &[Module]) -> Vec<&str> {
        m.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn diamond_order_builtin_skipped() {
        let d = tempfile::tempdir().unwrap();
        fake_tree(d.path());
        let m = load_order(d.path(), "9.9", &["a", "e"], &["virtio_extra", "nope"]).unwrap();
        assert_eq!(names(&m), ["d", "b", "c", "a", "virtio_extra"]);
        assert_eq!(m[0].file, d.path().join("kernel/x/d.ko.xz"));
        // Same tree, same order; a second root that is already loaded adds nothing.
        let m2 = load_order(d.path(), "9.9", &["c", "a"], &[]).unwrap();
        assert_eq!(names(&m2), ["d", "c", "b", "a"]);
    }

    #[test]
    fn compressed_module_decompressed() {
        let d = tempfile::tempdir().unwrap();
        fake_tree(d.path());
        assert_eq!(
            read_module(&d.path().join("kernel/x/d.ko.xz")).unwrap(),
            b"ko d"
        );
        assert_eq!(
            read_module(&d.path().join("kernel/x/a.ko")).unwrap(),
            b"ko a"
        );
        let gz = d.path().join("g.ko.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b"ko g").unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        assert_eq!(read_module(&gz).unwrap(), b"ko g");
        let zs = d.path().join("z.ko.zst");
        std::fs::write(&zs, zstd::encode_all(&b"ko z"[..], 3).unwrap()).unwrap();
        assert_eq!(read_module(&zs).unwrap(), b"ko z");
    }

    #[test]
    fn missing_and_cycle_named() {
        let d = tempfile::tempdir().unwrap();
        fake_tree(d.path());
        let e = load_order(d.path(), "9.9-test", &["a", "virtio_blk"], &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("virtio_blk") && msg.contains("9.9-test"),
            "{msg}"
        );
        let e = load_order(d.path(), "9.9", &["loop"], &[]).unwrap_err();
        assert!(matches!(e, InitramfsError::ModuleCycle { .. }), "{e}");
        let e = load_order(&d.path().join("none"), "9.9", &["a"], &[]).unwrap_err();
        assert!(e.to_string().contains("modules.dep"), "{e}");
    }
}
