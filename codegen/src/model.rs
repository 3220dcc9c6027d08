//! The lowered model: domains resolved to wire types, bits grouped, replies
//! paired and directions known. Emitters read only this.

use crate::spec::{RawField, RawSpec, SpecError};

/// A field's representation on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    /// `octet`: u8.
    Octet,
    /// `short`: u16.
    Short,
    /// `long`: u32.
    Long,
    /// `longlong`: u64.
    LongLong,
    /// `timestamp`: u64 seconds.
    Timestamp,
    /// `shortstr`: ≤255 bytes.
    ShortStr,
    /// `longstr`: u32-length bytes.
    LongStr,
    /// `bit`: packed into octets.
    Bit,
    /// `table`: a field table.
    Table,
}

/// Who sends a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Only the client sends it (the server implements it).
    ToServer,
    /// Only the server sends it.
    ToClient,
    /// Either peer may send it.
    Both,
}

/// A field after lowering.
#[derive(Debug, Clone)]
pub struct Field {
    /// The spec name, e.g. `auto-delete`.
    pub spec_name: String,
    /// The Rust identifier, e.g. `auto_delete`.
    pub ident: String,
    /// Wire type.
    pub wire: WireType,
    /// Reserved: never exposed, always written as its zero value.
    pub reserved: bool,
    /// A credential (see [`SECRET_FIELDS`]): its method's `Debug` shows only
    /// its length.
    pub secret: bool,
    /// What the field means (Markdown), from the docs file; `None` before
    /// [`crate::docs::apply`] and for reserved fields.
    pub doc: Option<String>,
}

/// Consecutive fields as the codec sees them.
#[derive(Debug, Clone)]
pub enum FieldGroup {
    /// One non-bit field.
    Single(Field),
    /// Up to eight consecutive bits sharing one octet, lowest bit first.
    Bits(Vec<Field>),
}

/// A method after lowering.
#[derive(Debug, Clone)]
pub struct Method {
    /// Class name.
    pub class_name: String,
    /// Class id.
    pub class_id: u16,
    /// Method spec name, e.g. `declare-ok`.
    pub name: String,
    /// Method id.
    pub method_id: u16,
    /// Whether the spec marks it synchronous.
    pub synchronous: bool,
    /// Whether content (header and body frames) follows it.
    pub content: bool,
    /// Who sends it.
    pub direction: Direction,
    /// Replies a synchronous request awaits: (class id, method id, spec name).
    pub replies: Vec<(u16, u16, String)>,
    /// Whether some other method names this one as its response.
    pub is_reply: bool,
    /// Fields in wire order.
    pub fields: Vec<Field>,
    /// What the method does (Markdown), from the docs file; `None` before
    /// [`crate::docs::apply`].
    pub doc: Option<String>,
    /// Rust code of a doc example from the docs file, for a method that is
    /// sent some other way than through a generated channel method.
    pub example: Option<String>,
}

impl Method {
    /// `queue.declare-ok`.
    pub fn full_name(&self) -> String {
        format!("{}.{}", self.class_name, self.name)
    }

    /// Whether the method has a `no-wait` bit.
    pub fn has_no_wait(&self) -> bool {
        self.fields.iter().any(|f| f.ident == "no_wait")
    }

    /// Whether a client receives it once per message: the `basic` class's
    /// asynchronous methods that come from the server (deliveries, returns,
    /// publisher confirms). Their decoders are inlined into the frame
    /// decoder; the rest go through one out-of-line dispatch.
    pub fn on_message_path(&self) -> bool {
        self.class_name == "basic"
            && !self.synchronous
            && !self.is_reply
            && matches!(self.direction, Direction::ToClient | Direction::Both)
    }

    /// Fields grouped for encoding: consecutive bits share an octet.
    pub fn groups(&self) -> Vec<FieldGroup> {
        group_fields(&self.fields)
    }

