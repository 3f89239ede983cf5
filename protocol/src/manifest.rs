//! The epoch manifest: what an epoch holds, and the proof that nobody altered
//! it.
//!
//! An epoch directory `<root>/<job>/<epoch>/` is committed iff it holds a
//! valid `MANIFEST`; the coordinator writes it last (write-temp, fsync,
//! rename), so the rename is the commit point. A restore runs as root and
//! refuses any manifest whose MAC does not check out with the cluster key,
//! then refuses any image file whose size or BLAKE3 digest differs from the
//! manifest.
//!
//! # On-disk encoding (format 1)
//!
//! Three lines of UTF-8, each ending in `\n`:
//!
//! ```text
//! CKPT-MANIFEST 1
//! {"format":1,"job":"...","epoch":7, ...}
//! mac blake3-keyed 3f1c...(64 hex digits)
//! ```
//!
//! 1. the magic `CKPT-MANIFEST`, one space, the format version in decimal;
//! 2. the [`Manifest`] as JSON on one line (serde_json's compact form never
//!    contains a raw newline: newlines inside strings are escaped);
//! 3. `mac blake3-keyed ` and the lowercase hex of
//!    `blake3::keyed_hash(key, line1 + line2)`, where both lines include
//!    their trailing `\n`.
//!
//! The version sits outside the MAC'd JSON so that a reader can refuse a
//! newer format before it tries to understand anything else; it is inside
//! the MAC'd bytes so that it cannot be changed either. The JSON repeats it
//! (`format`) and the two must agree.
//!
//! # Keys
//!
//! A [`Key`] is 32 random bytes stored as 64 hex digits (and an optional
//! newline) in a file of mode 0600 or stricter. Users who cannot read the key
//! can still look at a manifest with [`Manifest::decode_unverified`].

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

/// The manifest format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// First word of a manifest file.
pub const MAGIC: &str = "CKPT-MANIFEST";
/// Name of the manifest inside an epoch directory.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// Name of the manifest while it is being written (never trusted).
pub const MANIFEST_TMP_FILE: &str = "MANIFEST.tmp";

const MAC_PREFIX: &str = "mac blake3-keyed ";

/// A cluster or node key: 32 secret bytes used for the manifest MAC.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Why a key file could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "key file {path} has mode {mode:04o}: it must be readable by its owner only \
         (chmod 600 {path})"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a key: {reason} (expected 64 hex digits)")]
    Format { path: PathBuf, reason: String },
    #[error("cannot create key file {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot get random bytes for key file {path}: {source}")]
    Random {
        path: PathBuf,
        source: getrandom::Error,
    },
}

