//! Compiles `agent.proto` with protox (pure Rust: no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=agent.proto");
    let fds = protox::compile(["agent.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // COPY chunks travel as `Bytes`: no copy between the gRPC frame and the COPY stream.
        .bytes(".pgzm.agent.v1.CopyChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
