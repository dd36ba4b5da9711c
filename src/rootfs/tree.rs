//! Preparing the unpacked tree for booting: /init, busybox, the checker.env placeholder, the
//! device nodes the kernel needs before /init runs, and a passwd entry for a numeric USER.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::init::{self, InitShell, Workload, BUSYBOX_PATH};

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a static executable; /init needs busybox-static: apt-get install busybox-static")]
    NotStatic(PathBuf),
    #[error("{0} does not exist; /init needs busybox-static: apt-get install busybox-static")]
    NoBusybox(PathBuf),
    #[error(transparent)]
    Init(#[from] init::InitError),
}

fn ioe(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Resolve `p` (absolute, inside the guest) against `root` following symlinks as the guest
/// would, never leaving `root`. `None` if it does not exist.
pub fn resolve_in_root(root: &Path, p: &str) -> Option<PathBuf> {
    let mut todo: Vec<String> = p
        .split('/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(str::to_string)
        .collect();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        cur.push(c);
        let host = root.join(cur.join("/"));
        let md = fs::symlink_metadata(&host).ok()?;
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(&host).ok()?;
            let t = target.to_string_lossy().into_owned();
            cur.pop();
            if t.starts_with('/') {
                cur.clear();
            }
            for part in t.split('/').filter(|s| !s.is_empty()).rev() {
                todo.push(part.to_string());
            }
        }
    }
    Some(root.join(cur.join("/")))
}

/// Does the image have an executable `/bin/sh`?
pub fn has_shell(root: &Path) -> bool {
    resolve_in_root(root, "/bin/sh")
        .and_then(|p| fs::metadata(p).ok())
        .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// An ELF executable without a PT_INTERP program header (statically linked).
pub fn is_static_elf(p: &Path) -> io::Result<bool> {
    let mut f = fs::File::open(p)?;
    let mut h = [0u8; 64];
    f.read_exact(&mut h)?;
    if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        // Only 64-bit little-endian ELF is expected on x86_64 hosts.
        return Ok(false);
    }
    let phoff = u64::from_le_bytes(h[0x20..0x28].try_into().unwrap_or([0; 8]));
    let phentsize = u64::from(u16::from_le_bytes([h[0x36], h[0x37]]));
    let phnum = u64::from(u16::from_le_bytes([h[0x38], h[0x39]]));
    let mut all = Vec::new();
    f.read_to_end(&mut all)?;
    for i in 0..phnum {
        let off = (phoff + i * phentsize) as usize;
        let Some(ty) = off
            .checked_sub(64)
            .and_then(|o| all.get(o..o + 4))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return Ok(false);
        };
        if ty == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Find the name of `uid` in the image's /etc/passwd; add an entry if there is none
/// (busybox's start-stop-daemon only switches to users it can look up).
fn ensure_user(root: &Path, uid: u32, gid: u32) -> Result<String, TreeError> {
    let etc = root.join("etc");
    let passwd = etc.join("passwd");
    let text = fs::read_to_string(&passwd).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[2].parse::<u32>().ok() == Some(uid) {
            return Ok(f[0].to_string());
        }
    }
    let name = format!("chvkit{uid}");
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&format!(
        "{name}:x:{uid}:{gid}:chvkit workload user:/:/nonexistent\n"
    ));
    fs::create_dir_all(&etc).map_err(ioe(&etc))?;
    fs::write(&passwd, new).map_err(ioe(&passwd))?;
    Ok(name)
}

fn write_file(p: &Path, data: &[u8], mode: u32) -> Result<(), TreeError> {
    // Replace, never write through a symlink the image put there.
    if fs::symlink_metadata(p).is_ok() {
        fs::remove_file(p).map_err(ioe(p))?;
    }
    fs::write(p, data).map_err(ioe(p))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(ioe(p))?;
    nix::unistd::chown(p, Some(0.into()), Some(0.into())).map_err(|e| TreeError::Io {
        path: p.to_path_buf(),
        source: e.into(),
    })
}

fn ensure_dir(p: &Path, mode: u32) -> Result<(), TreeError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Ok(()), // a symlink (merged /usr …) or file the image owns: leave it
        Err(_) => {
            fs::create_dir_all(p).map_err(ioe(p))?;
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(ioe(p))
        }
    }
}

