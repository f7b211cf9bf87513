//! A container's output on disk: size-capped, rotating files, and the reading side of `flotilla logs`.
//!
//! One record per line: `<time> <stream> <text>`. The time has millisecond precision so lines from stdout and
//! stderr interleave as they arrived. A line longer than [`MAX_LINE`] is cut into records of that size (Docker cuts
//! at 16 KiB too), so a program that never prints a newline cannot grow one record without end. Files rotate at a
//! size cap and only a few are kept: an SD card is small and wears out.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const LOG_FILE: &str = "container.log";
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// A file is rotated when it would grow past this.
    pub max_bytes: u64,
    /// Files kept, the current one included.
    pub files: u32,
}

impl Default for LogLimits {
    fn default() -> LogLimits {
        LogLimits {
            max_bytes: 10 << 20,
            files: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Appends records to `dir/container.log`, rotating to `.1`, `.2`… at the cap.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    limits: LogLimits,
    file: File,
    size: u64,
}

impl LogWriter {
    pub fn open(dir: &Path, limits: LogLimits) -> io::Result<LogWriter> {
        fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG_FILE))?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            limits,
            file,
            size,
        })
    }

    /// Writes one line (without its newline), cut into records of at most [`MAX_LINE`] bytes.
    pub fn line(&mut self, stream: Stream, text: &[u8], at: SystemTime) -> io::Result<()> {
        let stamp = timestamp(at);
        let chunks: Vec<&[u8]> = if text.is_empty() {
            vec![text]
        } else {
            text.chunks(MAX_LINE).collect()
        };
        for chunk in chunks {
            let mut record = Vec::with_capacity(chunk.len() + 40);
            record.extend_from_slice(stamp.as_bytes());
            record.push(b' ');
            record.extend_from_slice(stream.as_str().as_bytes());
            record.push(b' ');
            record.extend_from_slice(chunk);
            record.push(b'\n');
            if self.size > 0 && self.size + record.len() as u64 > self.limits.max_bytes {
                self.rotate()?;
            }
            self.file.write_all(&record)?;
            self.size += record.len() as u64;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.limits.files.max(1);
        let name = |n: u32| {
            if n == 0 {
                self.dir.join(LOG_FILE)
            } else {
                self.dir.join(format!("{LOG_FILE}.{n}"))
            }
        };
        let _ = fs::remove_file(name(keep - 1));
        for n in (0..keep - 1).rev() {
            match fs::rename(name(n), name(n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.file = OpenOptions::new().create(true).append(true).open(name(0))?;
        self.size = 0;
        Ok(())
    }
}

/// Splits a byte stream into lines for [`LogWriter::line`], holding a partial line until its newline (or until
/// it reaches [`MAX_LINE`]).
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn feed(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        for &b in bytes {
            if b == b'\n' {
                emit(&self.pending);
                self.pending.clear();
            } else {
                self.pending.push(b);
                if self.pending.len() == MAX_LINE {
                    emit(&self.pending);
                    self.pending.clear();
                }
            }
        }
    }

    /// The last line, when the stream ended without a newline.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

/// UTC with milliseconds: `2026-11-30T13:00:00.123Z`.
pub fn timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = crate::store::rfc3339(UNIX_EPOCH + Duration::from_secs(since.as_secs()));
    format!(
        "{}.{:03}Z",
        secs.trim_end_matches('Z'),
        since.subsec_millis()
    )
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub time: String,
    pub stream: Stream,
    pub text: Vec<u8>,
}

fn parse_record(line: &[u8]) -> Option<Record> {
    let mut parts = line.splitn(3, |b| *b == b' ');
    let time = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let text = parts.next().unwrap_or_default().to_vec();
    Some(Record { time, stream, text })
}

/// The files of a log, oldest first.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u32, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name
                .strip_prefix(LOG_FILE)?
                .strip_prefix('.')?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    out.push(dir.join(LOG_FILE));
    out
}

fn read_records(reader: &mut impl BufRead, mut each: impl FnMut(Record)) -> io::Result<u64> {
    let mut consumed = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        // A record without its newline is being written right now: leave it for the next read.
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(consumed);
        }
        consumed += n as u64;
        line.pop();
        if let Some(r) = parse_record(&line) {
            each(r);
        }
    }
}

/// The last `tail` records (all when None), oldest first.
pub fn read(dir: &Path, tail: Option<usize>) -> io::Result<Vec<Record>> {
    let mut out = VecDeque::new();
    for path in files(dir) {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        read_records(&mut BufReader::new(file), |r| {
            out.push_back(r);
            if tail.is_some_and(|t| out.len() > t) {
                out.pop_front();
            }
        })?;
    }
    Ok(out.into())
}

