use super::*;
use ckpt_protocol::manifest::{
    CheckpointMode, NetMode, NodeImage, Timings, TreeImage, FORMAT_VERSION, MANIFEST_TMP_FILE,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

const JOB: &str = "job-1";

fn store() -> (tempfile::TempDir, ImageStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::new(tmp.path().join("images"));
    (tmp, store)
}

fn me() -> (u32, u32) {
    (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    )
}

fn key() -> Key {
    Key::from_bytes([7; 32])
}

fn begin(store: &ImageStore) -> PendingEpoch {
    let (uid, gid) = me();
    store.begin_epoch(JOB, uid, gid).unwrap()
}

/// Writes a node's files into the pending epoch, seals them, and returns
/// the manifest describing them.
fn fill(p: &PendingEpoch) -> Manifest {
    let meta = "n1.t0.meta.pack";
    let pages = "n1.t0.pages-1.img";
    fs::write(p.dir.join(meta), format!("meta of epoch {}", p.epoch)).unwrap();
    fs::write(p.dir.join(pages), vec![0xa5u8; 3 << 20]).unwrap();
    let files = vec![p.seal_file(meta).unwrap(), p.seal_file(pages).unwrap()];
    Manifest {
        format: FORMAT_VERSION,
        job: p.job.clone(),
        epoch: p.epoch,
        created_unix: 1,
        owner_uid: 0,
        owner_gid: 0,
        criu_version: "4.1.1".into(),
        command: vec!["./ring".into()],
        cwd: "/".into(),
        mode: CheckpointMode::Continue,
        nodes: vec![NodeImage {
            node: "n1".into(),
            ranks: vec![0],
            drained: Vec::new(),
            trees: vec![TreeImage {
                id: 0,
                root_pid: 1,
                net: NetMode::Host,
                stdio: vec![],
                writable_files: vec![],
                captured: vec![],
                meta_pack: meta.into(),
                pages: vec![pages.into()],
                local_pack: None,
                init_dir: None,
                init_binary: None,
            }],
            files,
        }],
        timings: Timings::default(),
    }
}

fn commit_one(store: &ImageStore) -> u64 {
    let p = begin(store);
    let m = fill(&p);
    let epoch = p.epoch;
    p.commit(&m, &key()).unwrap();
    epoch
}

#[test]
fn job_names() {
    for ok in ["job-1", "12345", "a.b_c-d", &"x".repeat(64)] {
        assert!(valid_job_name(ok), "{ok}");
    }
    for bad in [
        "",
        ".hidden",
        "..",
        "a/b",
        "../etc",
        "sp ace",
        "nul\0",
        &"x".repeat(65),
    ] {
        assert!(!valid_job_name(bad), "{bad:?}");
    }
    let (_tmp, store) = store();
    let err = store.begin_epoch("../escape", 0, 0).unwrap_err();
    assert!(matches!(err, StoreError::InvalidJobName { .. }), "{err}");
    assert!(store.epochs("a/b").is_err());
}

#[test]
fn epoch_dir_names() {
    assert_eq!(epoch_dir_name(7), "000007");
    assert_eq!(epoch_dir_name(1_234_567), "1234567");
    assert_eq!(parse_epoch_dir_name("000007"), Some(7));
    assert_eq!(parse_epoch_dir_name("1234567"), Some(1_234_567));
    for bad in [
        "7",
        "00007",
        "0000007",
        "000000",
        "000007.tmp",
        "LATEST",
        "-00001",
        "+00001",
    ] {
        assert_eq!(parse_epoch_dir_name(bad), None, "{bad}");
    }
}

#[test]
fn layout_modes_and_latest() {
    let (_tmp, store) = store();
    assert_eq!(store.latest_committed(JOB).unwrap(), None);
    assert!(store.epochs(JOB).unwrap().is_empty());
    assert!(store.jobs().unwrap().is_empty());

    let e = commit_one(&store);
    assert_eq!(e, 1);
    let dir = store.epoch_dir(JOB, 1);
    assert!(dir.ends_with("job-1/000001"));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(store.root()), 0o755);
    assert_eq!(mode(&store.job_dir(JOB)), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(MANIFEST_FILE)), 0o600);
    assert_eq!(
        fs::read_to_string(store.job_dir(JOB).join(LATEST_FILE)).unwrap(),
        "1\n"
    );
    assert!(!dir.join(MANIFEST_TMP_FILE).exists());
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(1));
    assert_eq!(store.jobs().unwrap(), [JOB]);

    let m = store.load_manifest(JOB, 1, Some(&key())).unwrap();
    assert_eq!(m.epoch, 1);
    assert_eq!(store.load_manifest(JOB, 1, None).unwrap(), m);
    let report = store.verify(JOB, 1, &key()).unwrap();
    assert_eq!(report.files, 2);
    assert_eq!(
        report.bytes,
        m.nodes[0].files.iter().map(|f| f.size).sum::<u64>()
    );
}

