//! chv-standin: a stand-in for the Cloud Hypervisor v50.0 VMM.
//!
//! It serves the same REST API on a Unix socket, with the same status codes, error chains,
//! state machine, event-monitor format and socket rules as the real v50.0 binary (modelled on
//! its source and checked against a real build by `tests/cloud_hypervisor_api.rs`). It runs no
//! guest code: a small simulated "guest" writes boot lines to the serial device and obeys a few
//! stand-in-only kernel command-line hooks (`standin.exit=N`, `standin.reboot`,
//! `standin.panic`, `standin.delay=MS`). Host resources are real: TAPs are opened through
//! `/dev/net/tun` exactly as the VMM opens them, disks are opened and OFD-locked, serial files
//! are created and truncated at the same moments.
//!
//! What it reproduces and where it differs: `docs/standin.md`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const BUILD_VERSION: &str = "v50.0.0";
const PKG_VERSION: &str = "50.0.0";
const FEATURES: [&str; 2] = ["io_uring", "kvm"];

/// An error as the VMM reports it: its messages, outermost first (without the HTTP layer's
/// "Error from API", which the HTTP layer adds).
type Chain = Vec<String>;

fn chain(parts: &[&str]) -> Chain {
    parts.iter().map(|s| s.to_string()).collect()
}

fn with(mut c: Chain, tail: impl Into<String>) -> Chain {
    c.push(tail.into());
    c
}

