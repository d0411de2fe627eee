//! A Mosquitto owned by one test, configured exactly as `scripts/infra.sh` configures the shared
//! one: the same template (`scripts/mosquitto/mosquitto.conf.tmpl`) and the same
//! dynamic-security setup (`scripts/mosquitto/dynsec-setup.sh`), on a free port in a temp dir.
//! A test can stop, restart and wipe it, and read its log, without disturbing anyone else.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The development users the setup script creates (as infra.sh does).
pub const USER: &str = "cornjacket";
pub const PASS: &str = "cornjacket";
pub const ADMIN_USER: &str = "cornjacket-admin";
pub const ADMIN_PASS: &str = "cornjacket-admin";

pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where Debian's package puts the plugin (the directory depends on the architecture).
pub fn dynsec_plugin() -> PathBuf {
    let lib = Path::new("/usr/lib");
    let mut dirs = vec![lib.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(lib) {
        dirs.extend(rd.flatten().map(|e| e.path()));
    }
    dirs.into_iter()
        .map(|d| d.join("mosquitto_dynamic_security.so"))
        .find(|p| p.exists())
        .expect("mosquitto's dynamic-security plugin (make infra-up installs mosquitto)")
}

/// The `max_packet_size` the template sets.
pub fn template_max_packet_size() -> usize {
    let t = std::fs::read_to_string(repo().join("scripts/mosquitto/mosquitto.conf.tmpl")).unwrap();
    t.lines()
        .find_map(|l| l.strip_prefix("max_packet_size "))
        .expect("the template sets max_packet_size")
        .trim()
        .parse()
        .unwrap()
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts with `extra` appended to the rendered configuration (e.g. `log_type all`).
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::common::free_port();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data")).unwrap();
        std::fs::create_dir_all(d.join("dynsec")).unwrap();
        let template =
            std::fs::read_to_string(repo().join("scripts/mosquitto/mosquitto.conf.tmpl")).unwrap();
        let conf = template
            .replace("@MQTT_HOST@", "127.0.0.1")
            .replace("@MQTT_PORT@", &port.to_string())
            .replace("@MQTT_DIR@", d.to_str().unwrap())
            .replace("@MQTT_LOG@", d.join("mosquitto.log").to_str().unwrap())
            .replace("@MQTT_USER_OS@", "root")
            .replace("@MQTT_DYNSEC_PLUGIN@", dynsec_plugin().to_str().unwrap());
        assert!(!conf.contains("@MQTT_"), "every placeholder rendered");
        std::fs::write(d.join("mosquitto.conf"), format!("{conf}\n{extra}\n")).unwrap();
        let json = d.join("dynsec/dynamic-security.json");
        Self::setup(&["init", json.to_str().unwrap(), ADMIN_USER, ADMIN_PASS]);
        let mut m = Self {
            port,
            dir,
            child: None,
        };
        m.restart();
        Self::setup(&[
            "apply",
            "127.0.0.1",
            &port.to_string(),
            ADMIN_USER,
            ADMIN_PASS,
            USER,
            PASS,
        ]);
        m
    }

    fn setup(args: &[&str]) {
        let out = Command::new("bash")
            .arg(repo().join("scripts/mosquitto/dynsec-setup.sh"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dynsec-setup.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let conf = self.dir.path().join("mosquitto.conf");
        self.child = Some(
            Command::new("mosquitto")
                .args(["-c", conf.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mosquitto (make infra-up installs it)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "own mosquitto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: it writes its persistence file, like a broker restart in production.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Stops it and deletes its persistence: every session is gone on the next start, as after
    /// a broker that lost its disk (users and roles stay: they are the plugin's file).
    pub fn stop_and_lose_sessions(&mut self) {
        self.stop();
        let data = self.dir.path().join("data");
        std::fs::remove_dir_all(&data).unwrap();
        std::fs::create_dir_all(&data).unwrap();
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
