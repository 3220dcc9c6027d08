//! The documentation of the protocol: `spec/amqp0-9-1.docs.xml`, merged into
//! the lowered model by class, method and field name.
//!
//! The vendored spec carries no `<doc>` elements, so what each class, method
//! and field means lives in a file of its own, written for this project.
//! Merging is strict both ways: a docs entry that names nothing in the spec
//! is an error (a typo must not silently drop docs), and so is a class,
//! method, non-reserved field or content property without docs (a method new
//! in the spec must be documented before it is generated).
//!
//! The format:
//!
//! ```xml
//! <docs>
//!   <class name="queue">
//!     <doc>What the class is for (Markdown).</doc>
//!     <method name="declare">
//!       <doc>What the method does.</doc>
//!       <field name="passive">What the field means.</field>
//!       <example>Rust code of a doc example (optional).</example>
//!     </method>
//!   </class>
//!   <class name="basic">
//!     <property name="content-type">A content property.</property>
//!   </class>
//! </docs>
//! ```
//!
//! Text is Markdown; its common indentation is removed, so that code blocks
//! keep their own.

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::model::Model;
use crate::spec::SpecError;

/// The docs of one method.
#[derive(Debug, Clone, Default)]
pub struct MethodDocs {
    /// Method spec name, e.g. `declare-ok`.
    pub name: String,
    /// The method's doc.
    pub doc: Option<String>,
    /// Rust code of a doc example, for methods sent some other way than a
    /// generated channel method.
    pub example: Option<String>,
    /// (field spec name, doc).
    pub fields: Vec<(String, String)>,
}

/// The docs of one class.
#[derive(Debug, Clone, Default)]
pub struct ClassDocs {
    /// Class name.
    pub name: String,
    /// The class's doc.
    pub doc: Option<String>,
    /// Its methods' docs.
    pub methods: Vec<MethodDocs>,
    /// (property spec name, doc).
    pub properties: Vec<(String, String)>,
}

/// A whole docs file.
#[derive(Debug, Clone, Default)]
pub struct Docs {
    /// Classes in document order.
    pub classes: Vec<ClassDocs>,
}

/// Removes leading and trailing blank lines, trailing spaces and the
/// indentation common to every non-blank line.
pub fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let first = lines.iter().position(|l| !l.is_empty());
    let last = lines.iter().rposition(|l| !l.is_empty());
    let (Some(first), Some(last)) = (first, last) else {
        return String::new();
    };
    let lines = &lines[first..=last];
    let indent = lines
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn name_of(e: &quick_xml::events::BytesStart<'_>, element: &str) -> Result<String, SpecError> {
    for attr in e.attributes() {
        let attr = attr.map_err(|err| SpecError(format!("docs: bad attribute: {err}")))?;
        if attr.key.as_ref() == b"name" {
            return Ok(attr
                .unescape_value()
                .map_err(|err| SpecError(format!("docs: bad attribute value: {err}")))?
                .into_owned());
        }
    }
    Err(SpecError(format!("docs: <{element}> without `name`")))
}

/// Where the text being read goes.
enum Target {
    ClassDoc,
    MethodDoc,
    Example,
    Field(String),
    Property(String),
}

