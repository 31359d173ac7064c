//! Structured request heads (any method, target bytes, version and fields, including what the
//! HTTP/1 parser never produces) through the head checks and header hygiene
//! (`tollgate::fuzzing::head`).
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tollgate::fuzzing::Head;

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Head,
    Post,
    Options,
    Trace,
    Connect,
    Other(String),
}

/// Names the checks care about, so the fuzzer need not guess them.
#[derive(Arbitrary, Debug)]
enum Name {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    Te,
    KeepAlive,
    Cookie,
    XForwardedFor,
    Forwarded,
    Underscored,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: Method,
    target: Vec<u8>,
    version: u8,
    headers: Vec<(Name, Vec<u8>)>,
    limits: u8,
}

fuzz_target!(|input: Input| {
    let method = match input.method {
        Method::Get => "GET".to_string(),
        Method::Head => "HEAD".to_string(),
        Method::Post => "POST".to_string(),
        Method::Options => "OPTIONS".to_string(),
        Method::Trace => "TRACE".to_string(),
        Method::Connect => "CONNECT".to_string(),
        Method::Other(m) => m,
    };
    let headers = input
        .headers
        .into_iter()
        .map(|(n, v)| {
            let name = match n {
                Name::Host => "host".to_string(),
                Name::ContentLength => "content-length".to_string(),
                Name::TransferEncoding => "transfer-encoding".to_string(),
                Name::Connection => "connection".to_string(),
                Name::Upgrade => "upgrade".to_string(),
                Name::Te => "te".to_string(),
                Name::KeepAlive => "keep-alive".to_string(),
                Name::Cookie => "cookie".to_string(),
                Name::XForwardedFor => "x-forwarded-for".to_string(),
                Name::Forwarded => "forwarded".to_string(),
                Name::Underscored => "x_forwarded_for".to_string(),
                Name::Other(s) => s,
            };
            (name, v)
        })
        .collect();
    tollgate::fuzzing::head(&Head {
        method,
        target: input.target,
        version: input.version,
        headers,
        limits: input.limits,
    });
});
