//! The `prl-flow` binary: everything is in the library; see [`prl_flow::cli`].

fn main() {
    std::process::exit(prl_flow::cli::main());
}
