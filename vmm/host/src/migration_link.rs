//! The transport of a live migration between hosts: one TCP connection, mutual authentication
//! with the hosts' keys before any state moves, and an integrity check on every byte after it.
//!
//! Keys: every host has its own 256-bit keys, numbered; one is current, and a few before it stay
//! valid during a rotation. A host knows the keys of the hosts it may migrate with, its own
//! included: from the cluster (etcd's `/vigil/keys/<host>`, kept current by the host agent,
//! `Host::set_migration_keys`), or from a file (`--migration-keys FILE`: `{"host-a": "64 hex
//! digits", ...}`, each as key id 0).
//!
//! Handshake (S = source, T = target; names, key ids and nonces are bound into every proof):
//! 1. S → T `Hello {source, key_id_s, nonce_s}` (its current key's id, 32 random bytes).
//! 2. T looks up S's key `key_id_s` (an unknown host or key id is refused), answers
//!    `Challenge {target, key_id_t, nonce_t, proof_t = HMAC-SHA256(K_T, "target" ‖ transcript)}`.
//! 3. S looks up T's key `key_id_t` and checks proof_t (constant time), answers `Proof {proof_s =
//!    HMAC-SHA256(K_S, "source" ‖ transcript)}`; T checks it and says yes or no.
//!
//! The transcript is the protocol name, both host names, both key ids and both nonces. The session key is
//! `HMAC(HMAC(K_S, "session" ‖ transcript), HMAC(K_T, "session" ‖ transcript))`: it takes both
//! keys. From there every message in both directions travels in frames `len ‖ payload ‖
//! HMAC-SHA256(session, direction ‖ sequence ‖ len ‖ payload)`: a changed, dropped, replayed,
//! reordered or reflected frame fails the check and ends the migration (bytes of a frame reach
//! the reader only after its check). Not protected: confidentiality (guest RAM crosses the wire
//! in the clear; run it over a trusted network or IPsec), and since the keys are symmetric, a
//! host that knows another's key can pretend to be it.
//!
//! Owns: the keys file, the handshake, the sealed frames and the `tcp:HOST:PORT` URL form.
//! Must not: know what a migration sends (that is `migration`), or let unchecked bytes through.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;
use vmm_core::snapshot::{read_json, write_json};

type HmacSha256 = Hmac<Sha256>;

/// The handshake's protocol name (bound into every proof).
const PROTOCOL: &[u8] = b"vigil-migration-3";
/// Largest payload of one sealed frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Payload a writer gathers before it seals a frame.
const FRAME: usize = 256 << 10;
const TAG: usize = 32;
const NONCE: usize = 32;
/// Keys shorter than this are refused.
const MIN_KEY: usize = 32;

/// Direction bytes in each frame's tag: a frame cannot be reflected back to its sender.
pub const TO_TARGET: u8 = 0;
pub const TO_SOURCE: u8 = 1;

/// Why the handshake failed.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("host {0:?} is not in this host's migration keys")]
    UnknownHost(String),
    #[error("this host holds no key {1} of host {0:?} (rotated out, or not yet seen here)")]
    UnknownKeyId(String, u32),
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("the peer's proof is wrong (it does not hold {0:?}'s key)")]
    BadProof(String),
    #[error("this host has no migration keys (start it with --migration-keys), or none for itself ({0:?})")]
    NoOwnKey(String),
    #[error("cannot draw a nonce: {0}")]
    Random(io::Error),
}

/// One host's migration keys: by id, and which one it signs with now.
#[derive(Clone, Default)]
struct HostKeyring {
    current: u32,
    keys: BTreeMap<u32, Vec<u8>>,
}

/// The keys of the hosts this host may migrate with, its own included.
#[derive(Clone, Default)]
pub struct MigrationKeys {
    hosts: BTreeMap<String, HostKeyring>,
}

impl std::fmt::Debug for MigrationKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_map()
            .entries(
                self.hosts
                    .iter()
                    .map(|(h, k)| (h, k.keys.keys().collect::<Vec<_>>())),
            )
            .finish()
    }
}