impl Key {
    /// A key from raw bytes (tests, or keys handed over the wire).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Key(bytes)
    }

    /// Reads a key file: 64 hex digits, optionally followed by one newline,
    /// in a regular file of mode 0600 or stricter.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        if !meta.is_file() {
            return Err(KeyError::Format {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read(path).map_err(read_err)?;
        let hex = text.strip_suffix(b"\n").unwrap_or(&text);
        let bytes = decode_hex32(hex).map_err(|reason| KeyError::Format {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Key(bytes))
    }

    /// Creates a new random key file of mode 0600. Refuses to overwrite an
    /// existing file.
    pub fn generate(path: &Path) -> Result<Key, KeyError> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|source| KeyError::Random {
            path: path.to_path_buf(),
            source,
        })?;
        let create_err = |source| KeyError::Create {
            path: path.to_path_buf(),
            source,
        };
        // Written in full under a private name, then hard-linked into
        // place: another process that finds `path` (and loads it) never
        // sees a half-written key, and link(2) never replaces a key that
        // somebody else created first.
        let mut tmp_name = path.as_os_str().to_owned();
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tmp_name.push(format!(".tmp.{}.{seq}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The umask can only make the mode stricter, but an inherited
            // ACL default could widen it; set it explicitly.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            let mut text = encode_hex(&bytes);
            text.push('\n');
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::hard_link(&tmp, path)
        })();
        let _ = fs::remove_file(&tmp);
        written.map_err(create_err)?;
        Ok(Key(bytes))
    }

    /// Loads the key at `path`, creating it first if there is none.
    pub fn load_or_generate(path: &Path) -> Result<Key, KeyError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Key::load(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match Key::generate(path) {
                // Another process created it between our look and our create.
                Err(KeyError::Create { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    Key::load(path)
                }
                other => other,
            },
            Err(source) => Err(KeyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// An independent subkey of this key for another purpose (BLAKE3 in
    /// key-derivation mode with `context`): a MAC made with it never
    /// verifies as a manifest MAC or under another context, and the key
    /// bytes themselves stay inside this crate.
    pub(crate) fn derive_subkey(&self, context: &'static str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }

    fn mac(&self, data: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.0, data)
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn decode_hex32(hex: &[u8]) -> Result<[u8; 32], String> {
    if hex.len() != 64 {
        return Err(format!("{} characters", hex.len()));
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("non-hex character {:?}", char::from(c))),
    };
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Ok(out)
}

/// Whether the job keeps running after the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMode {
    Continue,
    Stop,
}

/// How long each phase of the epoch took, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    #[serde(deserialize_with = "ms")]
    pub freeze_ms: f64,
    #[serde(deserialize_with = "ms")]
    pub dump_ms: f64,
    #[serde(deserialize_with = "ms")]
    pub capture_ms: f64,
    #[serde(deserialize_with = "ms")]
    pub commit_ms: f64,
    #[serde(deserialize_with = "ms")]
    pub downtime_ms: f64,
    #[serde(deserialize_with = "ms")]
    pub total_ms: f64,
}

/// serde_json writes a non-finite float as `null`; timings are informational,
/// so read that back as NaN instead of refusing the whole manifest.
fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One committed epoch of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub job: String,
    pub epoch: u64,
    pub created_unix: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// `criu --version` of the CRIU that wrote the images.
    pub criu_version: String,
    pub command: Vec<String>,
    pub cwd: String,
    pub mode: CheckpointMode,
    pub nodes: Vec<NodeImage>,
    pub timings: Timings,
}

/// Everything one node contributed to the epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeImage {
    pub node: String,
    pub ranks: Vec<u32>,
    pub trees: Vec<TreeImage>,
    /// Every file of this node in the epoch directory.
    pub files: Vec<FileDigest>,
    /// The MPI ranks this node drained before the freeze (the drain
    /// shim's READY counts); absent in manifests without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drained: Vec<RankDrain>,
}

/// One MPI rank's counts at the drained cut (its READY line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankDrain {
    /// World rank.
    pub rank: u32,
    /// Point-to-point messages it sent since MPI_Init.
    pub sent: u64,
    /// Messages it received (the stashed ones included).
    pub received: u64,
    /// Messages received by the shim during the drain, held for the
    /// application's later receives.
    pub stashed: u64,
    /// Count-exchange rounds the drain took.
    pub rounds: u64,
}

/// One CRIU-dumped process tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeImage {
    pub id: u32,
    pub root_pid: i32,
    pub net: NetMode,
    pub stdio: Vec<PipeBinding>,
    /// Files the tree writes to, with their size at dump time.
    pub writable_files: Vec<FileSize>,
    /// Absolute node-local paths restored from `local_pack`.
    pub captured: Vec<String>,
    /// File name (in the epoch dir) of the packed small CRIU images.
    pub meta_pack: String,
    /// File names (in the epoch dir) of CRIU's page images, kept as they are.
    pub pages: Vec<String>,
    /// File name (in the epoch dir) of the captured node-local files.
    pub local_pack: Option<String>,
    /// Node-local directory of the tree's init (its working directory and
    /// the home of its binary), recreated before a restore.
    #[serde(default)]
    pub init_dir: Option<String>,
    /// File name (in the epoch dir) of the tree's `ckpt-init` binary: CRIU
    /// needs the very file the image maps, whatever ckpt is installed now.
    #[serde(default)]
    pub init_binary: Option<String>,
}

