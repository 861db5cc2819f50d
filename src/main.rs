fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(vmsync::cli::run())
}
