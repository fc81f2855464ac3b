//! moto (EC2 + IAM + STS) as the broker's AWS peer: `moto_server` from the
//! repository's `.venv` (`scripts/deps.sh` installs it) on a free
//! loopback port, ready once `/moto-api/` answers and the EC2 backend is
//! warmed by one `DescribeInstances` (the first EC2 call costs seconds).
//! The process is killed when the handle drops.
//!
//! Seeding goes through the broker's own [`AwsClient::query`], so the
//! harness and the broker sign alike. [`Moto::start_with_auth`] starts a
//! moto that checks signatures and IAM policies after `n` free calls: the
//! warm-up takes one, [`Moto::bootstrap_admin`] three more, so the usual
//! form is `Moto::start_with_auth(4)` then `bootstrap_admin()`.

use std::future::Future;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use p11shim_broker::aws::{AwsClient, AwsConfig, AwsError, Service};
use p11shim_broker::secrets::SecretSource;
use tempfile::TempDir;

/// Region the harness uses; moto accepts any.
pub const REGION: &str = "us-east-1";
/// moto's one account.
pub const ACCOUNT: &str = "123456789012";
/// Image moto runs without checking it.
pub const IMAGE: &str = "ami-12345678";
/// Trust policy letting EC2 instances take a role.
pub const EC2_TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

const READY_DEADLINE: Duration = Duration::from_secs(60);

/// An IAM user's access key.
#[derive(Clone)]
pub struct AccessKey {
    pub id: String,
    pub secret: String,
    /// Set for temporary (STS) credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessKey({})", self.id)
    }
}

/// A running moto; see the module header.
pub struct Moto {
    child: Child,
    port: u16,
    dir: TempDir,
    rt: tokio::runtime::Runtime,
    client: AwsClient,
}

impl std::fmt::Debug for Moto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Moto({})", self.url())
    }
}

/// `<repo>/.venv/bin/moto_server`.
pub fn moto_server() -> PathBuf {
    crate::repo_root().join(".venv/bin/moto_server")
}

/// Whether moto is installed; panics as [`crate::require`] does when it
/// is not (unless `P11SHIM_ALLOW_SKIP=1`, then `false`).
pub fn require_moto() -> bool {
    crate::require(&moto_server().display().to_string())
}

impl Moto {
    /// moto accepting any signature.
    pub fn start() -> Moto {
        Moto::spawn(None)
    }

    /// moto checking signatures and IAM policies after `n` free calls
    /// (`INITIAL_NO_AUTH_ACTION_COUNT`); the warm-up uses one of them.
    pub fn start_with_auth(n: u32) -> Moto {
        assert!(n >= 1, "the warm-up needs one free call");
        Moto::spawn(Some(n))
    }

    fn spawn(free_calls: Option<u32>) -> Moto {
        let server = moto_server();
        assert!(
            server.exists(),
            "{} is missing: run scripts/deps.sh (make test does)",
            server.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("p11shim-moto-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto.log");
        let mut cmd = Command::new(&server);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN");
        if let Some(n) = free_calls {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let url = format!("http://127.0.0.1:{port}/");
        let testing = AccessKey {
            id: "testing".into(),
            secret: "testing".into(),
            session_token: None,
        };
        let client = keyed_client(&url, dir.path(), &testing, AwsConfig::default());
        let mut moto = Moto {
            child,
            port,
            dir,
            rt,
            client,
        };
        moto.wait_ready(&url);
        let warm = moto.block_on(moto.client.query(
            Service::Ec2,
            REGION,
            &[("Action", "DescribeInstances")],
        ));
        if let Err(e) = warm {
            panic!("moto warm-up failed: {e}\n{}", moto.log());
        }
        moto
    }

    fn wait_ready(&mut self, url: &str) {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .expect("http client");
        let deadline = Instant::now() + READY_DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("moto_server exited with {status}\n{}", self.log());
            }
            if http
                .get(format!("{url}moto-api/"))
                .send()
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "moto did not answer within {READY_DEADLINE:?}\n{}",
            self.log()
        );
    }

