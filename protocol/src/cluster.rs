//! The coordinator ⇄ agent protocol (`proto/cluster.proto`): the generated
//! messages, the versions this build speaks, and the conversions between
//! the wire's node image and the manifest's.
//!
//! Handshake: [`crate::auth`]. Framing: [`crate::async_framing`].

use std::fmt;
use std::time::Duration;

use crate::manifest::{self, ValidationError};

/// Messages of `ckpt.cluster.v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/ckpt.cluster.v1.rs"));
}

/// Oldest cluster protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u32 = 1;
/// Newest cluster protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u32 = 1;

/// Cap on one frame once a connection is authenticated. The largest message
/// is `Dumped`, a few hundred bytes per file of the node's image.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Heartbeat interval the coordinator proposes unless configured otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    pub min: u32,
    pub max: u32,
}

impl VersionRange {
    /// What this build speaks.
    pub const SUPPORTED: VersionRange = VersionRange {
        min: PROTOCOL_VERSION_MIN,
        max: PROTOCOL_VERSION_MAX,
    };

    /// The highest version in both ranges, if any.
    pub fn negotiate(self, other: VersionRange) -> Option<u32> {
        let hi = self.max.min(other.max);
        let lo = self.min.max(other.min);
        (lo <= hi && lo >= 1).then_some(hi)
    }

    pub fn contains(self, v: u32) -> bool {
        self.min <= v && v <= self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {}..={}", self.min, self.max)
        }
    }
}

impl pb::Frame {
    /// The message's name, for logs and errors ("none" for an empty frame).
    pub fn kind(&self) -> &'static str {
        use pb::frame::Body;
        match &self.body {
            None => "none",
            Some(b) => match b {
                Body::Hello(_) => "Hello",
                Body::Challenge(_) => "Challenge",
                Body::Proof(_) => "Proof",
                Body::Welcome(_) => "Welcome",
                Body::Reject(_) => "Reject",
                Body::Heartbeat(_) => "Heartbeat",
                Body::Prepare(_) => "Prepare",
                Body::Ready(_) => "Ready",
                Body::Fail(_) => "Fail",
                Body::Dump(_) => "Dump",
                Body::Dumped(_) => "Dumped",
                Body::Commit(_) => "Commit",
                Body::Resumed(_) => "Resumed",
                Body::Stopped(_) => "Stopped",
                Body::Flushed(_) => "Flushed",
                Body::EpochCommitted(_) => "EpochCommitted",
                Body::Abort(_) => "Abort",
                Body::Aborted(_) => "Aborted",
                Body::RestoreTree(_) => "RestoreTree",
                Body::Restored(_) => "Restored",
                Body::Resume(_) => "Resume",
                Body::AddressRequest(_) => "AddressRequest",
                Body::AddressGrant(_) => "AddressGrant",
                Body::TreeStarted(_) => "TreeStarted",
                Body::TreeExited(_) => "TreeExited",
                Body::TreeList(_) => "TreeList",
                Body::RemoteSpawn(_) => "RemoteSpawn",
                Body::RemoteSpawned(_) => "RemoteSpawned",
            },
        }
    }

    /// `(job, epoch)` of an epoch or restart message; `None` for handshake
    /// and heartbeat frames.
    pub fn job_epoch(&self) -> Option<(&str, u64)> {
        use pb::frame::Body;
        let (job, epoch) = match self.body.as_ref()? {
            Body::Prepare(m) => (&m.job, m.epoch),
            Body::Ready(m) => (&m.job, m.epoch),
            Body::Fail(m) => (&m.job, m.epoch),
            Body::Dump(m) => (&m.job, m.epoch),
            Body::Dumped(m) => (&m.job, m.epoch),
            Body::Commit(m) => (&m.job, m.epoch),
            Body::Resumed(m) => (&m.job, m.epoch),
            Body::Stopped(m) => (&m.job, m.epoch),
            Body::Flushed(m) => (&m.job, m.epoch),
            Body::EpochCommitted(m) => (&m.job, m.epoch),
            Body::Abort(m) => (&m.job, m.epoch),
            Body::Aborted(m) => (&m.job, m.epoch),
            Body::RestoreTree(m) => (&m.job, m.epoch),
            Body::Restored(m) => (&m.job, m.epoch),
            Body::Resume(m) => (&m.job, m.epoch),
            Body::Hello(_)
            | Body::Challenge(_)
            | Body::Proof(_)
            | Body::Welcome(_)
            | Body::Reject(_)
            | Body::Heartbeat(_)
            | Body::AddressRequest(_)
            | Body::AddressGrant(_)
            | Body::TreeStarted(_)
            | Body::TreeExited(_)
            | Body::TreeList(_)
            | Body::RemoteSpawn(_)
            | Body::RemoteSpawned(_) => return None,
        };
        Some((job.as_str(), epoch))
    }
}

