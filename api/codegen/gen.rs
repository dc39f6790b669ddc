//! Code generation: Rust source for types, traits and dispatch, and the
//! `query-qmp-schema` answer, computed from a checked [`Schema`].

use super::schema::{Def, Kind, Member, Schema, TypeRef, BUILTINS, CONTROL_COMMANDS};
use std::collections::HashMap;
use std::fmt::Write as _;

const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "dyn", "else", "enum", "extern", "false",
    "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref",
    "return", "static", "struct", "trait", "true", "type", "unsafe", "use", "where", "while",
    "abstract", "become", "box", "do", "final", "gen", "macro", "override", "priv", "try",
    "typeof", "unsized", "virtual", "yield",
];

/// The Rust field, parameter or method name for a schema name:
/// `cpu-index` → `cpu_index`, `UUID` → `uuid`, `type` → `r#type`.
pub fn field_ident(name: &str) -> String {
    let snake: String = name
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    if matches!(snake.as_str(), "self" | "super" | "crate") {
        format!("{snake}_")
    } else if KEYWORDS.contains(&snake.as_str()) {
        format!("r#{snake}")
    } else {
        snake
    }
}

/// The Rust enum variant name for an enum value or event name:
/// `guest-panicked` → `GuestPanicked`, `x86_64` → `X86_64`, `SHUTDOWN` → `Shutdown`.
pub fn variant_ident(name: &str) -> String {
    let mut out = String::new();
    for part in name.split(['-', '_', '.']).filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        let Some(first) = chars.next() else { continue };
        if first.is_ascii_digit() && out.ends_with(|c: char| c.is_ascii_digit()) {
            out.push('_');
        }
        out.push(first.to_ascii_uppercase());
        out.extend(chars.map(|c| c.to_ascii_lowercase()));
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, 'V');
    }
    out
}

/// The Rust type name for a schema type name (kept when already CamelCase).
pub fn type_ident(name: &str) -> String {
    if name.contains(['-', '_', '.']) {
        variant_ident(name)
    } else {
        name.to_string()
    }
}

fn rust_type(ty: &TypeRef) -> String {
    match ty {
        TypeRef::Array(inner) => format!("Vec<{}>", rust_type(inner)),
        TypeRef::Named(n) => match n.as_str() {
            "str" => "String".into(),
            "number" => "f64".into(),
            "int" | "int64" => "i64".into(),
            "int8" => "i8".into(),
            "int16" => "i16".into(),
            "int32" => "i32".into(),
            "uint8" => "u8".into(),
            "uint16" => "u16".into(),
            "uint32" => "u32".into(),
            "uint64" | "size" => "u64".into(),
            "bool" => "bool".into(),
            "any" => "serde_json::Value".into(),
            other => type_ident(other),
        },
    }
}

fn member_type(m: &Member) -> String {
    if m.optional {
        format!("Option<{}>", rust_type(&m.ty))
    } else {
        rust_type(&m.ty)
    }
}

/// An expression of type `fn(&Value, &Path) -> Result<T, QmpError>` that
/// checks and converts client input of the given type.
fn visit_fn(ty: &TypeRef) -> String {
    match ty {
        TypeRef::Array(inner) => format!(
            "|v: &serde_json::Value, p: &crate::visit::Path<'_>| crate::visit::list(v, p, {})",
            visit_fn(inner)
        ),
        TypeRef::Named(n) => match n.as_str() {
            "str" => "crate::visit::string".into(),
            "number" => "crate::visit::number".into(),
            "int" | "int64" => "crate::visit::int64".into(),
            "int8" | "int16" | "int32" | "uint8" | "uint16" | "uint32" => {
                format!("crate::visit::{n}")
            }
            "uint64" | "size" => "crate::visit::uint64".into(),
            "bool" => "crate::visit::boolean".into(),
            "any" => "crate::visit::any".into(),
            other => format!("<{} as crate::visit::FromArg>::from_arg", type_ident(other)),
        },
    }
}

fn rust_str(s: &str) -> String {
    format!("{s:?}")
}

