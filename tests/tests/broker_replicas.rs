//! Two broker processes (the `p11shim-broker` binary) sharing one
//! PostgreSQL database: the same first-use request, sent to both at the
//! same instant, is granted by exactly one and refused as `already_used`
//! by the other, over 20 rounds with 20 distinct identities.
//!
//! The identities are synthetic machine fingerprints listed in one role
//! (`fingerprint_bind_address = false`, so the attributes need not be
//! this machine's); `reauth = "never"`, so a second request for an
//! identity can only be a replay.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use p11shim_proto::seal::KeyPair;
use p11shim_proto::{Credentials, FingerprintEvidence, Method, Request, Response, Secret, b64_url};
use p11shim_tests::peers::broker::{BrokerProcess, write_secret};
use p11shim_tests::peers::databases::Postgres;
use p11shim_tests::{require, run_ok};

use base64::Engine as _;

const ROUNDS: usize = 20;
const ROLE: &str = "fleet";
const PIN: &str = "replica-pin-4711";

/// The attributes of identity `i`, and their fingerprint.
fn identity(i: usize) -> (BTreeMap<String, String>, String) {
    let attrs: BTreeMap<String, String> = [
        ("machine-id", format!("{i:032x}")),
        ("hostname", format!("replica-test-{i}")),
        ("addresses", format!("192.0.2.{}", i + 1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let fp = p11shim_proto::fingerprint::fingerprint(&attrs);
    (attrs, fp)
}

fn broker_config(url_file: &Path, pin_file: &Path) -> String {
    let fingerprints: Vec<String> = (0..ROUNDS)
        .map(|i| format!("\"{}\"", identity(i).1))
        .collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"5s\"\nrequest_timeout = \"20s\"\n\n\
         [store]\nkind = \"postgres\"\nurl = \"file:{}\"\npool_size = 4\n\n\
         [limits]\nper_ip = {{ per_minute = 6000, burst = 1000 }}\n\n\
         [roles.{ROLE}]\nmethods = [\"static-fingerprint\"]\npin = \"file:{}\"\n\
         reauth = \"never\"\nfingerprint_bind_address = false\nfingerprints = [{}]\n",
        url_file.display(),
        pin_file.display(),
        fingerprints.join(", ")
    )
}

/// What one broker answered.
#[derive(Debug)]
struct Answer {
    broker: usize,
    status: u16,
    body: serde_json::Value,
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1)
        .build()
        .expect("client")
}

fn decisions(client: &reqwest::blocking::Client, b: &BrokerProcess, outcome: &str) -> u64 {
    let text = client
        .get(format!("{}/metrics", b.url()))
        .send()
        .expect("metrics")
        .text()
        .expect("metrics text");
    let prefix = format!(
        "p11shim_broker_decisions_total{{method=\"static-fingerprint\",outcome=\"{outcome}\"}}"
    );
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[test]
fn two_broker_processes_on_one_postgres_grant_each_first_use_once() {
    if !require("psql") {
        return;
    }
    let Some(pg) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let url_file = write_secret(dir.path(), "store-url", &pg.url());
    let pin_file = write_secret(dir.path(), "role.pin", PIN);
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, broker_config(&url_file, &pin_file)).expect("write the configuration");
    // One after the other, so that the schema is made once before the race.
    let brokers = [
        BrokerProcess::start(&config, &dir.path().join("broker-0.log")),
        BrokerProcess::start(&config, &dir.path().join("broker-1.log")),
    ];
    let urls: Vec<String> = brokers.iter().map(BrokerProcess::url).collect();
    // One client (and one kept-alive connection) per broker, opened before
    // the rounds, so that both requests of a round leave together.
    let clients: Vec<reqwest::blocking::Client> = urls
        .iter()
        .map(|u| {
            let c = client();
            let st = c.get(format!("{u}/healthz")).send().expect("healthz");
            assert_eq!(st.status().as_u16(), 200);
            c
        })
        .collect();

    let mut per_round: Vec<Vec<Answer>> = Vec::new();
    for round in 0..ROUNDS {
        let (attrs, _) = identity(round);
        let key = Arc::new(KeyPair::generate());
        let request = Request {
            v: p11shim_proto::VERSION,
            request_id: format!("replica-round-{round}"),
            role: ROLE.into(),
            method: Some(Method::StaticFingerprint),
            fingerprint: Some(FingerprintEvidence { attributes: attrs }),
            client_nonce: Some(Secret::new(b64_url().encode([round as u8; 32]))),
            response_key: Some(key.response_key()),
            ..Default::default()
        };
        let body = Arc::new(serde_json::to_vec(&request).expect("encode"));
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|b| {
                let (client, url) = (clients[b].clone(), urls[b].clone());
                let (body, barrier) = (Arc::clone(&body), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let req = client
                        .post(format!("{url}{}", p11shim_proto::CREDENTIALS_PATH))
                        .header("content-type", "application/json")
                        .body(body.to_vec());
                    barrier.wait();
                    let r = req.send().expect("post");
                    let status = r.status().as_u16();
                    let text = r.text().unwrap_or_default();
                    Answer {
                        broker: b,
                        status,
                        body: serde_json::from_str(&text)
                            .unwrap_or(serde_json::Value::String(text)),
                    }
                })
            })
            .collect();
        let mut answers: Vec<Answer> = handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect();
        answers.sort_by_key(|a| a.status);
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert_eq!(statuses, [200, 409], "round {round}: {answers:?}");
        assert_eq!(
            answers[1].body["title"], "already_used",
            "round {round}: {answers:?}"
        );
        // The winner's answer opens with the requester's key to the PIN.
        let resp: Response =
            serde_json::from_value(answers[0].body.clone()).expect("a credentials answer");
        let sealed = resp.sealed_credentials.as_ref().expect("sealed");
        let aad = p11shim_proto::seal::aad(
            &resp.request_id,
            &resp.role,
            &resp.subject,
            &resp.expires_at,
        );
        let creds: Credentials =
            serde_json::from_slice(&key.open(sealed, &aad).expect("open")).expect("credentials");
        assert_eq!(creds.pin.expose(), PIN);
        per_round.push(answers);
    }

    // Both brokers did take part: each won some rounds, or at least each
    // answered every round (the winner is whichever commits first).
    let wins: Vec<usize> = (0..2)
        .map(|b| per_round.iter().filter(|a| a[0].broker == b).count())
        .collect();
    assert_eq!(wins.iter().sum::<usize>(), ROUNDS);
    let granted: u64 = brokers
        .iter()
        .zip(&clients)
        .map(|(b, c)| decisions(c, b, "granted"))
        .sum();
    let refused: u64 = brokers
        .iter()
        .zip(&clients)
        .map(|(b, c)| decisions(c, b, "already_used"))
        .sum();
    assert_eq!((granted, refused), (ROUNDS as u64, ROUNDS as u64));
    for (b, c) in brokers.iter().zip(&clients) {
        assert_eq!(
            decisions(c, b, "granted") + decisions(c, b, "already_used"),
            ROUNDS as u64,
            "every round reached both brokers"
        );
    }
    // One row per identity in the shared store, as the brokers' role.
    let out = run_ok(
        Command::new("psql")
            .arg(pg.url())
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!(
                "SELECT count(*) FROM p11shim_seen WHERE role = '{ROLE}'"
            ))
            .env("PGCONNECT_TIMEOUT", "10"),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ROUNDS.to_string()
    );
    eprintln!("rounds won per broker: {wins:?}");
    drop(brokers);
}
