//! Following one log file: new complete lines each poll, safe across
//! rotation (a new inode at the path: the old file, still open, is read to
//! its end first — lines written just before the rename are not lost —
//! then the new file from its start) and truncation (the file got shorter:
//! read again from its start), at most a bounded number of bytes per poll,
//! a partial last line kept for the next poll. A file that does not exist
//! (yet) gives no lines.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Longest line kept whole; a longer one is cut here and the rest dropped
/// up to its end.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    /// (device, inode) of the file being read; None before the first sight.
    id: Option<(u64, u64)>,
    /// Where the next read starts.
    pos: u64,
    /// Bytes of a line whose end has not been read yet.
    partial: Vec<u8>,
    /// The current line passed [`MAX_LINE`]: drop bytes up to its end.
    skipping: bool,
    /// Read from the start on first sight (else from the end).
    from_start: bool,
    /// The file being read (inode `id`), kept open between polls.
    file: Option<File>,
}

/// What one poll found.
#[derive(Debug, Default, PartialEq)]
pub struct Polled {
    pub lines: Vec<String>,
    pub bytes: u64,
    pub rotated: bool,
    pub truncated: bool,
}

impl Tail {
    /// Follows `path`; `from_start`: a file that began after we started
    /// watching is read whole, else only what is written after first sight.
    pub fn new(path: &Path, from_start: bool) -> Tail {
        Tail {
            path: path.to_path_buf(),
            id: None,
            pos: 0,
            partial: Vec::new(),
            skipping: false,
            from_start,
            file: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn restart(&mut self) {
        self.pos = 0;
        self.partial.clear();
        self.skipping = false;
    }

    /// Reads at most `max` new bytes and returns the lines they complete.
    /// One `stat` of the path per poll; the file is opened on first sight
    /// and after a rotation only.
    pub fn poll(&mut self, max: usize) -> std::io::Result<Polled> {
        let mut out = Polled::default();
        let at_path = match std::fs::metadata(&self.path) {
            Ok(m) => Some(((m.dev(), m.ino()), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.go_on(None, max, out);
            }
            Err(e) => return Err(e),
        };
        match (self.id, at_path) {
            (None, Some(_)) => {
                let (f, id, size) = open(&self.path)?;
                self.id = Some(id);
                self.file = Some(f);
                if !self.from_start {
                    self.pos = size;
                    return Ok(out);
                }
            }
            (Some(old), Some((id, _))) if old != id => {
                // Rotated: first what the old file got before the rename.
                if let Some(mut old_file) = self.file.take() {
                    let size = old_file.metadata()?.len();
                    let drained = self.read(&mut old_file, size, max, &mut out)?;
                    if !drained {
                        self.file = Some(old_file);
                        return Ok(out);
                    }
                    // Its unfinished last line never will be: a line.
                    if !self.skipping && !self.partial.is_empty() {
                        out.lines
                            .push(String::from_utf8_lossy(&self.partial).into_owned());
                    }
                }
                let (f, id, _) = open(&self.path)?;
                self.id = Some(id);
                self.file = Some(f);
                self.restart();
                out.rotated = true;
            }
            _ => {}
        }
        self.go_on(at_path, max, out)
    }

    /// Reads on in the open file, if any. `at_path`: the (id, size) the path
    /// showed this poll, which is the open file's size when it is that file.
    fn go_on(
        &mut self,
        at_path: Option<((u64, u64), u64)>,
        max: usize,
        mut out: Polled,
    ) -> std::io::Result<Polled> {
        // Removed or renamed away and not replaced: go on with the one open.
        let Some(mut file) = self.file.take() else {
            return Ok(out);
        };
        let size = match at_path {
            Some((id, size)) if Some(id) == self.id => size,
            _ => file.metadata()?.len(),
        };
        if size < self.pos {
            self.restart();
            out.truncated = true;
        }
        let budget = max.saturating_sub(out.bytes as usize);
        let r = self.read(&mut file, size, budget, &mut out);
        self.file = Some(file);
        r.map(|_| out)
    }

    /// Reads at most `max` bytes of `file` (`size` long) from `pos` into
    /// `out`; true when that reached its end.
    fn read(
        &mut self,
        file: &mut File,
        size: u64,
        max: usize,
        out: &mut Polled,
    ) -> std::io::Result<bool> {
        if size <= self.pos {
            return Ok(true);
        }
        let want = (size - self.pos).min(max as u64);
        file.seek(SeekFrom::Start(self.pos))?;
        let mut buf = Vec::with_capacity(want as usize);
        file.take(want).read_to_end(&mut buf)?;
        self.pos += buf.len() as u64;
        out.bytes += buf.len() as u64;
        self.split(&buf, &mut out.lines);
        Ok(self.pos >= size)
    }

    /// Splits on `\n` and `\r` (progress bars redraw with `\r`).
    fn split(&mut self, buf: &[u8], lines: &mut Vec<String>) {
        for &b in buf {
            if b == b'\n' || b == b'\r' {
                if !self.skipping && !self.partial.is_empty() {
                    lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                }
                self.partial.clear();
                self.skipping = false;
            } else if !self.skipping {
                self.partial.push(b);
                if self.partial.len() >= MAX_LINE {
                    lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                    self.partial.clear();
                    self.skipping = true;
                }
            }
        }
    }
}

/// Opens `path`: the file, its (device, inode) and its size.
fn open(path: &Path) -> std::io::Result<(File, (u64, u64), u64)> {
    let f = File::open(path)?;
    let meta = f.metadata()?;
    Ok((f, (meta.dev(), meta.ino()), meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(p: &Path, s: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    }

    #[test]
    fn first_sight_starts_at_the_end_and_partial_lines_wait() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.out");
        let mut t = Tail::new(&p, false);
        assert_eq!(t.poll(1024).unwrap(), Polled::default(), "no file yet");
        append(&p, "old line\n");
        assert!(t.poll(1024).unwrap().lines.is_empty(), "from the end");
        append(&p, "step 1\nstep 2 lo");
        assert_eq!(t.poll(1024).unwrap().lines, ["step 1"]);
        append(&p, "ss 0.5\n");
        assert_eq!(t.poll(1024).unwrap().lines, ["step 2 loss 0.5"]);
        // A job that started after us is read from its start.
        let mut whole = Tail::new(&p, true);
        assert_eq!(whole.poll(1024).unwrap().lines.len(), 3);
    }

    #[test]
    fn reads_are_bounded_and_carry_on_next_poll() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.out");
        let mut t = Tail::new(&p, true);
        let text: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
        append(&p, &text);
        let mut got = Vec::new();
        let mut polls = 0;
        loop {
            let r = t.poll(100).unwrap();
            assert!(r.bytes <= 100);
            if r.bytes == 0 {
                break;
            }
            polls += 1;
            got.extend(r.lines);
        }
        assert_eq!(polls, 9, "900 bytes, 100 a poll");
        assert_eq!(got.len(), 100);
        assert_eq!(got[99], "line 099");
    }

    #[test]
    fn rotation_and_truncation_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.out");
        append(&p, "before\n");
        let mut t = Tail::new(&p, false);
        t.poll(1024).unwrap();
        append(&p, "a\n");
        assert_eq!(t.poll(1024).unwrap().lines, ["a"]);
        // Rotated: written to, renamed away, a new file at the path. What
        // the old file got before the rename comes first, its unfinished
        // last line included.
        append(&p, "b\nlast wo");
        std::fs::rename(&p, dir.path().join("job.out.1")).unwrap();
        append(&p, "new 1\n");
        let r = t.poll(1024).unwrap();
        assert!(r.rotated);
        assert_eq!(r.lines, ["b", "last wo", "new 1"]);
        // Again, with more left in the old file than one poll reads: the
        // old file is finished over the next polls, then the new one.
        let old: String = (0..30).map(|i| format!("old {i:02}\n")).collect();
        append(&p, &old);
        std::fs::rename(&p, dir.path().join("job.out.2")).unwrap();
        append(&p, "new 2\n");
        let mut lines = Vec::new();
        let mut rotated = 0;
        for _ in 0..10 {
            let r = t.poll(64).unwrap();
            assert!(r.bytes <= 64, "{}", r.bytes);
            rotated += usize::from(r.rotated);
            lines.extend(r.lines);
        }
        assert_eq!(rotated, 1);
        assert_eq!(lines.len(), 31, "{lines:?}");
        assert_eq!(lines[0], "old 00");
        assert_eq!(lines[29], "old 29");
        assert_eq!(lines[30], "new 2");
        // Truncated in place (same inode), then written again.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        append(&p, "x\n");
        let r = t.poll(1024).unwrap();
        assert!(r.truncated);
        assert_eq!(r.lines, ["x"]);
    }

    #[test]
    fn carriage_returns_split_and_huge_lines_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.out");
        let mut t = Tail::new(&p, true);
        append(
            &p,
            " 1%| | 10/1000 [00:01<01:39]\r 2%| | 20/1000 [00:02<01:38]\r",
        );
        assert_eq!(t.poll(1024).unwrap().lines.len(), 2);
        append(&p, &"y".repeat(MAX_LINE + 10));
        append(&p, "\nok\n");
        let mut lines = Vec::new();
        for _ in 0..4 {
            lines.extend(t.poll(1 << 20).unwrap().lines);
        }
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1], "ok");
    }
}
