//! Test harness shared by the cross-crate tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub mod ckpt_folder;

/// The folder holding `lava` and `lava-worker`, which the process tests spawn: `LAVA_BIN_DIR`
/// when set, else the calling test binary's `target/<profile>` after building both there.
pub fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("LAVA_BIN_DIR") {
            return PathBuf::from(dir);
        }
        // target/<profile>/deps/<test>-<hash> → target/<profile>
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "launcher", "-p", "worker", "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "building lava and lava-worker failed");
        dir
    })
}
