//! The repo's shell scripts, read as text. Every one of them runs under
//! `set -o pipefail`, where a pipe into a reader that may stop before its
//! writer does (`head`, `grep -q`) fails the whole script: the writer dies
//! of SIGPIPE, exit 141, whenever it is still writing when the reader quits.
//! That depends on timing, so it passes on one machine and fails CI on the
//! next. The scripts read what they need into a variable instead.

use std::path::{Path, PathBuf};

/// `.ci/run` and every `*.sh` in the repo, outside `target/` and dot folders.
fn scripts(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    walk(&path, found);
                }
            } else if name.ends_with(".sh") {
                found.push(path);
            }
        }
    }
    let mut found = vec![root.join(".ci/run")];
    walk(root, &mut found);
    found.sort();
    found
}

/// Readers that may exit before their input ends.
const EARLY_READERS: &[&str] = &["head", "grep -q", "grep -m", "grep --quiet"];

fn early_pipes(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.split(" #").next().unwrap_or(line);
        if code.trim_start().starts_with('#') {
            continue;
        }
        for segment in code.split('|').skip(1) {
            let reader = segment.trim_start();
            if EARLY_READERS
                .iter()
                .any(|early| reader == *early || reader.starts_with(&format!("{early} ")))
            {
                found.push(format!("line {}: {}", number + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn no_script_pipes_into_a_reader_that_stops_early() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scripts = scripts(root);
    assert!(scripts.len() >= 5, "found only {scripts:?}");
    let mut offences = Vec::new();
    for script in &scripts {
        let shown = script.strip_prefix(root).unwrap_or(script).display();
        let text = std::fs::read_to_string(script).unwrap_or_else(|e| panic!("{shown}: {e}"));
        assert!(text.contains("pipefail"), "{shown} does not set pipefail");
        for offence in early_pipes(&text) {
            offences.push(format!("{shown} {offence}"));
        }
    }
    assert!(
        offences.is_empty(),
        "pipes that can fail with SIGPIPE under pipefail:\n{}",
        offences.join("\n")
    );
}

#[test]
fn the_check_finds_the_pipes_it_names() {
    assert_eq!(early_pipes("traefik version | head -1").len(), 1);
    assert_eq!(early_pipes("x | grep -q ok || y").len(), 1);
    assert!(early_pipes("x || y").is_empty());
    assert!(early_pipes("# a | head in a comment").is_empty());
    assert!(early_pipes("x | sed -n 1p").is_empty());
}
