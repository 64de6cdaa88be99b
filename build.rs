//! Bake an rpath to the set-up libtorch into the binaries, so they run without LD_LIBRARY_PATH.
//! (On the GPU machine the binary's rpath does not exist and LD_LIBRARY_PATH points at the
//! machine's own PyTorch instead: RUNPATH yields to LD_LIBRARY_PATH.)
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_some() {
        if let Ok(lt) = std::env::var("LIBTORCH") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lt}/lib");
        }
    }
}
