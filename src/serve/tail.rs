//! Following a run's `metrics.jsonl` as training appends to it: complete
//! lines only (a torn last line waits for its newline), malformed lines
//! skipped and counted, a replaced or shortened file (a resumed run drops
//! the records after its checkpoint) read again from the start.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// What one poll found, in file order.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A metrics record and its 0-based line number in the file.
    Record(u64, Map<String, Value>),
    /// A line that is not a JSON object.
    Skipped(u64),
    /// The file was replaced or shortened: what was read before is void,
    /// and lines come again from 0.
    Reset,
}

/// A read position in one metrics file.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    /// The file read so far (inode), to notice an atomic replacement.
    ino: Option<u64>,
    /// Bytes consumed: always just after a newline.
    offset: u64,
    /// Complete lines consumed (blank and malformed ones included, so line
    /// numbers match the file's).
    pub lines: u64,
    /// Malformed lines met so far.
    pub skipped: u64,
    /// Inside a line longer than one read: it is dropped up to its newline.
    discarding: bool,
}

impl Tail {
    pub fn new(path: &Path) -> Tail {
        Tail { path: path.to_path_buf(), ino: None, offset: 0, lines: 0, skipped: 0, discarding: false }
    }

    /// Read what was appended since the last poll, at most `max_bytes`;
    /// returns the lines and whether more is waiting. A missing file is
    /// no lines (a run that has not logged yet); other read errors too,
    /// to be tried again at the next poll.
    pub fn poll(&mut self, max_bytes: usize) -> (Vec<Line>, bool) {
        let mut out = Vec::new();
        let Ok(mut f) = File::open(&self.path) else {
            if self.ino.take().is_some() {
                self.restart();
                out.push(Line::Reset);
            }
            return (out, false);
        };
        let Ok(meta) = f.metadata() else { return (out, false) };
        if self.ino.is_some_and(|i| i != meta.ino()) || meta.len() < self.offset {
            self.restart();
            out.push(Line::Reset);
        }
        self.ino = Some(meta.ino());
        let want = (meta.len() - self.offset).min(max_bytes as u64);
        if want == 0 {
            return (out, false);
        }
        let mut buf = Vec::with_capacity(want as usize);
        if f.seek(SeekFrom::Start(self.offset)).is_err() || (&mut f).take(want).read_to_end(&mut buf).is_err()
        {
            return (out, false);
        }
        let more = self.offset + (buf.len() as u64) < meta.len();
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            if buf.len() as u64 == want && want == max_bytes as u64 {
                // One line longer than a whole read: it cannot be a
                // sensible record; drop it rather than wait forever.
                self.offset += buf.len() as u64;
                self.discarding = true;
            }
            return (out, more);
        };
        for line in buf[..end].split(|&b| b == b'\n') {
            let n = self.lines;
            self.lines += 1;
            if std::mem::take(&mut self.discarding) {
                self.skipped += 1;
                out.push(Line::Skipped(n));
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Value>(line) {
                Ok(Value::Object(m)) => out.push(Line::Record(n, m)),
                _ => {
                    self.skipped += 1;
                    out.push(Line::Skipped(n));
                }
            }
        }
        self.offset += end as u64 + 1;
        (out, more)
    }

    fn restart(&mut self) {
        *self = Tail::new(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn records(lines: &[Line]) -> Vec<u64> {
        lines.iter().filter_map(|l| if let Line::Record(n, _) = l { Some(*n) } else { None }).collect()
    }

    #[test]
    fn follows_appends_waits_for_torn_lines_and_restarts_on_replacement() {
        let d = std::env::temp_dir().join(format!("knlp-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("metrics.jsonl");
        let mut t = Tail::new(&p);
        assert_eq!(t.poll(1 << 20), (vec![], false));
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).unwrap();
        f.write_all(b"{\"step\":0}\n\nnot json\n[1]\n{\"step\":1,\"lo").unwrap();
        let (got, more) = t.poll(1 << 20);
        assert!(!more);
        assert_eq!(records(&got), vec![0]);
        assert_eq!(got.iter().filter(|l| matches!(l, Line::Skipped(_))).count(), 2);
        assert_eq!((t.lines, t.skipped), (4, 2));
        // The torn line completes.
        f.write_all(b"ss\":2.5}\n").unwrap();
        let (got, _) = t.poll(1 << 20);
        assert_eq!(records(&got), vec![4]);
        // Small reads: one line at a time, `more` until the end.
        f.write_all(b"{\"step\":2}\n{\"step\":3}\n").unwrap();
        assert_eq!(t.poll(12), (vec![Line::Record(5, json_map(r#"{"step":2}"#))], true));
        assert_eq!(records(&t.poll(12).0), vec![6]);
        // A line longer than a read is dropped, then reading goes on.
        f.write_all(format!("{{\"x\":\"{}\"}}\n{{\"step\":4}}\n", "a".repeat(40)).as_bytes()).unwrap();
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.extend(t.poll(16).0);
        }
        assert_eq!(records(&seen), vec![8]);
        assert!(seen.contains(&Line::Skipped(7)));
        // An atomic rewrite (a resumed run) starts again from line 0.
        let tmp = d.join("m.tmp");
        std::fs::write(&tmp, "{\"step\":0}\n").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        let (got, _) = t.poll(1 << 20);
        assert_eq!(got[0], Line::Reset);
        assert_eq!(records(&got), vec![0]);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(t.poll(1 << 20).0, vec![Line::Reset]);
        let _ = std::fs::remove_dir_all(&d);
    }

    fn json_map(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }
}
