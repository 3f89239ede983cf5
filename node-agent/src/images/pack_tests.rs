use super::*;
use std::os::unix::fs::symlink;

fn write(path: &Path, content: &[u8]) {
    fs::write(path, content).unwrap();
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A pack built by hand, with a correct trailer, to feed the reader names
/// and kinds that our writer would never produce.
fn raw_pack(entries: &[(&[u8], u8, &[u8])]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&VERSION.to_le_bytes());
    for (name, kind, data) in entries {
        v.extend_from_slice(&(name.len() as u16).to_le_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&0o644u32.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.push(*kind);
        v.extend_from_slice(&(data.len() as u64).to_le_bytes());
        v.extend_from_slice(data);
    }
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&[0u8; 12]);
    v.push(KIND_END);
    v.extend_from_slice(&32u64.to_le_bytes());
    let h = blake3::hash(&v);
    v.extend_from_slice(h.as_bytes());
    v
}

fn criu_dir(tmp: &Path) -> PathBuf {
    let src = tmp.join("images");
    fs::create_dir(&src).unwrap();
    write(&src.join("core-1.img"), b"core one");
    write(&src.join("mm-1.img"), &vec![7u8; 3 * IO_BUF + 5]);
    write(&src.join("inventory.img"), b"");
    write(&src.join("pages-1.img"), b"large pages stay outside");
    symlink("/etc/passwd", src.join("evil.img")).unwrap();
    fs::create_dir(src.join("subdir")).unwrap();
    src
}

#[test]
fn pack_dir_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = criu_dir(tmp.path());
    let pack = tmp.path().join("n1.t0.meta.pack");
    let stats = pack_dir(&src, &pack, |n| !n.starts_with("pages-")).unwrap();
    assert_eq!(stats.entries, 3);
    assert_eq!(stats.data_bytes, 8 + 3 * IO_BUF as u64 + 5);
    assert_eq!(stats.pack_bytes, fs::metadata(&pack).unwrap().len());

    let names: Vec<_> = list(&pack).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["core-1.img", "inventory.img", "mm-1.img"]);

    let dest = tmp.path().join("restore");
    fs::create_dir(&dest).unwrap();
    let back = unpack_to_dir(&pack, &dest).unwrap();
    assert_eq!(back.entries, 3);
    for n in &names {
        assert_eq!(
            fs::read(dest.join(n)).unwrap(),
            fs::read(src.join(n)).unwrap()
        );
        let mode = fs::metadata(dest.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(!dest.join("pages-1.img").exists());
    assert!(!dest.join("evil.img").exists());

    // Unpacking again over existing files is refused (O_EXCL), naming them.
    let err = unpack_to_dir(&pack, &dest).unwrap_err();
    assert!(err.to_string().contains("core-1.img"), "{err}");
}

#[test]
fn pack_output_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let src = criu_dir(tmp.path());
    let pack = tmp.path().join("out.pack");
    symlink("/tmp/somewhere-else", &pack).unwrap();
    let err = pack_dir(&src, &pack, |_| true).unwrap_err();
    assert!(matches!(err, PackError::Create { .. }), "{err}");
    assert!(err.to_string().contains("out.pack"));
}

#[test]
fn unpack_to_dir_does_not_follow_planted_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = criu_dir(tmp.path());
    let pack = tmp.path().join("p");
    pack_dir(&src, &pack, |n| n == "core-1.img").unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let victim = tmp.path().join("victim");
    write(&victim, b"keep");
    symlink(&victim, dest.join("core-1.img")).unwrap();
    assert!(unpack_to_dir(&pack, &dest).is_err());
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
}

#[test]
fn every_truncation_is_detected_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    write(&src.join("a.img"), b"aaaa");
    write(&src.join("b.img"), b"bbbbbbbb");
    let pack = tmp.path().join("full.pack");
    pack_dir(&src, &pack, |_| true).unwrap();
    let bytes = fs::read(&pack).unwrap();
    let cut_pack = tmp.path().join("cut.pack");
    for cut in 0..bytes.len() {
        write(&cut_pack, &bytes[..cut]);
        let err = list(&cut_pack).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, UnpackError::Truncated { .. }),
            "cut at {cut}: {msg}"
        );
        assert!(msg.contains("cut.pack"), "{msg}");
    }
    // Cut inside b.img's data: the message names the entry.
    write(&cut_pack, &bytes[..bytes.len() - 23 - 32 - 3]);
    let msg = list(&cut_pack).unwrap_err().to_string();
    assert!(msg.contains("entry #2 \"b.img\""), "{msg}");
}

