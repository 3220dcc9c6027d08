//! Checks of the client's layering, run as tests: its top-level modules
//! import each other without a circle, the protocol core uses no tokio type
//! (it returns events; the I/O task owns the channels), and no file of the
//! core outgrows what one reader can hold.

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    use crate::workspace_root;

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read a source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The top-level module a file of `src` belongs to (`machine` for
    /// `machine/recovery.rs`), `None` for the crate root.
    fn module_of(src: &Path, file: &Path) -> Option<String> {
        let relative = file.strip_prefix(src).expect("a file under src");
        let first = relative.components().next()?.as_os_str().to_str()?;
        let name = first.trim_end_matches(".rs");
        (name != "lib").then(|| name.to_owned())
    }

    /// Whether `file` is in a `tests/` directory of unit tests.
    fn is_test_file(file: &Path) -> bool {
        file.components().any(|c| c.as_os_str() == "tests")
    }

    /// `crate::name` paths in code (doc comments and comments are not imports).
    fn imported_modules(text: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                    found.insert(name);
                }
            }
        }
        found
    }

    fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
        let src = workspace_root().join("amqp-client/src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let Some(module) = module_of(&src, &file) else {
                continue;
            };
            // A module's unit tests may drive it from above (the machine's
            // tests route its events the way the I/O task does).
            if is_test_file(&file) {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("read a source file");
            let imports = imported_modules(&text);
            let entry = graph.entry(module.clone()).or_default();
            entry.extend(imports.into_iter().filter(|m| *m != module));
        }
        graph
    }

    /// A circle in `graph`, if there is one.
    fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
        fn visit(
            node: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|n| n == node) {
                let mut circle = path[at..].to_vec();
                circle.push(node.to_owned());
                return Some(circle);
            }
            if !done.insert(node.to_owned()) {
                return None;
            }
            path.push(node.to_owned());
            for next in graph.get(node).into_iter().flatten() {
                if let Some(circle) = visit(next, graph, path, done) {
                    return Some(circle);
                }
            }
            path.pop();
            None
        }
        let mut done = BTreeSet::new();
        graph
            .keys()
            .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
    }

    #[test]
    fn the_client_modules_import_each_other_without_a_circle() {
        let graph = import_graph();
        assert!(graph.contains_key("machine") && graph.contains_key("connection"));
        if let Some(circle) = find_circle(&graph) {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }

    #[test]
    fn a_circle_is_found_where_there_is_one() {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        graph.entry("a".into()).or_default().insert("b".into());
        graph.entry("b".into()).or_default().insert("c".into());
        assert_eq!(find_circle(&graph), None);
        graph.entry("c".into()).or_default().insert("a".into());
        assert_eq!(
            find_circle(&graph).map(|c| c.len()),
            Some(4),
            "a -> b -> c -> a"
        );
    }

    #[test]
    fn imports_are_read_from_code_not_from_doc_links() {
        let text = "use crate::machine::Command;\n/// see [`X`](crate::connection::X)\nlet x = crate::link::Inner::new(); // crate::io\n";
        let found: Vec<String> = imported_modules(text).into_iter().collect();
        assert_eq!(found, ["link", "machine"]);
    }

    #[test]
    fn no_file_of_the_protocol_core_is_over_600_lines() {
        let core = workspace_root().join("amqp-client/src/machine");
        let mut files = Vec::new();
        rust_files(&core, &mut files);
        assert!(files.len() > 5, "the core is split into files");
        for file in files {
            let lines = std::fs::read_to_string(&file)
                .expect("read a core file")
                .lines()
                .count();
            assert!(lines <= 600, "{} has {lines} lines", file.display());
        }
    }

    #[test]
    fn the_protocol_core_uses_no_tokio_type() {
        let core = workspace_root().join("amqp-client/src/machine");
        let mut files = Vec::new();
        rust_files(&core, &mut files);
        for file in files {
            // Its tests drive it the way the I/O task does, with tokio's ends.
            if is_test_file(&file) {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("read a core file");
            let code = text
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .any(|line| line.contains("tokio"));
            assert!(!code, "{} uses tokio", file.display());
        }
    }
}