macro_rules! into_frame {
    ($($ty:ident => $variant:ident),* $(,)?) => {$(
        impl From<pb::$ty> for pb::Frame {
            fn from(m: pb::$ty) -> pb::Frame {
                pb::Frame { body: Some(pb::frame::Body::$variant(m)) }
            }
        }
    )*};
}

into_frame! {
    Hello => Hello, Challenge => Challenge, Proof => Proof, Welcome => Welcome,
    Reject => Reject, Heartbeat => Heartbeat, Prepare => Prepare, Ready => Ready,
    Fail => Fail, Dump => Dump, Dumped => Dumped, Commit => Commit,
    Resumed => Resumed, Stopped => Stopped, Flushed => Flushed,
    EpochCommitted => EpochCommitted, Abort => Abort, Aborted => Aborted,
    RestoreTree => RestoreTree, Restored => Restored, Resume => Resume,
}

into_frame! {
    TreeStarted => TreeStarted, TreeExited => TreeExited, TreeList => TreeList,
}

into_frame! {
    RemoteSpawn => RemoteSpawn, RemoteSpawned => RemoteSpawned,
}

into_frame! {
    AddressRequest => AddressRequest, AddressGrant => AddressGrant,
}

impl From<manifest::CheckpointMode> for pb::CheckpointMode {
    fn from(m: manifest::CheckpointMode) -> Self {
        match m {
            manifest::CheckpointMode::Continue => pb::CheckpointMode::Continue,
            manifest::CheckpointMode::Stop => pb::CheckpointMode::Stop,
        }
    }
}

/// Why a message from a peer cannot be used although it decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{what} from {peer:?} has no {field}")]
    Missing {
        peer: String,
        what: &'static str,
        field: &'static str,
    },
    #[error("node image from {peer:?} is for node {claimed:?}: a node reports only its own image")]
    WrongNode { peer: String, claimed: String },
    #[error("node image from {peer:?}: digest of {file:?} is {len} bytes, not 32")]
    BadDigest {
        peer: String,
        file: String,
        len: usize,
    },
    #[error("node image from {peer:?}: {source}")]
    Invalid {
        peer: String,
        source: ValidationError,
    },
    #[error("{what} from {peer:?} has an unknown {field} value {value}")]
    UnknownEnum {
        peer: String,
        what: &'static str,
        field: &'static str,
        value: i32,
    },
    #[error("manifest digest of {file:?} is not 64 hex digits")]
    BadManifestDigest { file: String },
    #[error("DUMPED from {peer:?} carries {files} file digests: digests travel in FLUSHED")]
    EarlyDigests { peer: String, files: usize },
}

/// The wire form of file digests, for `Flushed.files`.
pub fn digests_to_wire(files: &[manifest::FileDigest]) -> Result<Vec<pb::FileDigest>, WireError> {
    files
        .iter()
        .map(|f| {
            let digest =
                blake3::Hash::from_hex(&f.blake3).map_err(|_| WireError::BadManifestDigest {
                    file: f.name.clone(),
                })?;
            Ok(pb::FileDigest {
                name: f.name.clone(),
                size: f.size,
                blake3: digest.as_bytes().to_vec(),
            })
        })
        .collect()
}