#[test]
fn owner_of_job_epoch_and_manifest() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let (_tmp, store) = store();
    let p = store.begin_epoch(JOB, 1234, 5678).unwrap();
    let m = fill(&p);
    let dir = p.commit(&m, &key()).unwrap();
    for path in [
        store.job_dir(JOB),
        dir.clone(),
        dir.join(MANIFEST_FILE),
        store.job_dir(JOB).join(LATEST_FILE),
    ] {
        let md = fs::metadata(&path).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 5678), "{}", path.display());
    }
}

#[test]
fn aborted_epoch_numbers_are_never_reused() {
    let (_tmp, store) = store();
    let p = begin(&store);
    assert_eq!(p.epoch, 1);
    fs::write(p.dir.join("n1.t0.meta.pack"), b"partial").unwrap();
    p.abort().unwrap();
    let p = begin(&store);
    assert_eq!(p.epoch, 2);
    p.abort().unwrap();
    assert_eq!(commit_one(&store), 3);
    let epochs = store.epochs(JOB).unwrap();
    assert_eq!(
        epochs
            .iter()
            .map(|e| (e.epoch, e.committed))
            .collect::<Vec<_>>(),
        [(1, false), (2, false), (3, true)]
    );
    assert_eq!(fs::read_dir(&epochs[0].path).unwrap().count(), 0);

    // A foreign entry with an epoch-like name is skipped over too.
    fs::write(store.job_dir(JOB).join("000009"), b"not a dir").unwrap();
    let p = begin(&store);
    assert_eq!(p.epoch, 10);
    p.abort().unwrap();
}

#[test]
fn epochs_ignore_foreign_names() {
    let (_tmp, store) = store();
    commit_one(&store);
    let jd = store.job_dir(JOB);
    for d in ["000002.tmp", "notes", "7", "0000003"] {
        fs::create_dir(jd.join(d)).unwrap();
    }
    fs::write(jd.join("000004"), b"a file").unwrap();
    std::os::unix::fs::symlink(store.epoch_dir(JOB, 1), jd.join("000005")).unwrap();
    let epochs = store.epochs(JOB).unwrap();
    assert_eq!(epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), [1]);
    fs::create_dir(store.root().join(".hidden")).unwrap();
    fs::write(store.root().join("file"), b"").unwrap();
    assert_eq!(store.jobs().unwrap(), [JOB]);
}

#[test]
fn uncommitted_epoch_is_never_latest_and_is_refused_by_verify() {
    let (_tmp, store) = store();
    commit_one(&store);
    let p = begin(&store);
    let m = fill(&p);
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(1));
    let err = store.verify(JOB, 2, &key()).unwrap_err();
    assert!(
        matches!(err, StoreError::NotCommitted { epoch: 2, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "epoch 2 of job job-1 has no MANIFEST: it was never committed"
    );
    assert!(matches!(
        store.load_manifest(JOB, 2, None),
        Err(StoreError::NotCommitted { .. })
    ));
    assert!(matches!(
        store.verify(JOB, 99, &key()),
        Err(StoreError::NoSuchEpoch { epoch: 99, .. })
    ));

    // Crash just before the rename: a complete MANIFEST.tmp is left behind.
    fs::write(p.dir.join(MANIFEST_TMP_FILE), m.encode(&key())).unwrap();
    let epochs = store.epochs(JOB).unwrap();
    assert!(!epochs[1].committed);
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(1));
    assert!(matches!(
        store.verify(JOB, 2, &key()),
        Err(StoreError::NotCommitted { .. })
    ));
    // The next commit attempt replaces the stale temporary file.
    p.commit(&m, &key()).unwrap();
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(2));
    store.verify(JOB, 2, &key()).unwrap();
}

