//! 1. Bake an rpath to the set-up libtorch into this crate's binaries (ehm-train, the tests), so
//!    they run without LD_LIBRARY_PATH. (On the GPU machine the binary's rpath does not exist and
//!    LD_LIBRARY_PATH points at the machine's own PyTorch instead: RUNPATH yields to
//!    LD_LIBRARY_PATH.) The serving tools belong to ehm-core and need no libtorch at all.
//! 2. Compile the c10d shim (src/train/c10d.cpp) against libtorch's headers and Gloo's
//!    (tools/setup.sh gloo), for data-parallel pretraining. Without those headers the crate
//!    still builds; `ehm-train` then refuses a multi-process launch with a message.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=src/train/c10d.cpp");
    println!("cargo:rerun-if-changed=src/train/c10d.h");
    println!("cargo::rustc-check-cfg=cfg(ehm_c10d)");
    let Ok(lt) = std::env::var("LIBTORCH") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lt}/lib");
    let lt = PathBuf::from(lt);
    // .cache/gloo sits next to .cache/libtorch (tools/setup.sh)
    let gloo = std::env::var_os("EHM_GLOO_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| lt.with_file_name("gloo").join("include"));
    println!("cargo:rerun-if-env-changed=EHM_GLOO_INCLUDE");
    println!("cargo:rerun-if-changed={}", gloo.display());
    let header = lt.join("include/torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
    if !gloo.join("gloo/context.h").exists() || !header.exists() {
        println!(
            "cargo:warning=c10d shim not built (no Gloo headers in {}: run tools/setup.sh gloo); data-parallel pretraining is off",
            gloo.display()
        );
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file("src/train/c10d.cpp")
        .include(lt.join("include"))
        .include(lt.join("include/torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DUSE_C10D_GLOO")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-w")
        .opt_level(2)
        .compile("ehm_c10d");
    println!(
        "cargo:rustc-link-search=native={}",
        lt.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=ehm_c10d");
}
