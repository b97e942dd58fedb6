//! etcd's JSON gateway (`/v3/...` on the client port), for what only etcd
//! can do: compaction.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One POST. HTTP/1.0, so the answer is neither chunked nor kept alive.
async fn post(port: u16, path: &str, body: &Value) -> Value {
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("etcd answers on its client port");
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("a request to etcd");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .expect("an answer from etcd");
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .expect("an HTTP answer from etcd");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "etcd {path}: {head}\n{body}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("etcd {path}: {e}: {body}"))
}

/// Compacts at the current revision and returns it.
pub async fn compact(port: u16) -> i64 {
    // A range over one key answers with the store's current revision.
    let range = post(port, "/v3/kv/range", &json!({"key": "AA=="})).await;
    let revision: i64 = range["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("etcd reports its revision");
    post(
        port,
        "/v3/kv/compaction",
        &json!({"revision": revision.to_string(), "physical": true}),
    )
    .await;
    revision
}
