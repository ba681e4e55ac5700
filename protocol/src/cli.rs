//! The preamble `tallyd`, `tally` and `tally-publisher` share (feature `cli`, so the
//! client library a vendor links does not carry clap or tracing-subscriber).

use crate::exit::EX_USAGE;
use std::process::ExitCode;

/// Parses the command line. `--help` and `--version` are printed and end the command
/// with success; a usage error is printed and ends it with [`EX_USAGE`] (clap's own
/// code would be 2, which is not a sysexits code). `Err` is the exit code to return.
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    parse_from(std::env::args_os())
}

/// [`parse_args`] over the given arguments (the first is the program name).
pub fn parse_from<C, I, T>(args: I) -> Result<C, ExitCode>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    C::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        exit_code(&e)
    })
}

/// The exit code for a clap error: success for help and version, [`EX_USAGE`] else.
fn exit_code(e: &clap::Error) -> ExitCode {
    if e.use_stderr() {
        ExitCode::from(EX_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Log lines formatted for stderr: colours only when stderr is a terminal (under
/// systemd, in a pipe or a CI log they are noise).
pub fn stderr_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    #[command(name = "t", version)]
    struct Args {
        #[arg(long)]
        n: u32,
    }

    /// A usage error is sysexits 64, not clap's 2; help and version are success.
    /// (The errors are judged without printing them, to keep the test output clean.)
    #[test]
    fn usage_errors_are_ex_usage_and_help_is_success() {
        use clap::Parser;
        assert_eq!(parse_from::<Args, _, _>(["t", "--n", "3"]).unwrap().n, 3);
        let code = |args: &[&str]| {
            format!(
                "{:?}",
                exit_code(&Args::try_parse_from(args.iter().copied()).unwrap_err())
            )
        };
        let usage = format!("{:?}", ExitCode::from(EX_USAGE));
        assert_eq!(code(&["t", "--n", "x"]), usage);
        assert_eq!(code(&["t"]), usage);
        assert_eq!(
            code(&["t", "--version"]),
            format!("{:?}", ExitCode::SUCCESS)
        );
        assert_eq!(code(&["t", "--help"]), format!("{:?}", ExitCode::SUCCESS));
    }
}