/// Parses a docs file.
pub fn parse(xml: &str) -> Result<Docs, SpecError> {
    let mut reader = Reader::from_str(xml);
    let mut docs = Docs::default();
    let mut class: Option<ClassDocs> = None;
    let mut method: Option<MethodDocs> = None;
    let mut target: Option<(Target, String)> = None;
    loop {
        let event = reader.read_event().map_err(|e| {
            SpecError(format!(
                "docs: XML error at byte {}: {e}",
                reader.buffer_position()
            ))
        })?;
        match event {
            Event::Start(e) => {
                let element = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if target.is_some() {
                    return Err(SpecError(format!(
                        "docs: <{element}> inside a text element (escape `<` as `&lt;`)"
                    )));
                }
                match element.as_str() {
                    "docs" => {}
                    "class" => {
                        class = Some(ClassDocs {
                            name: name_of(&e, "class")?,
                            ..ClassDocs::default()
                        })
                    }
                    "method" => {
                        method = Some(MethodDocs {
                            name: name_of(&e, "method")?,
                            ..MethodDocs::default()
                        })
                    }
                    "doc" if method.is_some() => target = Some((Target::MethodDoc, String::new())),
                    "doc" => target = Some((Target::ClassDoc, String::new())),
                    "example" => target = Some((Target::Example, String::new())),
                    "field" => target = Some((Target::Field(name_of(&e, "field")?), String::new())),
                    "property" => {
                        target = Some((Target::Property(name_of(&e, "property")?), String::new()))
                    }
                    other => return Err(SpecError(format!("docs: unknown element <{other}>"))),
                }
            }
            Event::Text(t) => {
                if let Some((_, text)) = target.as_mut() {
                    let unescaped = t
                        .unescape()
                        .map_err(|e| SpecError(format!("docs: bad text: {e}")))?;
                    text.push_str(&unescaped);
                }
            }
            Event::CData(t) => {
                if let Some((_, text)) = target.as_mut() {
                    text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::End(e) => match e.name().as_ref() {
                b"doc" | b"example" | b"field" | b"property" => {
                    let (kind, text) = target
                        .take()
                        .ok_or_else(|| SpecError("docs: stray end tag".into()))?;
                    let text = dedent(&text);
                    let context = || SpecError("docs: text outside <class> or <method>".into());
                    match kind {
                        Target::ClassDoc => class.as_mut().ok_or_else(context)?.doc = Some(text),
                        Target::MethodDoc => method.as_mut().ok_or_else(context)?.doc = Some(text),
                        Target::Example => {
                            method.as_mut().ok_or_else(context)?.example = Some(text)
                        }
                        Target::Field(name) => method
                            .as_mut()
                            .ok_or_else(context)?
                            .fields
                            .push((name, text)),
                        Target::Property(name) => class
                            .as_mut()
                            .ok_or_else(context)?
                            .properties
                            .push((name, text)),
                    }
                }
                b"method" => {
                    let m = method
                        .take()
                        .ok_or_else(|| SpecError("docs: stray </method>".into()))?;
                    class
                        .as_mut()
                        .ok_or_else(|| SpecError("docs: <method> outside <class>".into()))?
                        .methods
                        .push(m);
                }
                b"class" => {
                    let c = class
                        .take()
                        .ok_or_else(|| SpecError("docs: stray </class>".into()))?;
                    docs.classes.push(c);
                }
                _ => {}
            },
            Event::Empty(e) => {
                let element = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                return Err(SpecError(format!(
                    "docs: empty <{element}/>: write its docs"
                )));
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(docs)
}

fn non_empty(text: &Option<String>) -> Option<String> {
    text.clone().filter(|t| !t.is_empty())
}

/// Merges `docs` into `model`: every class, method, non-reserved field and
/// content property gets its doc. Fails on a docs entry that names nothing
/// in the model (naming it) and on anything left undocumented.
pub fn apply(model: &mut Model, docs: &Docs) -> Result<(), SpecError> {
    for class_docs in &docs.classes {
        let class = model
            .classes
            .iter_mut()
            .find(|c| c.name == class_docs.name)
            .ok_or_else(|| {
                SpecError(format!(
                    "docs: class `{}` is not in the spec",
                    class_docs.name
                ))
            })?;
        if class_docs.doc.is_some() {
            class.doc = non_empty(&class_docs.doc);
        }
        for (name, text) in &class_docs.properties {
            let property = class
                .properties
                .iter_mut()
                .find(|p| &p.spec_name == name)
                .ok_or_else(|| {
                    SpecError(format!(
                        "docs: property `{}.{name}` is not in the spec",
                        class.name
                    ))
                })?;
            property.doc = Some(text.clone());
        }
        for method_docs in &class_docs.methods {
            let method = class
                .methods
                .iter_mut()
                .find(|m| m.name == method_docs.name)
                .ok_or_else(|| {
                    SpecError(format!(
                        "docs: method `{}.{}` is not in the spec",
                        class_docs.name, method_docs.name
                    ))
                })?;
            method.doc = non_empty(&method_docs.doc);
            method.example = non_empty(&method_docs.example);
            for (name, text) in &method_docs.fields {
                let field = method
                    .fields
                    .iter_mut()
                    .find(|f| &f.spec_name == name && !f.reserved)
                    .ok_or_else(|| {
                        SpecError(format!(
                            "docs: field `{}.{}.{name}` is not in the spec (or is reserved)",
                            class_docs.name, method_docs.name
                        ))
                    })?;
                field.doc = Some(text.clone());
            }
        }
    }
    let mut missing = Vec::new();
    for class in &model.classes {
        if class.doc.is_none() {
            missing.push(format!("class `{}`", class.name));
        }
        for property in class.properties.iter().filter(|p| p.doc.is_none()) {
            missing.push(format!("property `{}.{}`", class.name, property.spec_name));
        }
        for method in &class.methods {
            if method.doc.is_none() {
                missing.push(format!("method `{}`", method.full_name()));
            }
            // The generator writes the examples of the generated channel
            // methods; a request sent some other way needs one written.
            let generated_example = method.channel_method().is_some();
            if method.is_request() && !generated_example && method.example.is_none() {
                missing.push(format!("example of `{}`", method.full_name()));
            }
            if method.example.is_some() && (generated_example || !method.is_request()) {
                return Err(SpecError(format!(
                    "docs: `{}` gets a generated example (or is no request): remove its <example>",
                    method.full_name()
                )));
            }
            for field in method
                .fields
                .iter()
                .filter(|f| !f.reserved && f.doc.is_none())
            {
                missing.push(format!(
                    "field `{}.{}`",
                    method.full_name(),
                    field.spec_name
                ));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SpecError(format!(
            "docs: undocumented in {}: {}",
            crate::DOCS_PATH,
            missing.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lower;
    use crate::spec::{merge, parse as parse_spec};

    const SPEC: &str = include_str!("../../spec/amqp0-9-1.xml");
    const OVERLAY: &str = include_str!("../../spec/rabbitmq-extensions.xml");
    const DOCS: &str = include_str!("../../spec/amqp0-9-1.docs.xml");

    fn apply_texts(docs: &str) -> Result<Model, SpecError> {
        let mut model = lower(&merge(parse_spec(SPEC)?, parse_spec(OVERLAY)?))?;
        apply(&mut model, &parse(docs)?)?;
        Ok(model)
    }

    #[test]
    fn every_method_and_field_of_the_spec_gets_its_docs() {
        let model = apply_texts(DOCS).expect("docs apply");
        let declare = model
            .methods()
            .find(|m| m.full_name() == "queue.declare")
            .expect("queue.declare");
        assert!(declare.doc.as_deref().is_some_and(|d| !d.is_empty()));
        assert!(declare
            .fields
            .iter()
            .filter(|f| !f.reserved)
            .all(|f| f.doc.is_some()));
    }

    #[test]
    fn a_docs_entry_naming_a_nonexistent_method_fails_naming_it() {
        let typo = DOCS.replacen(r#"<method name="declare">"#, r#"<method name="declar">"#, 1);
        assert_ne!(typo, DOCS, "the docs document a declare method");
        let error = apply_texts(&typo).expect_err("must fail");
        assert!(error.0.contains("`exchange.declar`"), "{error}");
    }

    #[test]
    fn a_docs_entry_naming_a_nonexistent_field_fails_naming_it() {
        let typo = DOCS.replacen(
            r#"<field name="if-unused">"#,
            r#"<field name="if-unusd">"#,
            1,
        );
        assert_ne!(typo, DOCS, "the docs document an if-unused field");
        let error = apply_texts(&typo).expect_err("must fail");
        assert!(error.0.contains("if-unusd"), "{error}");
    }

    #[test]
    fn a_method_without_docs_fails_naming_it() {
        let start = DOCS.find(r#"<method name="qos">"#).expect("basic.qos docs");
        let end = start + DOCS[start..].find("</method>").expect("end") + "</method>".len();
        let mut without = DOCS.to_owned();
        without.replace_range(start..end, "");
        let error = apply_texts(&without).expect_err("must fail");
        assert!(error.0.contains("method `basic.qos`"), "{error}");
    }

    #[test]
    fn dedent_keeps_relative_indentation_and_drops_blank_edges() {
        assert_eq!(dedent("\n    a\n      b\n\n    c\n  "), "a\n  b\n\nc");
    }
}
