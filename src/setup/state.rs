//! `<state_dir>/setup-state.json`: what setup created and the values it replaced, so teardown
//! removes exactly that. It is saved after every applied step (never half-written: atomic
//! rename), so a run that fails midway still tells teardown, and the next setup, what exists.
//! It holds no timestamps: a setup that changes nothing leaves it byte-for-byte as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sysctl::Key;
use crate::{fsutil, paths::Root, profile::Profile};

pub const FILE_NAME: &str = "setup-state.json";
pub const SCHEMA: u32 = 1;
/// What the file is called in messages.
const WHAT: &str = "setup state";

pub type StateError = fsutil::JsonFileError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstalledArtifact {
    /// Host path (without the `--root` prefix).
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeRecord {
    pub name: String,
    /// Setup created the link (teardown deletes it); otherwise it was there before.
    pub created: bool,
    /// The address setup added (`fdcd::1/16`), when it added one to a bridge it did not create.
    #[serde(default)]
    pub address_added: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysctlRecord {
    pub key: Key,
    /// The value before chvkit first changed it.
    pub previous: String,
    /// The value chvkit set.
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum FirewallRecord {
    Nftables {
        family: String,
        table: String,
        /// sha256 of the script that was loaded, and of the kernel's listing of the table right
        /// after: the table is up to date when both still match.
        script_sha256: String,
        listing_sha256: String,
    },
    Iptables {
        /// `(table, chain)` pairs chvkit owns.
        chains: Vec<(String, String)>,
        /// `(table, base chain, rule args)` jumps into them.
        jumps: Vec<(String, String, Vec<String>)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupState {
    pub schema: u32,
    #[serde(default)]
    pub artifacts: BTreeMap<String, InstalledArtifact>,
    #[serde(default)]
    pub bridge: Option<BridgeRecord>,
    #[serde(default)]
    pub sysctls: Vec<SysctlRecord>,
    #[serde(default)]
    pub firewall: Option<FirewallRecord>,
    /// Host paths (without the `--root` prefix) of files and symlinks setup wrote.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// Directories setup had to create (host paths); teardown removes them when empty.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
}

impl Default for SetupState {
    fn default() -> Self {
        SetupState {
            schema: SCHEMA,
            artifacts: BTreeMap::new(),
            bridge: None,
            sysctls: Vec::new(),
            firewall: None,
            files: Vec::new(),
            dirs: Vec::new(),
        }
    }
}

impl SetupState {
    pub fn path(profile: &Profile, root: &Root) -> PathBuf {
        root.path(profile.paths.state_dir.as_path().join(FILE_NAME))
    }

    pub fn load(path: &Path) -> Result<Option<SetupState>, StateError> {
        fsutil::load_json(path, WHAT, SCHEMA)
    }

    /// Nothing left to undo (created directories do not count: they go last, when empty).
    pub fn is_empty(&self) -> bool {
        self.artifacts.is_empty()
            && self.bridge.is_none()
            && self.sysctls.is_empty()
            && self.firewall.is_none()
            && self.files.is_empty()
    }

    /// Write only if the content differs from what is on disk.
    pub fn save(&self, path: &Path) -> Result<bool, StateError> {
        fsutil::save_json(path, WHAT, self, 0o644)
    }

    /// Remember the value a sysctl had before chvkit first changed it. A later run that finds
    /// chvkit's own value must not overwrite the original.
    pub fn record_sysctl(&mut self, key: &Key, previous: &str, value: &str) {
        if let Some(r) = self.sysctls.iter_mut().find(|r| &r.key == key) {
            r.value = value.to_string();
        } else {
            self.sysctls.push(SysctlRecord {
                key: key.clone(),
                previous: previous.to_string(),
                value: value.to_string(),
            });
        }
    }

    pub fn record_dirs(&mut self, dirs: Vec<PathBuf>) {
        for d in dirs {
            if !self.dirs.contains(&d) {
                self.dirs.push(d);
            }
        }
    }

    pub fn record_file(&mut self, host_path: &Path) {
        if !self.files.iter().any(|p| p == host_path) {
            self.files.push(host_path.to_path_buf());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_first_previous_wins() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s/setup-state.json");
        assert_eq!(SetupState::load(&p).unwrap(), None);
        let mut s = SetupState::default();
        let k = Key::ipv6_conf("all", "forwarding");
        s.record_sysctl(&k, "0", "1");
        s.record_sysctl(&k, "1", "1");
        assert_eq!(s.sysctls[0].previous, "0");
        s.firewall = Some(FirewallRecord::Nftables {
            family: "inet".into(),
            table: "chvkit".into(),
            script_sha256: "a".into(),
            listing_sha256: "b".into(),
        });
        assert!(s.save(&p).unwrap());
        assert!(!s.save(&p).unwrap(), "unchanged content is not rewritten");
        assert_eq!(SetupState::load(&p).unwrap(), Some(s));
    }
}
