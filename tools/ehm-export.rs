//! ehm-export: not built yet (see the issue tracker); prints help and says so.
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ehm-export",
    version,
    about = "ehm-export — not built yet in this version of ehm"
)]
struct Cli {
    /// Arguments (ignored: this tool is not built yet)
    args: Vec<String>,
}

fn main() {
    let _ = Cli::parse();
    eprintln!("ehm-export: not built yet in this version of ehm (planned: see README.md)");
    std::process::exit(2);
}
