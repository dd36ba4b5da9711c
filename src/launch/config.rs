//! `launch --config FILE` plus flags plus the profile → one resolved [`LaunchSpec`].
//!
//! The file is YAML or JSON (JSON is read with serde_json when the name ends in `.json`, for
//! exact positions). The seed's JSON shape is accepted as is:
//!
//! ```json
//! { "firmware_path": "...", "rootfs_path": "...", "vcpu_count": 2, "mem_size_mib": 512,
//!   "network": { "bridge_name": "chvbr0", "guest_mac": "" } }
//! ```
//! plus `kernel_path`, `initramfs_path` and `cmdline`. Unknown keys are errors.
//!
//! Precedence, highest first: flags; `CHV_KERNEL_PATH` (an operator's explicit choice of kernel
//! beats a file's `firmware_path`, which is what makes the seed's own recipe work); the file;
//! the profile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::identity::{Identity, Mac};
use super::LaunchArgs;
use crate::Context;

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub firmware_path: Option<PathBuf>,
    #[serde(default)]
    pub kernel_path: Option<PathBuf>,
    #[serde(default)]
    pub initramfs_path: Option<PathBuf>,
    #[serde(default)]
    pub rootfs_path: Option<PathBuf>,
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    #[serde(default)]
    pub mem_size_mib: Option<u32>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub network: Option<NetworkSection>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    #[serde(default)]
    pub bridge_name: Option<String>,
    /// Empty means "derive from the job id".
    #[serde(default)]
    pub guest_mac: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {key}: {message}")]
    Parse {
        file: String,
        key: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(
            &text,
            &path.display().to_string(),
            path.extension().is_some_and(|e| e == "json"),
        )
    }

    pub fn parse(text: &str, file: &str, json: bool) -> Result<ConfigFile, ConfigError> {
        let err = |key: String, message: String| ConfigError::Parse {
            file: file.to_string(),
            key: if key.is_empty() { ".".into() } else { key },
            message,
        };
        if json {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                err(key, format!("{inner}"))
            })
        } else {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                err(key, inner.to_string())
            })
        }
    }
}

/// How the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    Kernel {
        kernel: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: String,
        /// Where the kernel path came from, for messages.
        source: &'static str,
    },
    Firmware {
        firmware: PathBuf,
        source: &'static str,
    },
}

impl Boot {
    pub fn describe(&self) -> String {
        match self {
            Boot::Kernel {
                kernel, initramfs, ..
            } => match initramfs {
                Some(i) => format!("kernel {} + initramfs {}", kernel.display(), i.display()),
                None => format!("kernel {}", kernel.display()),
            },
            Boot::Firmware { firmware, .. } => format!("firmware {}", firmware.display()),
        }
    }
}

/// Everything `launch` needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub identity: Identity,
    pub rootfs: PathBuf,
    pub boot: Boot,
    pub cpus: u8,
    pub memory_mib: u32,
    pub bridge: String,
    pub api_url: String,
    pub env: Vec<(String, String)>,
    pub timeout: Option<Duration>,
    pub grace: Duration,
    pub landlock_write_dirs: Vec<PathBuf>,
}

/// The device the env disk appears as (second virtio-blk disk).
pub const ENV_DEVICE: &str = "/dev/vdb";