/// Prints what `read` returned, then keeps printing new records as they are written (across rotations) until
/// `keep_going` says the container is gone. Polls: a log on an SD card changes seldom, and inotify would be one more
/// OS boundary for no gain at this rate.
pub fn follow(
    dir: &Path,
    tail: Option<usize>,
    mut emit: impl FnMut(&Record) -> io::Result<()>,
    mut keep_going: impl FnMut() -> bool,
) -> io::Result<()> {
    let path = dir.join(LOG_FILE);
    // The current file is opened before the history is read, and the history of that file is read through the same
    // descriptor: a record written in between is then either in the history or after `offset`, never lost.
    let mut current = match File::open(&path) {
        Ok(f) => {
            let ino = inode(&f)?;
            Some((f, ino))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut history = VecDeque::new();
    let mut keep = |r: Record| {
        history.push_back(r);
        if tail.is_some_and(|t| history.len() > t) {
            history.pop_front();
        }
    };
    let rotated = files(dir);
    for p in &rotated[..rotated.len() - 1] {
        if let Ok(f) = File::open(p) {
            read_records(&mut BufReader::new(f), &mut keep)?;
        }
    }
    let mut offset = match &current {
        Some((f, _)) => read_records(&mut BufReader::new(f), &mut keep)?,
        None => 0,
    };
    for r in &history {
        emit(r)?;
    }
    let mut finishing = false;
    loop {
        let mut progressed = false;
        if let Some((file, ino)) = &mut current {
            file.seek(SeekFrom::Start(offset))?;
            let mut reader = BufReader::new(&*file);
            let mut failed = None;
            let n = read_records(&mut reader, |r| {
                if failed.is_none() {
                    failed = emit(&r).err();
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            offset += n;
            progressed = n > 0;
            // Rotated: the name now holds a new file. What the old one still had was read just above.
            let rotated = fs::metadata(&path).ok().map(|m| inode_of(&m)) != Some(*ino);
            if rotated && !progressed {
                current = None;
            }
        }
        if current.is_none() {
            if let Ok(f) = File::open(&path) {
                let ino = inode(&f)?;
                current = Some((f, ino));
                offset = 0;
                continue;
            }
        }
        if !progressed {
            if finishing {
                return Ok(());
            }
            // What was written before the writer was seen gone is read in one more pass.
            finishing = !keep_going();
            if !finishing {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn inode(f: &File) -> io::Result<u64> {
    Ok(inode_of(&f.metadata()?))
}

fn inode_of(m: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    m.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
    }

    #[test]
    fn timestamps_have_milliseconds() {
        assert_eq!(timestamp(at(7)), "2023-11-14T22:13:20.007Z");
    }

    #[test]
    fn records_round_trip_and_tail_keeps_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), LogLimits::default()).unwrap();
        for i in 0..5 {
            w.line(Stream::Stdout, format!("line {i}").as_bytes(), at(i))
                .unwrap();
        }
        w.line(Stream::Stderr, b"oops with  spaces", at(9)).unwrap();
        let all = read(dir.path(), None).unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(all[5].stream, Stream::Stderr);
        assert_eq!(all[5].text, b"oops with  spaces");
        let last2: Vec<Vec<u8>> = read(dir.path(), Some(2))
            .unwrap()
            .into_iter()
            .map(|r| r.text)
            .collect();
        assert_eq!(last2, [b"line 4".to_vec(), b"oops with  spaces".to_vec()]);
    }

    #[test]
    fn rotation_caps_the_size_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_bytes: 200,
            files: 3,
        };
        let mut w = LogWriter::open(dir.path(), limits).unwrap();
        for i in 0..100 {
            w.line(Stream::Stdout, format!("{i:04}").as_bytes(), at(i))
                .unwrap();
        }
        let total: u64 = files(dir.path())
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        assert!(total <= 3 * 200, "{total}");
        assert!(!dir.path().join("container.log.3").exists());
        let kept = read(dir.path(), None).unwrap();
        assert_eq!(kept.last().unwrap().text, b"0099");
        let numbers: Vec<u32> = kept
            .iter()
            .map(|r| String::from_utf8_lossy(&r.text).parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    }

    #[test]
    fn long_lines_are_cut_and_partial_lines_wait() {
        let mut s = LineSplitter::default();
        let mut lines: Vec<usize> = Vec::new();
        s.feed(&vec![b'x'; MAX_LINE + 10], |l| lines.push(l.len()));
        assert_eq!(lines, [MAX_LINE]);
        s.feed(b"\nab", |l| lines.push(l.len()));
        assert_eq!(lines, [MAX_LINE, 10]);
        s.finish(|l| lines.push(l.len()));
        assert_eq!(lines, [MAX_LINE, 10, 2]);
    }

    #[test]
    fn follow_sees_new_records_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_bytes: 120,
            files: 2,
        };
        let mut w = LogWriter::open(dir.path(), limits).unwrap();
        w.line(Stream::Stdout, b"before", at(0)).unwrap();
        let mut seen: Vec<String> = Vec::new();
        let mut polls = 0;
        follow(
            dir.path(),
            None,
            |r| {
                seen.push(String::from_utf8_lossy(&r.text).into_owned());
                Ok(())
            },
            || {
                polls += 1;
                // Each idle poll, the "container" writes a few more lines, enough to rotate.
                for i in 0..3 {
                    w.line(Stream::Stdout, format!("p{polls}-{i}").as_bytes(), at(1))
                        .unwrap();
                }
                polls < 4
            },
        )
        .unwrap();
        assert_eq!(seen[0], "before");
        for p in 1..4 {
            for i in 0..3 {
                assert!(seen.contains(&format!("p{p}-{i}")), "p{p}-{i} in {seen:?}");
            }
        }
    }
}
