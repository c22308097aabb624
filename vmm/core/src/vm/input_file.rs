//! The files a VM is built from (a Linux kernel, its initramfs, a micro-VM's ELF), opened for a
//! path that came from a request, an etcd record or a migration peer: only a regular file is
//! read, never past a bound for its kind, and the open never blocks. A FIFO would hang the
//! caller's API worker, and a device like `/dev/zero` would grow the read until the host process
//! (every VM it runs) died of memory.
//!
//! A tenant's kernel and initramfs must also be readable by any user of the host
//! ([`read_public`]): its guest reads them, so a root-only file named there would leak.
//!
//! Owns: the bounds on each kind of input, opening and reading within them, their errors.
//! Must not: read a file the caller did not name, or trust a length the file reported before the
//! read (it may grow while it is read).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Largest Linux kernel image read (a bzImage or vmlinux; Debian's are 8-70 MiB).
pub const MAX_KERNEL_BYTES: u64 = 256 << 20;
/// Largest micro-VM ELF opened (fw-guest is about 2 MiB, debug information included).
pub const MAX_MICROVM_ELF_BYTES: u64 = 64 << 20;

/// Why an input file was not used.
#[derive(Debug, thiserror::Error)]
pub enum InputFileError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file (a {0}); give the path of a kernel, initramfs or ELF file")]
    NotAFile(&'static str),
    #[error("{len} bytes, over the {max} bytes allowed for it")]
    TooLarge { len: u64, max: u64 },
    #[error(
        "mode {0:04o}: a tenant's kernel and initramfs must be readable by any user of the host \
         (its guest reads them)"
    )]
    NotPublic(u32),
}

/// The largest initramfs read for a guest of `mem_mib` MiB: it must fit in the guest's RAM.
pub fn max_initramfs_bytes(mem_mib: u64) -> u64 {
    mem_mib.saturating_mul(1 << 20)
}

/// Opens `path` for reading if it is a regular file of at most `max` bytes; returns it and its
/// length then. The open does not block (`O_NONBLOCK`, which a regular file's reads ignore).
pub fn open(path: &Path, max: u64) -> Result<(File, u64), InputFileError> {
    open_checked(path, max, false)
}

fn open_checked(path: &Path, max: u64, public: bool) -> Result<(File, u64), InputFileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(InputFileError::NotAFile(file_kind(&kind)));
    }
    if meta.len() > max {
        return Err(InputFileError::TooLarge {
            len: meta.len(),
            max,
        });
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
    if public && mode & 0o004 == 0 {
        return Err(InputFileError::NotPublic(mode));
    }
    Ok((file, meta.len()))
}

/// Reads the whole of `path`, a regular file of at most `max` bytes (also if it grows while it
/// is read).
pub fn read(path: &Path, max: u64) -> Result<Vec<u8>, InputFileError> {
    read_checked(path, max, false)
}

/// [`read`], of a file any user of the host may read (its mode lets others read it), checked on
/// the file opened. A tenant's kernel and initramfs are loaded into memory its guest reads, and
/// their paths come from a request, an etcd record or a snapshot's spec: a file only root may
/// read (a private key, `/etc/shadow`) named there was handed to the tenant.
pub fn read_public(path: &Path, max: u64) -> Result<Vec<u8>, InputFileError> {
    read_checked(path, max, true)
}

fn read_checked(path: &Path, max: u64, public: bool) -> Result<Vec<u8>, InputFileError> {
    let (file, len) = open_checked(path, max, public)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(InputFileError::TooLarge {
            len: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

fn file_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vigil-input-{}-{name}", std::process::id()))
    }

    #[test]
    fn only_regular_files_within_their_bound_are_read() {
        let file = temp("kernel");
        std::fs::write(&file, vec![7u8; 4096]).unwrap();
        assert_eq!(read(&file, 4096).unwrap().len(), 4096);
        let e = read(&file, 4095).unwrap_err();
        assert!(
            matches!(
                e,
                InputFileError::TooLarge {
                    len: 4096,
                    max: 4095
                }
            ),
            "{e}"
        );
        std::fs::remove_file(&file).unwrap();

        // A device would be read without end, a FIFO would block the open: both refused at once.
        for (path, kind) in [("/dev/zero", "character device"), ("/tmp", "directory")] {
            let e = read(Path::new(path), MAX_KERNEL_BYTES).unwrap_err();
            assert!(e.to_string().contains(kind), "{path}: {e}");
        }
        let fifo = temp("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open(&fifo, MAX_MICROVM_ELF_BYTES).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        std::fs::remove_file(&fifo).unwrap();

        // Only what any user may read goes into a tenant's memory.
        let secret = temp("secret");
        std::fs::write(&secret, b"key").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_public(&secret, 4096).unwrap_err();
        assert!(matches!(e, InputFileError::NotPublic(0o640)), "{e}");
        assert_eq!(read(&secret, 4096).unwrap(), b"key");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_public(&secret, 4096).unwrap(), b"key");
        std::fs::remove_file(&secret).unwrap();

        let e = read(Path::new("/nonexistent/bzImage"), MAX_KERNEL_BYTES).unwrap_err();
        assert!(matches!(e, InputFileError::Io(_)), "{e}");
        assert_eq!(max_initramfs_bytes(64), 64 << 20);
    }
}