/// `30`, `30s`, `500ms`, `5m`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration `{s}`: expected e.g. 30s, 500ms, 5m"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration `{s}`: unit `{unit}` (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=30.0 * 86400.0).contains(&secs) {
        return Err(format!("invalid duration `{s}`: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `512`, `512M`, `512MiB`, `2G`, `2GiB` → MiB.
pub fn parse_memory_mib(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split]
        .parse()
        .map_err(|_| format!("invalid memory size `{s}`: expected MiB, e.g. 512 or 2G"))?;
    let mib = match &t[split..] {
        "" | "M" | "MiB" | "m" => n,
        "G" | "GiB" | "g" => n.saturating_mul(1024),
        u => {
            return Err(format!(
                "invalid memory size `{s}`: unit `{u}` (use M or G)"
            ))
        }
    };
    u32::try_from(mib).map_err(|_| format!("invalid memory size `{s}`: too large"))
}

fn check_memory(mib: u32, what: &str) -> Result<u32, ConfigError> {
    if mib < 64 {
        return Err(ConfigError::Invalid(format!(
            "{what} `{mib}` MiB: below 64 MiB no Linux guest boots"
        )));
    }
    Ok(mib)
}

fn check_cpus(n: u8, what: &str) -> Result<u8, ConfigError> {
    if n == 0 || n > 254 {
        return Err(ConfigError::Invalid(format!(
            "{what} `{n}`: a VM has 1 to 254 vCPUs"
        )));
    }
    Ok(n)
}

/// Resolve the launch from flags, the config file and the profile.
pub fn resolve(ctx: &Context, a: &LaunchArgs, job_id: &str) -> Result<LaunchSpec, ConfigError> {
    let file = match &a.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let p = &ctx.profile;
    let net = file.network.clone().unwrap_or_default();

    let bridge = a
        .bridge
        .clone()
        .or(net.bridge_name.clone().filter(|b| !b.is_empty()))
        .unwrap_or_else(|| p.network.bridge.to_string());
    bridge
        .parse::<crate::profile::IfName>()
        .map_err(|e| ConfigError::Invalid(format!("bridge: {e}")))?;

    let mut identity = Identity::derive(job_id, p.network.prefix, p.network.gateway)
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let mac_override = a
        .mac
        .clone()
        .or(net.guest_mac.clone())
        .filter(|m| !m.trim().is_empty());
    if let Some(m) = mac_override {
        identity.mac = m
            .parse::<Mac>()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    }

    let rootfs = a
        .rootfs
        .clone()
        .or(file.rootfs_path.clone())
        .ok_or_else(|| {
            ConfigError::Invalid(
                "no root filesystem: pass --rootfs FILE or set rootfs_path in --config".into(),
            )
        })?;

    let cpus = match (a.cpus, file.vcpu_count) {
        (Some(n), _) => check_cpus(n, "--cpus")?,
        (None, Some(n)) => check_cpus(n, "vcpu_count")?,
        (None, None) => p.vm.vcpus,
    };
    let memory_mib = match (&a.memory, file.mem_size_mib) {
        (Some(m), _) => check_memory(
            parse_memory_mib(m).map_err(ConfigError::Invalid)?,
            "--memory",
        )?,
        (None, Some(m)) => check_memory(m, "mem_size_mib")?,
        (None, None) => p.vm.memory_mib,
    };

    let env_kernel = std::env::var_os("CHV_KERNEL_PATH")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let user_initramfs = a.initramfs.clone().or(file.initramfs_path.clone());
    let user_cmdline = a.cmdline.clone().or(file.cmdline.clone());
    // The kernel named, in precedence order; else the one `chvkit kernel` installed.
    let named: Option<(PathBuf, &'static str)> = if let Some(k) = &a.kernel {
        Some((k.clone(), "--kernel"))
    } else if a.firmware.is_some() {
        None
    } else if let Some(k) = env_kernel {
        Some((k, "CHV_KERNEL_PATH"))
    } else if let Some(k) = &file.kernel_path {
        if file.firmware_path.is_some() {
            return Err(ConfigError::Invalid(
                "the config sets both kernel_path and firmware_path: keep one".into(),
            ));
        }
        Some((k.clone(), "kernel_path in --config"))
    } else {
        None
    };
    let firmware = a.firmware.clone().map(|f| (f, "--firmware")).or_else(|| {
        file.firmware_path
            .clone()
            .filter(|_| named.is_none())
            .map(|f| (f, "firmware_path in --config"))
    });
    let boot = match (named, firmware) {
        (Some((kernel, source)), _) => kernel_boot(
            ctx,
            kernel,
            user_initramfs,
            "",
            user_cmdline.as_deref(),
            source,
        ),
        (None, Some((firmware, source))) => Boot::Firmware { firmware, source },
        (None, None) => installed_boot(ctx, user_initramfs, user_cmdline.as_deref())?,
    };
    if matches!(boot, Boot::Firmware { .. })
        && (a.initramfs.is_some() || file.initramfs_path.is_some() || user_cmdline.is_some())
    {
        return Err(ConfigError::Invalid(
            "initramfs and cmdline apply to direct kernel boot only, not to firmware boot".into(),
        ));
    }

    let api_url = a
        .api_url
        .clone()
        .unwrap_or_else(|| p.network.api_url.to_string());
    let mut env = checker_env(&identity, &api_url);
    for kv in &a.env {
        let (k, v) = crate::envfile::parse_pair(kv)
            .map_err(|e| ConfigError::Invalid(format!("--env: {e}")))?;
        if k.starts_with("CHECKER_") && env.iter().any(|(ek, _)| *ek == k) {
            return Err(ConfigError::Invalid(format!(
                "--env {k}: chvkit sets {k} itself (from the job id and profile)"
            )));
        }
        env.push((k, v));
    }

    let timeout = a
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(ConfigError::Invalid)?
        .filter(|d| !d.is_zero());
    let grace = parse_duration(&a.grace).map_err(ConfigError::Invalid)?;
    let mut landlock_write_dirs = Vec::new();
    for d in &a.snapshot_dir {
        landlock_write_dirs.push(
            std::path::absolute(d).map_err(|e| {
                ConfigError::Invalid(format!("--snapshot-dir {}: {e}", d.display()))
            })?,
        );
    }
    Ok(LaunchSpec {
        identity,
        rootfs,
        boot,
        cpus,
        memory_mib,
        bridge,
        api_url,
        env,
        timeout,
        grace,
        landlock_write_dirs,
    })
}

/// Direct kernel boot of `kernel`: the command line is composed once, in `kernel::cmdline`
/// (profile base, what the kernel needs, `init=/init` without an initramfs, what this host
/// kind needs, the user's additions); `vm_config` adds where /init finds checker.env.
fn kernel_boot(
    ctx: &Context,
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    kernel_needs: &str,
    user: Option<&str>,
    source: &'static str,
) -> Boot {
    use crate::kernel::cmdline;
    let line = cmdline::compose(&cmdline::Parts {
        base: &ctx.profile.vm.cmdline,
        kernel: kernel_needs,
        user,
        initramfs: initramfs.is_some(),
        host: cmdline::HostKind::detect(),
    });
    Boot::Kernel {
        kernel,
        initramfs,
        cmdline: line,
        source,
    }
}

/// No kernel named: the one `chvkit kernel` (or setup) installed, else the profile's
/// `kernel.path` as it is.
fn installed_boot(
    ctx: &Context,
    user_initramfs: Option<PathBuf>,
    user: Option<&str>,
) -> Result<Boot, ConfigError> {
    use crate::profile::KernelSource;
    let p = &ctx.profile;
    let source = p.kernel.source();
    if source != KernelSource::None {
        let rec = crate::kernel::installed::load(p, &ctx.root)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(rec) = rec {
            let initramfs = user_initramfs.or(rec.initramfs.as_ref().map(|i| ctx.root.path(i)));
            return Ok(kernel_boot(
                ctx,
                ctx.root.path(&rec.vmlinux),
                initramfs,
                &rec.cmdline,
                user,
                "the guest kernel `chvkit kernel` installed",
            ));
        }
    }
    if let Some(k) = &p.kernel.path {
        return Ok(kernel_boot(
            ctx,
            k.0.clone(),
            user_initramfs,
            "",
            user,
            "the profile's kernel.path",
        ));
    }
    Err(ConfigError::Invalid(match source {
        KernelSource::None => "no kernel: the profile's kernel.source is `none`; pass --kernel FILE, set CHV_KERNEL_PATH or kernel_path in --config".into(),
        s => format!(
            "no guest kernel installed: run `chvkit kernel` (the profile's kernel.source is `{}`) or `chvkit setup`, or pass --kernel FILE",
            s.as_str()
        ),
    }))
}

/// The variables chvkit always puts in the guest's `/etc/checker.env` (then `--env` pairs).
pub fn checker_env(identity: &Identity, api_url: &str) -> Vec<(String, String)> {
    vec![
        ("CHECKER_API_URL".to_string(), api_url.to_string()),
        ("CHECKER_JOB_ID".to_string(), identity.job_id.clone()),
        ("CHECKER_GUEST_IP".to_string(), identity.ip_cidr()),
        ("CHECKER_GATEWAY".to_string(), identity.gateway.to_string()),
    ]
}

/// Check that boot files exist (the VMM would only say so at `vm.boot`, and a missing file is
/// best named with where its path came from).
pub fn check_boot_files(boot: &Boot) -> Result<(), String> {
    let check = |p: &Path, what: &str, source: &str| -> Result<(), String> {
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(format!(
                "{what} {} (from {source}) is not a regular file",
                p.display()
            )),
            Err(e) => Err(format!("{what} {} (from {source}): {e}", p.display())),
        }
    };
    match boot {
        Boot::Kernel {
            kernel,
            initramfs,
            source,
            ..
        } => {
            check(kernel, "kernel", source)?;
            if let Some(i) = initramfs {
                check(i, "initramfs", "--initramfs/initramfs_path")?;
            }
            Ok(())
        }
        Boot::Firmware { firmware, source } => check(firmware, "firmware", source),
    }
}

