//! The exit codes of `tallyd`, `tally` and `tally-publisher`: BSD sysexits, as README
//! documents, so that scripts and systemd tell "fix the command or the config" (64) from
//! "bad file" (65), "server unreachable" (69), "try again later" (75) and "not allowed"
//! (77). One list, so that the three commands cannot drift apart.

/// The command line or the configuration is wrong.
pub const EX_USAGE: u8 = 64;
/// Input data is bad: a file that does not parse or verify, an edited cache.
pub const EX_DATAERR: u8 = 65;
/// A service is unavailable: no license server (or receiver) could be reached.
pub const EX_UNAVAILABLE: u8 = 69;
/// An internal error: the software failed at run time.
pub const EX_SOFTWARE: u8 = 70;
/// An output file cannot be created.
pub const EX_CANTCREAT: u8 = 73;
/// An I/O error, e.g. writing the output failed for another reason than a closed pipe.
pub const EX_IOERR: u8 = 74;
/// A temporary failure, try again: a denied checkout, a store that cannot be written,
/// another tallyd holding the data directory.
pub const EX_TEMPFAIL: u8 = 75;
/// The peer broke the protocol.
pub const EX_PROTOCOL: u8 = 76;
/// Permission denied: a server the vendor does not vouch for, a wrong admin token.
pub const EX_NOPERM: u8 = 77;
