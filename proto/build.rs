//! Compiles `federation.proto` with a vendored `protoc`, so no system install is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts run single-threaded; prost-build reads PROTOC.
    unsafe_set_protoc(&protoc);
    // Tensor bytes as `Bytes`: chunks are sent as views of the model (no copy) and decoded as
    // views of the received buffer.
    tonic_prost_build::configure().bytes(".aln.federation.v1.TensorChunk.data").compile_protos(&["federation.proto"], &["."])?;
    println!("cargo:rerun-if-changed=federation.proto");
    Ok(())
}

fn unsafe_set_protoc(path: &std::path::Path) {
    // `set_var` is unsafe in edition 2024 only because of other threads; a build script has none.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", path);
    }
}
