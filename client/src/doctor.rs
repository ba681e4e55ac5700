//! `tally doctor`: the checks that tell a user why licensing does not work here.
//!
//! The body of the command, apart from the binary so that it can be tested; `tally`
//! prints each [`Line`] as it comes and maps the [`Verdict`] to an exit code. The
//! checks that judge (clock skew, expiry) are plain functions of the time given.

use crate::{ClientConfig, ClientError, Session};
use tally_protocol::bundle::VerifiedBundle;
use tally_protocol::time::{UnixTime, DAY};
use tally_protocol::wire::{CheckoutRequest, DEFAULT_PORT};

/// Clock skew beyond this is worth a warning: lease and bundle dates are the server's.
const MAX_SKEW_SECS: i64 = 300;
/// A licence ending within this many days is worth a warning.
const RENEWAL_WARNING_DAYS: u64 = 30;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Passed.
    Ok,
    /// Passed, but something needs attention soon.
    Warn,
    /// Failed.
    Fail,
    /// What to do about the failure above.
    Fix,
}

impl Level {
    /// The label `tally doctor` prints in front of the line.
    pub fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
            Level::Fix => "",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// How the check came out.
    pub level: Level,
    /// What was found (may hold names from the server: escape before printing).
    pub text: String,
}

impl Line {
    fn new(level: Level, text: impl Into<String>) -> Line {
        Line {
            level,
            text: text.into(),
        }
    }
}

/// The outcome: the first problem found, or none.
#[derive(Debug)]
pub enum Verdict {
    /// Nothing failed (warnings aside).
    Healthy,
    /// No server answered.
    NoServer,
    /// A server answered, but its trust chain is not vouched for by a trusted vendor.
    Untrusted,
    /// A feature of a served bundle has expired.
    Expired,
    /// The test checkout was denied.
    Denied,
    /// The test checkout failed otherwise.
    CheckoutFailed(ClientError),
}

/// Runs the checks against the configured servers, calling `report` with each line as
/// soon as it is known; with `feature`, also checks that one seat of it can be checked
/// out (and checks it in at once).
pub async fn run(
    config: &ClientConfig,
    feature: Option<&str>,
    report: &mut dyn FnMut(Line),
) -> Verdict {
    let session = match Session::connect(config).await {
        Ok(s) => {
            report(Line::new(
                Level::Ok,
                format!(
                    "server {} answers over QUIC (UDP); tallyd {}",
                    s.server(),
                    s.hello().server_version
                ),
            ));
            report(Line::new(
                Level::Ok,
                format!(
                    "trust chain: server key {} is vouched for by a trusted vendor bundle",
                    s.server_key().fingerprint()
                ),
            ));
            s
        }
        Err(ClientError::Untrusted(why)) => {
            report(Line::new(Level::Fail, format!("trust chain: {why}")));
            report(Line::new(
                Level::Fix,
                "fix: the application must trust the vendor key that signed the server's bundle (--vendor-pub),                  and the server must serve a bundle issued for its own key",
            ));
            return Verdict::Untrusted;
        }
        Err(e) => {
            report(Line::new(Level::Fail, format!("no server reachable: {e}")));
            report(Line::new(
                Level::Fix,
                format!(
                    "fix: check that tallyd runs on {} and that UDP port {} is open in the firewalls between here and there",
                    config.servers.join(", "),
                    DEFAULT_PORT
                ),
            ));
            return Verdict::NoServer;
        }
    };
    let mut verdict = None;
    cluster(config, &session, report).await;
    report(clock_skew(UnixTime::now(), session.hello().server_time));
    let (lines, expired) = expiry(session.bundles(), UnixTime::now());
    lines.into_iter().for_each(&mut *report);
    if expired {
        verdict.get_or_insert(Verdict::Expired);
    }
    if let Some(feature) = feature {
        let want = CheckoutRequest {
            feature: feature.to_string(),
            count: 1,
            version: None,
            build_date: None,
            wait_secs: 0,
            borrow_secs: 0,
        };
        match session.checkout(&want).await {
            Ok(lease) => {
                let _ = session.checkin(&[lease.lease_ref()]).await;
                report(Line::new(
                    Level::Ok,
                    format!("'{feature}' can be checked out by {}", config.identity),
                ));
            }
            Err(ClientError::Denied(d)) => {
                verdict.get_or_insert(Verdict::Denied);
                report(Line::new(
                    Level::Fail,
                    format!("'{feature}' for {}: {d}", config.identity),
                ))
            }
            Err(e) => {
                report(Line::new(
                    Level::Fail,
                    format!("checkout of '{feature}': {e}"),
                ));
                verdict.get_or_insert(Verdict::CheckoutFailed(e));
            }
        }
    }
    session.close().await;
    verdict.unwrap_or(Verdict::Healthy)
}

