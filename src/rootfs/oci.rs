//! Getting an image: buildah builds, OCI layouts, archives, `umoci unpack`, and reading the
//! unpacked runtime config.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::proc;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("`{tool}` is not installed: {install}")]
    Missing {
        tool: &'static str,
        install: &'static str,
    },
    #[error("buildah could not build {context}:\n{message}")]
    Build { context: PathBuf, message: String },
    #[error("{what} failed ({status}):\n{message}")]
    Tool {
        what: String,
        status: String,
        message: String,
    },
    #[error("{0}")]
    Input(String),
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Interrupted(std::io::Error),
}

fn install_hint(tool: &str) -> &'static str {
    match tool {
        "buildah" => "apt-get install buildah",
        "umoci" => "apt-get install umoci",
        "skopeo" => "apt-get install skopeo",
        _ => "install it",
    }
}

fn tool_name(tool: &str) -> &'static str {
    match tool {
        "buildah" => "buildah",
        "umoci" => "umoci",
        "skopeo" => "skopeo",
        _ => "tool",
    }
}

fn run(
    tool: &str,
    what: String,
    cmd: &mut Command,
    on_line: impl Fn(&str) + Sync,
) -> Result<std::process::Output, OciError> {
    if proc::which(tool).is_none() {
        return Err(OciError::Missing {
            tool: tool_name(tool),
            install: install_hint(tool),
        });
    }
    let out = proc::output_lines(cmd, on_line).map_err(|e| match e.kind() {
        std::io::ErrorKind::Interrupted => OciError::Interrupted(e),
        std::io::ErrorKind::NotFound => OciError::Missing {
            tool: tool_name(tool),
            install: install_hint(tool),
        },
        _ => OciError::Tool {
            what: what.clone(),
            status: "not started".into(),
            message: e.to_string(),
        },
    })?;
    if !out.status.success() {
        return Err(OciError::Tool {
            what,
            status: out.status.to_string(),
            message: tail(&out.stderr, &out.stdout),
        });
    }
    Ok(out)
}

/// The last lines of a tool's output: where the error is.
fn tail(stderr: &[u8], stdout: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    let text = if s.trim().is_empty() {
        String::from_utf8_lossy(stdout).into_owned()
    } else {
        s.into_owned()
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// buildah's storage driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageDriver {
    /// What the local storage already uses (one storage cannot mix drivers); vfs when new.
    Auto,
    Vfs,
    Overlay,
}

impl StorageDriver {
    pub fn resolve(self) -> &'static str {
        match self {
            StorageDriver::Vfs => "vfs",
            StorageDriver::Overlay => "overlay",
            StorageDriver::Auto => {
                // vfs works everywhere (facts §4); overlay only if the storage was set up with it.
                let root = Path::new("/var/lib/containers/storage");
                if root.join("overlay-images").is_dir() && !root.join("vfs-images").is_dir() {
                    "overlay"
                } else {
                    "vfs"
                }
            }
        }
    }
}

/// `--pull` policy, buildah's spelling on the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Pull base images only when they are not in local storage.
    Missing,
    /// Never pull: offline builds.
    Never,
    Always,
    /// Pull when the registry has a newer one.
    Newer,
}

impl PullPolicy {
    fn buildah(self) -> &'static str {
        match self {
            PullPolicy::Missing => "--pull=false",
            PullPolicy::Never => "--pull=never",
            PullPolicy::Always => "--pull=always",
            PullPolicy::Newer => "--pull=true",
        }
    }
}

pub struct BuildOpts<'a> {
    pub context: &'a Path,
    pub dockerfile: Option<&'a Path>,
    pub build_args: &'a [String],
    pub pull: PullPolicy,
    pub driver: &'static str,
    pub no_cache: bool,
    pub epoch: Option<i64>,
    pub iidfile: &'a Path,
}

/// `buildah bud`, chroot isolation (no OCI runtime needed). Returns the image ID.
pub fn build(o: &BuildOpts, on_line: impl Fn(&str) + Sync) -> Result<String, OciError> {
    let mut cmd = Command::new("buildah");
    cmd.args(["--storage-driver", o.driver, "bud", "--isolation", "chroot"])
        .arg(o.pull.buildah())
        .arg("--layers")
        .arg("--iidfile")
        .arg(o.iidfile);
    if o.no_cache {
        cmd.arg("--no-cache");
    }
    if let Some(t) = o.epoch {
        cmd.arg("--timestamp").arg(t.to_string());
    }
    if let Some(f) = o.dockerfile {
        cmd.arg("-f").arg(f);
    }
    for a in o.build_args {
        cmd.arg("--build-arg").arg(a);
    }
    cmd.arg(o.context);
    match run("buildah", "buildah bud".into(), &mut cmd, on_line) {
        Ok(_) => {}
        Err(OciError::Tool { message, .. }) => {
            return Err(OciError::Build {
                context: o.context.to_path_buf(),
                message,
            })
        }
        Err(e) => return Err(e),
    }
    let id = std::fs::read_to_string(o.iidfile).map_err(|e| OciError::Parse {
        path: o.iidfile.to_path_buf(),
        message: format!("buildah wrote no image ID: {e}"),
    })?;
    Ok(id.trim().to_string())
}

