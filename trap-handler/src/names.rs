//! The names an attribution carries, without a heap allocation per trap.
//!
//! Owns: [`Comm`] (a task's `comm`: its `TASK_COMM_LEN` bytes inline), [`ExePath`] (an
//! executable's path, shared: the path a vCPU thread saw before is handed out again as the same
//! `Arc<str>`), and the per-thread scratch buffer a path is assembled in.
//! Must not: read guest memory (attribution does), or grow without bound: each thread keeps one
//! scratch buffer of [`PATH_SCRATCH`] bytes and at most [`EXE_PATHS`] paths.
//!
//! A thread allocates once for its scratch buffer and once per path it has not seen (or that
//! another path pushed out of its slot); the trap path of a process it has seen allocates nothing.
//! Paths that are not UTF-8 are never cached (each gets its own lossy copy).

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use serde::Serialize;

/// `TASK_COMM_LEN`: the bytes of a task's `comm`.
pub const COMM_LEN: usize = 16;

/// A task's `comm`: up to [`COMM_LEN`] bytes, the ones before the first NUL. Rendered as UTF-8
/// (invalid bytes as U+FFFD) wherever it is shown or compared with text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm {
    bytes: [u8; COMM_LEN],
    len: u8,
}

impl Comm {
    /// The name in `raw`: its bytes up to the first NUL, at most [`COMM_LEN`].
    pub fn from_bytes(raw: &[u8]) -> Comm {
        let raw = &raw[..raw.len().min(COMM_LEN)];
        let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let mut bytes = [0u8; COMM_LEN];
        bytes[..len].copy_from_slice(&raw[..len]);
        Comm {
            bytes,
            len: len as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The name as text: borrowed when it is UTF-8 (a heap copy only for one that is not).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }
}

/// A comm from text (tests, policies): its first [`COMM_LEN`] bytes, as the kernel would keep.
impl From<&str> for Comm {
    fn from(s: &str) -> Comm {
        Comm::from_bytes(s.as_bytes())
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.text(), f)
    }
}

impl Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

impl PartialEq<str> for Comm {
    fn eq(&self, other: &str) -> bool {
        self.text() == other
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.text() == *other
    }
}

/// An executable's path (see the module doc: shared, not copied, between the events of one
/// path). Reads as a `str`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ExePath(Arc<str>);

impl std::ops::Deref for ExePath {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ExePath {
    fn from(s: &str) -> ExePath {
        ExePath(Arc::from(s))
    }
}

impl From<String> for ExePath {
    fn from(s: String) -> ExePath {
        ExePath(Arc::from(s))
    }
}

impl std::fmt::Display for ExePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for ExePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for ExePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl PartialEq<str> for ExePath {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for ExePath {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for ExePath {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

/// Paths kept per thread (direct-mapped by a hash of their bytes).
pub const EXE_PATHS: usize = 64;
/// Bytes of the per-thread buffer a path is assembled in: the deepest path attribution accepts
/// (64 components of NAME_MAX bytes, each after a slash).
pub const PATH_SCRATCH: usize = 64 * 256;

struct Scratch {
    path: Vec<u8>,
    paths: [Option<(u64, ExePath)>; EXE_PATHS],
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// FNV-1a, 64 bits: the cache slot of a path (the bytes are compared on a hit, so a collision
/// costs a copy, never a wrong name).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The path `build` writes into an empty buffer (of [`PATH_SCRATCH`] bytes' capacity), as an
/// [`ExePath`]: the one this thread made before for the same bytes, if it still has it.
pub(crate) fn exe_path_with<E>(
    build: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<ExePath, E> {
    SCRATCH.with(|cell| {
        let Ok(mut guard) = cell.try_borrow_mut() else {
            // Re-entered (not on the trap path): a buffer of its own.
            let mut path = Vec::new();
            build(&mut path)?;
            return Ok(ExePath::from(String::from_utf8_lossy(&path).into_owned()));
        };
        let scratch = guard.get_or_insert_with(|| Scratch {
            path: Vec::with_capacity(PATH_SCRATCH),
            paths: [const { None }; EXE_PATHS],
        });
        scratch.path.clear();
        build(&mut scratch.path)?;
        let bytes = &scratch.path[..];
        let hash = fnv1a(bytes);
        let slot = &mut scratch.paths[(hash % EXE_PATHS as u64) as usize];
        if let Some((h, path)) = slot {
            if *h == hash && path.as_bytes() == bytes {
                return Ok(path.clone());
            }
        }
        Ok(match std::str::from_utf8(bytes) {
            Ok(text) => {
                let path = ExePath::from(text);
                *slot = Some((hash, path.clone()));
                path
            }
            Err(_) => ExePath::from(String::from_utf8_lossy(bytes).into_owned()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_stops_at_nul_and_len_and_renders_lossily() {
        assert_eq!(Comm::from_bytes(b"nc\0hidden"), "nc");
        assert_eq!(Comm::from_bytes(b"ABCDEFGHIJKLMNOPQRS"), "ABCDEFGHIJKLMNOP");
        let odd = Comm::from_bytes(&[0xff, 0xfe, b'a', 0, b'b']);
        assert_eq!(odd, "\u{fffd}\u{fffd}a");
        assert_eq!(odd.as_bytes(), &[0xff, 0xfe, b'a']);
        assert_eq!(
            serde_json::to_string(&odd).unwrap(),
            "\"\u{fffd}\u{fffd}a\""
        );
        assert!(matches!(Comm::from("curl").text(), Cow::Borrowed("curl")));
    }

    #[test]
    fn a_path_seen_again_is_shared_and_others_are_not_confused() {
        let build = |s: &'static [u8]| {
            exe_path_with::<()>(|b| {
                b.extend_from_slice(s);
                Ok(())
            })
            .unwrap()
        };
        let a = build(b"/usr/bin/curl");
        let b = build(b"/usr/bin/curl");
        assert!(Arc::ptr_eq(&a.0, &b.0));
        let c = build(b"/usr/bin/wget");
        assert_eq!(c, "/usr/bin/wget");
        assert_eq!(build(b"/usr/bin/curl"), "/usr/bin/curl");
        // Not UTF-8: lossy, and never taken for another path.
        assert_eq!(build(b"/tmp/\xff"), "/tmp/\u{fffd}");
        assert_eq!(build(b"/tmp/\xef\xbf\xbd"), "/tmp/\u{fffd}");
        // A failed build gives its error.
        assert_eq!(exe_path_with(|_| Err::<(), _>(7)), Err(7));
    }
}
