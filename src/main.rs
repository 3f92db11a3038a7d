fn main() {
    std::process::exit(prl_flow::cli::main());
}
