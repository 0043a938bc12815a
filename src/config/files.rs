//! Opening the files a config names (the config itself, certificates, CA bundles, the access
//! log) so that no open can hang: opening a FIFO blocks until its other end appears, and a
//! device such as `/dev/zero` never ends. Each path is looked at before it is opened and the
//! open is non-blocking as a belt, then the opened file is looked at again (it may have been
//! swapped in between): only a regular file is read, and the access log may also be a
//! character device (`/dev/null`, a terminal).

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

/// Reads the whole of `path`, a regular file.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = open(path, OpenOptions::new().read(true), false)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Opens `path` for appending, creating it: a regular file or a character device.
pub fn open_append(path: &Path) -> io::Result<File> {
    open(path, OpenOptions::new().create(true).append(true), true)
}

fn open(path: &Path, options: &mut OpenOptions, devices: bool) -> io::Result<File> {
    // A missing file is left to the open, which says so (or creates it).
    if let Ok(meta) = fs::metadata(path) {
        accept(meta.file_type(), devices)?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    accept(file.metadata()?.file_type(), devices)?;
    Ok(file)
}

fn accept(kind: FileType, devices: bool) -> io::Result<()> {
    if kind.is_file() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if devices && kind.is_char_device() {
            return Ok(());
        }
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        if what != "not a regular file" {
            return Err(refused(format!("it is {what}, not a regular file")));
        }
    }
    Err(refused("it is not a regular file".to_string()))
}

fn refused(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn fifo(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo must work here");
        path
    }

    #[test]
    fn a_fifo_is_refused_at_once_for_reading_and_appending() {
        let dir = std::env::temp_dir().join(format!("cxgate-files-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("a temporary directory");
        let path = fifo(&dir);
        // Neither call may block: a blocked open would hang this test, not fail it.
        let read = read(&path)
            .map(|_| ())
            .expect_err("a FIFO must not be read");
        assert!(read.to_string().contains("FIFO"), "saw {read}");
        let append = open_append(&path)
            .map(|_| ())
            .expect_err("a FIFO must not be a log");
        assert!(append.to_string().contains("FIFO"), "saw {append}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_device_is_a_log_but_never_read() {
        assert!(
            open_append(Path::new("/dev/null")).is_ok(),
            "/dev/null is a fine log"
        );
        let err = read(Path::new("/dev/zero")).expect_err("a device never ends");
        assert!(err.to_string().contains("device"), "saw {err}");
        let err = read(Path::new("/")).expect_err("a directory is no file");
        assert!(err.to_string().contains("directory"), "saw {err}");
    }
}
