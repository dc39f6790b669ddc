//! The meaning of a parsed schema: definitions, their members and types, and
//! the checks that turn schema mistakes into clear build errors.

use super::parser::{Doc, Expr, Location, SchemaError, TopExpr};
use std::collections::{HashMap, HashSet};

/// Built-in types: name, JSON type for introspection.
pub const BUILTINS: &[(&str, &str)] = &[
    ("str", "string"),
    ("number", "number"),
    ("int", "int"),
    ("int8", "int"),
    ("int16", "int"),
    ("int32", "int"),
    ("int64", "int"),
    ("uint8", "int"),
    ("uint16", "int"),
    ("uint32", "int"),
    ("uint64", "int"),
    ("size", "int"),
    ("bool", "boolean"),
    ("any", "value"),
];

/// Commands whose answer the generated code computes itself, or that the QMP
/// monitor handles: they get no handler method.
pub const CONTROL_COMMANDS: &[&str] = &["qmp_capabilities", "query-commands", "query-qmp-schema"];

/// A reference to a type: a name or an array of a type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TypeRef {
    /// A built-in or defined type.
    Named(String),
    /// `['T']`
    Array(Box<TypeRef>),
}

/// A member of a struct, of a command's arguments or of an event's data.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The wire name, without the `*`.
    pub name: String,
    /// Its type.
    pub ty: TypeRef,
    /// Whether it may be absent.
    pub optional: bool,
    /// Feature flags.
    pub features: Vec<String>,
    /// Its description from the doc block.
    pub doc: Option<String>,
}

/// An enumeration value.
#[derive(Debug, Clone, PartialEq)]
pub struct EnumValue {
    /// The wire value.
    pub name: String,
    /// Feature flags.
    pub features: Vec<String>,
    /// Its description from the doc block.
    pub doc: Option<String>,
}

/// What a definition is.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `'enum'`
    Enum(Vec<EnumValue>),
    /// `'struct'`
    Struct(Vec<Member>),
    /// `'union'`: base members, discriminator, explicit variants (case, struct).
    Union {
        /// All base members (inline or from a named struct).
        base: Vec<Member>,
        /// The base member that selects the variant.
        discriminator: String,
        /// Tag value and the struct that holds that variant's extra members.
        variants: Vec<(String, String)>,
    },
    /// `'command'`
    Command {
        /// Arguments (empty when none).
        args: Vec<Member>,
        /// Return type; `None` answers `{}`.
        returns: Option<TypeRef>,
        /// Whether it may run out-of-band.
        allow_oob: bool,
    },
    /// `'event'`
    Event(Vec<Member>),
}

/// One definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Def {
    /// Its name.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Feature flags.
    pub features: Vec<String>,
    /// Its documentation body.
    pub doc: String,
    /// Where it is defined.
    pub loc: Location,
}

/// A checked schema.
#[derive(Debug, Clone)]
pub struct Schema {
    /// All definitions, in source order.
    pub defs: Vec<Def>,
    index: HashMap<String, usize>,
}

impl Schema {
    /// Looks a definition up by name.
    pub fn get(&self, name: &str) -> Option<&Def> {
        self.index.get(name).map(|&i| &self.defs[i])
    }

    /// Whether `name` is a built-in type.
    pub fn is_builtin(name: &str) -> bool {
        BUILTINS.iter().any(|(n, _)| *n == name)
    }
}

fn err(loc: &Location, msg: impl Into<String>) -> SchemaError {
    SchemaError {
        loc: loc.clone(),
        msg: msg.into(),
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn as_str<'a>(e: &'a Expr, loc: &Location, what: &str) -> Result<&'a str, SchemaError> {
    match e {
        Expr::Str(s) => Ok(s),
        _ => Err(err(loc, format!("{what} must be a string"))),
    }
}

fn features(e: Option<&Expr>, loc: &Location, what: &str) -> Result<Vec<String>, SchemaError> {
    let Some(e) = e else {
        return Ok(Vec::new());
    };
    let Expr::List(items) = e else {
        return Err(err(loc, format!("'features' of {what} must be an array")));
    };
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let name = match item {
            Expr::Str(s) => s.clone(),
            Expr::Dict(_) => match item.get("name") {
                Some(Expr::Str(s)) => s.clone(),
                _ => return Err(err(loc, format!("feature of {what} needs a string 'name'"))),
            },
            _ => return Err(err(loc, format!("feature of {what} must be a string"))),
        };
        if !valid_name(&name) {
            return Err(err(
                loc,
                format!("{what} has an invalid feature name '{name}'"),
            ));
        }
        if out.contains(&name) {
            return Err(err(loc, format!("{what} has feature '{name}' twice")));
        }
        out.push(name);
    }
    Ok(out)
}

