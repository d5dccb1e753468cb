//! `cargo xtask layers`: the engine's layering, checked. In every crate of the workspace no
//! top-level module may reach another in a circle; in the layered crates ([`LAYERED`], the one
//! place the maps live: `nasbak` and `nasbak-repo`) each module may use only its own layer and
//! the layers below it, and the modules of a layer kept apart ([`APART`]: the engine's
//! workflows, the repository's mount and store) never use each other: what two of them share
//! moves down a layer.
//!
//! A module's uses are the `crate::MODULE` paths in its files (imports, paths in code, doc
//! links): what names a module is a dependency on it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A crate's layers, bottom-up: each a name and its top-level modules.
pub type LayerMap = &'static [(&'static str, &'static [&'static str])];

/// The layers of the `nasbak` crate, bottom-up: a module may use its own layer and those below.
/// `lib.rs` and the crate's own tests (`mocked.rs`, `test_support.rs`) stand above them all.
pub const NASBAK_LAYERS: &[(&str, &[&str])] = &[
    // The requests and outcomes of every workflow, the errors, progress, clock and fault points
    // they speak, and a disk's identity. (The VM lease is in `nasbak_repo::store`.)
    ("types", &["error", "progress", "clock", "fault", "request", "outcome", "disks"]),
    // The engine's side of the repository's store (`nasbak_repo::store`): what needs the
    // hypervisor's or qemu-img's view of a backup.
    ("store", &["store"]),
    // Bytes and processes: conversions and checked copies, read-only exports and overlays, the
    // thaw watchdog; what is inside a disk (LVM's metadata, read as it is stored); a VM's state
    // beyond its disks (NVRAM, TPM state); an S3 bucket's objects (feature `s3`).
    (
        "images",
        &[
            "transfer", "export", "protect", "watchdog", "lvm", "devmap", "staging", "pull", "vmstate", "objstore",
            "objview",
        ],
    ),
    // Chain decisions and merges, over the store; which backups a retention keeps.
    ("chains", &["chain", "incremental", "merge", "rbd", "retention"]),
    // The facades the workflows add their methods to (`Engine`, `Catalog`).
    ("facade", &["engine"]),
    // The workflows: none uses another.
    ("workflows", &["backup", "restore", "boot", "browse", "catalog", "prune", "keys", "offsite"]),
];

/// The layers of `nasbak-repo`, bottom-up: the pure model never does I/O; mounting and the
/// store (backups, chains, records, the VM lease) are I/O over it, beside each other.
pub const REPO_LAYERS: &[(&str, &[&str])] = &[
    ("model", &["model"]),
    ("io", &["mount", "store"]),
    // The checks `fuzz/` drives, over the model.
    ("checks", &["fuzz_checks"]),
];

/// The crates held to a layer map, by their directory under `crates/`.
pub const LAYERED: &[(&str, LayerMap)] = &[("nasbak", NASBAK_LAYERS), ("repo", REPO_LAYERS)];

/// The layers whose modules never use each other.
const APART: &[&str] = &["workflows", "io"];
const ABOVE_ALL: &[&str] = &["lib", "mocked", "test_support"];
/// Test-only helpers (`#[cfg(test)]`) any module's tests may use.
const TEST_HELPERS: &[&str] = &["test_support"];

