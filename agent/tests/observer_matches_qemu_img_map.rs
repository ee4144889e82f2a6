//! The observer's allocation maps against `qemu-img map --output=json` (each layer opened alone,
//! `"backing": null`) on many randomly written images: qcow2 v2 and v3, several cluster sizes,
//! data, explicit zeros, compressed clusters, discards, overlays, and raw files with holes.

use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain::observe::{ObserveError, Roots, observe_chain};
use diskchain_planner::ClusterState;
use diskchain_tests::qemu::{cluster_states, create, cycle, hold_open, io, run};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random qemu-io commands writing whole clusters of `cluster` bytes in an image of `clusters`.
fn random_writes(
    rng: &mut StdRng,
    cluster: u64,
    clusters: u64,
    allow_zero: bool,
    allow_compress: bool,
) -> Vec<String> {
    let mut cmds = Vec::new();
    // Compressed writes cannot overwrite an allocated cluster: do them first, on distinct ones.
    if allow_compress {
        let mut used = Vec::new();
        for _ in 0..rng.random_range(0..3) {
            let c = rng.random_range(0..clusters);
            if !used.contains(&c) {
                used.push(c);
                cmds.push(format!(
                    "write -c -P {} {} {cluster}",
                    rng.random_range(1..255),
                    c * cluster
                ));
            }
        }
    }
    for _ in 0..rng.random_range(1..12) {
        let start = rng.random_range(0..clusters);
        let len = rng.random_range(1..=(clusters - start).min(6));
        let (off, bytes) = (start * cluster, len * cluster);
        let pattern = rng.random_range(1..255);
        match rng.random_range(0..10) {
            0..=4 => cmds.push(format!("write -P {pattern} {off} {bytes}")),
            5 | 6 if allow_zero => cmds.push(format!("write -z {off} {bytes}")),
            7 if allow_zero => cmds.push(format!("write -z -u {off} {bytes}")),
            9 => cmds.push(format!("discard {off} {bytes}")),
            // Writes smaller than a cluster allocate the whole cluster.
            _ => cmds.push(format!("write -P {pattern} {} 512", off + 512)),
        }
    }
    cmds
}

fn assert_layer_matches(
    path: &Path,
    format: &str,
    unit: u64,
    observed: &diskchain_planner::Allocation,
    what: &str,
) {
    assert_eq!(observed.unit, unit, "{what}: unit");
    let truth = cluster_states(path, format, unit);
    let n = observed.virtual_size.div_ceil(unit) as usize;
    assert_eq!(truth.len(), n, "{what}: cluster count");
    for (c, t) in truth.iter().enumerate() {
        let expected = match t {
            1 => ClusterState::Data,
            2 => ClusterState::Zero,
            _ => ClusterState::Unallocated,
        };
        assert_eq!(
            observed.state(c as u64),
            expected,
            "{what}: {} cluster {c}",
            path.display()
        );
    }
}

#[test]
fn allocation_maps_equal_qemu_img_map_on_random_images() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(&[dir.path().to_path_buf()]).unwrap();
    let mut rng = StdRng::seed_from_u64(0xd15c_c4a1);
    let mut checked = 0;
    let mut kinds = [0usize; 3];
    for case in 0..40 {
        let cluster: u64 = [4096, 65536, 65536, 131072, 2 << 20][rng.random_range(0..5)];
        let v2 = rng.random_bool(0.25);
        let clusters = rng.random_range(4..80);
        let size = clusters * cluster - if rng.random_bool(0.3) { 512 } else { 0 };
        let compat = if v2 { "0.10" } else { "1.1" };
        let opts = format!("cluster_size={cluster},compat={compat}");
        let depth = rng.random_range(1..4);
        let mut prev: Option<PathBuf> = None;
        for layer in 0..depth {
            let p = dir.path().join(format!("c{case}-l{layer}.qcow2"));
            create(
                &p,
                size,
                prev.as_deref().map(|b| (b, "qcow2")),
                &["-o", &opts],
            );
            let cmds = random_writes(&mut rng, cluster, size.div_ceil(cluster) - 1, true, true);
            io(&p, "qcow2", &cmds);
            prev = Some(p);
        }
        let top = prev.unwrap();
        let chain = observe_chain(&roots, &top).unwrap();
        assert_eq!(chain.layers.len(), depth);
        for l in &chain.layers {
            assert_eq!(l.version, if v2 { 2 } else { 3 });
            let alloc = l.layer.alloc.as_ref().unwrap();
            kinds[0] += alloc.data.len() as usize;
            kinds[1] += alloc.zero.len() as usize;
            assert_layer_matches(
                &l.layer.path,
                "qcow2",
                cluster,
                alloc,
                &format!("case {case}"),
            );
            checked += 1;
        }
    }
    // Compressed clusters are data: count them through qemu-img map's own flag on one image.
    let c = dir.path().join("compressed.qcow2");
    create(&c, 1 << 20, None, &[]);
    io(
        &c,
        "qcow2",
        &[
            "write -c -P 7 0 64k".into(),
            "write -c -P 8 128k 64k".into(),
            "write -z 256k 64k".into(),
        ],
    );
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&c));
    assert!(
        out.contains("\"compressed\": true"),
        "qemu-img marks the clusters compressed: {out}"
    );
    let chain = observe_chain(&roots, &c).unwrap();
    let alloc = chain.layers[0].layer.alloc.as_ref().unwrap();
    assert_eq!(alloc.data.iter().collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(alloc.zero.iter().collect::<Vec<_>>(), vec![4]);
    kinds[2] += 2;
    assert!(checked >= 60, "checked {checked} layers");
    assert!(
        kinds[0] > 100 && kinds[1] > 20,
        "the random images hold data and zeros: {kinds:?}"
    );
}

