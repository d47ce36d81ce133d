//! `knlp`: the command-line front end. Each subcommand is a thin call into
//! the library.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use knlp::script::{self, Limits, Runtime};

#[derive(Parser)]
#[command(
    name = "knlp",
    version,
    about = "Kernel-style ML research shell: Rhai scripts over libtorch",
    after_help = "Kconfig commands, with kconfiglib's arguments and environment (KCONFIG_CONFIG, srctree):\n  \
                  olddefconfig, alldefconfig, allnoconfig, allyesconfig, allmodconfig, listnewconfig,\n  \
                  savedefconfig, defconfig, setconfig, config get|set SYMBOL [VALUE]  (see docs/config.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Rhai script; arguments after FILE reach it as ARGS.
    Run {
        #[command(flatten)]
        limits: LimitArgs,
        /// The script (.rhai)
        file: PathBuf,
        /// Arguments for the script (available as ARGS)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print the scripting API reference (markdown), or the entries for NAME.
    Doc {
        /// A function name
        name: Option<String>,
    },
    /// Start the interactive shell (same as knlp-shell).
    Shell {
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Versions, devices and threads.
    Info,
}

#[derive(Args)]
struct LimitArgs {
    /// Stop a script after N Rhai operations (0 = no limit)
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_operations)]
    max_operations: u64,
    /// Maximum depth of nested function calls
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_call_levels)]
    max_call_levels: usize,
    /// Largest array a script may build
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_array_size)]
    max_array_size: usize,
    /// Longest string a script may build, in bytes
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_string_size)]
    max_string_size: usize,
    /// Stop a script after this many seconds of wall time (0 = none)
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    timeout: f64,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_operations: self.max_operations,
            max_call_levels: self.max_call_levels,
            max_array_size: self.max_array_size,
            max_string_size: self.max_string_size,
            timeout_secs: self.timeout.max(0.0),
            ..Limits::default()
        }
    }
}

/// Options of `knlp run` that take a value (so the script file is found).
const RUN_VALUE_OPTIONS: &[&str] =
    &["--max-operations", "--max-call-levels", "--max-array-size", "--max-string-size", "--timeout"];

/// Split `knlp run [OPTIONS] FILE ARGS...` after FILE, so that everything
/// after the script (including `--help`) reaches the script untouched.
fn split_script_args(argv: Vec<String>) -> (Vec<String>, Vec<String>) {
    if argv.get(1).map(String::as_str) != Some("run") {
        return (argv, Vec::new());
    }
    let mut i = 2;
    while i < argv.len() {
        let a = argv[i].as_str();
        if RUN_VALUE_OPTIONS.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return (argv[..=i].to_vec(), argv[i + 1..].to_vec());
        }
    }
    (argv, Vec::new())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // The Kconfig tools take kconfiglib's command lines verbatim.
    if argv.get(1).is_some_and(|c| kconfig::cli::COMMANDS.contains(&c.as_str())) {
        let code = kconfig::cli::run(&argv[1..], &mut std::io::stdout(), &mut std::io::stderr());
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let (head, script_args) = split_script_args(argv);
    let cli = Cli::parse_from(head);
    let code = match cli.command {
        Command::Run { limits, file, args: _ } => {
            let args = script_args;
            let dir = file.parent().map(PathBuf::from).filter(|p| !p.as_os_str().is_empty());
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let mut rt = Runtime::new(dir, limits.limits());
            match rt.run_file(&file, &args) {
                Ok(code) => code,
                Err(e) => {
                    eprint!("{}", e.rendered);
                    e.exit_code()
                }
            }
        }
        Command::Doc { name: None } => {
            print!("{}", script::api::reference_markdown(&script::reference()));
            0
        }
        Command::Doc { name: Some(n) } => {
            let docs = script::reference();
            let found = script::api::lookup(&docs, &n);
            if found.is_empty() {
                eprintln!("knlp doc: no documented function '{n}'");
                1
            } else {
                for d in found {
                    println!("{}\n    {}", d.signature, d.doc);
                }
                0
            }
        }
        Command::Shell { limits } => knlp::shell::Shell::new(limits.limits()).run(),
        Command::Info => {
            println!("knlp {}", env!("CARGO_PKG_VERSION"));
            println!("libtorch {}", knlp::shim::torch_version());
            println!("cpu threads {}", tch::get_num_threads());
            let n = tch::Cuda::device_count();
            println!("cuda devices {n}");
            println!("cudnn {}", tch::Cuda::cudnn_is_available());
            0
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
