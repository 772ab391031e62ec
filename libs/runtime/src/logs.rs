//! What process apps print, as the platform keeps it.
//!
//! An app's stdout and stderr go into one pipe, read by a log writer: a
//! small process of the agent's own binary (`<agent> __log-writer PATH
//! MAX_BYTES KEEP`, see [`writer_main`]) that stamps each line with the time
//! it was read and appends it to the instance's log, rotating it by size.
//! It is its own process, in its own process group, so an agent that
//! restarts neither loses an app's output nor blocks it on a full pipe;
//! it runs as the agent's user, so the app can neither read nor rewrite
//! its log; and it ends when the last holder of the pipe (the app and its
//! children) closes it.
//!
//! A log line on disk is `<ms since the epoch> <text>`; `read` and
//! [`Follower`] turn files back into [`LogLine`]s.

use std::io::{BufRead, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The first argument that makes the agent's binary a log writer.
pub const WRITER_ARG: &str = "__log-writer";
/// A log is rotated once it holds this much.
pub const MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated logs kept beside the current one (`.1` is the newest).
pub const KEEP: usize = 2;
/// Longer lines are cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;
/// `read` returns at most this many lines.
pub const MAX_LINES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When the writer read it; 0 when the line carries no time.
    pub at_ms: i64,
    pub text: String,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// The log writer: lines from `input`, stamped, appended to `path`,
/// rotated past `max_bytes` (`path.1` .. `path.KEEP`), until `input` ends.
pub fn write_lines(
    input: impl Read,
    path: &Path,
    max_bytes: u64,
    keep: usize,
) -> std::io::Result<()> {
    let mut input = std::io::BufReader::with_capacity(64 * 1024, input);
    let mut file = open_append(path)?;
    let mut written = file.metadata()?.len();
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        let read = (&mut input)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        if written >= max_bytes {
            drop(file);
            for n in (1..keep).rev() {
                let _ = std::fs::rename(rotated(path, n), rotated(path, n + 1));
            }
            if keep > 0 {
                std::fs::rename(path, rotated(path, 1))?;
            } else {
                std::fs::remove_file(path)?;
            }
            file = open_append(path)?;
            written = 0;
        }
        let mut record = format!("{} ", now_ms()).into_bytes();
        record.extend_from_slice(&line);
        file.write_all(&record)?;
        written += record.len() as u64;
    }
}

/// `<binary> __log-writer PATH MAX_BYTES KEEP`: the log writer's main,
/// reading stdin. Returns the process's exit code.
pub fn writer_main(args: &[String]) -> i32 {
    let (Some(path), Some(max_bytes), Some(keep)) = (
        args.first(),
        args.get(1).and_then(|v| v.parse::<u64>().ok()),
        args.get(2).and_then(|v| v.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: {WRITER_ARG} PATH MAX_BYTES KEEP");
        return 2;
    };
    // The app's end of the pipe closing is the only way out: a terminal's
    // Ctrl-C is for the agent.
    let _ = block_sigint();
    match write_lines(std::io::stdin().lock(), Path::new(path), max_bytes, keep) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("log writer for {path}: {e}");
            1
        }
    }
}

fn block_sigint() -> nix::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
}

/// One line of a log file.
fn parse(line: &[u8]) -> LogLine {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let text = String::from_utf8_lossy(line);
    match text.split_once(' ') {
        Some((ms, rest)) if !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()) => LogLine {
            at_ms: ms.parse().unwrap_or_default(),
            text: rest.to_string(),
        },
        _ => LogLine {
            at_ms: 0,
            text: text.into_owned(),
        },
    }
}

/// The lines of the log at `path` (rotated ones first), read at or after
/// `since_ms`, the last `tail` of them (0: all), at most [`MAX_LINES`].
pub fn read(path: &Path, since_ms: i64, tail: usize) -> Vec<LogLine> {
    read_inner(path, since_ms, tail).0
}

/// [`read`], with the current file's inode and the bytes of it read (up
/// to its last complete line).
fn read_inner(path: &Path, since_ms: i64, tail: usize) -> (Vec<LogLine>, u64, u64) {
    let keep = if tail == 0 {
        MAX_LINES
    } else {
        tail.min(MAX_LINES)
    };
    let mut lines = std::collections::VecDeque::with_capacity(keep.min(1024));
    let mut files: Vec<PathBuf> = (1..=KEEP).rev().map(|n| rotated(path, n)).collect();
    files.push(path.to_path_buf());
    let (mut inode, mut offset) = (0, 0);
    for (i, name) in files.iter().enumerate() {
        let Ok(file) = std::fs::File::open(name) else {
            continue;
        };
        let current = i == files.len() - 1;
        if current {
            inode = file.metadata().map(|m| m.ino()).unwrap_or_default();
        }
        let mut reader = std::io::BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.last() != Some(&b'\n') => break,
                Ok(n) => {
                    if current {
                        offset += n as u64;
                    }
                }
            }
            let line = parse(&line);
            if line.at_ms < since_ms {
                continue;
            }
            if lines.len() == keep {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }
    (lines.into(), inode, offset)
}

/// [`read`], and a [`Follower`] that goes on from exactly where it
/// stopped: no line is missed or seen twice between the two (a partial
/// last line is left to the follower).
pub fn read_then_follow(path: &Path, since_ms: i64, tail: usize) -> (Vec<LogLine>, Follower) {
    let (lines, inode, offset) = read_inner(path, since_ms, tail);
    let follower = Follower {
        path: path.to_path_buf(),
        inode,
        offset,
        partial: Vec::new(),
    };
    (lines, follower)
}