/// Rewrites schema doc text for rustdoc: `@name` → `` `name` ``, and escapes
/// brackets that rustdoc would take for links.
fn doc_text(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '@' if chars.peek().is_some_and(|c| c.is_ascii_alphabetic()) => {
                out.push('`');
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '-' || n == '_' {
                        out.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push('`');
            }
            '[' | ']' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn doc(out: &mut String, indent: &str, text: &str) {
    let text = doc_text(text);
    let text = text.trim();
    if text.is_empty() {
        return;
    }
    for line in text.lines() {
        if line.is_empty() {
            let _ = writeln!(out, "{indent}///");
        } else {
            let _ = writeln!(out, "{indent}/// {line}");
        }
    }
}

fn summary(def: &Def, fallback: &str) -> String {
    if def.doc.trim().is_empty() {
        fallback.to_string()
    } else {
        def.doc.clone()
    }
}

fn serde_field_attrs(out: &mut String, m: &Member) {
    let ident = field_ident(&m.name);
    let bare = ident.trim_start_matches("r#");
    if bare != m.name {
        let _ = writeln!(out, "    #[serde(rename = {})]", rust_str(&m.name));
    }
    if m.optional {
        let _ = writeln!(
            out,
            "    #[serde(default, skip_serializing_if = \"Option::is_none\")]"
        );
    }
}

fn member_doc(m: &Member) -> String {
    match &m.doc {
        Some(d) if !d.trim().is_empty() => d.clone(),
        _ => format!("Member `{}`.", m.name),
    }
}

fn gen_struct_fields(out: &mut String, members: &[Member]) {
    for m in members {
        doc(out, "    ", &member_doc(m));
        serde_field_attrs(out, m);
        let _ = writeln!(out, "    pub {}: {},", field_ident(&m.name), member_type(m));
    }
}

/// Emits the `FromArg` implementation that checks one struct's members.
fn gen_struct_input(out: &mut String, name: &str, members: &[Member]) {
    let ty = type_ident(name);
    let _ = writeln!(out, "impl crate::visit::FromArg for {ty} {{");
    let _ = writeln!(
        out,
        "    fn from_arg(value: &serde_json::Value, path: &crate::visit::Path<'_>) -> Result<Self, qmp::QmpError> {{"
    );
    let _ = writeln!(out, "        let map = crate::visit::object(value, path)?;");
    gen_member_reads(out, "        ", "map", members);
    let fields: Vec<String> = members.iter().map(|m| field_ident(&m.name)).collect();
    let _ = writeln!(out, "        Ok({ty} {{ {} }})", fields.join(", "));
    let _ = writeln!(out, "    }}");
    let _ = writeln!(out, "}}\n");
}

fn gen_member_reads(out: &mut String, indent: &str, map: &str, members: &[Member]) {
    for m in members {
        let how = if m.optional { "optional" } else { "required" };
        let _ = writeln!(
            out,
            "{indent}let {} = crate::visit::{how}({map}, path, {}, {})?;",
            field_ident(&m.name),
            rust_str(&m.name),
            visit_fn(&m.ty)
        );
    }
    let names: Vec<String> = members.iter().map(|m| rust_str(&m.name)).collect();
    let _ = writeln!(
        out,
        "{indent}crate::visit::check_unexpected({map}, path, &[{}])?;",
        names.join(", ")
    );
}

/// Names of the types reachable from command arguments (they need input checking).
fn input_types(schema: &Schema) -> Vec<String> {
    fn walk(schema: &Schema, ty: &TypeRef, out: &mut Vec<String>) {
        match ty {
            TypeRef::Array(inner) => walk(schema, inner, out),
            TypeRef::Named(n) => {
                if Schema::is_builtin(n) || out.contains(n) {
                    return;
                }
                out.push(n.clone());
                if let Some(Def {
                    kind: Kind::Struct(ms),
                    ..
                }) = schema.get(n)
                {
                    for m in ms {
                        walk(schema, &m.ty, out);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for def in &schema.defs {
        if let Kind::Command { args, .. } = &def.kind {
            for m in args {
                walk(schema, &m.ty, &mut out);
            }
        }
    }
    out
}

struct Cmd<'a> {
    def: &'a Def,
    args: &'a [Member],
    returns: Option<&'a TypeRef>,
    allow_oob: bool,
}

fn commands(schema: &Schema) -> Vec<Cmd<'_>> {
    schema
        .defs
        .iter()
        .filter_map(|def| match &def.kind {
            Kind::Command {
                args,
                returns,
                allow_oob,
            } => Some(Cmd {
                def,
                args,
                returns: returns.as_ref(),
                allow_oob: *allow_oob,
            }),
            _ => None,
        })
        .collect()
}

fn ret_type(c: &Cmd<'_>) -> String {
    c.returns.map(rust_type).unwrap_or_else(|| "()".into())
}

fn method_doc(out: &mut String, c: &Cmd<'_>) {
    let mut text = format!("Command `{}`.", c.def.name);
    if !c.def.doc.trim().is_empty() {
        text.push_str("\n\n");
        text.push_str(&c.def.doc);
    }
    if !c.args.is_empty() {
        text.push_str("\n\nArguments (already checked against the schema):");
        for m in c.args {
            let _ = write!(
                text,
                "\n- `{}`{}: {}",
                field_ident(&m.name),
                if m.optional { " (optional)" } else { "" },
                m.doc.as_deref().unwrap_or("see the schema")
            );
        }
    }
    doc(out, "    ", &text);
}

fn method_sig(c: &Cmd<'_>, receiver: &str) -> String {
    let mut params = vec![receiver.to_string()];
    for m in c.args {
        params.push(format!("{}: {}", field_ident(&m.name), member_type(m)));
    }
    format!(
        "fn {}({}) -> Result<{}, qmp::QmpError>",
        field_ident(&c.def.name),
        params.join(", "),
        ret_type(c)
    )
}

/// Generates the Rust source that `api/src/lib.rs` includes.
pub fn rust(schema: &Schema) -> String {
    let mut out = String::new();
    out.push_str("// @generated by api/build.rs from api/schema/*.json.  Do not edit.\n\n");
    let inputs = input_types(schema);

    // Types.
    for def in &schema.defs {
        let ty = type_ident(&def.name);
        match &def.kind {
            Kind::Enum(values) => {
                doc(
                    &mut out,
                    "",
                    &summary(def, &format!("Enumeration `{}`.", def.name)),
                );
                out.push_str("#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]\n");
                let _ = writeln!(out, "pub enum {ty} {{");
                for v in values {
                    doc(
                        &mut out,
                        "    ",
                        v.doc.as_deref().unwrap_or(&format!("Value `{}`.", v.name)),
                    );
                    let _ = writeln!(out, "    #[serde(rename = {})]", rust_str(&v.name));
                    let _ = writeln!(out, "    {},", variant_ident(&v.name));
                }
                out.push_str("}\n\n");
                let _ = writeln!(out, "impl {ty} {{");
                out.push_str("    /// Every value, in schema order.\n");
                let all: Vec<String> = values
                    .iter()
                    .map(|v| format!("{ty}::{}", variant_ident(&v.name)))
                    .collect();
                let _ = writeln!(
                    out,
                    "    pub const ALL: &'static [{ty}] = &[{}];\n",
                    all.join(", ")
                );
                out.push_str("    /// The value as written on the wire.\n");
                out.push_str("    pub fn as_str(self) -> &'static str {\n        match self {\n");
                for v in values {
                    let _ = writeln!(
                        out,
                        "            {ty}::{} => {},",
                        variant_ident(&v.name),
                        rust_str(&v.name)
                    );
                }
                out.push_str("        }\n    }\n\n");
                out.push_str("    /// The value with this wire spelling, if any.\n");
                out.push_str(
                    "    pub fn from_wire(s: &str) -> Option<Self> {\n        match s {\n",
                );
                for v in values {
                    let _ = writeln!(
                        out,
                        "            {} => Some({ty}::{}),",
                        rust_str(&v.name),
                        variant_ident(&v.name)
                    );
                }
                out.push_str("            _ => None,\n        }\n    }\n}\n\n");
                if inputs.contains(&def.name) {
                    let _ = writeln!(out, "impl crate::visit::FromArg for {ty} {{");
                    out.push_str("    fn from_arg(value: &serde_json::Value, path: &crate::visit::Path<'_>) -> Result<Self, qmp::QmpError> {\n");
                    let _ = writeln!(
                        out,
                        "        crate::visit::enumeration(value, path, {ty}::from_wire)"
                    );
                    out.push_str("    }\n}\n\n");
                }
            }
            Kind::Struct(members) => {
                doc(
                    &mut out,
                    "",
                    &summary(def, &format!("Struct `{}`.", def.name)),
                );
                out.push_str(
                    "#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]\n",
                );
                let _ = writeln!(out, "pub struct {ty} {{");
                gen_struct_fields(&mut out, members);
                out.push_str("}\n\n");
                if inputs.contains(&def.name) {
                    gen_struct_input(&mut out, &def.name, members);
                }
            }
            Kind::Union {
                base,
                discriminator,
                variants,
            } => {
                let mut text = summary(def, &format!("Union `{}`.", def.name));
                let _ = write!(
                    text,
                    "\n\nA union: `{}` selects the variant.  Set the variant field that matches it \
                     (and no other); values without a variant field have no extra members.",
                    field_ident(discriminator)
                );
                doc(&mut out, "", &text);
                out.push_str(
                    "#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]\n",
                );
                let _ = writeln!(out, "pub struct {ty} {{");
                gen_struct_fields(&mut out, base);
                for (case, vty) in variants {
                    doc(
                        &mut out,
                        "    ",
                        &format!(
                            "Extra members when `{}` is `{case}`; `None` otherwise.",
                            field_ident(discriminator)
                        ),
                    );
                    out.push_str("    #[serde(flatten)]\n");
                    let _ = writeln!(
                        out,
                        "    pub {}: Option<{}>,",
                        field_ident(case),
                        type_ident(vty)
                    );
                }
                out.push_str("}\n\n");
            }
            Kind::Command { .. } | Kind::Event(_) => {}
        }
    }

    let cmds = commands(schema);

    // Traits.
    out.push_str(
        "/// The handlers of the in-band commands: every command of the schema without\n\
         /// `allow-oob`, except `qmp_capabilities` (handled by the QMP monitor) and\n\
         /// `query-commands` / `query-qmp-schema` (answered by generated code).\n\
         ///\n\
         /// In-band handlers run one at a time, in request order, on the thread that owns\n\
         /// the VM; they may take the VMM lock, touch guest memory and block.  Arguments\n\
         /// arrive already checked against the schema.\n\
         #[allow(clippy::too_many_arguments)]\n\
         pub trait InBandCommands {\n\
         \x20   /// The out-of-band handlers.  An `allow-oob` command sent in-band (with\n\
         \x20   /// `execute`) runs through them too.\n\
         \x20   fn oob(&self) -> &dyn OobCommands;\n\n\
         \x20   /// The named descriptors of the monitor the command came from, for an\n\
         \x20   /// `allow-oob` command sent in-band.\n\
         \x20   fn monitor_fds(&self) -> &qmp::MonitorFds;\n\n",
    );
    for c in cmds
        .iter()
        .filter(|c| !c.allow_oob && !CONTROL_COMMANDS.contains(&c.def.name.as_str()))
    {
        method_doc(&mut out, c);
        let _ = writeln!(out, "    {};\n", method_sig(c, "&mut self"));
    }
    out.push_str("}\n\n");

    out.push_str(
        "/// The handlers of the `allow-oob` commands.\n\
         ///\n\
         /// OUT-OF-BAND CONTRACT: these run on the monitor thread, possibly while an\n\
         /// in-band command holds the VM.  The implementor is an out-of-band context that\n\
         /// by construction holds no VM: a handler never takes the big VMM lock, never\n\
         /// touches guest RAM, never makes a blocking system call, and takes only locks\n\
         /// whose critical sections obey the same rules.  Hence `&self` only, and\n\
         /// `Send + Sync`.  `fds` are the named descriptors (`getfd`) of the monitor the\n\
         /// command came from: a small table behind a short lock, which these may use.\n\
         #[allow(clippy::too_many_arguments)]\n\
         pub trait OobCommands: Send + Sync + 'static {\n",
    );
    for c in cmds.iter().filter(|c| c.allow_oob) {
        method_doc(&mut out, c);
        let _ = writeln!(
            out,
            "    {};\n",
            method_sig(c, "&self, fds: &qmp::MonitorFds")
        );
    }
    out.push_str("}\n\n");

    // Argument checking, one function per command.
    for c in &cmds {
        let types: Vec<String> = c.args.iter().map(member_type).collect();
        let tuple = match types.len() {
            1 => format!("({},)", types[0]),
            _ => format!("({})", types.join(", ")),
        };
        let _ = writeln!(out, "#[allow(clippy::type_complexity)]");
        let _ = writeln!(
            out,
            "fn args_{}(arguments: &serde_json::Map<String, serde_json::Value>) -> Result<{tuple}, qmp::QmpError> {{",
            field_ident(&c.def.name).trim_start_matches("r#")
        );
        out.push_str("    let root = crate::visit::Path::root();\n    let path = &root;\n");
        gen_member_reads(&mut out, "    ", "arguments", c.args);
        let names: Vec<String> = c.args.iter().map(|m| field_ident(&m.name)).collect();
        let tuple_val = match names.len() {
            1 => format!("({},)", names[0]),
            _ => format!("({})", names.join(", ")),
        };
        let _ = writeln!(out, "    Ok({tuple_val})\n}}\n");
    }

    // Dispatch.
    // `fds`: the expression of the monitor's descriptors, passed first to out-of-band handlers.
    let call = |c: &Cmd<'_>, recv: &str, fds: Option<&str>| -> String {
        let names: Vec<String> = c.args.iter().map(|m| field_ident(&m.name)).collect();
        let fname = field_ident(&c.def.name);
        let fname = fname.trim_start_matches("r#");
        let bind = match names.len() {
            0 => format!("args_{fname}(&arguments)?;"),
            1 => format!("let ({},) = args_{fname}(&arguments)?;", names[0]),
            _ => format!("let ({}) = args_{fname}(&arguments)?;", names.join(", ")),
        };
        let (bind_ret, ret) = if c.returns.is_some() {
            ("let ret = ", "crate::visit::ret(&ret)")
        } else {
            ("", "Ok(crate::visit::empty_object())")
        };
        let params: Vec<&str> = fds
            .into_iter()
            .chain(names.iter().map(String::as_str))
            .collect();
        format!(
            "{{\n            {bind}\n            {bind_ret}{recv}.{}({})?;\n            {ret}\n        }}",
            field_ident(&c.def.name),
            params.join(", ")
        )
    };

    out.push_str(
        "/// Runs an in-band command: checks `arguments` against the schema (with QEMU's\n\
         /// error texts), calls the handler and converts its answer to the `return` value\n\
         /// (`{}` for commands without one).  `query-commands` and `query-qmp-schema` are\n\
         /// answered here; `qmp_capabilities` fails as QEMU's does after negotiation.\n\
         pub fn dispatch_inband<H: InBandCommands + ?Sized>(\n\
         \x20   handler: &mut H,\n\
         \x20   name: &str,\n\
         \x20   arguments: serde_json::Map<String, serde_json::Value>,\n\
         ) -> Result<serde_json::Value, qmp::QmpError> {\n\
         \x20   match name {\n",
    );
    for c in &cmds {
        let body = match c.def.name.as_str() {
            "query-commands" => "{\n            args_query_commands(&arguments)?;\n            Ok(crate::visit::command_list(COMMAND_NAMES))\n        }".to_string(),
            "query-qmp-schema" => "{\n            args_query_qmp_schema(&arguments)?;\n            Ok(qmp_schema())\n        }".to_string(),
            "qmp_capabilities" => "{\n            args_qmp_capabilities(&arguments)?;\n            Err(qmp::QmpError::new(\n                qmp::ErrorClass::CommandNotFound,\n                \"Capabilities negotiation is already complete, command ignored\",\n            ))\n        }".to_string(),
            _ if c.allow_oob => call(c, "handler.oob()", Some("handler.monitor_fds()")),
            _ => call(c, "handler", None),
        };
        let _ = writeln!(out, "        {} => {body}", rust_str(&c.def.name));
    }
    out.push_str("        _ => Err(crate::visit::command_not_found(name)),\n    }\n}\n\n");

    out.push_str(
        "/// Runs an `allow-oob` command for `exec-oob`: checks `arguments`, calls the\n\
         /// out-of-band handler, with the issuing monitor's descriptors `fds`, and converts\n\
         /// its answer.  Any other command fails.\n\
         pub fn dispatch_oob<H: OobCommands + ?Sized>(\n\
         \x20   handler: &H,\n\
         \x20   name: &str,\n\
         \x20   arguments: serde_json::Map<String, serde_json::Value>,\n\
         \x20   fds: &qmp::MonitorFds,\n\
         ) -> Result<serde_json::Value, qmp::QmpError> {\n\
         \x20   match name {\n",
    );
    for c in cmds.iter().filter(|c| c.allow_oob) {
        let _ = writeln!(
            out,
            "        {} => {}",
            rust_str(&c.def.name),
            call(c, "handler", Some("fds"))
        );
    }
    out.push_str(
        "        _ => match command_meta(name) {\n\
         \x20           Some(_) => Err(qmp::QmpError::generic(format!(\"The command {name} does not support OOB\"))),\n\
         \x20           None => Err(crate::visit::command_not_found(name)),\n\
         \x20       },\n    }\n}\n\n",
    );

    out.push_str(
        "/// Checks a command's arguments against the schema without running it.\n\
         pub fn check_arguments(\n\
         \x20   name: &str,\n\
         \x20   arguments: &serde_json::Map<String, serde_json::Value>,\n\
         ) -> Result<(), qmp::QmpError> {\n\
         \x20   match name {\n",
    );
    for c in &cmds {
        let fname = field_ident(&c.def.name);
        let _ = writeln!(
            out,
            "        {} => args_{}(arguments).map(|_| ()),",
            rust_str(&c.def.name),
            fname.trim_start_matches("r#")
        );
    }
    out.push_str("        _ => Err(crate::visit::command_not_found(name)),\n    }\n}\n\n");

    // Command table.
    out.push_str(
        "/// Every command of the schema, in schema order (the `query-commands` answer).\n",
    );
    let names: Vec<String> = cmds.iter().map(|c| rust_str(&c.def.name)).collect();
    let _ = writeln!(
        out,
        "pub const COMMAND_NAMES: &[&str] = &[{}];\n",
        names.join(", ")
    );
    out.push_str(
        "/// What the monitor needs to know about a command; `None` for unknown names.\n\
         pub fn command_meta(name: &str) -> Option<CommandMeta> {\n\
         \x20   match name {\n",
    );
    for c in &cmds {
        let _ = writeln!(
            out,
            "        {} => Some(CommandMeta {{ allow_oob: {} }}),",
            rust_str(&c.def.name),
            c.allow_oob
        );
    }
    out.push_str("        _ => None,\n    }\n}\n\n");

    // Events.
    out.push_str("/// An event of the schema, ready to be broadcast.\n");
    out.push_str("#[derive(Debug, Clone, PartialEq)]\npub enum Event {\n");
    let events: Vec<(&Def, &Vec<Member>)> = schema
        .defs
        .iter()
        .filter_map(|d| match &d.kind {
            Kind::Event(m) => Some((d, m)),
            _ => None,
        })
        .collect();
    for (def, members) in &events {
        doc(
            &mut out,
            "    ",
            &format!("Event `{}`.\n\n{}", def.name, def.doc),
        );
        if members.is_empty() {
            let _ = writeln!(out, "    {},", variant_ident(&def.name));
        } else {
            let _ = writeln!(out, "    {} {{", variant_ident(&def.name));
            for m in members.iter() {
                doc(&mut out, "        ", &member_doc(m));
                let _ = writeln!(out, "        {}: {},", field_ident(&m.name), member_type(m));
            }
            out.push_str("    },\n");
        }
    }
    out.push_str("}\n\nimpl Event {\n    /// The event name as sent on the wire.\n    pub fn name(&self) -> &'static str {\n        match self {\n");
    for (def, members) in &events {
        let pat = if members.is_empty() { "" } else { " { .. }" };
        let _ = writeln!(
            out,
            "            Event::{}{pat} => {},",
            variant_ident(&def.name),
            rust_str(&def.name)
        );
    }
    out.push_str(
        "        }\n    }\n\n    /// The `data` member: `None` for events that declare no data (QEMU then\n\
         \x20   /// omits `data`), otherwise the members, optional ones only when set.\n\
         \x20   pub fn data(&self) -> Option<serde_json::Map<String, serde_json::Value>> {\n        match self {\n",
    );
    for (def, members) in &events {
        if members.is_empty() {
            let _ = writeln!(
                out,
                "            Event::{} => None,",
                variant_ident(&def.name)
            );
            continue;
        }
        let fields: Vec<String> = members.iter().map(|m| field_ident(&m.name)).collect();
        let _ = writeln!(
            out,
            "            Event::{} {{ {} }} => {{\n                let mut data = serde_json::Map::new();",
            variant_ident(&def.name),
            fields.join(", ")
        );
        for m in members.iter() {
            let f = field_ident(&m.name);
            if m.optional {
                let _ = writeln!(
                    out,
                    "                if let Some(v) = {f} {{\n                    crate::visit::put(&mut data, {}, v);\n                }}",
                    rust_str(&m.name)
                );
            } else {
                let _ = writeln!(
                    out,
                    "                crate::visit::put(&mut data, {}, {f});",
                    rust_str(&m.name)
                );
            }
        }
        out.push_str("                Some(data)\n            }\n");
    }
    out.push_str("        }\n    }\n}\n\n");

    // Introspection.
    let json = introspection(schema);
    let mut hashes = String::from("#");
    while json.contains(&format!("\"{hashes}")) {
        hashes.push('#');
    }
    let _ = writeln!(
        out,
        "/// The `query-qmp-schema` answer as JSON text.\npub const QMP_SCHEMA_JSON: &str = r{hashes}\"{json}\"{hashes};"
    );
    out.replace(";\n\n}\n", ";\n}\n")
}

/// A minimal JSON value for writing the introspection data.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, members in order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn s(v: &str) -> Json {
        Json::Str(v.to_string())
    }

    /// Compact JSON text.
    pub fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04X}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Json::Obj(members) => {
                out.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    Json::s(k).write(out);
                    out.push_str(": ");
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// A type as introspection sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TKey {
    Builtin(String),
    Named(String),
    Array(Box<TKey>),
    /// The implicit argument (or event data) type of a command or event.
    Implicit(String),
    /// The empty object type.
    Empty,
}

fn tkey(ty: &TypeRef) -> TKey {
    match ty {
        TypeRef::Array(inner) => TKey::Array(Box::new(tkey(inner))),
        TypeRef::Named(n) if Schema::is_builtin(n) => TKey::Builtin(n.clone()),
        TypeRef::Named(n) => TKey::Named(n.clone()),
    }
}

fn json_type(builtin: &str) -> &'static str {
    BUILTINS
        .iter()
        .find(|(n, _)| *n == builtin)
        .map(|(_, j)| *j)
        .unwrap_or("value")
}

struct Introspector<'a> {
    schema: &'a Schema,
    used: Vec<TKey>,
    names: HashMap<TKey, String>,
}

