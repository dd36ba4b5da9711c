//! The files that make the network part survive a reboot: a sysctl.d drop-in, the nft script
//! (see `firewall::nft::script`) and a systemd oneshot unit that re-runs
//! `chvkit setup --network-only` at boot (bridge, address, sysctls and firewall in one
//! idempotent pass, with no shell and no `ip` commands).

use std::path::{Path, PathBuf};

use super::sysctl::Key;

/// sysctl.d(5) drop-in: `(key, value)` in the order they must apply.
pub fn sysctl_file(bridge: &str, entries: &[(Key, String)]) -> String {
    let mut s = format!(
        "# chvkit: IPv6 settings for the Cloud Hypervisor guest bridge {bridge}.\n\
         # Written by `chvkit setup`, removed by `chvkit teardown`. systemd-sysctl applies the\n\
         # bridge's own keys when udev sees the bridge appear. accept_ra=2 comes before forwarding\n\
         # so that uplinks configured by SLAAC keep their default route.\n"
    );
    for (k, v) in entries {
        s.push_str(&format!("{} = {v}\n", k.sysctl_d()));
    }
    s
}

/// What the unit runs.
#[derive(Debug, Clone)]
pub struct UnitCommand {
    pub chvkit: PathBuf,
    /// `--profile` as given to setup (absolute), when not the embedded default.
    pub profile: Option<PathBuf>,
    /// `--firewall` when it overrides the profile.
    pub firewall: Option<&'static str>,
}

impl UnitCommand {
    pub fn exec_start(&self) -> String {
        let mut args = vec![quote(&self.chvkit)];
        if let Some(p) = &self.profile {
            args.push("--profile".into());
            args.push(quote(p));
        }
        args.push("setup".into());
        args.push("--network-only".into());
        if let Some(f) = self.firewall {
            args.push("--firewall".into());
            args.push(f.into());
        }
        args.join(" ")
    }
}

/// systemd quoting for one ExecStart word.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '\'')
    {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

pub fn unit_file(description: &str, cmd: &UnitCommand) -> String {
    format!(
        "# chvkit: re-applies the Cloud Hypervisor guest network at boot.\n\
         # Written by `chvkit setup`, removed by `chvkit teardown`.\n\
         [Unit]\n\
         Description={description}\n\
         After=systemd-sysctl.service network-pre.target\n\
         Wants=network-pre.target\n\
         Before=network.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart={}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        cmd.exec_start()
    )
}

/// Where `systemctl enable` would put the unit's symlink: `<unit dir>/multi-user.target.wants/`.
pub fn wants_link(unit_file: &Path) -> Option<PathBuf> {
    let dir = unit_file.parent()?;
    Some(
        dir.join("multi-user.target.wants")
            .join(unit_file.file_name()?),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_order_and_spelling() {
        let t = sysctl_file(
            "chvbr0",
            &[
                (Key::ipv6_conf("chvbr0", "accept_dad"), "0".into()),
                (Key::ipv6_conf("eth0.5", "accept_ra"), "2".into()),
                (Key::ipv6_conf("all", "forwarding"), "1".into()),
            ],
        );
        let body: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "net.ipv6.conf.chvbr0.accept_dad = 0",
                "net/ipv6/conf/eth0.5/accept_ra = 2",
                "net.ipv6.conf.all.forwarding = 1"
            ]
        );
    }

    #[test]
    fn unit_exec_start() {
        let c = UnitCommand {
            chvkit: "/opt/my tools/chvkit".into(),
            profile: Some("/etc/chvkit/p.yaml".into()),
            firewall: Some("iptables"),
        };
        assert_eq!(
            c.exec_start(),
            "\"/opt/my tools/chvkit\" --profile /etc/chvkit/p.yaml setup --network-only --firewall iptables"
        );
        let u = unit_file("x", &c);
        assert!(u.contains("Type=oneshot") && u.contains("WantedBy=multi-user.target"));
        assert_eq!(
            wants_link(Path::new("/etc/systemd/system/chvkit-network.service")).unwrap(),
            PathBuf::from("/etc/systemd/system/multi-user.target.wants/chvkit-network.service")
        );
    }
}