fn prefixed(prefix: &[&str], rest: Chain) -> Chain {
    let mut c = chain(prefix);
    c.extend(rest);
    c
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Logging in the real VMM's format (default level: warnings and errors, on stderr).

static START: OnceLock<Instant> = OnceLock::new();
static LOG: OnceLock<Mutex<Box<dyn Write + Send>>> = OnceLock::new();

fn log(level: &str, thread: &str, location: &str, msg: &str) {
    let t = START
        .get()
        .map(|s| s.elapsed().as_secs_f32())
        .unwrap_or(0.0);
    let line = format!("cloud-hypervisor: {t:>10.6}s: <{thread}> {level}:{location} -- {msg}\r\n");
    match LOG.get() {
        Some(out) => {
            let _ = lock(out).write_all(line.as_bytes());
        }
        None => {
            let _ = io::stderr().write_all(line.as_bytes());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// VmConfig, field for field as v50.0 serialises it (x86_64, default features io_uring+kvm), so
// that `vm.info` echoes the same JSON and bad input yields the same serde_json messages.

mod cfg {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MacAddr(pub [u8; 6]);

    impl MacAddr {
        pub fn parse_str(s: &str) -> Result<MacAddr, String> {
            let parts: Vec<&str> = s.split(':').collect();
            let common = format!("parsing of {s} into a MAC address failed");
            if parts.len() != 6 {
                return Err(common);
            }
            let mut bytes = [0u8; 6];
            for (b, p) in bytes.iter_mut().zip(parts.iter()) {
                if p.len() != 2 {
                    return Err(common);
                }
                *b = u8::from_str_radix(p, 16)
                    .map_err(|e| format!("parsing of {s} into a MAC address failed: {e}"))?;
            }
            Ok(MacAddr(bytes))
        }

        pub fn local_random() -> MacAddr {
            let mut b = random_bytes::<6>();
            b[0] = 0x2e;
            MacAddr(b)
        }
    }

    impl std::fmt::Display for MacAddr {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let b = &self.0;
            write!(
                f,
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                b[0], b[1], b[2], b[3], b[4], b[5]
            )
        }
    }

    impl Serialize for MacAddr {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.to_string().serialize(s)
        }
    }

    impl<'de> Deserialize<'de> for MacAddr {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
            let s = String::deserialize(d)?;
            MacAddr::parse_str(&s).map_err(|e| {
                serde::de::Error::custom(format!("The provided MAC address is invalid: {e}"))
            })
        }
    }

    fn d_true() -> bool {
        true
    }
    fn d_phys_bits() -> u8 {
        46
    }
    fn d_one_u16() -> u16 {
        1
    }
    fn d_iommu_width() -> u8 {
        64
    }
    fn d_weight() -> u32 {
        1
    }
    fn d_disk_queues() -> usize {
        1
    }
    fn d_disk_qsize() -> u16 {
        128
    }
    fn d_net_queues() -> usize {
        2
    }
    fn d_net_qsize() -> u16 {
        256
    }
    fn d_mac() -> MacAddr {
        MacAddr::local_random()
    }
    fn d_none<T>() -> Option<T> {
        None
    }
    fn d_fs_queues() -> usize {
        1
    }
    fn d_fs_qsize() -> u16 {
        1024
    }
    fn d_vdpa_queues() -> usize {
        1
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct CpuAffinity {
        pub vcpu: u32,
        pub host_cpus: Vec<usize>,
    }

    #[derive(Clone, Debug, Default, Deserialize, Serialize)]
    pub struct CpuFeatures {
        #[serde(default)]
        pub amx: bool,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct CpuTopology {
        pub threads_per_core: u16,
        pub cores_per_die: u16,
        pub dies_per_package: u16,
        pub packages: u16,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct CpusConfig {
        pub boot_vcpus: u32,
        pub max_vcpus: u32,
        #[serde(default)]
        pub topology: Option<CpuTopology>,
        #[serde(default)]
        pub kvm_hyperv: bool,
        #[serde(default = "d_phys_bits")]
        pub max_phys_bits: u8,
        #[serde(default)]
        pub affinity: Option<Vec<CpuAffinity>>,
        #[serde(default)]
        pub features: CpuFeatures,
        #[serde(default = "d_true")]
        pub nested: bool,
    }

    impl Default for CpusConfig {
        fn default() -> Self {
            CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
                topology: None,
                kvm_hyperv: false,
                max_phys_bits: 46,
                affinity: None,
                features: CpuFeatures::default(),
                nested: true,
            }
        }
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct PlatformConfig {
        #[serde(default = "d_one_u16")]
        pub num_pci_segments: u16,
        #[serde(default)]
        pub iommu_segments: Option<Vec<u16>>,
        #[serde(default = "d_iommu_width")]
        pub iommu_address_width_bits: u8,
        #[serde(default)]
        pub serial_number: Option<String>,
        #[serde(default)]
        pub uuid: Option<String>,
        #[serde(default)]
        pub oem_strings: Option<Vec<String>>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct PciSegmentConfig {
        #[serde(default)]
        pub pci_segment: u16,
        #[serde(default = "d_weight")]
        pub mmio32_aperture_weight: u32,
        #[serde(default = "d_weight")]
        pub mmio64_aperture_weight: u32,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct MemoryZoneConfig {
        pub id: String,
        pub size: u64,
        #[serde(default)]
        pub file: Option<PathBuf>,
        #[serde(default)]
        pub shared: bool,
        #[serde(default)]
        pub hugepages: bool,
        #[serde(default)]
        pub hugepage_size: Option<u64>,
        #[serde(default)]
        pub host_numa_node: Option<u32>,
        #[serde(default)]
        pub hotplug_size: Option<u64>,
        #[serde(default)]
        pub hotplugged_size: Option<u64>,
        #[serde(default)]
        pub prefault: bool,
    }

    #[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
    pub enum HotplugMethod {
        #[default]
        Acpi,
        VirtioMem,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct MemoryConfig {
        pub size: u64,
        #[serde(default)]
        pub mergeable: bool,
        #[serde(default)]
        pub hotplug_method: HotplugMethod,
        #[serde(default)]
        pub hotplug_size: Option<u64>,
        #[serde(default)]
        pub hotplugged_size: Option<u64>,
        #[serde(default)]
        pub shared: bool,
        #[serde(default)]
        pub hugepages: bool,
        #[serde(default)]
        pub hugepage_size: Option<u64>,
        #[serde(default)]
        pub prefault: bool,
        #[serde(default)]
        pub zones: Option<Vec<MemoryZoneConfig>>,
        #[serde(default = "d_true")]
        pub thp: bool,
    }

    impl Default for MemoryConfig {
        fn default() -> Self {
            MemoryConfig {
                size: 512 << 20,
                mergeable: false,
                hotplug_method: HotplugMethod::Acpi,
                hotplug_size: None,
                hotplugged_size: None,
                shared: false,
                hugepages: false,
                hugepage_size: None,
                prefault: false,
                zones: None,
                thp: true,
            }
        }
    }

    impl MemoryConfig {
        pub fn total_size(&self) -> u64 {
            let mut size = self.size + self.hotplugged_size.unwrap_or(0);
            for z in self.zones.iter().flatten() {
                size += z.size + z.hotplugged_size.unwrap_or(0);
            }
            size
        }
    }

    #[derive(Clone, Debug, Default, Deserialize, Serialize)]
    pub enum VhostMode {
        #[default]
        Client,
        Server,
    }

    #[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
    pub struct TokenBucketConfig {
        pub size: u64,
        pub one_time_burst: Option<u64>,
        pub refill_time: u64,
    }

    #[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct RateLimiterConfig {
        pub bandwidth: Option<TokenBucketConfig>,
        pub ops: Option<TokenBucketConfig>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct RateLimiterGroupConfig {
        #[serde(default)]
        pub id: String,
        #[serde(default)]
        pub rate_limiter_config: RateLimiterConfig,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VirtQueueAffinity {
        pub queue_index: u16,
        pub host_cpus: Vec<usize>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct DiskConfig {
        pub path: Option<PathBuf>,
        #[serde(default)]
        pub readonly: bool,
        #[serde(default)]
        pub direct: bool,
        #[serde(default)]
        pub iommu: bool,
        #[serde(default = "d_disk_queues")]
        pub num_queues: usize,
        #[serde(default = "d_disk_qsize")]
        pub queue_size: u16,
        #[serde(default)]
        pub vhost_user: bool,
        pub vhost_socket: Option<String>,
        #[serde(default)]
        pub rate_limit_group: Option<String>,
        #[serde(default)]
        pub rate_limiter_config: Option<RateLimiterConfig>,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub disable_io_uring: bool,
        #[serde(default)]
        pub disable_aio: bool,
        #[serde(default)]
        pub pci_segment: u16,
        #[serde(default)]
        pub serial: Option<String>,
        #[serde(default)]
        pub queue_affinity: Option<Vec<VirtQueueAffinity>>,
    }

    fn de_fds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<i32>>, D::Error> {
        // Like v50: descriptor numbers in a JSON body are meaningless in this process.
        let fds: Option<Vec<i32>> = Option::deserialize(d)?;
        Ok(fds.map(|v| vec![-1; v.len()]))
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct NetConfig {
        #[serde(default = "d_none")]
        pub tap: Option<String>,
        pub ip: Option<IpAddr>,
        pub mask: Option<IpAddr>,
        #[serde(default = "d_mac")]
        pub mac: MacAddr,
        #[serde(default)]
        pub host_mac: Option<MacAddr>,
        #[serde(default)]
        pub mtu: Option<u16>,
        #[serde(default)]
        pub iommu: bool,
        #[serde(default = "d_net_queues")]
        pub num_queues: usize,
        #[serde(default = "d_net_qsize")]
        pub queue_size: u16,
        #[serde(default)]
        pub vhost_user: bool,
        pub vhost_socket: Option<String>,
        #[serde(default)]
        pub vhost_mode: VhostMode,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default, deserialize_with = "de_fds")]
        pub fds: Option<Vec<i32>>,
        #[serde(default)]
        pub rate_limiter_config: Option<RateLimiterConfig>,
        #[serde(default)]
        pub pci_segment: u16,
        #[serde(default = "d_true")]
        pub offload_tso: bool,
        #[serde(default = "d_true")]
        pub offload_ufo: bool,
        #[serde(default = "d_true")]
        pub offload_csum: bool,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct RngConfig {
        pub src: PathBuf,
        #[serde(default)]
        pub iommu: bool,
    }

    impl Default for RngConfig {
        fn default() -> Self {
            RngConfig {
                src: PathBuf::from("/dev/urandom"),
                iommu: false,
            }
        }
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct BalloonConfig {
        pub size: u64,
        #[serde(default)]
        pub deflate_on_oom: bool,
        #[serde(default)]
        pub free_page_reporting: bool,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct FsConfig {
        pub tag: String,
        pub socket: PathBuf,
        #[serde(default = "d_fs_queues")]
        pub num_queues: usize,
        #[serde(default = "d_fs_qsize")]
        pub queue_size: u16,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub pci_segment: u16,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct PmemConfig {
        pub file: PathBuf,
        #[serde(default)]
        pub size: Option<u64>,
        #[serde(default)]
        pub iommu: bool,
        #[serde(default)]
        pub discard_writes: bool,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub pci_segment: u16,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
    pub enum ConsoleOutputMode {
        Off,
        Pty,
        Tty,
        File,
        Socket,
        Null,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct ConsoleConfig {
        #[serde(default = "d_none")]
        pub file: Option<PathBuf>,
        pub mode: ConsoleOutputMode,
        #[serde(default)]
        pub iommu: bool,
        pub socket: Option<PathBuf>,
    }

    impl ConsoleConfig {
        pub fn with_mode(mode: ConsoleOutputMode) -> Self {
            ConsoleConfig {
                file: None,
                mode,
                iommu: false,
                socket: None,
            }
        }
    }

    pub fn default_serial() -> ConsoleConfig {
        ConsoleConfig::with_mode(ConsoleOutputMode::Null)
    }

    pub fn default_console() -> ConsoleConfig {
        ConsoleConfig::with_mode(ConsoleOutputMode::Tty)
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct DebugConsoleConfig {
        #[serde(default)]
        pub file: Option<PathBuf>,
        pub mode: ConsoleOutputMode,
        pub iobase: Option<u16>,
    }

    impl Default for DebugConsoleConfig {
        fn default() -> Self {
            DebugConsoleConfig {
                file: None,
                mode: ConsoleOutputMode::Off,
                iobase: Some(0xe9),
            }
        }
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct DeviceConfig {
        pub path: PathBuf,
        #[serde(default)]
        pub iommu: bool,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub pci_segment: u16,
        #[serde(default)]
        pub x_nv_gpudirect_clique: Option<u8>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct UserDeviceConfig {
        pub socket: PathBuf,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub pci_segment: u16,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VdpaConfig {
        pub path: PathBuf,
        #[serde(default = "d_vdpa_queues")]
        pub num_queues: usize,
        #[serde(default)]
        pub iommu: bool,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub pci_segment: u16,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VsockConfig {
        pub cid: u32,
        pub socket: PathBuf,
        #[serde(default)]
        pub iommu: bool,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub pci_segment: u16,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct NumaDistance {
        #[serde(default)]
        pub destination: u32,
        #[serde(default)]
        pub distance: u8,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct NumaConfig {
        #[serde(default)]
        pub guest_numa_id: u32,
        #[serde(default)]
        pub cpus: Option<Vec<u32>>,
        #[serde(default)]
        pub distances: Option<Vec<NumaDistance>>,
        #[serde(default)]
        pub memory_zones: Option<Vec<String>>,
        #[serde(default)]
        pub pci_segments: Option<Vec<u16>>,
    }

    #[derive(Clone, Debug, Default, Deserialize, Serialize)]
    pub struct PayloadConfig {
        #[serde(default)]
        pub firmware: Option<PathBuf>,
        #[serde(default)]
        pub kernel: Option<PathBuf>,
        #[serde(default)]
        pub cmdline: Option<String>,
        #[serde(default)]
        pub initramfs: Option<PathBuf>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct TpmConfig {
        pub socket: PathBuf,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct LandlockConfig {
        pub path: PathBuf,
        pub access: String,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VmConfig {
        #[serde(default)]
        pub cpus: CpusConfig,
        #[serde(default)]
        pub memory: MemoryConfig,
        pub payload: Option<PayloadConfig>,
        pub rate_limit_groups: Option<Vec<RateLimiterGroupConfig>>,
        pub disks: Option<Vec<DiskConfig>>,
        pub net: Option<Vec<NetConfig>>,
        #[serde(default)]
        pub rng: RngConfig,
        pub balloon: Option<BalloonConfig>,
        pub fs: Option<Vec<FsConfig>>,
        pub pmem: Option<Vec<PmemConfig>>,
        #[serde(default = "default_serial")]
        pub serial: ConsoleConfig,
        #[serde(default = "default_console")]
        pub console: ConsoleConfig,
        #[serde(default)]
        pub debug_console: DebugConsoleConfig,
        pub devices: Option<Vec<DeviceConfig>>,
        pub user_devices: Option<Vec<UserDeviceConfig>>,
        pub vdpa: Option<Vec<VdpaConfig>>,
        pub vsock: Option<VsockConfig>,
        #[serde(default)]
        pub pvpanic: bool,
        #[serde(default)]
        pub iommu: bool,
        pub numa: Option<Vec<NumaConfig>>,
        #[serde(default)]
        pub watchdog: bool,
        pub pci_segments: Option<Vec<PciSegmentConfig>>,
        pub platform: Option<PlatformConfig>,
        pub tpm: Option<TpmConfig>,
        #[serde(default)]
        pub landlock_enable: bool,
        pub landlock_rules: Option<Vec<LandlockConfig>>,
    }

    impl VmConfig {
        /// The checks `VmConfig::validate` makes at boot that a launcher can trip over
        /// (payload, consoles, vCPU counts, queues, identifiers); each with v50's message.
        pub fn validate(&self) -> Result<Vec<String>, Chain> {
            let v = |m: &str| chain(&["Failed to validate config", m]);
            let mut ids: Vec<String> = Vec::new();
            match &self.payload {
                None => {
                    return Err(with(
                        v("Payload configuration is not bootable"),
                        "No bootitem provided: neither firmware nor kernel",
                    ))
                }
                Some(p) => match (&p.firmware, &p.kernel) {
                    (Some(_), Some(_)) => {
                        return Err(with(
                            v("Payload configuration is not bootable"),
                            "Specifying a kernel is not supported when a firmware is provided",
                        ))
                    }
                    (None, None) => {
                        return Err(with(
                            v("Payload configuration is not bootable"),
                            "No bootitem provided: neither firmware nor kernel",
                        ))
                    }
                    _ => {}
                },
            }
            for c in [&self.console, &self.serial] {
                if c.mode == ConsoleOutputMode::File && c.file.is_none() {
                    return Err(v("Path missing when using file console mode"));
                }
            }
            if self.cpus.max_vcpus < self.cpus.boot_vcpus {
                return Err(v("Max CPUs lower than boot CPUs"));
            }
            if self.cpus.max_vcpus > 8192 {
                return Err(v(&format!(
                    "Too many CPUs: specified {} but 8192 is the limit",
                    self.cpus.max_vcpus
                )));
            }
            let mut add_id = |id: &Option<String>| -> Result<(), Chain> {
                if let Some(id) = id {
                    if id.starts_with("__") {
                        return Err(v(&format!("Identifier {id} is not invalid")));
                    }
                    if ids.contains(id) {
                        return Err(v(&format!("Identifier {id} is not unique")));
                    }
                    ids.push(id.clone());
                }
                Ok(())
            };
            for d in self.disks.iter().flatten() {
                if d.vhost_socket.is_some() && d.path.is_some() {
                    return Err(v("Disk path and vhost socket both provided"));
                }
                if d.vhost_user && d.vhost_socket.is_none() {
                    return Err(v("No socket provided when using vhost-user"));
                }
                if d.num_queues > self.cpus.boot_vcpus as usize {
                    return Err(v("Number of vCPUs is insufficient for number of queues"));
                }
                if d.queue_size <= 2 {
                    return Err(v(&format!(
                        "Queue size is smaller than 2: {}",
                        d.queue_size
                    )));
                }
                add_id(&d.id)?;
            }
            for n in self.net.iter().flatten() {
                if n.num_queues < 2 {
                    return Err(v("Number of queues to virtio_net less than 2"));
                }
                if (n.num_queues / 2) > self.cpus.boot_vcpus as usize {
                    return Err(v("Number of vCPUs is insufficient for number of queues"));
                }
                if let Some(mtu) = n.mtu {
                    if mtu < 1280 {
                        return Err(v(&format!(
                            "Provided MTU {mtu} is lower than 1280 (expected by VIRTIO specification)"
                        )));
                    }
                }
                add_id(&n.id)?;
            }
            for p in self.pmem.iter().flatten() {
                add_id(&p.id)?;
            }
            if let Some(vs) = &self.vsock {
                if vs.cid < 3 {
                    return Err(v(&format!("{} is a special VSOCK CID", vs.cid)));
                }
                add_id(&vs.id)?;
            }
            Ok(ids)
        }
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct RestoredNetConfig {
        pub id: String,
        #[serde(default)]
        pub num_fds: usize,
        #[serde(default, deserialize_with = "de_fds")]
        pub fds: Option<Vec<i32>>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct RestoreConfig {
        pub source_url: PathBuf,
        #[serde(default)]
        pub prefault: bool,
        #[serde(default)]
        pub net_fds: Option<Vec<RestoredNetConfig>>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VmSnapshotConfig {
        pub destination_url: String,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VmRemoveDeviceData {
        pub id: String,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VmResizeData {
        pub desired_vcpus: Option<u32>,
        pub desired_ram: Option<u64>,
        pub desired_balloon: Option<u64>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VmResizeDiskData {
        pub id: String,
        pub desired_size: u64,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VmResizeZoneData {
        pub id: String,
        pub desired_ram: u64,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VmReceiveMigrationData {
        pub receiver_url: String,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct VmSendMigrationData {
        pub destination_url: String,
        #[serde(default)]
        pub local: bool,
    }
}

use cfg::{ConsoleConfig, ConsoleOutputMode, MacAddr, VmConfig};

// ---------------------------------------------------------------------------------------------
// Event monitor: pretty-printed JSON objects, each followed by a blank line; timestamps are the
// time since the monitor was set up, serialised as a Duration ({"secs","nanos"}). As in v50 a
// thread of its own writes them: an event can reach the file just after the API answer that
// caused it, and the last events before an exit can be lost.

struct Events {
    tx: Option<Sender<String>>,
    pending: Arc<AtomicU64>,
    start: Instant,
}

impl Events {
    fn new(file: Option<File>) -> Events {
        let pending = Arc::new(AtomicU64::new(0));
        let tx = file.map(|mut f| {
            let (tx, rx) = channel::<String>();
            let pending = pending.clone();
            std::thread::spawn(move || {
                for text in rx {
                    // Non-blocking file; write errors are dropped, as the VMM drops them.
                    let _ = f.write_all(text.as_bytes());
                    let _ = f.write_all(b"\n\n");
                    pending.fetch_sub(1, Ordering::SeqCst);
                }
            });
            tx
        });
        Events {
            tx,
            pending,
            start: Instant::now(),
        }
    }

    /// v50's exit path (joining its threads) usually gives the writer time to finish, but
    /// nothing waits for it; the stand-in allows the writer a similar moment.
    fn settle(&self) {
        let t0 = Instant::now();
        while self.pending.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_millis(3) {
            std::thread::yield_now();
        }
    }
}

#[derive(Serialize)]
struct EventRecord<'a> {
    timestamp: Duration,
    source: &'a str,
    event: &'a str,
    properties: Option<BTreeMap<&'a str, &'a str>>,
}

impl Events {
    fn emit(&self, source: &str, event: &str) {
        self.emit_with(source, event, &[]);
    }

    fn emit_with(&self, source: &str, event: &str, props: &[(&str, &str)]) {
        let record = EventRecord {
            timestamp: self.start.elapsed(),
            source,
            event,
            properties: if props.is_empty() {
                None
            } else {
                Some(props.iter().copied().collect())
            },
        };
        if let (Some(tx), Ok(text)) = (&self.tx, serde_json::to_string_pretty(&record)) {
            self.pending.fetch_add(1, Ordering::SeqCst);
            if tx.send(text).is_err() {
                self.pending.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Console devices (created at vm.create, at boot after a shutdown, at reboot and at restore).

#[derive(Clone)]
enum Sink {
    File(Arc<File>),
    Tty(Arc<File>),
    Pty(Arc<File>),
    Socket(Arc<SocketSink>),
    Null,
    Off,
}

/// Serial in Socket mode: the VMM listens and streams the output to whoever connects.
struct SocketSink {
    clients: Mutex<Vec<UnixStream>>,
}

impl SocketSink {
    fn start(listener: UnixListener) -> Arc<SocketSink> {
        let sink = Arc::new(SocketSink {
            clients: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&sink);
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                match weak.upgrade() {
                    Some(sink) => lock(&sink.clients).push(s),
                    None => return,
                }
            }
        });
        sink
    }
}

impl Sink {
    fn write(&self, text: &str) {
        match self {
            Sink::File(f) | Sink::Tty(f) | Sink::Pty(f) => {
                let _ = (&**f).write_all(text.as_bytes());
            }
            Sink::Socket(s) => {
                lock(&s.clients).retain_mut(|c| c.write_all(text.as_bytes()).is_ok())
            }
            Sink::Null | Sink::Off => {}
        }
    }
}

#[derive(Clone)]
struct ConsoleInfo {
    _console: Sink,
    serial: Sink,
    _debug: Sink,
}

fn dup_stdout() -> io::Result<File> {
    // SAFETY: dup of our own stdout; the new descriptor is owned by the returned File.
    let fd = unsafe { libc::dup(libc::STDOUT_FILENO) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by dup and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn create_pty() -> io::Result<(File, PathBuf)> {
    // SAFETY: plain libc calls; every result is checked and the fd is owned by the File.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let main = File::from_raw_fd(fd);
        if libc::grantpt(fd) < 0 || libc::unlockpt(fd) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0 as libc::c_char; 128];
        if libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let name = std::ffi::CStr::from_ptr(buf.as_ptr());
        Ok((main, PathBuf::from(name.to_string_lossy().into_owned())))
    }
}

fn make_sink(c: &mut ConsoleConfig, serial: bool) -> Result<Sink, Chain> {
    let err = |e: io::Error| {
        chain(&[
            "Error creating console devices",
            "Error creating console device",
            &e.to_string(),
        ])
    };
    Ok(match c.mode {
        ConsoleOutputMode::File => match &c.file {
            Some(p) => Sink::File(Arc::new(File::create(p).map_err(err)?)),
            // v50 unwraps here and its VMM thread panics; the stand-in answers instead.
            None => {
                return Err(chain(&[
                    "Error creating console devices",
                    "Error creating console device",
                    "stand-in: File mode without a file (the real v50 VMM panics here)",
                ]))
            }
        },
        ConsoleOutputMode::Pty => {
            let (main, path) = create_pty().map_err(err)?;
            c.file = Some(path);
            Sink::Pty(Arc::new(main))
        }
        ConsoleOutputMode::Tty => Sink::Tty(Arc::new(dup_stdout().map_err(|e| {
            chain(&[
                "Error creating console devices",
                "Cannot duplicate file descriptor",
                &e.to_string(),
            ])
        })?)),
        ConsoleOutputMode::Socket => {
            if !serial {
                return Err(chain(&[
                    "Error creating console devices",
                    "No socket option support for console device",
                ]));
            }
            match &c.socket {
                Some(p) => Sink::Socket(SocketSink::start(UnixListener::bind(p).map_err(err)?)),
                None => {
                    return Err(chain(&[
                        "Error creating console devices",
                        "Error creating console device",
                        "stand-in: Socket mode without a socket (the real v50 VMM panics here)",
                    ]))
                }
            }
        }
        ConsoleOutputMode::Null => Sink::Null,
        ConsoleOutputMode::Off => Sink::Off,
    })
}

fn pre_create_console_devices(config: &mut VmConfig) -> Result<ConsoleInfo, Chain> {
    let console = make_sink(&mut config.console, false)?;
    let serial = make_sink(&mut config.serial, true)?;
    let mut dbg = ConsoleConfig {
        file: config.debug_console.file.clone(),
        mode: config.debug_console.mode,
        iommu: false,
        socket: None,
    };
    let debug = make_sink(&mut dbg, false)?;
    config.debug_console.file = dbg.file;
    Ok(ConsoleInfo {
        _console: console,
        serial,
        _debug: debug,
    })
}

// ---------------------------------------------------------------------------------------------
// TAP devices, opened the way net_util::Tap opens them.

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const SIOCSIFMTU: libc::c_ulong = 0x8922;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &[u8]) -> IfReq {
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        let n = name.len().min(15);
        r.name[..n].copy_from_slice(&name[..n]);
        r
    }
}

fn ioctl_err(req: libc::c_ulong) -> Chain {
    let e = io::Error::last_os_error();
    vec![format!("ioctl ({req}) failed: {e}"), e.to_string()]
}

/// An ioctl on an `ifreq`, through a throwaway AF_UNIX socket as net_util does.
fn sock_ioctl(req: libc::c_ulong, ifr: &mut IfReq) -> Result<(), Chain> {
    // SAFETY: socket() result checked; the fd is owned by the File and closed on drop.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(vec!["Failed to create a socket".into(), e.to_string()]);
    }
    // SAFETY: fd is a fresh socket owned by nobody else.
    let sock = unsafe { File::from_raw_fd(fd) };
    // SAFETY: ifr points to a properly sized ifreq for the duration of the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, ifr as *mut IfReq) };
    if ret < 0 {
        return Err(ioctl_err(req));
    }
    Ok(())
}

struct NetDev {
    id: String,
    _tap_name: String,
    _fds: Vec<File>,
}

fn open_tap_named(name: &str, queue_pairs: usize) -> Result<(File, String), Chain> {
    let top = "Open tap device failed";
    if name.len() > 15 {
        return Err(chain(&[
            top,
            &format!("Interface name too long (max length is 15): {name}"),
        ]));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| chain(&[top, "Couldn't open /dev/net/tun", &e.to_string()]))?;
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int.
    if unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            TUNGETFEATURES as _,
            &mut features as *mut libc::c_uint,
        )
    } < 0
    {
        let e = io::Error::last_os_error();
        return Err(chain(&[top, "Unable to retrieve features", &e.to_string()]));
    }
    if features & (IFF_MULTI_QUEUE as libc::c_uint) == 0 && queue_pairs > 1 {
        return Err(chain(&[top, "Missing multiqueue support in the kernel"]));
    }
    let mut ifr = IfReq::new(name.as_bytes());
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if queue_pairs > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    ifr.data[..2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut ifr as *mut IfReq) } < 0 {
        let e = io::Error::last_os_error();
        return Err(chain(&[
            top,
            "Unable to configure tap interface",
            &e.to_string(),
        ]));
    }
    let end = ifr.name.iter().position(|&b| b == 0).unwrap_or(16);
    Ok((f, String::from_utf8_lossy(&ifr.name[..end]).into_owned()))
}

fn set_vnet_hdr(f: &File) -> Result<(), Chain> {
    let size: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    if unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            TUNSETVNETHDRSZ as _,
            &size as *const libc::c_int,
        )
    } < 0
    {
        return Err(prefixed(
            &["Setting vnet header size failed"],
            ioctl_err(TUNSETVNETHDRSZ),
        ));
    }
    Ok(())
}

/// `net_util::open_tap`: reuse or create the TAP, configure it, bring it up.
fn open_tap(net: &mut cfg::NetConfig) -> Result<(Vec<File>, String), Chain> {
    let pairs = net.num_queues / 2;
    if let Some(name) = &net.tap {
        let flags_path = format!("/sys/class/net/{name}/tun_flags");
        if Path::new(&flags_path).exists() {
            let s = std::fs::read_to_string(&flags_path)
                .map_err(|e| chain(&["Failed to read the TAP flags from sysfs", &e.to_string()]))?;
            let flags =
                u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).map_err(|e| {
                    chain(&[
                        "Failed to convert an hexadecimal string into an integer",
                        &e.to_string(),
                    ])
                })?;
            let mq = flags & (IFF_MULTI_QUEUE as u32) != 0;
            if mq && pairs <= 1 {
                return Err(chain(&[
                    "Error related to the multiqueue support (no support device side)",
                ]));
            }
            if !mq && pairs > 1 {
                return Err(chain(&[
                    "Error related to the multiqueue support (no support TAP side)",
                ]));
            }
        }
    }
    let requested = net.tap.clone().unwrap_or_else(|| "vmtap%d".to_string());
    let existed = net
        .tap
        .as_ref()
        .is_some_and(|n| Path::new(&format!("/sys/class/net/{n}")).exists());
    let (first, ifname) = open_tap_named(&requested, pairs)?;
    let nb = ifname.as_bytes().to_vec();
    if existed {
        log(
            "WARN",
            "vmm",
            "net_util/src/open_tap.rs:84",
            &format!("Tap {ifname} already exists. IP configuration will not be overwritten."),
        );
    } else if let Some(IpAddr::V4(ip)) = net.ip {
        let set = |req: libc::c_ulong, a: std::net::Ipv4Addr| -> Result<(), Chain> {
            let mut ifr = IfReq::new(&nb);
            ifr.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            ifr.data[4..8].copy_from_slice(&a.octets());
            sock_ioctl(req, &mut ifr)
                .map_err(|c| prefixed(&["Setting tap IP and/or netmask failed"], c))
        };
        set(SIOCSIFADDR, ip)?;
        if let Some(IpAddr::V4(m)) = net.mask {
            set(SIOCSIFNETMASK, m)?;
        }
    }
    if let Some(mac) = net.host_mac {
        let mut ifr = IfReq::new(&nb);
        ifr.data[..2].copy_from_slice(&1u16.to_ne_bytes()); // ARPHRD_ETHER
        ifr.data[2..8].copy_from_slice(&mac.0);
        sock_ioctl(SIOCSIFHWADDR, &mut ifr)
            .map_err(|c| prefixed(&["Setting MAC address failed"], c))?;
    } else {
        let mut ifr = IfReq::new(&nb);
        sock_ioctl(SIOCGIFHWADDR, &mut ifr)
            .map_err(|c| prefixed(&["Getting MAC address failed"], c))?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&ifr.data[2..8]);
        net.host_mac = Some(MacAddr(mac));
    }
    if let Some(mtu) = net.mtu {
        let mut ifr = IfReq::new(&nb);
        ifr.data[..4].copy_from_slice(&(mtu as i32).to_ne_bytes());
        sock_ioctl(SIOCSIFMTU, &mut ifr).map_err(|c| prefixed(&["Setting MTU failed"], c))?;
    }
    let mut ifr = IfReq::new(&nb);
    sock_ioctl(SIOCGIFFLAGS, &mut ifr)
        .map_err(|c| prefixed(&["Enabling tap interface failed"], c))?;
    let flags = i16::from_ne_bytes([ifr.data[0], ifr.data[1]]);
    if flags & (libc::IFF_UP as i16) == 0 {
        let mut ifr = IfReq::new(&nb);
        ifr.data[..2].copy_from_slice(&(libc::IFF_UP as i16).to_ne_bytes());
        sock_ioctl(SIOCSIFFLAGS, &mut ifr)
            .map_err(|c| prefixed(&["Enabling tap interface failed"], c))?;
    }
    set_vnet_hdr(&first)?;
    let mut fds = vec![first];
    for _ in 1..pairs.max(1) {
        let (f, _) = open_tap_named(&ifname, pairs)?;
        set_vnet_hdr(&f)?;
        fds.push(f);
    }
    Ok((fds, ifname))
}

// ---------------------------------------------------------------------------------------------
// Disks: opened read-write (or read-only) at VM creation, OFD-locked over their whole byte
// range at boot, as block::fcntl does.

struct DiskDev {
    id: String,
    path: PathBuf,
    file: File,
    readonly: bool,
}

fn file_size(f: &File) -> u64 {
    // SAFETY: lseek on a descriptor we own; only reads its size.
    let end = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        0
    } else {
        end as u64
    }
}

impl DiskDev {
    fn try_lock(&self) -> Result<(), Chain> {
        let size = file_size(&self.file);
        // SAFETY: a zeroed flock is a valid value; the fields we need are set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if self.readonly {
            libc::F_RDLCK as libc::c_short
        } else {
            libc::F_WRLCK as libc::c_short
        };
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 0;
        fl.l_len = size as libc::off_t;
        // SAFETY: F_OFD_SETLK with a valid flock.
        let ret = unsafe {
            libc::fcntl(
                self.file.as_raw_fd(),
                libc::F_OFD_SETLK,
                &fl as *const libc::flock,
            )
        };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        let kind = if self.readonly { "Read" } else { "Write" };
        let head = ["Cannot lock images of all block devices"];
        let what = format!(
            "Failed to get {kind} lock for disk image: {}",
            self.path.display()
        );
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => {
                // SAFETY: as above; F_OFD_GETLK rewrites the flock with the conflicting lock.
                let mut probe = fl;
                let got = unsafe {
                    libc::fcntl(
                        self.file.as_raw_fd(),
                        libc::F_OFD_GETLK,
                        &mut probe as *mut libc::flock,
                    )
                };
                let msg = if got == 0 {
                    let held = match probe.l_type as libc::c_int {
                        libc::F_WRLCK => "ExclusiveWrite",
                        libc::F_RDLCK => "SharedRead",
                        _ => "Unlocked",
                    };
                    format!(
                        "Can't get {kind} lock for {} as there is already a {held} lock",
                        self.path.display()
                    )
                } else {
                    format!(
                        "Can't get {kind} lock for {}, but also can't determine the current lock state",
                        self.path.display()
                    )
                };
                log("ERROR", "vmm", "virtio-devices/src/block.rs:820", &msg);
                Err(prefixed(
                    &head,
                    vec![what, "The file is already locked".into()],
                ))
            }
            _ => Err(prefixed(
                &head,
                vec![
                    what,
                    "The lock state could not be checked or set".into(),
                    e.to_string(),
                ],
            )),
        }
    }
}

fn open_disk(d: &cfg::DiskConfig) -> Result<File, Chain> {
    let dm = "Error from device manager";
    if d.vhost_user {
        return Err(chain(&[
            dm,
            "Cannot create vhost-user-blk device",
            "stand-in: vhost-user disks are not emulated",
        ]));
    }
    let Some(path) = &d.path else {
        return Err(chain(&[
            dm,
            "No disk path was specified when one was expected",
        ]));
    };
    let mut o = OpenOptions::new();
    o.read(true).write(!d.readonly);
    if d.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
        .map_err(|e| chain(&[dm, "Cannot open disk path", &e.to_string()]))
}

// ---------------------------------------------------------------------------------------------
// Kernel payload check (done by the real VMM's loader thread, reported at vm.boot).

fn check_payload(p: &cfg::PayloadConfig) -> Result<(), Chain> {
    let (path, open_msg) = match (&p.firmware, &p.kernel) {
        (Some(fw), None) => (fw, "Error manipulating firmware file"),
        (None, Some(k)) => (k, "Cannot open kernel file"),
        _ => return Ok(()),
    };
    let mut f = File::open(path).map_err(|e| chain(&[open_msg, &e.to_string()]))?;
    let mut head = vec![0u8; 0x210];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let elf = n >= 4 && head[..4] == *b"\x7fELF";
    let bzimage = n >= 0x206 && head[0x202..0x206] == *b"HdrS";
    if elf || bzimage {
        return Ok(());
    }
    Err(chain(&[
        "Cannot load the kernel into memory",
        "Kernel Loader: failed to load bzImage kernel image: Kernel Loader: Invalid bzImage",
        "Kernel Loader: Invalid bzImage",
    ]))
}

// ---------------------------------------------------------------------------------------------
// Guest RAM: an anonymous, unreserved mapping of the configured size, as the VMM's memory manager
// makes. The payload is copied into it at boot and a restore copies the snapshot into it, so the
// time and memory those take grow with payload and RAM size as they do in v50.

struct GuestMem {
    ptr: *mut u8,
    len: usize,
    /// Ranges written so far (payload images, restored content): what a snapshot saves.
    used: Vec<(usize, usize)>,
}

// SAFETY: the mapping is owned by exactly one GuestMem and only touched through &mut self.
unsafe impl Send for GuestMem {}

impl GuestMem {
    fn new(len: u64) -> Result<GuestMem, Chain> {
        let len = len.max(4096) as usize;
        // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(chain(&[
                "Memory manager error",
                "Failed to create guest memory",
                &e.to_string(),
            ]));
        }
        Ok(GuestMem {
            ptr: ptr.cast(),
            len,
            used: Vec::new(),
        })
    }

    fn slice(&mut self, offset: usize, len: usize) -> &mut [u8] {
        // SAFETY: callers keep offset + len within the mapping, which lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }

    /// Copies a whole file to `offset`; false if it does not fit.
    fn load(&mut self, f: &mut File, offset: usize) -> io::Result<bool> {
        let size = file_size(f) as usize;
        if offset.checked_add(size).is_none_or(|end| end > self.len) {
            return Ok(false);
        }
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(0))?;
        f.read_exact(self.slice(offset, size))?;
        self.used.push((offset, size));
        Ok(true)
    }

    /// Writes the used ranges into `out` (a sparse file of the RAM's size).
    fn save(&mut self, out: &File) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        out.set_len(self.len as u64)?;
        for (off, len) in self.used.clone() {
            out.write_all_at(self.slice(off, len), off as u64)?;
        }
        Ok(())
    }

    /// Copies a snapshot's memory file back in (every page, as a restore without prefault
    /// still copies the RAM).
    fn restore(&mut self, f: &mut File) -> io::Result<()> {
        let n = (file_size(f) as usize).min(self.len);
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(0))?;
        f.read_exact(self.slice(0, n))?;
        self.used = vec![(0, n)];
        Ok(())
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in new().
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Copies kernel (at 1 MiB, x86's HIGH_RAM_START) and initramfs (top of RAM) into guest RAM.
fn load_payload(p: &cfg::PayloadConfig, mem: &mut GuestMem) -> Result<(), Chain> {
    let image = p.kernel.as_ref().or(p.firmware.as_ref());
    if let Some(path) = image {
        let mut f = File::open(path)
            .map_err(|e| chain(&["Cannot load the kernel into memory", &e.to_string()]))?;
        if !mem.load(&mut f, 1 << 20).unwrap_or(false) {
            return Err(chain(&[
                "Cannot load the kernel into memory",
                "Kernel Loader: memory to load kernel image is not enough",
            ]));
        }
    }
    if let Some(path) = &p.initramfs {
        let mut f =
            File::open(path).map_err(|e| chain(&["Cannot open initramfs file", &e.to_string()]))?;
        let size = file_size(&f) as usize;
        let top = mem.len.saturating_sub(size) & !0xfff;
        if size > mem.len / 2 || !mem.load(&mut f, top).unwrap_or(false) {
            return Err(chain(&["Cannot load the initramfs into memory"]));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The simulated guest.

#[derive(Default)]
struct GuestRun {
    paused: bool,
    stopped: bool,
}

struct GuestCtl {
    run: Mutex<GuestRun>,
    cv: Condvar,
}

impl GuestCtl {
    fn new(paused: bool) -> Arc<GuestCtl> {
        Arc::new(GuestCtl {
            run: Mutex::new(GuestRun {
                paused,
                stopped: false,
            }),
            cv: Condvar::new(),
        })
    }

    fn set(&self, f: impl FnOnce(&mut GuestRun)) {
        f(&mut lock(&self.run));
        self.cv.notify_all();
    }

    /// Lets `d` of guest time pass (time stands still while paused). False once stopped.
    fn sleep(&self, d: Duration) -> bool {
        let mut remaining = d;
        let mut g = lock(&self.run);
        loop {
            if g.stopped {
                return false;
            }
            if g.paused {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if remaining.is_zero() {
                return true;
            }
            let t0 = Instant::now();
            g = self
                .cv
                .wait_timeout(g, remaining)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            remaining = remaining.saturating_sub(t0.elapsed());
        }
    }

    fn halt(&self) {
        while self.sleep(Duration::from_secs(3600)) {}
    }
}

#[derive(Clone)]
enum GuestMode {
    Kernel,
    Firmware { has_esp: bool },
    Restored,
}

#[derive(Clone)]
struct GuestPlan {
    gen: u64,
    mode: GuestMode,
    cmdline: String,
    pvm: bool,
    pvpanic: bool,
    max_vcpus: u32,
    disk_sectors: Option<u64>,
    device_ids: Vec<String>,
    serial: Sink,
    hooks_pending: Arc<AtomicBool>,
}

enum Ctl {
    Signal,
    ApiShutdown,
    GuestPowerOff(u64),
    GuestReset(u64),
    Crash(u64),
}

fn kmsg(t0: Instant, text: &str) -> String {
    let t = t0.elapsed().as_secs_f64();
    format!("[{t:>12.6}] {text}\r\n")
}

fn run_guest(plan: GuestPlan, g: Arc<GuestCtl>, events: Arc<Events>, ctl: Sender<Ctl>) {
    if plan.pvm {
        // This host's PVM kvm runs an ordinary guest kernel without a sound: no output.
        g.halt();
        return;
    }
    let t0 = Instant::now();
    let out = &plan.serial;
    match plan.mode {
        GuestMode::Firmware { has_esp } => {
            out.write("Booting with rust-hypervisor-firmware (stand-in)\r\n");
            if !has_esp {
                out.write("Unable to boot from any virtio-blk device\r\n");
            }
            g.halt();
            return;
        }
        GuestMode::Kernel => {
            out.write(&kmsg(
                t0,
                "Linux version 6.1.0-standin (chvkit stand-in guest) #1 SMP PREEMPT_DYNAMIC",
            ));
            out.write(&kmsg(t0, &format!("Command line: {}", plan.cmdline)));
            out.write(&kmsg(
                t0,
                &format!("smpboot: Allowing {} CPUs, 0 hotplug CPUs", plan.max_vcpus),
            ));
            if !g.sleep(Duration::from_millis(2)) {
                return;
            }
            for id in &plan.device_ids {
                events.emit_with("virtio-device", "activated", &[("id", id)]);
            }
            if let Some(sectors) = plan.disk_sectors {
                out.write(&kmsg(
                    t0,
                    &format!("virtio_blk virtio0: [vda] {sectors} 512-byte logical blocks"),
                ));
            }
            out.write(&kmsg(t0, "Run /init as init process"));
        }
        GuestMode::Restored => {}
    }
    if !plan.hooks_pending.load(Ordering::SeqCst) {
        g.halt();
        return;
    }
    let arg = |key: &str| -> Option<String> {
        plan.cmdline.split_whitespace().find_map(|w| {
            if w == key {
                Some(String::new())
            } else {
                w.strip_prefix(key)
                    .and_then(|r| r.strip_prefix('='))
                    .map(str::to_string)
            }
        })
    };
    let delay = arg("standin.delay")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(10);
    if !g.sleep(Duration::from_millis(delay)) {
        return;
    }
    plan.hooks_pending.store(false, Ordering::SeqCst);
    if arg("standin.panic").is_some() {
        out.write(&kmsg(
            t0,
            "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
        ));
        if plan.pvpanic {
            events.emit_with("guest", "panic", &[("event", "panic")]);
        }
        let after = arg("panic")
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        if after == 0 {
            out.write(&kmsg(
                t0,
                "---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100 ]---",
            ));
            g.halt();
            return;
        }
        if after > 0 {
            out.write(&kmsg(t0, &format!("Rebooting in {after} seconds..")));
            if !g.sleep(Duration::from_secs(after as u64)) {
                return;
            }
        }
        let _ = ctl.send(Ctl::GuestReset(plan.gen));
        g.halt();
        return;
    }
    if arg("standin.reboot").is_some() {
        out.write(&kmsg(t0, "reboot: Restarting system"));
        let _ = ctl.send(Ctl::GuestReset(plan.gen));
        g.halt();
        return;
    }
    if let Some(code) = arg("standin.exit") {
        out.write(&format!("CHVKIT_EXIT={code}\r\n"));
        out.write(&kmsg(t0, "reboot: Power down"));
        let _ = ctl.send(Ctl::GuestPowerOff(plan.gen));
    }
    g.halt();
}

// ---------------------------------------------------------------------------------------------
// The VM and the VMM state machine (vmm/src/lib.rs + vmm/src/vm.rs of v50.0).

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
}

impl VmState {
    fn valid_transition(self, new: VmState) -> Result<(), String> {
        use VmState::*;
        let ok = match self {
            Created => new != Created,
            Running => matches!(new, Paused | Shutdown),
            Shutdown => new == Running,
            Paused => matches!(new, Running | Shutdown),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("invalid VM state transition: {self:?} to {new:?}"))
        }
    }

    fn invalid_transition_debug(self, new: VmState) -> String {
        format!("Invalid transition: InvalidStateTransition({self:?}, {new:?})")
    }
}

#[derive(Clone, Serialize)]
struct PciBar {
    index: u32,
    base: u64,
    size: u64,
    type_: &'static str,
    prefetchable: bool,
}

#[derive(Clone, Serialize)]
enum Resource {
    PciBar(PciBar),
}

#[derive(Clone, Serialize)]
struct DeviceNode {
    id: String,
    resources: Vec<Resource>,
    parent: Option<String>,
    children: Vec<String>,
    pci_bdf: Option<String>,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

struct Vm {
    gen: u64,
    state: VmState,
    console: ConsoleInfo,
    disks: Vec<DiskDev>,
    nets: Vec<NetDev>,
    _rng: Option<File>,
    device_tree: BTreeMap<String, DeviceNode>,
    id_cnt: u32,
    next_bdf: u8,
    reserved_ids: Vec<String>,
    pending_load: Option<Result<(), Chain>>,
    memory: GuestMem,
    guest: Option<Arc<GuestCtl>>,
    hooks_pending: Arc<AtomicBool>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(g) = &self.guest {
            g.set(|r| r.stopped = true);
        }
    }
}

impl Vm {
    fn next_name(&mut self, prefix: &str) -> String {
        loop {
            let name = format!("{prefix}{}", self.id_cnt);
            self.id_cnt += 1;
            if !self.reserved_ids.contains(&name) && !self.device_tree.contains_key(&name) {
                return name;
            }
        }
    }

    fn add_pci_node(&mut self, id: &str) -> String {
        let bdf = format!("0000:00:{:02x}.0", self.next_bdf);
        let base: u64 = 0x3fff_0000_0000 - (self.next_bdf as u64) * 0x8_0000;
        self.next_bdf += 1;
        let pci_id = format!("_virtio-pci-{id}");
        self.device_tree.insert(
            id.to_string(),
            DeviceNode {
                id: id.to_string(),
                resources: vec![],
                parent: Some(pci_id.clone()),
                children: vec![],
                pci_bdf: None,
            },
        );
        self.device_tree.insert(
            pci_id.clone(),
            DeviceNode {
                id: pci_id,
                resources: vec![Resource::PciBar(PciBar {
                    index: 0,
                    base,
                    size: 524288,
                    type_: "Mmio64",
                    prefetchable: false,
                })],
                parent: None,
                children: vec![id.to_string()],
                pci_bdf: Some(bdf.clone()),
            },
        );
        bdf
    }

    fn plain_node(&mut self, id: &str) {
        self.device_tree.insert(
            id.to_string(),
            DeviceNode {
                id: id.to_string(),
                resources: vec![],
                parent: None,
                children: vec![],
                pci_bdf: None,
            },
        );
    }

    /// `Vm::new`: validate, create devices (disks, then TAPs, then rng), start loading the
    /// payload (its result is only looked at by `boot`). Device ids land in the config.
    fn new(
        config: &mut VmConfig,
        console: ConsoleInfo,
        restoring: Option<&serde_json::Value>,
    ) -> Result<Vm, Chain> {
        let reserved_ids = config.validate()?;
        let rng = File::open(&config.rng.src).map_err(|e| {
            chain(&[
                "Error from device manager",
                "Cannot create virtio-rng device",
                &e.to_string(),
            ])
        });
        let memory = GuestMem::new(config.memory.total_size())?;
        let mut vm = Vm {
            gen: GENERATION.fetch_add(1, Ordering::SeqCst),
            state: if restoring.is_some() {
                VmState::Paused
            } else {
                VmState::Created
            },
            console,
            disks: vec![],
            nets: vec![],
            _rng: None,
            device_tree: BTreeMap::new(),
            id_cnt: 0,
            next_bdf: 1,
            reserved_ids,
            pending_load: None,
            memory,
            guest: None,
            hooks_pending: Arc::new(AtomicBool::new(true)),
        };
        vm.plain_node("__ioapic");
        if config.serial.mode != ConsoleOutputMode::Off {
            vm.plain_node("__serial");
        }
        if restoring.is_none() {
            vm.pending_load = Some(config.payload.as_ref().map(check_payload).unwrap_or(Ok(())));
        }
        let mut disks = config.disks.clone().unwrap_or_default();
        for d in disks.iter_mut() {
            let id = match &d.id {
                Some(id) => id.clone(),
                None => {
                    let id = vm.next_name("_disk");
                    d.id = Some(id.clone());
                    id
                }
            };
            let file = open_disk(d)?;
            vm.add_pci_node(&id);
            vm.disks.push(DiskDev {
                id,
                path: d.path.clone().unwrap_or_default(),
                file,
                readonly: d.readonly,
            });
        }
        if config.disks.is_some() {
            config.disks = Some(disks);
        }
        let mut nets = config.net.clone().unwrap_or_default();
        let macs: BTreeMap<String, String> = restoring
            .and_then(|s| s.get("net_macs"))
            .and_then(|m| serde_json::from_value(m.clone()).ok())
            .unwrap_or_default();
        for n in nets.iter_mut() {
            let id = match &n.id {
                Some(id) => id.clone(),
                None => {
                    let id = vm.next_name("_net");
                    n.id = Some(id.clone());
                    id
                }
            };
            if let Some(mac) = macs.get(&id).and_then(|m| MacAddr::parse_str(m).ok()) {
                n.mac = mac;
            }
            if n.vhost_user {
                return Err(chain(&[
                    "Error from device manager",
                    "Cannot create vhost-user-net device",
                    "stand-in: vhost-user networking is not emulated",
                ]));
            }
            if n.tap.is_none() && n.fds.is_some() {
                return Err(chain(&[
                    "Error from device manager",
                    "Cannot create virtio-net device",
                    "stand-in: TAP file descriptors passed over the API are not emulated",
                ]));
            }
            let (fds, name) = open_tap(n).map_err(|c| {
                prefixed(
                    &[
                        "Error from device manager",
                        "Cannot create virtio-net device",
                        "Failed to open taps",
                    ],
                    c,
                )
            })?;
            vm.add_pci_node(&id);
            vm.nets.push(NetDev {
                id,
                _tap_name: name,
                _fds: fds,
            });
        }
        if config.net.is_some() {
            config.net = Some(nets);
        }
        vm._rng = Some(rng?);
        vm.add_pci_node("__rng");
        if config.console.mode != ConsoleOutputMode::Off {
            vm.add_pci_node("__console");
        }
        if config.pvpanic {
            vm.add_pci_node("__pvpanic");
        }
        if restoring.is_none() {
            if let Some(initramfs) = config.payload.as_ref().and_then(|p| p.initramfs.as_ref()) {
                File::open(initramfs)
                    .map_err(|e| chain(&["Cannot open initramfs file", &e.to_string()]))?;
            }
        }
        Ok(vm)
    }

    fn virtio_ids(&self, config: &VmConfig) -> Vec<String> {
        let mut ids: Vec<String> = self.disks.iter().map(|d| d.id.clone()).collect();
        ids.extend(self.nets.iter().map(|n| n.id.clone()));
        ids.push("__rng".into());
        if config.console.mode != ConsoleOutputMode::Off {
            ids.push("__console".into());
        }
        ids
    }

    fn start_guest(&mut self, config: &VmConfig, mode: GuestMode, paused: bool, sh: &Shared) {
        let g = GuestCtl::new(paused);
        let plan = GuestPlan {
            gen: self.gen,
            mode,
            cmdline: config
                .payload
                .as_ref()
                .and_then(|p| p.cmdline.clone())
                .unwrap_or_default(),
            pvm: sh.pvm,
            pvpanic: config.pvpanic,
            max_vcpus: config.cpus.max_vcpus,
            disk_sectors: self.disks.first().map(|d| file_size(&d.file) / 512),
            device_ids: self.virtio_ids(config),
            serial: self.console.serial.clone(),
            hooks_pending: self.hooks_pending.clone(),
        };
        let events = sh.events.clone();
        let ctl = sh.ctl.clone();
        let g2 = g.clone();
        std::thread::spawn(move || run_guest(plan, g2, events, ctl));
        self.guest = Some(g);
    }

    fn pause(&mut self, events: &Events) -> Result<(), Chain> {
        events.emit("vm", "pausing");
        let migr = |m: String| {
            vec![
                "Cannot pause VM".to_string(),
                "Failed to pause migratable component".into(),
                m,
            ]
        };
        if self.state.valid_transition(VmState::Paused).is_err() {
            return Err(migr(self.state.invalid_transition_debug(VmState::Paused)));
        }
        self.state = VmState::Paused;
        if let Some(g) = &self.guest {
            g.set(|r| r.paused = true);
        }
        events.emit("vm", "paused");
        Ok(())
    }

    fn resume(&mut self, events: &Events) -> Result<(), Chain> {
        events.emit("vm", "resuming");
        if self.state.valid_transition(VmState::Running).is_err() {
            return Err(vec![
                "Cannot resume VM".into(),
                "Failed to resume migratable component".into(),
                self.state.invalid_transition_debug(VmState::Running),
            ]);
        }
        self.state = VmState::Running;
        if let Some(g) = &self.guest {
            g.set(|r| r.paused = false);
        }
        events.emit("vm", "resumed");
        Ok(())
    }

    fn lock_disks(&self) -> Result<(), Chain> {
        for d in &self.disks {
            d.try_lock().map_err(|c| {
                prefixed(
                    &["Error locking disk images: Another instance likely holds a lock"],
                    c,
                )
            })?;
        }
        Ok(())
    }

    /// `Vm::boot`. Returns whether the VMM must die afterwards (a boot retried after a failed
    /// payload load runs vCPUs on empty memory; v50 then dies of a seccomp violation).
    fn boot(&mut self, config: &VmConfig, sh: &Shared) -> Result<bool, Chain> {
        if self.state == VmState::Paused {
            return self.resume(&sh.events).map(|_| false);
        }
        self.lock_disks()?;
        self.state
            .valid_transition(VmState::Running)
            .map_err(|m| vec![m])?;
        let doomed = match self.pending_load.take() {
            Some(Ok(())) => {
                load_payload(
                    &config.payload.clone().unwrap_or_default(),
                    &mut self.memory,
                )?;
                false
            }
            Some(Err(e)) => return Err(e),
            None => true,
        };
        self.state = VmState::Running;
        if doomed {
            return Ok(true);
        }
        let payload = config.payload.clone().unwrap_or_default();
        let mode = if payload.firmware.is_some() {
            let has_esp = self.disks.first().is_some_and(|d| {
                let mut buf = [0u8; 8];
                // SAFETY: pread into a local buffer of the given length.
                let n = unsafe {
                    libc::pread(d.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 512)
                };
                n == 8 && &buf == b"EFI PART"
            });
            GuestMode::Firmware { has_esp }
        } else {
            GuestMode::Kernel
        };
        self.start_guest(config, mode, false, sh);
        Ok(false)
    }

    fn shutdown(&mut self) -> Result<(), Chain> {
        self.state
            .valid_transition(VmState::Shutdown)
            .map_err(|m| vec![m])?;
        self.state = VmState::Shutdown;
        if let Some(g) = &self.guest {
            g.set(|r| r.stopped = true);
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct VmInfoResponse<'a> {
    config: &'a VmConfig,
    state: VmState,
    memory_actual_size: u64,
    device_tree: Option<&'a BTreeMap<String, DeviceNode>>,
}

#[derive(Serialize)]
struct VmmPingResponse {
    build_version: &'static str,
    version: &'static str,
    pid: i64,
    features: [&'static str; 2],
}

#[derive(Serialize)]
struct PciDeviceInfo {
    id: String,
    bdf: String,
}

struct Vmm {
    config: Option<VmConfig>,
    console: Option<ConsoleInfo>,
    vm: Option<Vm>,
}

/// State shared by the API threads, the guest threads and the control loop.
struct Shared {
    vmm: Mutex<Vmm>,
    events: Arc<Events>,
    ctl: Sender<Ctl>,
    pvm: bool,
    socket_path: Option<PathBuf>,
    /// Set once vmm.shutdown has been answered: the process is on its way out.
    exiting: AtomicBool,
}

fn url_to_path(url: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(
        url.strip_prefix("file://")
            .ok_or_else(|| format!("Could not extract path from URL: {url}"))?,
    );
    if !path.is_dir() {
        return Err(format!("Destination is not a directory: {path:?}"));
    }
    Ok(path)
}

fn with_backtrace_note(msg: String) -> String {
    // anyhow, which carries this message in v50, appends a backtrace when the environment asks
    // for one; a launcher has to cope with that text.
    let wants = |k: &str| std::env::var(k).is_ok_and(|v| v != "0");
    let capture = if std::env::var_os("RUST_LIB_BACKTRACE").is_some() {
        wants("RUST_LIB_BACKTRACE")
    } else {
        wants("RUST_BACKTRACE")
    };
    if capture {
        format!("{msg}\n\nStack backtrace:\n   0: <unknown>\n   1: <unknown>")
    } else {
        msg
    }
}

impl Vmm {
    fn vm_create(&mut self, mut config: VmConfig) -> Result<(), Chain> {
        let top = "The VM could not be created";
        if self.config.is_some() {
            return Err(chain(&[top, "VM is already created"]));
        }
        // Stored before the console devices are made: a failed create still leaves a config.
        let console = pre_create_console_devices(&mut config);
        let landlock = config.landlock_enable;
        let rules = config.landlock_rules.clone().unwrap_or_default();
        self.config = Some(config);
        self.console = Some(console.map_err(|c| prefixed(&[top], c))?);
        if landlock {
            for r in rules {
                if !matches!(r.access.as_str(), "r" | "w" | "rw") {
                    return Err(chain(&[
                        top,
                        "Failed to apply landlock config during vm_create",
                        &format!("Invalid Landlock access: {}", r.access),
                    ]));
                }
            }
        }
        Ok(())
    }

    /// Returns whether the VMM must die once the answer is out.
    fn vm_boot(&mut self, sh: &Shared) -> Result<bool, Chain> {
        let top = "The VM could not boot";
        sh.events.emit("vm", "booting");
        let Some(config) = self.config.as_mut() else {
            return Err(chain(&[top, "VM config is missing"]));
        };
        if self.console.is_none() {
            self.console =
                Some(pre_create_console_devices(config).map_err(|c| prefixed(&[top], c))?);
        }
        let vm = match self.vm.as_mut() {
            Some(vm) => vm,
            None => {
                let console = self.console.clone().unwrap_or(ConsoleInfo {
                    _console: Sink::Off,
                    serial: Sink::Off,
                    _debug: Sink::Off,
                });
                let vm = Vm::new(config, console, None).map_err(|c| prefixed(&[top], c))?;
                self.vm.insert(vm)
            }
        };
        let doomed = vm.boot(config, sh).map_err(|c| prefixed(&[top], c))?;
        sh.events.emit("vm", "booted");
        Ok(doomed)
    }

    fn vm_pause(&mut self, sh: &Shared) -> Result<(), Chain> {
        let top = "The VM could not be paused";
        match self.vm.as_mut() {
            Some(vm) => vm.pause(&sh.events).map_err(|c| prefixed(&[top], c)),
            None => Err(chain(&[top, "VM is not running"])),
        }
    }

    fn vm_resume(&mut self, sh: &Shared) -> Result<(), Chain> {
        let top = "The VM could not resume";
        match self.vm.as_mut() {
            Some(vm) => vm.resume(&sh.events).map_err(|c| prefixed(&[top], c)),
            None => Err(chain(&[top, "VM is not running"])),
        }
    }

    fn vm_shutdown(&mut self, sh: &Shared) -> Result<(), Chain> {
        let Some(mut vm) = self.vm.take() else {
            return Err(chain(&["The VM could not shutdown", "VM is not running"]));
        };
        self.console = None;
        vm.shutdown()
            .map_err(|c| prefixed(&["The VM could not shutdown"], c))?;
        // Dropping the VM closes the TAPs (a TAP the VMM created disappears) and the disks
        // (their locks go with them).
        drop(vm);
        sh.events.emit("vm", "shutdown");
        Ok(())
    }

    fn vm_reboot(&mut self, sh: &Shared) -> Result<(), Chain> {
        let top = "The VM could not reboot";
        sh.events.emit("vm", "rebooting");
        let Some(mut vm) = self.vm.take() else {
            return Err(chain(&[top, "VM is not created"]));
        };
        vm.shutdown().map_err(|c| prefixed(&[top], c))?;
        let hooks = vm.hooks_pending.clone();
        drop(vm);
        self.console = None;
        let Some(config) = self.config.as_mut() else {
            return Err(chain(&[top, "VM is not created"]));
        };
        let console = pre_create_console_devices(config).map_err(|c| prefixed(&[top], c))?;
        self.console = Some(console.clone());
        let mut vm = Vm::new(config, console, None).map_err(|c| prefixed(&[top], c))?;
        // The rebooted guest runs the same kernel command line again, hooks included.
        hooks.store(true, Ordering::SeqCst);
        vm.hooks_pending = hooks;
        let config = config.clone();
        vm.boot(&config, sh).map_err(|c| prefixed(&[top], c))?;
        self.vm = Some(vm);
        sh.events.emit("vm", "rebooted");
        Ok(())
    }

    fn vm_info(&self) -> Result<Vec<u8>, Chain> {
        let Some(config) = &self.config else {
            return Err(chain(&[
                "The VM info is not available",
                "VM is not created",
            ]));
        };
        let info = VmInfoResponse {
            config,
            state: self
                .vm
                .as_ref()
                .map(|v| v.state)
                .unwrap_or(VmState::Created),
            memory_actual_size: config.memory.total_size(),
            device_tree: self.vm.as_ref().map(|v| &v.device_tree),
        };
        serde_json::to_vec(&info)
            .map_err(|e| chain(&["Failed serializing into JSON", &e.to_string()]))
    }

    fn vm_delete(&mut self, sh: &Shared) -> Result<(), Chain> {
        if self.config.is_none() {
            return Ok(());
        }
        if self.vm.is_some() {
            self.vm_shutdown(sh)
                .map_err(|c| prefixed(&["The VM could not be deleted"], c))?;
        }
        self.config = None;
        self.console = None;
        sh.events.emit("vm", "deleted");
        Ok(())
    }

    fn vmm_shutdown(&mut self, sh: &Shared) -> Result<(), Chain> {
        self.vm_delete(sh)
            .map_err(|c| prefixed(&["The VMM could not shutdown"], c))?;
        sh.events.emit("vmm", "shutdown");
        Ok(())
    }

    fn vm_snapshot(&mut self, url: &str, sh: &Shared) -> Result<(), Chain> {
        let top = "The VM could not be snapshotted";
        let Some(vm) = self.vm.as_mut() else {
            return Err(chain(&[top, "VM is not running"]));
        };
        self.console = None;
        sh.events.emit("vm", "snapshotting");
        let snap_err = |m: String| {
            vec![
                top.to_string(),
                "Cannot snapshot VM".into(),
                "Failed to snapshot migratable component".into(),
                m,
            ]
        };
        if vm.state != VmState::Paused {
            return Err(snap_err("Trying to snapshot while VM is running".into()));
        }
        if sh.pvm {
            return Err(snap_err(with_backtrace_note(
                "Could not get vCPU state GetNestedState(Invalid argument (os error 22))".into(),
            )));
        }
        sh.events.emit("vm", "snapshotted");
        let send_err = |m: String| {
            vec![
                top.to_string(),
                "Cannot send VM snapshot".into(),
                "Failed to send migratable component snapshot".into(),
                m,
            ]
        };
        let dir = url_to_path(url).map_err(send_err)?;
        let Some(config) = self.config.clone() else {
            return Err(chain(&[top, "VM is not created"]));
        };
        let create = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.join(name))
                .map_err(|e| send_err(e.to_string()))
        };
        let mut f = create("config.json")?;
        let text = serde_json::to_string(&config).map_err(|e| send_err(e.to_string()))?;
        f.write_all(text.as_bytes())
            .map_err(|e| send_err(e.to_string()))?;
        let macs: BTreeMap<String, String> = config
            .net
            .iter()
            .flatten()
            .filter_map(|n| n.id.clone().map(|id| (id, n.mac.to_string())))
            .collect();
        let state = serde_json::json!({
            "standin": {"version": BUILD_VERSION},
            "net_macs": macs,
            "hooks_pending": vm.hooks_pending.load(Ordering::SeqCst),
            "snapshots": {},
        });
        let mut f = create("state.json")?;
        f.write_all(state.to_string().as_bytes())
            .map_err(|e| send_err(e.to_string()))?;
        // Guest RAM: sparse where it was never written.
        let mem = create("memory-ranges")?;
        vm.memory.save(&mem).map_err(|e| send_err(e.to_string()))?;
        Ok(())
    }

    fn vm_restore(&mut self, rc: cfg::RestoreConfig, sh: &Shared) -> Result<(), Chain> {
        let top = "The VM could not be restored";
        if self.vm.is_some() || self.config.is_some() {
            return Err(chain(&[top, "VM is already created"]));
        }
        let Some(url) = rc.source_url.to_str().map(str::to_string) else {
            return Err(chain(&[top, "Invalid restore source URL"]));
        };
        let restore_err = |first: &str, m: String| {
            vec![
                top.to_string(),
                "Cannot restore VM".into(),
                first.to_string(),
                m,
            ]
        };
        let recv = "Failed to receive migratable component snapshot";
        let send = "Failed to send migratable component snapshot";
        let dir = url_to_path(&url).map_err(|m| restore_err(send, m))?;
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| restore_err(recv, e.to_string()))
        };
        let mut config: VmConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| restore_err(recv, e.to_string()))?;
        let state: serde_json::Value = serde_json::from_slice(&read("state.json")?)
            .map_err(|e| restore_err(recv, e.to_string()))?;
        let result = (|| -> Result<Vm, Chain> {
            let console = pre_create_console_devices(&mut config)?;
            self.console = Some(console.clone());
            let mem_err = |e: io::Error| {
                chain(&[
                    "Memory manager error",
                    "Failed to restore migratable component",
                    &e.to_string(),
                ])
            };
            let mut mem = File::open(dir.join("memory-ranges")).map_err(mem_err)?;
            let mut vm = Vm::new(&mut config, console, Some(&state))?;
            // Guest memory is copied in, so restore time grows with RAM as in v50.
            vm.memory.restore(&mut mem).map_err(mem_err)?;
            Ok(vm)
        })();
        self.config = Some(config);
        let mut vm = match result {
            Ok(vm) => vm,
            Err(c) => {
                let _ = self.vm_delete(sh);
                return Err(prefixed(&[top], c));
            }
        };
        sh.events.emit("vm", "restoring");
        if let Err(c) = vm.lock_disks() {
            self.vm = Some(vm);
            return Err(prefixed(&[top], c));
        }
        vm.hooks_pending.store(
            state
                .get("hooks_pending")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            Ordering::SeqCst,
        );
        if let Some(config) = &self.config {
            vm.start_guest(config, GuestMode::Restored, true, sh);
        }
        self.vm = Some(vm);
        sh.events.emit("vm", "restored");
        Ok(())
    }

    fn vm_counters(&self) -> Result<Vec<u8>, Chain> {
        let Some(vm) = &self.vm else {
            return Err(chain(&[
                "The VM info is not available",
                "VM is not running",
            ]));
        };
        let mut out = serde_json::Map::new();
        for d in &vm.disks {
            out.insert(
                d.id.clone(),
                serde_json::json!({
                    "read_bytes": 0, "write_bytes": 0, "read_ops": 0, "write_ops": 0,
                    "read_latency_min": u64::MAX, "read_latency_max": u64::MAX,
                    "read_latency_avg": u64::MAX / 10000,
                    "write_latency_min": u64::MAX, "write_latency_max": u64::MAX,
                    "write_latency_avg": u64::MAX / 10000}),
            );
        }
        for n in &vm.nets {
            out.insert(
                n.id.clone(),
                serde_json::json!({"rx_bytes": 0, "rx_frames": 0, "tx_bytes": 0, "tx_frames": 0}),
            );
        }
        serde_json::to_vec(&out).map_err(|e| chain(&[&e.to_string()]))
    }

    fn vm_add_disk(&mut self, mut d: cfg::DiskConfig) -> Result<Option<Vec<u8>>, Chain> {
        let top = "The disk could not be added to the VM";
        let Some(config) = self.config.as_mut() else {
            return Err(chain(&[top, "VM is not created"]));
        };
        let mut probe = config.clone();
        probe.disks.get_or_insert_with(Vec::new).push(d.clone());
        probe.validate().map_err(|c| prefixed(&[top], c))?;
        let Some(vm) = self.vm.as_mut() else {
            config.disks.get_or_insert_with(Vec::new).push(d);
            return Ok(None);
        };
        let id = d.id.clone().unwrap_or_else(|| vm.next_name("_disk"));
        d.id = Some(id.clone());
        let file = open_disk(&d).map_err(|c| prefixed(&[top], c))?;
        let dev = DiskDev {
            id: id.clone(),
            path: d.path.clone().unwrap_or_default(),
            file,
            readonly: d.readonly,
        };
        dev.try_lock().map_err(|c| {
            log(
                "ERROR",
                "vmm",
                "vmm/src/lib.rs:2085",
                &format!(
                    "Error when adding new disk to the VM: DeviceManager(DiskLockError(LockDiskImage {{ error: AlreadyLocked, lock_type: {}, path: {:?} }}))",
                    if dev.readonly { "Read" } else { "Write" },
                    dev.path
                ),
            );
            prefixed(&[top, "Error from device manager"], c)
        })?;
        let bdf = vm.add_pci_node(&id);
        vm.disks.push(dev);
        config.disks.get_or_insert_with(Vec::new).push(d);
        Ok(Some(
            serde_json::to_vec(&PciDeviceInfo { id, bdf }).unwrap_or_default(),
        ))
    }

    fn vm_add_net(&mut self, mut n: cfg::NetConfig) -> Result<Option<Vec<u8>>, Chain> {
        let top = "The network device could not be added to the VM";
        let Some(config) = self.config.as_mut() else {
            return Err(chain(&[top, "VM is not created"]));
        };
        let mut probe = config.clone();
        probe.net.get_or_insert_with(Vec::new).push(n.clone());
        probe.validate().map_err(|c| prefixed(&[top], c))?;
        let Some(vm) = self.vm.as_mut() else {
            config.net.get_or_insert_with(Vec::new).push(n);
            return Ok(None);
        };
        let id = n.id.clone().unwrap_or_else(|| vm.next_name("_net"));
        n.id = Some(id.clone());
        let (fds, name) = open_tap(&mut n).map_err(|c| {
            prefixed(
                &[
                    top,
                    "Error from device manager",
                    "Cannot create virtio-net device",
                    "Failed to open taps",
                ],
                c,
            )
        })?;
        let bdf = vm.add_pci_node(&id);
        vm.nets.push(NetDev {
            id: id.clone(),
            _tap_name: name,
            _fds: fds,
        });
        config.net.get_or_insert_with(Vec::new).push(n);
        Ok(Some(
            serde_json::to_vec(&PciDeviceInfo { id, bdf }).unwrap_or_default(),
        ))
    }

    fn vm_remove_device(&mut self, id: &str) -> Result<(), Chain> {
        let top = "The device could not be removed from the VM";
        let Some(config) = self.config.as_mut() else {
            return Err(chain(&[top, "VM is not created"]));
        };
        let in_config = config
            .disks
            .iter()
            .flatten()
            .any(|d| d.id.as_deref() == Some(id))
            || config
                .net
                .iter()
                .flatten()
                .any(|n| n.id.as_deref() == Some(id));
        if let Some(vm) = self.vm.as_mut() {
            let before = vm.disks.len() + vm.nets.len();
            vm.disks.retain(|d| d.id != id);
            vm.nets.retain(|n| n.id != id);
            if vm.disks.len() + vm.nets.len() == before {
                log(
                    "ERROR",
                    "vmm",
                    "vmm/src/lib.rs:2059",
                    &format!(
                        "Error when removing device from the VM: DeviceManager(UnknownDeviceId({id:?}))"
                    ),
                );
                return Err(chain(&[
                    top,
                    "Error from device manager",
                    "Failed to find device corresponding to the given identifier",
                ]));
            }
            vm.device_tree.remove(id);
            vm.device_tree.remove(&format!("_virtio-pci-{id}"));
        } else if !in_config {
            return Err(chain(&[
                top,
                &format!("No device with id {id:?} to remove"),
            ]));
        }
        if let Some(d) = config.disks.as_mut() {
            d.retain(|d| d.id.as_deref() != Some(id));
        }
        if let Some(n) = config.net.as_mut() {
            n.retain(|n| n.id.as_deref() != Some(id));
        }
        Ok(())
    }

    fn vm_resize(&mut self, r: cfg::VmResizeData, sh: &Shared) -> Result<(), Chain> {
        let top = "The VM could not be resized";
        let Some(config) = self.config.as_mut() else {
            return Err(chain(&[top, "VM is not created"]));
        };
        if self.vm.is_some() {
            sh.events.emit("vm", "resizing");
            if let Some(v) = r.desired_vcpus {
                if v > config.cpus.max_vcpus {
                    log(
                        "ERROR",
                        "vmm",
                        "vmm/src/lib.rs:1946",
                        "Error when resizing VM: CpuManager(DesiredVCpuCountExceedsMax)",
                    );
                    return Err(chain(&[
                        top,
                        "Error from CPU manager",
                        "Requested vCPUs exceed maximum",
                    ]));
                }
                config.cpus.boot_vcpus = v;
            }
            if r.desired_ram.is_some() || r.desired_balloon.is_some() {
                return Err(chain(&[
                    top,
                    "Memory manager error",
                    "stand-in: memory resizing of a running VM is not emulated",
                ]));
            }
            sh.events.emit("vm", "resized");
        } else {
            if let Some(v) = r.desired_vcpus {
                config.cpus.boot_vcpus = v;
            }
            if let Some(m) = r.desired_ram {
                config.memory.size = m;
            }
            if let (Some(b), Some(bc)) = (r.desired_balloon, config.balloon.as_mut()) {
                bc.size = b;
            }
        }
        Ok(())
    }

    /// Operations the stand-in accepts but does not emulate: the right top message, the right
    /// answer when no VM exists, and an honest "not emulated" otherwise.
    fn not_emulated(&self, top: &str, needs_vm: bool) -> Result<Option<Vec<u8>>, Chain> {
        let missing = if needs_vm {
            self.vm.is_none()
        } else {
            self.config.is_none()
        };
        if missing {
            let why = if needs_vm {
                "VM is not running"
            } else {
                "VM is not created"
            };
            return Err(chain(&[top, why]));
        }
        Err(chain(&[top, "stand-in: this operation is not emulated"]))
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: micro_http's behaviour as Cloud Hypervisor uses it.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Put,
    Patch,
}

struct Request {
    method: Method,
    uri: String,
    body: Option<Vec<u8>>,
}

struct Response {
    status: u16,
    body: Option<Vec<u8>>,
    server: &'static str,
}

const CH_SERVER: &str = "Cloud Hypervisor API";

impl Response {
    fn new(status: u16) -> Response {
        Response {
            status,
            body: None,
            server: CH_SERVER,
        }
    }

    fn json(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            body: Some(body),
            server: CH_SERVER,
        }
    }

    fn errors(status: u16, msgs: &[String]) -> Response {
        Response::json(
            status,
            serde_json::to_vec(msgs).unwrap_or_else(|_| b"[]".to_vec()),
        )
    }

    fn bad_request() -> Response {
        Response::errors(400, &["Bad Request".to_string()])
    }

    fn api_error(c: Chain) -> Response {
        let mut msgs = vec!["Error from API".to_string()];
        msgs.extend(c);
        Response::errors(500, &msgs)
    }

    fn parse_error(msg: &str) -> Response {
        Response {
            status: 400,
            body: Some(
                format!(
                    "{{ \"error\": \"{msg}\nAll previous unanswered requests will be dropped.\" }}"
                )
                .into_bytes(),
            ),
            server: "Firecracker API",
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} \r\nServer: {}\r\nConnection: keep-alive\r\n",
            self.status, self.server
        )
        .into_bytes();
        if self.status != 100 && self.status != 204 {
            let len = self.body.as_ref().map(|b| b.len()).unwrap_or(0);
            out.extend_from_slice(
                format!("Content-Type: application/json\r\nContent-Length: {len}\r\n").as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
        if let Some(b) = &self.body {
            out.extend_from_slice(b);
        }
        out
    }
}

const MAX_PAYLOAD: usize = 51200;
const LINE_BUFFER: usize = 1024;

struct Head {
    method: Method,
    uri: String,
    content_length: usize,
    expect: bool,
    len: usize,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_request_line(line: &[u8]) -> Result<(Method, String), String> {
    let Some(m_end) = find(line, b" ") else {
        return Err("Invalid request.".into());
    };
    let rest = &line[m_end + 1..];
    let Some(u_end) = find(rest, b" ") else {
        return Err("Invalid request.".into());
    };
    let method = match &line[..m_end] {
        b"GET" => Method::Get,
        b"PUT" => Method::Put,
        b"PATCH" => Method::Patch,
        _ => return Err("Invalid HTTP Method: Unsupported HTTP method.".into()),
    };
    let uri = &rest[..u_end];
    if uri.is_empty() {
        return Err("Invalid URI: Empty URI not allowed.".into());
    }
    let uri = std::str::from_utf8(uri).map_err(|_| "Invalid URI: Cannot parse URI as UTF-8.")?;
    match &rest[u_end + 1..] {
        b"HTTP/1.0" | b"HTTP/1.1" => {}
        _ => return Err("Invalid HTTP Version: Unsupported HTTP version.".into()),
    }
    Ok((method, uri.to_string()))
}

/// A parse failure: micro_http's message, and whether it struck while reading headers. In that
/// case micro_http stays in its header state and reads every later request line on the
/// connection as a (malformed) header: the connection is unusable from then on.
struct ParseFail {
    msg: String,
    in_headers: bool,
}

/// Parses a request head if it is complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ParseFail> {
    let line_fail = |msg: String| ParseFail {
        msg,
        in_headers: false,
    };
    let Some(rl_end) = find(buf, b"\r\n") else {
        if buf.len() >= LINE_BUFFER {
            return Err(line_fail("Invalid request.".into()));
        }
        return Ok(None);
    };
    let (method, uri) = parse_request_line(&buf[..rl_end]).map_err(line_fail)?;
    parse_headers(buf, rl_end + 2, method, uri).map_err(|msg| ParseFail {
        msg,
        in_headers: true,
    })
}

fn parse_headers(
    buf: &[u8],
    start: usize,
    method: Method,
    uri: String,
) -> Result<Option<Head>, String> {
    let mut head = Head {
        method,
        uri,
        content_length: 0,
        expect: false,
        len: 0,
    };
    let mut pos = start;
    loop {
        let Some(rel) = find(&buf[pos..], b"\r\n") else {
            if buf.len() - pos >= LINE_BUFFER {
                return Err(format!(
                    "Invalid header. Reason: Invalid content length. Header: {}",
                    String::from_utf8_lossy(&buf[pos..])
                ));
            }
            return Ok(None);
        };
        if rel == 0 {
            pos += 2;
            break;
        }
        let line = std::str::from_utf8(&buf[pos..pos + rel]).map_err(|e| {
            format!("Invalid header. Reason: Header contains invalid characters. Key: {e}")
        })?;
        let mut parts = line.splitn(2, ':');
        let key = parts.next().unwrap_or("");
        let Some(value) = parts.next() else {
            return Err(format!(
                "Invalid header. Reason: Header is incorrectly formatted. Key: {key}"
            ));
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                head.content_length = value.trim().parse::<u32>().map_err(|_| {
                    format!("Invalid header. Reason: Invalid value. Key:{key}; Value:{value}")
                })? as usize;
            }
            // micro_http notes "chunked" but never decodes it: the chunk framing is then read
            // as the next request line, which fails (the 400 clients see).
            "expect" if value.trim() == "100-continue" => head.expect = true,
            _ => {}
        }
        pos += rel + 2;
    }
    if head.content_length > MAX_PAYLOAD {
        return Err(format!(
            "Request payload with size {} is larger than the limit of {MAX_PAYLOAD} allowed by server.",
            head.content_length
        ));
    }
    head.len = pos;
    Ok(Some(head))
}

enum After {
    Nothing,
    Quit,
    Crash(u64),
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        Response::errors(
            400,
            &["Failed to deserialize JSON".to_string(), e.to_string()],
        )
    })
}

fn reply(r: Result<Option<Vec<u8>>, Chain>) -> Response {
    match r {
        Ok(Some(b)) => Response::json(200, b),
        Ok(None) => Response::new(204),
        Err(c) => Response::api_error(c),
    }
}

fn abs_path(uri: &str) -> &str {
    if let Some(rest) = uri.strip_prefix("http://") {
        return match rest.find('/') {
            Some(i) => &rest[i..],
            None => "",
        };
    }
    if uri.starts_with('/') {
        uri
    } else {
        ""
    }
}

const BODYLESS: [&str; 8] = [
    "vm.boot",
    "vm.delete",
    "vm.shutdown",
    "vm.reboot",
    "vm.pause",
    "vm.resume",
    "vm.power-button",
    "vm.nmi",
];

const WITH_BODY: [&str; 16] = [
    "vm.add-device",
    "vm.add-user-device",
    "vm.add-disk",
    "vm.add-fs",
    "vm.add-net",
    "vm.add-pmem",
    "vm.add-vdpa",
    "vm.add-vsock",
    "vm.remove-device",
    "vm.resize",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.restore",
    "vm.snapshot",
    "vm.receive-migration",
    "vm.send-migration",
];

fn handle(sh: &Shared, req: &Request) -> (Response, After) {
    let path = abs_path(&req.uri);
    let Some(ep) = path.strip_prefix("/api/v1/") else {
        return (
            Response::errors(404, &["Not Found".to_string()]),
            After::Nothing,
        );
    };
    let body = req.body.as_deref();
    let nothing = |r: Response| (r, After::Nothing);
    match ep {
        "vm.create" => nothing(match (req.method, body) {
            (Method::Put, None) => Response::json(400, vec![]),
            (Method::Put, Some(b)) => match parse_body::<VmConfig>(b) {
                Ok(mut c) => {
                    // v50 drops descriptor numbers sent in a create body.
                    for n in c.net.iter_mut().flatten() {
                        n.fds = None;
                    }
                    reply(lock(&sh.vmm).vm_create(c).map(|_| None))
                }
                Err(r) => r,
            },
            _ => Response::bad_request(),
        }),
        "vm.info" => nothing(match req.method {
            Method::Get => match lock(&sh.vmm).vm_info() {
                Ok(v) => Response::json(200, v),
                Err(c) => Response::api_error(c),
            },
            _ => Response::bad_request(),
        }),
        "vmm.ping" => nothing(match req.method {
            Method::Get => {
                let _vmm = lock(&sh.vmm);
                let pong = VmmPingResponse {
                    build_version: BUILD_VERSION,
                    version: PKG_VERSION,
                    pid: std::process::id() as i64,
                    features: FEATURES,
                };
                Response::json(200, serde_json::to_vec(&pong).unwrap_or_default())
            }
            _ => Response::bad_request(),
        }),
        "vmm.shutdown" => match req.method {
            Method::Put => {
                let mut vmm = lock(&sh.vmm);
                match vmm.vmm_shutdown(sh) {
                    Ok(()) => {
                        // Hold the VMM until the process exits: nothing else is served.
                        sh.exiting.store(true, Ordering::SeqCst);
                        std::mem::forget(vmm);
                        (Response::json(200, vec![]), After::Quit)
                    }
                    Err(c) => (Response::api_error(c), After::Nothing),
                }
            }
            _ => nothing(Response::bad_request()),
        },
        "vm.counters" => nothing(match req.method {
            Method::Get => reply(lock(&sh.vmm).vm_counters().map(Some)),
            Method::Put => Response::bad_request(),
            Method::Patch => Response::json(400, vec![]),
        }),
        ep if BODYLESS.contains(&ep) => match req.method {
            Method::Patch => nothing(Response::json(400, vec![])),
            Method::Get => nothing(Response::bad_request()),
            Method::Put if body.is_some() => nothing(Response::bad_request()),
            Method::Put => {
                let mut vmm = lock(&sh.vmm);
                let r = match ep {
                    "vm.boot" => match vmm.vm_boot(sh) {
                        Ok(true) => {
                            let gen = vmm.vm.as_ref().map(|v| v.gen).unwrap_or(0);
                            return (Response::new(204), After::Crash(gen));
                        }
                        Ok(false) => Ok(None),
                        Err(c) => Err(c),
                    },
                    "vm.delete" => vmm.vm_delete(sh).map(|_| None),
                    "vm.shutdown" => vmm.vm_shutdown(sh).map(|_| None),
                    "vm.reboot" => vmm.vm_reboot(sh).map(|_| None),
                    "vm.pause" => vmm.vm_pause(sh).map(|_| None),
                    "vm.resume" => vmm.vm_resume(sh).map(|_| None),
                    "vm.power-button" => match vmm.vm {
                        // The ACPI button reaches the guest; a busybox /init ignores it.
                        Some(_) => Ok(None),
                        None => Err(chain(&[
                            "Error triggering power button",
                            "VM is not running",
                        ])),
                    },
                    _ => match vmm.vm {
                        Some(_) => Ok(None),
                        None => Err(chain(&["Error triggering NMI", "VM is not running"])),
                    },
                };
                nothing(reply(r))
            }
        },
        ep if WITH_BODY.contains(&ep) => match (req.method, body) {
            (Method::Patch, _) => nothing(Response::json(400, vec![])),
            (Method::Get, _) | (Method::Put, None) => nothing(Response::bad_request()),
            (Method::Put, Some(b)) => nothing(with_body(sh, ep, b)),
        },
        _ => nothing(Response::errors(404, &["Not Found".to_string()])),
    }
}

fn with_body(sh: &Shared, ep: &str, b: &[u8]) -> Response {
    macro_rules! body {
        ($t:ty) => {
            match parse_body::<$t>(b) {
                Ok(v) => v,
                Err(r) => return r,
            }
        };
    }
    match ep {
        "vm.snapshot" => {
            let c = body!(cfg::VmSnapshotConfig);
            reply(
                lock(&sh.vmm)
                    .vm_snapshot(&c.destination_url, sh)
                    .map(|_| None),
            )
        }
        "vm.restore" => {
            let c = body!(cfg::RestoreConfig);
            // Descriptors for restored nets come only with SCM_RIGHTS, which never arrive here.
            let expected: usize = c.net_fds.iter().flatten().map(|n| n.num_fds).sum();
            if expected != 0 {
                return Response::bad_request();
            }
            reply(lock(&sh.vmm).vm_restore(c, sh).map(|_| None))
        }
        "vm.add-disk" => {
            let d = body!(cfg::DiskConfig);
            reply(lock(&sh.vmm).vm_add_disk(d))
        }
        "vm.add-net" => {
            let mut n = body!(cfg::NetConfig);
            n.fds = None;
            reply(lock(&sh.vmm).vm_add_net(n))
        }
        "vm.remove-device" => {
            let d = body!(cfg::VmRemoveDeviceData);
            reply(lock(&sh.vmm).vm_remove_device(&d.id).map(|_| None))
        }
        "vm.resize" => {
            let r = body!(cfg::VmResizeData);
            reply(lock(&sh.vmm).vm_resize(r, sh).map(|_| None))
        }
        "vm.add-device" => {
            let _ = body!(cfg::DeviceConfig);
            reply(lock(&sh.vmm).not_emulated("The device could not be added to the VM", false))
        }
        "vm.add-user-device" => {
            let _ = body!(cfg::UserDeviceConfig);
            reply(lock(&sh.vmm).not_emulated("The user device could not be added to the VM", false))
        }
        "vm.add-fs" => {
            let _ = body!(cfg::FsConfig);
            reply(lock(&sh.vmm).not_emulated("The fs could not be added to the VM", false))
        }
        "vm.add-pmem" => {
            let _ = body!(cfg::PmemConfig);
            reply(lock(&sh.vmm).not_emulated("The pmem device could not be added to the VM", false))
        }
        "vm.add-vdpa" => {
            let _ = body!(cfg::VdpaConfig);
            reply(lock(&sh.vmm).not_emulated("The vDPA device could not be added to the VM", false))
        }
        "vm.add-vsock" => {
            let _ = body!(cfg::VsockConfig);
            reply(
                lock(&sh.vmm).not_emulated("The vsock device could not be added to the VM", false),
            )
        }
        "vm.resize-disk" => {
            let _ = body!(cfg::VmResizeDiskData);
            reply(lock(&sh.vmm).not_emulated("The disk could not be resized", false))
        }
        "vm.resize-zone" => {
            let _ = body!(cfg::VmResizeZoneData);
            reply(lock(&sh.vmm).not_emulated("The memory zone could not be resized", false))
        }
        "vm.receive-migration" => {
            let _ = body!(cfg::VmReceiveMigrationData);
            reply(Err(chain(&[
                "Error starting migration receiver",
                "stand-in: migration is not emulated",
            ])))
        }
        _ => {
            let _ = body!(cfg::VmSendMigrationData);
            reply(Err(chain(&[
                "Error starting migration sender",
                "stand-in: migration is not emulated",
            ])))
        }
    }
}

fn serve_connection(mut stream: UnixStream, sh: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut pending: Option<Head> = None;
    let mut stuck_in_headers = false;
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if stuck_in_headers {
            let data = &chunk[..n];
            let line = match find(data, b"\r\n") {
                Some(i) => &data[..i],
                None => data,
            };
            let msg = format!(
                "Invalid header. Reason: Header is incorrectly formatted. Key: {}",
                String::from_utf8_lossy(line)
            );
            if stream
                .write_all(&Response::parse_error(&msg).bytes())
                .is_err()
            {
                return;
            }
            continue;
        }
        buf.extend_from_slice(&chunk[..n]);
        // Everything parsed out of one read is answered together, and a parse error drops the
        // requests of that read, as micro_http does.
        let mut ready: Vec<Request> = Vec::new();
        let mut failure: Option<ParseFail> = None;
        loop {
            if pending.is_none() {
                match parse_head(&buf) {
                    Ok(Some(h)) => {
                        buf.drain(..h.len);
                        if h.expect && h.content_length > 0 {
                            let _ = stream.write_all(
                                &Response {
                                    status: 100,
                                    body: None,
                                    server: "Firecracker API",
                                }
                                .bytes(),
                            );
                        }
                        pending = Some(h);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let Some(h) = pending.take() else { break };
            if buf.len() < h.content_length {
                pending = Some(h);
                break;
            }
            let body = if h.content_length == 0 {
                None
            } else {
                Some(buf.drain(..h.content_length).collect())
            };
            ready.push(Request {
                method: h.method,
                uri: h.uri,
                body,
            });
        }
        if let Some(e) = failure {
            buf.clear();
            pending = None;
            stuck_in_headers = e.in_headers;
            if stream
                .write_all(&Response::parse_error(&e.msg).bytes())
                .is_err()
            {
                return;
            }
            continue;
        }
        for req in ready {
            let (resp, after) = handle(&sh, &req);
            let wrote = stream.write_all(&resp.bytes()).is_ok();
            match after {
                After::Nothing => {}
                After::Quit => {
                    let _ = stream.flush();
                    let _ = sh.ctl.send(Ctl::ApiShutdown);
                }
                After::Crash(gen) => {
                    let _ = sh.ctl.send(Ctl::Crash(gen));
                }
            }
            if !wrote {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Command line.

struct Args {
    api_socket: Option<String>,
    event_monitor: Option<String>,
    version: bool,
    verbose: u32,
    log_file: Option<String>,
    kernel: Option<String>,
    firmware: Option<String>,
    initramfs: Option<String>,
    cmdline: Option<String>,
    cpus: Option<String>,
    memory: Option<String>,
    disks: Vec<String>,
    nets: Vec<String>,
    rng: Option<String>,
    serial: Option<String>,
    console: Option<String>,
    pvpanic: bool,
    restore: Option<String>,
}

fn usage_error(msg: &str) -> ! {
    eprintln!(
        "error: {msg}\n\nUsage: cloud-hypervisor [OPTIONS]\n\nFor more information, try '--help'."
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        api_socket: None,
        event_monitor: None,
        version: false,
        verbose: 0,
        log_file: None,
        kernel: None,
        firmware: None,
        initramfs: None,
        cmdline: None,
        cpus: None,
        memory: None,
        disks: vec![],
        nets: vec![],
        rng: None,
        serial: None,
        console: None,
        pvpanic: false,
        restore: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let raw = argv[i].clone();
        let (flag, inline) = match raw.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (raw.clone(), None),
        };
        i += 1;
        let mut value = |name: &str| -> String {
            if let Some(v) = &inline {
                return v.clone();
            }
            match argv.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => usage_error(&format!(
                    "a value is required for '{name} <{}>' but none was supplied",
                    name.trim_start_matches('-')
                )),
            }
        };
        match flag.as_str() {
            "-V" | "--version" => a.version = true,
            "-v" => a.verbose += 1,
            "-vv" => a.verbose += 2,
            "-vvv" => a.verbose += 3,
            "--api-socket" => a.api_socket = Some(value("--api-socket")),
            "--event-monitor" => a.event_monitor = Some(value("--event-monitor")),
            "--log-file" => a.log_file = Some(value("--log-file")),
            "--kernel" => a.kernel = Some(value("--kernel")),
            "--firmware" => a.firmware = Some(value("--firmware")),
            "--initramfs" => a.initramfs = Some(value("--initramfs")),
            "--cmdline" => a.cmdline = Some(value("--cmdline")),
            "--cpus" => a.cpus = Some(value("--cpus")),
            "--memory" => a.memory = Some(value("--memory")),
            "--rng" => a.rng = Some(value("--rng")),
            "--serial" => a.serial = Some(value("--serial")),
            "--console" => a.console = Some(value("--console")),
            "--restore" => a.restore = Some(value("--restore")),
            "--seccomp" => {
                let _ = value("--seccomp");
            }
            "--pvpanic" => a.pvpanic = true,
            "--landlock" => {}
            "--disk" | "--net" => {
                // Like clap's num_args(1..): every following word up to the next option.
                let mut vals = Vec::new();
                if let Some(v) = &inline {
                    vals.push(v.clone());
                }
                while let Some(v) = argv.get(i) {
                    if v.starts_with('-') {
                        break;
                    }
                    vals.push(v.clone());
                    i += 1;
                }
                if vals.is_empty() {
                    usage_error(&format!(
                        "a value is required for '{flag}' but none was supplied"
                    ));
                }
                if flag == "--disk" {
                    a.disks.extend(vals);
                } else {
                    a.nets.extend(vals);
                }
            }
            other => usage_error(&format!("unexpected argument '{other}' found")),
        }
    }
    a
}

/// `key=value,key=value` as OptionParser splits it (no quoting support needed here).
fn options(input: &str, known: &[&str], what: &str) -> Result<BTreeMap<String, String>, Chain> {
    let mut out = BTreeMap::new();
    if input.trim().is_empty() {
        return Ok(out);
    }
    for opt in input.split(',') {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        if !known.contains(&k) {
            return Err(chain(&[
                &format!("Error parsing --{what}"),
                &format!("unknown option: {k}"),
            ]));
        }
        out.insert(k.to_string(), v.unwrap_or("").trim().to_string());
    }
    Ok(out)
}

fn conv<T: std::str::FromStr>(
    o: &BTreeMap<String, String>,
    k: &str,
    what: &str,
) -> Result<Option<T>, Chain> {
    match o.get(k) {
        None => Ok(None),
        Some(v) => v.parse::<T>().map(Some).map_err(|_| {
            chain(&[
                &format!("Error parsing --{what}"),
                &format!("unable to convert {v} for {k}"),
            ])
        }),
    }
}

fn toggle(o: &BTreeMap<String, String>, k: &str, what: &str) -> Result<bool, Chain> {
    match o.get(k).map(String::as_str) {
        None => Ok(false),
        Some("on") | Some("true") | Some("") => Ok(true),
        Some("off") | Some("false") => Ok(false),
        Some(v) => Err(chain(&[
            &format!("Error parsing --{what}"),
            &format!("unable to convert {v} for {k}"),
        ])),
    }
}

fn byte_size(v: &str) -> Option<u64> {
    let (num, mult) = match v.chars().last() {
        Some('K') => (&v[..v.len() - 1], 1u64 << 10),
        Some('M') => (&v[..v.len() - 1], 1 << 20),
        Some('G') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn console_from_cli(v: &str) -> Result<ConsoleConfig, Chain> {
    // v50 parses --serial with ConsoleConfig::parse too, so its errors say "--console".
    let what = "console";
    let o = options(
        v,
        &["off", "pty", "tty", "null", "file", "iommu", "socket"],
        what,
    )?;
    let mut c = ConsoleConfig::with_mode(ConsoleOutputMode::Off);
    if o.contains_key("off") {
    } else if o.contains_key("pty") {
        c.mode = ConsoleOutputMode::Pty;
    } else if o.contains_key("tty") {
        c.mode = ConsoleOutputMode::Tty;
    } else if o.contains_key("null") {
        c.mode = ConsoleOutputMode::Null;
    } else if let Some(f) = o.get("file") {
        c.mode = ConsoleOutputMode::File;
        c.file = Some(PathBuf::from(f));
    } else if let Some(s) = o.get("socket") {
        c.mode = ConsoleOutputMode::Socket;
        c.socket = Some(PathBuf::from(s));
    } else {
        return Err(chain(&[&format!(
            "Error parsing --{what}: invalid console mode given"
        )]));
    }
    c.iommu = toggle(&o, "iommu", what)?;
    Ok(c)
}

fn config_from_cli(a: &Args) -> Result<VmConfig, Chain> {
    let mut c: VmConfig = serde_json::from_str("{}").map_err(|e| chain(&[&e.to_string()]))?;
    if let Some(v) = &a.cpus {
        let o = options(
            v,
            &[
                "boot",
                "max",
                "topology",
                "kvm_hyperv",
                "max_phys_bits",
                "affinity",
                "features",
                "nested",
            ],
            "cpus",
        )?;
        let boot = conv::<u32>(&o, "boot", "cpus")?.unwrap_or(1);
        c.cpus.boot_vcpus = boot;
        c.cpus.max_vcpus = conv::<u32>(&o, "max", "cpus")?.unwrap_or(boot);
    }
    if let Some(v) = &a.memory {
        let o = options(
            v,
            &[
                "size",
                "file",
                "mergeable",
                "hotplug_method",
                "hotplug_size",
                "hotplugged_size",
                "shared",
                "hugepages",
                "hugepage_size",
                "prefault",
                "thp",
            ],
            "memory",
        )?;
        if let Some(s) = o.get("size") {
            c.memory.size = byte_size(s).ok_or_else(|| {
                chain(&[
                    "Error parsing --memory",
                    &format!("unable to convert {s} for size"),
                ])
            })?;
        }
        c.memory.shared = toggle(&o, "shared", "memory")?;
        c.memory.hugepages = toggle(&o, "hugepages", "memory")?;
        c.memory.prefault = toggle(&o, "prefault", "memory")?;
    }
    if a.kernel.is_some() || a.firmware.is_some() {
        c.payload = Some(cfg::PayloadConfig {
            firmware: a.firmware.as_ref().map(PathBuf::from),
            kernel: a.kernel.as_ref().map(PathBuf::from),
            cmdline: a.cmdline.clone(),
            initramfs: a.initramfs.as_ref().map(PathBuf::from),
        });
    }
    let disk_keys = [
        "path",
        "readonly",
        "direct",
        "iommu",
        "queue_size",
        "num_queues",
        "vhost_user",
        "socket",
        "bw_size",
        "bw_one_time_burst",
        "bw_refill_time",
        "ops_size",
        "ops_one_time_burst",
        "ops_refill_time",
        "id",
        "_disable_io_uring",
        "_disable_aio",
        "pci_segment",
        "serial",
        "rate_limit_group",
        "queue_affinity",
    ];
    let mut disks = Vec::new();
    for d in &a.disks {
        let o = options(d, &disk_keys, "disk")?;
        let mut dc: cfg::DiskConfig =
            serde_json::from_str("{\"path\":null}").map_err(|e| chain(&[&e.to_string()]))?;
        dc.path = o.get("path").map(PathBuf::from);
        dc.readonly = toggle(&o, "readonly", "disk")?;
        dc.direct = toggle(&o, "direct", "disk")?;
        dc.iommu = toggle(&o, "iommu", "disk")?;
        dc.vhost_user = toggle(&o, "vhost_user", "disk")?;
        dc.vhost_socket = o.get("socket").cloned();
        dc.num_queues = conv(&o, "num_queues", "disk")?.unwrap_or(1);
        dc.queue_size = conv(&o, "queue_size", "disk")?.unwrap_or(128);
        dc.id = o.get("id").cloned();
        dc.serial = o.get("serial").cloned();
        disks.push(dc);
    }
    if !disks.is_empty() {
        c.disks = Some(disks);
    }
    let net_keys = [
        "tap",
        "ip",
        "mask",
        "mac",
        "host_mac",
        "offload_tso",
        "offload_ufo",
        "offload_csum",
        "mtu",
        "iommu",
        "queue_size",
        "num_queues",
        "vhost_user",
        "socket",
        "vhost_mode",
        "id",
        "fd",
        "bw_size",
        "bw_one_time_burst",
        "bw_refill_time",
        "ops_size",
        "ops_one_time_burst",
        "ops_refill_time",
        "pci_segment",
    ];
    let mut nets = Vec::new();
    for n in &a.nets {
        let o = options(n, &net_keys, "net")?;
        let mut nc: cfg::NetConfig =
            serde_json::from_str("{}").map_err(|e| chain(&[&e.to_string()]))?;
        nc.tap = o.get("tap").cloned();
        nc.ip = conv(&o, "ip", "net")?;
        nc.mask = conv(&o, "mask", "net")?;
        if let Some(m) = o.get("mac") {
            nc.mac = MacAddr::parse_str(m).map_err(|_| {
                chain(&[
                    "Error parsing --net",
                    &format!("unable to convert {m} for mac"),
                ])
            })?;
        }
        if let Some(m) = o.get("host_mac") {
            nc.host_mac = Some(MacAddr::parse_str(m).map_err(|_| {
                chain(&[
                    "Error parsing --net",
                    &format!("unable to convert {m} for host_mac"),
                ])
            })?);
        }
        nc.mtu = conv(&o, "mtu", "net")?;
        nc.num_queues = conv(&o, "num_queues", "net")?.unwrap_or(2);
        nc.queue_size = conv(&o, "queue_size", "net")?.unwrap_or(256);
        nc.id = o.get("id").cloned();
        if o.contains_key("fd") {
            return Err(chain(&[
                "Error parsing --net",
                "stand-in: fd= is not emulated",
            ]));
        }
        nets.push(nc);
    }
    if !nets.is_empty() {
        c.net = Some(nets);
    }
    if let Some(r) = &a.rng {
        let o = options(r, &["src", "iommu"], "rng")?;
        if let Some(s) = o.get("src") {
            c.rng.src = PathBuf::from(s);
        }
    }
    c.serial = console_from_cli(a.serial.as_deref().unwrap_or("null"))?;
    c.console = console_from_cli(a.console.as_deref().unwrap_or("tty"))?;
    c.pvpanic = a.pvpanic;
    c.validate().map_err(|v| {
        let mut out = chain(&["Error validating configuration"]);
        out.extend(v.into_iter().skip(1));
        out
    })?;
    Ok(c)
}

fn print_error_chain(c: &[String]) -> ! {
    log(
        "ERROR",
        "main",
        "cloud-hypervisor/src/lib.rs:23",
        &format!("Fatal error: {}", c.join(": ")),
    );
    let mut text = String::from("Error: Cloud Hypervisor exited with the following ");
    if c.len() == 1 {
        text.push_str(&format!("error:\n  {}\n", c[0]));
    } else {
        text.push_str("chain of errors:\n");
        for (i, m) in c.iter().enumerate() {
            text.push_str(&format!("  {i}: {m}\n"));
        }
    }
    let _ = io::stderr().write_all(text.as_bytes());
    std::process::exit(1)
}

fn option_value(spec: &str, key: &str) -> Option<String> {
    spec.split(',')
        .find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::to_string)
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; the mask applies to this (only) thread and
    // is inherited by every thread spawned later.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn exit_clean(sh: &Shared, code: i32) -> ! {
    if let Some(p) = &sh.socket_path {
        let _ = std::fs::remove_file(p);
    }
    sh.events.settle();
    std::process::exit(code)
}

fn main() {
    // SAFETY: trivially safe; like the VMM, everything created here is private to the user.
    unsafe {
        libc::umask(0o077);
    }
    let _ = START.set(Instant::now());
    let args = parse_args();
    if args.version {
        println!("cloud-hypervisor {BUILD_VERSION}");
        if args.verbose != 0 {
            println!("Enabled features: {FEATURES:?}");
        }
        return;
    }
    if let Some(p) = &args.log_file {
        match File::create(p) {
            Ok(f) => {
                let _ = LOG.set(Mutex::new(Box::new(f)));
            }
            Err(e) => print_error_chain(&chain(&["Error creating log file", &e.to_string()])),
        }
    }
    let sigset = block_signals();

    let (socket_path, socket_fd) = match &args.api_socket {
        None => (None, None),
        Some(spec) => {
            if let Some(fd) = option_value(spec, "fd") {
                match fd.parse::<RawFd>() {
                    Ok(fd) => (None, Some(fd)),
                    Err(e) => {
                        print_error_chain(&chain(&["Error parsing --api-socket", &e.to_string()]))
                    }
                }
            } else if let Some(p) = option_value(spec, "path") {
                (Some(PathBuf::from(p)), None)
            } else {
                // v50 falls back to the whole argument as a path.
                (Some(PathBuf::from(spec)), None)
            }
        }
    };

    let event_file = match &args.event_monitor {
        None => None,
        Some(spec) => {
            let file = if let Some(fd) = option_value(spec, "fd") {
                match fd.parse::<RawFd>() {
                    // SAFETY: the caller handed this descriptor to us for the event log.
                    Ok(fd) => unsafe { File::from_raw_fd(fd) },
                    Err(_) => print_error_chain(&chain(&[
                        "Error parsing --event-monitor",
                        &format!("unable to convert {fd} for fd"),
                    ])),
                }
            } else if let Some(p) = option_value(spec, "path") {
                // A FIFO blocks here until a reader opens it, as in v50.
                match OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                {
                    Ok(f) => f,
                    Err(e) => print_error_chain(&chain(&[
                        "Error doing event monitor I/O",
                        &e.to_string(),
                    ])),
                }
            } else if spec.contains('=') {
                print_error_chain(&chain(&[
                    "Error parsing --event-monitor",
                    &format!(
                        "unknown option: {}",
                        spec.split('=').next().unwrap_or_default()
                    ),
                ]))
            } else {
                print_error_chain(&chain(&[
                    "Error parsing --event-monitor",
                    &format!("unknown option: {spec}"),
                ]))
            };
            // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
            unsafe {
                let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
            Some(file)
        }
    };
    let events = Arc::new(Events::new(event_file));

    let listener = match (&socket_path, socket_fd) {
        (Some(p), _) => match UnixListener::bind(p) {
            Ok(l) => Some(l),
            Err(e) => print_error_chain(&chain(&[
                "Failed to start the VMM thread",
                "Error creation API server's socket",
                &e.to_string(),
            ])),
        },
        // SAFETY: the caller handed us a listening socket for the API.
        (None, Some(fd)) => Some(unsafe { UnixListener::from_raw_fd(fd) }),
        (None, None) => None,
    };
    events.emit("vmm", "starting");

    let (tx, rx) = channel::<Ctl>();
    let sh = Arc::new(Shared {
        vmm: Mutex::new(Vmm {
            config: None,
            console: None,
            vm: None,
        }),
        events: events.clone(),
        ctl: tx.clone(),
        pvm: std::env::var("CHV_STANDIN_PVM").is_ok_and(|v| v == "1"),
        socket_path: socket_path.clone(),
        exiting: AtomicBool::new(false),
    });

    {
        let tx = tx.clone();
        std::thread::spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait on the set blocked in every thread.
            if unsafe { libc::sigwait(&sigset, &mut sig) } == 0 {
                let _ = tx.send(Ctl::Signal);
            }
        });
    }
    if let Some(l) = listener {
        let sh = sh.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                match s {
                    Ok(s) => {
                        let sh = sh.clone();
                        std::thread::spawn(move || serve_connection(s, sh));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }

    // A payload on the command line: create and boot right away (errors end the VMM, code 1,
    // with the socket left in place, as in v50).
    if args.kernel.is_some() || args.firmware.is_some() {
        let result = (|| -> Result<(), Chain> {
            let config =
                config_from_cli(&args).map_err(|c| prefixed(&["Error parsing config"], c))?;
            let mut vmm = lock(&sh.vmm);
            vmm.vm_create(config)
                .map_err(|c| prefixed(&["Error creating VM"], c))?;
            vmm.vm_boot(&sh)
                .map_err(|c| prefixed(&["Error booting VM"], c))?;
            Ok(())
        })();
        if let Err(c) = result {
            let _ = lock(&sh.vmm).vmm_shutdown(&sh);
            print_error_chain(&c);
        }
    } else if let Some(spec) = &args.restore {
        let result = (|| -> Result<(), Chain> {
            let url = option_value(spec, "source_url")
                .ok_or_else(|| chain(&["Error parsing restore", "unknown option: source_url"]))?;
            let rc = cfg::RestoreConfig {
                source_url: PathBuf::from(url),
                prefault: false,
                net_fds: None,
            };
            lock(&sh.vmm)
                .vm_restore(rc, &sh)
                .map_err(|c| prefixed(&["Error restoring VM"], c))
        })();
        if let Err(c) = result {
            let _ = lock(&sh.vmm).vmm_shutdown(&sh);
            print_error_chain(&c);
        }
    }

    for msg in rx.iter() {
        match msg {
            Ctl::Signal => loop {
                // A request in progress (a long snapshot, say) finishes first, as in v50.
                match sh.vmm.try_lock() {
                    Ok(mut vmm) => {
                        let _ = vmm.vmm_shutdown(&sh);
                        exit_clean(&sh, 0);
                    }
                    Err(std::sync::TryLockError::Poisoned(p)) => {
                        let _ = p.into_inner().vmm_shutdown(&sh);
                        exit_clean(&sh, 0);
                    }
                    Err(std::sync::TryLockError::WouldBlock) => {
                        if sh.exiting.load(Ordering::SeqCst) {
                            exit_clean(&sh, 0);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            },
            Ctl::ApiShutdown => exit_clean(&sh, 0),
            Ctl::GuestPowerOff(gen) => {
                let mut vmm = lock(&sh.vmm);
                let current = vmm
                    .vm
                    .as_ref()
                    .is_some_and(|v| v.gen == gen && v.state == VmState::Running);
                if current {
                    let _ = vmm.vmm_shutdown(&sh);
                    exit_clean(&sh, 0);
                }
            }
            Ctl::GuestReset(gen) => {
                let mut vmm = lock(&sh.vmm);
                let current = vmm
                    .vm
                    .as_ref()
                    .is_some_and(|v| v.gen == gen && v.state == VmState::Running);
                if current {
                    if let Err(c) = vmm.vm_reboot(&sh) {
                        // v50's control loop ends on a failed reboot: the VMM exits with it.
                        let mut all =
                            chain(&["VMM thread exited with error", "Error rebooting VM"]);
                        all.extend(c);
                        print_error_chain(&all);
                    }
                }
            }
            Ctl::Crash(gen) => {
                let vmm = lock(&sh.vmm);
                if vmm.vm.as_ref().is_some_and(|v| v.gen == gen) {
                    std::thread::sleep(Duration::from_millis(5));
                    log(
                        "ERROR",
                        "vcpu0",
                        "vmm/src/cpu.rs:1256",
                        "VCPU generated error: VcpuRun(Failed to run vcpu\n\nCaused by:\n    Unexpected exit reason on vcpu run: InternalError",
                    );
                    eprintln!("==== Possible seccomp violation ====\nTry running with `strace -ff` to identify the cause and open an issue: https://github.com/cloud-hypervisor/cloud-hypervisor/issues/new");
                    // SAFETY: restore the default action and die of it, as the VMM does.
                    unsafe {
                        libc::signal(libc::SIGSYS, libc::SIG_DFL);
                        libc::raise(libc::SIGSYS);
                    }
                    std::process::abort();
                }
            }
        }
    }
}