/// The cluster check, when the served bundle binds several servers (a three-server
/// site): each configured address asked alone, side by side, says whether it leads,
/// sends the client to the leader, or does not answer. The site serves while a majority
/// runs, so a member down is a warning (no margin left), and so is a client that lists
/// fewer addresses than the cluster has members (it cannot find the others when the
/// ones it lists are down), the usual mistake with redundant license servers.
async fn cluster(config: &ClientConfig, session: &Session, report: &mut dyn FnMut(Line)) {
    let members = session.lease_signers().len();
    if members <= 1 {
        return;
    }
    let mut probes = tokio::task::JoinSet::new();
    for (i, server) in config.servers.iter().enumerate() {
        let mut alone = config.clone();
        alone.servers = vec![server.clone()];
        let server = server.clone();
        probes.spawn(async move {
            let own = crate::resolve(&server).await.unwrap_or_default();
            let answer = Session::connect(&alone).await;
            let answer = match answer {
                Ok(s) => {
                    let found = (s.server(), s.server_key().fingerprint());
                    s.close().await;
                    Ok((own.contains(&found.0), found))
                }
                Err(e) => Err(e),
            };
            (i, server, answer)
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = probes.join_next().await {
        if let Ok(answer) = done {
            answers.push(answer);
        }
    }
    answers.sort_by_key(|(i, _, _)| *i);
    let mut leaders = std::collections::BTreeSet::new();
    let mut silent = 0;
    for (_, server, answer) in &answers {
        match answer {
            Ok((true, (_, key))) => {
                leaders.insert(key.clone());
                report(Line::new(Level::Ok, format!("cluster: {server} leads (server key {key})")));
            }
            Ok((false, (leader, _))) => report(Line::new(
                Level::Ok,
                format!("cluster: {server} is a member that does not lead; it sent the client to the leader at {leader}"),
            )),
            Err(e) => {
                silent += 1;
                report(Line::new(Level::Warn, format!("cluster: {server} does not answer: {e}")));
            }
        }
    }
    if silent > 0 {
        report(Line::new(
            Level::Fix,
            format!(
                "fix: the site serves while a majority of its {members} servers runs, with less margin \
                 now: start the server that does not answer, or replace it (README: \
                 \"Replacing a lost member\")"
            ),
        ));
    }
    if leaders.len() > 1 {
        report(Line::new(
            Level::Warn,
            format!(
                "cluster: {} members answered as leader (a leader change under way?): run tally doctor again",
                leaders.len()
            ),
        ));
    }
    if config.servers.len() < members {
        report(Line::new(
            Level::Warn,
            format!(
                "cluster: the bundle binds {members} servers but this client lists {}: when \
                 those are down it cannot find the others",
                plural_servers(config.servers.len())
            ),
        ));
        report(Line::new(
            Level::Fix,
            "fix: list every server of the site (--server a,b,c or TALLY_SERVER=a,b,c)",
        ));
    }
}

fn plural_servers(n: usize) -> String {
    tally_protocol::wire::plural(n as u64, "server", "servers")
}

/// The clock check: this machine's time `local` against the server's `server`.
pub fn clock_skew(local: UnixTime, server: UnixTime) -> Line {
    let skew = local.0 as i64 - server.0 as i64;
    if skew.abs() > MAX_SKEW_SECS {
        Line::new(
            Level::Warn,
            format!(
                "clock skew: this machine is {} s {} the server; fix: synchronise both with NTP",
                skew.abs(),
                if skew > 0 { "ahead of" } else { "behind" }
            ),
        )
    } else {
        Line::new(Level::Ok, format!("clock skew {skew} s"))
    }
}

/// The expiry check of every feature the server serves, at `today`: a line for each
/// feature that has ended (a failure) or ends within 30 days (a warning), and whether
/// any has ended. A feature's own end comes before its bundle's.
pub fn expiry(bundles: &[VerifiedBundle], today: UnixTime) -> (Vec<Line>, bool) {
    let mut lines = Vec::new();
    let mut expired = false;
    for b in bundles {
        for f in &b.bundle.features {
            match f.expires.or(b.bundle.valid_until) {
                Some(end) if end <= today => {
                    expired = true;
                    lines.push(Line::new(
                        Level::Fail,
                        format!("'{}' expired at the end of {}", f.name, end.last_day()),
                    ))
                }
                Some(end) if end.0 - today.0 <= RENEWAL_WARNING_DAYS * DAY => {
                    lines.push(Line::new(
                        Level::Warn,
                        format!(
                            "'{}' ends after {} ({} days); ask the vendor for a renewal",
                            f.name,
                            end.last_day(),
                            (end.0 - today.0) / DAY
                        ),
                    ))
                }
                _ => {}
            }
        }
    }
    (lines, expired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_protocol::bundle::{self, Bundle, Customer, FeatureGrant};
    use tally_protocol::keys::SecretKey;

    const TODAY: UnixTime = UnixTime(1_800_000_000);

    fn served(valid_until: Option<UnixTime>, features: Vec<FeatureGrant>) -> VerifiedBundle {
        let vendor = SecretKey::from_seed([3; 32]);
        let b = Bundle {
            id: "b".into(),
            issued_at: UnixTime(TODAY.0 - 100 * DAY),
            vendor: "v".into(),
            customer: Customer {
                id: "c".into(),
                name: "C".into(),
            },
            binding: vec![],
            supersedes: vec![],
            valid_from: None,
            valid_until,
            features,
        };
        bundle::verify(&bundle::sign(&b, &vendor), &[vendor.public()]).unwrap()
    }

    fn ending(name: &str, expires: Option<UnixTime>) -> FeatureGrant {
        let mut f = FeatureGrant::counted(name, 1);
        f.expires = expires;
        f
    }

    /// Five minutes either way is fine; beyond, a warning that says which way.
    #[test]
    fn clock_skew_beyond_five_minutes_is_a_warning_that_says_which_way() {
        assert_eq!(
            clock_skew(TODAY, UnixTime(TODAY.0 + 300)),
            Line::new(Level::Ok, "clock skew -300 s")
        );
        let ahead = clock_skew(UnixTime(TODAY.0 + 301), TODAY);
        assert_eq!(ahead.level, Level::Warn);
        assert!(
            ahead.text.contains("301 s ahead of the server"),
            "{}",
            ahead.text
        );
        let behind = clock_skew(TODAY, UnixTime(TODAY.0 + 3_600));
        assert!(
            behind.text.contains("3600 s behind the server"),
            "{}",
            behind.text
        );
    }

    /// An ended feature fails, one ending within 30 days warns, others say nothing; a
    /// feature's own end wins over its bundle's.
    #[test]
    fn ended_features_fail_and_ending_ones_warn() {
        let bundles = [served(
            Some(UnixTime(TODAY.0 + 10 * DAY)),
            vec![
                ending("gone", Some(TODAY)),
                ending("soon", None),
                ending("later", Some(UnixTime(TODAY.0 + 31 * DAY))),
            ],
        )];
        let (lines, expired) = expiry(&bundles, TODAY);
        assert!(expired);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].level, Level::Fail);
        assert!(lines[0].text.starts_with("'gone' expired"), "{lines:?}");
        assert_eq!(lines[1].level, Level::Warn);
        assert!(lines[1].text.contains("'soon' ends after") && lines[1].text.contains("(10 days)"));
        let (lines, expired) = expiry(&bundles, UnixTime(TODAY.0 - 100 * DAY));
        assert!(!expired && lines.is_empty(), "{lines:?}");
    }

    /// No server on the address: the report says so and how to fix it, and the
    /// verdict is "no server" (the command's 69).
    #[tokio::test]
    async fn no_server_is_reported_with_the_fix() {
        // A port that was just free: nothing answers there.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = ClientConfig::new(vec![format!("127.0.0.1:{port}")], crate::Trust::Demo);
        config.connect_timeout = std::time::Duration::from_millis(500);
        let mut lines = Vec::new();
        let verdict = run(&config, Some("solver"), &mut |l| lines.push(l)).await;
        assert!(matches!(verdict, Verdict::NoServer), "{verdict:?}");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].level, Level::Fail);
        assert!(
            lines[1].text.contains(&format!("127.0.0.1:{port}")),
            "{lines:?}"
        );
    }
}