impl Introspector<'_> {
    fn name(&mut self, key: &TKey) -> String {
        let next = self.names.len().to_string();
        self.names.entry(key.clone()).or_insert(next).clone()
    }

    /// Records a type as used and returns the name introspection shows for it.
    fn use_type(&mut self, key: TKey) -> String {
        // Every integer type is shown as 'int'.
        let key = match key {
            TKey::Builtin(n) if json_type(&n) == "int" => TKey::Builtin("int".into()),
            TKey::Array(inner) => match *inner {
                TKey::Builtin(n) if json_type(&n) == "int" => {
                    TKey::Array(Box::new(TKey::Builtin("int".into())))
                }
                other => TKey::Array(Box::new(other)),
            },
            other => other,
        };
        if !self.used.contains(&key) {
            self.used.push(key.clone());
        }
        match &key {
            TKey::Builtin(n) => n.clone(),
            TKey::Array(inner) => format!("[{}]", self.use_type((**inner).clone())),
            _ => self.name(&key),
        }
    }

    fn members(&mut self, members: &[Member]) -> Json {
        let mut out = Vec::new();
        for m in members {
            let mut e = vec![
                ("name".to_string(), Json::s(&m.name)),
                ("type".to_string(), Json::Str(self.use_type(tkey(&m.ty)))),
            ];
            if m.optional {
                e.push(("default".into(), Json::Null));
            }
            if !m.features.is_empty() {
                e.push((
                    "features".into(),
                    Json::Arr(m.features.iter().map(|f| Json::s(f)).collect()),
                ));
            }
            out.push(Json::Obj(e));
        }
        Json::Arr(out)
    }

    fn entry(name: String, meta: &str, mut rest: Vec<(String, Json)>, features: &[String]) -> Json {
        let mut e = vec![
            ("name".to_string(), Json::Str(name)),
            ("meta-type".to_string(), Json::s(meta)),
        ];
        e.append(&mut rest);
        if !features.is_empty() {
            e.push((
                "features".into(),
                Json::Arr(features.iter().map(|f| Json::s(f)).collect()),
            ));
        }
        Json::Obj(e)
    }

    fn visit_type(&mut self, key: &TKey) -> Json {
        match key {
            TKey::Builtin(n) => Self::entry(
                n.clone(),
                "builtin",
                vec![("json-type".into(), Json::s(json_type(n)))],
                &[],
            ),
            TKey::Array(inner) => {
                let elem = self.use_type((**inner).clone());
                Self::entry(
                    format!("[{elem}]"),
                    "array",
                    vec![("element-type".into(), Json::Str(elem))],
                    &[],
                )
            }
            TKey::Empty => Self::entry(
                self.name(key),
                "object",
                vec![("members".into(), Json::Arr(vec![]))],
                &[],
            ),
            TKey::Implicit(owner) => {
                let name = self.name(key);
                let members: &[Member] = match self.schema.get(owner).map(|d| &d.kind) {
                    Some(Kind::Command { args, .. }) => args,
                    Some(Kind::Event(m)) => m,
                    _ => &[],
                };
                let members = self.members(members);
                Self::entry(name, "object", vec![("members".into(), members)], &[])
            }
            TKey::Named(n) => {
                let name = self.name(key);
                let Some(def) = self.schema.get(n) else {
                    return Json::Null;
                };
                let features = def.features.clone();
                match &def.kind {
                    Kind::Enum(values) => {
                        let members = values
                            .iter()
                            .map(|v| {
                                let mut e = vec![("name".to_string(), Json::s(&v.name))];
                                if !v.features.is_empty() {
                                    e.push((
                                        "features".into(),
                                        Json::Arr(v.features.iter().map(|f| Json::s(f)).collect()),
                                    ));
                                }
                                Json::Obj(e)
                            })
                            .collect();
                        let vals = values.iter().map(|v| Json::s(&v.name)).collect();
                        Self::entry(
                            name,
                            "enum",
                            vec![
                                ("members".into(), Json::Arr(members)),
                                ("values".into(), Json::Arr(vals)),
                            ],
                            &features,
                        )
                    }
                    Kind::Struct(ms) => {
                        let members = self.members(ms);
                        Self::entry(name, "object", vec![("members".into(), members)], &features)
                    }
                    Kind::Union {
                        base,
                        discriminator,
                        variants,
                    } => {
                        let members = self.members(base);
                        let mut vs = Vec::new();
                        for (case, ty) in variants {
                            let t = self.use_type(TKey::Named(ty.clone()));
                            vs.push(Json::Obj(vec![
                                ("case".into(), Json::s(case)),
                                ("type".into(), Json::Str(t)),
                            ]));
                        }
                        // Tag values without a variant get the empty object.
                        let tag_enum =
                            base.iter()
                                .find(|m| &m.name == discriminator)
                                .and_then(|m| match &m.ty {
                                    TypeRef::Named(t) => self.schema.get(t),
                                    TypeRef::Array(_) => None,
                                });
                        if let Some(Def {
                            kind: Kind::Enum(values),
                            ..
                        }) = tag_enum
                        {
                            for v in values {
                                if !variants.iter().any(|(c, _)| *c == v.name) {
                                    let t = self.use_type(TKey::Empty);
                                    vs.push(Json::Obj(vec![
                                        ("case".into(), Json::s(&v.name)),
                                        ("type".into(), Json::Str(t)),
                                    ]));
                                }
                            }
                        }
                        Self::entry(
                            name,
                            "object",
                            vec![
                                ("members".into(), members),
                                ("tag".into(), Json::s(discriminator)),
                                ("variants".into(), Json::Arr(vs)),
                            ],
                            &features,
                        )
                    }
                    Kind::Command { .. } | Kind::Event(_) => Json::Null,
                }
            }
        }
    }
}

