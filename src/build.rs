//! Build script: compiles the cuDNN attention shim when the `cudnn-sdpa` feature is on, and
//! nothing otherwise (the CPU build needs no C++ compiler and no CUDA headers).

fn main() {
    println!("cargo:rerun-if-changed=src/build.rs");
    #[cfg(feature = "cudnn-sdpa")]
    cudnn_sdpa::build();
}

#[cfg(feature = "cudnn-sdpa")]
mod cudnn_sdpa {
    use std::path::PathBuf;

    const SHIM: &str = "src/flux2/attention/cudnn_sdpa.cpp";

    /// A folder the shim's includes need, from an environment variable (set by make build-cuda).
    fn include_dir(var: &str, must_hold: &str) -> PathBuf {
        println!("cargo:rerun-if-env-changed={var}");
        let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
            panic!("feature cudnn-sdpa needs {var} (a folder holding {must_hold}); make build-cuda sets it")
        });
        assert!(
            dir.join(must_hold).is_file(),
            "{var}={} does not hold {must_hold}",
            dir.display()
        );
        dir
    }

    pub fn build() {
        println!("cargo:rerun-if-changed={SHIM}");
        let frontend = include_dir("CUDNN_FRONTEND_INCLUDE_DIR", "cudnn_frontend.h");
        let cudnn = include_dir("CUDNN_INCLUDE_DIR", "cudnn.h");
        let cuda = include_dir("CUDA_HOME", "include/cuda_runtime_api.h").join("include");
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .opt_level(2)
            .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
            .include(frontend)
            .include(cudnn)
            .include(cuda)
            .warnings(false)
            .file(SHIM)
            .compile("imagegen_cudnn_sdpa");
        println!("cargo:rustc-link-lib=dylib=dl");
    }
}
