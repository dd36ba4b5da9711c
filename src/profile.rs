//! The host profile: a YAML description of "the host as it should be".
//!
//! Doctor judges the host against it, setup converges the host to it, launch takes its defaults
//! from it. Parsing is strict: unknown keys and invalid values are errors that name the file,
//! the line and column, the key path and the offending value.
//!
//! YAML is parsed with `serde_yaml_ng`, the maintained fork of the deprecated `serde_yaml`: it
//! keeps serde_yaml's data model and its error positions (line and column on every error, also
//! for errors raised by our own validating types below), which `deny_unknown_fields` needs.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// The embedded default profile (`profiles/default.yaml`).
pub const DEFAULT_PROFILE_YAML: &str = include_str!("../profiles/default.yaml");
/// The name used for the embedded profile in messages.
pub const DEFAULT_PROFILE_NAME: &str = "<embedded profiles/default.yaml>";

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {key}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        /// Dotted key path, e.g. `network.prefix` (`.` for the document root).
        key: String,
        message: String,
    },
    #[error("{file}: {key}: {message}")]
    Semantic {
        file: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub cloud_hypervisor: CloudHypervisor,
    pub firmware: Firmware,
    #[serde(default)]
    pub kernel: Kernel,
    pub network: Network,
    pub vm: VmDefaults,
    pub paths: Paths,
    /// How launch confines each job's VMM (`chvkit launch --jail`). Absent: the defaults.
    #[serde(default)]
    pub launch: LaunchLimits,
}

/// The per-job jail: an unprivileged uid/gid of the job's own and a cgroup around the VMM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchLimits {
    /// `[first, last]` uids (and the same gids) handed to jobs' VMMs, one per live job. No
    /// passwd entries are needed.
    pub uid_range: [u32; 2],
    /// Memory the VMM itself may use above the guest's memory (cgroup memory limit = guest
    /// memory + this).
    pub vmm_overhead_mib: u32,
    /// Most tasks (processes and threads) in the job's cgroup.
    pub pids_max: u32,
    /// CPU weight (cgroup v2 `cpu.weight`, 1-10000, 100 is the default; v1 `cpu.shares` =
    /// weight * 1024 / 100).
    pub cpu_weight: u32,
}