/// Computes the `query-qmp-schema` answer, by QEMU's rules: commands and
/// events in schema order with their real names, then every type they use
/// (transitively) in order of first use; type names other than built-ins are
/// replaced by "0", "1", ... in order of first use; arrays are "[elem]"; all
/// integer types are shown as `int`; `allow-oob` appears only when true;
/// missing arguments or return values refer to the empty object type.
pub fn introspection_json(schema: &Schema) -> Json {
    let mut intro = Introspector {
        schema,
        used: Vec::new(),
        names: HashMap::new(),
    };
    let mut entries = Vec::new();
    for def in &schema.defs {
        match &def.kind {
            Kind::Command {
                args,
                returns,
                allow_oob,
            } => {
                let arg = if args.is_empty() {
                    TKey::Empty
                } else {
                    TKey::Implicit(def.name.clone())
                };
                let arg = intro.use_type(arg);
                let ret = intro.use_type(returns.as_ref().map(tkey).unwrap_or(TKey::Empty));
                let mut rest = vec![
                    ("arg-type".to_string(), Json::Str(arg)),
                    ("ret-type".to_string(), Json::Str(ret)),
                ];
                if *allow_oob {
                    rest.push(("allow-oob".into(), Json::Bool(true)));
                }
                entries.push(Introspector::entry(
                    def.name.clone(),
                    "command",
                    rest,
                    &def.features,
                ));
            }
            Kind::Event(members) => {
                let arg = if members.is_empty() {
                    TKey::Empty
                } else {
                    TKey::Implicit(def.name.clone())
                };
                let arg = intro.use_type(arg);
                entries.push(Introspector::entry(
                    def.name.clone(),
                    "event",
                    vec![("arg-type".into(), Json::Str(arg))],
                    &def.features,
                ));
            }
            _ => {}
        }
    }
    let mut i = 0;
    while i < intro.used.len() {
        let key = intro.used[i].clone();
        entries.push(intro.visit_type(&key));
        i += 1;
    }
    Json::Arr(entries)
}

