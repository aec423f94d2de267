//! Bakes the git commit into `PLANE_HASH`, which every component reports beside its version.

use std::path::Path;
use std::process::Command;

fn main() {
    let hash = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|hash| hash.trim().to_string())
        .filter(|hash| !hash.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=PLANE_GIT_HASH={hash}");

    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it points at (a commit).
    let git = Path::new("../.git");
    let head = git.join("HEAD");
    println!("cargo:rerun-if-changed={}", head.display());
    if let Ok(content) = std::fs::read_to_string(&head) {
        if let Some(reference) = content.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed={}", git.join(reference).display());
        }
    }
    println!(
        "cargo:rerun-if-changed={}",
        git.join("packed-refs").display()
    );
}