impl Default for LaunchLimits {
    fn default() -> Self {
        LaunchLimits {
            uid_range: [200_000, 265_535],
            vmm_overhead_mib: 64,
            pids_max: 256,
            cpu_weight: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CloudHypervisor {
    /// Release tag, e.g. `v50.0`.
    pub version: Version,
    pub url: HttpUrl,
    /// Pinned sha256 of the binary; `None` means "record on first install in the lock file".
    #[serde(default)]
    pub sha256: Option<Sha256Hex>,
    pub install_path: AbsPath,
    #[serde(default)]
    pub setcap_net_admin: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Firmware {
    pub version: String,
    pub url: HttpUrl,
    #[serde(default)]
    pub sha256: Option<Sha256Hex>,
    pub path: AbsPath,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// Where the guest kernel comes from. Absent: `path` when `path` is set, else `build`.
    #[serde(default)]
    pub source: Option<KernelSource>,
    /// The kernel file for `source: path` (a PVH vmlinux or a bzImage).
    #[serde(default)]
    pub path: Option<AbsPath>,
}

/// Where `chvkit kernel` (and setup) gets the guest kernel.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KernelSource {
    /// chvkit's own recipe (`guest/kernel/`) over the distribution's kernel source package:
    /// runs on hardware KVM and on PVM hosts.
    Build,
    /// The host's installed distribution kernel plus a generated initramfs for its modules.
    Distro,
    /// A file the user gives in `kernel.path`.
    Path,
    /// chvkit provides no guest kernel: every launch names one (`--kernel`, `CHV_KERNEL_PATH`).
    None,
}

impl KernelSource {
    pub fn as_str(self) -> &'static str {
        match self {
            KernelSource::Build => "build",
            KernelSource::Distro => "distro",
            KernelSource::Path => "path",
            KernelSource::None => "none",
        }
    }
}

impl Kernel {
    /// The source in force (see [`Kernel::source`]).
    pub fn source(&self) -> KernelSource {
        match (self.source, &self.path) {
            (Some(s), _) => s,
            (None, Some(_)) => KernelSource::Path,
            (None, None) => KernelSource::Build,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FirewallBackend {
    Nftables,
    Iptables,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub bridge: IfName,
    pub gateway: Ipv6Addr,
    pub prefix: Ipv6Net,
    pub nat: bool,
    pub firewall: FirewallBackend,
    pub nft_table: NftName,
    #[serde(default)]
    pub host_ports: Vec<u16>,
    pub api_url: HttpUrl,
    pub nameserver: Ipv6Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmDefaults {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub cmdline: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Paths {
    pub state_dir: AbsPath,
    pub runtime_dir: AbsPath,
    pub sysctl_file: AbsPath,
    pub nft_file: AbsPath,
    pub unit_file: AbsPath,
}

impl Profile {
    /// The embedded default profile. It is validated by a unit test, so this cannot fail in a
    /// released binary; the `Result` keeps the signature honest anyway.
    pub fn embedded() -> Result<Profile, ProfileError> {
        Profile::from_yaml_str(DEFAULT_PROFILE_YAML, DEFAULT_PROFILE_NAME)
    }

    /// Load `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Profile, ProfileError> {
        match path {
            None => Profile::embedded(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ProfileError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Profile::from_yaml_str(&text, &p.display().to_string())
            }
        }
    }

    pub fn from_yaml_str(text: &str, file: &str) -> Result<Profile, ProfileError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let profile: Profile = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            // serde_yaml_ng places errors raised while checking a value at the start of the
            // enclosing mapping; the key path finds the value's own line more precisely.
            let (line, column) = locate_key(text, &key)
                .or_else(|| inner.location().map(|l| (l.line(), l.column())))
                .unwrap_or((0, 0));
            ProfileError::Invalid {
                file: file.to_string(),
                line,
                column,
                message: strip_location(&inner.to_string(), &key),
                key,
            }
        })?;
        profile.validate(file)?;
        Ok(profile)
    }

    /// Cross-field rules that no single value can check on its own.
    fn validate(&self, file: &str) -> Result<(), ProfileError> {
        let sem = |key: &str, message: String| ProfileError::Semantic {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        if !self.network.prefix.contains(self.network.gateway) {
            return Err(sem(
                "network.gateway",
                format!(
                    "gateway `{}` is not inside network.prefix `{}`",
                    self.network.gateway, self.network.prefix
                ),
            ));
        }
        if self.kernel.source == Some(KernelSource::Path) && self.kernel.path.is_none() {
            return Err(sem(
                "kernel.path",
                "kernel.source is `path` but kernel.path is not set: name the vmlinux or bzImage"
                    .into(),
            ));
        }
        if self.vm.vcpus == 0 {
            return Err(sem("vm.vcpus", "`0`: a VM needs at least one vCPU".into()));
        }
        let [first, last] = self.launch.uid_range;
        if first == 0 || first > last {
            return Err(sem(
                "launch.uid_range",
                format!("`[{first}, {last}]`: needs 0 < first <= last (uid 0 is root)"),
            ));
        }
        if last >= u32::MAX - 1 {
            return Err(sem(
                "launch.uid_range",
                format!("`{last}`: (u32)-1 and -2 are not usable ids"),
            ));
        }
        if !(1..=10_000).contains(&self.launch.cpu_weight) {
            return Err(sem(
                "launch.cpu_weight",
                format!("`{}`: must be 1-10000", self.launch.cpu_weight),
            ));
        }
        if self.launch.pids_max < 16 {
            return Err(sem(
                "launch.pids_max",
                format!(
                    "`{}`: the VMM alone runs a dozen threads",
                    self.launch.pids_max
                ),
            ));
        }
        if self.vm.memory_mib < 64 {
            return Err(sem(
                "vm.memory_mib",
                format!(
                    "`{}`: below 64 MiB no Linux guest boots",
                    self.vm.memory_mib
                ),
            ));
        }
        Ok(())
    }

    /// The guest kernel: `CHV_KERNEL_PATH` wins over the profile.
    pub fn kernel_path(&self) -> Option<PathBuf> {
        match std::env::var_os("CHV_KERNEL_PATH") {
            Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
            _ => self.kernel.path.as_ref().map(|p| p.0.clone()),
        }
    }
}

/// serde_yaml_ng decorates messages with the parent key path ("network: ...") and the
/// position (" at line L column C"); we print both ourselves.
fn strip_location(msg: &str, key: &str) -> String {
    let mut m = match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(" column ") => &msg[..i],
        _ => msg,
    };
    if let Some((parent, _)) = key.rsplit_once('.') {
        if let Some(rest) = m.strip_prefix(parent).and_then(|r| r.strip_prefix(": ")) {
            m = rest;
        }
    }
    m.to_string()
}

/// Find the line and column of the value at a dotted key path (`network.prefix`) in a block-style
/// YAML document. Sequence indices (`host_ports[1]`) resolve to their key's line.
fn locate_key(text: &str, key: &str) -> Option<(usize, usize)> {
    let segments: Vec<&str> = key
        .split('.')
        .map(|s| s.split('[').next().unwrap_or(s))
        .filter(|s| !s.is_empty() && *s != "?")
        .collect();
    if segments.is_empty() {
        return None;
    }
    let mut depth = 0;
    let mut min_indent = 0usize;
    let mut found = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or(raw);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if depth > 0 && indent < min_indent {
            // Left the mapping we were searching in without finding the next segment.
            return found;
        }
        let want = segments[depth];
        let is_key = trimmed
            .strip_prefix(want)
            .is_some_and(|r| r.trim_start().starts_with(':'));
        if is_key && indent >= min_indent {
            let after = &trimmed[want.len()..];
            let colon = after.find(':').unwrap_or(0);
            let value_off = after[colon + 1..].len() - after[colon + 1..].trim_start().len();
            let col = indent + want.len() + colon + 1 + value_off + 1;
            found = Some((n + 1, col));
            depth += 1;
            min_indent = indent + 1;
            if depth == segments.len() {
                return found;
            }
        }
    }
    found.filter(|_| depth == segments.len())
}

macro_rules! string_newtype {
    ($name:ident, $parse:expr) => {
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                #[allow(clippy::redundant_closure_call)]
                ($parse)(s)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

/// An IPv6 prefix such as `fdcd::/16`; host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Net {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Ipv6Net {
    pub fn contains(&self, a: Ipv6Addr) -> bool {
        let mask = prefix_mask(self.len);
        u128::from(a) & mask == u128::from(self.addr) & mask
    }
}

pub fn prefix_mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

string_newtype!(Ipv6Net, |s: &str| {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| format!("invalid IPv6 prefix `{s}`: expected ADDRESS/LENGTH"))?;
    let addr: Ipv6Addr = a
        .parse()
        .map_err(|_| format!("invalid IPv6 prefix `{s}`: `{a}` is not an IPv6 address"))?;
    let len: u8 = l
        .parse()
        .ok()
        .filter(|n| *n <= 128)
        .ok_or_else(|| format!("invalid IPv6 prefix `{s}`: length `{l}` is not 0..=128"))?;
    if u128::from(addr) & !prefix_mask(len) != 0 {
        return Err(format!(
            "invalid IPv6 prefix `{s}`: host bits are set (did you mean `{}/{len}`?)",
            Ipv6Addr::from(u128::from(addr) & prefix_mask(len))
        ));
    }
    Ok(Ipv6Net { addr, len })
});

/// A Linux interface name: 1..=15 bytes, no `/`, whitespace, `:` or NUL (IFNAMSIZ is 16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfName(pub String);

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl IfName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

string_newtype!(IfName, |s: &str| {
    if s.is_empty() || s.len() > 15 {
        return Err(format!(
            "invalid interface name `{s}`: {} bytes, Linux allows 1 to 15",
            s.len()
        ));
    }
    if s == "." || s == ".." {
        return Err(format!("invalid interface name `{s}`"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "invalid interface name `{s}`: character {c:?} is not allowed"
        ));
    }
    Ok(IfName(s.to_string()))
});

/// An nftables table name (letters, digits, `_`, starting with a letter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftName(pub String);

impl fmt::Display for NftName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype!(NftName, |s: &str| {
    let ok = s.len() <= 64
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(NftName(s.to_string()))
    } else {
        Err(format!(
            "invalid nftables table name `{s}`: use letters, digits and `_`, starting with a letter"
        ))
    }
});

/// A lowercase hex sha256 digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Hex(pub String);

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype!(Sha256Hex, |s: &str| {
    if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(Sha256Hex(s.to_ascii_lowercase()))
    } else {
        Err(format!(
            "invalid sha256 `{s}`: expected 64 hexadecimal characters"
        ))
    }
});

