//! The record of a scenario run: one line per step, with the step's name,
//! what the scenario expects of it, and what the module returned.
//!
//! Outcomes are recorded so that two runs compare exactly: deterministic
//! outputs in full (hex), randomized ones by their length or by whether they
//! verify, handles never. A transcript travels from a child process to the
//! test as text ([`Transcript::to_text`], [`Transcript::parse`]).

use cryptoki::error::{Error, Result, RvError};

/// What a scenario expects of a step.
#[derive(Debug, Clone)]
enum Expect {
    /// Nothing: only compared between modules.
    Any,
    /// Success.
    Ok,
    /// Some PKCS#11 error.
    Rejected,
    /// One of these PKCS#11 errors (the spec or vendors differ).
    Rv(Vec<RvError>),
    /// A check that must hold.
    True,
}

impl Expect {
    fn text(&self) -> String {
        match self {
            Expect::Any => "any".into(),
            Expect::Ok => "ok".into(),
            Expect::Rejected => "rejected".into(),
            Expect::Rv(rvs) => rvs
                .iter()
                .map(|rv| format!("rv {rv:?}"))
                .collect::<Vec<_>>()
                .join("|"),
            Expect::True => "true".into(),
        }
    }
}

/// One step: its name, the expectation and the outcome, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub expect: String,
    pub outcome: String,
}

impl Step {
    /// Whether the outcome meets the expectation.
    pub fn met(&self) -> bool {
        match self.expect.as_str() {
            "any" => true,
            "ok" => self.outcome.starts_with("ok"),
            "rejected" => self.outcome.starts_with("rv "),
            "true" => self.outcome == "ok true",
            rvs => rvs.split('|').any(|rv| self.outcome == rv),
        }
    }

    fn line(&self) -> String {
        format!("{}\t{}\t{}", self.name, self.expect, self.outcome)
    }
}

/// The steps of one scenario run, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transcript {
    steps: Vec<Step>,
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The outcome text of a failed call.
fn failure(e: &Error) -> String {
    match e {
        Error::Pkcs11(rv, _) => format!("rv {rv:?}"),
        other => format!("error {}", other.to_string().replace(['\t', '\n'], " ")),
    }
}

impl Transcript {
    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn push<T>(
        &mut self,
        name: &str,
        expect: Expect,
        r: Result<T>,
        show: impl FnOnce(&T) -> String,
    ) -> Option<T> {
        let outcome = match &r {
            Ok(v) => {
                let s = show(v).replace(['\t', '\n'], " ");
                if s.is_empty() {
                    "ok".to_string()
                } else {
                    format!("ok {s}")
                }
            }
            Err(e) => failure(e),
        };
        assert!(
            !name.contains(['\t', '\n']),
            "step names are single fields: {name:?}"
        );
        self.steps.push(Step {
            name: name.to_string(),
            expect: expect.text(),
            outcome,
        });
        r.ok()
    }

    /// A step that must succeed; its value (a handle, a session) is not
    /// recorded.
    pub fn ok<T>(&mut self, name: &str, r: Result<T>) -> Option<T> {
        self.push(name, Expect::Ok, r, |_| String::new())
    }

    /// A step that must succeed with deterministic bytes, recorded in full.
    pub fn bytes(&mut self, name: &str, r: Result<Vec<u8>>) -> Option<Vec<u8>> {
        self.push(name, Expect::Ok, r, |b| hex(b))
    }

    /// A step that must succeed with randomized bytes: only their length is
    /// recorded.
    pub fn len(&mut self, name: &str, r: Result<Vec<u8>>) -> Option<Vec<u8>> {
        self.push(name, Expect::Ok, r, |b| format!("len {}", b.len()))
    }

    /// A step that must succeed with a deterministic value, recorded as
    /// `show` renders it.
    pub fn value<T>(
        &mut self,
        name: &str,
        r: Result<T>,
        show: impl FnOnce(&T) -> String,
    ) -> Option<T> {
        self.push(name, Expect::Ok, r, show)
    }

    /// A step that must fail with `rv`.
    pub fn fails<T>(&mut self, name: &str, r: Result<T>, rv: RvError) {
        self.fails_one_of(name, r, &[rv]);
    }

