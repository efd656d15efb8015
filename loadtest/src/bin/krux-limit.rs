//! The limit server: accepts the same WebSocket upgrade (no auth, no filters) and writes
//! pre-built frames — each published line with `seq` spliced in, no JSON parse — to every
//! socket with one writev per socket per batch. It approximates what this machine can do
//! at all, so a report can say how close the relay gets.

mod common;

use std::io::IoSlice;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    net: common::Listen,
}

type Batch = Arc<Vec<Bytes>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::block_on(args.net.threads, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (ws, ingest) = args.net.bind().await?;
    let (tx, _) = broadcast::channel::<Batch>(65_536);
    let seq = Arc::new(std::sync::Mutex::new(0u64));
    let t = tx.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = ingest.accept().await {
            tokio::spawn(publisher(s, t.clone(), seq.clone()));
        }
    });
    while let Ok((s, _)) = ws.accept().await {
        tokio::spawn(subscriber(s, tx.subscribe()));
    }
    Ok(())
}

/// Header + line (minus its `}`) + `,"seq":N}`.
fn frame(line: &[u8], seq: u64) -> Bytes {
    let body = &line[..line.len() - 1];
    let tail = format!(",\"seq\":{seq}}}");
    let len = body.len() + tail.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x81);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= 0xFFFF {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.put_slice(body);
    out.put_slice(tail.as_bytes());
    out.freeze()
}

async fn publisher(
    mut s: TcpStream,
    tx: broadcast::Sender<Batch>,
    seq: Arc<std::sync::Mutex<u64>>,
) {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut accepted = 0u64;
    let mut last = None;
    loop {
        let mut chunk = vec![0u8; 256 * 1024];
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut batch = Vec::new();
        {
            let mut seq = seq.lock().expect("seq lock");
            for line in buf[..end].split(|&b| b == b'\n') {
                let line = line.trim_ascii();
                if line.last() == Some(&b'}') {
                    *seq += 1;
                    batch.push(frame(line, *seq));
                    last = Some(*seq);
                    accepted += 1;
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(Arc::new(batch));
            }
        }
        buf.drain(..end);
    }
    let summary = serde_json::json!({"accepted": accepted, "rejected": 0, "last_seq": last});
    let _ = s.write_all(format!("{summary}\n").as_bytes()).await;
}

async fn subscriber(mut s: TcpStream, mut rx: broadcast::Receiver<Batch>) {
    let _ = s.set_nodelay(true);
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
        if head.len() > 8192 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let Some(key) = text.lines().find_map(|l| {
        l.split_once(':')
            .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-key"))
            .map(|(_, v)| v.trim().to_string())
    }) else {
        return;
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
    if s.write_all(resp.as_bytes()).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut b = [0u8; 512];
        while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {}
    });
    loop {
        let batch = match rx.recv().await {
            Ok(b) => b,
            Err(_) => break, // lagged or closed: the limit server does not recover
        };
        // One writev per batch; loop only on a partial write.
        let mut skip = 0usize;
        let total: usize = batch.iter().map(Bytes::len).sum();
        while skip < total {
            let mut slices = Vec::with_capacity(batch.len());
            let mut off = skip;
            for f in batch.iter() {
                if off >= f.len() {
                    off -= f.len();
                } else {
                    slices.push(IoSlice::new(&f[off..]));
                    off = 0;
                }
            }
            match wr.write_vectored(&slices).await {
                Ok(0) | Err(_) => return reader.abort(),
                Ok(n) => skip += n,
            }
        }
    }
    reader.abort();
}
