//! The IMDSv2 emulator (`tests/peers`, binary `imds-emulator`) as a child
//! process: started on a free loopback port with an instance description
//! and a test CA directory, controlled over `POST /_control`, killed when
//! the handle drops.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long the emulator may take to start listening (it may make its CA
/// first: two RSA keys).
const START_DEADLINE: Duration = Duration::from_secs(30);

/// The instance the emulator serves; serialised to its `--instance` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImdsInstance {
    pub instance_id: String,
    pub reservation_id: String,
    pub instance_type: String,
    pub local_hostname: String,
    pub public_hostname: String,
    pub local_ipv4: String,
    pub public_ipv4: String,
    pub ami_id: String,
    pub region: String,
    pub availability_zone: String,
    pub account_id: String,
    /// RFC 3339 with `Z`.
    pub pending_time: String,
    pub instance_profile_arn: String,
    pub instance_profile_id: String,
}

impl ImdsInstance {
    /// An instance in `us-east-1` of account 123456789012.
    pub fn example() -> ImdsInstance {
        ImdsInstance {
            instance_id: "i-0a1b2c3d4e5f60718".into(),
            reservation_id: "r-0123456789abcdef0".into(),
            instance_type: "t3.micro".into(),
            local_hostname: "ip-10-0-0-5.ec2.internal".into(),
            public_hostname: "ec2-54-0-0-5.compute-1.amazonaws.com".into(),
            local_ipv4: "10.0.0.5".into(),
            public_ipv4: "54.0.0.5".into(),
            ami_id: "ami-0abcdef1234567890".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            account_id: "123456789012".into(),
            pending_time: "2026-01-02T03:04:05Z".into(),
            instance_profile_arn: "arn:aws:iam::123456789012:instance-profile/hsm-client".into(),
            instance_profile_id: "AIPAEXAMPLEPROFILE01".into(),
        }
    }

    /// The instance as the emulator's `--instance` JSON.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "instance_id": self.instance_id,
            "reservation_id": self.reservation_id,
            "instance_type": self.instance_type,
            "local_hostname": self.local_hostname,
            "public_hostname": self.public_hostname,
            "local_ipv4": self.local_ipv4,
            "public_ipv4": self.public_ipv4,
            "ami_id": self.ami_id,
            "region": self.region,
            "availability_zone": self.availability_zone,
            "account_id": self.account_id,
            "pending_time": self.pending_time,
            "instance_profile_arn": self.instance_profile_arn,
            "instance_profile_id": self.instance_profile_id,
        })
        .to_string()
    }

    /// Writes the `--instance` file.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_json()).expect("write the instance file");
    }
}

/// The emulator binary built next to the test executable.
pub fn imds_emulator_bin() -> PathBuf {
    let p = crate::target_dir().join("imds-emulator");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p p11shim-peers` (make test does)",
        p.display()
    );
    p
}

/// A running emulator.
#[derive(Debug)]
pub struct Imds {
    child: Child,
    url: String,
    ca_dir: PathBuf,
    http: reqwest::blocking::Client,
}

impl Imds {
    /// Starts an emulator for `instance`, its files under `dir`
    /// (`instance.json`, the CA in `imds-ca/`).
    pub fn start(instance: &ImdsInstance, dir: &Path) -> Imds {
        Imds::start_with_ca(instance, dir, &dir.join("imds-ca"))
    }

    /// Starts an emulator signing with the CA in `ca_dir` (made if absent).
    pub fn start_with_ca(instance: &ImdsInstance, dir: &Path, ca_dir: &Path) -> Imds {
        std::fs::create_dir_all(dir).expect("emulator dir");
        let instance_file = dir.join(format!("instance-{}.json", instance.instance_id));
        instance.write(&instance_file);
        let mut child = Command::new(imds_emulator_bin())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--instance")
            .arg(&instance_file)
            .arg("--ca-dir")
            .arg(ca_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start imds-emulator");
        let stdout = child.stdout.take().expect("emulator stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let addr = match rx.recv_timeout(START_DEADLINE) {
            Ok(line) if line.starts_with("listening ") => {
                line["listening ".len()..].trim().to_owned()
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("imds-emulator did not start: {other:?}");
            }
        };
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .expect("http client");
        Imds {
            child,
            url: format!("http://{addr}"),
            ca_dir: ca_dir.to_path_buf(),
            http,
        }
    }

    /// `http://127.0.0.1:<port>`, the IMDS endpoint.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA directory: `rsa2048.pem` (any region), `<region>.pem`,
    /// `rsa.pem` (the plain signature's key) and the private keys.
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    /// Sends a control command (see the emulator's header); panics unless
    /// it is accepted.
    pub fn control(&self, cmd: &str) {
        let (status, body) = self.try_control(cmd);
        assert_eq!(status, 200, "control '{cmd}': {body}");
    }

    /// Sends a control command and returns the status and answer.
    pub fn try_control(&self, cmd: &str) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}/_control", self.url))
            .body(cmd.to_owned())
            .send()
            .expect("control request");
        (r.status().as_u16(), r.text().unwrap_or_default())
    }

    /// `PUT /latest/api/token` with the given TTL header value (`None`: no
    /// header) and extra headers; returns the status and body.
    pub fn put_token(&self, ttl: Option<&str>, headers: &[(&str, &str)]) -> (u16, String) {
        let mut req = self.http.put(format!("{}/latest/api/token", self.url));
        if let Some(ttl) = ttl {
            req = req.header("X-aws-ec2-metadata-token-ttl-seconds", ttl);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().expect("token request");
        (r.status().as_u16(), r.text().unwrap_or_default())
    }

    /// A fresh token with a TTL of 60 s; panics if refused.
    pub fn token(&self) -> String {
        let (status, token) = self.put_token(Some("60"), &[]);
        assert_eq!(status, 200, "token PUT refused");
        token
    }

    /// `GET /latest/<path>` with `token` (none: no header); status and body.
    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = self.http.get(format!("{}/latest/{path}", self.url));
        if let Some(t) = token {
            req = req.header("X-aws-ec2-metadata-token", t);
        }
        let r = req.send().expect("metadata request");
        (r.status().as_u16(), r.text().unwrap_or_default())
    }

    /// A fresh token, then `GET /latest/<path>`; panics unless 200.
    pub fn fetch(&self, path: &str) -> String {
        let token = self.token();
        let (status, body) = self.get(path, Some(&token));
        assert_eq!(status, 200, "GET {path}");
        body
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
