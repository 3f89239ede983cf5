//! With feature `openmpi` or `mpich`: compile csrc/abi.c with that MPI's
//! compiler wrapper (it checks at compile time the ABI facts the Rust side
//! assumes) and link the MPI library. Without either feature: nothing.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=csrc/abi.c");
    println!("cargo:rerun-if-env-changed=MPICC");
    let ompi = std::env::var_os("CARGO_FEATURE_OPENMPI").is_some();
    let mpich = std::env::var_os("CARGO_FEATURE_MPICH").is_some();
    let (default_cc, which) = match (ompi, mpich) {
        (false, false) => return,
        (true, true) => panic!(
            "ckpt-mpi-shim: features `openmpi` and `mpich` are exclusive (one build per MPI ABI)"
        ),
        (true, false) => ("mpicc.openmpi", "openmpi"),
        (false, true) => ("mpicc.mpich", "mpich"),
    };
    let mpicc = std::env::var("MPICC").unwrap_or_else(|_| default_cc.to_string());
    // `-showme` (Open MPI) / `-show` (MPICH) print the underlying command line.
    let show = if which == "openmpi" {
        "-showme"
    } else {
        "-show"
    };
    let out = Command::new(&mpicc).arg(show).output().unwrap_or_else(|e| {
        panic!("ckpt-mpi-shim: cannot run `{mpicc} {show}`: {e} (install {which} or set MPICC)")
    });
    if !out.status.success() {
        panic!(
            "ckpt-mpi-shim: `{mpicc} {show}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let mut build = cc::Build::new();
    build.file("csrc/abi.c").warnings(true);
    for tok in line.split_whitespace().skip(1) {
        if let Some(inc) = tok.strip_prefix("-I") {
            build.include(inc);
        } else if let Some(dir) = tok.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={dir}");
        } else if let Some(lib) = tok.strip_prefix("-l") {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
    build.compile("ckpt_shim_abi");
}
