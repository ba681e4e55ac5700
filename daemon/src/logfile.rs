//! The log file (`log_file` in tallyd.toml, `--log-file`): every log line that goes to
//! stderr goes here too, for sites without journald.
//!
//! - Appended (`O_APPEND`: one `write` per line, so lines from several threads never
//!   interleave), created 0640 (the log names users and hosts, never keys or tokens).
//! - Reopened by path on SIGHUP, so that logrotate can rename it away and signal
//!   (`postrotate`); `copytruncate` works too, as every write appends at the end.
//! - Opened non-blocking and written under a short lock: a log that cannot be written
//!   (disk full, a FIFO nobody reads) loses lines, never stops serving. The first failure
//!   and the recovery are said on stderr, once each.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The process's log file; nothing is written until [`LogFile::open`] names one.
pub static LOG_FILE: LogFile = LogFile {
    state: Mutex::new(State {
        path: None,
        file: None,
        failing: false,
    }),
};

/// A log file that can be opened later, reopened, and fail without harm.
#[derive(Debug)]
pub struct LogFile {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    path: Option<PathBuf>,
    file: Option<File>,
    /// A write failed and stderr was told; cleared (and said) at the next good write.
    failing: bool,
}

fn open_append(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        // A FIFO without a reader fails at once (ENXIO) instead of hanging the start.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

impl LogFile {
    /// Opens `path` for appending (created 0640) and writes every later line to it too.
    /// Fails if it cannot be opened, so a wrong path is a start-up error, not a silence.
    pub fn open(&self, path: &Path) -> io::Result<()> {
        let file = open_append(path)?;
        let mut state = self.lock();
        state.path = Some(path.to_path_buf());
        state.file = Some(file);
        state.failing = false;
        Ok(())
    }

    /// Opens the file again by its path (after logrotate moved it away). If that fails
    /// the old handle is kept, and the error is returned for the caller to log.
    pub fn reopen(&self) -> io::Result<()> {
        let mut state = self.lock();
        let Some(path) = state.path.clone() else {
            return Ok(());
        };
        let file = open_append(&path)?;
        state.file = Some(file);
        Ok(())
    }

    /// The file's path, if one is open.
    pub fn path(&self) -> Option<PathBuf> {
        self.lock().path.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves nothing half-done worth refusing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one formatted line; failures are reported on stderr, not to the caller.
    fn write_line(&self, buf: &[u8]) {
        let mut state = self.lock();
        let State {
            path,
            file,
            failing,
        } = &mut *state;
        let Some(f) = file.as_mut() else {
            return;
        };
        match f.write_all(buf) {
            Ok(()) if *failing => {
                *failing = false;
                eprintln!(
                    "tallyd: log file {} can be written again",
                    path.as_deref().unwrap_or(Path::new("?")).display()
                );
            }
            Ok(()) => {}
            Err(e) if !*failing => {
                *failing = true;
                eprintln!(
                    "tallyd: cannot write log file {}: {e}; lines are lost there (not on \
                     stderr) until it can be written, serving goes on",
                    path.as_deref().unwrap_or(Path::new("?")).display()
                );
            }
            Err(_) => {}
        }
    }
}

/// The writer `tracing_subscriber` asks for per event: it formats the whole line first
/// and writes it with one `write_all`, which this passes on as one append.
#[derive(Debug)]
pub struct LineWriter(&'static LogFile);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for &'static LogFile {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn appends_creates_0640_and_reopens_after_a_rename() {
        static LOG: LogFile = LogFile {
            state: Mutex::new(State {
                path: None,
                file: None,
                failing: false,
            }),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tallyd.log");
        std::fs::write(&path, "earlier\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        LOG.open(&path).unwrap();
        LOG.write_line(b"one\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "earlier\none\n");
        // An existing file keeps the mode the site gave it.
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // logrotate: rename, then SIGHUP.
        let rotated = dir.path().join("tallyd.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        LOG.write_line(b"two\n");
        LOG.reopen().unwrap();
        LOG.write_line(b"three\n");
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap(),
            "earlier\none\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o027, 0, "a new log file is at most 0640: {mode:o}");
    }
}
