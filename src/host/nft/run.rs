//! The transport: nftables commands run in-process through `libnftables.so.1` (loaded at run
//! time with `libloading`), or through the `nft` command when the library cannot be loaded.
//! Commands go in as nft syntax or as a libnftables JSON document ([`Nft::run_json`]); the
//! `nftables` crate's `helper` module is not used because it always spawns `nft`, a process
//! doctor's time budget cannot afford.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nftables::schema::Nftables;

use super::{NftError, Source};

/// `NFT_CTX_OUTPUT_*` flags (nftables/libnftables.h), for [`Nft::run`].
pub const OUTPUT_STATELESS: c_uint = 1 << 2;
pub const OUTPUT_HANDLE: c_uint = 1 << 3;
pub const OUTPUT_JSON: c_uint = 1 << 4;

type NewFn = unsafe extern "C" fn(c_uint) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type SetFlagsFn = unsafe extern "C" fn(*mut c_void, c_uint);
type BufferFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBufferFn = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// Runs nftables commands: in-process through a libnftables context when the library loads
/// (`CHVKIT_LIBNFTABLES` names another file), else through the `nft` command (`CHVKIT_NFT`, or
/// `nft` on `PATH`). The host model lists with it; `setup` also loads transactions with it.
pub struct Nft {
    backend: Backend,
}

enum Backend {
    Lib(LibContext),
    Cli(PathBuf),
}

impl Nft {
    pub fn open() -> Result<Nft, NftError> {
        let lib_path = std::env::var("CHVKIT_LIBNFTABLES")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "libnftables.so.1".to_string());
        let lib_error = match LibContext::load(&lib_path) {
            Ok(ctx) => {
                return Ok(Nft {
                    backend: Backend::Lib(ctx),
                })
            }
            Err(e) => e,
        };
        let cli = match std::env::var_os("CHVKIT_NFT").filter(|s| !s.is_empty()) {
            Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
            None => crate::host::tools::find_in_path("nft"),
        };
        match cli {
            Some(p) => {
                tracing::info!(
                    "libnftables unavailable ({lib_error}); using {}",
                    p.display()
                );
                Ok(Nft {
                    backend: Backend::Cli(p),
                })
            }
            None => Err(NftError::Unavailable { lib_error }),
        }
    }

    pub fn source(&self) -> Source {
        match self.backend {
            Backend::Lib(_) => Source::Library,
            Backend::Cli(_) => Source::NftCommand,
        }
    }

    /// Run `cmd` (one command or a whole script, as `nft -f` takes it) with `NFT_CTX_OUTPUT_*`
    /// `flags`; returns what it printed.
    pub fn run(&self, cmd: &str, flags: c_uint) -> Result<String, NftError> {
        let failed = |message: String| NftError::Command {
            command: format!("nft {}", cmd.lines().next().unwrap_or_default()),
            message,
        };
        match &self.backend {
            Backend::Lib(ctx) => ctx.run(cmd, flags).map_err(failed),
            Backend::Cli(path) => run_cli(path, cmd, flags, Input::Command).map_err(failed),
        }
    }

    /// Run a libnftables JSON document (commands such as `add`/`delete`) as one transaction;
    /// returns what it printed. libnftables parses its input as JSON when JSON output is on;
    /// `nft` gets `-j -f -` and the document on stdin.
    pub fn run_json(&self, doc: &Nftables<'_>) -> Result<String, NftError> {
        let json = serde_json::to_string(doc).map_err(|e| NftError::Json(e.to_string()))?;
        let failed = |message: String| NftError::Command {
            command: format!("nft -j -f - ({} JSON objects)", doc.objects.len()),
            message,
        };
        match &self.backend {
            Backend::Lib(ctx) => ctx.run(&json, OUTPUT_JSON).map_err(failed),
            Backend::Cli(path) => run_cli(path, &json, OUTPUT_JSON, Input::Json).map_err(failed),
        }
    }
}

/// What [`run_cli`] is given.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    /// nft syntax: one command or a whole script.
    Command,
    /// A libnftables JSON document.
    Json,
}

