//! nftables driver: one table of chvkit's own, replaced in a single transaction.
//!
//! Commands go through libnftables in-process (loaded with `libloading`, so chvkit builds and
//! runs where it is missing); without the library, `nft -f -` is used. `CHVKIT_LIBNFTABLES`
//! and `CHVKIT_NFT` name other locations of either.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{sha256_hex, Firewall, FirewallError, Inspection, Rules};
use crate::setup::state::FirewallRecord;

/// `inet`, not `ip6`: the host-protection chain then also drops IPv4 a guest might send to the
/// host's other addresses. NAT and forwarding match IPv6 only.
pub const FAMILY: &str = "inet";

const OUTPUT_STATELESS: c_uint = 1 << 2;

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuf = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type CtxSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// A libnftables context. Function pointers are copied out of the library, which lives as
/// long as this struct (it is dropped after `Drop::drop` frees the context).
struct LibNft {
    ctx: *mut c_void,
    free: CtxFree,
    set_flags: CtxSetFlags,
    run: RunCmd,
    get_out: CtxGetBuf,
    get_err: CtxGetBuf,
    _lib: libloading::Library,
}

impl LibNft {
    fn load(path: &str) -> Result<LibNft, String> {
        // SAFETY: loading libnftables runs its constructors only; the symbols are the
        // documented C API of libnftables(3) with the signatures declared above.
        unsafe {
            let lib = libloading::Library::new(path).map_err(|e| format!("{path}: {e}"))?;
            let sym = |name: &[u8]| -> Result<*const (), String> {
                lib.get::<*const ()>(name)
                    .map(|s| *s)
                    .map_err(|e| format!("{path}: {e}"))
            };
            let new: CtxNew = std::mem::transmute(sym(b"nft_ctx_new\0")?);
            let free: CtxFree = std::mem::transmute(sym(b"nft_ctx_free\0")?);
            let buf_out: CtxInt = std::mem::transmute(sym(b"nft_ctx_buffer_output\0")?);
            let buf_err: CtxInt = std::mem::transmute(sym(b"nft_ctx_buffer_error\0")?);
            let get_out: CtxGetBuf = std::mem::transmute(sym(b"nft_ctx_get_output_buffer\0")?);
            let get_err: CtxGetBuf = std::mem::transmute(sym(b"nft_ctx_get_error_buffer\0")?);
            let set_flags: CtxSetFlags = std::mem::transmute(sym(b"nft_ctx_output_set_flags\0")?);
            let run: RunCmd = std::mem::transmute(sym(b"nft_run_cmd_from_buffer\0")?);
            let ctx = new(0);
            if ctx.is_null() {
                return Err(format!("{path}: nft_ctx_new failed"));
            }
            if buf_out(ctx) != 0 || buf_err(ctx) != 0 {
                free(ctx);
                return Err(format!("{path}: cannot buffer output"));
            }
            Ok(LibNft {
                ctx,
                free,
                set_flags,
                run,
                get_out,
                get_err,
                _lib: lib,
            })
        }
    }

    fn run(&self, cmd: &str, stateless: bool) -> Result<String, String> {
        let c = CString::new(cmd).map_err(|_| "command contains a NUL byte".to_string())?;
        // SAFETY: ctx is a live context; the buffers returned by libnftables stay valid until
        // the next command on this context, and are copied before that.
        unsafe {
            (self.set_flags)(self.ctx, if stateless { OUTPUT_STATELESS } else { 0 });
            let rc = (self.run)(self.ctx, c.as_ptr());
            let take = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            let out = take((self.get_out)(self.ctx));
            let err = take((self.get_err)(self.ctx));
            if rc == 0 {
                Ok(out)
            } else {
                Err(err.trim().to_string())
            }
        }
    }
}

impl Drop for LibNft {
    fn drop(&mut self) {
        // SAFETY: ctx came from nft_ctx_new and is freed once.
        unsafe { (self.free)(self.ctx) }
    }
}

enum Runner {
    Lib(LibNft),
    Cli(PathBuf),
}

