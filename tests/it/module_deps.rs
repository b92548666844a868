//! Dependencies between the gateway's modules point one way (DESIGN "Second round", issue
//! 11): this test reads every `crate::<module>` reference under `src/`, builds the graph
//! of top-level modules, and fails on any import cycle (strongly connected component) and
//! on any import that goes up or sideways in [`LAYERS`]: the flow from socket to broker is
//! `server -> routes -> handshake -> connection -> greeting -> app -> hub -> stream ->
//! broker`, with the session, events and frames below and nothing importing upwards. A
//! new module fails the test until it is given its layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every top-level module of `src/`, bottom layer first. A module may import only modules
/// of lower layers (never its own layer, so two modules of one layer never know each other).
const LAYERS: &[&[&str]] = &[
    // Leaves: no `crate::` imports.
    &[
        "console",
        "json_depth",
        "limits",
        "metrics",
        "project",
        "response",
        "schema",
        "wheel",
        "ws",
    ],
    &["config", "event", "story"],
    // The broker (where events come from, commands go to) and one connection's state:
    // neither knows the other, nor anything above.
    // Authorization (the credential's grants, then the app backend's hook) sits beside
    // them: it knows config and metrics only.
    &["authz", "broker", "cli", "session"],
    // Sequencing: one owner per project.
    &["stream"],
    // Registry and fan-out.
    &["hub"],
    &["exporter"],
    // The instance: built once, passed down from here up.
    &["app"],
    &["greeting", "revocation"],
    &["connection", "heartbeat"],
    &["handshake"],
    &["routes"],
    &["server"],
];

/// The top-level module a file under `src/` belongs to (`hub.rs` → `hub`,
/// `session/outbox.rs` → `session`); None for the crate roots.
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// Every `crate::name` in `text`, comments (`//` to the end of the line) left out.
fn crate_references(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                found.insert(name);
            }
            rest = after;
        }
        // `use crate::{a, b::c}`: the names directly inside the braces.
        if let Some(at) = code.find("crate::{") {
            let inner = &code[at + "crate::{".len()..];
            let inner = inner.split('}').next().unwrap_or("");
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src/");
        let Some(module) = module_of(rel) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let targets = graph.entry(module.clone()).or_default();
        for target in crate_references(&text) {
            if target != module {
                targets.insert(target);
            }
        }
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan), each sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        next: usize,
        found: BTreeSet<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            let graph = self.graph;
            for w in graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.insert(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        next: 0,
        found: BTreeSet::new(),
    };
    let nodes: BTreeSet<&str> = graph
        .iter()
        .flat_map(|(k, v)| std::iter::once(k.as_str()).chain(v.iter().map(String::as_str)))
        .collect();
    for v in nodes {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn the_finder_sees_a_cycle_and_ignores_comments() {
    let refs = crate_references(
        "use crate::hub::Hub;\nuse crate::{app::App, session};\n// crate::server\nlet x = crate::event::now();",
    );
    let want: BTreeSet<String> = ["hub", "app", "session", "event"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    g.entry("c".into()).or_default().insert("d".into());
    let found = cycles(&g);
    assert_eq!(
        found,
        BTreeSet::from([vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]])
    );
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

#[test]
fn no_module_cycle_and_every_import_points_down() {
    let graph = module_graph();
    assert!(
        graph.contains_key("hub") && graph.contains_key("session"),
        "the scan found no modules: {graph:?}"
    );
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "module cycles (dependencies must point one way, DESIGN \"Second round\"): {found:?}"
    );
    let wrong = violations(&graph);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Imports that do not point down the layers, and modules with no layer.
fn violations(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut wrong = Vec::new();
    for (from, targets) in graph {
        let Some(high) = layer_of(from) else {
            wrong.push(format!("{from} is in no layer: add it to LAYERS"));
            continue;
        };
        for to in targets {
            match layer_of(to) {
                Some(low) if low < high => {}
                Some(_) => wrong.push(format!("{from} -> {to} points up or sideways")),
                None => wrong.push(format!("{to} (imported by {from}) is in no layer")),
            }
        }
    }
    wrong
}

#[test]
fn the_layer_check_refuses_upward_sideways_and_unplaced_imports() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            g.entry(from.to_string())
                .or_default()
                .insert(to.to_string());
        }
        g
    };
    assert!(violations(&graph(&[("hub", "stream"), ("stream", "broker")])).is_empty());
    // The edge that made the old seven-module cycle: the broker calling into the hub.
    assert_eq!(violations(&graph(&[("broker", "hub")])).len(), 1);
    assert_eq!(violations(&graph(&[("broker", "session")])).len(), 1);
    assert_eq!(violations(&graph(&[("greeting", "revocation")])).len(), 1);
    assert_eq!(violations(&graph(&[("newthing", "ws")])).len(), 1);
}
