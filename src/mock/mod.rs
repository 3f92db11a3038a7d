//! The mock engine (being written).
pub fn main(_args: Vec<std::ffi::OsString>) -> i32 {
    eprintln!("mock-engine: not built yet");
    2
}