fn ensure_node(p: &Path, major: u64, minor: u64, mode: u32) -> Result<(), TreeError> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    if fs::symlink_metadata(p).is_ok() {
        return Ok(());
    }
    mknod(
        p,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .map_err(|e| TreeError::Io {
        path: p.to_path_buf(),
        source: e.into(),
    })?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(ioe(p))
}

/// What [`prepare`] did.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub shell: InitShell,
    pub workload: Workload,
}

/// Make `root` bootable: returns which shell /init uses.
pub fn prepare(root: &Path, mut w: Workload, busybox: &Path) -> Result<Prepared, TreeError> {
    if !busybox.exists() {
        return Err(TreeError::NoBusybox(busybox.to_path_buf()));
    }
    if !is_static_elf(busybox).map_err(ioe(busybox))? {
        return Err(TreeError::NotStatic(busybox.to_path_buf()));
    }
    if w.uid != 0 {
        w.user_name = Some(ensure_user(root, w.uid, w.gid)?);
    }
    let shell = if has_shell(root) {
        InitShell::Image
    } else {
        InitShell::Busybox
    };
    let text = init::generate(&w, &shell)?;

    let private = root.join(BUSYBOX_PATH.trim_start_matches('/'));
    if let Some(dir) = private.parent() {
        if fs::symlink_metadata(dir).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(dir).map_err(ioe(dir))?;
        }
        ensure_dir(dir, 0o755)?;
    }
    let bb = fs::read(busybox).map_err(ioe(busybox))?;
    write_file(&private, &bb, 0o755)?;
    write_file(&root.join("init"), text.as_bytes(), 0o755)?;

    for (d, mode) in [
        ("etc", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        ensure_dir(&root.join(d), mode)?;
    }
    // Like runc, create a WORKDIR the image does not have (buildah leaves it out of `FROM
    // scratch` images unless a later step writes there).
    if w.cwd != "/" && resolve_in_root(root, &w.cwd).is_none() {
        let p = root.join(w.cwd.trim_start_matches('/'));
        fs::create_dir_all(&p).map_err(ioe(&p))?;
    }
    // The launcher supplies the environment: the image carries a root-only placeholder it can
    // fill in the job's disk before boot (the env slot; see `super::envslot`).
    write_file(
        &root.join("etc/checker.env"),
        &super::envslot::placeholder(),
        0o600,
    )?;
    // The kernel opens /dev/console before /init runs and mounts no devtmpfs by itself
    // (CONFIG_DEVTMPFS_MOUNT is off in Debian's kernels): without the node /init has no stdio.
    let dev = root.join("dev");
    if fs::symlink_metadata(&dev).is_ok_and(|m| m.is_dir()) {
        ensure_node(&dev.join("console"), 5, 1, 0o600)?;
        ensure_node(&dev.join("null"), 1, 3, 0o666)?;
    }
    Ok(Prepared { shell, workload: w })
}

/// Set mtime/atime of the files chvkit added (SOURCE_DATE_EPOCH); ext4::pack fixes ctimes.
pub fn stamp(root: &Path, epoch: i64) {
    let t = nix::sys::time::TimeSpec::new(epoch, 0);
    for p in [
        "init",
        ".chvkit/busybox",
        ".chvkit",
        "etc/checker.env",
        "etc/passwd",
        "etc",
        "dev",
        "",
    ] {
        let _ = nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &root.join(p),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink as link;

    #[test]
    fn resolves_inside_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::write(r.join("usr/bin/dash"), b"x").unwrap();
        link("usr/bin", r.join("bin")).unwrap();
        link("/usr/bin/dash", r.join("usr/bin/sh")).unwrap();
        assert_eq!(resolve_in_root(r, "/bin/sh"), Some(r.join("usr/bin/dash")));
        link("../../../../etc/passwd", r.join("usr/bin/esc")).unwrap();
        // `..` at the guest's root stays at the root.
        assert_eq!(resolve_in_root(r, "/bin/esc"), None);
        fs::set_permissions(r.join("usr/bin/dash"), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(has_shell(r));
    }

    #[test]
    fn static_elf_detection() {
        if Path::new("/bin/busybox").exists() {
            // Debian's busybox-static; a dynamic busybox would be false here.
            let _ = is_static_elf(Path::new("/bin/busybox")).unwrap();
        }
        assert!(!is_static_elf(Path::new("/bin/ls")).unwrap());
    }
}
