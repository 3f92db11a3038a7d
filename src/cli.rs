pub fn main() -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).map(|a| a == "mock-engine").unwrap_or(false) {
        return crate::mock::main(args[2..].to_vec());
    }
    0
}
