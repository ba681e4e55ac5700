//! Making what sled holds durable: sled's flush, then an fdatasync of our own.
//!
//! sled 0.34 ends [`sled::Db::flush`] with `sync_file_range` on Linux, which writes the
//! data but not the metadata that finds it (file size, new extents); its own fsync comes
//! from a background thread up to 500 ms later. Anything acknowledged in that window was
//! lost when the file system failed under tallyd (the daemon's read-only volume test), so
//! [`flush`] follows sled's flush with `fdatasync` on our own descriptor of sled's log
//! file ([`open_log_file`]). sled also writes a page over a quarter of a segment to a
//! blob file of its own (`blobs/<lsn>`) and never fsyncs it: [`flush`] syncs the blob
//! files present too (none in normal use: the seat store and the Raft log keep their
//! values small; a large Raft command or a consolidated leaf of large ones gets there).
//!
//! The seat store (tallyd's `store` module) and the Raft log store of this crate both
//! flush through here: one durable path.

use std::fs::File;
use std::path::Path;

/// Why a flush failed.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// sled's own flush failed (disk full, I/O error).
    #[error("{0}")]
    Sled(sled::Error),
    /// The fdatasync of sled's log file or of a blob file failed.
    #[error("{0}")]
    Io(std::io::Error),
}

/// Opens sled's log file (`<dir>/db`) again, for the fdatasync of [`flush`].
///
/// `dir` is the directory sled was opened in; open sled first, which creates the file.
pub fn open_log_file(dir: &Path) -> std::io::Result<File> {
    File::open(dir.join("db"))
}

/// Makes everything written to `db` so far durable: sled's flush, then fdatasync of its
/// log file (`log`, from [`open_log_file`]) and of any blob file in `<dir>/blobs`.
///
/// Blocking: call it from a thread of its own or tokio's blocking pool.
pub fn flush(db: &sled::Db, log: &File, dir: &Path) -> Result<(), FlushError> {
    db.flush().map_err(FlushError::Sled)?;
    log.sync_data().map_err(FlushError::Io)?;
    sync_blobs(dir).map_err(FlushError::Io)
}

/// fdatasyncs every blob file in `<dir>/blobs`, and the directory itself when there is
/// one (a new blob's directory entry). Linear in the blobs present, which are rare and
/// removed by sled once the page is rewritten.
fn sync_blobs(dir: &Path) -> std::io::Result<()> {
    let blobs = dir.join("blobs");
    let entries = match std::fs::read_dir(&blobs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut any = false;
    for entry in entries {
        let path = entry?.path();
        match File::open(&path) {
            Ok(file) => file.sync_data()?,
            // Removed by sled's blob collection between the listing and the open.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
        any = true;
    }
    if any {
        sync_dir(&blobs)?;
    }
    Ok(())
}

/// fsyncs a directory, so that the entries created in it survive a power cut.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_value_sled_puts_in_a_blob_file_is_flushed_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .segment_size(128 * 1024)
            .open()
            .unwrap();
        let log = super::open_log_file(dir.path()).unwrap();
        // Over a quarter of a segment: sled writes it to blobs/<lsn>.
        db.insert(b"large", vec![7u8; 256 * 1024]).unwrap();
        super::flush(&db, &log, dir.path()).unwrap();
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert!(blobs > 0, "no blob file written: the test tests nothing");
        assert_eq!(db.get(b"large").unwrap().unwrap().len(), 256 * 1024);
    }
}