    /// `http://127.0.0.1:<port>/`: the EC2, IAM and STS endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// moto's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// The harness's client (dummy keys, or the admin's after
    /// [`Moto::bootstrap_admin`]).
    pub fn client(&self) -> &AwsClient {
        &self.client
    }

    /// `[aws]` pointing at this moto, without credentials.
    pub fn config(&self) -> AwsConfig {
        AwsConfig {
            region: Some(REGION.into()),
            endpoint: Some(self.url()),
            iam_endpoint: Some(self.url()),
            ..AwsConfig::default()
        }
    }

    /// A client for this moto with `key` as static credentials (written to
    /// 0600 files and given as `file:` sources); `base`'s endpoints are
    /// replaced, its other settings kept.
    pub fn client_with_keys(&self, key: &AccessKey, base: AwsConfig) -> AwsClient {
        keyed_client(&self.url(), self.dir.path(), key, base)
    }

    /// Writes a secret into a fresh 0600 file of the moto's directory.
    pub fn secret_file(&self, name: &str, value: &str) -> SecretSource {
        secret_file(self.dir.path(), name, value)
    }

    /// Runs a future of the harness's runtime to completion.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A Query call with the harness's client; panics with moto's answer
    /// when it fails.
    pub fn q(&self, service: Service, params: &[(&str, &str)]) -> String {
        self.block_on(self.client.query(service, REGION, params))
            .unwrap_or_else(|e| panic!("{params:?}: {e}"))
    }

    /// Forgets every resource (`POST /moto-api/reset`).
    pub fn reset(&self) {
        let r = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .expect("http client")
            .post(format!("{}moto-api/reset", self.url()))
            .send()
            .expect("moto reset");
        assert!(r.status().is_success(), "moto reset: {}", r.status());
    }

    /// Creates the user `admin` allowed everything and switches the
    /// harness's client to its key. Uses three calls.
    pub fn bootstrap_admin(&mut self) -> AccessKey {
        let all = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        let key = self.create_user_with_policy("admin", all);
        self.client = self.client_with_keys(&key, AwsConfig::default());
        key
    }

