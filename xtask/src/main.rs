//! `cargo xtask`: project tasks that are not builds.
//!
//! - `regen` rewrites the generated protocol code from `spec/`; `regen --check`
//!   fails, naming each stale file, when the checked-in code differs.
//! - `broker` makes sure a RabbitMQ answers at `AMQP_URL`.
//! - `quickstart` runs `broker`, then the quickstart example.
//! - `test` runs `broker`, then every test of the workspace.

mod broker;
mod doc_examples;
mod layering;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Writes each generated file whose contents changed; in check mode writes
/// nothing and reports the stale files instead.
fn regen(root: &Path, check: bool) -> Result<(), String> {
    let files = amqp_codegen::generate(root).map_err(|e| e.to_string())?;
    let stale = amqp_codegen::stale_files(root, &files);
    if check {
        if stale.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = stale.iter().map(|p| p.display().to_string()).collect();
        return Err(format!(
            "generated code is stale: {}\nrun `cargo xtask regen` and commit the result",
            names.join(", ")
        ));
    }
    for file in files.iter().filter(|f| stale.contains(&f.path)) {
        let path = root.join(&file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&path, &file.contents).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", file.path.display());
    }
    Ok(())
}

/// Runs cargo with `args` plus the user's `extra` arguments.
fn cargo(root: &Path, args: &[&str], extra: &[String]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .current_dir(root)
        .args(args)
        .args(extra)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed ({status})", args.join(" ")))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    let result = match args.first().map(String::as_str) {
        Some("regen") => regen(&root, args.iter().any(|a| a == "--check")),
        Some("broker") => broker::ensure(),
        Some("quickstart") => broker::ensure().and_then(|()| {
            cargo(
                &root,
                &["run", "--quiet", "-p", "amqp091", "--example", "quickstart"],
                &args[1..],
            )
        }),
        Some("test") => {
            broker::ensure().and_then(|()| cargo(&root, &["test", "--workspace"], &args[1..]))
        }
        _ => Err(
            "usage: cargo xtask regen [--check] | broker | test [-- cargo test args]".to_owned(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_generated_code_is_fresh() {
        if let Err(message) = regen(&workspace_root(), true) {
            panic!("{message}");
        }
    }

    #[test]
    fn check_fails_and_names_the_file_when_a_method_is_removed_from_the_spec() {
        let root = workspace_root();
        let spec = std::fs::read_to_string(root.join(amqp_codegen::SPEC_PATH)).expect("spec");
        let overlay =
            std::fs::read_to_string(root.join(amqp_codegen::OVERLAY_PATH)).expect("overlay");
        let docs = std::fs::read_to_string(root.join(amqp_codegen::DOCS_PATH)).expect("docs");
        let start = spec
            .find(r#"<method name="qos""#)
            .expect("basic.qos in spec");
        let end =
            start + spec[start..].find("</method>").expect("end of basic.qos") + "</method>".len();
        let mut edited = spec.clone();
        edited.replace_range(start..end, "");
        // Docs naming a method the spec lacks are refused: its docs go too.
        let start = docs
            .find(r#"<method name="qos">"#)
            .expect("basic.qos in docs");
        let end =
            start + docs[start..].find("</method>").expect("end of basic.qos") + "</method>".len();
        let mut edited_docs = docs.clone();
        edited_docs.replace_range(start..end, "");
        let files = amqp_codegen::generate_from(&edited, &overlay, &edited_docs).expect("generate");
        let stale = amqp_codegen::stale_files(&root, &files);
        assert!(
            stale.iter().any(|p| p.ends_with("methods.rs")),
            "removing basic.qos must make methods.rs stale, got {stale:?}"
        );
        assert!(!files.iter().any(|f| f.contents.contains("pub struct Qos ")));
    }

    #[test]
    fn the_methods_decoded_inline_are_the_ones_a_client_receives_per_message() {
        let root = workspace_root();
        let read = |rel: &str| std::fs::read_to_string(root.join(rel)).expect("spec file");
        let merged = amqp_codegen::spec::merge(
            amqp_codegen::spec::parse(&read(amqp_codegen::SPEC_PATH)).expect("spec"),
            amqp_codegen::spec::parse(&read(amqp_codegen::OVERLAY_PATH)).expect("overlay"),
        );
        let model = amqp_codegen::model::lower(&merged).expect("lower");
        let mut on_path: Vec<String> = model
            .methods()
            .filter(|m| m.on_message_path())
            .map(|m| m.full_name())
            .collect();
        on_path.sort();
        assert_eq!(
            on_path,
            ["basic.ack", "basic.deliver", "basic.nack", "basic.return"]
        );
    }

    /// A reader finds every AMQP method of a channel from `Channel`'s page:
    /// its docs name each request a client sends on a channel, and link the
    /// generated method of each that has one.
    #[test]
    fn the_channel_docs_name_every_method_a_client_sends_on_a_channel() {
        let root = workspace_root();
        let read = |rel: &str| std::fs::read_to_string(root.join(rel)).expect("source file");
        let model = amqp_codegen::documented_model(
            &read(amqp_codegen::SPEC_PATH),
            &read(amqp_codegen::OVERLAY_PATH),
            &read(amqp_codegen::DOCS_PATH),
        )
        .expect("model");
        let source = read("amqp-client/src/channel.rs");
        let end = source.find("pub struct Channel {").expect("Channel");
        let start = source[..end]
            .rfind("\n\n")
            .expect("a blank line before its docs");
        let docs = &source[start..end];
        let mut missing = Vec::new();
        for method in model
            .methods()
            .filter(|m| m.class_name != "connection" && m.is_request())
        {
            if !docs.contains(&format!("`{}`", method.full_name())) {
                missing.push(method.full_name());
            }
            if let Some(name) = method.channel_method() {
                if !docs.contains(&format!("(Self::{name})")) {
                    missing.push(format!("Channel::{name}"));
                }
            }
        }
        assert!(missing.is_empty(), "Channel's docs do not name {missing:?}");
    }
}