/// The network namespace a tree ran in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum NetMode {
    Host,
    /// Own namespace, dumped as external with this CRIU key.
    Private {
        key: String,
    },
    /// Own namespace with a job-stable address (`address`, IPv4, of the
    /// job network), dumped as external with this CRIU key. Restored into
    /// a namespace with the same address, wherever the tree goes.
    Job {
        key: String,
        address: String,
    },
}

/// A pipe on one of the tree's stdio fds, dumped as external.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeBinding {
    pub fd: i32,
    pub inode: u64,
}

/// A file and its size at dump time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSize {
    pub path: String,
    pub size: u64,
}

/// Size and digest of one file in the epoch directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// A plain name inside the epoch directory (no `/`).
    pub name: String,
    pub size: u64,
    /// Lowercase hex of the BLAKE3 hash of the whole file.
    pub blake3: String,
}

/// Why bytes could not be read as a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a ckpt manifest: {0}")]
    NotAManifest(String),
    #[error(
        "manifest format {found} is newer than this ckpt understands (up to {supported}): \
         upgrade ckpt to read it"
    )]
    TooNew { found: u32, supported: u32 },
    #[error("manifest format {found} is not supported (this ckpt reads format {supported})")]
    Unsupported { found: u32, supported: u32 },
    #[error("manifest is truncated or malformed: {0}")]
    Malformed(String),
    #[error("manifest MAC does not match: the manifest was altered or written with another key")]
    MacMismatch,
    #[error("manifest JSON is malformed at line {line}, column {column}: {source}")]
    Json {
        line: usize,
        column: usize,
        source: serde_json::Error,
    },
}

/// Why a manifest is refused even though it decodes.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("manifest {field} {name:?} is not a plain file name: {reason}")]
    UnsafeName {
        field: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("manifest {field} {path:?} is not a clean absolute path: {reason}")]
    UnsafePath {
        field: &'static str,
        path: String,
        reason: &'static str,
    },
    #[error("manifest of node {node:?} gives tree {tree} job address {address:?}, which is not an IPv4 address")]
    BadAddress {
        node: String,
        tree: u32,
        address: String,
    },
    #[error("manifest lists file {name:?} more than once")]
    DuplicateFile { name: String },
    #[error("manifest of node {node:?} names {name:?} for tree {tree} but has no digest for it")]
    Undigested {
        node: String,
        tree: u32,
        name: String,
    },
    #[error("manifest body says format {body} but its header says {header}")]
    FormatMismatch { body: u32, header: u32 },
    #[error("manifest format {found} is not the one this ckpt writes ({FORMAT_VERSION})")]
    WrongFormat { found: u32 },
}

impl Manifest {
    /// The three-line encoding described in the module documentation.
    pub fn encode(&self, key: &Key) -> Vec<u8> {
        let mut out = format!("{MAGIC} {}\n", self.format).into_bytes();
        // Serializing these plain structs (strings, numbers, vectors, no maps)
        // cannot fail: serde_json only errors on non-string map keys or on a
        // failing writer, and a Vec does not fail.
        #[allow(clippy::expect_used)]
        let body = serde_json::to_vec(self).expect("manifest types always serialize");
        out.extend_from_slice(&body);
        out.push(b'\n');
        let mac = key.mac(&out);
        out.extend_from_slice(MAC_PREFIX.as_bytes());
        out.extend_from_slice(mac.to_hex().as_bytes());
        out.push(b'\n');
        out
    }

    /// Decodes and authenticates a manifest. Checks, in order: magic, format
    /// version, MAC (constant time), JSON.
    pub fn decode(bytes: &[u8], key: &Key) -> Result<Manifest, ManifestError> {
        let parts = split(bytes)?;
        let expected = key.mac(parts.signed);
        // blake3::Hash's PartialEq is constant time.
        if expected != parts.mac {
            return Err(ManifestError::MacMismatch);
        }
        parse_body(&parts)
    }

