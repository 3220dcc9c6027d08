//! The raw model: the spec XML as written, before any interpretation.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// A whole spec document (the vendored spec or an overlay).
#[derive(Debug, Default, Clone)]
pub struct RawSpec {
    /// Protocol major version.
    pub major: u8,
    /// Protocol minor version.
    pub minor: u8,
    /// Protocol revision.
    pub revision: u8,
    /// Default TCP port.
    pub port: u16,
    /// `<constant>` elements in document order.
    pub constants: Vec<RawConstant>,
    /// `<domain>` elements in document order.
    pub domains: Vec<RawDomain>,
    /// `<class>` elements in document order.
    pub classes: Vec<RawClass>,
}

/// A `<constant name value class?>`.
#[derive(Debug, Clone)]
pub struct RawConstant {
    /// Spec name, e.g. `not-found`.
    pub name: String,
    /// Its value.
    pub value: u32,
    /// `soft-error`, `hard-error` or none.
    pub class: Option<String>,
}

/// A `<domain name type>`.
#[derive(Debug, Clone)]
pub struct RawDomain {
    /// Domain name.
    pub name: String,
    /// The primitive type (or another domain) it stands for.
    pub ty: String,
}

/// A `<class>`.
#[derive(Debug, Clone)]
pub struct RawClass {
    /// Class name, e.g. `queue`.
    pub name: String,
    /// Class id.
    pub index: u16,
    /// Content properties (only `basic` has them).
    pub properties: Vec<RawField>,
    /// Methods in document order.
    pub methods: Vec<RawMethod>,
}

/// A `<method>`.
#[derive(Debug, Clone)]
pub struct RawMethod {
    /// Method name, e.g. `declare-ok`.
    pub name: String,
    /// Method id.
    pub index: u16,
    /// `synchronous="1"`.
    pub synchronous: bool,
    /// `content="1"`.
    pub content: bool,
    /// The `<chassis name>` values: who must implement (receive) it.
    pub chassis: Vec<String>,
    /// The `<response name>` values.
    pub responses: Vec<String>,
    /// Fields in wire order.
    pub fields: Vec<RawField>,
}

/// A `<field>` of a method or a class.
#[derive(Debug, Clone)]
pub struct RawField {
    /// Field name.
    pub name: String,
    /// `domain=` (or `type=`) attribute.
    pub domain: String,
    /// `reserved="1"`.
    pub reserved: bool,
}

/// Why a spec document could not be read.
#[derive(Debug)]
pub struct SpecError(pub String);

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

fn attrs(e: &BytesStart<'_>) -> Result<Vec<(String, String)>, SpecError> {
    e.attributes()
        .map(|a| {
            let a = a.map_err(|err| SpecError(format!("bad attribute: {err}")))?;
            let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            let value = a
                .unescape_value()
                .map_err(|err| SpecError(format!("bad attribute value: {err}")))?
                .into_owned();
            Ok((key, value))
        })
        .collect()
}

fn attr<'a>(list: &'a [(String, String)], key: &str) -> Option<&'a str> {
    list.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn required<'a>(
    list: &'a [(String, String)],
    key: &str,
    element: &str,
) -> Result<&'a str, SpecError> {
    attr(list, key).ok_or_else(|| SpecError(format!("<{element}> without `{key}`")))
}

fn number<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, SpecError> {
    text.parse()
        .map_err(|_| SpecError(format!("`{text}` is not a valid {what}")))
}