    /// Whether it is a request a client may send: not only the server
    /// sends it, and it answers nothing.
    pub fn is_request(&self) -> bool {
        self.direction != Direction::ToClient && !self.is_reply
    }

    /// The name of the generated `Channel` method that sends it
    /// (`queue_declare`), if it gets one: every request sent on an open
    /// channel, except those the hand-written core owns ([`CORE_OWNED`]).
    pub fn channel_method(&self) -> Option<String> {
        let full = self.full_name();
        if self.class_name == "connection"
            || !self.is_request()
            || CORE_OWNED.contains(&full.as_str())
        {
            return None;
        }
        Some(format!(
            "{}_{}",
            self.class_name,
            self.name.replace('-', "_")
        ))
    }
}

/// Methods that the hand-written channel core owns rather than a generated
/// `Channel` method: they open or close the channel, carry content, or must
/// register state (a consumer) before the broker's reply can be acted on.
pub const CORE_OWNED: &[&str] = &[
    "channel.open",
    "channel.close",
    "basic.publish",
    "basic.get",
    "basic.consume",
    // Settled through `Delivery::ack`/`nack`/`reject`, which know the
    // connection epoch a delivery tag belongs to: a raw method taking a bare
    // tag could ack, after a reconnect, a different message than meant.
    "basic.ack",
    "basic.nack",
    "basic.reject",
];

/// A class after lowering.
#[derive(Debug, Clone)]
pub struct Class {
    /// Class name.
    pub name: String,
    /// Class id.
    pub id: u16,
    /// Content header properties, in flag order.
    pub properties: Vec<Field>,
    /// Methods.
    pub methods: Vec<Method>,
    /// What the class is for (Markdown), from the docs file; `None` before
    /// [`crate::docs::apply`].
    pub doc: Option<String>,
}

/// Soft (channel) or hard (connection) error, or success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// 200.
    Success,
    /// Closes the channel.
    Soft,
    /// Closes the connection.
    Hard,
}

/// A reply code constant.
#[derive(Debug, Clone)]
pub struct ReplyCode {
    /// Spec name, e.g. `not-found`.
    pub name: String,
    /// Number.
    pub value: u16,
    /// Kind.
    pub kind: ReplyKind,
}

/// The whole lowered spec.
#[derive(Debug, Clone)]
pub struct Model {
    /// (major, minor, revision).
    pub version: (u8, u8, u8),
    /// Default port.
    pub port: u16,
    /// Non-reply-code constants (frame types, frame-end, frame-min-size).
    pub constants: Vec<(String, u32)>,
    /// Reply codes.
    pub reply_codes: Vec<ReplyCode>,
    /// Classes.
    pub classes: Vec<Class>,
}

impl Model {
    /// Every method of every class.
    pub fn methods(&self) -> impl Iterator<Item = &Method> {
        self.classes.iter().flat_map(|c| c.methods.iter())
    }
}

/// The method fields that carry credentials, as (class, method, field) spec
/// names. The spec marks no field as secret, so the list is explicit: the
/// SASL responses (PLAIN's holds the password in clear, AMQPLAIN's a table
/// with it) and the token `connection.update-secret` hands over. The
/// generated `Debug` of their methods prints `<redacted, N bytes>` in their
/// place, so that no log record or error message built from a method (the
/// I/O task traces every frame) can carry a credential. Lowering fails if an
/// entry names a field the spec lacks, so a renamed field is never silently
/// printed again.
pub const SECRET_FIELDS: &[(&str, &str, &str)] = &[
    ("connection", "start-ok", "response"),
    ("connection", "secure-ok", "response"),
    ("connection", "update-secret", "new-secret"),
];

/// Turns a spec name into a Rust field identifier.
pub fn field_ident(spec_name: &str) -> String {
    match spec_name {
        // Rust keywords; `kind` is what the Rust AMQP clients call them.
        "type" => "kind".to_owned(),
        // confirm.select spells it without the dash.
        "nowait" => "no_wait".to_owned(),
        other => other.replace('-', "_"),
    }
}

