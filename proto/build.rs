//! Compiles `v1/*.proto` with the vendored `protoc`, so the build needs nothing installed.
//! A `PROTOC` already set in the environment wins (e.g. a distribution's protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: a build script is single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    tonic_prost_build::configure()
        .compile_protos(&["v1/worker.proto", "v1/frames.proto"], &["v1"])?;
    println!("cargo:rerun-if-changed=v1");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