#[test]
fn latest_hint_is_not_trusted() {
    let (_tmp, store) = store();
    commit_one(&store);
    commit_one(&store);
    let latest = store.job_dir(JOB).join(LATEST_FILE);
    // Points to an epoch without a manifest.
    let p = begin(&store);
    fs::write(&latest, format!("{}\n", p.epoch)).unwrap();
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(2));
    // Garbage, missing.
    fs::write(&latest, "banana").unwrap();
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(2));
    fs::remove_file(&latest).unwrap();
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(2));
    // Behind (crash between the manifest rename and the LATEST update).
    fs::write(&latest, "1\n").unwrap();
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(2));
    // The manifest of 2 disappears: back to 1.
    fs::remove_file(store.epoch_dir(JOB, 2).join(MANIFEST_FILE)).unwrap();
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(1));
    p.abort().unwrap();
}

#[test]
fn latest_never_moves_back() {
    let (_tmp, store) = store();
    let a = begin(&store);
    let b = begin(&store);
    let (ma, mb) = (fill(&a), fill(&b));
    b.commit(&mb, &key()).unwrap();
    a.commit(&ma, &key()).unwrap();
    let latest = fs::read_to_string(store.job_dir(JOB).join(LATEST_FILE)).unwrap();
    assert_eq!(latest, "2\n");
}

#[test]
fn retention() {
    let (_tmp, store) = store();
    commit_one(&store); // 1
    begin(&store).abort().unwrap(); // 2, tombstone
    commit_one(&store); // 3
    let _stale = begin(&store); // 4, never finished
    commit_one(&store); // 5
    let in_progress = begin(&store); // 6
    fs::write(in_progress.dir.join("n1.t0.meta.pack"), b"being written").unwrap();

    assert!(matches!(
        store.retain(JOB, 0),
        Err(StoreError::KeepNothing { .. })
    ));
    assert_eq!(store.retain(JOB, 2).unwrap(), [1, 2, 4]);
    let left: Vec<_> = store
        .epochs(JOB)
        .unwrap()
        .iter()
        .map(|e| (e.epoch, e.committed))
        .collect();
    assert_eq!(left, [(3, true), (5, true), (6, false)]);
    assert_eq!(store.retain(JOB, 2).unwrap(), Vec::<u64>::new());
    assert_eq!(store.retain(JOB, 1).unwrap(), [3]);
    assert!(in_progress.dir.join("n1.t0.meta.pack").exists());
    assert_eq!(store.latest_committed(JOB).unwrap(), Some(5));
    store.verify(JOB, 5, &key()).unwrap();
    // Nothing committed yet: nothing to do.
    assert!(store.retain("other", 1).unwrap().is_empty());
}

