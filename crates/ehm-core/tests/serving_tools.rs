//! The serving tools start without libtorch: each answers --version, and none of the binaries
//! names a libtorch library among the ones it needs. (Building this test also makes cargo build
//! the tools, which the ehm package's integration tests then run.)
use std::process::Command;

const TOOLS: [&str; 4] = [
    env!("CARGO_BIN_EXE_ehm-export"),
    env!("CARGO_BIN_EXE_ehm-classify"),
    env!("CARGO_BIN_EXE_ehm-segment"),
    env!("CARGO_BIN_EXE_ehm-retrieve"),
];

#[test]
fn serving_tools_run_and_do_not_link_libtorch() {
    for exe in TOOLS {
        let o = Command::new(exe).arg("--version").output().unwrap();
        assert!(
            o.status.success(),
            "{exe}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("ehm-"));
        // a linked library's soname sits in the binary's dynamic string table
        let bytes = std::fs::read(exe).unwrap();
        for lib in [&b"libtorch"[..], b"libc10.so"] {
            assert!(
                !bytes.windows(lib.len()).any(|w| w == lib),
                "{exe} refers to {}",
                String::from_utf8_lossy(lib)
            );
        }
    }
}