    /// The documented least-privilege policy of the broker
    /// (`conf/broker-iam-policy.json`).
    pub fn broker_policy() -> String {
        let p = crate::repo_root().join("conf/broker-iam-policy.json");
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Creates an IAM user with an inline policy and an access key
    /// (three calls).
    pub fn create_user_with_policy(&self, user: &str, policy: &str) -> AccessKey {
        self.q(
            Service::Iam,
            &[("Action", "CreateUser"), ("UserName", user)],
        );
        let key = self.create_access_key(user);
        self.q(
            Service::Iam,
            &[
                ("Action", "PutUserPolicy"),
                ("UserName", user),
                ("PolicyName", "policy"),
                ("PolicyDocument", policy),
            ],
        );
        key
    }

    /// A new access key of `user`.
    pub fn create_access_key(&self, user: &str) -> AccessKey {
        let xml = self.q(
            Service::Iam,
            &[("Action", "CreateAccessKey"), ("UserName", user)],
        );
        AccessKey {
            id: tag(&xml, "AccessKeyId"),
            secret: tag(&xml, "SecretAccessKey"),
            session_token: None,
        }
    }

    /// Creates a role with a trust policy; returns its ARN.
    pub fn create_role(&self, role: &str, trust: &str) -> String {
        let xml = self.q(
            Service::Iam,
            &[
                ("Action", "CreateRole"),
                ("RoleName", role),
                ("AssumeRolePolicyDocument", trust),
            ],
        );
        tag(&xml, "Arn")
    }

    /// Puts an inline policy `name` on a role.
    pub fn put_role_policy(&self, role: &str, name: &str, policy: &str) {
        self.q(
            Service::Iam,
            &[
                ("Action", "PutRolePolicy"),
                ("RoleName", role),
                ("PolicyName", name),
                ("PolicyDocument", policy),
            ],
        );
    }

    /// Removes the inline policy `name` of a role.
    pub fn delete_role_policy(&self, role: &str, name: &str) {
        self.q(
            Service::Iam,
            &[
                ("Action", "DeleteRolePolicy"),
                ("RoleName", role),
                ("PolicyName", name),
            ],
        );
    }

    /// Creates an (empty) instance profile; returns its ARN.
    pub fn create_profile(&self, profile: &str) -> String {
        let xml = self.q(
            Service::Iam,
            &[
                ("Action", "CreateInstanceProfile"),
                ("InstanceProfileName", profile),
            ],
        );
        tag(&xml, "Arn")
    }

    pub fn add_role_to_profile(&self, profile: &str, role: &str) {
        self.q(
            Service::Iam,
            &[
                ("Action", "AddRoleToInstanceProfile"),
                ("InstanceProfileName", profile),
                ("RoleName", role),
            ],
        );
    }

    /// A role EC2 may take and a profile holding it; returns the
    /// profile's ARN.
    pub fn create_role_with_profile(&self, role: &str, profile: &str) -> String {
        self.create_role(role, EC2_TRUST);
        let arn = self.create_profile(profile);
        self.add_role_to_profile(profile, role);
        arn
    }

    /// Runs one instance, with `profile` if given; returns the
    /// RunInstances answer (its XML) and the instance id.
    pub fn run_instance(&self, profile: Option<&str>) -> (String, String) {
        let mut params = vec![
            ("Action", "RunInstances"),
            ("ImageId", IMAGE),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("InstanceType", "t3.micro"),
        ];
        if let Some(p) = profile {
            params.push(("IamInstanceProfile.Name", p));
        }
        let xml = self.q(Service::Ec2, &params);
        let id = tag(&xml, "instanceId");
        (xml, id)
    }

    pub fn stop_instance(&self, id: &str) {
        self.q(
            Service::Ec2,
            &[("Action", "StopInstances"), ("InstanceId.1", id)],
        );
    }

    pub fn start_instance(&self, id: &str) {
        self.q(
            Service::Ec2,
            &[("Action", "StartInstances"), ("InstanceId.1", id)],
        );
    }

    pub fn terminate_instance(&self, id: &str) {
        self.q(
            Service::Ec2,
            &[("Action", "TerminateInstances"), ("InstanceId.1", id)],
        );
    }

    /// Temporary credentials of `role_arn` from STS `AssumeRole`.
    pub fn assume_role(&self, role_arn: &str, session: &str) -> AccessKey {
        let xml = self.q(
            Service::Sts,
            &[
                ("Action", "AssumeRole"),
                ("RoleArn", role_arn),
                ("RoleSessionName", session),
            ],
        );
        AccessKey {
            id: tag(&xml, "AccessKeyId"),
            secret: tag(&xml, "SecretAccessKey"),
            session_token: Some(tag(&xml, "SessionToken")),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keyed_client(url: &str, dir: &Path, key: &AccessKey, base: AwsConfig) -> AwsClient {
    let config = AwsConfig {
        region: Some(REGION.into()),
        endpoint: Some(url.to_owned()),
        iam_endpoint: Some(url.to_owned()),
        access_key_id: Some(secret_file(dir, "ak", &key.id)),
        secret_access_key: Some(secret_file(dir, "sk", &key.secret)),
        session_token: key
            .session_token
            .as_deref()
            .map(|t| secret_file(dir, "st", t)),
        ..base
    };
    AwsClient::new(&config).unwrap_or_else(|e| panic!("AwsClient::new: {e}"))
}

/// Writes a secret into a fresh 0600 file of `dir`.
pub fn secret_file(dir: &Path, name: &str, value: &str) -> SecretSource {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = dir.join(format!("{name}-{n}"));
    std::fs::write(&p, value).expect("write secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    SecretSource::File(p)
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// The text of the first `<name>` element of `xml`: enough for seeding
/// answers, whose first such element is the one wanted (the broker
/// itself reads answers by path).
pub fn tag(xml: &str, name: &str) -> String {
    let open = format!("<{name}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{name}> in {xml}"))
        + open.len();
    let end = xml[start..]
        .find(&format!("</{name}>"))
        .unwrap_or_else(|| panic!("<{name}> is not closed in {xml}"));
    xml[start..start + end].to_owned()
}

/// Whether an error is `Unavailable` and mentions `what`.
pub fn is_unavailable(e: &AwsError, what: &str) -> bool {
    matches!(e, AwsError::Unavailable(m) if m.contains(what))
}
