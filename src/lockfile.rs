//! The artifact lock file: the sha256 of each artifact setup installed, for artifacts whose
//! profile has no pin (v50.0's binary has no public checksum). Setup writes it; doctor reads it
//! to verify installed files. Lives at `<state_dir>/artifacts.lock.json` (under `--root`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{fsutil, paths::Root, profile::Profile};

pub const FILE_NAME: &str = "artifacts.lock.json";
pub const SCHEMA: u32 = 1;
/// What the file is called in messages.
const WHAT: &str = "lock file";
/// Keys of the artifacts map.
pub const CLOUD_HYPERVISOR: &str = "cloud_hypervisor";
pub const FIRMWARE: &str = "firmware";

pub type LockError = fsutil::JsonFileError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedArtifact {
    /// Where it was downloaded from (the profile URL, not a mirror).
    pub url: String,
    /// Host path it was installed to (without the `--root` prefix).
    pub path: PathBuf,
    pub sha256: String,
    /// Unix seconds.
    pub installed_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactLock {
    pub schema: u32,
    pub artifacts: BTreeMap<String, LockedArtifact>,
}

impl Default for ArtifactLock {
    fn default() -> Self {
        ArtifactLock {
            schema: SCHEMA,
            artifacts: BTreeMap::new(),
        }
    }
}

impl ArtifactLock {
    pub fn path(profile: &Profile, root: &Root) -> PathBuf {
        root.path(profile.paths.state_dir.as_path().join(FILE_NAME))
    }

    /// `Ok(None)` when no lock file exists yet.
    pub fn load(path: &Path) -> Result<Option<ArtifactLock>, LockError> {
        fsutil::load_json(path, WHAT, SCHEMA)
    }

    pub fn save(&self, path: &Path) -> Result<(), LockError> {
        fsutil::save_json(path, WHAT, self, 0o644).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_missing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state").join(FILE_NAME);
        assert_eq!(ArtifactLock::load(&p).unwrap(), None);
        let mut l = ArtifactLock::default();
        l.artifacts.insert(
            FIRMWARE.into(),
            LockedArtifact {
                url: "https://x/hypervisor-fw".into(),
                path: "/opt/cloud-hypervisor/hypervisor-fw".into(),
                sha256: "00".repeat(32),
                installed_at: 1,
            },
        );
        l.save(&p).unwrap();
        assert_eq!(ArtifactLock::load(&p).unwrap(), Some(l));
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(
            ArtifactLock::load(&p),
            Err(LockError::Parse { .. })
        ));
    }
}
