//! Values from the command line: names, typed table values, message
//! properties; and what deliveries look like as JSON.

use amqp091::{BasicProperties, FieldTable, FieldValue, ShortString};
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::fail::Failure;

/// The one place a `ShortString` is built from user input: checked here,
/// although the library would refuse it when sent, so that the error names
/// the flag and nothing is connected for a command that cannot run.
pub fn short(what: &str, text: &str) -> Result<ShortString, Failure> {
    ShortString::new(text).map_err(|_| {
        Failure::usage(format!(
            "{what} is {} bytes long; AMQP allows at most 255",
            text.len()
        ))
    })
}

/// [`short`] for an optional flag.
pub fn short_opt(what: &str, text: Option<&str>) -> Result<Option<ShortString>, Failure> {
    text.map(|text| short(what, text)).transpose()
}

/// Parses `key=value` into a table entry. The value is a string unless it
/// starts with a known type (`int:5`, `bool:true`, `float:1.5`,
/// `timestamp:1700000000`, `str:int:5` for the text `int:5`): an unknown
/// prefix is part of the text, so `url=http://x` stays a string.
pub fn parse_entry(entry: &str) -> Result<(ShortString, FieldValue), Failure> {
    let (key, value) = entry
        .split_once('=')
        .ok_or_else(|| Failure::usage(format!("`{entry}` is not key=value")))?;
    if key.is_empty() {
        return Err(Failure::usage(format!("`{entry}` has an empty key")));
    }
    Ok((short("a table key", key)?, typed_value(value)?))
}

fn typed_value(value: &str) -> Result<FieldValue, Failure> {
    let bad = |kind: &str, text: &str| Failure::usage(format!("`{text}` is not a valid {kind}"));
    let Some((kind, text)) = value.split_once(':') else {
        return Ok(FieldValue::from(value));
    };
    Ok(match kind {
        "str" | "string" => FieldValue::from(text),
        "int" | "long" => FieldValue::I64(text.parse().map_err(|_| bad("integer", text))?),
        "bool" => FieldValue::Bool(
            text.parse()
                .map_err(|_| bad("bool (true or false)", text))?,
        ),
        "float" | "double" => FieldValue::F64(text.parse().map_err(|_| bad("number", text))?),
        "timestamp" => FieldValue::Timestamp(text.parse().map_err(|_| bad("timestamp", text))?),
        _ => FieldValue::from(value),
    })
}

/// A table from repeated `key=value` flags; `None` when there are none.
pub fn table(entries: &[String]) -> Result<FieldTable, Failure> {
    let mut table = FieldTable::new();
    for entry in entries {
        let (key, value) = parse_entry(entry)?;
        table.insert(key, value);
    }
    Ok(table)
}

/// The message properties a publish sets, as given on the command line.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct PropertyArgs {
    /// content-type, e.g. application/json.
    #[arg(long)]
    pub content_type: Option<String>,
    /// content-encoding, e.g. gzip.
    #[arg(long)]
    pub content_encoding: Option<String>,
    /// A header, key=value (typed: key=int:5, key=bool:true, key=float:1.5,
    /// key=timestamp:SECS); repeat for more.
    #[arg(short = 'H', long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
    /// delivery-mode: 1 or transient, 2 or persistent.
    #[arg(long, value_parser = parse_delivery_mode, conflicts_with = "persistent")]
    pub delivery_mode: Option<u8>,
    /// Shorthand for --delivery-mode persistent.
    #[arg(long)]
    pub persistent: bool,
    /// priority, 0 to 255.
    #[arg(long)]
    pub priority: Option<u8>,
    /// correlation-id.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// reply-to.
    #[arg(long)]
    pub reply_to: Option<String>,
    /// expiration: the message's TTL in milliseconds, as text.
    #[arg(long)]
    pub expiration: Option<String>,
    /// message-id.
    #[arg(long)]
    pub message_id: Option<String>,
    /// timestamp: seconds since the epoch, or `now`.
    #[arg(long, value_parser = parse_timestamp)]
    pub timestamp: Option<u64>,
    /// type.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// user-id (RabbitMQ checks it is the connection's user).
    #[arg(long)]
    pub user_id: Option<String>,
    /// app-id.
    #[arg(long)]
    pub app_id: Option<String>,
}

