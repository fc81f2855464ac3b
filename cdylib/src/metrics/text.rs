//! The Prometheus text exposition format (version 0.0.4), written by hand:
//! the `prometheus-client` crate keeps its histograms behind a lock and its
//! label sets in a locked map, which the hot path must not pay for, and
//! what is written here is small and fixed.
//!
//! Every family has its `# HELP` and `# TYPE` lines and its samples
//! together; label values and help text are escaped; every series carries
//! the exporter's constant labels first.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{BOUNDS_LE, Exporter, HistogramSnapshot, Op};
use crate::dispatch::Library;
use crate::router;

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes help text: backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Builds the text of one file.
#[derive(Debug)]
pub struct Encoder {
    out: String,
    constant: String,
}

impl Encoder {
    /// `constant`: rendered `name="value"` pairs put on every series.
    pub fn new(constant: &str) -> Encoder {
        Encoder {
            out: String::with_capacity(16 * 1024),
            constant: constant.to_owned(),
        }
    }

    /// Starts a family: its help and type lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample; `labels` are escaped here.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        let mut sep = '{';
        if !self.constant.is_empty() {
            self.out.push(sep);
            self.out.push_str(&self.constant);
            sep = ',';
        }
        for (n, v) in labels {
            self.out.push(sep);
            let _ = write!(self.out, "{n}=\"{}\"", escape_label(v));
            sep = ',';
        }
        if sep == ',' {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The samples of one histogram series: cumulative buckets, sum, count.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        with_le.push(("le", ""));
        for (le, n) in BOUNDS_LE.iter().zip(h.cumulative) {
            if let Some(last) = with_le.last_mut() {
                last.1 = le;
            }
            self.sample(&bucket, &with_le, n);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count());
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The metrics of an initialized module.
pub fn render(lib: &Library, exporter: &Exporter) -> String {
    let mut e = Encoder::new(exporter.constant_labels());
    e.family(
        "p11shim_build_info",
        "gauge",
        "The p11shim module in this process; always 1.",
    );
    e.sample(
        "p11shim_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    e.family(
        "p11shim_metrics_write_timestamp_seconds",
        "gauge",
        "When this file was written (Unix time); an old value means the process stopped writing.",
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64 / 1e3);
    e.sample("p11shim_metrics_write_timestamp_seconds", &[], now);

    let ids: Vec<String> = lib.slots.iter().map(|s| s.cfg.id.to_string()).collect();

    e.family(
        "p11shim_slot_info",
        "gauge",
        "A virtual slot and the token label applications see; always 1.",
    );
    for (s, id) in lib.slots.iter().zip(&ids) {
        e.sample(
            "p11shim_slot_info",
            &[("slot", id), ("token", &s.cfg.label)],
            1,
        );
    }
    e.family(
        "p11shim_slot_sessions",
        "gauge",
        "Sessions the application has open on the slot.",
    );
    for (si, id) in ids.iter().enumerate() {
        e.sample(
            "p11shim_slot_sessions",
            &[("slot", id)],
            lib.open_sessions(si as u32),
        );
    }
    e.family(
        "p11shim_slot_logged_in",
        "gauge",
        "1 when the slot is logged in.",
    );
    for (s, id) in lib.slots.iter().zip(&ids) {
        e.sample(
            "p11shim_slot_logged_in",
            &[("slot", id)],
            u8::from(s.logged_in()),
        );
    }

    members(&mut e, lib, &ids);
    operations(&mut e, lib, &ids);
    if let Some(agent) = &lib.credentials {
        credentials(&mut e, &agent.status_json());
    }
    e.finish()
}

/// Member states, as the status query names them.
const STATES: [&str; 5] = ["active", "standby", "recovering", "down", "absent"];

fn members(e: &mut Encoder, lib: &Library, ids: &[String]) {
    let each = |e: &mut Encoder, f: &dyn Fn(&mut Encoder, &str, &str, &router::Member)| {
        for (s, id) in lib.slots.iter().zip(ids) {
            for m in &s.members {
                f(e, id, &m.name, m);
            }
        }
    };
    e.family(
        "p11shim_member_info",
        "gauge",
        "A member of a virtual slot and its vendor library; always 1.",
    );
    each(e, &|e, slot, name, m| {
        let library = m.cfg.library.display().to_string();
        e.sample(
            "p11shim_member_info",
            &[("slot", slot), ("member", name), ("library", &library)],
            1,
        )
    });
    e.family(
        "p11shim_member_up",
        "gauge",
        "1 when the member serves (active or standby), 0 when it is down, absent or recovering.",
    );
    each(e, &|e, slot, name, m| {
        e.sample(
            "p11shim_member_up",
            &[("slot", slot), ("member", name)],
            u8::from(m.is_up()),
        )
    });
    e.family(
        "p11shim_member_state",
        "gauge",
        "The member's state: 1 for the current one, 0 for the others.",
    );
    each(e, &|e, slot, name, m| {
        let now = router::state_name(m);
        for st in STATES {
            e.sample(
                "p11shim_member_state",
                &[("slot", slot), ("member", name), ("state", st)],
                u8::from(st == now),
            );
        }
    });
    e.family(
        "p11shim_member_sessions",
        "gauge",
        "Sessions bound to the member.",
    );
    for (si, (s, slot)) in lib.slots.iter().zip(ids).enumerate() {
        for m in &s.members {
            e.sample(
                "p11shim_member_sessions",
                &[("slot", slot), ("member", &m.name)],
                lib.member_sessions(si as u32, m),
            );
        }
    }
    e.family(
        "p11shim_member_inflight",
        "gauge",
        "Calls running on the member now (multi-member slots).",
    );
    each(e, &|e, slot, name, m| {
        e.sample(
            "p11shim_member_inflight",
            &[("slot", slot), ("member", name)],
            m.inflight(),
        )
    });
    type Read = fn(&router::MemberStats) -> u64;
    let counters: [(&str, &str, Read); 3] = [
        (
            "p11shim_member_errors_total",
            "Vendor calls on the member that returned an error.",
            |s| s.errors.load(Ordering::Relaxed),
        ),
        (
            "p11shim_member_failovers_total",
            "Sessions moved away from the member after it failed.",
            |s| s.failovers.load(Ordering::Relaxed),
        ),
        (
            "p11shim_member_recoveries_total",
            "Times the member came back into service after being down.",
            |s| s.recoveries.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        e.family(name, "counter", help);
        each(e, &|e, slot, member, m| {
            e.sample(name, &[("slot", slot), ("member", member)], get(&m.stats))
        });
    }
    e.family(
        "p11shim_member_missed_changes",
        "gauge",
        "Token changes the member missed while down, to be replayed when it comes back.",
    );
    for (s, id) in lib.slots.iter().zip(ids) {
        for (i, m) in s.members.iter().enumerate() {
            e.sample(
                "p11shim_member_missed_changes",
                &[("slot", id), ("member", &m.name)],
                s.missed_changes(i as u32),
            );
        }
    }
    e.family(
        "p11shim_member_call_duration_seconds",
        "histogram",
        "Duration of the vendor calls made on the member for applications' sessions and slots.",
    );
    each(e, &|e, slot, name, m| {
        e.histogram(
            "p11shim_member_call_duration_seconds",
            &[("slot", slot), ("member", name)],
            &m.stats.calls.snapshot(),
        )
    });
}

fn operations(e: &mut Encoder, lib: &Library, ids: &[String]) {
    e.family(
        "p11shim_operations_total",
        "counter",
        "Operations that ended, by kind and result (a size query or CKR_BUFFER_TOO_SMALL ends none).",
    );
    for (s, id) in lib.slots.iter().zip(ids) {
        for op in Op::ALL {
            let st = s.ops.get(op);
            for (result, n) in [("ok", &st.ok), ("error", &st.error)] {
                e.sample(
                    "p11shim_operations_total",
                    &[("slot", id), ("op", op.name()), ("result", result)],
                    n.load(Ordering::Relaxed),
                );
            }
        }
    }
    e.family(
        "p11shim_operation_duration_seconds",
        "histogram",
        "Duration of the call that ended each operation (C_Sign, C_SignFinal, C_GenerateKeyPair, ...), for the kinds seen.",
    );
    for (s, id) in lib.slots.iter().zip(ids) {
        for op in Op::ALL {
            let h = s.ops.get(op).duration.snapshot();
            if h.count() > 0 {
                e.histogram(
                    "p11shim_operation_duration_seconds",
                    &[("slot", id), ("op", op.name())],
                    &h,
                );
            }
        }
    }
}

/// From the credentials agent's status: exchanges by result, and the time
/// left on the current grant.
fn credentials(e: &mut Encoder, status: &serde_json::Value) {
    let get = |k: &str| status.get(k).and_then(serde_json::Value::as_u64);
    let (grants, attempts) = (get("grants").unwrap_or(0), get("attempts").unwrap_or(0));
    e.family(
        "p11shim_credentials_refresh_total",
        "counter",
        "Exchanges with p11shim-broker, by result (ok: credentials granted).",
    );
    e.sample(
        "p11shim_credentials_refresh_total",
        &[("result", "ok")],
        grants,
    );
    e.sample(
        "p11shim_credentials_refresh_total",
        &[("result", "error")],
        attempts.saturating_sub(grants),
    );
    if let Some(left) = get("expires_in_s") {
        e.family(
            "p11shim_credentials_expiry_seconds",
            "gauge",
            "Seconds until the current credentials expire (0: expired).",
        );
        e.sample("p11shim_credentials_expiry_seconds", &[], left);
    }
}

impl super::Export for Library {
    fn export(&self) {
        if let Some(x) = &self.metrics {
            x.write(|x| render(self, x));
        }
    }

    fn interval(&self) -> std::time::Duration {
        self.metrics
            .as_ref()
            .map_or(std::time::Duration::from_secs(15), Exporter::interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Histogram;

    #[test]
    fn escapes_label_values_and_help() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
    }

    #[test]
    fn writes_families_and_histograms() {
        let mut e = Encoder::new("service=\"pay\"");
        e.family("t_total", "counter", "A test.\nSecond line.");
        e.sample("t_total", &[("op", "si\"gn")], 3);
        let h = Histogram::default();
        h.observe(std::time::Duration::from_micros(70));
        e.family("t_seconds", "histogram", "H.");
        e.histogram("t_seconds", &[("op", "sign")], &h.snapshot());
        let plain = {
            let mut p = Encoder::new("");
            p.sample("u", &[], 1);
            p.finish()
        };
        assert_eq!(plain, "u 1\n");
        let text = e.finish();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# HELP t_total A test.\\nSecond line.");
        assert_eq!(lines[1], "# TYPE t_total counter");
        assert_eq!(lines[2], "t_total{service=\"pay\",op=\"si\\\"gn\"} 3");
        assert_eq!(
            lines[5],
            "t_seconds_bucket{service=\"pay\",op=\"sign\",le=\"0.00005\"} 0"
        );
        assert_eq!(
            lines[6],
            "t_seconds_bucket{service=\"pay\",op=\"sign\",le=\"0.0001\"} 1"
        );
        assert_eq!(
            lines[21],
            "t_seconds_bucket{service=\"pay\",op=\"sign\",le=\"+Inf\"} 1"
        );
        assert_eq!(
            lines[22],
            "t_seconds_sum{service=\"pay\",op=\"sign\"} 0.00007"
        );
        assert_eq!(lines[23], "t_seconds_count{service=\"pay\",op=\"sign\"} 1");
        assert!(text.ends_with('\n'));
    }
}