impl Runner {
    fn resolve() -> Result<Runner, FirewallError> {
        let lib_path = std::env::var("CHVKIT_LIBNFTABLES")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "libnftables.so.1".to_string());
        let lib_err = match LibNft::load(&lib_path) {
            Ok(l) => return Ok(Runner::Lib(l)),
            Err(e) => e,
        };
        let cli = match std::env::var_os("CHVKIT_NFT").filter(|s| !s.is_empty()) {
            Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
            None => find_in_path("nft"),
        };
        match cli {
            Some(p) => {
                tracing::info!("libnftables unavailable ({lib_err}); using {}", p.display());
                Ok(Runner::Cli(p))
            }
            None => Err(FirewallError::Unavailable(format!(
                "nftables is not usable: cannot load libnftables ({lib_err}) and no `nft` \
                 command was found (install the nftables package, or use --firewall iptables)"
            ))),
        }
    }

    fn run(&self, cmd: &str, stateless: bool) -> Result<String, String> {
        match self {
            Runner::Lib(l) => l.run(cmd, stateless),
            Runner::Cli(p) => {
                let mut c = Command::new(p);
                if stateless {
                    c.arg("-s");
                }
                let mut child = c
                    .args(["-f", "-"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("cannot run {}: {e}", p.display()))?;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin
                        .write_all(cmd.as_bytes())
                        .map_err(|e| format!("writing to {}: {e}", p.display()))?;
                }
                let out = child
                    .wait_with_output()
                    .map_err(|e| format!("waiting for {}: {e}", p.display()))?;
                if out.status.success() {
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
                }
            }
        }
    }
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub struct NftDriver {
    runner: Option<Runner>,
}

impl Default for NftDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl NftDriver {
    pub fn new() -> NftDriver {
        NftDriver { runner: None }
    }

    fn runner(&mut self) -> Result<&Runner, FirewallError> {
        if self.runner.is_none() {
            self.runner = Some(Runner::resolve()?);
        }
        self.runner
            .as_ref()
            .ok_or_else(|| FirewallError::Unavailable("nftables runner missing".into()))
    }

    fn cmd(&mut self, what: &str, cmd: &str, stateless: bool) -> Result<String, FirewallError> {
        self.runner()?
            .run(cmd, stateless)
            .map_err(|message| FirewallError::Command {
                what: what.to_string(),
                message,
            })
    }

    fn table_exists(&mut self, family: &str, table: &str) -> Result<bool, FirewallError> {
        let out = self.cmd("nft list tables", "list tables", true)?;
        let want = format!("table {family} {table}");
        Ok(out.lines().any(|l| l.trim() == want))
    }

    fn listing(&mut self, family: &str, table: &str) -> Result<String, FirewallError> {
        self.cmd(
            &format!("nft list table {family} {table}"),
            &format!("list table {family} {table}"),
            true,
        )
    }
}

/// The table as an nft script that replaces it in one transaction: the first line creates the
/// table if missing so that the `delete` cannot fail, the last one adds it back complete.
pub fn script(r: &Rules) -> String {
    let t = &r.table;
    let br = &r.bridge;
    let mut s = String::new();
    s.push_str(&format!(
        "#!/usr/sbin/nft -f\n\
         # chvkit: network for Cloud Hypervisor guests on bridge {br} ({prefix}).\n\
         # Written by `chvkit setup`, removed by `chvkit teardown`. Loading it replaces table\n\
         # {FAMILY} {t} in one transaction and touches no other table.\n\
         table {FAMILY} {t}\n\
         delete table {FAMILY} {t}\n\
         table {FAMILY} {t} {{\n",
        prefix = r.prefix
    ));
    if r.nat {
        s.push_str(&format!(
            "\tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip6 saddr {prefix} oifname != \"{br}\" masquerade\n\
             \t}}\n\n",
            prefix = r.prefix
        ));
    }
    s.push_str(&format!(
        "\tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{br}\" accept\n\
         \t\toifname \"{br}\" ct state related,established accept\n\
         \t}}\n\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{br}\" jump guest_to_host\n\
         \t}}\n\n\
         \t# What guests may reach on the host itself; everything else from the bridge is dropped.\n\
         \tchain guest_to_host {{\n\
         \t\tct state established,related accept\n\
         \t\tmeta l4proto ipv6-icmp accept\n"
    ));
    if !r.host_ports.is_empty() {
        let ports = r
            .host_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!(
            "\t\ttcp dport {{ {ports} }} accept\n\t\tudp dport {{ {ports} }} accept\n"
        ));
    }
    s.push_str("\t\tcounter drop\n\t}\n}\n");
    s
}

