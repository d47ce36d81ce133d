//! `kconfig-tool <command> [args...]`: the kconfiglib-compatible tools of
//! the `kconfig` crate (see `kconfig::cli`), for testing them end to end.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let code = kconfig::cli::run(&args, &mut stdout.lock(), &mut stderr.lock());
    std::process::exit(code);
}