/// Parses one spec document.
pub fn parse(xml: &str) -> Result<RawSpec, SpecError> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut spec = RawSpec::default();
    let mut class: Option<RawClass> = None;
    let mut method: Option<RawMethod> = None;
    loop {
        let event = reader.read_event().map_err(|e| {
            SpecError(format!(
                "XML error at byte {}: {e}",
                reader.buffer_position()
            ))
        })?;
        let (element, is_start) = match &event {
            Event::Start(e) => (e, true),
            Event::Empty(e) => (e, false),
            Event::End(e) => {
                match e.name().as_ref() {
                    b"method" => {
                        let m = method
                            .take()
                            .ok_or_else(|| SpecError("stray </method>".into()))?;
                        class
                            .as_mut()
                            .ok_or_else(|| SpecError("<method> outside <class>".into()))?
                            .methods
                            .push(m);
                    }
                    b"class" => {
                        let c = class
                            .take()
                            .ok_or_else(|| SpecError("stray </class>".into()))?;
                        spec.classes.push(c);
                    }
                    _ => {}
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let list = attrs(element)?;
        match element.name().as_ref() {
            b"amqp" => {
                spec.major = number(required(&list, "major", "amqp")?, "major version")?;
                spec.minor = number(required(&list, "minor", "amqp")?, "minor version")?;
                spec.revision = number(required(&list, "revision", "amqp")?, "revision")?;
                spec.port = number(required(&list, "port", "amqp")?, "port")?;
            }
            b"constant" => spec.constants.push(RawConstant {
                name: required(&list, "name", "constant")?.to_owned(),
                value: number(required(&list, "value", "constant")?, "constant value")?,
                class: attr(&list, "class").map(str::to_owned),
            }),
            b"domain" => spec.domains.push(RawDomain {
                name: required(&list, "name", "domain")?.to_owned(),
                ty: required(&list, "type", "domain")?.to_owned(),
            }),
            b"class" => {
                let c = RawClass {
                    name: required(&list, "name", "class")?.to_owned(),
                    index: number(required(&list, "index", "class")?, "class index")?,
                    properties: Vec::new(),
                    methods: Vec::new(),
                };
                if is_start {
                    class = Some(c);
                } else {
                    spec.classes.push(c);
                }
            }
            b"method" => {
                let m = RawMethod {
                    name: required(&list, "name", "method")?.to_owned(),
                    index: number(required(&list, "index", "method")?, "method index")?,
                    synchronous: attr(&list, "synchronous") == Some("1"),
                    content: attr(&list, "content") == Some("1"),
                    chassis: Vec::new(),
                    responses: Vec::new(),
                    fields: Vec::new(),
                };
                let parent = class
                    .as_mut()
                    .ok_or_else(|| SpecError("<method> outside <class>".into()))?;
                if is_start {
                    method = Some(m);
                } else {
                    parent.methods.push(m);
                }
            }
            b"field" => {
                let name = required(&list, "name", "field")?.to_owned();
                let domain = attr(&list, "domain")
                    .or_else(|| attr(&list, "type"))
                    .ok_or_else(|| {
                        SpecError(format!("field `{name}` has neither domain nor type"))
                    })?
                    .to_owned();
                let field = RawField {
                    name,
                    domain,
                    reserved: attr(&list, "reserved") == Some("1"),
                };
                if let Some(m) = method.as_mut() {
                    m.fields.push(field);
                } else if let Some(c) = class.as_mut() {
                    c.properties.push(field);
                } else {
                    return Err(SpecError("<field> outside <class>".into()));
                }
            }
            b"chassis" => {
                if let Some(m) = method.as_mut() {
                    m.chassis
                        .push(required(&list, "name", "chassis")?.to_owned());
                }
            }
            b"response" => {
                if let Some(m) = method.as_mut() {
                    m.responses
                        .push(required(&list, "name", "response")?.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(spec)
}

/// Merges an overlay into a base spec: overlay constants and domains are added
/// when new; an overlay method replaces the base method of the same class and
/// name, or is added to its class (kept sorted by method id).
pub fn merge(mut base: RawSpec, overlay: RawSpec) -> RawSpec {
    for constant in overlay.constants {
        if !base.constants.iter().any(|c| c.name == constant.name) {
            base.constants.push(constant);
        }
    }
    for domain in overlay.domains {
        if !base.domains.iter().any(|d| d.name == domain.name) {
            base.domains.push(domain);
        }
    }
    for class in overlay.classes {
        match base.classes.iter_mut().find(|c| c.name == class.name) {
            Some(target) => {
                for method in class.methods {
                    match target.methods.iter_mut().find(|m| m.name == method.name) {
                        Some(existing) => *existing = method,
                        None => target.methods.push(method),
                    }
                }
                target.methods.sort_by_key(|m| m.index);
            }
            None => base.classes.push(class),
        }
    }
    base
}