    /// Decodes a manifest without checking its MAC: only for showing it to a
    /// user (`inspect`), never for restoring from it.
    pub fn decode_unverified(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        parse_body(&split(bytes)?)
    }

    /// Refuses names that could make a root restore touch anything outside
    /// the epoch directory, and file references without a digest.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.format != FORMAT_VERSION {
            return Err(ValidationError::WrongFormat { found: self.format });
        }
        let mut seen = std::collections::HashSet::new();
        for node in &self.nodes {
            check_name("node name", &node.node)?;
            for f in &node.files {
                check_name("file name", &f.name)?;
                if !seen.insert(f.name.as_str()) {
                    return Err(ValidationError::DuplicateFile {
                        name: f.name.clone(),
                    });
                }
            }
            for tree in &node.trees {
                let referenced = std::iter::once(&tree.meta_pack)
                    .chain(tree.pages.iter())
                    .chain(tree.local_pack.iter())
                    .chain(tree.init_binary.iter());
                for name in referenced {
                    check_name("pack name", name)?;
                    if !node.files.iter().any(|f| &f.name == name) {
                        return Err(ValidationError::Undigested {
                            node: node.node.clone(),
                            tree: tree.id,
                            name: name.clone(),
                        });
                    }
                }
                for p in &tree.captured {
                    check_abs_path("captured path", p)?;
                }
                if let Some(d) = &tree.init_dir {
                    check_abs_path("init dir", d)?;
                }
                for w in &tree.writable_files {
                    check_abs_path("writable file", &w.path)?;
                }
                if let NetMode::Job { address, .. } = &tree.net {
                    if address.parse::<std::net::Ipv4Addr>().is_err() {
                        return Err(ValidationError::BadAddress {
                            node: node.node.clone(),
                            tree: tree.id,
                            address: address.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Every file name the manifest lists, with its node.
    pub fn files(&self) -> impl Iterator<Item = (&str, &FileDigest)> {
        self.nodes
            .iter()
            .flat_map(|n| n.files.iter().map(move |f| (n.node.as_str(), f)))
    }
}

/// `name` is a single, harmless path component.
pub fn check_name(field: &'static str, name: &str) -> Result<(), ValidationError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains("..") {
        Some("contains '..'")
    } else if name.contains('\0') {
        Some("contains NUL")
    } else if name == "." {
        Some("is '.'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ValidationError::UnsafeName {
            field,
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_abs_path(field: &'static str, path: &str) -> Result<(), ValidationError> {
    let reason = if !path.starts_with('/') {
        Some("not absolute")
    } else if path.contains('\0') {
        Some("contains NUL")
    } else if path.split('/').any(|c| c == ".." || c == ".") {
        Some("has a '.' or '..' component")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ValidationError::UnsafePath {
            field,
            path: path.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

struct Parts<'a> {
    header_format: u32,
    /// Lines 1 and 2 with their newlines: what the MAC covers.
    signed: &'a [u8],
    body: &'a [u8],
    mac: blake3::Hash,
}

fn split(bytes: &[u8]) -> Result<Parts<'_>, ManifestError> {
    let Some(nl1) = bytes.iter().position(|&b| b == b'\n') else {
        return Err(if bytes.starts_with(MAGIC.as_bytes()) {
            ManifestError::Malformed("it ends after the header".into())
        } else {
            ManifestError::NotAManifest("no header line".into())
        });
    };
    let header = std::str::from_utf8(&bytes[..nl1])
        .map_err(|_| ManifestError::NotAManifest("header is not text".into()))?;
    let version = header
        .strip_prefix(MAGIC)
        .and_then(|rest| rest.strip_prefix(' '))
        .ok_or_else(|| {
            ManifestError::NotAManifest(format!("header does not start with {MAGIC:?}"))
        })?;
    let found: u32 = version.parse().map_err(|_| {
        ManifestError::NotAManifest(format!("bad format version {version:?} in header"))
    })?;
    if found > FORMAT_VERSION {
        return Err(ManifestError::TooNew {
            found,
            supported: FORMAT_VERSION,
        });
    }
    if found != FORMAT_VERSION {
        return Err(ManifestError::Unsupported {
            found,
            supported: FORMAT_VERSION,
        });
    }
    let rest = &bytes[nl1 + 1..];
    let Some(nl2) = rest.iter().position(|&b| b == b'\n') else {
        return Err(ManifestError::Malformed(
            "the body line is incomplete".into(),
        ));
    };
    let body = &rest[..nl2];
    let signed = &bytes[..nl1 + 1 + nl2 + 1];
    let mac_line = &bytes[signed.len()..];
    let mac_line = mac_line.strip_suffix(b"\n").unwrap_or(mac_line);
    let mac_hex = mac_line
        .strip_prefix(MAC_PREFIX.as_bytes())
        .ok_or_else(|| ManifestError::Malformed("the MAC line is missing".into()))?;
    let mac = std::str::from_utf8(mac_hex)
        .ok()
        .and_then(|h| blake3::Hash::from_hex(h).ok())
        .ok_or_else(|| {
            ManifestError::Malformed("the MAC line does not hold 64 hex digits".into())
        })?;
    Ok(Parts {
        header_format: found,
        signed,
        body,
        mac,
    })
}

fn parse_body(parts: &Parts<'_>) -> Result<Manifest, ManifestError> {
    let m: Manifest = serde_json::from_slice(parts.body).map_err(|e| ManifestError::Json {
        // The body is line 2 of the file.
        line: e.line() + 1,
        column: e.column(),
        source: e,
    })?;
    if m.format != parts.header_format {
        return Err(ManifestError::Malformed(
            ValidationError::FormatMismatch {
                body: m.format,
                header: parts.header_format,
            }
            .to_string(),
        ));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_bytes([b; 32])
    }

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            job: "job-1".into(),
            epoch: 7,
            created_unix: 1_700_000_000,
            owner_uid: 1000,
            owner_gid: 1000,
            criu_version: "4.1.1".into(),
            command: vec!["mpirun".into(), "-n".into(), "4".into(), "./ring".into()],
            cwd: "/home/u/run\nwith newline".into(),
            mode: CheckpointMode::Continue,
            nodes: vec![NodeImage {
                node: "n1".into(),
                ranks: vec![0, 1],
                drained: vec![RankDrain {
                    rank: 1,
                    sent: 9,
                    received: 8,
                    stashed: 1,
                    rounds: 2,
                }],
                trees: vec![TreeImage {
                    id: 0,
                    root_pid: 1234,
                    net: NetMode::Private { key: "net0".into() },
                    stdio: vec![PipeBinding { fd: 1, inode: 99 }],
                    writable_files: vec![FileSize {
                        path: "/home/u/run/out.txt".into(),
                        size: 42,
                    }],
                    captured: vec!["/dev/shm/vader_segment.n1.0".into()],
                    meta_pack: "n1.t0.meta.pack".into(),
                    pages: vec!["n1.t0.pages-1.img".into()],
                    local_pack: Some("n1.t0.local.pack".into()),
                    init_dir: None,
                    init_binary: None,
                }],
                files: ["n1.t0.meta.pack", "n1.t0.pages-1.img", "n1.t0.local.pack"]
                    .iter()
                    .map(|n| FileDigest {
                        name: (*n).into(),
                        size: 10,
                        blake3: blake3::hash(n.as_bytes()).to_hex().to_string(),
                    })
                    .collect(),
            }],
            timings: Timings {
                freeze_ms: 1.5,
                dump_ms: 200.0,
                capture_ms: f64::NAN,
                ..Timings::default()
            },
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.encode(&key(1));
        let text = std::str::from_utf8(&bytes).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.starts_with("CKPT-MANIFEST 1\n{"));
        assert!(text
            .lines()
            .nth(2)
            .unwrap()
            .starts_with("mac blake3-keyed "));
        let back = Manifest::decode(&bytes, &key(1)).unwrap();
        assert!(back.timings.capture_ms.is_nan());
        let mut back = back;
        back.timings.capture_ms = 0.0;
        let mut want = m;
        want.timings.capture_ms = 0.0;
        assert_eq!(back, want);
        assert_eq!(Manifest::decode_unverified(&bytes).unwrap().epoch, 7);
        want.validate().unwrap();
    }

    #[test]
    fn flipped_byte_in_body_is_a_mac_error() {
        let bytes = sample().encode(&key(1));
        let pos = bytes.iter().position(|&b| b == b'7').unwrap();
        let mut bad = bytes.clone();
        bad[pos] = b'8';
        let err = Manifest::decode(&bad, &key(1)).unwrap_err();
        assert!(matches!(err, ManifestError::MacMismatch), "{err}");
        assert!(err
            .to_string()
            .contains("altered or written with another key"));
        // Unverified decoding happily reads the forged epoch: that is the point
        // of the MAC.
        assert_eq!(Manifest::decode_unverified(&bad).unwrap().epoch, 8);
    }

    #[test]
    fn wrong_key_is_a_mac_error() {
        let bytes = sample().encode(&key(1));
        let err = Manifest::decode(&bytes, &key(2)).unwrap_err();
        assert!(matches!(err, ManifestError::MacMismatch), "{err}");
    }

    #[test]
    fn truncated_or_foreign_input() {
        let bytes = sample().encode(&key(1));
        for cut in [0, 5, 16, 40, bytes.len() - 70, bytes.len() - 10] {
            let err = Manifest::decode(&bytes[..cut], &key(1)).unwrap_err();
            assert!(
                matches!(
                    err,
                    ManifestError::NotAManifest(_) | ManifestError::Malformed(_)
                ),
                "cut at {cut}: {err}"
            );
        }
        let err = Manifest::decode(b"hello\nworld\n", &key(1)).unwrap_err();
        assert!(matches!(err, ManifestError::NotAManifest(_)), "{err}");
        // A trailing newline on the MAC line is optional, anything else is not.
        Manifest::decode(&bytes[..bytes.len() - 1], &key(1)).unwrap();
        let mut extra = bytes.clone();
        extra.extend_from_slice(b"more\n");
        assert!(Manifest::decode(&extra, &key(1)).is_err());
    }

    #[test]
    fn malformed_json_reports_position() {
        let k = key(1);
        let mut signed = b"CKPT-MANIFEST 1\n{\"format\":1,\"job\":}\n".to_vec();
        let mac = k.mac(&signed);
        signed.extend_from_slice(format!("{MAC_PREFIX}{}\n", mac.to_hex()).as_bytes());
        let err = Manifest::decode(&signed, &k).unwrap_err();
        match &err {
            ManifestError::Json { line, column, .. } => {
                assert_eq!(*line, 2);
                assert!(*column > 10);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn future_version_is_refused_as_newer() {
        let mut m = sample();
        m.format = FORMAT_VERSION + 1;
        let bytes = m.encode(&key(1));
        let err = Manifest::decode(&bytes, &key(1)).unwrap_err();
        assert!(
            matches!(err, ManifestError::TooNew { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("newer"), "{err}");
        let err = Manifest::decode_unverified(&bytes).unwrap_err();
        assert!(matches!(err, ManifestError::TooNew { .. }));
        m.format = 0;
        let err = Manifest::decode(&m.encode(&key(1)), &key(1)).unwrap_err();
        assert!(matches!(err, ManifestError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn header_and_body_format_must_agree() {
        let k = key(1);
        let m = sample();
        let body = serde_json::to_string(&m)
            .unwrap()
            .replace("\"format\":1", "\"format\":0");
        let mut signed = format!("CKPT-MANIFEST 1\n{body}\n").into_bytes();
        let mac = k.mac(&signed);
        signed.extend_from_slice(format!("{MAC_PREFIX}{}\n", mac.to_hex()).as_bytes());
        assert!(matches!(
            Manifest::decode(&signed, &k),
            Err(ManifestError::Malformed(_))
        ));
    }

    #[test]
    fn path_traversal_names_are_refused() {
        for bad in ["../etc/passwd", "a/b", "..", ".", "", "x\0y", "n1..pack"] {
            let mut m = sample();
            m.nodes[0].files[0].name = bad.into();
            m.nodes[0].trees[0].meta_pack = bad.into();
            let err = m.validate().unwrap_err();
            assert!(
                matches!(err, ValidationError::UnsafeName { .. }),
                "{bad:?}: {err}"
            );
        }
        let mut m = sample();
        m.nodes[0].trees[0].pages[0] = "../../x".into();
        assert!(matches!(
            m.validate(),
            Err(ValidationError::UnsafeName {
                field: "pack name",
                ..
            })
        ));
        let mut m = sample();
        m.nodes[0].trees[0].local_pack = Some("/etc/shadow".into());
        assert!(m.validate().is_err());
        let mut m = sample();
        m.nodes[0].node = "../n1".into();
        assert!(m.validate().is_err());
        let mut m = sample();
        m.nodes[0].trees[0].captured = vec!["/dev/shm/../../etc/shadow".into()];
        assert!(matches!(
            m.validate(),
            Err(ValidationError::UnsafePath { .. })
        ));
        let mut m = sample();
        m.nodes[0].trees[0].captured = vec!["relative/path".into()];
        assert!(m.validate().is_err());
    }

    #[test]
    fn pack_without_digest_and_duplicates_are_refused() {
        let mut m = sample();
        m.nodes[0].files.retain(|f| f.name != "n1.t0.pages-1.img");
        assert!(matches!(
            m.validate(),
            Err(ValidationError::Undigested { .. })
        ));
        let mut m = sample();
        let dup = m.nodes[0].files[0].clone();
        m.nodes[0].files.push(dup);
        assert!(matches!(
            m.validate(),
            Err(ValidationError::DuplicateFile { .. })
        ));
    }

    #[test]
    fn concurrent_key_generation_yields_one_complete_key() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("cluster.key");
            let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| Key::load_or_generate(&path).map(|k| k.0)))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
            });
            assert!(keys.iter().all(|k| *k == keys[0]));
            assert_eq!(Key::load(&path).unwrap().0, keys[0]);
            let names: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names.len(), 1, "temporary files left: {names:?}");
        }
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let k = Key::load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert_eq!(Key::load(&path).unwrap().0, k.0);
        assert_eq!(Key::load_or_generate(&path).unwrap().0, k.0);
        assert!(matches!(Key::generate(&path), Err(KeyError::Create { .. })));
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");

        // Stricter is fine, looser is refused with the path named.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        Key::load(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = Key::load(&path).unwrap_err();
        assert!(matches!(err, KeyError::Permissions { mode: 0o640, .. }));
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");

        // No newline is fine; wrong length or non-hex is not.
        let other = dir.path().join("k2");
        let write = |content: &str| {
            let _ = fs::remove_file(&other);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&other)
                .unwrap()
                .write_all(content.as_bytes())
                .unwrap();
        };
        write(&"ab".repeat(32));
        assert_eq!(Key::load(&other).unwrap().0, [0xab; 32]);
        write(&"ab".repeat(31));
        assert!(matches!(Key::load(&other), Err(KeyError::Format { .. })));
        write(&format!("{}zz\n", "ab".repeat(31)));
        assert!(matches!(Key::load(&other), Err(KeyError::Format { .. })));
        write(&format!("{}\n\n", "ab".repeat(32)));
        assert!(matches!(Key::load(&other), Err(KeyError::Format { .. })));
    }
}
