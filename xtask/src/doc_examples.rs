//! A check, run as a test, that every public type written by hand in
//! `amqp-client/src` has a doc example (issue 15: "every public type has an
//! example").
//!
//! Its scope, and what it does not see:
//! - Public means reachable from outside the crate: defined in a module that
//!   `lib.rs` declares `pub mod` (and so on down, e.g. `protocol/frame.rs`),
//!   or named by a `pub use` of such a module (`ConnectInfo` lives in the
//!   private `connect.rs`, `ServerInfo` in `link.rs`). Modules declared
//!   `#[doc(hidden)]` (`fuzzing`, `simulation`) are not API and are left out.
//! - Types are the items written at the start of a line as `pub struct`,
//!   `pub enum`, `pub trait` or `pub type`; items nested in inline modules,
//!   items made by macros, and functions are not looked at.
//! - An example is a code fence in the item's own `///` comment (attributes
//!   may sit between comment and item); it is not compiled here: `cargo test
//!   --doc` does that.
//! - Not checked: `protocol/generated/`, whose docs and examples come from
//!   `codegen/`.

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use crate::workspace_root;

    /// Paths under `amqp-client/src` never checked, with the reason in the
    /// module comment above.
    const NOT_CHECKED: &[&str] = &["protocol/generated/"];

    /// A public type found in the sources.
    #[derive(Debug)]
    struct PublicType {
        /// Path relative to `amqp-client/src`, `/`-separated.
        file: String,
        line: usize,
        name: String,
        has_example: bool,
    }

    fn src() -> PathBuf {
        workspace_root().join("amqp-client/src")
    }

    fn relative(file: &Path) -> String {
        let relative = file.strip_prefix(src()).expect("a file under src");
        relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/")
    }

    fn read(file: &Path) -> String {
        std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()))
    }

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

    /// Whether the attributes right above line `at` say `#[doc(hidden)]`.
    fn is_doc_hidden(lines: &[&str], at: usize) -> bool {
        lines[..at]
            .iter()
            .rev()
            .take_while(|line| line.trim_start().starts_with("#["))
            .any(|attribute| attribute.contains("doc(hidden)"))
    }

    /// The file of module `file` (whose submodules live in `dir`) and of
    /// every module it declares `pub mod name;`, recursively, unless
    /// declared `#[doc(hidden)]`.
    fn public_module_files(file: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        out.insert(file.to_path_buf());
        let text = read(file);
        let lines: Vec<&str> = text.lines().collect();
        for (at, line) in lines.iter().enumerate() {
            let Some(name) = line
                .strip_prefix("pub mod ")
                .and_then(|rest| rest.strip_suffix(';'))
            else {
                continue;
            };
            if is_doc_hidden(&lines, at) {
                continue;
            }
            let child_dir = dir.join(name);
            let child = [dir.join(format!("{name}.rs")), child_dir.join("mod.rs")]
                .into_iter()
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("no file for `pub mod {name}` in {}", file.display()));
            public_module_files(&child, &child_dir, out);
        }
    }

    /// The names a file's top-level `pub use` items bring in (the original
    /// names, not `as` renames).
    fn reexported_names(text: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("\npub use ") {
            rest = &rest[at + "\npub use ".len()..];
            let end = rest.find(';').unwrap_or(rest.len());
            let tokens = rest[..end].replace(['{', '}', ','], " ");
            let mut renamed = false;
            for token in tokens.split_whitespace() {
                if std::mem::take(&mut renamed) {
                    continue;
                }
                if token == "as" {
                    renamed = true;
                    continue;
                }
                let name = token.rsplit("::").next().unwrap_or(token);
                if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                    names.insert(name.to_owned());
                }
            }
        }
        names
    }

    /// Whether the `///` comment right above line `at` (attributes may
    /// come between) holds a code fence.
    fn doc_has_example(lines: &[&str], at: usize) -> bool {
        lines[..at]
            .iter()
            .rev()
            .map(|line| line.trim_start())
            .take_while(|line| line.starts_with("///") || line.starts_with("#["))
            .filter_map(|line| line.strip_prefix("///"))
            .any(|doc| doc.trim_start().starts_with("```"))
    }

    /// The `pub struct|enum|trait|type` items at the start of a line of `text`.
    fn types_in(file: &str, text: &str) -> Vec<PublicType> {
        let lines: Vec<&str> = text.lines().collect();
        let mut found = Vec::new();
        for (at, line) in lines.iter().enumerate() {
            let Some(rest) = ["pub struct ", "pub enum ", "pub trait ", "pub type "]
                .iter()
                .find_map(|keyword| line.strip_prefix(keyword))
            else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push(PublicType {
                file: file.to_owned(),
                line: at + 1,
                name,
                has_example: doc_has_example(&lines, at),
            });
        }
        found
    }

    /// Every publicly reachable type of the hand-written sources.
    fn public_types() -> Vec<PublicType> {
        let src = src();
        let mut public_files = BTreeSet::new();
        public_module_files(&src.join("lib.rs"), &src, &mut public_files);
        let reexported: BTreeSet<String> = public_files
            .iter()
            .flat_map(|file| reexported_names(&read(file)))
            .collect();
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        files.sort();
        let mut public = Vec::new();
        for file in files {
            let name = relative(&file);
            if NOT_CHECKED.iter().any(|skip| name.starts_with(skip)) {
                continue;
            }
            let is_public_module = public_files.contains(&file);
            public.extend(
                types_in(&name, &read(&file))
                    .into_iter()
                    .filter(|t| is_public_module || reexported.contains(&t.name)),
            );
        }
        public
    }

    #[test]
    fn every_public_type_written_by_hand_has_a_doc_example() {
        let missing: Vec<String> = public_types()
            .into_iter()
            .filter(|t| !t.has_example)
            .map(|t| format!("{}:{} {}", t.file, t.line, t.name))
            .collect();
        assert!(
            missing.is_empty(),
            "public types without a doc example (add a ``` block to their `///` comment):\n  {}",
            missing.join("\n  ")
        );
    }

    #[test]
    fn the_scope_is_the_public_api_reexports_included_and_only_it() {
        let names: BTreeSet<String> = public_types().into_iter().map(|t| t.name).collect();
        // Public modules, a type alias, and re-exports from private modules.
        for expected in [
            "Config",
            "Channel",
            "FrameDecoder",
            "ChannelRpc",
            "Result",
            "ConnectInfo",
            "ServerInfo",
            "RecoveryEvent",
        ] {
            assert!(
                names.contains(expected),
                "{expected} missing from {names:?}"
            );
        }
        // `simulation` is #[doc(hidden)]; generated code is not checked.
        for left_out in ["Reached", "ReplyCode", "BasicProperties"] {
            assert!(!names.contains(left_out), "{left_out} is out of scope");
        }
    }

    #[test]
    fn an_example_counts_only_in_the_items_own_comment() {
        let text = "\
/// One.
///
/// ```
/// let x = 1;
/// ```
pub struct One;

/// Two, whose example is a link: [`One`].
#[derive(Debug)]
pub enum Two {}

/// Three.
///
///     ```no_run
///     ```
#[derive(Debug)]
#[non_exhaustive]
pub trait Three {}

pub type Four = u8;
    pub struct Nested;
";
        let found: Vec<(String, bool)> = types_in("x.rs", text)
            .into_iter()
            .map(|t| (t.name, t.has_example))
            .collect();
        let expected = [
            ("One", true),
            ("Two", false),
            ("Three", true),
            ("Four", false),
        ];
        let expected: Vec<(String, bool)> = expected
            .iter()
            .map(|(name, has)| ((*name).to_owned(), *has))
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn reexports_are_read_across_lines_and_renames() {
        let text = "\
use crate::link::Hidden;
pub use connection::{
    ConnectInfo, Connection,
};
#[cfg(feature = \"tls\")]
pub use config::ReadyClientConfig;
pub use crate::link::{self, ServerInfo as Info, rustls};
    pub use crate::protocol::Nested;
";
        let names: Vec<String> = reexported_names(text).into_iter().collect();
        assert_eq!(
            names,
            [
                "ConnectInfo",
                "Connection",
                "ReadyClientConfig",
                "ServerInfo"
            ]
        );
    }
}
