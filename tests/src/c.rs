//! Building C programs against the tally C library (`libtally_client`) for tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory holding `libtally_client.so` and `.a`, built up to date first:
/// `cargo test` builds the library only as an rlib, and a library left from an older
/// build would test old code. Cargo does not hold its build lock while tests run, so
/// this works from inside a test (and is quick when nothing changed).
pub fn library_dir() -> PathBuf {
    let lib_dir = crate::bin("tally").parent().unwrap().to_path_buf();
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "-q", "-p", "tally-client", "--lib"]);
    // The variables cargo set for this test (CARGO_PKG_NAME, ...) are read by build
    // scripts (ring's): passed on, they would make cargo rebuild those crates here and
    // again for the next `cargo test`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            cargo.env_remove(key.as_ref());
        }
    }
    if lib_dir.ends_with("release") {
        cargo.arg("--release");
    }
    let built = cargo.current_dir(root()).status().expect("running cargo");
    assert!(built.success(), "cargo build -p tally-client --lib failed");
    for name in ["libtally_client.so", "libtally_client.a"] {
        assert!(
            lib_dir.join(name).exists(),
            "{name} is missing from {}",
            lib_dir.display()
        );
    }
    lib_dir
}

/// How a C program is linked against the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// `-ltally_client`, run with `LD_LIBRARY_PATH`.
    Shared,
    /// The static library and the system libraries README lists.
    Static,
}

/// The system libraries a program linked with `libtally_client.a` needs (what
/// `rustc --print native-static-libs` reports; README documents the same list).
pub const STATIC_LINK_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// A compiled C program and what it needs to run.
#[derive(Debug)]
pub struct CProgram {
    /// The executable.
    pub exe: PathBuf,
    /// For `LD_LIBRARY_PATH`: a directory with `libtally_client.so.0` (the SONAME the
    /// program asks for) pointing at the built library.
    pub lib_path: PathBuf,
}

impl CProgram {
    /// A command running the program with the library found.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.env("LD_LIBRARY_PATH", &self.lib_path);
        c
    }
}

/// Compiles `sources` with `cc -Wall -Werror` and `cflags` (`-I DIR`, `-D NAME`) into
/// `out_dir/name`, with `client/include` on the include path, linked as `link` says.
pub fn compile(
    sources: &[PathBuf],
    cflags: &[String],
    out_dir: &Path,
    name: &str,
    link: Link,
) -> CProgram {
    let lib_dir = library_dir();
    let exe = out_dir.join(name);
    let mut cc = Command::new("cc");
    cc.args(sources)
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
            "-Werror",
            "-pthread",
        ])
        .arg("-I")
        .arg(root().join("client/include"));
    cc.args(cflags);
    cc.arg("-o").arg(&exe);
    match link {
        Link::Shared => {
            cc.arg("-L").arg(&lib_dir).arg("-ltally_client");
        }
        Link::Static => {
            cc.arg(lib_dir.join("libtally_client.a"))
                .args(STATIC_LINK_LIBS);
        }
    }
    let out = cc.output().expect("running cc");
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib_path = out_dir.join(format!("{name}-lib"));
    std::fs::create_dir_all(&lib_path).unwrap();
    let soname = lib_path.join("libtally_client.so.0");
    if !soname.exists() {
        std::os::unix::fs::symlink(lib_dir.join("libtally_client.so"), &soname).unwrap();
    }
    CProgram { exe, lib_path }
}