/// `buildah push IMAGE oci:DIR:TAG`.
pub fn push(image: &str, driver: &str, layout: &Path, tag: &str) -> Result<(), OciError> {
    let dest = format!("oci:{}:{tag}", layout.display());
    let mut cmd = Command::new("buildah");
    cmd.args(["--storage-driver", driver, "push", "--quiet", image, &dest]);
    run("buildah", format!("buildah push {image}"), &mut cmd, |_| {})?;
    Ok(())
}

/// The image ID of a local image (`buildah inspect`), or `None` if storage has no such image.
pub fn local_image_id(reference: &str, driver: &str) -> Result<Option<String>, OciError> {
    let mut cmd = Command::new("buildah");
    cmd.args([
        "--storage-driver",
        driver,
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.FromImageID}}",
        reference,
    ]);
    match run(
        "buildah",
        format!("buildah inspect {reference}"),
        &mut cmd,
        |_| {},
    ) {
        Ok(out) => {
            let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((!id.is_empty()).then(|| format!("sha256:{}", id.trim_start_matches("sha256:"))))
        }
        Err(OciError::Tool { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Copy an image archive (oci-archive or docker-archive) into an OCI layout with skopeo.
pub fn import_archive(archive: &Path, layout: &Path, tag: &str) -> Result<(), OciError> {
    let dest = format!("oci:{}:{tag}", layout.display());
    let mut last = None;
    for transport in ["oci-archive", "docker-archive"] {
        let src = format!("{transport}:{}", archive.display());
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", &src, &dest]);
        match run("skopeo", format!("skopeo copy {src}"), &mut cmd, |_| {}) {
            Ok(_) => return Ok(()),
            Err(e @ OciError::Tool { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last
        .unwrap_or_else(|| OciError::Input(format!("{}: not an image archive", archive.display()))))
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// The manifest digest that `tag` names in the OCI layout at `layout`.
pub fn layout_digest(layout: &Path, tag: &str) -> Result<String, OciError> {
    let p = layout.join("index.json");
    let text = std::fs::read_to_string(&p).map_err(|e| OciError::Parse {
        path: p.clone(),
        message: format!("not an OCI layout: {e}"),
    })?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| OciError::Parse {
        path: p.clone(),
        message: e.to_string(),
    })?;
    let tags: Vec<&str> = idx
        .manifests
        .iter()
        .filter_map(|m| m.annotations.get("org.opencontainers.image.ref.name"))
        .map(String::as_str)
        .collect();
    idx.manifests
        .iter()
        .find(|m| {
            m.annotations
                .get("org.opencontainers.image.ref.name")
                .is_some_and(|t| t == tag)
        })
        .map(|m| m.digest.clone())
        .ok_or_else(|| OciError::Parse {
            path: p,
            message: format!("no image tagged `{tag}` (tags: {})", tags.join(", ")),
        })
}

/// `umoci unpack` as root (rootless unpacking would store owners in xattrs, facts §4).
pub fn unpack(layout: &Path, tag: &str, bundle: &Path) -> Result<(), OciError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(OciError::Input(
            "umoci unpack must run as root so files keep their owners (rootless unpacking stores them in xattrs): run chvkit rootfs as root".into(),
        ));
    }
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle);
    run("umoci", "umoci unpack".into(), &mut cmd, |_| {})?;
    Ok(())
}

#[derive(Deserialize)]
struct RuntimeConfig {
    process: Option<Process>,
}

#[derive(Deserialize)]
struct Process {
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cwd: Option<String>,
    user: Option<User>,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
}

/// What umoci's `config.json` says about the workload (user name resolved by the caller).
pub fn read_runtime_config(bundle: &Path) -> Result<super::init::Workload, OciError> {
    let p = bundle.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| OciError::Parse {
        path: p.clone(),
        message: e.to_string(),
    })?;
    let cfg: RuntimeConfig = serde_json::from_str(&text).map_err(|e| OciError::Parse {
        path: p.clone(),
        message: e.to_string(),
    })?;
    let proc = cfg.process.ok_or_else(|| OciError::Parse {
        path: p,
        message: "no `process` section".into(),
    })?;
    let (uid, gid) = proc.user.map(|u| (u.uid, u.gid)).unwrap_or((0, 0));
    Ok(super::init::Workload {
        args: proc.args,
        // umoci adds TERM=xterm for a terminal; the guest's console is a serial line.
        env: proc.env.into_iter().filter(|e| e != "TERM=xterm").collect(),
        cwd: proc
            .cwd
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "/".into()),
        uid,
        gid,
        user_name: None,
    })
}
