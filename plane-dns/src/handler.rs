//! Answers one DNS request: TXT for `_acme-challenge.<cluster>` and `<cluster>.<zone>` from
//! the controller's values (TTL 1 s), NOERROR with no answer when there are none, REFUSED for
//! names outside the zone or clusters the controller does not know, NOTIMP for opcodes other
//! than QUERY. hickory answers FORMERR for requests it cannot parse.

use crate::controller::Answers;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::proto::op::{Header, MessageType, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::TXT;
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use plane_protocol::names::ClusterName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// The TTL of every answer: a new challenge value must be seen at once.
const TTL: u32 = 1;

/// Queries being answered at once; more (a flood) get SERVFAIL without asking the
/// controller, so memory and the controller's load stay bounded.
pub const MAX_IN_FLIGHT: usize = 1024;

pub struct Handler {
    zone: LowerName,
    answers: Answers,
    in_flight: Arc<Semaphore>,
    /// `plane_dns_queries_total{rcode}`.
    queries: Family<Rcode, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rcode {
    rcode: String,
}

/// What a query's name is about.
#[derive(Debug, PartialEq, Eq)]
enum Subject {
    /// The challenge name of this cluster.
    Cluster(ClusterName),
    /// The zone itself: ours, but nothing to say.
    Apex,
    /// Not ours to answer.
    Elsewhere,
}

impl Handler {
    pub fn new(
        zone: &ClusterName,
        answers: Answers,
        metrics: &plane_metrics::MetricsRegistry,
    ) -> Result<Self, String> {
        let zone =
            Name::from_ascii(zone.as_str()).map_err(|err| format!("--zone {zone}: {err}"))?;
        let queries = Family::<Rcode, Counter>::default();
        metrics.register(|r| {
            r.register(
                "plane_dns_queries",
                "DNS requests answered, by response code (noerror, refused, servfail, ...)",
                queries.clone(),
            )
        });
        Ok(Self {
            zone: LowerName::from(zone),
            answers,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            queries,
        })
    }

    fn count(&self, code: ResponseCode) {
        // The mnemonics of RFC 1035 and 2136, lowercased.
        let rcode = match code {
            ResponseCode::NoError => "noerror".to_string(),
            ResponseCode::FormErr => "formerr".to_string(),
            ResponseCode::ServFail => "servfail".to_string(),
            ResponseCode::NXDomain => "nxdomain".to_string(),
            ResponseCode::NotImp => "notimp".to_string(),
            ResponseCode::Refused => "refused".to_string(),
            other => u16::from(other).to_string(),
        };
        self.queries.get_or_create(&Rcode { rcode }).inc();
    }

    fn subject(&self, name: &LowerName) -> Subject {
        subject(&self.zone, name)
    }
}

/// `_acme-challenge.<cluster>[.<zone>]` and `<cluster>.<zone>` name a cluster.
fn subject(zone: &LowerName, name: &LowerName) -> Subject {
    let name = Name::from(name.clone());
    let mut text = name.to_ascii();
    if text.ends_with('.') {
        text.pop();
    }
    let zone_text = {
        let mut zone = Name::from(zone.clone()).to_ascii();
        if zone.ends_with('.') {
            zone.pop();
        }
        zone
    };
    if text == zone_text {
        return Subject::Apex;
    }
    let in_zone = text.strip_suffix(&format!(".{zone_text}"));
    let cluster = match (text.strip_prefix("_acme-challenge."), in_zone) {
        (Some(rest), _) => rest
            .strip_suffix(&format!(".{zone_text}"))
            .unwrap_or(rest)
            .to_string(),
        (None, Some(cluster)) => cluster.to_string(),
        (None, None) => return Subject::Elsewhere,
    };
    match cluster.parse() {
        Ok(cluster) => Subject::Cluster(cluster),
        Err(_) => Subject::Elsewhere,
    }
}

/// How a query is answered.
enum Outcome {
    Error(ResponseCode),
    /// Authoritative, with these records (none: NOERROR with no answer).
    Records(Vec<Record>),
}

impl Handler {
    async fn answer(&self, request: &Request) -> Outcome {
        if request.op_code() != OpCode::Query {
            return Outcome::Error(ResponseCode::NotImp);
        }
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return Outcome::Error(ResponseCode::ServFail);
        };
        let query = request.query();
        let cluster = match self.subject(query.name()) {
            Subject::Elsewhere => return Outcome::Error(ResponseCode::Refused),
            Subject::Apex => return Outcome::Records(Vec::new()),
            Subject::Cluster(cluster) => cluster,
        };
        let answer = match self.answers.txt(&cluster).await {
            None => return Outcome::Error(ResponseCode::ServFail),
            Some(answer) if !answer.known => return Outcome::Error(ResponseCode::Refused),
            Some(answer) => answer,
        };
        if query.query_type() != RecordType::TXT {
            // The name exists, but only with TXT records.
            return Outcome::Records(Vec::new());
        }
        let name = Name::from(query.name().clone());
        Outcome::Records(
            answer
                .values
                .into_iter()
                .map(|value| {
                    Record::from_rdata(name.clone(), TTL, RData::TXT(TXT::new(vec![value])))
                })
                .collect(),
        )
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut header = Header::response_from_request(request.header());
        if request.message_type() != MessageType::Query {
            // A response sent to us: nothing to answer (answering could start a loop).
            header.set_response_code(ResponseCode::FormErr);
            self.count(ResponseCode::FormErr);
            return header.into();
        }
        let builder = MessageResponseBuilder::from_message_request(request);
        let sent = match self.answer(request).await {
            Outcome::Error(code) => {
                self.count(code);
                response_handle
                    .send_response(builder.error_msg(request.header(), code))
                    .await
            }
            Outcome::Records(records) => {
                self.count(ResponseCode::NoError);
                header.set_authoritative(true);
                let response = builder.build(header, records.iter(), [], [], []);
                response_handle.send_response(response).await
            }
        };
        sent.unwrap_or_else(|error| {
            tracing::debug!(%error, src = %request.src(), "could not send a DNS response");
            let mut header = Header::response_from_request(request.header());
            header.set_response_code(ResponseCode::ServFail);
            header.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lower(name: &str) -> LowerName {
        LowerName::from(Name::from_ascii(name).expect("name"))
    }

    #[test]
    fn challenge_names_name_their_cluster_and_others_are_elsewhere() {
        let zone = lower("dns.example.org.");
        let cluster = |c: &str| Subject::Cluster(c.parse().expect("cluster"));
        assert_eq!(
            subject(&zone, &lower("_acme-challenge.plane.example.com.")),
            cluster("plane.example.com")
        );
        assert_eq!(
            subject(&zone, &lower("plane.example.com.dns.example.org.")),
            cluster("plane.example.com")
        );
        assert_eq!(
            subject(
                &zone,
                &lower("_acme-challenge.plane.example.com.dns.example.org.")
            ),
            cluster("plane.example.com")
        );
        assert_eq!(subject(&zone, &lower("DNS.example.org.")), Subject::Apex);
        assert_eq!(
            subject(&zone, &lower("www.google.com.")),
            Subject::Elsewhere
        );
    }
}