fn type_ref(e: &Expr, loc: &Location, what: &str) -> Result<TypeRef, SchemaError> {
    match e {
        Expr::Str(s) => Ok(TypeRef::Named(s.clone())),
        Expr::List(items) => match items.as_slice() {
            [Expr::Str(s)] => Ok(TypeRef::Array(Box::new(TypeRef::Named(s.clone())))),
            _ => Err(err(
                loc,
                format!("{what}: an array type must be written ['TypeName']"),
            )),
        },
        _ => Err(err(loc, format!("{what} must name a type"))),
    }
}

fn members(
    e: &Expr,
    loc: &Location,
    owner: &str,
    doc: Option<&Doc>,
) -> Result<Vec<Member>, SchemaError> {
    let Expr::Dict(entries) = e else {
        return Err(err(
            loc,
            format!("'data' of '{owner}' must be an object of members"),
        ));
    };
    let mut out: Vec<Member> = Vec::new();
    for (key, val) in entries {
        let (optional, name) = match key.strip_prefix('*') {
            Some(n) => (true, n.to_string()),
            None => (false, key.clone()),
        };
        let what = format!("member '{name}' of '{owner}'");
        if !valid_name(&name) {
            return Err(err(loc, format!("{what} has an invalid name")));
        }
        if out.iter().any(|m| m.name == name) {
            return Err(err(loc, format!("'{owner}' has member '{name}' twice")));
        }
        let (ty, feats) = match val {
            Expr::Dict(long) => {
                for (k, _) in long {
                    if k != "type" && k != "features" {
                        return Err(err(loc, format!("{what} has unknown key '{k}'")));
                    }
                }
                let ty = val
                    .get("type")
                    .ok_or_else(|| err(loc, format!("{what} lacks 'type'")))?;
                (
                    type_ref(ty, loc, &what)?,
                    features(val.get("features"), loc, &what)?,
                )
            }
            _ => (type_ref(val, loc, &what)?, Vec::new()),
        };
        out.push(Member {
            doc: doc.and_then(|d| d.member(&name)).map(str::to_string),
            name,
            ty,
            optional,
            features: feats,
        });
    }
    Ok(out)
}

fn check_keys(top: &TopExpr, allowed: &[&str], meta: &str, name: &str) -> Result<(), SchemaError> {
    if let Expr::Dict(entries) = &top.expr {
        for (k, _) in entries {
            if k != meta && !allowed.contains(&k.as_str()) {
                return Err(err(
                    &top.loc,
                    format!("{meta} '{name}' has unknown key '{k}'"),
                ));
            }
        }
    }
    Ok(())
}

fn flag(top: &TopExpr, key: &str, name: &str) -> Result<bool, SchemaError> {
    match top.expr.get(key) {
        None => Ok(false),
        Some(Expr::Bool(b)) => Ok(*b),
        Some(_) => Err(err(
            &top.loc,
            format!("'{key}' of '{name}' must be true or false"),
        )),
    }
}