fn check_key_len(host: &str, key: &[u8]) -> Result<(), String> {
    if key.len() < MIN_KEY {
        return Err(format!(
            "migration key of {host:?}: {} bytes (at least {MIN_KEY})",
            key.len()
        ));
    }
    Ok(())
}

impl MigrationKeys {
    /// `{"host": "hex", ...}`: at least 64 hex digits (32 bytes) each, each as key id 0.
    pub fn from_json(text: &str) -> Result<MigrationKeys, String> {
        let map: BTreeMap<String, String> =
            serde_json::from_str(text).map_err(|e| format!("migration keys: {e}"))?;
        let mut keys = MigrationKeys::default();
        for (host, hex_key) in map {
            let key = hex::decode(hex_key.trim())
                .map_err(|e| format!("migration key of {host:?}: {e}"))?;
            keys.set_host(&host, 0, vec![(0, key)])?;
        }
        Ok(keys)
    }

    pub fn load(path: &Path) -> Result<MigrationKeys, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `host`'s only key, as id 0.
    pub fn insert(&mut self, host: &str, key: Vec<u8>) {
        self.hosts.insert(
            host.into(),
            HostKeyring {
                current: 0,
                keys: BTreeMap::from([(0, key)]),
            },
        );
    }

    /// Sets `host`'s keys by id, `current` among them (it signs with that one), replacing what
    /// it had. Refused (nothing changed): a short key, or `current` not among them.
    pub fn set_host(
        &mut self,
        host: &str,
        current: u32,
        keys: Vec<(u32, Vec<u8>)>,
    ) -> Result<(), String> {
        for (_, key) in &keys {
            check_key_len(host, key)?;
        }
        let keys: BTreeMap<u32, Vec<u8>> = keys.into_iter().collect();
        if !keys.contains_key(&current) {
            return Err(format!(
                "migration keys of {host:?}: the current key {current} is not among them"
            ));
        }
        self.hosts
            .insert(host.into(), HostKeyring { current, keys });
        Ok(())
    }

    /// The hosts it holds keys of.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts.keys().map(String::as_str)
    }

    /// This host's own current key and its id (`me` is its name).
    pub fn own(&self, me: &str) -> Result<(u32, &[u8]), AuthError> {
        let ring = self
            .hosts
            .get(me)
            .ok_or_else(|| AuthError::NoOwnKey(me.into()))?;
        ring.keys
            .get(&ring.current)
            .map(|k| (ring.current, k.as_slice()))
            .ok_or_else(|| AuthError::NoOwnKey(me.into()))
    }

    fn key(&self, host: &str, id: u32) -> Result<&[u8], AuthError> {
        self.hosts
            .get(host)
            .ok_or_else(|| AuthError::UnknownHost(host.into()))?
            .keys
            .get(&id)
            .map(Vec::as_slice)
            .ok_or_else(|| AuthError::UnknownKeyId(host.into(), id))
    }
}

/// `tcp:HOST:PORT` (or `tcp://HOST:PORT`) → `HOST:PORT`.
pub fn tcp_target(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("tcp://")
        .or_else(|| url.strip_prefix("tcp:"))?;
    let (host, port) = rest.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok()).then_some(rest)
}

#[derive(Serialize, Deserialize)]
struct Hello {
    protocol: String,
    source: String,
    /// Absent from older protocols (their name is refused first).
    #[serde(default)]
    key_id: u32,
    nonce: String,
}

#[derive(Serialize, Deserialize)]
struct Challenge {
    error: Option<String>,
    target: String,
    #[serde(default)]
    key_id: u32,
    nonce: String,
    proof: String,
}

#[derive(Serialize, Deserialize)]
struct Proof {
    proof: String,
}

#[derive(Serialize, Deserialize)]
struct Welcome {
    error: Option<String>,
}

fn nonce() -> Result<[u8; NONCE], AuthError> {
    let mut bytes = [0u8; NONCE];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != NONCE as isize {
        return Err(AuthError::Random(io::Error::last_os_error()));
    }
    Ok(bytes)
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for part in parts {
        m.update(part);
    }
    m
}