    /// A step that must fail with one of `rvs`.
    pub fn fails_one_of<T>(&mut self, name: &str, r: Result<T>, rvs: &[RvError]) {
        self.push(name, Expect::Rv(rvs.to_vec()), r, |_| String::new());
    }

    /// A step that must fail with some PKCS#11 error; which one is only
    /// compared between modules.
    pub fn rejected<T>(&mut self, name: &str, r: Result<T>) {
        self.push(name, Expect::Rejected, r, |_| String::new());
    }

    /// A step whose outcome (success with `show`'s rendering, or its error)
    /// is only compared between modules, for behaviour left to the vendor.
    pub fn outcome<T>(
        &mut self,
        name: &str,
        r: Result<T>,
        show: impl FnOnce(&T) -> String,
    ) -> Option<T> {
        self.push(name, Expect::Any, r, show)
    }

    /// A fact that must hold. Returns `Some` when it does, so that a
    /// scenario can stop with `?` when the rest depends on it.
    pub fn check(&mut self, name: &str, holds: bool) -> Option<()> {
        self.push(name, Expect::True, Ok(holds), |h| h.to_string());
        holds.then_some(())
    }

    /// The steps whose outcome does not meet the scenario's expectation.
    pub fn violations(&self) -> Vec<&Step> {
        self.steps.iter().filter(|s| !s.met()).collect()
    }

    /// The violated steps, then the whole transcript, for a failing test.
    pub fn report(&self) -> String {
        let bad: String = self
            .violations()
            .iter()
            .map(|s| format!("  {}: expected {}, got {}\n", s.name, s.expect, s.outcome))
            .collect();
        format!("violated steps:\n{bad}transcript:\n{}", self.to_text())
    }

    /// The transcript as text, one step a line.
    pub fn to_text(&self) -> String {
        self.steps.iter().map(|s| s.line() + "\n").collect()
    }

    /// Reads what [`Transcript::to_text`] wrote.
    pub fn parse(text: &str) -> std::result::Result<Transcript, String> {
        let steps = text
            .lines()
            .map(|line| {
                let mut f = line.splitn(3, '\t');
                match (f.next(), f.next(), f.next()) {
                    (Some(name), Some(expect), Some(outcome)) => Ok(Step {
                        name: name.into(),
                        expect: expect.into(),
                        outcome: outcome.into(),
                    }),
                    _ => Err(format!("not a transcript line: {line:?}")),
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Transcript { steps })
    }

    /// The differences between two transcripts, one line each; empty when
    /// they are identical.
    pub fn diff(&self, other: &Transcript, left: &str, right: &str) -> Vec<String> {
        let mut out = Vec::new();
        let n = self.steps.len().max(other.steps.len());
        for i in 0..n {
            match (self.steps.get(i), other.steps.get(i)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => out.push(format!(
                    "step {i}: {left}: {} [{}] => {} | {right}: {} [{}] => {}",
                    a.name, a.expect, a.outcome, b.name, b.expect, b.outcome
                )),
                (Some(a), None) => out.push(format!(
                    "step {i}: only {left}: {} => {}",
                    a.name, a.outcome
                )),
                (None, Some(b)) => out.push(format!(
                    "step {i}: only {right}: {} => {}",
                    b.name, b.outcome
                )),
                (None, None) => unreachable!(),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    fn rv(e: RvError) -> Result<()> {
        Err(Error::Pkcs11(e, Function::Login))
    }

    #[test]
    fn expectations_are_checked_and_text_round_trips() {
        let mut t = Transcript::default();
        t.bytes("out", Ok(vec![1, 0xab]));
        t.fails("login", rv(RvError::PinIncorrect), RvError::PinIncorrect);
        t.fails("login again", rv(RvError::PinLocked), RvError::PinIncorrect);
        t.rejected("bad", Ok(()));
        t.outcome(
            "vendor's choice",
            rv(RvError::FunctionNotSupported),
            |_: &()| String::new(),
        );
        t.check("fact", false);
        let names: Vec<_> = t.violations().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["login again", "bad", "fact"]);
        assert_eq!(t.steps()[0].outcome, "ok 01ab");
        let back = Transcript::parse(&t.to_text()).unwrap();
        assert_eq!(back, t);
        assert!(back.diff(&t, "a", "b").is_empty());
        let mut other = t.clone();
        other.check("extra", true);
        assert_eq!(t.diff(&other, "a", "b").len(), 1);
    }
}