/// The top-level modules of the crate whose sources are in `src`, each with the set of the
/// crate's other top-level modules it names.
fn module_uses(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if path.is_dir() {
            modules.entry(name).or_default().extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = if name == "main" { "lib".to_owned() } else { name };
            modules.entry(name).or_default().push(path);
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut uses = BTreeMap::new();
    for (module, files) in &modules {
        let mut used = BTreeSet::new();
        for file in files {
            let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            for (i, _) in text.match_indices("crate::") {
                // `crate::` inside a longer name (`nasbak_crate::`) is not this crate.
                if text[..i].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let rest = &text[i + "crate::".len()..];
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if names.contains(&name) && name != *module {
                    used.insert(name);
                }
            }
        }
        uses.insert(module.clone(), used);
    }
    Ok(uses)
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(files)
}

/// A circle among the modules, as `a -> b -> ... -> a`, if there is one.
fn circle(uses: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    fn visit(
        m: &str,
        uses: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<String> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut c = path[at..].to_vec();
            c.push(m.to_owned());
            return Some(c.join(" -> "));
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for next in uses.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, uses, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    uses.keys().find_map(|m| visit(m, uses, &mut Vec::new(), &mut done))
}

/// The uses that break the layer map: up a layer, across workflows, or of a module the map does
/// not place.
fn layer_violations(uses: &BTreeMap<String, BTreeSet<String>>, layers: &[(&str, &[&str])]) -> Vec<String> {
    let layer_of = |m: &str| layers.iter().position(|(_, ms)| ms.contains(&m));
    let mut problems = Vec::new();
    for (module, used) in uses {
        if ABOVE_ALL.contains(&module.as_str()) {
            continue;
        }
        let Some(own) = layer_of(module) else {
            problems.push(format!("module {module} is in no layer: place it in LAYERED (crates/xtask/src/layers.rs)"));
            continue;
        };
        for u in used.iter().filter(|u| !TEST_HELPERS.contains(&u.as_str())) {
            match layer_of(u) {
                None if ABOVE_ALL.contains(&u.as_str()) => {
                    problems.push(format!("{module} uses {u}, which stands above every layer"));
                }
                None => {}
                Some(l) if l > own => problems.push(format!(
                    "{module} ({}) uses {u} ({}), a layer above it: move what they share down",
                    layers[own].0, layers[l].0
                )),
                Some(l) if l == own && APART.contains(&layers[own].0) && u != module => problems.push(format!(
                    "{module} uses {u}, and the modules of layer {} never use each other; move what they share down",
                    layers[own].0
                )),
                Some(_) => {}
            }
        }
    }
    problems
}

/// `cargo xtask layers`: every crate without a module circle, `nasbak` within its layers.
pub fn check() -> Result<()> {
    let root = crate::exec::workspace_root();
    let mut problems = Vec::new();
    let mut crates: Vec<PathBuf> = fs::read_dir(root.join("crates"))?.flatten().map(|e| e.path().join("src")).collect();
    crates.sort();
    for src in crates.iter().filter(|s| s.is_dir()) {
        let uses = module_uses(src)?;
        if let Some(c) = circle(&uses) {
            problems.push(format!("{}: the modules use each other in a circle: {c}", src.display()));
        }
        for (name, layers) in LAYERED {
            if src.ends_with(format!("crates/{name}/src")) {
                problems.extend(layer_violations(&uses, layers).into_iter().map(|p| format!("{name}: {p}")));
            }
        }
    }
    if !problems.is_empty() {
        bail!("the layering is broken:\n  {}", problems.join("\n  "));
    }
    println!("layers: no module circle in {} crates; the layered crates keep their layers", crates.len());
    for (name, layers) in LAYERED {
        println!("  {name}");
        for (layer, modules) in layers.iter().rev() {
            println!("    {layer:<10} {}", modules.join(" "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        edges.iter().map(|(m, us)| (m.to_string(), us.iter().map(|u| u.to_string()).collect())).collect()
    }

    #[test]
    fn circles_and_layer_breaks_are_found() {
        let ok = graph(&[("backup", &["store", "error"]), ("store", &["error"]), ("error", &[])]);
        assert_eq!(circle(&ok), None);
        let round = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        assert_eq!(circle(&round).as_deref(), Some("a -> b -> c -> a"));
        let layers: &[(&str, &[&str])] =
            &[("types", &["error"]), ("store", &["store"]), ("workflows", &["backup", "restore"])];
        assert!(layer_violations(&ok, layers).is_empty());
        let up = graph(&[("store", &["backup"])]);
        assert!(layer_violations(&up, layers)[0].contains("a layer above"));
        let across = graph(&[("backup", &["restore"])]);
        assert!(layer_violations(&across, layers)[0].contains("never use each other"));
        let unplaced = graph(&[("newthing", &[])]);
        assert!(layer_violations(&unplaced, layers)[0].contains("in no layer"));
    }

    #[test]
    fn a_module_file_names_what_it_uses() {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        fs::create_dir_all(dir.join("restore")).unwrap();
        fs::write(dir.join("lib.rs"), "mod backup; mod restore;").unwrap();
        fs::write(dir.join("backup.rs"), "use crate::restore::x; // nasbak_crate::backup is not this crate").unwrap();
        fs::write(dir.join("restore/mod.rs"), "fn f() { crate::backup::g() }").unwrap();
        let uses = module_uses(&dir).unwrap();
        assert_eq!(uses["backup"], BTreeSet::from(["restore".to_owned()]));
        assert_eq!(circle(&uses).as_deref(), Some("backup -> restore -> backup"));
        let _ = fs::remove_dir_all(&dir);
    }
}
