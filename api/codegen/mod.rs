//! The schema compiler used by `api/build.rs`: a parser for QEMU's schema
//! language, the checks, and the code generator.  Kept free of dependencies
//! so the build script can `#[path]`-include it and the library can unit-test
//! it.

pub mod gen;
pub mod parser;
pub mod schema;

/// What the generator produced.
pub struct Output {
    /// Rust source for `include!`.
    pub rust: String,
    /// Every schema file that was read, for `rerun-if-changed`.
    pub files: Vec<String>,
}

/// Loads the schema rooted at `main`, checks it and generates the Rust code.
pub fn generate(
    main: &str,
    read: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<Output, parser::SchemaError> {
    let mut files = Vec::new();
    let mut reader = |p: &str| {
        files.push(p.to_string());
        read(p)
    };
    let tops = parser::load(main, &mut reader)?;
    let schema = schema::build(&tops)?;
    Ok(Output {
        rust: gen::rust(&schema),
        files,
    })
}