fn introspection(schema: &Schema) -> String {
    let mut s = String::new();
    introspection_json(schema).write(&mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::super::parser::parse;
    use super::super::schema::build;
    use super::*;

    #[test]
    fn identifiers() {
        assert_eq!(field_ident("cpu-index"), "cpu_index");
        assert_eq!(field_ident("UUID"), "uuid");
        assert_eq!(field_ident("type"), "r#type");
        assert_eq!(field_ident("self"), "self_");
        assert_eq!(variant_ident("x86_64"), "X86_64");
        assert_eq!(variant_ident("guest-panicked"), "GuestPanicked");
        assert_eq!(variant_ident("SHUTDOWN"), "Shutdown");
        assert_eq!(variant_ident("l1d"), "L1d");
        assert_eq!(type_ident("JSONType"), "JSONType");
        assert_eq!(
            doc_text("see @foo-bar and ['T']"),
            "see `foo-bar` and \\['T'\\]"
        );
    }

    #[test]
    fn introspection_masks_in_order_of_first_use() {
        let s = build(
            &parse(
                "t",
                "{ 'enum': 'E', 'data': [ 'a' ] }\n\
                 { 'struct': 'S', 'data': { 'e': 'E', '*n': ['uint8'] } }\n\
                 { 'command': 'c1', 'returns': 'S' }\n\
                 { 'command': 'c2', 'data': { 'x': 'size' }, 'allow-oob': true }\n\
                 { 'event': 'EV' }",
            )
            .unwrap(),
        )
        .unwrap();
        let mut text = String::new();
        introspection_json(&s).write(&mut text);
        assert_eq!(
            text,
            "[{\"name\": \"c1\", \"meta-type\": \"command\", \"arg-type\": \"0\", \"ret-type\": \"1\"}, \
             {\"name\": \"c2\", \"meta-type\": \"command\", \"arg-type\": \"2\", \"ret-type\": \"0\", \"allow-oob\": true}, \
             {\"name\": \"EV\", \"meta-type\": \"event\", \"arg-type\": \"0\"}, \
             {\"name\": \"0\", \"meta-type\": \"object\", \"members\": []}, \
             {\"name\": \"1\", \"meta-type\": \"object\", \"members\": [{\"name\": \"e\", \"type\": \"3\"}, {\"name\": \"n\", \"type\": \"[int]\", \"default\": null}]}, \
             {\"name\": \"2\", \"meta-type\": \"object\", \"members\": [{\"name\": \"x\", \"type\": \"int\"}]}, \
             {\"name\": \"3\", \"meta-type\": \"enum\", \"members\": [{\"name\": \"a\"}], \"values\": [\"a\"]}, \
             {\"name\": \"[int]\", \"meta-type\": \"array\", \"element-type\": \"int\"}, \
             {\"name\": \"int\", \"meta-type\": \"builtin\", \"json-type\": \"int\"}]"
        );
    }
}
