//! Builds the C++ shim against libtorch and makes the binaries find libtorch.
//!
//! torch-sys (`links = "tch"`) exports the libtorch lib folder as
//! `DEP_TCH_LIBTORCH_LIB`; the headers sit beside it in `../include`.
use std::env;
use std::path::PathBuf;

fn main() {
    embed_stdlib();
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/guard.h");
    println!("cargo:rerun-if-changed=build.rs");
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report libtorch's lib folder (set LIBTORCH_USE_PYTORCH=1)"),
    );
    let include = lib.join("../include");
    torch_build(&include, "csrc/shim.cpp").compile("knlp_shim");
    build_dist(&include);
    build_graph(&include);
    println!("cargo:rerun-if-changed=csrc/profile.cpp");
    torch_build(&include, "csrc/profile.cpp").compile("knlp_profile");
    println!("cargo:rerun-if-changed=csrc/fused.cpp");
    torch_build(&include, "csrc/fused.cpp").compile("knlp_fused");

    // Keep libtorch_cuda in NEEDED although no symbol of it is referenced:
    // otherwise `--as-needed` drops it and CUDA is silently unavailable.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
    // Run here without LD_LIBRARY_PATH; on a GPU machine LD_LIBRARY_PATH wins
    // (RUNPATH is searched after it).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}

/// A C++17 build of `file` against libtorch's headers, with the ABI and
/// glog settings of the torch wheel.
fn torch_build(include: &std::path::Path, file: &str) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(file);
    b
}

/// The c10d shim. Gloo needs gloo's headers (Debian's libgloo-dev; the
/// wheel ships none); NCCL needs the CUDA runtime, CRT and CCCL headers of the
/// wheels `nvidia-cuda-crt` and `nvidia-cuda-cccl` beside torch. Without them
/// the backend is left out and reports so at run time, never at build time.
fn build_dist(include: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-env-changed=KNLP_GLOO_INCLUDE");
    let mut b = torch_build(include, "csrc/dist.cpp");
    let gloo =
        env::var("KNLP_GLOO_INCLUDE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/usr/include"));
    if gloo.join("gloo/config.h").exists() {
        println!("cargo:rerun-if-changed={}", gloo.join("gloo/config.h").display());
        b.include(&gloo).define("USE_C10D_GLOO", None).define("KNLP_GLOO", None);
    } else {
        println!(
            "cargo:warning=gloo headers not found under {}: knlp is built without the Gloo backend",
            gloo.display()
        );
    }
    let nvidia = include.join("../../nvidia");
    let cu = cuda_include(include);
    if let (Some(cu), true) = (&cu, nvidia.join("nccl/include/nccl.h").exists()) {
        b.include(cu)
            .include(cu.join("cccl"))
            .include(nvidia.join("nccl/include"))
            .define("USE_C10D_NCCL", None)
            .define("KNLP_NCCL", None);
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    } else {
        println!(
            "cargo:warning=CUDA/NCCL headers not found under {}: knlp is built without the NCCL backend",
            nvidia.display()
        );
    }
    b.compile("knlp_dist");
}

/// The CUDA runtime, CRT and CCCL headers of the wheels beside torch
/// (site-packages/torch/include -> site-packages/nvidia/cu13/include), if
/// all are there.
fn cuda_include(include: &std::path::Path) -> Option<PathBuf> {
    let cu = include.join("../../nvidia/cu13/include");
    let headers = [cu.join("cuda_runtime_api.h"), cu.join("crt/host_config.h"), cu.join("cccl/nv/target")];
    if !headers.iter().all(|p| p.exists()) {
        return None;
    }
    println!("cargo:rerun-if-changed={}", cu.join("crt/host_config.h").display());
    Some(cu)
}

/// The CUDA graph shim: with the CUDA headers it captures and replays
/// `at::cuda::CUDAGraph`; without them its functions report that knlp was
/// built without CUDA graph support.
fn build_graph(include: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/graph.cpp");
    println!("cargo:rerun-if-changed=csrc/graph_none.cpp");
    let b = match cuda_include(include) {
        Some(cu) => {
            let mut b = torch_build(include, "csrc/graph.cpp");
            b.include(&cu).include(cu.join("cccl"));
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
            b
        }
        None => {
            println!(
                "cargo:warning=CUDA headers not found under {}: knlp is built without CUDA graphs",
                include.join("../../nvidia/cu13/include").display()
            );
            torch_build(include, "csrc/graph_none.cpp")
        }
    };
    b.compile("knlp_graph");
}

/// Embed `stdlib/*.rhai` so `import` finds the standard library wherever the
/// binary runs.
fn embed_stdlib() {
    println!("cargo:rerun-if-changed=stdlib");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(root.join("stdlib"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
                .map(|p| (p.file_stem().unwrap().to_string_lossy().to_string(), p))
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    let mut code = String::from(
        "/// Embedded standard-library modules: (name, source).\npub static STDLIB: &[(&str, &str)] = &[\n",
    );
    for (name, path) in entries {
        println!("cargo:rerun-if-changed={}", path.display());
        code.push_str(&format!("    ({name:?}, include_str!({:?})),\n", path.display().to_string()));
    }
    code.push_str("];\n");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("stdlib.rs");
    std::fs::write(out, code).unwrap();
}
