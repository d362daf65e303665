fn main() -> std::process::ExitCode {
    dcbflow_server::cli::main()
}