/// `declare-ok` → `DeclareOk`.
pub fn camel(spec_name: &str) -> String {
    spec_name
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn group_fields(fields: &[Field]) -> Vec<FieldGroup> {
    let mut groups = Vec::new();
    for field in fields {
        if field.wire == WireType::Bit {
            if let Some(FieldGroup::Bits(bits)) = groups.last_mut() {
                if bits.len() < 8 {
                    bits.push(field.clone());
                    continue;
                }
            }
            groups.push(FieldGroup::Bits(vec![field.clone()]));
        } else {
            groups.push(FieldGroup::Single(field.clone()));
        }
    }
    groups
}

fn resolve(spec: &RawSpec, domain: &str) -> Result<WireType, SpecError> {
    let mut name = domain;
    // Domains may name other domains; the spec's own are at most two deep.
    for _ in 0..8 {
        let wire = match name {
            "octet" => Some(WireType::Octet),
            "short" => Some(WireType::Short),
            "long" => Some(WireType::Long),
            "longlong" => Some(WireType::LongLong),
            "timestamp" => Some(WireType::Timestamp),
            "shortstr" => Some(WireType::ShortStr),
            "longstr" => Some(WireType::LongStr),
            "bit" => Some(WireType::Bit),
            "table" => Some(WireType::Table),
            _ => None,
        };
        if let Some(wire) = wire {
            return Ok(wire);
        }
        match spec.domains.iter().find(|d| d.name == name) {
            // A domain named after its own primitive type (`bit` → `bit`) is handled above.
            Some(d) => name = &d.ty,
            None => return Err(SpecError(format!("unknown domain `{name}`"))),
        }
    }
    Err(SpecError(format!("domain `{domain}` does not resolve")))
}

fn lower_field(spec: &RawSpec, raw: &RawField) -> Result<Field, SpecError> {
    Ok(Field {
        spec_name: raw.name.clone(),
        ident: field_ident(&raw.name),
        wire: resolve(spec, &raw.domain)?,
        reserved: raw.reserved,
        secret: false,
        doc: None,
    })
}

/// Marks the fields of [`SECRET_FIELDS`], failing on an entry that names
/// nothing.
fn mark_secrets(classes: &mut [Class]) -> Result<(), SpecError> {
    for &(class_name, method_name, field_name) in SECRET_FIELDS {
        let field = classes
            .iter_mut()
            .filter(|c| c.name == class_name)
            .flat_map(|c| c.methods.iter_mut())
            .filter(|m| m.name == method_name)
            .flat_map(|m| m.fields.iter_mut())
            .find(|f| f.spec_name == field_name && !f.reserved)
            .ok_or_else(|| {
                SpecError(format!(
                    "secret field {class_name}.{method_name}.{field_name} is not in the spec"
                ))
            })?;
        // The redacting `Debug` prints a length, which only strings have.
        if !matches!(field.wire, WireType::ShortStr | WireType::LongStr) {
            return Err(SpecError(format!(
                "secret field {class_name}.{method_name}.{field_name} is not a string"
            )));
        }
        field.secret = true;
    }
    Ok(())
}

/// Lowers a (merged) raw spec.
pub fn lower(spec: &RawSpec) -> Result<Model, SpecError> {
    let mut constants = Vec::new();
    let mut reply_codes = Vec::new();
    for c in &spec.constants {
        let kind = match c.class.as_deref() {
            Some("soft-error") => Some(ReplyKind::Soft),
            Some("hard-error") => Some(ReplyKind::Hard),
            Some(other) => return Err(SpecError(format!("constant class `{other}`"))),
            None if c.name.starts_with("reply-") => Some(ReplyKind::Success),
            None => None,
        };
        match kind {
            Some(kind) => reply_codes.push(ReplyCode {
                name: c.name.clone(),
                value: u16::try_from(c.value)
                    .map_err(|_| SpecError(format!("reply code {} too large", c.value)))?,
                kind,
            }),
            None => constants.push((c.name.clone(), c.value)),
        }
    }

    let mut classes = Vec::new();
    for raw_class in &spec.classes {
        let properties = raw_class
            .properties
            .iter()
            .map(|f| lower_field(spec, f))
            .collect::<Result<Vec<_>, _>>()?;
        let mut methods = Vec::new();
        for raw in &raw_class.methods {
            let to_server = raw.chassis.iter().any(|c| c == "server");
            let to_client = raw.chassis.iter().any(|c| c == "client");
            let direction = match (to_server, to_client) {
                (true, true) => Direction::Both,
                (true, false) => Direction::ToServer,
                (false, true) => Direction::ToClient,
                (false, false) => {
                    return Err(SpecError(format!(
                        "{}.{} has no chassis",
                        raw_class.name, raw.name
                    )))
                }
            };
            let mut replies = Vec::new();
            for response in &raw.responses {
                let reply = raw_class
                    .methods
                    .iter()
                    .find(|m| &m.name == response)
                    .ok_or_else(|| {
                        SpecError(format!(
                            "{}.{} names unknown response `{response}`",
                            raw_class.name, raw.name
                        ))
                    })?;
                replies.push((raw_class.index, reply.index, reply.name.clone()));
            }
            let is_reply = raw_class
                .methods
                .iter()
                .any(|m| m.responses.iter().any(|r| r == &raw.name));
            methods.push(Method {
                class_name: raw_class.name.clone(),
                class_id: raw_class.index,
                name: raw.name.clone(),
                method_id: raw.index,
                synchronous: raw.synchronous,
                content: raw.content,
                direction,
                replies,
                is_reply,
                fields: raw
                    .fields
                    .iter()
                    .map(|f| lower_field(spec, f))
                    .collect::<Result<Vec<_>, _>>()?,
                doc: None,
                example: None,
            });
        }
        classes.push(Class {
            name: raw_class.name.clone(),
            id: raw_class.index,
            properties,
            methods,
            doc: None,
        });
    }
    mark_secrets(&mut classes)?;
    // The overlay's codes come after the vendored ones; every list generated
    // from them (`ReplyCode::ALL`, the `ReplyError` variants) reads best in
    // numeric order.
    reply_codes.sort_by_key(|c| c.value);
    Ok(Model {
        version: (spec.major, spec.minor, spec.revision),
        port: spec.port,
        constants,
        reply_codes,
        classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{merge, parse};

    const SPEC: &str = include_str!("../../spec/amqp0-9-1.xml");
    const OVERLAY: &str = include_str!("../../spec/rabbitmq-extensions.xml");

    fn lower_texts(spec: &str, overlay: &str) -> Result<Model, SpecError> {
        lower(&merge(parse(spec)?, parse(overlay)?))
    }

    #[test]
    fn exactly_the_listed_credential_fields_are_secret() {
        let model = lower_texts(SPEC, OVERLAY).expect("lower");
        let mut secret: Vec<String> = model
            .methods()
            .flat_map(|m| {
                m.fields
                    .iter()
                    .filter(|f| f.secret)
                    .map(move |f| format!("{}.{}", m.full_name(), f.spec_name))
            })
            .collect();
        secret.sort();
        assert_eq!(
            secret,
            [
                "connection.secure-ok.response",
                "connection.start-ok.response",
                "connection.update-secret.new-secret",
            ]
        );
    }

    #[test]
    fn a_listed_secret_field_missing_from_the_spec_fails_lowering() {
        let renamed = OVERLAY.replace(r#"name="new-secret""#, r#"name="token""#);
        assert_ne!(renamed, OVERLAY, "the overlay defines new-secret");
        let error = lower_texts(SPEC, &renamed).expect_err("must fail");
        assert!(
            error.0.contains("connection.update-secret.new-secret"),
            "{error}"
        );
    }
}
