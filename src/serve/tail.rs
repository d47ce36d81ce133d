//! Following a run's `metrics.jsonl` as training appends to it: complete
//! lines only (a torn last line waits for its newline), malformed lines
//! skipped and counted, a replaced or shortened file (a resumed run drops
//! the records after its checkpoint) read again from the start.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
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

/// Bytes kept of the file's start and of the end of what was read, to
/// notice a file rewritten in place (or recreated on the same inode).
const MARK: usize = 256;
/// A line longer than this is dropped (it cannot be a sensible record).
pub const MAX_LINE: u64 = 1 << 20;

/// A read position in one metrics file.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    /// The file read so far (inode), to notice an atomic replacement.
    ino: Option<u64>,
    /// Bytes consumed: just after a newline (or inside a dropped line).
    offset: u64,
    /// The file's first bytes and the last ones consumed, as read: a file
    /// that no longer has them there was rewritten.
    head: Vec<u8>,
    last: Vec<u8>,
    /// Lines below this number are counted, not parsed nor reported.
    pub from: u64,
    /// See `MAX_LINE` (smaller in tests).
    max_line: u64,
    /// Complete lines consumed (blank and malformed ones included, so line
    /// numbers match the file's).
    pub lines: u64,
    /// Malformed lines met so far.
    pub skipped: u64,
    /// Bytes the last poll read.
    pub read: usize,
    /// Inside a line longer than one read: it is dropped up to its newline.
    discarding: bool,
}

impl Tail {
    pub fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_path_buf(),
            ino: None,
            offset: 0,
            head: Vec::new(),
            last: Vec::new(),
            from: 0,
            max_line: MAX_LINE,
            lines: 0,
            skipped: 0,
            read: 0,
            discarding: false,
        }
    }

    /// Whether the file still holds what was read of it where it was read.
    fn same_file(&self, f: &File) -> bool {
        let at = |pos: u64, want: &[u8]| {
            let mut buf = vec![0; want.len()];
            f.read_exact_at(&mut buf, pos).is_ok() && buf == want
        };
        at(0, &self.head) && at(self.offset - self.last.len() as u64, &self.last)
    }

    /// Read what was appended since the last poll, at most `max_bytes`;
    /// returns the lines and whether more is waiting. A missing file is
    /// no lines (a run that has not logged yet); other read errors too,
    /// to be tried again at the next poll. A line is dropped only once
    /// `MAX_LINE` bytes of it were read in one poll: a smaller `max_bytes`
    /// that ends inside a line leaves it for the next poll.
    pub fn poll(&mut self, max_bytes: usize) -> (Vec<Line>, bool) {
        let mut out = Vec::new();
        self.read = 0;
        let Ok(mut f) = File::open(&self.path) else {
            if self.ino.take().is_some() {
                self.restart();
                out.push(Line::Reset);
            }
            return (out, false);
        };
        let Ok(meta) = f.metadata() else { return (out, false) };
        if self.ino.is_some_and(|i| i != meta.ino()) || meta.len() < self.offset || !self.same_file(&f) {
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
        self.read = buf.len();
        let more = self.offset + (buf.len() as u64) < meta.len();
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            if buf.len() as u64 >= self.max_line {
                // One line longer than a whole read: it cannot be a
                // sensible record; drop it rather than wait forever.
                self.consumed(&buf);
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
            if n < self.from {
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
        self.consumed(&buf[..=end]);
        (out, more)
    }

    /// Move past `bytes`, read at the current offset.
    fn consumed(&mut self, bytes: &[u8]) {
        if self.offset == 0 {
            self.head = bytes[..bytes.len().min(MARK)].to_vec();
        }
        self.offset += bytes.len() as u64;
        self.last = bytes[bytes.len().saturating_sub(MARK)..].to_vec();
    }

    fn restart(&mut self) {
        *self = Tail { max_line: self.max_line, ..Tail::new(&self.path) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An empty folder of this test process.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("knlp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn records(lines: &[Line]) -> Vec<u64> {
        lines.iter().filter_map(|l| if let Line::Record(n, _) = l { Some(*n) } else { None }).collect()
    }

    #[test]
    fn follows_appends_waits_for_torn_lines_and_restarts_on_replacement() {
        let d = scratch("tail");
        let p = d.join("metrics.jsonl");
        let mut t = Tail::new(&p);
        t.max_line = 16;
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

    /// A file truncated and written again in place (same inode) that grew
    /// past the old position between two polls is read from the start:
    /// its first line changed, or the bytes before the position did.
    #[test]
    fn a_file_rewritten_in_place_is_read_again() {
        let d = scratch("tail-inplace");
        let p = d.join("metrics.jsonl");
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        std::fs::write(&p, "{\"step\":1}\n{\"step\":2}\n").unwrap();
        let mut t = Tail::new(&p);
        assert_eq!(records(&t.poll(1 << 20).0), vec![0, 1]);
        let before = ino(&p);
        // Another first line, longer than what was read.
        std::fs::write(&p, "{\"step\":10}\n{\"step\":20}\n{\"step\":30}\n").unwrap();
        assert_eq!(ino(&p), before, "std::fs::write truncates in place");
        let (got, _) = t.poll(1 << 20);
        assert_eq!(got[0], Line::Reset);
        assert_eq!(records(&got), vec![0, 1, 2]);
        assert_eq!(t.lines, 3);
        // The same first line, other bytes before the old position.
        std::fs::write(&p, "{\"step\":10}\n{\"step\":21}\n{\"step\":31}\n{\"step\":41}\n").unwrap();
        let (got, _) = t.poll(1 << 20);
        assert_eq!(got[0], Line::Reset);
        assert_eq!(records(&got), vec![0, 1, 2, 3]);
        // An append is not a rewrite; lines below `from` are only counted.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"step\":51}\n").unwrap();
        assert_eq!(records(&t.poll(1 << 20).0), vec![4]);
        let mut t = Tail::new(&p);
        t.from = 3;
        assert_eq!(records(&t.poll(1 << 20).0), vec![3, 4]);
        assert_eq!(t.lines, 5);
        let _ = std::fs::remove_dir_all(&d);
    }

    fn json_map(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }
}
