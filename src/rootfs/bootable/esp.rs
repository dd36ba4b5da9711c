//! The EFI System Partition's FAT image, built in memory with the `fatfs` crate.

use std::io::{Cursor, Write};

use super::ids::{DosTime, Ids};
use super::{
    loader_conf, BootError, Inputs, ALIGN, BOOTX64_PATH, ENTRIES_DIR, ENTRY_NAME, INITRD_PATH,
    KERNEL_PATH, LOADER_CONF, MAX_PATH_BYTES,
};

/// Smallest ESP: FAT16 with room for a kernel update; below 4 MiB fatfs would pick FAT12.
const MIN_ESP: u64 = 16 << 20;

/// `fatfs` asks a time provider for every timestamp it writes; this one always answers the
/// build's time, so two builds with the same epoch give the same directory entries.
#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

fn fat_time(t: DosTime) -> fatfs::DateTime {
    fatfs::DateTime {
        date: fatfs::Date {
            year: t.year,
            month: t.month,
            day: t.day,
        },
        time: fatfs::Time {
            hour: t.hour,
            min: t.min,
            sec: t.sec,
            millis: 0,
        },
    }
}

/// Size for `content` bytes of files: a quarter more plus 4 MiB (FATs, directories, cluster
/// slack, a slightly larger kernel later), whole MiB, at least [`MIN_ESP`].
pub fn esp_size(content: u64) -> u64 {
    (content + content / 4 + (4 << 20))
        .max(MIN_ESP)
        .next_multiple_of(ALIGN)
}

/// The files of the ESP, as (path, bytes).
pub fn files<'a>(i: &'a Inputs, entry: &'a str, conf: &'a str) -> Vec<(String, &'a [u8])> {
    let mut v: Vec<(String, &[u8])> = vec![(KERNEL_PATH.to_string(), i.kernel.as_slice())];
    if let Some(b) = &i.initramfs {
        v.push((INITRD_PATH.to_string(), b.as_slice()));
    }
    v.push((LOADER_CONF.to_string(), conf.as_bytes()));
    v.push((format!("{ENTRIES_DIR}/{ENTRY_NAME}"), entry.as_bytes()));
    if let Some((_, b)) = &i.systemd_boot {
        v.push((BOOTX64_PATH.to_string(), b.as_slice()));
    }
    v
}

/// Format a FAT volume sized for the files and write them.
pub fn build(i: &Inputs, entry: &str, ids: &Ids) -> Result<Vec<u8>, BootError> {
    let conf = loader_conf();
    let files = files(i, entry, &conf);
    format_with(&files, ids)
}

/// A FAT image holding `files` (absolute paths, `/`-separated).
pub fn format_with(files: &[(String, &[u8])], ids: &Ids) -> Result<Vec<u8>, BootError> {
    let content: u64 = files
        .iter()
        .map(|(_, b)| (b.len() as u64).next_multiple_of(4096))
        .sum();
    let size = esp_size(content);
    let len = usize::try_from(size)
        .map_err(|_| BootError::Fat(format!("{size} bytes do not fit in memory")))?;
    let mut img = vec![0u8; len];
    let fat = |what: &str, e: std::io::Error| BootError::Fat(format!("{what}: {e}"));
    fatfs::format_volume(
        Cursor::new(&mut img[..]),
        fatfs::FormatVolumeOptions::new()
            .bytes_per_sector(512)
            .volume_id(ids.fat_serial),
    )
    .map_err(|e| fat("format", e))?;
    {
        // A `&'static` is what fatfs 0.3 takes; one small value per disk built.
        let clock: &'static FixedTime = Box::leak(Box::new(FixedTime(fat_time(ids.time))));
        let fs = fatfs::FileSystem::new(
            Cursor::new(&mut img[..]),
            fatfs::FsOptions::new().time_provider(clock),
        )
        .map_err(|e| fat("mount", e))?;
        // `Dir` has a destructor: its borrow of `fs` must end before unmount.
        write_files(&fs.root_dir(), files, &fat)?;
        fs.unmount().map_err(|e| fat("unmount", e))?;
    }
    super::fatfix::fix_dot_entries(&mut img)?;
    Ok(img)
}

fn write_files<T: fatfs::ReadWriteSeek>(
    root: &fatfs::Dir<'_, T>,
    files: &[(String, &[u8])],
    fat: &dyn Fn(&str, std::io::Error) -> BootError,
) -> Result<(), BootError> {
    for (path, bytes) in files {
        if path.len() >= MAX_PATH_BYTES {
            return Err(BootError::Fat(format!(
                "path {path} is longer than rust-hypervisor-firmware's {MAX_PATH_BYTES} bytes"
            )));
        }
        let rel = path.trim_start_matches('/');
        let mut dir = root.clone();
        let mut parts: Vec<&str> = rel.split('/').collect();
        let name = parts.pop().unwrap_or(rel);
        for p in parts {
            dir = match dir.open_dir(p) {
                Ok(d) => d,
                Err(_) => dir.create_dir(p).map_err(|e| fat(path, e))?,
            };
        }
        let mut f = dir.create_file(name).map_err(|e| fat(path, e))?;
        f.truncate().map_err(|e| fat(path, e))?;
        f.write_all(bytes).map_err(|e| fat(path, e))?;
        f.flush().map_err(|e| fat(path, e))?;
    }
    Ok(())
}
