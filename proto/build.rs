//! Compiles `kvroute/v1/agent.proto` with protox (a pure-Rust protobuf compiler), so a build
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "kvroute/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
