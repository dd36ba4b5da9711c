//! `chvkit completions SHELL`, and the man pages (`make man`, through `examples/man.rs`):
//! generated from the same clap definition that parses the command line, so neither can drift
//! from the real flags. The man page generator is not a subcommand because clap_complete's bash
//! script offers hidden subcommands too.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The name completions are registered for: what users type.
const BIN: &str = "chvkit";

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to print the completion script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The full command tree, every command's arguments built (they are deferred until a command
/// runs, see `Command::augment_subcommands`; generators must see them all).
fn command_tree(help_subcommand: bool) -> clap::Command {
    let mut cmd = Cli::command()
        .bin_name(BIN)
        .disable_help_subcommand(!help_subcommand);
    cmd.build();
    cmd
}

/// The script for `shell`, rendered in memory.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    // `chvkit help doctor` works, so it is completed.
    let mut cmd = command_tree(true);
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, BIN, &mut script);
    script
}

pub fn print_completions(a: &CompletionsArgs) -> anyhow::Result<i32> {
    // Rendered first, then written: clap_complete panics on a failed write (a closed pipe),
    // and a failure should be an error message instead.
    let script = completion_script(a.shell);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("writing the completion script")?;
    Ok(crate::exit::OK)
}

/// Every page: `(file name, roff)`, for the top-level command and each visible subcommand,
/// nested ones included (`chvkit-vm-ls.1`).
pub fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    fn collect(cmd: &clap::Command, pages: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone());
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        pages.push((man.get_filename(), roff));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            collect(sub, pages)?;
        }
        Ok(())
    }
    // clap's `help` subcommand only repeats the other pages: none of its own.
    let mut pages = Vec::new();
    collect(&command_tree(false), &mut pages)?;
    Ok(pages)
}

/// Write every page into `dir` (created if missing); returns the files written.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    // All pages are rendered before the first is written, and each is written atomically:
    // a failure leaves no half-written page behind.
    let pages = man_pages().context("rendering the man pages")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::with_capacity(pages.len());
    for (name, roff) in &pages {
        let dest = dir.join(name);
        crate::fsutil::write_atomic(&dest, roff, 0o644)
            .with_context(|| format!("writing {}", dest.display()))?;
        written.push(dest);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_visible_command() {
        let pages = man_pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "chvkit.1",
            "chvkit-doctor.1",
            "chvkit-setup.1",
            "chvkit-completions.1",
            "chvkit-vm.1",
            "chvkit-vm-ls.1",
        ] {
            assert!(names.contains(&want), "{want} in {names:?}");
        }
        // clap's `help` is not a command of ours: no page.
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        // Deferred arguments were built: the doctor page documents its flags.
        let (_, doctor) = pages.iter().find(|(n, _)| n == "chvkit-doctor.1").unwrap();
        let doctor = String::from_utf8_lossy(doctor);
        for flag in ["textfile", "format", "prometheus", "only"] {
            assert!(doctor.contains(flag), "{flag}:\n{doctor}");
        }
    }

    #[test]
    fn completions_know_every_command_and_deferred_flag() {
        let bash = String::from_utf8(completion_script(Shell::Bash)).unwrap();
        for word in ["doctor", "launch", "completions", "--textfile", "--format"] {
            assert!(bash.contains(word), "{word} missing from the bash script");
        }
    }
}
