//! The emitter of the blocking API's channel methods
//! (`amqp-client/src/blocking/generated.rs`): one blocking method on
//! `blocking::Channel` per generated method of the async `Channel`, which it
//! calls and waits for. Kept apart from `emit.rs` so that the two can change
//! alone; both choose their methods with [`Method::channel_method`].

use proc_macro2::TokenStream;
use quote::{format_ident, quote};

use crate::emit::{doc, no_wait_line, paragraphs, sends_line};
use crate::model::{camel, Method, Model};

/// Whether `m` has a generated channel method: the async `Channel`'s
/// choice ([`Method::channel_method`]), so that the two stay one to one.
fn is_stub(m: &Method) -> bool {
    m.channel_method().is_some()
}

/// The docs of the blocking method of `m` (`no_wait`: its `_no_wait`
/// variant): the method's own from the docs file, what it sends and waits
/// for, and the async method it waits on.
fn doc_text(m: &Method, no_wait: bool) -> String {
    let Some(name) = m.channel_method() else {
        return String::new();
    };
    if no_wait {
        return no_wait_line(m, &name);
    }
    paragraphs(
        m.doc.as_deref(),
        &format!(
            "{} The blocking form of [`Channel::{name}`](crate::Channel::{name}).",
            sends_line(m)
        ),
    )
}

/// The blocking method(s) of `m`, if it has a stub.
fn blocking_stub(m: &Method) -> Option<TokenStream> {
    if !is_stub(m) {
        return None;
    }
    let full = m.full_name();
    let fn_name = format_ident!("{}_{}", m.class_name, m.name.replace('-', "_"));
    let module = format_ident!("{}", m.class_name);
    let request = format_ident!("{}", camel(&m.name));
    let has_args = m.fields.iter().any(|f| !f.reserved);
    let (param, arg) = if has_args {
        (quote!(args: #module::#request), quote!(args))
    } else {
        (quote!(), quote!())
    };
    let reply_ty = match m.replies.as_slice() {
        [] => quote!(()),
        [(_, _, reply)] => {
            let reply = format_ident!("{}", camel(reply));
            quote!(#module::#reply)
        }
        _ => quote!(Method),
    };
    let d = doc(&doc_text(m, false));
    let mut out = quote! {
        #d
        pub fn #fn_name(&self, #param) -> Result<#reply_ty, Error> {
            self.run(#full, |channel| channel.#fn_name(#arg))
        }
    };
    if m.has_no_wait() && !m.replies.is_empty() {
        let nw = format_ident!("{}_no_wait", fn_name);
        let d = doc(&doc_text(m, true));
        out.extend(quote! {
            #d
            pub fn #nw(&self, args: #module::#request) -> Result<(), Error> {
                self.run(#full, |channel| channel.#nw(args))
            }
        });
    }
    Some(out)
}

/// `blocking/generated.rs`: the blocking channel methods.
pub fn blocking_stubs(model: &Model) -> TokenStream {
    let fns = model.methods().filter_map(blocking_stub);
    quote! {
        use super::Channel;
        use crate::error::Error;
        use crate::protocol::methods::*;

        /// The generated methods: each calls the async stub of the same name
        /// and waits for its answer.
        impl Channel {
            #(#fns)*
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{merge, parse};

    const SPEC: &str = include_str!("../../spec/amqp0-9-1.xml");
    const OVERLAY: &str = include_str!("../../spec/rabbitmq-extensions.xml");

    /// The names of the functions in `tokens` (an item list), wherever they
    /// are nested: trait methods and impl methods alike.
    fn function_names(tokens: TokenStream) -> Vec<String> {
        let file: syn::File = syn::parse2(tokens).expect("generated code parses");
        let mut names = Vec::new();
        for item in file.items {
            match item {
                syn::Item::Trait(t) => names.extend(t.items.iter().filter_map(|i| match i {
                    syn::TraitItem::Fn(f) => Some(f.sig.ident.to_string()),
                    _ => None,
                })),
                syn::Item::Impl(i) => names.extend(i.items.iter().filter_map(|i| match i {
                    syn::ImplItem::Fn(f) => Some(f.sig.ident.to_string()),
                    _ => None,
                })),
                _ => {}
            }
        }
        names.sort();
        names
    }

    #[test]
    fn every_async_stub_has_a_blocking_method_of_the_same_name() {
        let model = crate::model::lower(&merge(
            parse(SPEC).expect("spec"),
            parse(OVERLAY).expect("overlay"),
        ))
        .expect("lower");
        let asynchronous = function_names(crate::emit::channel_methods(&model));
        let blocking = function_names(blocking_stubs(&model));
        assert!(asynchronous.contains(&"queue_declare".to_owned()));
        assert_eq!(asynchronous, blocking);
    }
}
