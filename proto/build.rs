//! Compiles `agent.proto` with protox (pure Rust: no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=agent.proto");
    let fds = protox::compile(["agent.proto"], ["."])?;
    // The descriptors, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("agent_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // COPY chunks travel as `Bytes`: no copy between the gRPC frame and the COPY stream.
        .bytes(".pgzm.agent.v1.CopyChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