#[test]
fn corruption_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    write(&src.join("a.img"), b"hello world");
    let pack = tmp.path().join("p.pack");
    pack_dir(&src, &pack, |_| true).unwrap();
    let good = fs::read(&pack).unwrap();
    let bad_pack = tmp.path().join("bad.pack");

    // Every single flipped byte is caught.
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        write(&bad_pack, &bad);
        assert!(list(&bad_pack).is_err(), "flip at {i} went unnoticed");
    }

    // A flipped data byte: the checksum names the problem.
    let pos = good.windows(5).position(|w| w == b"hello").unwrap();
    let mut bad = good.clone();
    bad[pos] = b'j';
    write(&bad_pack, &bad);
    let err = list(&bad_pack).unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    let dest = tmp.path().join("d");
    fs::create_dir(&dest).unwrap();
    assert!(unpack_to_dir(&bad_pack, &dest).is_err());

    // Bad magic, future version, trailing bytes.
    let mut bad = good.clone();
    bad[0] = b'X';
    write(&bad_pack, &bad);
    assert!(list(&bad_pack)
        .unwrap_err()
        .to_string()
        .contains("bad magic"));
    let mut bad = good.clone();
    bad[8] = 9;
    write(&bad_pack, &bad);
    assert!(list(&bad_pack)
        .unwrap_err()
        .to_string()
        .contains("version 9"));
    let mut bad = good.clone();
    bad.push(0);
    write(&bad_pack, &bad);
    assert!(list(&bad_pack)
        .unwrap_err()
        .to_string()
        .contains("follow the end marker"));

    // A well-formed pack with an unknown kind.
    write(&bad_pack, &raw_pack(&[(b"x", 7, b"")]));
    let err = list(&bad_pack).unwrap_err();
    assert!(err.to_string().contains("unknown kind 7"), "{err}");
    assert!(err.to_string().contains("entry #1 \"x\""), "{err}");
}

#[test]
fn unpack_to_dir_refuses_unsafe_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let pack = tmp.path().join("evil.pack");
    let cases: [(&[u8], u8); 6] = [
        (b"../escape", KIND_FILE),
        (b"/etc/passwd", KIND_FILE),
        (b"a/b", KIND_FILE),
        (b"..", KIND_FILE),
        (b"nul\0x", KIND_FILE),
        (b"dir", KIND_DIR),
    ];
    for (name, kind) in cases {
        write(&pack, &raw_pack(&[(name, kind, b"")]));
        let err = unpack_to_dir(&pack, &dest).unwrap_err();
        assert!(
            matches!(err, UnpackError::Refused { .. }),
            "{name:?}: {err}"
        );
        assert!(err.to_string().contains("evil.pack"));
    }
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
    assert!(!tmp.path().join("escape").exists());
}

