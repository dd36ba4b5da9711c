//! `cargo run --example man -- DIR` (what `make man` runs): write chvkit's man pages into DIR,
//! one per command (`chvkit.1`, `chvkit-doctor.1`, …, `chvkit-vm-ls.1`), generated from the
//! clap definition by `chvkit::cli::write_man_pages`. Read one with `man -l DIR/chvkit.1`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: cargo run --example man -- DIR");
        return ExitCode::from(2);
    };
    match chvkit::cli::write_man_pages(&PathBuf::from(dir)) {
        Ok(written) => {
            for p in written {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("man: {e:#}");
            ExitCode::FAILURE
        }
    }
}