/// New lines of a log as they are written, across rotations.
pub struct Follower {
    path: PathBuf,
    inode: u64,
    offset: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Follows from the log's current end.
    pub fn at_end(path: &Path) -> Follower {
        let (inode, offset) = std::fs::metadata(path)
            .map(|m| (m.ino(), m.len()))
            .unwrap_or_default();
        Follower {
            path: path.to_path_buf(),
            inode,
            offset,
            partial: Vec::new(),
        }
    }

    /// What was written since the last poll; `None` once the log is gone
    /// (the instance was stopped and its logs removed).
    pub fn poll(&mut self) -> Option<Vec<LogLine>> {
        let mut out = Vec::new();
        let meta = std::fs::metadata(&self.path).ok()?;
        if meta.ino() != self.inode {
            // Rotated: finish the old file (now `.1`), then start the new one.
            let old = rotated(&self.path, 1);
            if std::fs::metadata(&old).is_ok_and(|m| m.ino() == self.inode) {
                self.read_from(&old, &mut out);
            }
            self.inode = meta.ino();
            self.offset = 0;
            self.partial.clear();
        } else if meta.len() < self.offset {
            self.offset = 0;
            self.partial.clear();
        }
        let path = self.path.clone();
        self.read_from(&path, &mut out);
        Some(out)
    }

    fn read_from(&mut self, path: &Path, out: &mut Vec<LogLine>) {
        let Ok(mut file) = std::fs::File::open(path) else {
            return;
        };
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut bytes = Vec::new();
        let Ok(read) = file.take(4 * 1024 * 1024).read_to_end(&mut bytes) else {
            return;
        };
        self.offset += read as u64;
        self.partial.extend_from_slice(&bytes);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            out.push(parse(&line));
        }
    }
}

/// The log files of `path`: the current one and the rotated ones.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    files.extend((1..=KEEP).map(|n| rotated(path, n)));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_stamped_cut_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("one\ntwo\n{long}\nlast without newline");
        let before = now_ms();
        write_lines(input.as_bytes(), &path, 1 << 20, 2).unwrap();
        let lines = read(&path, 0, 0);
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts.len(), 5, "{texts:?}");
        assert_eq!(&texts[..2], ["one", "two"]);
        assert_eq!(texts[2].len(), MAX_LINE, "a long line is cut");
        assert_eq!(texts[3], "x".repeat(10));
        assert_eq!(texts[4], "last without newline");
        assert!(lines.iter().all(|l| l.at_ms >= before));
        assert_eq!(read(&path, 0, 2).len(), 2, "tail");
        assert!(read(&path, now_ms() + 60_000, 0).is_empty(), "since");

        // 100-byte lines into a 1,000-byte log: rotated, two kept.
        let rotating = dir.path().join("r.log");
        let input: String = (0..100).map(|i| format!("{i:0>85}\n")).collect();
        write_lines(input.as_bytes(), &rotating, 1_000, 2).unwrap();
        assert!(rotated(&rotating, 1).exists() && rotated(&rotating, 2).exists());
        assert!(!rotated(&rotating, 3).exists());
        let kept = read(&rotating, 0, 0);
        assert!(kept.len() < 100 && kept.len() >= 20, "{}", kept.len());
        let last: u32 = kept.last().unwrap().text.parse().unwrap();
        assert_eq!(last, 99, "the newest lines are kept");
        let numbers: Vec<u32> = kept.iter().map(|l| l.text.parse().unwrap()).collect();
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "in order: {numbers:?}"
        );
    }

    #[test]
    fn a_follower_sees_new_lines_across_a_rotation_and_ends_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        write_lines("before\n".as_bytes(), &path, 1 << 20, 2).unwrap();
        let mut follower = Follower::at_end(&path);
        assert_eq!(follower.poll().unwrap(), vec![]);
        write_lines("a\nb".as_bytes(), &path, 1 << 20, 2).unwrap();
        let texts = |lines: Vec<LogLine>| lines.into_iter().map(|l| l.text).collect::<Vec<_>>();
        assert_eq!(texts(follower.poll().unwrap()), ["a", "b"]);
        // The next write rotates (the log is past 10 bytes).
        write_lines("c\n".as_bytes(), &path, 10, 2).unwrap();
        assert_eq!(texts(follower.poll().unwrap()), ["c"]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(follower.poll(), None);
    }

    #[test]
    fn read_then_follow_misses_nothing_and_repeats_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.log");
        write_lines("1\n2\n".as_bytes(), &path, 1 << 20, 2).unwrap();
        // A partial line at the end is the follower's, once it is whole.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"5 three")
            .unwrap();
        let (lines, mut follower) = read_then_follow(&path, 0, 0);
        let texts = |lines: Vec<LogLine>| lines.into_iter().map(|l| l.text).collect::<Vec<_>>();
        assert_eq!(texts(lines), ["1", "2"]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b" and more\n")
            .unwrap();
        write_lines("4\n".as_bytes(), &path, 1 << 20, 2).unwrap();
        assert_eq!(texts(follower.poll().unwrap()), ["three and more", "4"]);
    }

    #[test]
    fn lines_without_a_time_are_kept_as_they_are() {
        assert_eq!(
            parse(b"hello world\n"),
            LogLine {
                at_ms: 0,
                text: "hello world".into()
            }
        );
        assert_eq!(parse(b"17 x y").at_ms, 17);
    }
}