/// An `http://` or `https://` URL (kept as text; reqwest parses it again when used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub String);

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl HttpUrl {
    /// The last path segment, e.g. `cloud-hypervisor-static`.
    pub fn file_name(&self) -> &str {
        let path = self.0.split(['?', '#']).next().unwrap_or("");
        path.rsplit('/').next().unwrap_or("")
    }

    /// The port, explicit or implied by the scheme.
    pub fn port(&self) -> u16 {
        let (scheme, rest) = self.0.split_once("://").unwrap_or(("http", &self.0));
        let authority = rest.split('/').next().unwrap_or("");
        let host_port = authority.rsplit('@').next().unwrap_or(authority);
        let port = match host_port.rfind(']') {
            Some(i) => host_port[i + 1..].strip_prefix(':'),
            None => host_port.rsplit_once(':').map(|(_, p)| p),
        };
        port.and_then(|p| p.parse().ok())
            .unwrap_or(if scheme == "https" { 443 } else { 80 })
    }
}

string_newtype!(HttpUrl, |s: &str| {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !s.chars().any(char::is_whitespace) => {
            Ok(HttpUrl(s.to_string()))
        }
        _ => Err(format!(
            "invalid URL `{s}`: expected http://HOST/... or https://HOST/..."
        )),
    }
});