/// Turns parsed definitions into a checked [`Schema`].
///
/// Rejects: unknown keys, invalid or duplicate names, duplicate members or
/// enum values, references to unknown types, doc blocks naming another
/// definition, malformed unions, and argument types the dispatcher cannot
/// check (unions, or anything that is not a struct, enum, built-in or array of
/// those).
pub fn build(tops: &[TopExpr]) -> Result<Schema, SchemaError> {
    let mut defs: Vec<Def> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for top in tops {
        let Expr::Dict(entries) = &top.expr else {
            return Err(err(&top.loc, "expected an object"));
        };
        let Some((meta, name_expr)) = entries.first() else {
            return Err(err(&top.loc, "empty definition"));
        };
        let meta = meta.as_str();
        let name = as_str(name_expr, &top.loc, &format!("value of '{meta}'"))?.to_string();
        if !valid_name(&name) {
            return Err(err(&top.loc, format!("invalid name '{name}'")));
        }
        if Schema::is_builtin(&name) {
            return Err(err(&top.loc, format!("'{name}' is a built-in type")));
        }
        if let Some(&i) = index.get(&name) {
            return Err(err(
                &top.loc,
                format!("'{name}' is already defined at {}", defs[i].loc),
            ));
        }
        let doc = top.doc.as_ref();
        if let Some(sym) = doc.and_then(|d| d.symbol.as_deref()) {
            if sym != name {
                return Err(err(
                    &top.loc,
                    format!("definition of '{name}' follows documentation for '{sym}'"),
                ));
            }
        }
        let loc = &top.loc;
        let kind = match meta {
            "enum" => {
                check_keys(top, &["data", "features"], meta, &name)?;
                let Some(Expr::List(items)) = top.expr.get("data") else {
                    return Err(err(loc, format!("enum '{name}' needs 'data': [values]")));
                };
                let mut values: Vec<EnumValue> = Vec::new();
                for item in items {
                    let (v, feats) = match item {
                        Expr::Str(s) => (s.clone(), Vec::new()),
                        Expr::Dict(_) => (
                            as_str(
                                item.get("name").unwrap_or(&Expr::Bool(false)),
                                loc,
                                &format!("value 'name' in enum '{name}'"),
                            )?
                            .to_string(),
                            features(item.get("features"), loc, &format!("enum '{name}'"))?,
                        ),
                        _ => return Err(err(loc, format!("enum '{name}' values must be strings"))),
                    };
                    let ok = v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                        && !v.is_empty();
                    if !ok {
                        return Err(err(loc, format!("enum '{name}' has invalid value '{v}'")));
                    }
                    if values.iter().any(|e| e.name == v) {
                        return Err(err(loc, format!("enum '{name}' has value '{v}' twice")));
                    }
                    values.push(EnumValue {
                        doc: doc.and_then(|d| d.member(&v)).map(str::to_string),
                        name: v,
                        features: feats,
                    });
                }
                Kind::Enum(values)
            }
            "struct" => {
                check_keys(top, &["data", "features"], meta, &name)?;
                let data = top
                    .expr
                    .get("data")
                    .ok_or_else(|| err(loc, format!("struct '{name}' needs 'data'")))?;
                Kind::Struct(members(data, loc, &name, doc)?)
            }
            "union" => {
                check_keys(
                    top,
                    &["base", "discriminator", "data", "features"],
                    meta,
                    &name,
                )?;
                let base = match top.expr.get("base") {
                    Some(b @ Expr::Dict(_)) => members(b, loc, &name, doc)?,
                    Some(Expr::Str(s)) => match index.get(s).map(|&i| &defs[i].kind) {
                        Some(Kind::Struct(m)) => m.clone(),
                        _ => {
                            return Err(err(
                                loc,
                                format!("base '{s}' of union '{name}' must be a struct defined before it"),
                            ))
                        }
                    },
                    _ => return Err(err(loc, format!("union '{name}' needs a 'base'"))),
                };
                let disc = match top.expr.get("discriminator") {
                    Some(Expr::Str(s)) => s.clone(),
                    _ => {
                        return Err(err(
                            loc,
                            format!("union '{name}' needs a string 'discriminator'"),
                        ))
                    }
                };
                let Some(Expr::Dict(cases)) = top.expr.get("data") else {
                    return Err(err(loc, format!("union '{name}' needs 'data': {{case: type}}")));
                };
                let mut variants = Vec::new();
                for (case, ty) in cases {
                    let ty = as_str(ty, loc, &format!("variant '{case}' of union '{name}'"))?;
                    variants.push((case.clone(), ty.to_string()));
                }
                Kind::Union {
                    base,
                    discriminator: disc,
                    variants,
                }
            }
            "command" => {
                check_keys(
                    top,
                    &[
                        "data",
                        "returns",
                        "allow-oob",
                        "allow-preconfig",
                        "features",
                    ],
                    meta,
                    &name,
                )?;
                let args = match top.expr.get("data") {
                    None => Vec::new(),
                    Some(d @ Expr::Dict(_)) => members(d, loc, &name, doc)?,
                    Some(_) => {
                        return Err(err(
                            loc,
                            format!("'data' of command '{name}' must be an object of members (named argument types are not supported)"),
                        ))
                    }
                };
                let returns = match top.expr.get("returns") {
                    None => None,
                    Some(r) => Some(type_ref(r, loc, &format!("'returns' of '{name}'"))?),
                };
                flag(top, "allow-preconfig", &name)?;
                Kind::Command {
                    args,
                    returns,
                    allow_oob: flag(top, "allow-oob", &name)?,
                }
            }
            "event" => {
                check_keys(top, &["data", "features"], meta, &name)?;
                let data = match top.expr.get("data") {
                    None => Vec::new(),
                    Some(d) => members(d, loc, &name, doc)?,
                };
                Kind::Event(data)
            }
            other => {
                return Err(err(
                    loc,
                    format!("unknown definition kind '{other}' (expected enum, struct, union, command, event or include)"),
                ))
            }
        };
        index.insert(name.clone(), defs.len());
        defs.push(Def {
            features: features(top.expr.get("features"), loc, &format!("'{name}'"))?,
            name,
            kind,
            doc: doc.map(|d| d.body.clone()).unwrap_or_default(),
            loc: loc.clone(),
        });
    }
    let schema = Schema { defs, index };
    check(&schema)?;
    Ok(schema)
}

