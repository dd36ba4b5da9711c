//! `/etc/checker.env`: the contract between `launch` (writer) and the guest's `/init` (reader).
//!
//! One `KEY='value'` per line. Every value is single-quoted and each embedded `'` becomes
//! `'\''`, so `. /etc/checker.env` in any POSIX shell assigns the bytes verbatim and can never
//! run code. Keys must be shell identifiers. NUL cannot be represented in a shell variable and
//! is rejected; newlines are kept (inside single quotes they are literal).

use std::fmt::Write as _;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error(
        "invalid environment key `{0}`: use letters, digits and `_`, not starting with a digit"
    )]
    BadKey(String),
    #[error("value of `{0}` contains a NUL byte, which a shell variable cannot hold")]
    Nul(String),
    #[error("`{0}` is not KEY=VALUE")]
    NotPair(String),
}

pub fn valid_key(k: &str) -> bool {
    k.chars()
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && k.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Quote `v` for a POSIX shell: `'` + v with `'` → `'\''` + `'`.
pub fn shell_quote(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        if c == '\'' {
            s.push_str("'\\''");
        } else {
            s.push(c);
        }
    }
    s.push('\'');
    s
}

/// Render pairs in the given order (later duplicates override earlier ones when sourced).
pub fn render<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Result<String, EnvError> {
    let mut out =
        String::from("# written by chvkit; sourced by /init. Values are single-quoted.\n");
    for (k, v) in pairs {
        let (k, v) = (k.as_ref(), v.as_ref());
        if !valid_key(k) {
            return Err(EnvError::BadKey(k.to_string()));
        }
        if v.contains('\0') {
            return Err(EnvError::Nul(k.to_string()));
        }
        let _ = writeln!(out, "{k}={}", shell_quote(v));
    }
    Ok(out)
}

/// Split a `--env KEY=VALUE` argument.
pub fn parse_pair(s: &str) -> Result<(String, String), EnvError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| EnvError::NotPair(s.to_string()))?;
    if !valid_key(k) {
        return Err(EnvError::BadKey(k.to_string()));
    }
    if v.contains('\0') {
        return Err(EnvError::Nul(k.to_string()));
    }
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn quoting_is_inert_in_a_real_shell() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("pwned");
        let evil = format!("'; touch {}; '", marker.display());
        let vals = [
            ("A", evil.as_str()),
            ("B", "$(touch /nonexistent/x) `id` $HOME \\ \" '"),
            ("C", "multi\nline"),
            ("D", ""),
        ];
        let text = render(&vals).unwrap();
        let f = d.path().join("env");
        std::fs::write(&f, &text).unwrap();
        let script = format!(
            ". {}; printf '%s\\0' \"$A\" \"$B\" \"$C\" \"$D\"",
            f.display()
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success());
        let got: Vec<&[u8]> = out.stdout.split(|b| *b == 0).collect();
        for (i, (_, v)) in vals.iter().enumerate() {
            assert_eq!(got[i], v.as_bytes());
        }
        assert!(!marker.exists());
    }

    #[test]
    fn bad_keys_and_nul() {
        assert_eq!(render(&[("1A", "x")]), Err(EnvError::BadKey("1A".into())));
        assert_eq!(render(&[("A;B", "x")]), Err(EnvError::BadKey("A;B".into())));
        assert_eq!(render(&[("A", "x\0")]), Err(EnvError::Nul("A".into())));
        assert_eq!(parse_pair("X=a=b").unwrap(), ("X".into(), "a=b".into()));
        assert!(parse_pair("novalue").is_err());
    }
}
