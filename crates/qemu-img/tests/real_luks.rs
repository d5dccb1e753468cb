//! nasbak's own LUKS header code against the real qemu-img: the files QEMU makes (a
//! LUKS-encrypted qcow2 and a LUKS container) rotated by it open in qemu-img with the new key
//! and no longer with the old one, with their data intact; and a container it makes is one
//! qemu-img opens, writes and reads.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nasbak_process::ExternalCommand;
use nasbak_qemu_img::luks::{LuksFile, create_container, header_len};
use nasbak_qemu_img::{ImageFormat, StoredLayout};

mod common;
use common::qemu_img;

fn key(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, value).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The image-opts of `path` laid out as `layout`, opened with the key file `key`.
fn opts(path: &Path, layout: StoredLayout) -> String {
    let file = path.display();
    match layout {
        StoredLayout::Qcow2Luks => format!("driver=qcow2,encrypt.key-secret=k,file.filename={file}"),
        _ => format!("driver=luks,key-secret=k,file.filename={file}"),
    }
}

/// The guest-visible bytes of `path` read with the key file `key`, or the error.
fn read(path: &Path, layout: StoredLayout, key: &Path) -> Result<Vec<u8>, String> {
    let out = path.with_extension("read.raw");
    let secret = format!("secret,id=k,file={}", key.display());
    qemu_img(&[
        "convert",
        "--object",
        &secret,
        "--image-opts",
        &opts(path, layout),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ])?;
    let bytes = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    Ok(bytes)
}

/// Writes `data` at 0 of `path` through QEMU with the key file `key`.
fn write(path: &Path, layout: StoredLayout, key: &Path, data: &Path) {
    let secret = format!("secret,id=k,file={}", key.display());
    qemu_img(&[
        "convert",
        "-n",
        "--object",
        &secret,
        "-f",
        "raw",
        data.to_str().unwrap(),
        "--target-image-opts",
        &opts(path, layout),
    ])
    .unwrap();
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn files_qemu_made_rotate_in_place_and_qemu_opens_them_with_the_new_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let old = key(dir.path(), "old.key", "the old key, a long random string");
    let new = key(dir.path(), "new.key", "the new key, another random string");
    let data = dir.path().join("data.raw");
    fs::write(&data, pattern(4 << 20)).unwrap();
    let secret = format!("secret,id=k,file={}", old.display());
    for layout in [StoredLayout::Qcow2Luks, StoredLayout::Qcow2InLuks] {
        let path = dir.path().join(format!("{layout:?}.img"));
        let (format, options) = match layout {
            StoredLayout::Qcow2Luks => ("qcow2", "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=20"),
            _ => ("luks", "key-secret=k,iter-time=20"),
        };
        // QEMU fails to time its PBKDF now and then ("Unable to get accurate CPU usage"): tried again.
        let create = ["create", "-q", "--object", &secret, "-f", format, "-o", options, path.to_str().unwrap(), "4M"];
        let mut made = qemu_img(&create);
        for _ in 0..30 {
            match &made {
                Err(e) if e.contains("accurate CPU usage") => made = qemu_img(&create),
                _ => break,
            }
        }
        made.unwrap();
        write(&path, layout, &old, &data);
        let before = fs::read(&path).unwrap();

        let mut luks = LuksFile::open(&path, layout).unwrap();
        let master = luks.unlock(&fs::read(&old).unwrap()).unwrap().expect("the old key opens it");
        assert!(luks.unlock(&fs::read(&new).unwrap()).unwrap().is_none());
        luks.add(&master, &fs::read(&new).unwrap()).unwrap();
        assert_eq!(read(&path, layout, &new).unwrap(), pattern(4 << 20), "{layout:?}: both keys open it midway");
        assert_eq!(read(&path, layout, &old).unwrap(), pattern(4 << 20));
        luks.remove(&master).unwrap();

        assert_eq!(read(&path, layout, &new).unwrap(), pattern(4 << 20), "{layout:?}");
        let refused = read(&path, layout, &old).unwrap_err();
        assert!(refused.contains("Invalid password"), "{layout:?}: {refused}");
        let after = fs::read(&path).unwrap();
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert!(changed > 0 && changed <= header_len() as usize, "{layout:?}: {changed} bytes changed");
        let secret_new = format!("secret,id=k,file={}", new.display());
        if layout == StoredLayout::Qcow2Luks {
            let check = qemu_img(&["check", "--object", &secret_new, "--image-opts", &opts(&path, layout)]).unwrap();
            assert!(check.contains("No errors"), "{check}");
        }
    }
}

