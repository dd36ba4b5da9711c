//! The host model: facts about this machine that `doctor` judges and `setup` diffs against the
//! profile. Everything here only reads, and knows nothing of verdicts.
//!
//! - [`net`]: links (kind, state, master, bridge-port and TUN details), IPv6 addresses with
//!   their DAD flags, and IPv6 routes, from rtnetlink dumps (no privilege needed).
//! - [`sysctl`]: `net.ipv6.conf.*` and `bridge-nf-call-ip6tables` from `/proc/sys`.
//! - [`nft`]: the nftables ruleset (iptables-nft rules included) via libnftables, typed with the
//!   `nftables` crate.
//!   Its command runner, [`nft::Nft`], is shared with `setup`, which loads its table through it.
//! - [`kvm`]: `/dev/kvm` mode, access and a real `KVM_CREATE_VM`.
//! - [`cpu`]: vmx/svm, hypervisor, nested and PVM.
//! - [`files`]: file facts, streaming sha256, `--version`, kernel image sniffing.
//! - [`tools`]: tools on `PATH` and their versions.
//!
//! No reader spawns `ip`, `cat` or `sysctl`. The only child processes are a binary's own
//! `--version`, `nft` when libnftables cannot be loaded, and `--version` of tools dpkg does not
//! know; [`children_spawned`] counts them.

use std::sync::atomic::{AtomicUsize, Ordering};

pub mod cpu;
pub mod files;
pub mod kvm;
pub mod net;
pub mod nft;
pub mod sysctl;
pub mod tools;

static CHILDREN: AtomicUsize = AtomicUsize::new(0);

fn count_child() {
    CHILDREN.fetch_add(1, Ordering::Relaxed);
}

/// Child processes the host readers have started in this process so far.
pub fn children_spawned() -> usize {
    CHILDREN.load(Ordering::Relaxed)
}
