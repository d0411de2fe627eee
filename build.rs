//! Records the commit the binary is built from as `CORNJACKET_BUILD_COMMIT`, which `cj_build_info` reports:
//! the variable itself when the build sets it (an image build has no `.git`: the Dockerfile takes
//! it as a build argument), else `git rev-parse`, else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CORNJACKET_BUILD_COMMIT");
    // A new commit moves the branch HEAD points at, not HEAD itself.
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(r) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed=.git/{r}");
    }
    let commit = std::env::var("CORNJACKET_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CORNJACKET_BUILD_COMMIT={commit}");
}
