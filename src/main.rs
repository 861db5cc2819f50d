fn main() -> std::process::ExitCode {
    // Fail points (tests only): configured from the FAILPOINTS environment variable.
    #[cfg(feature = "failpoints")]
    let _scenario = fail::FailScenario::setup();
    std::process::ExitCode::from(vmsync::cli::run())
}
