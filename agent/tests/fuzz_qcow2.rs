//! Property tests of the qcow2 reader under mutated and random input (the fuzzing the hardening
//! issue asks for, on the stable toolchain): real images made with qemu-img (v2, v3, backing
//! files, internal snapshots, persistent bitmaps, several cluster sizes) have random bytes of
//! their header, tables and extensions changed, or are cut short; every reader entry point must
//! return `Ok` or `Err`, never panic, never abort, and never allocate more than the caps QEMU
//! has (32 MiB of L1, a 2 MiB L2 table, 64 MiB of bitmap directory).
//!
//! `PROPTEST_CASES=N` runs more cases (CI runs the default, a few seconds).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use diskchain::observe::qcow2::{read_allocation, read_extras, read_header, read_refs};
use diskchain_tests::alloc::{self, Largest};
use proptest::prelude::*;

/// Records the largest single allocation.
#[global_allocator]
static GLOBAL: Largest = Largest;

/// The largest allocation a reader may make: the 64 MiB bitmap directory cap, plus slack.
const CAP: usize = (64 << 20) + (1 << 20);

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(path: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(path)
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
}

/// Seed images, made once per test binary.
fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| -> PathBuf { dir.path().join(n) };
        let s = |p: &PathBuf| p.to_str().unwrap().to_string();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &s(&p("v2.qcow2")),
            "8M",
        ]);
        qemu_io(&p("v2.qcow2"), "write -P 1 0 1M");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            &s(&p("small.qcow2")),
            "4M",
        ]);
        qemu_io(&p("small.qcow2"), "write -P 2 4k 64k");
        qemu_io(&p("small.qcow2"), "write -z 128k 8k");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &s(&p("v2.qcow2")),
            "-F",
            "qcow2",
            &s(&p("over.qcow2")),
        ]);
        qemu_io(&p("over.qcow2"), "write -P 3 512k 256k");
        qemu_img(&["snapshot", "-c", "snap1", &s(&p("over.qcow2"))]);
        qemu_img(&["bitmap", "--add", &s(&p("over.qcow2")), "b0"]);
        qemu_io(&p("over.qcow2"), "write -c -P 4 2M 64k");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            &s(&p("big.qcow2")),
            "64M",
        ]);
        qemu_io(&p("big.qcow2"), "write -P 5 0 3M");
        ["v2.qcow2", "small.qcow2", "over.qcow2", "big.qcow2"]
            .iter()
            .map(|n| std::fs::read(p(n)).expect("read seed"))
            .collect()
    })
}

/// Runs every reader on `bytes` written to a file; panics propagate to proptest.
fn read_all(bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.qcow2");
    std::fs::write(&path, bytes).expect("write");
    let file = std::fs::File::open(&path).expect("open");
    alloc::reset();
    let _ = read_refs(&file, &path);
    if let Ok(h) = read_header(&file, &path) {
        let _ = read_extras(&file, &path, &h);
        let _ = read_allocation(&file, &path, &h);
    }
    let largest = alloc::largest();
    assert!(largest <= CAP, "a reader allocated {largest} bytes at once");
}

/// A mutation: (offset, value) pairs, offsets drawn mostly from the header and first clusters.
fn mutation() -> impl Strategy<Value = (usize, Vec<(u32, u8)>, Option<u32>)> {
    let offset = prop_oneof![
        6 => 0u32..512,
        3 => 0u32..(256 << 10),
        1 => any::<u32>(),
    ];
    (
        0usize..4,
        proptest::collection::vec((offset, any::<u8>()), 1..12),
        proptest::option::weighted(0.1, any::<u32>()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic_or_allocate_past_the_caps((seed, changes, cut) in mutation()) {
        let mut bytes = seeds()[seed].clone();
        for (off, v) in changes {
            let off = off as usize % bytes.len();
            bytes[off] = v;
        }
        if let Some(c) = cut {
            bytes.truncate(c as usize % bytes.len());
        }
        read_all(&bytes);
    }

    #[test]
    fn header_fields_set_to_extremes_never_panic(seed in 0usize..4, field in 0usize..18, extreme in 0usize..6) {
        // Big-endian header fields (offset, width), QEMU's layout.
        const FIELDS: [(usize, usize); 18] = [
            (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
            (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
        ];
        let mut bytes = seeds()[seed].clone();
        let (off, width) = FIELDS[field];
        let v: u64 = [0, 1, u64::MAX, 1 << 31, 1 << 62, 0x7fff_ffff_ffff_fe00][extreme];
        let be = v.to_be_bytes();
        bytes[off..off + width].copy_from_slice(&be[8 - width..]);
        read_all(&bytes);
    }

    #[test]
    fn random_bytes_after_the_magic_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut bytes = b"QFI\xfb".to_vec();
        bytes.extend(tail);
        read_all(&bytes);
    }
}

/// A header extension whose length reaches far past the header (into a large sparse file) is
/// refused as QEMU refuses it, never read into memory.
#[test]
fn an_extension_longer_than_the_header_is_refused_unread() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "/dev/null",
        "-u",
        path.to_str().unwrap(),
        "1G",
    ]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut h = [0u8; 112];
    f.read_exact_at(&mut h, 0).unwrap();
    let header_length = u32::from_be_bytes(h[100..104].try_into().unwrap()) as u64;
    // The first extension (the backing format) claims 3.5 GiB; the file is made that long.
    f.write_all_at(&0xE000_0000u32.to_be_bytes(), header_length + 4)
        .unwrap();
    f.set_len(4 << 30).unwrap();
    alloc::reset();
    assert!(read_header(&f, &path).is_err());
    assert!(read_refs(&f, &path).is_err());
    let largest = alloc::largest();
    assert!(largest <= CAP, "a reader allocated {largest} bytes at once");
}