/// A release tag like `v50.0` or `v50.0.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.patch == 0 {
            write!(f, "v{}.{}", self.major, self.minor)
        } else {
            write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
        }
    }
}

impl Version {
    /// Parse the first version-looking word of e.g. `cloud-hypervisor v50.0.0` or `v50.0-dirty`.
    pub fn find_in(text: &str) -> Option<Version> {
        text.split_whitespace().find_map(|w| {
            let w = w.trim_start_matches('v');
            let core: String = w
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            core.parse().ok()
        })
    }
}

string_newtype!(Version, |s: &str| {
    let t = s.strip_prefix('v').unwrap_or(s);
    let parts: Vec<&str> = t.split('.').collect();
    let nums: Option<Vec<u32>> = parts.iter().map(|p| p.parse().ok()).collect();
    match nums.as_deref() {
        Some([a, b]) => Ok(Version {
            major: *a,
            minor: *b,
            patch: 0,
        }),
        Some([a, b, c]) => Ok(Version {
            major: *a,
            minor: *b,
            patch: *c,
        }),
        _ => Err(format!(
            "invalid version `{s}`: expected vMAJOR.MINOR or vMAJOR.MINOR.PATCH"
        )),
    }
});

/// An absolute path (the `--root` prefix is applied later, by `paths::Root`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsPath(pub PathBuf);

