//! The module graph of ehm-core has no circles: a top-level module (or any file under it) never
//! names, outside its tests, a module that reaches back to it. Read from the sources, so a new
//! upward import fails here, not in a reviewer's head (the layers are listed in lib.rs).
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file before its `#[cfg(test)]` module (tests may reach anywhere).
fn non_test_code(s: &str) -> &str {
    s.find("#[cfg(test)]\nmod tests").map_or(s, |i| &s[..i])
}

/// Module → the top-level modules it names as `crate::NAME`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let mods: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    assert!(mods.len() > 10, "lib.rs lists its modules: {mods:?}");
    let mut graph = BTreeMap::new();
    for m in &mods {
        let mut files = Vec::new();
        let file = src.join(format!("{m}.rs"));
        if file.exists() {
            files.push(file);
        }
        if src.join(m).is_dir() {
            rust_files(&src.join(m), &mut files);
        }
        let mut deps = BTreeSet::new();
        for f in files {
            let s = std::fs::read_to_string(&f).unwrap();
            for (i, _) in non_test_code(&s).match_indices("crate::") {
                let name: String = s[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if mods.contains(&name) && &name != m {
                    deps.insert(name);
                }
            }
        }
        graph.insert(m.clone(), deps);
    }
    graph
}

#[test]
fn no_module_reaches_back_up() {
    let g = module_graph();
    // `a` reaches `b` through the graph?
    let reaches = |a: &str, b: &str| {
        let mut stack = vec![a.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(n) = stack.pop() {
            for d in &g[&n] {
                if d == b {
                    return true;
                }
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        false
    };
    let circles: Vec<(String, String)> = g
        .iter()
        .flat_map(|(a, ds)| ds.iter().map(move |b| (a.clone(), b.clone())))
        .filter(|(a, b)| reaches(b, a))
        .collect();
    assert!(circles.is_empty(), "import circles: {circles:?}");
    // the arrows lib.rs draws, checked where they matter most
    assert!(g["contract"].contains("onnx") && !g["contract"].contains("export"));
    assert!(!g["infer"].contains("export"));
    assert!(!g["masking"].contains("config"));
}

#[test]
fn the_library_knows_nothing_of_the_command_line() {
    // clap is for the tools: in the library it appears only behind the `cli` feature (so
    // `cargo check -p ehm-core --lib --no-default-features` builds without it)
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut bare = Vec::new();
    for f in &files {
        let s = std::fs::read_to_string(f).unwrap();
        for (i, l) in non_test_code(&s).lines().enumerate() {
            if l.contains("clap")
                && !l.contains("cfg_attr(feature = \"cli\"")
                && !l.trim_start().starts_with("//")
            {
                bare.push(format!("{}:{}: {}", f.display(), i + 1, l.trim()));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "clap outside the cli feature:\n{}",
        bare.join("\n")
    );
}
