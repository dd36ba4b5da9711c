//! `/dev/kvm`: presence, ownership and mode, whether the invoking user may open it, and whether
//! the kernel actually creates a VM (`KVM_GET_API_VERSION` = 12, then `KVM_CREATE_VM`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

pub const DEV_KVM: &str = "/dev/kvm";
/// The only KVM API version Linux has ever reported (stable since 2.6.22).
pub const KVM_API_VERSION: i32 = 12;
/// `_IO(KVMIO, 0x00)` and `_IO(KVMIO, 0x01)` with `KVMIO` = 0xAE.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;

/// Who asked: under `sudo`, the user behind it (`SUDO_UID`/`SUDO_GID`), otherwise this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserIdentity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (including the primary one).
    pub groups: Vec<u32>,
    pub name: Option<String>,
    /// True when this is the user behind `sudo`, not the (root) process itself.
    pub via_sudo: bool,
}

impl UserIdentity {
    pub fn current() -> UserIdentity {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        if uid == 0 {
            let sudo_uid = std::env::var("SUDO_UID")
                .ok()
                .and_then(|s| s.parse::<u32>().ok());
            let sudo_gid = std::env::var("SUDO_GID")
                .ok()
                .and_then(|s| s.parse::<u32>().ok());
            if let (Some(u), Some(g)) = (sudo_uid, sudo_gid) {
                if u != 0 {
                    let name = std::env::var("SUDO_USER").ok();
                    let mut groups = name
                        .as_deref()
                        .and_then(|n| std::ffi::CString::new(n).ok())
                        .and_then(|c| {
                            nix::unistd::getgrouplist(&c, nix::unistd::Gid::from_raw(g)).ok()
                        })
                        .map(|v| v.into_iter().map(|g| g.as_raw()).collect::<Vec<_>>())
                        .unwrap_or_default();
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                    return UserIdentity {
                        uid: u,
                        gid: g,
                        groups,
                        name,
                        via_sudo: true,
                    };
                }
            }
        }
        let mut groups: Vec<u32> = nix::unistd::getgroups()
            .map(|v| v.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        if !groups.contains(&gid) {
            groups.push(gid);
        }
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        UserIdentity {
            uid,
            gid,
            groups,
            name,
            via_sudo: false,
        }
    }

    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("uid {}", self.uid))
    }
}

/// What `/dev/kvm` looks like and does.
#[derive(Debug, Clone, Serialize)]
pub struct KvmFacts {
    pub path: PathBuf,
    pub exists: bool,
    pub char_device: bool,
    /// Permission bits (`0o660`).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub group_name: Option<String>,
    /// `Err` holds the error of `open(O_RDWR)` by this process.
    pub open: Result<(), String>,
    pub api_version: Option<i32>,
    /// `None` when not attempted (open failed or wrong API version).
    pub create_vm: Option<Result<(), String>>,
}

impl KvmFacts {
    /// Inspect `path` (normally [`DEV_KVM`]). Creating the VM allocates nothing lasting: the fd
    /// is closed at once.
    pub fn probe(path: &Path) -> KvmFacts {
        let mut f = KvmFacts {
            path: path.to_path_buf(),
            exists: false,
            char_device: false,
            mode: None,
            uid: None,
            gid: None,
            group_name: None,
            open: Err("not attempted".into()),
            api_version: None,
            create_vm: None,
        };
        let Ok(md) = std::fs::metadata(path) else {
            f.open = Err("does not exist".into());
            return f;
        };
        f.exists = true;
        f.char_device = md.file_type().is_char_device();
        f.mode = Some(md.mode() & 0o7777);
        f.uid = Some(md.uid());
        f.gid = Some(md.gid());
        f.group_name = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(md.gid()))
            .ok()
            .flatten()
            .map(|g| g.name);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(file) => file,
            Err(e) => {
                f.open = Err(e.to_string());
                return f;
            }
        };
        f.open = Ok(());
        let (api, vm) = probe_fd(&file);
        f.api_version = api;
        f.create_vm = vm;
        f
    }

    pub fn world_writable(&self) -> bool {
        self.mode.is_some_and(|m| m & 0o002 != 0)
    }

    /// Whether `user` may open the device read-write by its mode bits (root always may).
    pub fn mode_allows(&self, user: &UserIdentity) -> bool {
        let (Some(mode), Some(uid), Some(gid)) = (self.mode, self.uid, self.gid) else {
            return false;
        };
        if user.uid == 0 {
            return true;
        }
        let bits = if user.uid == uid {
            (mode >> 6) & 0o6
        } else if user.groups.contains(&gid) {
            (mode >> 3) & 0o6
        } else {
            mode & 0o6
        };
        bits == 0o6
    }

    pub fn usable(&self) -> bool {
        self.api_version == Some(KVM_API_VERSION) && matches!(self.create_vm, Some(Ok(())))
    }
}

fn probe_fd(file: &File) -> (Option<i32>, Option<Result<(), String>>) {
    // SAFETY: plain ioctls on an fd we own; neither takes a pointer argument.
    let api = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if api < 0 {
        return (None, None);
    }
    if api != KVM_API_VERSION {
        return (Some(api), None);
    }
    // SAFETY: as above; on success the return value is a new fd that we take ownership of.
    let vm = unsafe { libc::ioctl(file.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return (
            Some(api),
            Some(Err(std::io::Error::last_os_error().to_string())),
        );
    }
    // SAFETY: vm is a fresh fd owned by nobody else; dropping it destroys the VM.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    (Some(api), Some(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(mode: u32, uid: u32, gid: u32) -> KvmFacts {
        KvmFacts {
            path: DEV_KVM.into(),
            exists: true,
            char_device: true,
            mode: Some(mode),
            uid: Some(uid),
            gid: Some(gid),
            group_name: None,
            open: Ok(()),
            api_version: Some(12),
            create_vm: Some(Ok(())),
        }
    }

    fn user(uid: u32, groups: &[u32]) -> UserIdentity {
        UserIdentity {
            uid,
            gid: groups.first().copied().unwrap_or(uid),
            groups: groups.to_vec(),
            name: None,
            via_sudo: false,
        }
    }

    #[test]
    fn mode_bits() {
        let f = facts(0o660, 0, 108);
        assert!(f.mode_allows(&user(1000, &[1000, 108])));
        assert!(!f.mode_allows(&user(1000, &[1000])));
        assert!(f.mode_allows(&user(0, &[0])));
        assert!(!f.world_writable());
        let f = facts(0o666, 0, 108);
        assert!(f.world_writable() && f.mode_allows(&user(1000, &[1000])));
        assert!(!facts(0o640, 0, 108).mode_allows(&user(1000, &[108])));
        assert!(f.usable());
    }

    #[test]
    fn missing_device() {
        let f = KvmFacts::probe(Path::new("/nonexistent/kvm"));
        assert!(!f.exists && f.open.is_err() && !f.usable());
    }
}
