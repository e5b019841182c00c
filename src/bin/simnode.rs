//! `simnode`: the simulated Cosmos SDK node (see `cvx::demo::simnode`), as its own binary for tests and
//! benchmarks. `cvx simnode` runs the same code.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    cvx::demo::simnode::main(std::env::args().skip(1).collect())
}
