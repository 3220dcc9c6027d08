//! Emitters: one function per generated file, each returning a token stream.

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote};

use crate::model::{camel, Direction, Field, FieldGroup, Method, Model, ReplyKind, WireType};

/// Doc attributes, one per line of `text` (Markdown).
pub(crate) fn doc(text: &str) -> TokenStream {
    let lines = text.lines().map(|line| {
        let line = if line.is_empty() {
            String::new()
        } else {
            format!(" {line}")
        };
        quote!(#[doc = #line])
    });
    quote!(#(#lines)*)
}

/// `text` (from the docs file, required by [`crate::docs::apply`]) and
/// `more`, as paragraphs.
pub(crate) fn paragraphs(text: Option<&str>, more: &str) -> String {
    match text {
        Some(text) if !text.is_empty() => format!("{text}\n\n{more}"),
        _ => more.to_owned(),
    }
}

/// A value for a field in a generated doc example, for the fields that
/// read better with one than with their default.
fn example_value(f: &Field) -> Option<&'static str> {
    Some(match (f.ident.as_str(), f.wire) {
        ("queue", WireType::ShortStr) => "\"my-queue\".into()",
        ("exchange" | "source", WireType::ShortStr) => "\"my-exchange\".into()",
        ("destination", WireType::ShortStr) => "\"my-other-exchange\".into()",
        ("routing_key", WireType::ShortStr) => "\"my-key\".into()",
        ("kind", WireType::ShortStr) => "\"direct\".into()",
        ("consumer_tag", WireType::ShortStr) => "\"my-consumer\".into()",
        ("durable" | "requeue" | "active", WireType::Bit) => "true",
        ("prefetch_count", WireType::Short) => "10",
        _ => return None,
    })
}

/// The expression of a doc example that sends `m` through its generated
/// channel method `name`, awaited.
fn example_call(m: &Method, name: &str) -> String {
    let visible: Vec<&Field> = m.fields.iter().filter(|f| !f.reserved).collect();
    if visible.is_empty() {
        return format!("channel.{name}().await?");
    }
    let path = format!("{}::{}", m.class_name, camel(&m.name));
    let set: Vec<String> = visible
        .iter()
        .filter_map(|f| example_value(f).map(|v| format!("        {}: {v},", f.ident)))
        .collect();
    if set.is_empty() {
        return format!("channel.{name}({path}::default()).await?");
    }
    let rest = if set.len() < visible.len() {
        "        ..Default::default()\n"
    } else {
        ""
    };
    format!(
        "channel\n    .{name}({path} {{\n{}\n{rest}    }})\n    .await?",
        set.join("\n")
    )
}

/// A `no_run` doc example section around `code`.
fn example_section(code: &str) -> String {
    format!("# Example\n\n```no_run\n{code}\n```")
}

/// The body of a doc example given a `channel`.
fn on_a_channel(body: &str) -> String {
    let prelude = if body.contains("::") {
        "use amqp091::prelude::*;\n\n"
    } else {
        ""
    };
    format!(
        "# async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {{\n\
         {prelude}{body}\n# Ok(())\n# }}"
    )
}

/// The doc example of a method struct: the docs file's, or one sending it
/// through its channel method, or (for a reply) one reading a field of it.
fn method_example(model: &Model, m: &Method) -> Option<String> {
    if let Some(example) = &m.example {
        return Some(example_section(example));
    }
    if let Some(name) = m.channel_method() {
        return Some(example_section(&on_a_channel(&format!(
            "{};",
            example_call(m, &name)
        ))));
    }
    let field = m.fields.iter().find(|f| !f.reserved)?;
    let request = model.methods().find(|r| {
        r.replies
            .iter()
            .any(|(c, id, _)| (*c, *id) == (m.class_id, m.method_id))
    })?;
    let name = request.channel_method()?;
    let var = m.name.replace('-', "_");
    Some(example_section(&on_a_channel(&format!(
        "let {var} = {};\nprintln!(\"{{:?}}\", {var}.{});",
        example_call(request, &name),
        field.ident
    ))))
}

fn variant_ident(m: &Method) -> proc_macro2::Ident {
    format_ident!("{}{}", camel(&m.class_name), camel(&m.name))
}

fn struct_path(m: &Method) -> TokenStream {
    let module = format_ident!("{}", m.class_name);
    let name = format_ident!("{}", camel(&m.name));
    quote!(#module::#name)
}

fn rust_type(wire: WireType) -> TokenStream {
    match wire {
        WireType::Octet => quote!(u8),
        WireType::Short => quote!(u16),
        WireType::Long => quote!(u32),
        WireType::LongLong | WireType::Timestamp => quote!(u64),
        WireType::ShortStr => quote!(ShortString),
        WireType::LongStr => quote!(Bytes),
        WireType::Bit => quote!(bool),
        WireType::Table => quote!(FieldTable),
    }
}

fn wire_kind(wire: WireType) -> TokenStream {
    match wire {
        WireType::Octet => quote!(WireKind::Octet),
        WireType::Short => quote!(WireKind::Short),
        WireType::Long => quote!(WireKind::Long),
        WireType::LongLong => quote!(WireKind::LongLong),
        WireType::Timestamp => quote!(WireKind::Timestamp),
        WireType::ShortStr => quote!(WireKind::ShortStr),
        WireType::LongStr => quote!(WireKind::LongStr),
        WireType::Bit => quote!(WireKind::Bit),
        WireType::Table => quote!(WireKind::Table),
    }
}

fn wire_name(wire: WireType) -> &'static str {
    match wire {
        WireType::Octet => "octet",
        WireType::Short => "short",
        WireType::Long => "long",
        WireType::LongLong => "longlong",
        WireType::Timestamp => "timestamp",
        WireType::ShortStr => "shortstr",
        WireType::LongStr => "longstr",
        WireType::Bit => "bit",
        WireType::Table => "table",
    }
}

fn is_by_reference(wire: WireType) -> bool {
    matches!(
        wire,
        WireType::ShortStr | WireType::LongStr | WireType::Table
    )
}

/// Writes `reference` (an expression of type `&T` for a by-reference field) to `buf`.
fn encode_reference(wire: WireType, reference: TokenStream) -> TokenStream {
    match wire {
        WireType::ShortStr => quote!(wire::write_short_string(buf, #reference);),
        WireType::LongStr => quote!(wire::write_long_string(buf, #reference);),
        WireType::Table => quote!(wire::write_table(buf, #reference);),
        other => encode_value(other, reference),
    }
}

/// Writes `value` (an expression of the field's Rust type) to `buf`.
fn encode_value(wire: WireType, value: TokenStream) -> TokenStream {
    match wire {
        WireType::Octet => quote!(buf.put_u8(#value);),
        WireType::Short => quote!(buf.put_u16(#value);),
        WireType::Long => quote!(buf.put_u32(#value);),
        WireType::LongLong | WireType::Timestamp => quote!(buf.put_u64(#value);),
        WireType::ShortStr => quote!(wire::write_short_string(buf, &#value);),
        WireType::LongStr => quote!(wire::write_long_string(buf, &#value);),
        WireType::Table => quote!(wire::write_table(buf, &#value);),
        WireType::Bit => unreachable_bit(),
    }
}

fn encode_reserved(wire: WireType) -> TokenStream {
    match wire {
        WireType::Octet | WireType::ShortStr => quote!(buf.put_u8(0);),
        WireType::Short => quote!(buf.put_u16(0);),
        WireType::Long | WireType::LongStr | WireType::Table => quote!(buf.put_u32(0);),
        WireType::LongLong | WireType::Timestamp => quote!(buf.put_u64(0);),
        WireType::Bit => unreachable_bit(),
    }
}

fn decode_value(wire: WireType) -> TokenStream {
    match wire {
        WireType::Octet => quote!(wire::read_u8(buf)?),
        WireType::Short => quote!(wire::read_u16(buf)?),
        WireType::Long => quote!(wire::read_u32(buf)?),
        WireType::LongLong | WireType::Timestamp => quote!(wire::read_u64(buf)?),
        WireType::ShortStr => quote!(wire::read_short_string(buf)?),
        WireType::LongStr => quote!(wire::read_long_string(buf)?),
        WireType::Table => quote!(wire::read_table(buf)?),
        WireType::Bit => unreachable_bit(),
    }
}

/// Steps over a value of `wire` type, checking it as [`decode_value`] would.
fn skip_value(wire: WireType) -> TokenStream {
    match wire {
        WireType::Octet => quote!(wire::read_u8(buf)?;),
        WireType::Short => quote!(wire::read_u16(buf)?;),
        WireType::Long => quote!(wire::read_u32(buf)?;),
        WireType::LongLong | WireType::Timestamp => quote!(wire::read_u64(buf)?;),
        WireType::ShortStr => quote!(wire::skip_short_string(buf)?;),
        WireType::LongStr => quote!(wire::skip_long_string(buf)?;),
        WireType::Table => quote!(wire::skip_table(buf)?;),
        WireType::Bit => unreachable_bit(),
    }
}

fn unreachable_bit() -> TokenStream {
    // Bits are always grouped; a lone bit never reaches the value emitters.
    quote!(compile_error!("bit outside a bit group");)
}

fn bit_mask(position: usize) -> Literal {
    Literal::u8_suffixed(1u8 << position)
}

fn method_struct(model: &Model, m: &Method) -> TokenStream {
    let name = format_ident!("{}", camel(&m.name));
    let full = m.full_name();
    let sender = match m.direction {
        Direction::ToServer => "the client",
        Direction::ToClient => "the server",
        Direction::Both => "either peer",
    };
    let mut summary = format!(
        "`{full}` ({}/{}), sent by {sender}.",
        m.class_id, m.method_id
    );
    if m.content {
        summary.push_str(" Content (header and body frames) follows it.");
    }
    if !m.replies.is_empty() {
        let replies: Vec<String> = m
            .replies
            .iter()
            .map(|(_, _, r)| format!("`{}.{r}`", m.class_name))
            .collect();
        summary.push_str(&format!(" Answered by {}.", replies.join(" or ")));
    }
    if let Some(channel_method) = m.channel_method() {
        summary.push_str(&format!(
            " Sent with [`Channel::{channel_method}`](crate::Channel::{channel_method})."
        ));
    }
    let mut text = paragraphs(m.doc.as_deref(), &summary);
    if let Some(example) = method_example(model, m) {
        text = format!("{text}\n\n{example}");
    }
    let struct_doc = doc(&text);

    let visible: Vec<_> = m.fields.iter().filter(|f| !f.reserved).collect();
    let field_defs = visible.iter().map(|f| {
        let ident = format_ident!("{}", f.ident);
        let ty = rust_type(f.wire);
        let mut wire = format!("`{}` ({}).", f.spec_name, wire_name(f.wire));
        if f.secret {
            wire.push_str(" A credential: `Debug` prints only its length.");
        }
        let d = doc(&paragraphs(f.doc.as_deref(), &wire));
        quote!(#d pub #ident: #ty,)
    });

    let mut encode = Vec::new();
    let mut decode = Vec::new();
    for group in m.groups() {
        match group {
            FieldGroup::Single(f) if f.reserved => {
                encode.push(encode_reserved(f.wire));
                let read = decode_value(f.wire);
                decode.push(quote!(let _ = #read;));
            }
            FieldGroup::Single(f) => {
                let ident = format_ident!("{}", f.ident);
                encode.push(encode_value(f.wire, quote!(self.#ident)));
                let read = decode_value(f.wire);
                decode.push(quote!(let #ident = #read;));
            }
            FieldGroup::Bits(bits) => {
                let sets = bits
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| !f.reserved)
                    .map(|(i, f)| {
                        let ident = format_ident!("{}", f.ident);
                        let mask = bit_mask(i);
                        quote!(if self.#ident { bits |= #mask; })
                    });
                let all_reserved = bits.iter().all(|f| f.reserved);
                if all_reserved {
                    encode.push(quote!(buf.put_u8(0);));
                    decode.push(quote!(let _ = wire::read_u8(buf)?;));
                } else {
                    encode.push(quote!({ let mut bits = 0u8; #(#sets)* buf.put_u8(bits); }));
                    let gets =
                        bits.iter()
                            .enumerate()
                            .filter(|(_, f)| !f.reserved)
                            .map(|(i, f)| {
                                let ident = format_ident!("{}", f.ident);
                                let mask = bit_mask(i);
                                quote!(let #ident = bits & #mask != 0;)
                            });
                    decode.push(quote!(let bits = wire::read_u8(buf)?; #(#gets)*));
                }
            }
        }
    }
    let field_names = visible.iter().map(|f| format_ident!("{}", f.ident));
    let checks: Vec<_> = visible
        .iter()
        .filter_map(|f| check_field(f, quote!(self.), true))
        .collect();
    let buf_param = if m.fields.is_empty() {
        quote!(_buf)
    } else {
        quote!(buf)
    };

    let class_id = m.class_id;
    let method_id = m.method_id;
    let synchronous = m.synchronous;
    let content = m.content;
    let direction = match m.direction {
        Direction::ToServer => quote!(Direction::ToServer),
        Direction::ToClient => quote!(Direction::ToClient),
        Direction::Both => quote!(Direction::Both),
    };
    let replies = m
        .replies
        .iter()
        .map(|(c, id, _)| quote!(MethodId::new(#c, #id)));
    let field_infos = m.fields.iter().map(|f| {
        let n = &f.spec_name;
        let k = wire_kind(f.wire);
        let r = f.reserved;
        quote!(FieldInfo { name: #n, kind: #k, reserved: #r })
    });
    let variant = variant_ident(m);
    let (derives, debug_impl) = if visible.iter().any(|f| f.secret) {
        (
            quote!(#[derive(Clone, PartialEq, Default)]),
            redacting_debug(&name, &visible),
        )
    } else {
        (
            quote!(#[derive(Debug, Clone, PartialEq, Default)]),
            quote!(),
        )
    };
    quote! {
        #struct_doc
        #derives
        pub struct #name { #(#field_defs)* }

        #debug_impl

        impl #name {
            /// What the spec says of this method.
            pub const INFO: MethodInfo = MethodInfo {
                id: MethodId::new(#class_id, #method_id),
                name: #full,
                synchronous: #synchronous,
                content: #content,
                direction: #direction,
                replies: &[#(#replies),*],
                fields: &[#(#field_infos),*],
            };

            /// Checks that every shortstr argument (and every key of a
            /// table argument) fits the 255 bytes of the wire, which the
            /// encoders assume, and that every shortstr argument is UTF-8,
            /// which RabbitMQ requires: callers check it before anything
            /// is queued.
            #[inline]
            pub fn check_short_strings(&self) -> Result<(), BadField> {
                #(#checks)*
                Ok(())
            }

            /// Writes the arguments (everything after the class and method ids).
            #[inline]
            pub fn encode_args(&self, #buf_param: &mut BytesMut) {
                #(#encode)*
            }

            /// Reads the arguments (everything after the class and method ids).
            #[inline]
            pub fn decode_args(#buf_param: &mut wire::Input<'_>) -> Result<Self, DecodeError> {
                #(#decode)*
                Ok(Self { #(#field_names),* })
            }
        }

        impl From<#name> for Method {
            fn from(method: #name) -> Method {
                Method::#variant(method)
            }
        }

        impl TryFrom<Method> for #name {
            type Error = Method;
            fn try_from(method: Method) -> Result<Self, Method> {
                match method {
                    Method::#variant(m) => Ok(m),
                    other => Err(other),
                }
            }
        }
    }
}

/// The check of a shortstr or table field reached through `prefix` (`self.`
/// for a method's field), `None` for other wire types: its length, and for a
/// method's shortstr (`in_method`) that it is UTF-8, as RabbitMQ requires
/// there (properties and table keys it passes on as bytes).
fn check_field(f: &Field, prefix: TokenStream, in_method: bool) -> Option<TokenStream> {
    let ident = format_ident!("{}", f.ident);
    let name = &f.spec_name;
    match f.wire {
        WireType::ShortStr => {
            let utf8 = in_method.then(|| {
                quote! {
                    if !#prefix #ident.is_utf8() {
                        return Err(BadField::NotUtf8 { field: #name });
                    }
                }
            });
            Some(quote! {
                if let Err(e) = #prefix #ident.check() {
                    return Err(BadField::TooLong { field: #name, len: e.len });
                }
                #utf8
            })
        }
        WireType::Table => Some(quote! {
            if let Err(e) = #prefix #ident.check_keys() {
                return Err(BadField::TooLong { field: #name, len: e.len });
            }
        }),
        _ => None,
    }
}

/// The `Debug` of a method with secret fields: what the derive would print,
/// with each secret replaced by its length.
fn redacting_debug(name: &proc_macro2::Ident, visible: &[&Field]) -> TokenStream {
    let type_name = name.to_string();
    let fields = visible.iter().map(|f| {
        let ident = format_ident!("{}", f.ident);
        let label = &f.ident;
        if f.secret {
            quote!(.field(#label, &format_args!("<redacted, {} bytes>", self.#ident.len())))
        } else {
            quote!(.field(#label, &self.#ident))
        }
    });
    quote! {
        /// Prints every field but the credential, of which only the length.
        impl core::fmt::Debug for #name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.debug_struct(#type_name) #(#fields)* .finish()
            }
        }
    }
}

/// `methods.rs`: one module per class, one struct per method, the `Method` enum.
pub fn methods(model: &Model) -> TokenStream {
    let modules = model.classes.iter().map(|class| {
        let module = format_ident!("{}", class.name);
        let structs = class.methods.iter().map(|m| method_struct(model, m));
        let d = doc(&paragraphs(
            class.doc.as_deref(),
            &format!("Methods of the `{}` class ({}).", class.name, class.id),
        ));
        quote! {
            #d
            pub mod #module {
                use super::*;
                #(#structs)*
            }
        }
    });
    let all: Vec<&Method> = model.methods().collect();
    let variants = all.iter().map(|m| {
        let v = variant_ident(m);
        let p = struct_path(m);
        let d = doc(&format!(
            "`{}`: see [`{}::{}`].",
            m.full_name(),
            m.class_name,
            camel(&m.name)
        ));
        quote!(#d #v(#p),)
    });
    let info_arms = all.iter().map(|m| {
        let v = variant_ident(m);
        let p = struct_path(m);
        quote!(Method::#v(_) => &#p::INFO,)
    });
    let encode_arms = all.iter().map(|m| {
        let v = variant_ident(m);
        quote!(Method::#v(m) => m.encode_args(buf),)
    });
    let check_arms = all.iter().map(|m| {
        let v = variant_ident(m);
        quote!(Method::#v(m) => m.check_short_strings(),)
    });
    let decode_arm = |m: &&Method| {
        let v = variant_ident(m);
        let p = struct_path(m);
        let (c, id) = (m.class_id, m.method_id);
        quote!((#c, #id) => Method::#v(#p::decode_args(buf)?),)
    };
    let message_path_arms = all.iter().filter(|m| m.on_message_path()).map(decode_arm);
    let other_decode_arms = all.iter().filter(|m| !m.on_message_path()).map(decode_arm);
    let infos = all.iter().map(|m| {
        let p = struct_path(m);
        quote!(&#p::INFO,)
    });
    quote! {
        use bytes::{BufMut, Bytes, BytesMut};

        use crate::protocol::error::DecodeError;
        use crate::protocol::method_info::{Direction, FieldInfo, MethodId, MethodInfo, WireKind};
        use crate::protocol::wire::{self, FieldTable, BadField, ShortString};

        #(#modules)*

        /// Every method of the spec, as sent or received on a channel.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Method {
            #(#variants)*
        }

        /// What the spec says of every method, in spec order.
        pub static ALL_METHODS: &[&MethodInfo] = &[#(#infos)*];

        impl Method {
            /// What the spec says of this method.
            pub fn info(&self) -> &'static MethodInfo {
                match self { #(#info_arms)* }
            }

            /// Checks that every shortstr argument (and table key) fits
            /// 255 bytes and every shortstr argument is UTF-8; see the method
            /// structs' `check_short_strings`.
            pub fn check_short_strings(&self) -> Result<(), BadField> {
                match self { #(#check_arms)* }
            }

            /// Writes the arguments (everything after the class and method ids).
            pub fn encode_args(&self, buf: &mut BytesMut) {
                match self { #(#encode_arms)* }
            }

            /// Reads the arguments of the method `id` (the ids already consumed).
            ///
            /// The methods that arrive once per message are decoded inline, so
            /// that a delivery is built where the caller keeps it; moving a
            /// decoded `Method` out of a separate dispatch function cost more
            /// than decoding it.
            #[inline]
            pub fn decode_args(id: MethodId, buf: &mut wire::Input<'_>) -> Result<Method, DecodeError> {
                Ok(match (id.class_id, id.method_id) {
                    #(#message_path_arms)*
                    _ => return Self::decode_other_args(id, buf),
                })
            }

            /// Reads the arguments of a method that is not on the message path.
            #[inline(never)]
            fn decode_other_args(id: MethodId, buf: &mut wire::Input<'_>) -> Result<Method, DecodeError> {
                Ok(match (id.class_id, id.method_id) {
                    #(#other_decode_arms)*
                    _ => return Err(DecodeError::UnknownMethod(id)),
                })
            }
        }
    }
}

/// `constants.rs`: protocol version, frame constants, reply codes.
pub fn constants(model: &Model) -> TokenStream {
    let (major, minor, revision) = model.version;
    let port = model.port;
    let consts = model.constants.iter().map(|(name, value)| {
        let ident = format_ident!("{}", name.replace('-', "_").to_uppercase());
        let d = doc(&format!("`{name}` from the spec."));
        if name.starts_with("frame-") && name != "frame-min-size" {
            let v = u8::try_from(*value).unwrap_or(u8::MAX);
            quote!(#d pub const #ident: u8 = #v;)
        } else {
            quote!(#d pub const #ident: u32 = #value;)
        }
    });
    let codes = model.reply_codes.iter().map(|c| {
        let ident = format_ident!("{}", c.name.replace('-', "_").to_uppercase());
        let v = c.value;
        let d = doc(&format!("{v} `{}`.", c.name));
        quote!(#d pub const #ident: ReplyCode = ReplyCode(#v);)
    });
    let name_arms = model.reply_codes.iter().map(|c| {
        let v = c.value;
        let n = c.name.replace('-', "_").to_uppercase();
        quote!(#v => Some(#n),)
    });
    let kind_arms = model.reply_codes.iter().map(|c| {
        let v = c.value;
        let k = match c.kind {
            ReplyKind::Success => quote!(ReplyKind::Success),
            ReplyKind::Soft => quote!(ReplyKind::SoftError),
            ReplyKind::Hard => quote!(ReplyKind::HardError),
        };
        quote!(#v => Some(#k),)
    });
    let errors: Vec<_> = model
        .reply_codes
        .iter()
        .filter(|c| c.kind != ReplyKind::Success)
        .collect();
    let error_variants = errors.iter().map(|c| {
        let v = format_ident!("{}", camel(&c.name));
        let kind = if c.kind == ReplyKind::Soft {
            "channel"
        } else {
            "connection"
        };
        let d = doc(&format!("{} `{}`: closes the {kind}.", c.value, c.name));
        quote!(#d #v,)
    });
    let error_from_code = errors.iter().map(|c| {
        let v = format_ident!("{}", camel(&c.name));
        let n = c.value;
        quote!(#n => ReplyError::#v,)
    });
    let error_to_code = errors.iter().map(|c| {
        let v = format_ident!("{}", camel(&c.name));
        let ident = format_ident!("{}", c.name.replace('-', "_").to_uppercase());
        quote!(ReplyError::#v => ReplyCode::#ident,)
    });
    let all_codes = model.reply_codes.iter().map(|c| {
        let ident = format_ident!("{}", c.name.replace('-', "_").to_uppercase());
        quote!(ReplyCode::#ident,)
    });
    quote! {
        /// The protocol version: (major, minor, revision).
        pub const PROTOCOL_VERSION: (u8, u8, u8) = (#major, #minor, #revision);
        /// The 8-byte header a client sends first.
        pub const PROTOCOL_HEADER: [u8; 8] = [b'A', b'M', b'Q', b'P', 0, #major, #minor, #revision];
        /// The IANA port of `amqp://`.
        pub const DEFAULT_PORT: u16 = #port;
        #(#consts)*

        /// Whether a reply code reports success, a channel error or a connection error.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ReplyKind {
            /// 200: no error.
            Success,
            /// A soft error: the broker closes the channel.
            SoftError,
            /// A hard error: the broker closes the connection.
            HardError,
        }

        /// A reply code as carried by `connection.close`, `channel.close` and
        /// `basic.return`. Codes the spec does not define are kept as they are.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct ReplyCode(pub u16);

        impl ReplyCode {
            #(#codes)*

            /// Every reply code the spec defines.
            pub const ALL: &'static [ReplyCode] = &[#(#all_codes)*];

            /// The number on the wire.
            pub const fn code(self) -> u16 {
                self.0
            }

            /// The spec's name (`NOT_FOUND`), if the spec defines the code.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    #(#name_arms)*
                    _ => None,
                }
            }

            /// Success, soft or hard error, if the spec defines the code.
            pub const fn kind(self) -> Option<ReplyKind> {
                match self.0 {
                    #(#kind_arms)*
                    _ => None,
                }
            }

            /// Whether the spec says this code closes the connection.
            pub const fn is_hard_error(self) -> bool {
                matches!(self.kind(), Some(ReplyKind::HardError))
            }

            /// Whether the spec says this code closes only the channel.
            pub const fn is_soft_error(self) -> bool {
                matches!(self.kind(), Some(ReplyKind::SoftError))
            }
        }

        /// The error a reply code reports, one variant per error code of the spec.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ReplyError {
            #(#error_variants)*
            /// A code the spec does not define (or 200, which is no error).
            Other(u16),
        }

        impl ReplyError {
            /// The reply code.
            pub const fn code(self) -> ReplyCode {
                match self {
                    #(#error_to_code)*
                    ReplyError::Other(code) => ReplyCode(code),
                }
            }
        }

        impl From<ReplyCode> for ReplyError {
            fn from(code: ReplyCode) -> Self {
                match code.0 {
                    #(#error_from_code)*
                    other => ReplyError::Other(other),
                }
            }
        }

        impl core::fmt::Debug for ReplyCode {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(name) => write!(f, "{}({})", name, self.0),
                    None => write!(f, "ReplyCode({})", self.0),
                }
            }
        }

        impl core::fmt::Display for ReplyCode {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(name) => write!(f, "{} {}", self.0, name),
                    None => write!(f, "{}", self.0),
                }
            }
        }
    }
}

/// `properties.rs`: the content header properties of every class that has them.
pub fn properties(model: &Model) -> TokenStream {
    let items = model.classes.iter().filter(|c| !c.properties.is_empty()).map(|class| {
        let name = format_ident!("{}Properties", camel(&class.name));
        let count = class.properties.len();
        let d = doc(&format!(
            "The {count} content header properties of the `{}` class; `None` is absent on the wire.",
            class.name
        ));
        let fields = class.properties.iter().map(|f| {
            let ident = format_ident!("{}", f.ident);
            let ty = rust_type(f.wire);
            let fd = doc(&paragraphs(
                f.doc.as_deref(),
                &format!("`{}` ({}).", f.spec_name, wire_name(f.wire)),
            ));
            quote!(#fd pub #ident: Option<#ty>,)
        });
        let setters = class.properties.iter().map(|f| {
            let ident = format_ident!("{}", f.ident);
            let setter = format_ident!("with_{}", f.ident);
            let fd = doc(&format!("Sets [`{}`](Self::{}).", f.ident, f.ident));
            if f.wire == WireType::ShortStr {
                // `&str` and `String` too; an over-long value is refused
                // when the message is published.
                quote!(#fd #[must_use] pub fn #setter(mut self, value: impl Into<ShortString>) -> Self { self.#ident = Some(value.into()); self })
            } else {
                let ty = rust_type(f.wire);
                quote!(#fd #[must_use] pub fn #setter(mut self, value: #ty) -> Self { self.#ident = Some(value); self })
            }
        });
        let prop_checks = class.properties.iter().filter_map(|f| {
            let ident = format_ident!("{}", f.ident);
            let check = check_field(f, quote!(), false)?;
            Some(quote!(if let Some(#ident) = &self.#ident { #check }))
        });
        let encodes = class.properties.iter().enumerate().map(|(i, f)| {
            let ident = format_ident!("{}", f.ident);
            let mask = Literal::u16_suffixed(1u16 << (15 - i));
            if is_by_reference(f.wire) {
                let write = encode_reference(f.wire, quote!(value));
                quote!(if let Some(value) = &self.#ident { flags |= #mask; #write })
            } else {
                let write = encode_value(f.wire, quote!(value));
                quote!(if let Some(value) = self.#ident { flags |= #mask; #write })
            }
        });
        let decodes = class.properties.iter().enumerate().map(|(i, f)| {
            let ident = format_ident!("{}", f.ident);
            let mask = Literal::u16_suffixed(1u16 << (15 - i));
            let read = decode_value(f.wire);
            quote!(let #ident = if flags & #mask != 0 { Some(#read) } else { None };)
        });
        let skips = class.properties.iter().enumerate().map(|(i, f)| {
            let mask = Literal::u16_suffixed(1u16 << (15 - i));
            let skip = skip_value(f.wire);
            quote!(if flags & #mask != 0 { #skip })
        });
        let table_mask = class
            .properties
            .iter()
            .enumerate()
            .filter(|(_, f)| f.wire == WireType::Table)
            .fold(0u16, |acc, (i, _)| acc | (1u16 << (15 - i)));
        let table_mask = Literal::u16_suffixed(table_mask);
        let idents = class.properties.iter().map(|f| format_ident!("{}", f.ident));
        let known_mask = class
            .properties
            .iter()
            .enumerate()
            .fold(0u16, |acc, (i, _)| acc | (1u16 << (15 - i)));
        let known_mask = Literal::u16_suffixed(known_mask);
        quote! {
            #d
            #[derive(Debug, Clone, PartialEq, Default)]
            pub struct #name { #(#fields)* }

            impl #name {
                /// The property flags of the properties that are field tables.
                pub const TABLE_FLAGS: u16 = #table_mask;

                #(#setters)*

                /// Checks that every shortstr property (and every key of the
                /// headers) fits the 255 bytes of the wire: the encoder
                /// assumes it, and publishing checks it first.
                #[inline]
                pub fn check_short_strings(&self) -> Result<(), BadField> {
                    #(#prop_checks)*
                    Ok(())
                }

                /// Writes the property flags and the present properties.
                pub fn encode(&self, buf: &mut BytesMut) {
                    let flags_at = buf.len();
                    buf.put_u16(0);
                    let mut flags = 0u16;
                    #(#encodes)*
                    buf[flags_at..flags_at + 2].copy_from_slice(&flags.to_be_bytes());
                }

                /// Reads the property flags and the properties they announce.
                #[inline]
                pub fn decode(buf: &mut wire::Input<'_>) -> Result<Self, DecodeError> {
                    let flags = wire::read_u16(buf)?;
                    if flags & !#known_mask != 0 {
                        return Err(DecodeError::UnknownPropertyFlags(flags));
                    }
                    #(#decodes)*
                    Ok(Self { #(#idents),* })
                }

                /// Checks the property flags and the properties they announce
                /// and steps over them without building them: it fails exactly
                /// where [`Self::decode`] fails.
                #[inline]
                pub fn skip(buf: &mut wire::Input<'_>) -> Result<(), DecodeError> {
                    let flags = wire::read_u16(buf)?;
                    if flags & !#known_mask != 0 {
                        return Err(DecodeError::UnknownPropertyFlags(flags));
                    }
                    #(#skips)*
                    Ok(())
                }
            }
        }
    });
    quote! {
        use bytes::{BufMut, Bytes, BytesMut};

        use crate::protocol::error::DecodeError;
        use crate::protocol::wire::{self, FieldTable, BadField, ShortString};

        #(#items)*
    }
}

/// The `Channel` method (and its `_no_wait` twin) that sends `m`, if it gets one.
fn channel_method(m: &Method) -> Option<TokenStream> {
    let fn_name = format_ident!("{}", m.channel_method()?);
    let path = struct_path(m);
    // generated_methods.rs imports every class module.
    let struct_link = format!("[`{}::{}`]", m.class_name, camel(&m.name));
    let variant = variant_ident(m);
    let has_args = m.fields.iter().any(|f| !f.reserved);
    let (param, build) = if has_args {
        (quote!(args: #path), quote!(args))
    } else {
        (quote!(), quote!(#path {}))
    };
    let see = if has_args {
        format!("Its arguments and an example: {struct_link}.")
    } else {
        format!("An example: {struct_link}.")
    };
    let mut out = TokenStream::new();
    if m.replies.is_empty() {
        let d = doc(&paragraphs(
            m.doc.as_deref(),
            &format!("{} {see}", sends_line(m)),
        ));
        out.extend(quote! {
            #d
            pub async fn #fn_name(&self, #param) -> Result<(), Error> {
                ChannelRpc::send(self, Method::#variant(#build)).await
            }
        });
        return Some(out);
    }
    let (reply_ty, arms) = if m.replies.len() == 1 {
        let (_, _, reply_name) = &m.replies[0];
        let reply_variant = format_ident!("{}{}", camel(&m.class_name), camel(reply_name));
        let module = format_ident!("{}", m.class_name);
        let reply_struct = format_ident!("{}", camel(reply_name));
        (
            quote!(#module::#reply_struct),
            quote!(Method::#reply_variant(reply) => Ok(reply),),
        )
    } else {
        (quote!(Method), quote!(reply => Ok(reply),))
    };
    let no_wait_off = if m.has_no_wait() {
        quote!(args.no_wait = false;)
    } else {
        quote!()
    };
    let mutability = if m.has_no_wait() {
        quote!(mut)
    } else {
        quote!()
    };
    let param = if has_args {
        quote!(#mutability args: #path)
    } else {
        param
    };
    let mut sends = sends_line(m);
    if m.has_no_wait() {
        sends.push_str(&format!(
            " Its `no_wait` is ignored: [`{fn_name}_no_wait`](Self::{fn_name}_no_wait) sends it without waiting."
        ));
    }
    let d = doc(&paragraphs(m.doc.as_deref(), &format!("{sends} {see}")));
    out.extend(quote! {
        #d
        pub async fn #fn_name(&self, #param) -> Result<#reply_ty, Error> {
            #no_wait_off
            let request = Method::#variant(#build);
            match ChannelRpc::call(self, request).await? {
                #arms
                #[allow(unreachable_patterns)]
                other => Err(UnexpectedReply { request: &#path::INFO, reply: other.info() }.into()),
            }
        }
    });
    if m.has_no_wait() {
        let nw = format_ident!("{}_no_wait", fn_name);
        let d = doc(&no_wait_line(m, &fn_name.to_string()));
        out.extend(quote! {
            #d
            pub async fn #nw(&self, mut args: #path) -> Result<(), Error> {
                args.no_wait = true;
                ChannelRpc::send(self, Method::#variant(args)).await
            }
        });
    }
    Some(out)
}

/// What a channel method sends and what it waits for, in its docs (the
/// async and the blocking one alike).
pub(crate) fn sends_line(m: &Method) -> String {
    let full = m.full_name();
    if m.replies.is_empty() {
        return format!("Sends `{full}`; the spec defines no reply.");
    }
    let reply_names: Vec<String> = m
        .replies
        .iter()
        .map(|(_, _, r)| format!("`{}.{r}`", m.class_name))
        .collect();
    format!("Sends `{full}` and waits for {}.", reply_names.join(" or "))
}

/// The docs of the `_no_wait` twin of the channel method `fn_name`.
pub(crate) fn no_wait_line(m: &Method, fn_name: &str) -> String {
    format!(
        "Sends `{}` with `no-wait` set: the broker sends no reply, and reports a failure by closing the channel. \
         Otherwise as [`{fn_name}`](Self::{fn_name}).",
        m.full_name()
    )
}

/// `channel/generated_methods.rs`: a `Channel` method per method a client sends on an
/// open channel, built on the two primitives of `ChannelRpc`.
pub fn channel_methods(model: &Model) -> TokenStream {
    let fns = model.methods().filter_map(channel_method);
    quote! {
        use super::Channel;
        use crate::error::Error;
        use crate::protocol::methods::*;
        use crate::protocol::rpc::{ChannelRpc, UnexpectedReply};

        /// The AMQP methods a client sends on an open channel, one call each,
        /// generated from the spec (`spec/amqp0-9-1.docs.xml` holds their docs).
        impl Channel {
            #(#fns)*
        }
    }
}