impl AbsPath {
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl fmt::Display for AbsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())
    }
}

string_newtype!(AbsPath, |s: &str| {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!("invalid path `{s}`: must be absolute"));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("invalid path `{s}`: `..` is not allowed"));
    }
    Ok(AbsPath(p.to_path_buf()))
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_profile_is_valid() {
        let p = Profile::embedded().expect("embedded profile parses");
        assert_eq!(p.network.bridge.as_str(), "chvbr0");
        assert_eq!(p.network.prefix.to_string(), "fdcd::/16");
        assert_eq!(p.cloud_hypervisor.version.to_string(), "v50.0");
        assert_eq!(p.firmware.url.file_name(), "hypervisor-fw");
        assert_eq!(p.network.api_url.port(), 8080);
        assert_eq!(p.vm.vcpus, 2);
        assert_eq!(p.vm.memory_mib, 512);
    }

    #[test]
    fn shipped_v50_2_profile_is_valid() {
        let text = include_str!("../profiles/v50.2.yaml");
        let p = Profile::from_yaml_str(text, "v50.2.yaml").expect("parses");
        assert_eq!(p.cloud_hypervisor.version.to_string(), "v50.2");
    }

    fn err_of(yaml: &str) -> ProfileError {
        Profile::from_yaml_str(yaml, "t.yaml").expect_err("must fail")
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let y = DEFAULT_PROFILE_YAML.replace("  nat: true\n", "  nat: true\n  natt: false\n");
        let e = err_of(&y).to_string();
        assert!(e.starts_with("t.yaml:"), "{e}");
        assert!(e.contains("natt"), "{e}");
        let line = y.lines().position(|l| l.contains("natt")).unwrap() + 1;
        assert!(e.contains(&format!(":{line}:")), "{e} (want line {line})");
    }

    #[test]
    fn bad_prefix_names_value_and_line() {
        let y = DEFAULT_PROFILE_YAML.replace("prefix: fdcd::/16", "prefix: fdcd::/129");
        match err_of(&y) {
            ProfileError::Invalid {
                line, key, message, ..
            } => {
                let want = y.lines().position(|l| l.contains("fdcd::/129")).unwrap() + 1;
                assert_eq!(line, want);
                assert_eq!(key, "network.prefix");
                assert!(message.contains("fdcd::/129"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn long_bridge_name_rejected() {
        let y = DEFAULT_PROFILE_YAML.replace("bridge: chvbr0", "bridge: averyverylongbridge0");
        let e = err_of(&y).to_string();
        assert!(
            e.contains("averyverylongbridge0") && e.contains("15"),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        match err_of("network: [unclosed\n") {
            ProfileError::Invalid { line, .. } => assert!(line >= 1),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn gateway_outside_prefix_rejected() {
        let y = DEFAULT_PROFILE_YAML.replace("gateway: fdcd::1", "gateway: fd00::1");
        assert!(err_of(&y).to_string().contains("fd00::1"));
    }

    #[test]
    fn versions() {
        assert_eq!(
            Version::find_in("cloud-hypervisor v50.0.0").unwrap(),
            "v50.0".parse::<Version>().unwrap()
        );
        assert_eq!(
            Version::find_in("cloud-hypervisor v50.0-dirty")
                .unwrap()
                .to_string(),
            "v50.0"
        );
    }

    #[test]
    fn url_port() {
        let u: HttpUrl = "http://[fdcd::1]:8080/x".parse().unwrap();
        assert_eq!(u.port(), 8080);
        let u: HttpUrl = "https://example.org/a/b".parse().unwrap();
        assert_eq!(u.port(), 443);
        assert_eq!(u.file_name(), "b");
    }
}
