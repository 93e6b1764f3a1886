//! Compiles grpc_predict_v2.proto with protox (a protobuf compiler in Rust: no protoc on the
//! build machine) into prost messages and the tonic server and client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=grpc_predict_v2.proto");
    let descriptors = protox::compile(["grpc_predict_v2.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