fn check_type(
    schema: &Schema,
    ty: &TypeRef,
    loc: &Location,
    what: &str,
) -> Result<(), SchemaError> {
    match ty {
        TypeRef::Array(inner) => check_type(schema, inner, loc, what),
        TypeRef::Named(n) => {
            if Schema::is_builtin(n) {
                return Ok(());
            }
            match schema.get(n).map(|d| &d.kind) {
                Some(Kind::Enum(_) | Kind::Struct(_) | Kind::Union { .. }) => Ok(()),
                Some(_) => Err(err(loc, format!("{what} uses '{n}', which is not a type"))),
                None => Err(err(loc, format!("{what} uses unknown type '{n}'"))),
            }
        }
    }
}

/// Checks that a type can be visited from client input.
fn check_input_type(
    schema: &Schema,
    ty: &TypeRef,
    loc: &Location,
    what: &str,
    seen: &mut HashSet<String>,
) -> Result<(), SchemaError> {
    match ty {
        TypeRef::Array(inner) => check_input_type(schema, inner, loc, what, seen),
        TypeRef::Named(n) => match schema.get(n).map(|d| &d.kind) {
            Some(Kind::Union { .. }) => Err(err(
                loc,
                format!("{what} uses union '{n}'; unions are not supported in arguments"),
            )),
            Some(Kind::Struct(ms)) => {
                if seen.insert(n.clone()) {
                    for m in ms {
                        check_input_type(schema, &m.ty, loc, what, seen)?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        },
    }
}

fn check(schema: &Schema) -> Result<(), SchemaError> {
    let mut method_names: HashMap<String, String> = HashMap::new();
    for def in &schema.defs {
        let loc = &def.loc;
        let member_list: &[Member] = match &def.kind {
            Kind::Struct(m) | Kind::Event(m) => m,
            Kind::Command { args, .. } => args,
            Kind::Union { base, .. } => base,
            Kind::Enum(_) => &[],
        };
        for m in member_list {
            check_type(
                schema,
                &m.ty,
                loc,
                &format!("member '{}' of '{}'", m.name, def.name),
            )?;
        }
        let mut idents = HashSet::new();
        for m in member_list {
            if !idents.insert(super::gen::field_ident(&m.name)) {
                return Err(err(
                    loc,
                    format!(
                        "members of '{}' clash as Rust names ('{}')",
                        def.name,
                        super::gen::field_ident(&m.name)
                    ),
                ));
            }
        }
        match &def.kind {
            Kind::Enum(values) => {
                let mut seen = HashSet::new();
                for v in values {
                    if !seen.insert(super::gen::variant_ident(&v.name)) {
                        return Err(err(
                            loc,
                            format!(
                                "values of enum '{}' clash as Rust names ('{}')",
                                def.name,
                                super::gen::variant_ident(&v.name)
                            ),
                        ));
                    }
                }
            }
            Kind::Union {
                base,
                discriminator,
                variants,
            } => {
                let tag = base
                    .iter()
                    .find(|m| &m.name == discriminator)
                    .ok_or_else(|| {
                        err(
                            loc,
                            format!(
                            "discriminator '{discriminator}' of union '{}' is not a base member",
                            def.name
                        ),
                        )
                    })?;
                if tag.optional {
                    return Err(err(
                        loc,
                        format!("discriminator of '{}' must not be optional", def.name),
                    ));
                }
                let values = match &tag.ty {
                    TypeRef::Named(t) => match schema.get(t).map(|d| &d.kind) {
                        Some(Kind::Enum(v)) => v,
                        _ => {
                            return Err(err(
                                loc,
                                format!("discriminator of '{}' must be an enum", def.name),
                            ))
                        }
                    },
                    TypeRef::Array(_) => {
                        return Err(err(
                            loc,
                            format!("discriminator of '{}' must be an enum", def.name),
                        ))
                    }
                };
                let mut seen = HashSet::new();
                for (case, ty) in variants {
                    if !values.iter().any(|v| &v.name == case) {
                        return Err(err(
                            loc,
                            format!("union '{}' has variant '{case}', which is not a value of the discriminator's enum", def.name),
                        ));
                    }
                    if base
                        .iter()
                        .any(|m| super::gen::field_ident(&m.name) == super::gen::field_ident(case))
                    {
                        return Err(err(
                            loc,
                            format!(
                                "variant '{case}' of union '{}' clashes with a base member's Rust name",
                                def.name
                            ),
                        ));
                    }
                    if !seen.insert(super::gen::field_ident(case)) {
                        return Err(err(
                            loc,
                            format!("union '{}' has variant '{case}' twice", def.name),
                        ));
                    }
                    match schema.get(ty).map(|d| &d.kind) {
                        Some(Kind::Struct(ms)) => {
                            for m in ms {
                                if base.iter().any(|b| b.name == m.name) {
                                    return Err(err(
                                        loc,
                                        format!(
                                            "variant '{case}' of '{}' repeats base member '{}'",
                                            def.name, m.name
                                        ),
                                    ));
                                }
                            }
                        }
                        Some(_) => {
                            return Err(err(
                                loc,
                                format!("variant '{case}' of '{}' must be a struct", def.name),
                            ))
                        }
                        None => {
                            return Err(err(
                                loc,
                                format!(
                                    "variant '{case}' of '{}' uses unknown type '{ty}'",
                                    def.name
                                ),
                            ))
                        }
                    }
                }
            }
            Kind::Command { args, returns, .. } => {
                if let Some(r) = returns {
                    check_type(schema, r, loc, &format!("'returns' of '{}'", def.name))?;
                }
                let mut seen = HashSet::new();
                for m in args {
                    check_input_type(
                        schema,
                        &m.ty,
                        loc,
                        &format!("argument '{}' of '{}'", m.name, def.name),
                        &mut seen,
                    )?;
                }
                let method = super::gen::field_ident(&def.name);
                if let Some(other) = method_names.insert(method.clone(), def.name.clone()) {
                    return Err(err(
                        loc,
                        format!(
                            "commands '{other}' and '{}' clash as Rust method '{method}'",
                            def.name
                        ),
                    ));
                }
            }
            Kind::Struct(_) | Kind::Event(_) => {}
        }
    }
    let mut type_idents: HashMap<String, String> = HashMap::new();
    for def in &schema.defs {
        if matches!(def.kind, Kind::Command { .. }) {
            continue;
        }
        let id = match def.kind {
            Kind::Event(_) => format!("event {}", super::gen::variant_ident(&def.name)),
            _ => super::gen::type_ident(&def.name),
        };
        if let Some(other) = type_idents.insert(id.clone(), def.name.clone()) {
            return Err(err(
                &def.loc,
                format!("'{other}' and '{}' clash as Rust name '{id}'", def.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::parser::parse;
    use super::*;

    fn build_text(text: &str) -> Result<Schema, SchemaError> {
        build(&parse("t.json", text)?)
    }

    #[test]
    fn builds_a_small_schema() {
        let s = build_text(
            "{ 'enum': 'E', 'data': [ 'a', 'b-c' ] }\n\
             { 'struct': 'S', 'data': { 'x': 'E', '*y': ['int'], 'z': { 'type': 'str', 'features': [ 'unstable' ] } } }\n\
             { 'command': 'do-it', 'data': { 's': 'S' }, 'returns': ['S'], 'allow-oob': true }\n\
             { 'event': 'EV', 'data': { 'e': 'E' } }",
        )
        .unwrap();
        assert_eq!(s.defs.len(), 4);
        let Kind::Struct(ms) = &s.get("S").unwrap().kind else {
            panic!()
        };
        assert!(ms[1].optional);
        assert_eq!(
            ms[1].ty,
            TypeRef::Array(Box::new(TypeRef::Named("int".into())))
        );
        assert_eq!(ms[2].features, vec!["unstable".to_string()]);
        let Kind::Command { allow_oob, .. } = s.get("do-it").unwrap().kind else {
            panic!()
        };
        assert!(allow_oob);
    }

    #[test]
    fn rejects_schema_mistakes() {
        let cases: &[(&str, &str)] = &[
            (
                "{ 'command': 'a' }\n{ 'command': 'a' }",
                "'a' is already defined at t.json:1",
            ),
            (
                "{ 'struct': 'S', 'data': { 'x': 'Nope' } }",
                "member 'x' of 'S' uses unknown type 'Nope'",
            ),
            (
                "{ 'command': 'c', 'returns': 'Nope' }",
                "'returns' of 'c' uses unknown type 'Nope'",
            ),
            (
                "{ 'command': 'c', 'alow-oob': true }",
                "command 'c' has unknown key 'alow-oob'",
            ),
            (
                "{ 'command': 'c', 'allow-oob': 'yes' }",
                "'allow-oob' of 'c' must be true or false",
            ),
            (
                "{ 'enum': 'E', 'data': [ 'a', 'a' ] }",
                "enum 'E' has value 'a' twice",
            ),
            (
                "{ 'enum': 'E', 'data': [ 'a-b', 'a_b' ] }",
                "clash as Rust names",
            ),
            (
                "{ 'command': 'a-b' }\n{ 'command': 'a_b' }",
                "clash as Rust method 'a_b'",
            ),
            (
                "{ 'struct': 'S', 'data': { 'a': 'int', '*a': 'int' } }",
                "'S' has member 'a' twice",
            ),
            (
                "{ 'struct': 'int', 'data': {} }",
                "'int' is a built-in type",
            ),
            ("{ 'widget': 'w' }", "unknown definition kind 'widget'"),
            (
                "{ 'command': 'c', 'data': { 'x': [ 'a', 'b' ] } }",
                "array type must be written",
            ),
            (
                "{ 'command': 'c' }\n{ 'struct': 'S', 'data': { 'x': 'c' } }",
                "uses 'c', which is not a type",
            ),
            (
                "##\n# @Other:\n##\n{ 'command': 'c' }",
                "definition of 'c' follows documentation for 'Other'",
            ),
            (
                "{ 'enum': 'E', 'data': [ 'a' ] }\n{ 'struct': 'V', 'data': {} }\n\
              { 'union': 'U', 'base': { 't': 'E' }, 'discriminator': 't', 'data': { 'b': 'V' } }",
                "variant 'b', which is not a value",
            ),
            (
                "{ 'enum': 'E', 'data': [ 'a' ] }\n{ 'struct': 'V', 'data': {} }\n\
              { 'union': 'U', 'base': { 't': 'E' }, 'discriminator': 'u', 'data': { 'a': 'V' } }",
                "discriminator 'u' of union 'U' is not a base member",
            ),
            (
                "{ 'enum': 'E', 'data': [ 'a' ] }\n{ 'struct': 'V', 'data': {} }\n\
              { 'union': 'U', 'base': { 't': 'E' }, 'discriminator': 't', 'data': { 'a': 'V' } }\n\
              { 'command': 'c', 'data': { 'u': 'U' } }",
                "unions are not supported in arguments",
            ),
            (
                "{ 'event': 'E_V' }\n{ 'event': 'E-V' }",
                "clash as Rust name",
            ),
            (
                "{ 'enum': 'E', 'data': [ 'a', 't' ] }\n{ 'struct': 'V', 'data': {} }\n\
                 { 'union': 'U', 'base': { 't': 'E' }, 'discriminator': 't', 'data': { 't': 'V' } }",
                "clashes with a base member",
            ),
        ];
        for (text, want) in cases {
            match build_text(text) {
                Ok(_) => panic!("{text:?} was accepted"),
                Err(e) => assert!(e.to_string().contains(want), "{text:?}: got {e}"),
            }
        }
    }
}
