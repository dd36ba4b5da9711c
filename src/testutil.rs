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

/// An ELF note: name size, desc size, type, then name and desc, each padded to 4 bytes.
pub fn elf_note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend((name.len() as u32).to_le_bytes());
    v.extend((desc.len() as u32).to_le_bytes());
    v.extend(ty.to_le_bytes());
    v.extend(name);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v.extend(desc);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

/// The header of a little-endian ELF64 x86-64 file with `phnum` program headers right after
/// it (at 64), zeroed for the caller to fill.
pub fn elf64_header(phnum: u16) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56 * usize::from(phnum)];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little-endian
    f[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
    f
}

/// A minimal ELF64 whose one PT_NOTE program header covers `notes`, appended at 120.
pub fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
    let mut f = elf64_header(1);
    f[64..68].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
    f[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes());
    f[64 + 32..64 + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
    f.extend(notes);
    f
}

/// The Xen PVH entry-point note (`XEN_ELFNOTE_PHYS32_ENTRY`, 18) Cloud Hypervisor boots by.
pub fn pvh_note() -> Vec<u8> {
    elf_note(b"Xen\0", 18, &0x100_0000u32.to_le_bytes())
}