/// Make boot paths absolute (the VMM's working directory is not ours to assume).
pub fn absolutize(boot: &mut Boot) -> std::io::Result<()> {
    match boot {
        Boot::Kernel {
            kernel, initramfs, ..
        } => {
            *kernel = std::path::absolute(&*kernel)?;
            if let Some(i) = initramfs {
                *i = std::path::absolute(&*i)?;
            }
        }
        Boot::Firmware { firmware, .. } => *firmware = std::path::absolute(&*firmware)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_json_shape_parses() {
        let seed = r#"{
            "firmware_path": "/opt/cloud-hypervisor/hypervisor-fw",
            "rootfs_path": "/path/to/rootfs.raw",
            "vcpu_count": 2,
            "mem_size_mib": 512,
            "network": { "bridge_name": "chvbr0" }
        }"#;
        let c = ConfigFile::parse(seed, "seed.json", true).unwrap();
        assert_eq!(c.vcpu_count, Some(2));
        assert_eq!(c.network.unwrap().bridge_name.as_deref(), Some("chvbr0"));
        // The same document read as YAML (JSON is YAML).
        assert_eq!(
            ConfigFile::parse(seed, "seed.yaml", false)
                .unwrap()
                .mem_size_mib,
            Some(512)
        );
    }

    #[test]
    fn unknown_and_bad_values_name_the_key() {
        let e = ConfigFile::parse(r#"{"vcpu_cnt": 2}"#, "c.json", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.json") && e.contains("vcpu_cnt"), "{e}");
        let e = ConfigFile::parse(
            "network:\n  bridge_name: 7\n  guest_mac: [1]\n",
            "c.yaml",
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("network.guest_mac"), "{e}");
        let e = ConfigFile::parse(r#"{"vcpu_count": 999}"#, "c.json", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vcpu_count") && e.contains("999"), "{e}");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("-1").is_err());
        assert_eq!(parse_memory_mib("512").unwrap(), 512);
        assert_eq!(parse_memory_mib("2G").unwrap(), 2048);
        assert_eq!(parse_memory_mib("256MiB").unwrap(), 256);
        assert!(parse_memory_mib("1T").unwrap_err().contains("1T"));
    }
}