/// The wire form of this node's image (`Dumped` sends it with no files).
pub fn node_image_to_wire(img: &manifest::NodeImage) -> Result<pb::NodeImage, WireError> {
    let files = digests_to_wire(&img.files)?;
    let trees = img
        .trees
        .iter()
        .map(|t| pb::TreeImage {
            id: t.id,
            root_pid: t.root_pid,
            net_key: match &t.net {
                manifest::NetMode::Host => String::new(),
                manifest::NetMode::Private { key } | manifest::NetMode::Job { key, .. } => {
                    key.clone()
                }
            },
            address: match &t.net {
                manifest::NetMode::Job { address, .. } => address.clone(),
                _ => String::new(),
            },
            stdio: t
                .stdio
                .iter()
                .map(|p| pb::PipeBinding {
                    fd: p.fd,
                    inode: p.inode,
                })
                .collect(),
            writable_files: t
                .writable_files
                .iter()
                .map(|w| pb::FileSize {
                    path: w.path.clone(),
                    size: w.size,
                })
                .collect(),
            captured: t.captured.clone(),
            meta_pack: t.meta_pack.clone(),
            pages: t.pages.clone(),
            local_pack: t.local_pack.clone(),
            init_dir: t.init_dir.clone(),
            init_binary: t.init_binary.clone(),
        })
        .collect();
    Ok(pb::NodeImage {
        node: img.node.clone(),
        ranks: img.ranks.clone(),
        trees,
        files,
        drained: img
            .drained
            .iter()
            .map(|r| pb::RankDrain {
                rank: r.rank,
                sent: r.sent,
                received: r.received,
                stashed: r.stashed,
                rounds: r.rounds,
            })
            .collect(),
    })
}

/// File digests from the authenticated node `peer`, each 32 bytes.
fn digests_from_wire(
    files: Vec<pb::FileDigest>,
    peer: &str,
) -> Result<Vec<manifest::FileDigest>, WireError> {
    files
        .into_iter()
        .map(|f| {
            let digest: [u8; 32] =
                f.blake3
                    .as_slice()
                    .try_into()
                    .map_err(|_| WireError::BadDigest {
                        peer: peer.to_owned(),
                        file: f.name.clone(),
                        len: f.blake3.len(),
                    })?;
            Ok(manifest::FileDigest {
                name: f.name,
                size: f.size,
                blake3: blake3::Hash::from_bytes(digest).to_hex().to_string(),
            })
        })
        .collect()
}

/// The manifest form of a wire image, refused unless it is `peer`'s own;
/// not validated yet.
fn convert_node_image(img: pb::NodeImage, peer: &str) -> Result<manifest::NodeImage, WireError> {
    if img.node != peer {
        return Err(WireError::WrongNode {
            peer: peer.to_owned(),
            claimed: img.node,
        });
    }
    let files = digests_from_wire(img.files, peer)?;
    let trees = img
        .trees
        .into_iter()
        .map(|t| manifest::TreeImage {
            id: t.id,
            root_pid: t.root_pid,
            net: if t.net_key.is_empty() {
                manifest::NetMode::Host
            } else if t.address.is_empty() {
                manifest::NetMode::Private { key: t.net_key }
            } else {
                manifest::NetMode::Job {
                    key: t.net_key,
                    address: t.address,
                }
            },
            stdio: t
                .stdio
                .into_iter()
                .map(|p| manifest::PipeBinding {
                    fd: p.fd,
                    inode: p.inode,
                })
                .collect(),
            writable_files: t
                .writable_files
                .into_iter()
                .map(|w| manifest::FileSize {
                    path: w.path,
                    size: w.size,
                })
                .collect(),
            captured: t.captured,
            meta_pack: t.meta_pack,
            pages: t.pages,
            local_pack: t.local_pack,
            init_dir: t.init_dir,
            init_binary: t.init_binary,
        })
        .collect();
    let node = manifest::NodeImage {
        node: img.node,
        ranks: img.ranks,
        trees,
        files,
        drained: img
            .drained
            .into_iter()
            .map(|r| manifest::RankDrain {
                rank: r.rank,
                sent: r.sent,
                received: r.received,
                stashed: r.stashed,
                rounds: r.rounds,
            })
            .collect(),
    };
    Ok(node)
}