#[test]
fn a_container_nasbak_makes_is_one_qemu_opens_writes_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(dir.path(), "k.key", "a key of at least thirty-two characters");
    let wrong = key(dir.path(), "wrong.key", "not the key of this container at all");
    let path = dir.path().join("c.luks");
    create_container(&path, 8 << 20, &fs::read(&k).unwrap()).unwrap();
    let secret = format!("secret,id=k,file={}", k.display());
    let info = qemu_img(&[
        "info",
        "--output=json",
        "--object",
        &secret,
        "--image-opts",
        &opts(&path, StoredLayout::Qcow2InLuks),
    ])
    .unwrap();
    assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
    assert!(info.contains("\"cipher-alg\": \"aes-256\"") && info.contains("\"hash-alg\": \"sha256\""), "{info}");
    let data = dir.path().join("data.raw");
    fs::write(&data, pattern(8 << 20)).unwrap();
    write(&path, StoredLayout::Qcow2InLuks, &k, &data);
    assert_eq!(read(&path, StoredLayout::Qcow2InLuks, &k).unwrap(), pattern(8 << 20));
    assert!(read(&path, StoredLayout::Qcow2InLuks, &wrong).unwrap_err().contains("Invalid password"));
    // Sparse: the header and the data written, not the whole apparent size twice.
    use std::os::unix::fs::MetadataExt;
    assert!(fs::metadata(&path).unwrap().blocks() * 512 <= header_len() + (8 << 20) + (1 << 20));
    // And QEMU can still change its keyslots (amend), as it can a container it made.
    let other = key(dir.path(), "other.key", "a third key, also long enough......");
    let secret_other = format!("secret,id=n,file={}", other.display());
    qemu_img(&[
        "amend",
        "--object",
        &secret,
        "--object",
        &secret_other,
        "-o",
        "state=active,new-secret=n,iter-time=20",
        "--image-opts",
        &opts(&path, StoredLayout::Qcow2InLuks),
    ])
    .unwrap();
    assert_eq!(read(&path, StoredLayout::Qcow2InLuks, &other).unwrap(), pattern(8 << 20));
}