fn parse_delivery_mode(text: &str) -> Result<u8, String> {
    match text {
        "1" | "transient" => Ok(1),
        "2" | "persistent" => Ok(2),
        _ => Err("expected 1, 2, transient or persistent".to_owned()),
    }
}

fn parse_timestamp(text: &str) -> Result<u64, String> {
    if text == "now" {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .map_err(|_| "the system clock is before 1970".to_owned());
    }
    text.parse()
        .map_err(|_| "expected seconds since the epoch, or `now`".to_owned())
}

impl PropertyArgs {
    /// The properties to publish with.
    pub fn properties(&self) -> Result<BasicProperties, Failure> {
        let headers = table(&self.headers)?;
        Ok(BasicProperties {
            content_type: short_opt("--content-type", self.content_type.as_deref())?,
            content_encoding: short_opt("--content-encoding", self.content_encoding.as_deref())?,
            headers: (!headers.is_empty()).then_some(headers),
            delivery_mode: if self.persistent {
                Some(2)
            } else {
                self.delivery_mode
            },
            priority: self.priority,
            correlation_id: short_opt("--correlation-id", self.correlation_id.as_deref())?,
            reply_to: short_opt("--reply-to", self.reply_to.as_deref())?,
            expiration: short_opt("--expiration", self.expiration.as_deref())?,
            message_id: short_opt("--message-id", self.message_id.as_deref())?,
            timestamp: self.timestamp,
            kind: short_opt("--type", self.kind.as_deref())?,
            user_id: short_opt("--user-id", self.user_id.as_deref())?,
            app_id: short_opt("--app-id", self.app_id.as_deref())?,
            reserved: None,
        })
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A field value as JSON: numbers, booleans and text as themselves; byte
/// arrays and long strings that are not UTF-8 as `{"base64": …}`.
pub fn value_json(value: &FieldValue) -> Value {
    match value {
        FieldValue::Bool(v) => json!(v),
        FieldValue::F32(v) => json!(v),
        FieldValue::F64(v) => json!(v),
        FieldValue::Decimal(d) => json!({ "scale": d.scale, "value": d.value }),
        FieldValue::LongString(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => json!(text),
            Err(_) => json!({ "base64": base64(bytes) }),
        },
        FieldValue::Bytes(bytes) => json!({ "base64": base64(bytes) }),
        FieldValue::Array(items) => Value::Array(items.iter().map(value_json).collect()),
        FieldValue::Timestamp(v) => json!(v),
        FieldValue::Table(table) => table_json(table),
        FieldValue::Void => Value::Null,
        other => other.as_i64().map_or(Value::Null, |v| json!(v)),
    }
}

/// A field table as a JSON object.
pub fn table_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .iter()
            .map(|(key, value)| (key.to_string(), value_json(value)))
            .collect(),
    )
}

/// The properties that are present, as a JSON object named as on the wire.
pub fn properties_json(p: &BasicProperties) -> Value {
    let mut map = Map::new();
    let mut text = |name: &str, value: &Option<ShortString>| {
        if let Some(value) = value {
            map.insert(name.to_owned(), json!(value.to_string_lossy()));
        }
    };
    text("content_type", &p.content_type);
    text("content_encoding", &p.content_encoding);
    text("correlation_id", &p.correlation_id);
    text("reply_to", &p.reply_to);
    text("expiration", &p.expiration);
    text("message_id", &p.message_id);
    text("type", &p.kind);
    text("user_id", &p.user_id);
    text("app_id", &p.app_id);
    if let Some(headers) = &p.headers {
        map.insert("headers".to_owned(), table_json(headers));
    }
    if let Some(mode) = p.delivery_mode {
        map.insert("delivery_mode".to_owned(), json!(mode));
    }
    if let Some(priority) = p.priority {
        map.insert("priority".to_owned(), json!(priority));
    }
    if let Some(timestamp) = p.timestamp {
        map.insert("timestamp".to_owned(), json!(timestamp));
    }
    Value::Object(map)
}

/// A body as JSON fields: `body` when it is UTF-8, else `body_base64`, so a
/// reader never gets a lossy copy.
pub fn body_json(body: &[u8], into: &mut Map<String, Value>) {
    match std::str::from_utf8(body) {
        Ok(text) => into.insert("body".to_owned(), json!(text)),
        Err(_) => into.insert("body_base64".to_owned(), json!(base64(body))),
    };
}