/// Checks one node's image as the manifest would: plain file names, clean
/// absolute paths, a digest for every referenced file, no file twice.
pub fn check_node_image(node: manifest::NodeImage) -> Result<manifest::NodeImage, ValidationError> {
    // The manifest's own checks, on a manifest holding just this node.
    let probe = manifest::Manifest {
        format: manifest::FORMAT_VERSION,
        job: String::new(),
        epoch: 0,
        created_unix: 0,
        owner_uid: 0,
        owner_gid: 0,
        criu_version: String::new(),
        command: Vec::new(),
        cwd: String::new(),
        mode: manifest::CheckpointMode::Continue,
        nodes: vec![node],
        timings: manifest::Timings::default(),
    };
    probe.validate()?;
    let manifest::Manifest { mut nodes, .. } = probe;
    // The probe holds exactly the one node put in.
    Ok(nodes.swap_remove(0))
}

/// The manifest form of a complete node image (with its digests) from the
/// authenticated node `peer`, refused unless it is `peer`'s own and passes
/// the manifest's validation (plain file names, clean absolute paths, a
/// digest for every referenced file).
pub fn node_image_from_wire(
    img: pb::NodeImage,
    peer: &str,
) -> Result<manifest::NodeImage, WireError> {
    let node = convert_node_image(img, peer)?;
    check_node_image(node).map_err(|source| WireError::Invalid {
        peer: peer.to_owned(),
        source,
    })
}

/// The node image of a `Dumped` from `peer`: no digests yet (they come with
/// `Flushed`, see [`with_digests`]); everything else is checked as
/// [`node_image_from_wire`] does.
pub fn undigested_node_image_from_wire(
    img: pb::NodeImage,
    peer: &str,
) -> Result<manifest::NodeImage, WireError> {
    if !img.files.is_empty() {
        return Err(WireError::EarlyDigests {
            peer: peer.to_owned(),
            files: img.files.len(),
        });
    }
    let mut node = convert_node_image(img, peer)?;
    // Stand-in digests for every referenced file, so that the manifest's
    // checks run on everything but the digests themselves.
    let mut names = std::collections::BTreeSet::new();
    for t in &node.trees {
        names.extend(
            std::iter::once(&t.meta_pack)
                .chain(t.pages.iter())
                .chain(t.local_pack.iter())
                .chain(t.init_binary.iter())
                .cloned(),
        );
    }
    node.files = names
        .into_iter()
        .map(|name| manifest::FileDigest {
            name,
            size: 0,
            blake3: String::new(),
        })
        .collect();
    let mut node = check_node_image(node).map_err(|source| WireError::Invalid {
        peer: peer.to_owned(),
        source,
    })?;
    node.files.clear();
    Ok(node)
}

/// `image` (from DUMPED) completed with the digests of FLUSHED, checked as
/// a manifest's node: every referenced file has a digest, no file twice.
pub fn with_digests(
    mut image: manifest::NodeImage,
    files: Vec<manifest::FileDigest>,
) -> Result<manifest::NodeImage, ValidationError> {
    image.files = files;
    check_node_image(image)
}

impl pb::Dumped {
    /// The node image without digests, checked as
    /// [`undigested_node_image_from_wire`] does.
    pub fn node_image(&self, peer: &str) -> Result<manifest::NodeImage, WireError> {
        let img = self.image.clone().ok_or_else(|| WireError::Missing {
            peer: peer.to_owned(),
            what: "Dumped",
            field: "image",
        })?;
        undigested_node_image_from_wire(img, peer)
    }
}

impl pb::Flushed {
    /// The digests of the sender's files: 32-byte digests, plain file
    /// names, none twice. Whether they cover the image is checked against
    /// its DUMPED ([`with_digests`]).
    pub fn file_digests(&self, peer: &str) -> Result<Vec<manifest::FileDigest>, WireError> {
        let files = digests_from_wire(self.files.clone(), peer)?;
        let mut seen = std::collections::HashSet::new();
        for f in &files {
            let invalid = |source| WireError::Invalid {
                peer: peer.to_owned(),
                source,
            };
            manifest::check_name("file name", &f.name).map_err(invalid)?;
            if !seen.insert(f.name.as_str()) {
                return Err(invalid(ValidationError::DuplicateFile {
                    name: f.name.clone(),
                }));
            }
        }
        Ok(files)
    }
}

