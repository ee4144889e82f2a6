//! Property tests of the spec loader under mutated and random input (the fuzzing the hardening
//! issue asks for, on the stable toolchain): valid specs with bytes changed, YAML tokens
//! inserted, lines dropped or repeated, and random text. Loading must return specs or errors
//! that name the file, never panic, never abort, and never allocate past a bound however the
//! YAML nests or aliases. `PROPTEST_CASES=N` runs more cases.

use std::path::Path;

use diskchain_crd::{load_path, load_str};
use diskchain_tests::alloc::{self, Largest};
use proptest::prelude::*;

#[global_allocator]
static GLOBAL: Largest = Largest;

/// No single allocation while loading a spec file of at most 1 MiB may exceed this.
const CAP: usize = 64 << 20;

const VALID: &str = "\
apiVersion: diskchain.dev/v1alpha1
kind: DiskChain
metadata:
  name: web01-vda
spec:
  source:
    file: /var/lib/images/web01.qcow2
  snapshots:
    - name: golden
      file: /var/lib/images/golden.qcow2
    - name: nightly
  placement:
    directory: /srv/fast
  prune: false
---
apiVersion: diskchain.dev/v1alpha1
kind: DiskChain
metadata:
  name: kvm01-vda
spec:
  source:
    libvirt:
      domain: kvm01
      target: vda
  snapshots:
    - name: before-upgrade
  converge:
    budget: 10m
    then: abort
";

const TOKENS: [&str; 24] = [
    "&a ",
    "*a",
    "<<: *a",
    "[",
    "]",
    "{",
    "}",
    ": ",
    "- ",
    "---\n",
    "...\n",
    "!!binary ",
    "!tag ",
    "? ",
    "|\n",
    ">-\n",
    "\"",
    "'",
    "#",
    "\t",
    "\u{feff}",
    "~",
    "0x",
    "\\u0000",
];

fn check(file: &Path, text: &str) {
    alloc::reset();
    if let Err(errors) = load_str(file, text) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            assert_eq!(e.file, file, "an error names its file: {e}");
        }
    }
    let largest = alloc::largest();
    assert!(largest <= CAP, "loading allocated {largest} bytes at once");
}

#[derive(Clone, Debug)]
enum Edit {
    Byte(usize, u8),
    Insert(usize, usize),
    DropLine(usize),
    RepeatLine(usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<(usize, u8)>().prop_map(|(a, b)| Edit::Byte(a, b)),
        any::<(usize, usize)>().prop_map(|(a, b)| Edit::Insert(a, b)),
        any::<usize>().prop_map(Edit::DropLine),
        any::<(usize, u8)>().prop_map(|(a, b)| Edit::RepeatLine(a, b)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for e in edits {
        match *e {
            Edit::Byte(at, b) if !bytes.is_empty() => {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            Edit::Insert(at, t) => {
                let at = at % (bytes.len() + 1);
                let tok = TOKENS[t % TOKENS.len()].as_bytes();
                bytes.splice(at..at, tok.iter().copied());
            }
            Edit::DropLine(l) | Edit::RepeatLine(l, _) => {
                let s = String::from_utf8_lossy(&bytes).into_owned();
                let mut lines: Vec<&str> = s.lines().collect();
                if lines.is_empty() {
                    continue;
                }
                let i = l % lines.len();
                if let Edit::RepeatLine(_, n) = *e {
                    let line = lines[i];
                    for _ in 0..(n % 8) {
                        lines.insert(i, line);
                    }
                } else {
                    lines.remove(i);
                }
                bytes = lines.join("\n").into_bytes();
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_specs_never_panic(edits in proptest::collection::vec(edit(), 1..10)) {
        check(Path::new("/specs/mutated.yaml"), &apply(VALID, &edits));
    }

    #[test]
    fn random_text_never_panics(text in "[ -~\n\t:\\-\\[\\]{}&*!|>#]{0,400}") {
        check(Path::new("/specs/random.yaml"), &text);
    }

    #[test]
    fn mutated_files_load_through_a_directory(edits in proptest::collection::vec(edit(), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), apply(VALID, &edits)).unwrap();
        if let Err(errors) = load_path(dir.path()) {
            for e in &errors.0 {
                prop_assert!(e.file.starts_with(dir.path()), "{}", e);
            }
        }
    }
}

/// Nesting and aliases that blow up naive parsers, each near the 1 MiB file limit.
#[test]
fn deep_nesting_and_alias_bombs_are_refused_within_bounds() {
    let deep = "[".repeat(1 << 19);
    check(Path::new("/specs/deep.yaml"), &deep);
    let deep_map = "a:\n".to_string()
        + &(1..4000)
            .map(|i| format!("{}b:\n", " ".repeat(i)))
            .collect::<String>();
    check(Path::new("/specs/deep-map.yaml"), &deep_map);
    let mut laughs = String::from("a: &a [x,x,x,x,x,x,x,x,x,x]\n");
    for i in 1..20 {
        let prev = if i == 1 {
            "a".to_string()
        } else {
            format!("l{}", i - 1)
        };
        laughs.push_str(&format!(
            "l{i}: &l{i} [{}]\n",
            vec![format!("*{prev}"); 10].join(",")
        ));
    }
    check(Path::new("/specs/laughs.yaml"), &laughs);
    assert!(load_str(Path::new("/specs/laughs.yaml"), &laughs).is_err());
}