impl Firewall for NftDriver {
    fn describe(&self, rules: &Rules) -> String {
        format!("nftables table {FAMILY} {}", rules.table)
    }

    fn preflight(&mut self) -> Result<(), FirewallError> {
        self.cmd("nft list tables", "list tables", true).map(|_| ())
    }

    fn inspect(
        &mut self,
        rules: &Rules,
        recorded: Option<&FirewallRecord>,
    ) -> Result<Inspection, FirewallError> {
        let name = format!("table {FAMILY} {}", rules.table);
        if !self.table_exists(FAMILY, &rules.table)? {
            return Ok(Inspection {
                found: format!("{name} absent"),
                up_to_date: false,
            });
        }
        let listing = self.listing(FAMILY, &rules.table)?;
        let chains = listing
            .lines()
            .filter(|l| l.trim_start().starts_with("chain "))
            .count();
        let rule_count = listing
            .lines()
            .filter(|l| {
                let t = l.trim();
                !t.is_empty()
                    && !t.starts_with("chain ")
                    && !t.starts_with("table ")
                    && !t.starts_with("type ")
                    && t != "}"
            })
            .count();
        let up_to_date = match recorded {
            Some(FirewallRecord::Nftables {
                family,
                table,
                script_sha256,
                listing_sha256,
            }) => {
                family == FAMILY
                    && table == &rules.table
                    && *script_sha256 == sha256_hex(script(rules).as_bytes())
                    && *listing_sha256 == sha256_hex(listing.as_bytes())
            }
            _ => false,
        };
        let found = if up_to_date {
            format!("{name} as setup loaded it ({chains} chains, {rule_count} rules)")
        } else if recorded.is_some() {
            format!("{name} differs from the profile's rules ({chains} chains, {rule_count} rules)")
        } else {
            format!(
                "{name} present but not recorded by setup ({chains} chains, {rule_count} rules)"
            )
        };
        Ok(Inspection { found, up_to_date })
    }

    fn apply(&mut self, rules: &Rules) -> Result<FirewallRecord, FirewallError> {
        let text = script(rules);
        self.cmd(
            &format!("loading nftables table {FAMILY} {}", rules.table),
            &text,
            false,
        )?;
        let listing = self.listing(FAMILY, &rules.table)?;
        Ok(FirewallRecord::Nftables {
            family: FAMILY.to_string(),
            table: rules.table.clone(),
            script_sha256: sha256_hex(text.as_bytes()),
            listing_sha256: sha256_hex(listing.as_bytes()),
        })
    }

    fn present(&mut self, recorded: &FirewallRecord) -> Result<bool, FirewallError> {
        match recorded {
            FirewallRecord::Nftables { family, table, .. } => self.table_exists(family, table),
            _ => Ok(false),
        }
    }

    fn remove(&mut self, recorded: &FirewallRecord) -> Result<bool, FirewallError> {
        let FirewallRecord::Nftables { family, table, .. } = recorded else {
            return Ok(false);
        };
        if !self.table_exists(family, table)? {
            return Ok(false);
        }
        self.cmd(
            &format!("deleting nftables table {family} {table}"),
            &format!("delete table {family} {table}"),
            false,
        )?;
        Ok(true)
    }

    fn persist_script(&self, rules: &Rules) -> Option<String> {
        Some(script(rules))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(nat: bool, ports: Vec<u16>) -> Rules {
        Rules {
            bridge: "chvbr0".into(),
            prefix: "fdcd::/16".parse().unwrap(),
            nat,
            host_ports: ports,
            table: "chvkit".into(),
        }
    }

    #[test]
    fn script_replaces_only_its_table() {
        let s = script(&rules(true, vec![8080, 9000]));
        let stmts: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("table") || l.starts_with("delete"))
            .collect();
        assert_eq!(
            stmts,
            [
                "table inet chvkit",
                "delete table inet chvkit",
                "table inet chvkit {"
            ]
        );
        assert!(s.contains("ip6 saddr fdcd::/16 oifname != \"chvbr0\" masquerade"));
        assert!(s.contains("tcp dport { 8080, 9000 } accept"));
        assert!(!s.contains("flush ruleset"));
    }

    #[test]
    fn no_nat_no_ports() {
        let s = script(&rules(false, vec![]));
        assert!(!s.contains("masquerade"));
        assert!(!s.contains("dport"));
        assert!(s.contains("counter drop"));
    }
}
