//! `menuconfig [KCONFIG]`: kconfiglib's command line over this crate.

fn main() {
    let args: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    std::process::exit(menuconfig::main_from_args(&args));
}
