//! Helpers for the tests: the library's unit tests use this module, and `tests/common`
//! includes the same file for the integration tests and benches.

use std::io::Write;

/// Report a skipped test where a person sees it: straight to fd 2 (libtest captures
/// `print!`/`eprint!`, not direct writes) and into `$CHVKIT_SKIP_LOG`, which `make test`
/// totals at the end.
pub fn skip(test: &str, reason: &str) {
    let line = format!("skipped: {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Ok(p) = std::env::var("CHVKIT_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