/// What both proofs and the session key cover: each host by name and key id, both nonces.
fn transcript(
    (source, key_s): (&str, u32),
    (target, key_t): (&str, u32),
    nonce_s: &[u8],
    nonce_t: &[u8],
) -> Vec<u8> {
    let mut t = PROTOCOL.to_vec();
    for (part, key_id) in [(source.as_bytes(), key_s), (target.as_bytes(), key_t)] {
        t.extend_from_slice(&(part.len() as u32).to_le_bytes());
        t.extend_from_slice(part);
        t.extend_from_slice(&key_id.to_le_bytes());
    }
    t.extend_from_slice(nonce_s);
    t.extend_from_slice(nonce_t);
    t
}

fn session_key(k_source: &[u8], k_target: &[u8], transcript: &[u8]) -> [u8; 32] {
    let a = mac(k_source, &[b"session", transcript])
        .finalize()
        .into_bytes();
    let b = mac(k_target, &[b"session", transcript])
        .finalize()
        .into_bytes();
    mac(&a, &[&b]).finalize().into_bytes().into()
}

fn unhex(field: &str, value: &str) -> Result<Vec<u8>, AuthError> {
    hex::decode(value).map_err(|e| AuthError::Refused(format!("{field}: {e}")))
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session with {:?}", self.peer)
    }
}

/// An authenticated session's two halves and the peer's name.
pub struct Session {
    pub peer: String,
    pub writer: SealedWriter<TcpStream>,
    pub reader: SealedReader<TcpStream>,
}

fn halves(
    stream: TcpStream,
    key: [u8; 32],
    send: u8,
    recv: u8,
    peer: String,
) -> io::Result<Session> {
    let reader = SealedReader::new(stream.try_clone()?, &key, recv);
    Ok(Session {
        peer,
        writer: SealedWriter::new(stream, &key, send),
        reader,
    })
}

/// The source's side of the handshake.
pub fn connect(
    mut stream: TcpStream,
    keys: &MigrationKeys,
    me: &str,
) -> Result<Session, AuthError> {
    let (own_id, own) = keys.own(me)?;
    let own = own.to_vec();
    let nonce_s = nonce()?;
    write_json(
        &mut stream,
        &Hello {
            protocol: String::from_utf8_lossy(PROTOCOL).into(),
            source: me.into(),
            key_id: own_id,
            nonce: hex::encode(nonce_s),
        },
    )?;
    let challenge: Challenge = read_json(&mut stream, 4096)?;
    if let Some(e) = challenge.error {
        return Err(AuthError::Refused(e));
    }
    let k_target = keys.key(&challenge.target, challenge.key_id)?;
    let nonce_t = unhex("nonce", &challenge.nonce)?;
    let t = transcript(
        (me, own_id),
        (&challenge.target, challenge.key_id),
        &nonce_s,
        &nonce_t,
    );
    mac(k_target, &[b"target", &t])
        .verify_slice(&unhex("proof", &challenge.proof)?)
        .map_err(|_| AuthError::BadProof(challenge.target.clone()))?;
    let proof = mac(&own, &[b"source", &t]).finalize().into_bytes();
    write_json(
        &mut stream,
        &Proof {
            proof: hex::encode(proof),
        },
    )?;
    let welcome: Welcome = read_json(&mut stream, 4096)?;
    if let Some(e) = welcome.error {
        return Err(AuthError::Refused(e));
    }
    let key = session_key(&own, k_target, &t);
    Ok(halves(stream, key, TO_TARGET, TO_SOURCE, challenge.target)?)
}

