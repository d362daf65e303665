//! Generates the inventory service's server code and its descriptor set
//! (`inventory.bin`, for the dcbflow executor under test) with protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_client(false)
        .file_descriptor_set_path(out.join("inventory.bin"))
        .compile_protos(&["proto/inventory.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/inventory.proto");
    Ok(())
}