/// `nft` with the options matching `flags`. Input goes in on stdin (`-f -`), which takes
/// multi-line scripts as they are, except a command with `-j`: `nft -j -f` parses its input as
/// JSON, so such a command (`list ruleset`) goes on the command line instead.
fn run_cli(path: &Path, cmd: &str, flags: c_uint, input: Input) -> Result<String, String> {
    crate::host::count_child();
    let mut c = Command::new(path);
    for (flag, opt) in [
        (OUTPUT_JSON, "-j"),
        (OUTPUT_HANDLE, "-a"),
        (OUTPUT_STATELESS, "-s"),
    ] {
        if flags & flag != 0 {
            c.arg(opt);
        }
    }
    let json = flags & OUTPUT_JSON != 0;
    if json && input == Input::Command {
        c.arg(cmd).stdin(Stdio::null());
    } else {
        c.args(["-f", "-"]).stdin(Stdio::piped());
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(cmd.as_bytes())
            .map_err(|e| format!("writing to {}: {e}", path.display()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", path.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A libnftables context with buffered output. The function pointers are copied out of the
/// library, which is dropped after `Drop::drop` has freed the context.
struct LibContext {
    ctx: *mut c_void,
    ctx_free: FreeFn,
    set_output_flags: SetFlagsFn,
    get_output: GetBufferFn,
    get_error: GetBufferFn,
    run_cmd: RunFn,
    _lib: libloading::Library,
}

impl LibContext {
    fn load(path: &str) -> Result<LibContext, String> {
        let fail = |e: libloading::Error| format!("{path}: {e}");
        // SAFETY: loading libnftables runs its (side-effect free) ELF constructors only; the
        // signatures match nftables/libnftables.h (stable since nftables 0.9).
        unsafe {
            let lib = libloading::Library::new(path).map_err(fail)?;
            let ctx_new: NewFn = sym(&lib, path, b"nft_ctx_new\0")?;
            let ctx_free: FreeFn = sym(&lib, path, b"nft_ctx_free\0")?;
            let set_output_flags: SetFlagsFn = sym(&lib, path, b"nft_ctx_output_set_flags\0")?;
            let buffer_output: BufferFn = sym(&lib, path, b"nft_ctx_buffer_output\0")?;
            let buffer_error: BufferFn = sym(&lib, path, b"nft_ctx_buffer_error\0")?;
            let get_output: GetBufferFn = sym(&lib, path, b"nft_ctx_get_output_buffer\0")?;
            let get_error: GetBufferFn = sym(&lib, path, b"nft_ctx_get_error_buffer\0")?;
            let run_cmd: RunFn = sym(&lib, path, b"nft_run_cmd_from_buffer\0")?;
            // NFT_CTX_DEFAULT (0); a null return means out of memory.
            let ctx = ctx_new(0);
            if ctx.is_null() {
                return Err(format!("{path}: nft_ctx_new failed"));
            }
            // Buffering makes output land in memory, not on stdout/stderr.
            if buffer_output(ctx) != 0 || buffer_error(ctx) != 0 {
                ctx_free(ctx);
                return Err(format!("{path}: cannot buffer output"));
            }
            Ok(LibContext {
                ctx,
                ctx_free,
                set_output_flags,
                get_output,
                get_error,
                run_cmd,
                _lib: lib,
            })
        }
    }

    fn run(&self, cmd: &str, flags: c_uint) -> Result<String, String> {
        let c = CString::new(cmd).map_err(|_| "command contains a NUL byte".to_string())?;
        // SAFETY: ctx is live until Drop; the output/error buffers are owned by the context
        // and valid until the next command, and are copied out before returning.
        unsafe {
            (self.set_output_flags)(self.ctx, flags);
            let rc = (self.run_cmd)(self.ctx, c.as_ptr());
            let out = cstr_to_string((self.get_output)(self.ctx));
            let err = cstr_to_string((self.get_error)(self.ctx));
            if rc == 0 {
                Ok(out)
            } else {
                Err(err.trim().to_string())
            }
        }
    }
}

impl Drop for LibContext {
    fn drop(&mut self) {
        // SAFETY: created by nft_ctx_new and freed exactly once.
        unsafe { (self.ctx_free)(self.ctx) }
    }
}

/// # Safety
/// `T` must be the type of the symbol `name` (NUL-terminated).
unsafe fn sym<T: Copy>(lib: &libloading::Library, path: &str, name: &[u8]) -> Result<T, String> {
    lib.get::<T>(name)
        .map(|s| *s)
        .map_err(|e| format!("{path}: {e}"))
}

/// # Safety
/// `p` must be null or a valid NUL-terminated string.
unsafe fn cstr_to_string(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