/// The target's side of the handshake. A refused peer is told why (the error says it too).
pub fn accept(mut stream: TcpStream, keys: &MigrationKeys, me: &str) -> Result<Session, AuthError> {
    let refuse = |stream: &mut TcpStream, e: AuthError| {
        let _ = write_json(
            stream,
            &Challenge {
                error: Some(e.to_string()),
                target: me.into(),
                key_id: 0,
                nonce: String::new(),
                proof: String::new(),
            },
        );
        e
    };
    let (own_id, own) = match keys.own(me) {
        Ok((id, k)) => (id, k.to_vec()),
        Err(e) => return Err(refuse(&mut stream, e)),
    };
    let hello: Hello = read_json(&mut stream, 4096)?;
    if hello.protocol.as_bytes() != PROTOCOL {
        let e = AuthError::Refused(format!(
            "protocol {:?} (this host speaks {:?})",
            hello.protocol,
            String::from_utf8_lossy(PROTOCOL)
        ));
        return Err(refuse(&mut stream, e));
    }
    let k_source = match keys.key(&hello.source, hello.key_id) {
        Ok(k) => k.to_vec(),
        Err(e) => return Err(refuse(&mut stream, e)),
    };
    let nonce_s = unhex("nonce", &hello.nonce)?;
    if nonce_s.len() != NONCE {
        return Err(refuse(
            &mut stream,
            AuthError::Refused("a nonce of the wrong length".into()),
        ));
    }
    let nonce_t = nonce()?;
    let t = transcript(
        (&hello.source, hello.key_id),
        (me, own_id),
        &nonce_s,
        &nonce_t,
    );
    write_json(
        &mut stream,
        &Challenge {
            error: None,
            target: me.into(),
            key_id: own_id,
            nonce: hex::encode(nonce_t),
            proof: hex::encode(mac(&own, &[b"target", &t]).finalize().into_bytes()),
        },
    )?;
    let proof: Proof = read_json(&mut stream, 4096)?;
    let checked = unhex("proof", &proof.proof).and_then(|p| {
        mac(&k_source, &[b"source", &t])
            .verify_slice(&p)
            .map_err(|_| AuthError::BadProof(hello.source.clone()))
    });
    if let Err(e) = checked {
        let _ = write_json(
            &mut stream,
            &Welcome {
                error: Some("authentication failed".into()),
            },
        );
        return Err(e);
    }
    write_json(&mut stream, &Welcome { error: None })?;
    let key = session_key(&k_source, &own, &t);
    Ok(halves(stream, key, TO_SOURCE, TO_TARGET, hello.source)?)
}

fn tag(key: &HmacSha256, direction: u8, seq: u64, payload: &[u8]) -> HmacSha256 {
    let mut m = key.clone();
    m.update(&[direction]);
    m.update(&seq.to_le_bytes());
    m.update(&(payload.len() as u32).to_le_bytes());
    m.update(payload);
    m
}

/// Writes sealed frames: bytes gather until a frame is full or `flush` seals what there is.
pub struct SealedWriter<W: Write> {
    inner: W,
    key: HmacSha256,
    direction: u8,
    seq: u64,
    buf: Vec<u8>,
    /// Payload bytes sealed so far.
    pub sent: u64,
}

impl<W: Write> SealedWriter<W> {
    pub fn new(inner: W, key: &[u8; 32], direction: u8) -> Self {
        SealedWriter {
            inner,
            key: mac(key, &[]),
            direction,
            seq: 0,
            buf: Vec::with_capacity(FRAME + 4096),
            sent: 0,
        }
    }

