//! The broker's AWS client against moto (EC2 + IAM + STS), against moto
//! checking signatures and IAM policies, and against small loopback
//! servers written here for what moto cannot do: refuse to answer, fail
//! with 5xx or throttling, paginate `ListInstanceProfilesForRole`, and
//! serve instance-role credentials over IMDSv2.
//!
//! moto's first EC2 call takes seconds, so each test starts at most one
//! moto and checks many things with it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use p11shim_broker::aws::{AwsClient, AwsConfig, AwsError, Service};
use p11shim_tests::peers::moto::{
    self, ACCOUNT, AccessKey, Moto, REGION, free_port, is_unavailable, tag,
};

// ---------------------------------------------------------------------
// A loopback HTTP/1.1 server answering from a handler, one request per
// connection.

type Handler = dyn Fn(&Request) -> (u16, String) + Send + Sync;

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: String,
}

struct Server {
    url: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    fn start(handler: Box<Handler>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve_one(stream, &*handler, &seen2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            url,
            stop,
            thread: Some(thread),
            seen,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves one request; it is recorded before the answer is written, so a
/// client that has its answer finds its request recorded.
fn serve_one(stream: TcpStream, handler: &Handler, seen: &Mutex<Vec<Request>>) -> Option<()> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = HashMap::new();
    for _ in 0..100 {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(1 << 20)];
    reader.read_exact(&mut body).ok()?;
    let req = Request {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let (status, answer) = handler(&req);
    seen.lock().unwrap().push(req);
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    Some(())
}

/// The decoded form fields of a Query request.
fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let Some(v) = hex {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ec2_error(code: &str) -> String {
    format!(
        "<Response><Errors><Error><Code>{code}</Code><Message>scripted {code}</Message></Error></Errors><RequestID>r</RequestID></Response>"
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A client with dummy static keys for a loopback endpoint.
fn client_for(url: &str, dir: &std::path::Path, base: AwsConfig) -> AwsClient {
    let config = AwsConfig {
        endpoint: Some(url.to_owned()),
        access_key_id: Some(moto::secret_file(dir, "ak", "AKIDEXAMPLE")),
        secret_access_key: Some(moto::secret_file(dir, "sk", "secret-that-stays-hidden")),
        ..base
    };
    AwsClient::new(&config).expect("client")
}

const INSTANCE: &str = "i-0123456789abcdef0";

fn describe_answer() -> String {
    format!(
        "<DescribeInstancesResponse><reservationSet><item><reservationId>r-1</reservationId><ownerId>{ACCOUNT}</ownerId>\
         <instancesSet><item><instanceId>{INSTANCE}</instanceId><instanceState><code>16</code><name>running</name></instanceState>\
         <launchTime>2026-01-01T00:00:00.000Z</launchTime></item></instancesSet></item></reservationSet></DescribeInstancesResponse>"
    )
}

// ---------------------------------------------------------------------

/// Everything the broker reads, against moto accepting any signature.
#[test]
fn ec2_and_iam_against_moto() {
    if !moto::require_moto() {
        return;
    }
    let m = Moto::start();
    let c = m.client();

    let profile_arn = m.create_role_with_profile("hsm-client", "hsm-client-profile");
    let other_arn = m.create_role_with_profile("other-role", "unrelated-profile");
    let (run, id) = m.run_instance(Some("hsm-client-profile"));

    // DescribeInstances gives back what RunInstances made.
    let i = m
        .block_on(c.describe_instance(REGION, &id))
        .expect("describe")
        .expect("the instance exists");
    assert_eq!(i.instance_id, id);
    assert_eq!(i.reservation_id, tag(&run, "reservationId"));
    assert_eq!(i.owner_id, ACCOUNT);
    assert_eq!(i.instance_type, "t3.micro");
    assert_eq!(i.image_id, moto::IMAGE);
    assert_eq!(i.state, "running");
    let private_ip = tag(&run, "privateIpAddress");
    let public_ip = tag(&run, "ipAddress");
    assert_eq!(i.private_ip, Some(private_ip.parse().unwrap()));
    assert_eq!(i.public_ip, Some(public_ip.parse().unwrap()));
    assert_eq!(i.private_dns, tag(&run, "privateDnsName"));
    assert_eq!(i.public_dns, tag(&run, "dnsName"));
    assert_eq!(i.profile_arn.as_deref(), Some(profile_arn.as_str()));
    assert_eq!(
        i.launch_time,
        humantime::parse_rfc3339(&tag(&run, "launchTime")).unwrap()
    );
    let age = SystemTime::now()
        .duration_since(i.launch_time)
        .unwrap_or_default();
    assert!(
        age < Duration::from_secs(300),
        "launched {age:?} ago, per the answer"
    );
    assert!(i.addresses.contains(&private_ip.parse().unwrap()));
    assert!(i.addresses.contains(&public_ip.parse().unwrap()));
    assert!(i.vpc_id.as_deref().is_some_and(|v| v.starts_with("vpc-")));
    assert!(
        i.subnet_id
            .as_deref()
            .is_some_and(|s| s.starts_with("subnet-"))
    );

    // Unknown and malformed ids are "no such instance", not errors.
    assert_eq!(
        m.block_on(c.describe_instance(REGION, INSTANCE)).unwrap(),
        None
    );
    assert_eq!(
        m.block_on(c.describe_instance(REGION, "i-zz")).unwrap(),
        None
    );
    // A region that could redirect the call elsewhere is refused before
    // anything is sent.
    let e = m
        .block_on(c.describe_instance("evil.example/x", &id))
        .unwrap_err();
    assert!(
        matches!(e, AwsError::Api { ref code, .. } if code == "InvalidRegion"),
        "{e}"
    );

    // Stop, start, terminate.
    let state = |id: &str| {
        m.block_on(c.describe_instance(REGION, id))
            .unwrap()
            .expect("instance")
            .state
    };
    m.stop_instance(&id);
    assert_eq!(state(&id), "stopped");
    m.start_instance(&id);
    assert_eq!(state(&id), "running");
    m.terminate_instance(&id);
    assert_eq!(state(&id), "terminated");

    // The role's profile is listed, the unrelated one is not; the
    // nested role ARN is not taken for a profile.
    let arns = m
        .block_on(c.instance_profiles_for_role("hsm-client"))
        .unwrap();
    assert_eq!(arns, vec![profile_arn.clone()]);
    assert!(!arns.contains(&other_arn));
    // (Real IAM answers NoSuchEntity for an unknown role, moto an empty
    // list; the classification of that answer is a unit test.)

    // More profiles for the role; answers are cached for profile_cache.
    let mut all = vec![profile_arn.clone()];
    for n in 1..=3 {
        let p = format!("hsm-client-profile-{n}");
        all.push(m.create_profile(&p));
        m.add_role_to_profile(&p, "hsm-client");
    }
    let cached = m
        .block_on(c.instance_profiles_for_role("hsm-client"))
        .unwrap();
    assert_eq!(cached, vec![profile_arn.clone()], "served from the cache");
    // moto 5.2.5 ignores MaxItems here (one page); the Marker loop is
    // exercised against a paginating server in `pagination_and_retries`.
    let fresh = m.client_with_keys(
        &AccessKey {
            id: "testing".into(),
            secret: "testing".into(),
            session_token: None,
        },
        AwsConfig {
            profile_cache: Duration::ZERO,
            iam_page_size: Some(1),
            ..AwsConfig::default()
        },
    );
    let mut got = m
        .block_on(fresh.instance_profiles_for_role("hsm-client"))
        .unwrap();
    got.sort();
    all.sort();
    assert_eq!(got, all);

    // Call latency against moto (reported, not asserted).
    let (_, id2) = m.run_instance(Some("hsm-client-profile"));
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        m.block_on(fresh.describe_instance(REGION, &id2))
            .unwrap()
            .unwrap();
    }
    let describe = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        m.block_on(fresh.instance_profiles_for_role("hsm-client"))
            .unwrap();
    }
    let list = t.elapsed() / n;
    eprintln!(
        "latency against moto: DescribeInstances {describe:?}, ListInstanceProfilesForRole {list:?} (mean of {n})"
    );

    // A reset empties moto for the next user of the same process.
    m.reset();
    assert_eq!(m.block_on(c.describe_instance(REGION, &id2)).unwrap(), None);
}

/// Nothing listening, or a listener that never answers: `Unavailable`.
#[test]
fn unreachable_and_silent_endpoints_are_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();

    let closed = format!("http://127.0.0.1:{}/", free_port());
    let c = client_for(&closed, dir.path(), AwsConfig::default());
    let e = rt
        .block_on(c.describe_instance(REGION, INSTANCE))
        .unwrap_err();
    assert!(is_unavailable(&e, "cannot connect"), "{e}");
    let e = rt
        .block_on(c.instance_profiles_for_role("hsm-client"))
        .unwrap_err();
    assert!(is_unavailable(&e, "cannot connect"), "{e}");

    // Accepts connections, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", silent.local_addr().unwrap());
    let c = client_for(
        &url,
        dir.path(),
        AwsConfig {
            request_timeout: Duration::from_millis(300),
            retries: 1,
            ..AwsConfig::default()
        },
    );
    let e = rt
        .block_on(c.describe_instance(REGION, INSTANCE))
        .unwrap_err();
    assert!(is_unavailable(&e, "timed out"), "{e}");
    assert!(!e.to_string().contains("secret-that-stays-hidden"));
    drop(silent);
}

/// Retries only where they can help, at most two; the Marker loop of
/// ListInstanceProfilesForRole against a server that paginates.
#[test]
fn pagination_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();

    // 5xx, then success: one retry.
    let calls = Arc::new(Mutex::new(0u32));
    let n = Arc::clone(&calls);
    let s = Server::start(Box::new(move |_| {
        let mut n = n.lock().unwrap();
        *n += 1;
        if *n == 1 {
            (503, ec2_error("ServiceUnavailable"))
        } else {
            (200, describe_answer())
        }
    }));
    let c = client_for(&s.url, dir.path(), AwsConfig::default());
    let i = rt
        .block_on(c.describe_instance(REGION, INSTANCE))
        .unwrap()
        .unwrap();
    assert_eq!(
        (i.instance_id.as_str(), i.state.as_str()),
        (INSTANCE, "running")
    );
    assert_eq!(s.requests().len(), 2);
    // Every attempt is signed for EC2 in the region asked for.
    for r in s.requests() {
        let auth = &r.headers["authorization"];
        assert!(auth.contains("/us-east-1/ec2/aws4_request"), "{auth}");
        assert_eq!(r.method, "POST");
        let f = form(&r.body);
        assert_eq!(f["Action"], "DescribeInstances");
        assert_eq!(f["Version"], "2016-11-15");
        assert_eq!(f["InstanceId.1"], INSTANCE);
    }
    drop(s);

    // Throttled every time: 1 + 2 attempts, then Unavailable.
    let s = Server::start(Box::new(|_| (400, ec2_error("RequestLimitExceeded"))));
    let c = client_for(&s.url, dir.path(), AwsConfig::default());
    let e = rt
        .block_on(c.describe_instance(REGION, INSTANCE))
        .unwrap_err();
    assert!(is_unavailable(&e, "RequestLimitExceeded"), "{e}");
    assert_eq!(s.requests().len(), 3);
    drop(s);

    // Our credentials refused: Unavailable at once, no retry.
    let s = Server::start(Box::new(|_| (401, ec2_error("AuthFailure"))));
    let c = client_for(&s.url, dir.path(), AwsConfig::default());
    let e = rt
        .block_on(c.describe_instance(REGION, INSTANCE))
        .unwrap_err();
    assert!(is_unavailable(&e, "AuthFailure"), "{e}");
    assert_eq!(s.requests().len(), 1);
    // A 5xx on a call that changes state is not repeated.
    let s2 = Server::start(Box::new(|_| (500, ec2_error("InternalError"))));
    let c2 = client_for(&s2.url, dir.path(), AwsConfig::default());
    let e = rt
        .block_on(c2.query(Service::Ec2, REGION, &[("Action", "RunInstances")]))
        .unwrap_err();
    assert!(is_unavailable(&e, "InternalError"), "{e}");
    assert_eq!(s2.requests().len(), 1);
    // Any other 4xx is the API's verdict on the question.
    let s3 = Server::start(Box::new(|_| (400, ec2_error("InvalidParameterValue"))));
    let c3 = client_for(&s3.url, dir.path(), AwsConfig::default());
    let e = rt
        .block_on(c3.describe_instance(REGION, INSTANCE))
        .unwrap_err();
    assert!(
        matches!(e, AwsError::Api { ref code, .. } if code == "InvalidParameterValue"),
        "{e}"
    );
    assert_eq!(s3.requests().len(), 1);

    // ListInstanceProfilesForRole over three pages of one profile each.
    let s = Server::start(Box::new(|r| {
        let f = form(&r.body);
        assert_eq!(f["MaxItems"], "1");
        assert_eq!(f["RoleName"], "hsm-client");
        let (n, next) = match f.get("Marker").map(String::as_str) {
            None => (1, Some("m2")),
            Some("m2") => (2, Some("m3")),
            Some("m3") => (3, None),
            Some(other) => panic!("unexpected marker {other}"),
        };
        let more = match next {
            Some(m) => format!("<IsTruncated>true</IsTruncated><Marker>{m}</Marker>"),
            None => "<IsTruncated>false</IsTruncated>".into(),
        };
        (
            200,
            format!(
                "<ListInstanceProfilesForRoleResponse><ListInstanceProfilesForRoleResult>{more}<InstanceProfiles><member>\
                 <Roles><member><Arn>arn:aws:iam::{ACCOUNT}:role/hsm-client</Arn></member></Roles>\
                 <Arn>arn:aws:iam::{ACCOUNT}:instance-profile/p{n}</Arn></member></InstanceProfiles>\
                 </ListInstanceProfilesForRoleResult></ListInstanceProfilesForRoleResponse>"
            ),
        )
    }));
    let c = client_for(
        &s.url,
        dir.path(),
        AwsConfig {
            iam_page_size: Some(1),
            ..AwsConfig::default()
        },
    );
    let arns = rt
        .block_on(c.instance_profiles_for_role("hsm-client"))
        .unwrap();
    let want: Vec<String> = (1..=3)
        .map(|n| format!("arn:aws:iam::{ACCOUNT}:instance-profile/p{n}"))
        .collect();
    assert_eq!(arns, want);
    assert_eq!(s.requests().len(), 3);
    for r in s.requests() {
        let auth = &r.headers["authorization"];
        assert!(auth.contains("/us-east-1/iam/aws4_request"), "{auth}");
        assert_eq!(form(&r.body)["Version"], "2010-05-08");
    }
    // Cached: no fourth request.
    assert_eq!(
        rt.block_on(c.instance_profiles_for_role("hsm-client"))
            .unwrap(),
        want
    );
    assert_eq!(s.requests().len(), 3);
}

// ---------------------------------------------------------------------
// An IMDSv2 server handing out role credentials that the test swaps.

struct Imds {
    server: Server,
    creds: Arc<Mutex<(AccessKey, SystemTime)>>,
}

impl Imds {
    fn start(key: AccessKey, expires: SystemTime) -> Imds {
        let creds = Arc::new(Mutex::new((key, expires)));
        let c = Arc::clone(&creds);
        let token = "imds-session-token-1";
        let server = Server::start(Box::new(move |r| {
            if r.method == "PUT" && r.path == "/latest/api/token" {
                return match r.headers.get("x-aws-ec2-metadata-token-ttl-seconds") {
                    Some(ttl) if ttl.parse::<u32>().is_ok_and(|t| (1..=21600).contains(&t)) => {
                        (200, token.to_owned())
                    }
                    _ => (400, String::new()),
                };
            }
            if r.headers
                .get("x-aws-ec2-metadata-token")
                .map(String::as_str)
                != Some(token)
            {
                return (401, String::new());
            }
            match (r.method.as_str(), r.path.as_str()) {
                ("GET", "/latest/meta-data/iam/security-credentials/") => {
                    (200, "broker-role".into())
                }
                ("GET", "/latest/meta-data/iam/security-credentials/broker-role") => {
                    let (k, exp) = c.lock().unwrap().clone();
                    let now = humantime::format_rfc3339_seconds(SystemTime::now());
                    (
                        200,
                        format!(
                            r#"{{"Code":"Success","LastUpdated":"{now}","Type":"AWS-HMAC","AccessKeyId":"{}","SecretAccessKey":"{}","Token":"{}","Expiration":"{}"}}"#,
                            k.id,
                            k.secret,
                            k.session_token.unwrap_or_default(),
                            humantime::format_rfc3339_seconds(exp)
                        ),
                    )
                }
                _ => (404, String::new()),
            }
        }));
        Imds { server, creds }
    }

    fn serve(&self, key: AccessKey, expires: SystemTime) {
        *self.creds.lock().unwrap() = (key, expires);
    }

    fn count(&self, method: &str, path: &str) -> usize {
        self.server
            .requests()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }
}

/// moto checking signatures and policies: the least-privilege policy is
/// enough and no more; wrong keys are `Unavailable`; instance-role keys
/// from IMDSv2 are refreshed before they expire.
#[test]
fn signature_checking_moto() {
    if !moto::require_moto() {
        return;
    }
    let mut m = Moto::start_with_auth(4);
    let admin = m.bootstrap_admin();

    // Signatures are checked now: the admin's key with a wrong secret fails.
    let forged = m.client_with_keys(
        &AccessKey {
            secret: "not-the-secret".into(),
            ..admin.clone()
        },
        AwsConfig::default(),
    );
    let e = m
        .block_on(forged.describe_instance(REGION, INSTANCE))
        .unwrap_err();
    assert!(is_unavailable(&e, "AuthFailure"), "{e}");

    let profile_arn = m.create_role_with_profile("hsm-client", "hsm-client-profile");
    let (_, id) = m.run_instance(Some("hsm-client-profile"));

    // The broker's user holds exactly conf/broker-iam-policy.json.
    let key = m.create_user_with_policy("broker", &Moto::broker_policy());
    let broker = m.client_with_keys(&key, AwsConfig::default());
    let i = m
        .block_on(broker.describe_instance(REGION, &id))
        .unwrap()
        .expect("instance");
    assert_eq!(i.profile_arn.as_deref(), Some(profile_arn.as_str()));
    assert_eq!(
        m.block_on(broker.instance_profiles_for_role("hsm-client"))
            .unwrap(),
        vec![profile_arn.clone()]
    );
    // Outside the policy: refused, and that is "could not check".
    let e = m
        .block_on(broker.query(Service::Ec2, REGION, &[("Action", "DescribeVpcs")]))
        .unwrap_err();
    assert!(
        is_unavailable(&e, "AccessDenied") || is_unavailable(&e, "UnauthorizedOperation"),
        "{e}"
    );

    // The broker's key with a wrong secret.
    let wrong = m.client_with_keys(
        &AccessKey {
            secret: "wrong-secret-value".into(),
            ..key.clone()
        },
        AwsConfig::default(),
    );
    for e in [
        m.block_on(wrong.describe_instance(REGION, &id))
            .unwrap_err(),
        m.block_on(wrong.instance_profiles_for_role("hsm-client"))
            .unwrap_err(),
    ] {
        assert!(
            is_unavailable(&e, "AuthFailure") || is_unavailable(&e, "SignatureDoesNotMatch"),
            "{e}"
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("wrong-secret-value") && !shown.contains(&key.secret));
    }

    // Instance-role credentials: two roles with the broker's policy,
    // temporary keys (with session tokens) from STS for each.
    let trust = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::{ACCOUNT}:user/admin"}},"Action":"sts:AssumeRole"}}]}}"#
    );
    let role_a = m.create_role("broker-role-a", &trust);
    let role_b = m.create_role("broker-role-b", &trust);
    m.put_role_policy("broker-role-a", "broker", &Moto::broker_policy());
    m.put_role_policy("broker-role-b", "broker", &Moto::broker_policy());
    let key_a = m.assume_role(&role_a, "broker-a");
    let key_b = m.assume_role(&role_b, "broker-b");

    // Key A expires in 5 min + 3 s: fresh now, inside the refresh window
    // (5 min before expiry) three seconds from now.
    let imds = Imds::start(key_a.clone(), SystemTime::now() + Duration::from_secs(303));
    let config = AwsConfig {
        imds_endpoint: Some(imds.server.url.clone()),
        ..m.config()
    };
    let via_imds = AwsClient::new(&config).unwrap();
    assert_eq!(
        via_imds.credentials().origin(),
        "instance role",
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY must not be set in the test environment"
    );
    assert!(
        m.block_on(via_imds.describe_instance(REGION, &id))
            .unwrap()
            .is_some()
    );
    assert!(
        m.block_on(via_imds.describe_instance(REGION, &id))
            .unwrap()
            .is_some()
    );
    assert_eq!(
        m.block_on(via_imds.credentials().imds_fetches()),
        1,
        "fresh keys are reused"
    );

    // Past the refresh point; IMDS now hands out key B, and key A loses
    // its rights, so only a refreshed client can still call.
    std::thread::sleep(Duration::from_secs(4));
    imds.serve(key_b.clone(), SystemTime::now() + Duration::from_secs(3600));
    m.delete_role_policy("broker-role-a", "broker");
    let with_a = m.client_with_keys(&key_a, AwsConfig::default());
    let e = m
        .block_on(with_a.describe_instance(REGION, &id))
        .unwrap_err();
    assert!(
        is_unavailable(&e, "AccessDenied") || is_unavailable(&e, "UnauthorizedOperation"),
        "{e}"
    );

    let i = m
        .block_on(via_imds.describe_instance(REGION, &id))
        .unwrap()
        .expect("instance, with the refreshed keys");
    assert_eq!(i.instance_id, id);
    assert_eq!(
        m.block_on(via_imds.credentials().imds_fetches()),
        2,
        "refreshed once"
    );
    assert!(
        m.block_on(via_imds.instance_profiles_for_role("hsm-client"))
            .is_ok()
    );
    assert_eq!(m.block_on(via_imds.credentials().imds_fetches()), 2);
    // One IMDSv2 session token served every read.
    assert_eq!(imds.count("PUT", "/latest/api/token"), 1);
    assert_eq!(
        imds.count(
            "GET",
            "/latest/meta-data/iam/security-credentials/broker-role"
        ),
        2
    );
    let shown = format!("{via_imds:?}");
    assert!(
        !shown.contains(&key_b.secret) && !shown.contains(&key_b.id),
        "{shown}"
    );
}
