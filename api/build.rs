//! Generates the QMP types, handler traits, dispatch and introspection data
//! from `schema/qapi-schema.json` into `$OUT_DIR/qapi_generated.rs`.

#[path = "codegen/mod.rs"]
mod codegen;

fn main() {
    println!("cargo:rerun-if-changed=codegen");
    println!("cargo:rerun-if-changed=schema");
    let mut read = |p: &str| std::fs::read_to_string(p).map_err(|e| e.to_string());
    let out = match codegen::generate("schema/qapi-schema.json", &mut read) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("error: QAPI schema: api/{e}");
            std::process::exit(1);
        }
    };
    for f in &out.files {
        println!("cargo:rerun-if-changed={f}");
    }
    let Some(dir) = std::env::var_os("OUT_DIR") else {
        eprintln!("error: OUT_DIR is not set");
        std::process::exit(1);
    };
    let path = std::path::Path::new(&dir).join("qapi_generated.rs");
    if let Err(e) = std::fs::write(&path, out.rust) {
        eprintln!("error: writing {}: {e}", path.display());
        std::process::exit(1);
    }
}