    fn seal(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let t = tag(&self.key, self.direction, self.seq, &self.buf)
            .finalize()
            .into_bytes();
        self.inner
            .write_all(&(self.buf.len() as u32).to_le_bytes())?;
        self.inner.write_all(&self.buf)?;
        self.inner.write_all(&t)?;
        self.seq += 1;
        self.sent += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = bytes.len().min(FRAME - self.buf.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() >= FRAME {
            self.seal()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.seal()?;
        self.inner.flush()
    }
}

/// Reads sealed frames; a frame's bytes are given out only after its tag checked.
pub struct SealedReader<R: Read> {
    inner: R,
    key: HmacSha256,
    direction: u8,
    seq: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: Read> SealedReader<R> {
    pub fn new(inner: R, key: &[u8; 32], direction: u8) -> Self {
        SealedReader {
            inner,
            key: mac(key, &[]),
            direction,
            seq: 0,
            buf: Vec::new(),
            pos: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads and checks the next frame; false at the end of the stream between two frames
    /// (the protocol above finds out whether it expected more).
    fn next_frame(&mut self) -> io::Result<bool> {
        let mut len = [0u8; 4];
        let first = loop {
            match self.inner.read(&mut len[..1]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if first == 0 {
            return Ok(false);
        }
        self.inner.read_exact(&mut len[1..])?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a sealed frame of {len} bytes (1 to {MAX_FRAME})"),
            ));
        }
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf)?;
        let mut t = [0u8; TAG];
        self.inner.read_exact(&mut t)?;
        tag(&self.key, self.direction, self.seq, &self.buf)
            .verify_slice(&t)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "frame {} failed its integrity check (changed, replayed or out of order)",
                        self.seq
                    ),
                )
            })?;
        self.seq += 1;
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for SealedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos == self.buf.len() && !self.next_frame()? {
            return Ok(0);
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn keys(pairs: &[(&str, u8)]) -> MigrationKeys {
        let mut k = MigrationKeys::default();
        for (host, byte) in pairs {
            k.insert(host, vec![*byte; 32]);
        }
        k
    }

    /// Runs the handshake between a source with `src` keys and a target with `dst` keys.
    fn handshake(
        src: MigrationKeys,
        dst: MigrationKeys,
    ) -> (Result<Session, AuthError>, Result<Session, AuthError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            accept(s, &dst, "b")
        });
        let source = connect(TcpStream::connect(addr).unwrap(), &src, "a");
        (source, target.join().unwrap())
    }

    #[test]
    fn both_ends_authenticate_and_frames_carry_bytes() {
        let both = keys(&[("a", 1), ("b", 2)]);
        let (s, t) = handshake(both.clone(), both);
        let (mut s, mut t) = (s.unwrap(), t.unwrap());
        assert_eq!((s.peer.as_str(), t.peer.as_str()), ("b", "a"));
        let big: Vec<u8> = (0..(FRAME * 2 + 77)).map(|i| i as u8).collect();
        s.writer.write_all(&big).unwrap();
        s.writer.flush().unwrap();
        let mut got = vec![0u8; big.len()];
        t.reader.read_exact(&mut got).unwrap();
        assert_eq!(got, big);
        t.writer.write_all(b"back").unwrap();
        t.writer.flush().unwrap();
        let mut back = [0u8; 4];
        s.reader.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"back");
    }

    #[test]
    fn a_wrong_key_on_either_side_is_refused() {
        // The target holds another key for "a": the source's proof fails there.
        let (s, t) = handshake(keys(&[("a", 1), ("b", 2)]), keys(&[("a", 9), ("b", 2)]));
        assert!(
            matches!(t, Err(AuthError::BadProof(ref h)) if h == "a"),
            "{t:?}"
        );
        let e = s.expect_err("the source is told");
        assert!(e.to_string().contains("authentication failed"), "{e}");
        // The source holds another key for "b": the target's proof fails at the source.
        let (s, _t) = handshake(keys(&[("a", 1), ("b", 7)]), keys(&[("a", 1), ("b", 2)]));
        assert!(
            matches!(s, Err(AuthError::BadProof(ref h)) if h == "b"),
            "{s:?}"
        );
        // An unknown source is refused before any proof.
        let (s, t) = handshake(keys(&[("a", 1), ("b", 2)]), keys(&[("b", 2)]));
        assert!(
            matches!(t, Err(AuthError::UnknownHost(ref h)) if h == "a"),
            "{t:?}"
        );
        let e = s.expect_err("the source is told");
        assert!(
            e.to_string().contains("not in this host's migration keys"),
            "{e}"
        );
    }

    /// `host`'s keys `(id, byte)`, `current` among them.
    fn rotated(mut k: MigrationKeys, host: &str, current: u32, ids: &[(u32, u8)]) -> MigrationKeys {
        let keys = ids.iter().map(|(id, b)| (*id, vec![*b; 32])).collect();
        k.set_host(host, current, keys).unwrap();
        k
    }

    #[test]
    fn key_ids_follow_a_rotation_and_a_key_rotated_out_is_refused() {
        let base = keys(&[("a", 1), ("b", 2)]);
        // The source rotated to key 2; the target already holds 1 and 2 of it.
        let src = rotated(base.clone(), "a", 2, &[(1, 1), (2, 3)]);
        let dst = rotated(base.clone(), "a", 1, &[(1, 1), (2, 3)]);
        let (s, t) = handshake(src.clone(), dst);
        assert!(s.is_ok() && t.is_ok(), "{s:?} {t:?}");
        // The target has not seen key 2 of the source yet: refused, and the source is told why.
        let dst = rotated(base.clone(), "a", 1, &[(1, 1)]);
        let (s, t) = handshake(src.clone(), dst);
        assert!(
            matches!(t, Err(AuthError::UnknownKeyId(ref h, 2)) if h == "a"),
            "{t:?}"
        );
        assert!(s.unwrap_err().to_string().contains("no key 2"));
        // A key id whose key differs on the two sides (not the same key 2): the proof fails.
        let dst = rotated(base, "a", 1, &[(1, 1), (2, 4)]);
        let (_s, t) = handshake(src.clone(), dst);
        assert!(matches!(t, Err(AuthError::BadProof(_))), "{t:?}");
        // set_host refuses a current key that is not among the keys, or a short key.
        let mut k = MigrationKeys::default();
        assert!(k.set_host("a", 3, vec![(1, vec![1; 32])]).is_err());
        assert!(k.set_host("a", 1, vec![(1, vec![1; 31])]).is_err());
        assert!(k.own("a").is_err());
    }

    #[test]
    fn changed_replayed_and_reflected_frames_fail() {
        let key = [5u8; 32];
        let mut wire = Vec::new();
        let mut w = SealedWriter::new(&mut wire, &key, TO_TARGET);
        w.write_all(b"first").unwrap();
        w.flush().unwrap();
        w.write_all(b"second").unwrap();
        w.flush().unwrap();
        let frame1 = 4 + 5 + TAG;
        // Intact.
        let mut out = Vec::new();
        SealedReader::new(&wire[..], &key, TO_TARGET)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"firstsecond");
        // One bit changed in the payload.
        let mut bad = wire.clone();
        bad[5] ^= 1;
        let mut r = SealedReader::new(&bad[..], &key, TO_TARGET);
        assert!(r.read(&mut [0u8; 16]).is_err());
        // The second frame replayed first, or the first twice (sequence numbers).
        let mut replay = wire[frame1..].to_vec();
        replay.extend_from_slice(&wire[frame1..]);
        assert!(SealedReader::new(&replay[..], &key, TO_TARGET)
            .read(&mut [0u8; 16])
            .is_err());
        // Reflected: read as if it came from the other direction.
        assert!(SealedReader::new(&wire[..], &key, TO_SOURCE)
            .read(&mut [0u8; 16])
            .is_err());
        // Another session's key.
        assert!(SealedReader::new(&wire[..], &[6u8; 32], TO_TARGET)
            .read(&mut [0u8; 16])
            .is_err());
        // An absurd length is refused before anything is allocated.
        let huge = (u32::MAX).to_le_bytes();
        assert!(SealedReader::new(&huge[..], &key, TO_TARGET)
            .read(&mut [0u8; 16])
            .is_err());
    }

    #[test]
    fn keys_and_urls_parse_strictly() {
        let k = MigrationKeys::from_json(&format!(r#"{{"a": "{}"}}"#, "ab".repeat(32))).unwrap();
        assert!(k.key("a", 0).is_ok());
        assert!(matches!(k.key("a", 1), Err(AuthError::UnknownKeyId(_, 1))));
        assert!(format!("{k:?}").contains('a') && !format!("{k:?}").contains("abab"));
        assert!(MigrationKeys::from_json(r#"{"a": "abcd"}"#).is_err());
        assert!(MigrationKeys::from_json(r#"{"a": "zz"}"#).is_err());
        assert_eq!(tcp_target("tcp:10.0.0.2:7000"), Some("10.0.0.2:7000"));
        assert_eq!(tcp_target("tcp://[::1]:7000"), Some("[::1]:7000"));
        for bad in [
            "unix:/x",
            "tcp:host",
            "tcp::7000",
            "tcp:h:99999",
            "10.0.0.2:7000",
        ] {
            assert_eq!(tcp_target(bad), None, "{bad}");
        }
    }
}