#[test]
fn an_encrypted_qcow2_nasbak_makes_checks_clean_and_holds_data_and_a_backing_chain() {
    use nasbak_qemu_img::luks::create_encrypted_qcow2;
    let dir = tempfile::tempdir().unwrap();
    let k = key(dir.path(), "k.key", "a key of at least thirty-two characters");
    let wrong = key(dir.path(), "wrong.key", "not the key of this image, not at all");
    let secret = format!("secret,id=k,file={}", k.display());
    // Sizes across an L1 cluster's worth and an odd one.
    for size in [1u64 << 20, (3 << 30) + 512, 5 << 40] {
        let path = dir.path().join(format!("e-{size}.qcow2"));
        create_encrypted_qcow2(&path, size, None, &fs::read(&k).unwrap()).unwrap();
        let check =
            qemu_img(&["check", "--object", &secret, "--image-opts", &opts(&path, StoredLayout::Qcow2Luks)]).unwrap();
        assert!(check.contains("No errors"), "{size}: {check}");
        let info = qemu_img(&[
            "info",
            "--output=json",
            "--object",
            &secret,
            "--image-opts",
            &opts(&path, StoredLayout::Qcow2Luks),
        ])
        .unwrap();
        assert!(info.contains(&format!("\"virtual-size\": {size}")) && info.contains("\"encrypted\": true"), "{info}");
    }
    let parent = dir.path().join("parent.qcow2");
    create_encrypted_qcow2(&parent, 8 << 20, None, &fs::read(&k).unwrap()).unwrap();
    let data = dir.path().join("data.raw");
    fs::write(&data, pattern(8 << 20)).unwrap();
    write(&parent, StoredLayout::Qcow2Luks, &k, &data);
    assert_eq!(read(&parent, StoredLayout::Qcow2Luks, &k).unwrap(), pattern(8 << 20));
    assert!(read(&parent, StoredLayout::Qcow2Luks, &wrong).unwrap_err().contains("Invalid password"));
    let check =
        qemu_img(&["check", "--object", &secret, "--image-opts", &opts(&parent, StoredLayout::Qcow2Luks)]).unwrap();
    assert!(check.contains("No errors"), "{check}");

    // A child naming the parent: reads through to it, and what it writes wins.
    let child = dir.path().join("child.qcow2");
    create_encrypted_qcow2(&child, 8 << 20, Some(("parent.qcow2", &ImageFormat::Qcow2)), &fs::read(&k).unwrap())
        .unwrap();
    let info = qemu_img(&["info", "--output=json", "-U", child.to_str().unwrap()]).unwrap();
    assert!(
        info.contains("\"backing-filename\": \"parent.qcow2\"")
            && info.contains("\"backing-filename-format\": \"qcow2\""),
        "{info}"
    );
    let chain = format!(
        "driver=qcow2,encrypt.key-secret=k,file.filename={},backing.driver=qcow2,backing.encrypt.key-secret=k,backing.file.filename={}",
        child.display(),
        parent.display()
    );
    ExternalCommand::new("qemu-io")
        .args(["--object", &secret, "--image-opts", &chain, "-c", "write -P 0xab 0 64k"])
        .timeout(std::time::Duration::from_secs(60))
        .run()
        .unwrap();
    let mut expected = pattern(8 << 20);
    expected[..65536].fill(0xab);
    let out = dir.path().join("out.raw");
    qemu_img(&["convert", "--object", &secret, "--image-opts", &chain, "-O", "raw", out.to_str().unwrap()]).unwrap();
    assert_eq!(fs::read(&out).unwrap(), expected);
    assert_eq!(read(&parent, StoredLayout::Qcow2Luks, &k).unwrap(), pattern(8 << 20), "the parent is untouched");
    let check = qemu_img(&["check", "--object", &secret, "--image-opts", &chain]).unwrap();
    assert!(check.contains("No errors"), "{check}");

    // An overlay over a plain raw file (an instant restore's over its export): QEMU follows the
    // header's name and format with the overlay's key alone, and what it writes is encrypted.
    fs::write(dir.path().join("base.raw"), pattern(8 << 20)).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    create_encrypted_qcow2(&overlay, 8 << 20, Some(("base.raw", &ImageFormat::Raw)), &fs::read(&k).unwrap()).unwrap();
    let info = qemu_img(&["info", "--output=json", "-U", overlay.to_str().unwrap()]).unwrap();
    assert!(
        info.contains("\"backing-filename\": \"base.raw\"") && info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    let opened = format!("driver=qcow2,encrypt.key-secret=k,file.filename={}", overlay.display());
    ExternalCommand::new("qemu-io")
        .args(["--object", &secret, "--image-opts", &opened, "-c", "write -P 0xcd 1M 64k"])
        .timeout(std::time::Duration::from_secs(60))
        .run()
        .unwrap();
    let mut expected = pattern(8 << 20);
    expected[1 << 20..(1 << 20) + 65536].fill(0xcd);
    qemu_img(&["convert", "--object", &secret, "--image-opts", &opened, "-O", "raw", out.to_str().unwrap()]).unwrap();
    assert_eq!(fs::read(&out).unwrap(), expected);
    let stored = fs::read(&overlay).unwrap();
    assert!(!stored.chunks(512).any(|c| c.iter().all(|b| *b == 0xcd)), "the overlay's data is encrypted");
    assert_eq!(fs::read(dir.path().join("base.raw")).unwrap(), pattern(8 << 20), "the base is untouched");
    let check = qemu_img(&["check", "--object", &secret, "--image-opts", &opened]).unwrap();
    assert!(check.contains("No errors"), "{check}");
}
