//! Bake an rpath to the set-up libtorch into this crate's binaries (ehm-train, the tests), so
//! they run without LD_LIBRARY_PATH. (On the GPU machine the binary's rpath does not exist and
//! LD_LIBRARY_PATH points at the machine's own PyTorch instead: RUNPATH yields to
//! LD_LIBRARY_PATH.) The serving tools belong to ehm-core and need no libtorch at all.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(lt) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lt}/lib");
    }
}
