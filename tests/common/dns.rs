//! A tiny authoritative DNS server on 127.0.0.1 (UDP) for discovery tests: answers A queries
//! for any name with the configured addresses, AAAA with nothing, and SERVFAIL when told to.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// `None` means answer SERVFAIL.
pub type Answers = Arc<Mutex<Option<Vec<Ipv4Addr>>>>;

pub struct DnsServer {
    pub addr: SocketAddr,
    answers: Answers,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    pub async fn start(ips: &[Ipv4Addr]) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answers: Answers = Arc::new(Mutex::new(Some(ips.to_vec())));
        let queries = Arc::new(AtomicUsize::new(0));
        let (a, q) = (Arc::clone(&answers), Arc::clone(&queries));
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                let mut resp = Message::response(req.metadata.id, OpCode::Query);
                resp.metadata.recursion_available = true;
                let current = a.lock().unwrap().clone();
                for query in &req.queries {
                    resp.add_query(query.clone());
                    match &current {
                        None => resp.metadata.response_code = ResponseCode::ServFail,
                        Some(ips) if query.query_type() == RecordType::A => {
                            for ip in ips {
                                resp.add_answer(Record::from_rdata(
                                    query.name().clone(),
                                    1,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                        Some(_) => {}
                    }
                }
                let _ = socket.send_to(&resp.to_vec().unwrap(), from).await;
            }
        });
        DnsServer {
            addr,
            answers,
            queries,
            task,
        }
    }

    /// Change the answer; `None` makes the server fail every query.
    pub fn set(&self, ips: Option<&[Ipv4Addr]>) {
        *self.answers.lock().unwrap() = ips.map(|i| i.to_vec());
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}