impl pb::Prepare {
    /// The checkpoint mode, refusing an unknown or unset value (fail closed:
    /// never guess whether to kill the job).
    pub fn checkpoint_mode(&self, peer: &str) -> Result<manifest::CheckpointMode, WireError> {
        match pb::CheckpointMode::try_from(self.mode) {
            Ok(pb::CheckpointMode::Continue) => Ok(manifest::CheckpointMode::Continue),
            Ok(pb::CheckpointMode::Stop) => Ok(manifest::CheckpointMode::Stop),
            Ok(pb::CheckpointMode::Unspecified) | Err(_) => Err(WireError::UnknownEnum {
                peer: peer.to_owned(),
                what: "Prepare",
                field: "mode",
                value: self.mode,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> manifest::NodeImage {
        manifest::NodeImage {
            node: "n1".into(),
            ranks: vec![0, 1],
            drained: vec![manifest::RankDrain {
                rank: 1,
                sent: 9,
                received: 8,
                stashed: 1,
                rounds: 2,
            }],
            trees: vec![manifest::TreeImage {
                id: 0,
                root_pid: 4242,
                net: manifest::NetMode::Private { key: "net0".into() },
                stdio: vec![manifest::PipeBinding { fd: 1, inode: 9 }],
                writable_files: vec![manifest::FileSize {
                    path: "/home/u/out".into(),
                    size: 12,
                }],
                captured: vec!["/dev/shm/seg".into()],
                meta_pack: "n1.t0.meta.pack".into(),
                pages: vec!["n1.t0.pages-1.img".into()],
                local_pack: None,
                init_dir: Some("/tmp/init".into()),
                init_binary: None,
            }],
            files: ["n1.t0.meta.pack", "n1.t0.pages-1.img"]
                .iter()
                .map(|n| manifest::FileDigest {
                    name: (*n).into(),
                    size: 5,
                    blake3: blake3::hash(n.as_bytes()).to_hex().to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn node_image_round_trips_through_the_wire() {
        let img = image();
        let wire = node_image_to_wire(&img).unwrap();
        assert_eq!(wire.files[0].blake3.len(), 32);
        let mut undigested = wire.clone();
        let digests = std::mem::take(&mut undigested.files);
        let dumped = pb::Dumped {
            job: "j".into(),
            epoch: 1,
            image: Some(undigested),
            ..Default::default()
        };
        let flushed = pb::Flushed {
            files: digests,
            ..Default::default()
        };
        let bare = dumped.node_image("n1").unwrap();
        assert!(bare.files.is_empty());
        let files = flushed.file_digests("n1").unwrap();
        assert_eq!(with_digests(bare, files).unwrap(), img);
        assert_eq!(node_image_from_wire(wire, "n1").unwrap(), img);
        let mut host = img.clone();
        host.trees[0].net = manifest::NetMode::Host;
        let back = node_image_from_wire(node_image_to_wire(&host).unwrap(), "n1").unwrap();
        assert_eq!(back, host);
    }

    #[test]
    fn foreign_or_unsafe_node_images_are_refused() {
        let wire = node_image_to_wire(&image()).unwrap();
        let err = node_image_from_wire(wire.clone(), "n2").unwrap_err();
        assert!(matches!(err, WireError::WrongNode { .. }), "{err}");

        let mut bad = wire.clone();
        bad.files[0].blake3.pop();
        let err = node_image_from_wire(bad, "n1").unwrap_err();
        assert!(matches!(err, WireError::BadDigest { len: 31, .. }), "{err}");

        let mut bad = wire.clone();
        bad.trees[0].meta_pack = "../../etc/shadow".into();
        let err = node_image_from_wire(bad, "n1").unwrap_err();
        assert!(matches!(err, WireError::Invalid { .. }), "{err}");

        let mut bad = wire;
        bad.trees[0].captured = vec!["relative".into()];
        assert!(node_image_from_wire(bad, "n1").is_err());

        let empty = pb::Dumped::default();
        assert!(matches!(
            empty.node_image("n1"),
            Err(WireError::Missing { .. })
        ));
    }

    #[test]
    fn dumped_without_digests_and_flushed_digests_are_checked() {
        let wire = node_image_to_wire(&image()).unwrap();
        // DUMPED must not carry digests.
        let early = pb::Dumped {
            image: Some(wire.clone()),
            ..Default::default()
        };
        let err = early.node_image("n1").unwrap_err();
        assert!(
            matches!(err, WireError::EarlyDigests { files: 2, .. }),
            "{err}"
        );
        // An unsafe name in DUMPED is refused without digests too.
        let mut bad = wire.clone();
        bad.files.clear();
        bad.trees[0].pages = vec!["../x".into()];
        assert!(matches!(
            undigested_node_image_from_wire(bad, "n1"),
            Err(WireError::Invalid { .. })
        ));
        // FLUSHED: short digest, unsafe name, duplicate.
        let mut f = pb::Flushed {
            files: wire.files.clone(),
            ..Default::default()
        };
        f.files[1].blake3.truncate(5);
        assert!(matches!(
            f.file_digests("n1"),
            Err(WireError::BadDigest { len: 5, .. })
        ));
        f.files = wire.files.clone();
        f.files[0].name = "a/b".into();
        assert!(matches!(
            f.file_digests("n1"),
            Err(WireError::Invalid { .. })
        ));
        f.files = wire.files.clone();
        f.files[1].name = f.files[0].name.clone();
        assert!(matches!(
            f.file_digests("n1"),
            Err(WireError::Invalid { .. })
        ));
        // Digests that miss a referenced file fail against the image.
        let mut bare = wire.clone();
        bare.files.clear();
        let bare = undigested_node_image_from_wire(bare, "n1").unwrap();
        f.files = wire.files[..1].to_vec();
        let files = f.file_digests("n1").unwrap();
        assert!(matches!(
            with_digests(bare, files),
            Err(ValidationError::Undigested { .. })
        ));
    }

    #[test]
    fn unknown_checkpoint_mode_is_refused() {
        let mut p = pb::Prepare {
            mode: pb::CheckpointMode::Stop as i32,
            ..Default::default()
        };
        assert_eq!(
            p.checkpoint_mode("c").unwrap(),
            manifest::CheckpointMode::Stop
        );
        for bad in [0, 3, -1] {
            p.mode = bad;
            assert!(p.checkpoint_mode("c").is_err(), "{bad}");
        }
        assert_eq!(
            pb::CheckpointMode::from(manifest::CheckpointMode::Continue),
            pb::CheckpointMode::Continue
        );
    }

    #[test]
    fn versions_negotiate_to_the_highest_common() {
        let r = |min, max| VersionRange { min, max };
        assert_eq!(r(1, 3).negotiate(r(2, 5)), Some(3));
        assert_eq!(r(1, 1).negotiate(r(1, 1)), Some(1));
        assert_eq!(r(1, 2).negotiate(r(3, 4)), None);
        assert_eq!(r(3, 1).negotiate(r(1, 3)), None);
        assert_eq!(r(0, 0).negotiate(r(0, 0)), None);
        assert_eq!(r(2, 2).to_string(), "version 2");
        assert_eq!(r(1, 3).to_string(), "versions 1..=3");
    }

    #[test]
    fn frames_know_their_kind_and_epoch() {
        let f = pb::Frame::from(pb::Abort {
            job: "j".into(),
            epoch: 9,
            reason: "x".into(),
        });
        assert_eq!(f.kind(), "Abort");
        assert_eq!(f.job_epoch(), Some(("j", 9)));
        let hb = pb::Frame::from(pb::Heartbeat::default());
        assert_eq!(hb.kind(), "Heartbeat");
        assert_eq!(hb.job_epoch(), None);
        assert_eq!(pb::Frame::default().kind(), "none");
    }
}
