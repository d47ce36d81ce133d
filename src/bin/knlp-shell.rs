//! `knlp-shell`: the interactive research shell.
use clap::Parser;
use knlp::script::Limits;

#[derive(Parser)]
#[command(name = "knlp-shell", version, about = "Interactive knlp shell (Rhai over libtorch)")]
struct Cli {
    /// Stop an input after N Rhai operations (0 = no limit)
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_operations)]
    max_operations: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The shell reports a panic itself and goes on (shell.rs); the default
    // hook would add libtorch's C++ backtrace to it.
    std::panic::set_hook(Box::new(|_| {}));
    let limits = Limits { max_operations: cli.max_operations, ..Limits::default() };
    let code = knlp::shell::Shell::new(limits).run();
    std::process::ExitCode::from(knlp::script::exit_status(code))
}