#[test]
fn raw_layers_map_data_and_holes_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(&[dir.path().to_path_buf()]).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for case in 0..8 {
        let raw = dir.path().join(format!("base{case}.raw"));
        let size: u64 = rng.random_range(8..64) * 65536;
        std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
        let cmds = random_writes(&mut rng, 65536, size / 65536 - 1, false, false)
            .into_iter()
            .filter(|c| c.starts_with("write"))
            .collect::<Vec<_>>();
        io(&raw, "raw", &cmds);
        let top = dir.path().join(format!("top{case}.qcow2"));
        create(&top, 0, Some((&raw, "raw")), &[]);
        let chain = observe_chain(&roots, &top).unwrap();
        assert_eq!(chain.layers.len(), 2);
        let base = &chain.layers[0];
        assert_eq!(base.layer.format, diskchain_planner::Format::Raw);
        assert_layer_matches(
            &raw,
            "raw",
            65536,
            base.layer.alloc.as_ref().unwrap(),
            "raw",
        );
    }
}

#[test]
fn a_backing_reference_without_a_format_is_refused_not_probed() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(&[dir.path().to_path_buf()]).unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, 1 << 20, None, &[]);
    create(&top, 0, Some((&base, "qcow2")), &[]);
    // Images made by old QEMU versions record no backing format; QEMU 10 refuses to make one,
    // so turn the backing-format header extension into an unknown (ignored) one.
    let mut bytes = std::fs::read(&top).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("format extension");
    bytes[at..at + 4].copy_from_slice(&[0x00, 0x00, 0x00, 0x77]);
    std::fs::write(&top, bytes).unwrap();
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&top));
    assert!(!info.contains("backing-filename-format"), "{info}");
    let e = observe_chain(&roots, &top).unwrap_err();
    assert!(matches!(e, ObserveError::NoBackingFormat { .. }), "{e}");
    assert!(
        e.to_string().contains("-F"),
        "the error says how to fix it: {e}"
    );
}

#[test]
fn a_backing_reference_leaving_the_roots_is_refused_even_through_a_symlink() {
    let inside = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let roots = Roots::new(&[inside.path().to_path_buf()]).unwrap();
    let base = outside.path().join("base.qcow2");
    create(&base, 1 << 20, None, &[]);
    let link = inside.path().join("base-link.qcow2");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    let top = inside.path().join("top.qcow2");
    create(&top, 0, Some((&link, "qcow2")), &[]);
    let e = observe_chain(&roots, &top).unwrap_err();
    assert!(matches!(e, ObserveError::OutsideRoots { .. }), "{e}");
}

#[test]
fn a_backing_cycle_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(&[dir.path().to_path_buf()]).unwrap();
    let (_, b) = cycle(dir.path());
    let e = observe_chain(&roots, &b).unwrap_err();
    assert!(matches!(e, ObserveError::Cycle { .. }), "{e}");
}

#[test]
fn extended_l2_and_external_data_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(&[dir.path().to_path_buf()]).unwrap();
    let x = dir.path().join("ext.qcow2");
    create(&x, 1 << 20, None, &["-o", "extended_l2=on"]);
    let e = observe_chain(&roots, &x).unwrap_err();
    assert!(e.to_string().contains("extended L2"), "{e}");
    let d = dir.path().join("data.qcow2");
    let data = dir.path().join("data.raw");
    create(
        &d,
        1 << 20,
        None,
        &["-o", &format!("data_file={}", data.display())],
    );
    let e = observe_chain(&roots, &d).unwrap_err();
    assert!(e.to_string().contains("external data file"), "{e}");
}

#[test]
fn an_image_held_open_by_qemu_is_reported_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(&[dir.path().to_path_buf()]).unwrap();
    let img = dir.path().join("busy.qcow2");
    create(&img, 1 << 20, None, &[]);
    let free = observe_chain(&roots, &img).unwrap();
    assert!(free.layers[0].in_use.is_none());
    // qemu-storage-daemon holds the image (and QEMU's lock) like a running VM would.
    let held = hold_open(&img, dir.path());
    let busy = observe_chain(&roots, &img).unwrap().layers[0]
        .in_use
        .clone();
    drop(held);
    assert!(
        busy.is_some(),
        "the lock held by qemu-storage-daemon was not seen"
    );
    let after = observe_chain(&roots, &img).unwrap();
    assert!(
        after.layers[0].in_use.is_none(),
        "the lock is gone with the daemon"
    );
}
