//! Reading what the VMM writes: the `--event-monitor` log (pretty-printed JSON objects separated
//! by blank lines, not NDJSON) and the serial log (`CHVKIT_EXIT=<n>` from the guest's `/init`).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One event, e.g. `{"timestamp":{"secs":0,"nanos":1},"source":"vm","event":"booted","properties":null}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
    pub source: String,
    pub event: String,
    #[serde(default)]
    pub properties: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: u64,
    pub nanos: u32,
}

impl Event {
    pub fn is(&self, source: &str, event: &str) -> bool {
        self.source == source && self.event == event
    }
}

/// Follows a growing event log, returning whole events as they appear.
pub struct EventTail {
    tail: ByteTail,
    pending: Vec<u8>,
}

impl EventTail {
    pub fn new(path: &Path) -> EventTail {
        EventTail {
            tail: ByteTail::new(path),
            pending: Vec::new(),
        }
    }

    /// New complete events since the last call (a half-written one waits for the next call).
    pub fn poll(&mut self) -> io::Result<Vec<Event>> {
        let (bytes, restarted) = self.tail.poll_restart()?;
        if restarted {
            // Truncated or replaced: a half record from before is garbage now.
            self.pending.clear();
        }
        self.pending.extend_from_slice(&bytes);
        Ok(self.drain())
    }

    fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut it = serde_json::Deserializer::from_slice(&self.pending).into_iter::<Event>();
        loop {
            match it.next() {
                Some(Ok(ev)) => {
                    consumed = it.byte_offset();
                    out.push(ev);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    // Not an event we understand: skip to the next blank line so one odd
                    // record cannot wedge the reader.
                    tracing::warn!(path = %self.tail.path.display(), "unparsable event record: {e}");
                    let rest = &self.pending[consumed..];
                    consumed += rest
                        .windows(2)
                        .position(|w| w == b"\n\n")
                        .map(|p| p + 2)
                        .unwrap_or(rest.len());
                    break;
                }
                None => {
                    consumed = self.pending.len();
                    break;
                }
            }
        }
        self.pending.drain(..consumed);
        out
    }
}

/// Read every event in a log file.
pub fn read_all(path: &Path) -> io::Result<Vec<Event>> {
    EventTail::new(path).poll()
}

/// The last `CHVKIT_EXIT=<n>` in the serial log, if any. Kernel messages can interleave with
/// the marker, so it is searched for anywhere in a line; values outside 0..=255 are ignored.
pub fn exit_code_from_serial(path: &Path) -> io::Result<Option<i32>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut last = None;
    let mut r = BufReader::new(f);
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        for (i, _) in text.match_indices("CHVKIT_EXIT=") {
            let digits: String = text[i + "CHVKIT_EXIT=".len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .take(4)
                .collect();
            if let Ok(n) = digits.parse::<i32>() {
                if (0..=255).contains(&n) {
                    last = Some(n);
                }
            }
        }
    }
    Ok(last)
}

/// Follows a growing file (the serial log), returning new bytes.
pub struct ByteTail {
    path: PathBuf,
    offset: u64,
}

impl ByteTail {
    pub fn new(path: &Path) -> ByteTail {
        ByteTail {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    pub fn poll(&mut self) -> io::Result<Vec<u8>> {
        self.poll_restart().map(|(bytes, _)| bytes)
    }

    /// New bytes, and whether the file shrank since the last call (Cloud Hypervisor truncates a
    /// File serial at reboot and restore), in which case reading started over from the top.
    pub fn poll_restart(&mut self) -> io::Result<(Vec<u8>, bool)> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let restarted = len < self.offset;
        if restarted {
            self.offset = 0;
        }
        let mut out = Vec::new();
        if len > self.offset {
            f.seek(SeekFrom::Start(self.offset))?;
            f.take(len - self.offset).read_to_end(&mut out)?;
            self.offset += out.len() as u64;
        }
        Ok((out, restarted))
    }
}

/// The last `n` lines of a text file, for error messages.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(text) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pretty(source: &str, event: &str) -> String {
        let v = serde_json::json!({
            "timestamp": {"secs": 0, "nanos": 12},
            "source": source, "event": event, "properties": null
        });
        format!("{}\n\n", serde_json::to_string_pretty(&v).unwrap())
    }

    #[test]
    fn event_tail_handles_partial_records() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("events.log");
        let mut f = File::create(&p).unwrap();
        let mut t = EventTail::new(&p);
        assert!(t.poll().unwrap().is_empty());
        let a = pretty("vmm", "starting");
        let b = pretty("vm", "booted");
        f.write_all(a.as_bytes()).unwrap();
        f.write_all(&b.as_bytes()[..10]).unwrap();
        let got = t.poll().unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].is("vmm", "starting"));
        f.write_all(&b.as_bytes()[10..]).unwrap();
        f.write_all(pretty("guest", "panic").as_bytes()).unwrap();
        let got = t.poll().unwrap();
        assert_eq!(
            got.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
            ["booted", "panic"]
        );
        assert_eq!(read_all(&p).unwrap().len(), 3);
    }

    #[test]
    fn garbage_does_not_wedge_the_reader() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("events.log");
        std::fs::write(&p, format!("{{not json}}\n\n{}", pretty("vm", "booted"))).unwrap();
        let mut t = EventTail::new(&p);
        let mut all = t.poll().unwrap();
        all.extend(t.poll().unwrap());
        assert!(all.iter().any(|e| e.is("vm", "booted")));
    }

    #[test]
    fn exit_marker() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("serial.log");
        assert_eq!(exit_code_from_serial(&p).unwrap(), None);
        std::fs::write(&p, "boot\r\nCHVKIT_EXIT=1\r\n[  1.0] reboot: CHVKIT_EXIT=3\r\nCHVKIT_EXIT=999\nCHVKIT_EXIT=x\n").unwrap();
        assert_eq!(exit_code_from_serial(&p).unwrap(), Some(3));
        std::fs::write(&p, "no marker\n").unwrap();
        assert_eq!(exit_code_from_serial(&p).unwrap(), None);
    }
}