#[test]
fn verify_names_each_damaged_file() {
    let (_tmp, store) = store();
    commit_one(&store);
    let dir = store.epoch_dir(JOB, 1);
    let pages = dir.join("n1.t0.pages-1.img");
    let meta = dir.join("n1.t0.meta.pack");

    // One flipped byte in the middle of a 3 MiB file.
    let mut bytes = fs::read(&pages).unwrap();
    bytes[1 << 20] ^= 0x40;
    fs::write(&pages, &bytes).unwrap();
    let err = store.verify(JOB, 1, &key()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("n1.t0.pages-1.img: BLAKE3 is"), "{msg}");
    assert!(!msg.contains("meta.pack"), "{msg}");
    bytes[1 << 20] ^= 0x40;
    fs::write(&pages, &bytes).unwrap();
    store.verify(JOB, 1, &key()).unwrap();

    // Truncated.
    fs::write(&pages, &bytes[..bytes.len() - 1]).unwrap();
    let msg = store.verify(JOB, 1, &key()).unwrap_err().to_string();
    assert!(
        msg.contains("n1.t0.pages-1.img: size is 3145727 bytes, manifest says 3145728"),
        "{msg}"
    );

    // Missing, and replaced by a symlink to the right content: both named.
    let good_meta = fs::read(&meta).unwrap();
    fs::remove_file(&meta).unwrap();
    let elsewhere = dir.parent().unwrap().join("elsewhere");
    fs::write(&elsewhere, &bytes).unwrap();
    fs::remove_file(&pages).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &pages).unwrap();
    match store.verify(JOB, 1, &key()).unwrap_err() {
        StoreError::Verify { problems, .. } => {
            assert_eq!(problems.len(), 2, "{problems:?}");
            assert_eq!(problems[0].path, meta);
            assert_eq!(problems[0].problem, "missing");
            assert_eq!(problems[1].problem, "not a regular file");
        }
        other => panic!("unexpected {other}"),
    }
    fs::remove_file(&pages).unwrap();
    fs::write(&pages, &bytes).unwrap();
    fs::write(&meta, &good_meta).unwrap();
    store.verify(JOB, 1, &key()).unwrap();
}

#[test]
fn verify_refuses_altered_or_foreign_manifests() {
    let (_tmp, store) = store();
    commit_one(&store);
    commit_one(&store);
    let err = store.verify(JOB, 1, &Key::from_bytes([8; 32])).unwrap_err();
    assert!(
        err.to_string()
            .contains("altered or written with another key"),
        "{err}"
    );
    assert!(err.to_string().contains("000001/MANIFEST"), "{err}");

    // A validly MAC'd manifest copied from another epoch is refused.
    let m1 = store.epoch_dir(JOB, 1).join(MANIFEST_FILE);
    fs::copy(&m1, store.epoch_dir(JOB, 2).join(MANIFEST_FILE)).unwrap();
    assert!(matches!(
        store.verify(JOB, 2, &key()),
        Err(StoreError::WrongEpoch { found_epoch: 1, .. })
    ));
}

#[test]
fn commit_checks_the_manifest_and_the_files() {
    let (_tmp, store) = store();
    let p = begin(&store);
    let m = fill(&p);

    let mut wrong = m.clone();
    wrong.epoch = 9;
    let p = match p.commit(&wrong, &key()) {
        Err(StoreError::WrongEpoch { .. }) => store_pending_again(&store, 1),
        other => panic!("unexpected {other:?}"),
    };
    let mut evil = m.clone();
    evil.nodes[0].files[0].name = "../../etc/passwd".into();
    let p = match p.commit(&evil, &key()) {
        Err(StoreError::InvalidManifest { .. }) => store_pending_again(&store, 1),
        other => panic!("unexpected {other:?}"),
    };
    fs::remove_file(p.dir.join("n1.t0.meta.pack")).unwrap();
    match p.commit(&m, &key()) {
        Err(e @ StoreError::Incomplete { .. }) => {
            assert!(e.to_string().contains("n1.t0.meta.pack: missing"), "{e}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(store.latest_committed(JOB).unwrap(), None);
    assert!(!store.epoch_dir(JOB, 1).join(MANIFEST_FILE).exists());
    assert!(matches!(
        begin(&store).seal_file("../x"),
        Err(StoreError::InvalidManifest { .. })
    ));
}

/// The same pending epoch again, as the coordinator would hold it after a
/// failed commit attempt (commit consumes the handle).
fn store_pending_again(store: &ImageStore, epoch: u64) -> PendingEpoch {
    let (uid, gid) = me();
    PendingEpoch {
        job: JOB.into(),
        epoch,
        dir: store.epoch_dir(JOB, epoch),
        job_dir: store.job_dir(JOB),
        owner_uid: uid,
        owner_gid: gid,
    }
}