#[test]
fn pack_paths_round_trip_with_owners_modes_and_links() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("shm");
    fs::create_dir(&root).unwrap();
    let session = root.join("ompi.n1.1000");
    fs::create_dir_all(session.join("jf.1/0")).unwrap();
    write(&session.join("jf.1/0/contact.txt"), b"contact");
    write(&root.join("vader_segment.n1.0"), &vec![3u8; 2 * IO_BUF + 1]);
    symlink("contact.txt", session.join("jf.1/0/link")).unwrap();
    fs::set_permissions(session.join("jf.1"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(
        root.join("vader_segment.n1.0"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let (uid, gid) = if is_root() {
        (1234, 5678)
    } else {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    };
    std::os::unix::fs::lchown(session.join("jf.1/0/contact.txt"), Some(uid), Some(gid)).unwrap();
    std::os::unix::fs::lchown(session.join("jf.1/0/link"), Some(uid), Some(gid)).unwrap();

    let pack = tmp.path().join("n1.t0.local.pack");
    // The nested path is packed once.
    let stats = pack_paths(
        &[
            session.clone(),
            root.join("vader_segment.n1.0"),
            session.join("jf.1"),
        ],
        &pack,
    )
    .unwrap();
    let entries = list(&pack).unwrap();
    assert_eq!(stats.entries as usize, entries.len());
    assert_eq!(entries.len(), 6, "{entries:#?}");
    assert_eq!(entries[0].name, session.to_str().unwrap());
    assert_eq!(entries[0].kind, EntryKind::Dir);

    // Wipe and alter, then restore.
    fs::remove_dir_all(&session).unwrap();
    write(&root.join("vader_segment.n1.0"), b"changed after dump");
    unpack_paths(&pack, &[&root]).unwrap();
    assert_eq!(
        fs::read(session.join("jf.1/0/contact.txt")).unwrap(),
        b"contact"
    );
    assert_eq!(
        fs::read(root.join("vader_segment.n1.0")).unwrap(),
        vec![3u8; 2 * IO_BUF + 1]
    );
    assert_eq!(
        fs::read_link(session.join("jf.1/0/link")).unwrap(),
        Path::new("contact.txt")
    );
    let m = fs::metadata(session.join("jf.1")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    let m = fs::metadata(root.join("vader_segment.n1.0")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    let m = fs::metadata(session.join("jf.1/0/contact.txt")).unwrap();
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    let m = fs::symlink_metadata(session.join("jf.1/0/link")).unwrap();
    assert_eq!((m.uid(), m.gid()), (uid, gid));

    // Restoring over what exists replaces files and links, keeps dirs, and
    // leaves no temporary names behind.
    fs::remove_file(session.join("jf.1/0/link")).unwrap();
    write(&session.join("jf.1/0/link"), b"a file where a link was");
    fs::remove_file(session.join("jf.1/0/contact.txt")).unwrap();
    symlink("/etc/passwd", session.join("jf.1/0/contact.txt")).unwrap();
    unpack_paths(&pack, &[&root]).unwrap();
    assert_eq!(
        fs::read_link(session.join("jf.1/0/link")).unwrap(),
        Path::new("contact.txt")
    );
    assert!(fs::symlink_metadata(session.join("jf.1/0/contact.txt"))
        .unwrap()
        .is_file());
    let leftovers: Vec<_> = fs::read_dir(session.join("jf.1/0"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".ckpt"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn unpack_paths_stays_below_allowed_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let allowed = tmp.path().join("allowed");
    let other = tmp.path().join("other");
    fs::create_dir(&allowed).unwrap();
    fs::create_dir(&other).unwrap();
    let pack = tmp.path().join("p.pack");
    let abs = |p: &Path| p.to_str().unwrap().as_bytes().to_vec();

    // Outside every root.
    write(
        &pack,
        &raw_pack(&[(&abs(&other.join("x")), KIND_FILE, b"x")]),
    );
    let err = unpack_paths(&pack, &[&allowed]).unwrap_err();
    assert!(
        err.to_string().contains("not below any allowed root"),
        "{err}"
    );
    assert!(!other.join("x").exists());

    // '..' inside an allowed root, and a root lookalike prefix.
    let dotdot = format!("{}/../other/x", allowed.display());
    let lookalike = format!("{}-evil/x", allowed.display());
    for name in [dotdot.as_str(), lookalike.as_str(), "relative/x", "//x"] {
        write(&pack, &raw_pack(&[(name.as_bytes(), KIND_FILE, b"x")]));
        let err = unpack_paths(&pack, &[&allowed]).unwrap_err();
        assert!(matches!(err, UnpackError::Refused { .. }), "{name}: {err}");
    }
    assert!(!other.join("x").exists());

    // The root itself.
    write(&pack, &raw_pack(&[(&abs(&allowed), KIND_DIR, b"")]));
    assert!(unpack_paths(&pack, &[&allowed]).is_err());

    // A symlink planted in a parent component is not followed.
    symlink(&other, allowed.join("sess")).unwrap();
    write(
        &pack,
        &raw_pack(&[(&abs(&allowed.join("sess/x")), KIND_FILE, b"x")]),
    );
    let err = unpack_paths(&pack, &[&allowed]).unwrap_err();
    assert!(err.to_string().contains("refusing to follow"), "{err}");
    assert!(!other.join("x").exists());

    // A missing parent is an error, not silently created.
    write(
        &pack,
        &raw_pack(&[(&abs(&allowed.join("nope/x")), KIND_FILE, b"x")]),
    );
    let err = unpack_paths(&pack, &[&allowed]).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");

    // A directory entry where a planted symlink sits replaces the link.
    write(
        &pack,
        &raw_pack(&[(&abs(&allowed.join("sess")), KIND_DIR, b"")]),
    );
    unpack_paths(&pack, &[&allowed]).unwrap();
    assert!(fs::symlink_metadata(allowed.join("sess")).unwrap().is_dir());
}

#[test]
fn pack_paths_refuses_relative_and_dotdot() {
    let tmp = tempfile::tempdir().unwrap();
    for p in ["relative", "/tmp/../etc"] {
        let err = pack_paths(&[PathBuf::from(p)], &tmp.path().join("x.pack")).unwrap_err();
        assert!(matches!(err, PackError::Unsupported { .. }), "{p}: {err}");
    }
}

#[test]
fn pack_paths_recreates_fifos_empty_with_their_mode() {
    // Open MPI's session dir holds `debugger_attach_fifo`, open in mpirun:
    // CRIU reopens it by path at restore, so it must come back.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tmp");
    let session = root.join("ompi.n1.0/pid.2");
    fs::create_dir_all(session.join("0")).unwrap();
    let fifo = session.join("0/debugger_attach_fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    fs::set_permissions(&fifo, fs::Permissions::from_mode(0o640)).unwrap();

    let pack = tmp.path().join("n1.t0.local.pack");
    pack_paths(std::slice::from_ref(&session), &pack).unwrap();
    let entries = list(&pack).unwrap();
    let e = entries
        .iter()
        .find(|e| e.name == fifo.to_str().unwrap())
        .expect("fifo entry");
    assert_eq!((e.kind, e.size), (EntryKind::Fifo, 0));

    fs::remove_dir_all(&session).unwrap();
    unpack_paths(&pack, &[&root]).unwrap();
    let m = fs::symlink_metadata(&fifo).unwrap();
    assert!(m.file_type().is_fifo());
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    // Over an existing fifo, too.
    unpack_paths(&pack, &[&root]).unwrap();
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    // A fifo entry with data is corrupt.
    let raw = raw_pack(&[(b"/x/f", KIND_FIFO, b"data")]);
    let bad = tmp.path().join("bad.pack");
    fs::write(&bad, raw).unwrap();
    assert!(list(&bad).is_err());
}
