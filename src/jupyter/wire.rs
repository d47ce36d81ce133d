//! The Jupyter wire format (messaging protocol 5.3): connection files,
//! HMAC-SHA256 signatures and the multipart message layout
//! `[ids…, "<IDS|MSG>", signature, header, parent_header, metadata, content, buffers…]`.
use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::Sha256;

pub const PROTOCOL_VERSION: &str = "5.3";
const DELIMITER: &[u8] = b"<IDS|MSG>";

/// The connection file Jupyter writes for a kernel it starts.
#[derive(Clone, Debug, Deserialize)]
pub struct Connection {
    pub ip: String,
    pub transport: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    pub hb_port: u16,
    #[serde(default)]
    pub key: String,
    #[serde(default = "default_scheme")]
    pub signature_scheme: String,
}

fn default_scheme() -> String {
    "hmac-sha256".into()
}

impl Connection {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let c: Connection = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Jupyter connection file", path.display()))?;
        if c.transport != "tcp" {
            bail!("{}: transport {:?} is not supported (only tcp)", path.display(), c.transport);
        }
        if c.signature_scheme != "hmac-sha256" {
            bail!(
                "{}: signature scheme {:?} is not supported (only hmac-sha256)",
                path.display(),
                c.signature_scheme
            );
        }
        Ok(c)
    }

    pub fn endpoint(&self, port: u16) -> String {
        format!("tcp://{}:{port}", self.ip)
    }
}

/// Signs outgoing messages and checks incoming ones with the session key.
/// An empty key means "no signing", as Jupyter defines it.
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub fn new(key: &str) -> Self {
        Signer { key: key.as_bytes().to_vec() }
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        for p in parts {
            mac.update(p);
        }
        mac
    }

    pub fn sign(&self, parts: &[&[u8]]) -> String {
        if self.key.is_empty() {
            return String::new();
        }
        hex(&self.mac(parts).finalize().into_bytes())
    }

    /// Constant-time check of a hex signature over `parts`.
    pub fn verify(&self, signature: &[u8], parts: &[&[u8]]) -> bool {
        if self.key.is_empty() {
            return true;
        }
        match unhex(signature) {
            Some(sig) => self.mac(parts).verify_slice(&sig).is_ok(),
            None => false,
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// One message. `header`, `parent_header`, `metadata` and `content` are
/// JSON objects; `ids` are the ZeroMQ routing frames to reply to.
#[derive(Clone, Debug)]
pub struct Message {
    pub ids: Vec<Bytes>,
    pub header: Value,
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

/// Why an incoming message was dropped.
#[derive(Debug, PartialEq)]
pub enum WireError {
    NoDelimiter,
    TooFewFrames,
    BadSignature,
    BadJson(&'static str),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::NoDelimiter => write!(f, "no <IDS|MSG> delimiter"),
            WireError::TooFewFrames => write!(f, "fewer than the 5 frames after the delimiter"),
            WireError::BadSignature => write!(f, "bad HMAC signature"),
            WireError::BadJson(part) => write!(f, "its {part} is not a JSON object"),
        }
    }
}

impl Message {
    /// Parse and verify frames received on a socket.
    pub fn parse(frames: Vec<Bytes>, signer: &Signer) -> Result<Message, WireError> {
        let d = frames.iter().position(|f| f.as_ref() == DELIMITER).ok_or(WireError::NoDelimiter)?;
        if frames.len() < d + 6 {
            return Err(WireError::TooFewFrames);
        }
        let parts: Vec<&[u8]> = frames[d + 2..d + 6].iter().map(|f| f.as_ref()).collect();
        if !signer.verify(&frames[d + 1], &parts) {
            return Err(WireError::BadSignature);
        }
        let json = |i: usize, what: &'static str| -> Result<Value, WireError> {
            match serde_json::from_slice::<Value>(&frames[d + 2 + i]) {
                Ok(v @ Value::Object(_)) => Ok(v),
                _ => Err(WireError::BadJson(what)),
            }
        };
        Ok(Message {
            ids: frames[..d].to_vec(),
            header: json(0, "header")?,
            parent_header: json(1, "parent header")?,
            metadata: json(2, "metadata")?,
            content: json(3, "content")?,
            buffers: frames[d + 6..].to_vec(),
        })
    }

    /// Frames to send, signed.
    pub fn frames(&self, signer: &Signer) -> Vec<Bytes> {
        let parts: Vec<Vec<u8>> = [&self.header, &self.parent_header, &self.metadata, &self.content]
            .iter()
            .map(|v| serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec()))
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        let sig = signer.sign(&refs);
        let mut out = self.ids.clone();
        out.push(Bytes::from_static(DELIMITER));
        out.push(Bytes::from(sig));
        out.extend(parts.into_iter().map(Bytes::from));
        out.extend(self.buffers.iter().cloned());
        out
    }

    pub fn msg_type(&self) -> &str {
        self.header.get("msg_type").and_then(Value::as_str).unwrap_or("")
    }

    /// A new message of `msg_type` in reply to (or caused by) `self`.
    pub fn child(&self, session: &str, msg_type: &str, content: Value) -> Message {
        Message {
            ids: self.ids.clone(),
            header: header(session, msg_type),
            parent_header: self.header.clone(),
            metadata: Value::Object(Map::new()),
            content,
            buffers: Vec::new(),
        }
    }

    pub fn str_field<'a>(&'a self, key: &str) -> &'a str {
        self.content.get(key).and_then(Value::as_str).unwrap_or("")
    }
}

/// A fresh header.
pub fn header(session: &str, msg_type: &str) -> Value {
    json!({
        "msg_id": uuid::Uuid::new_v4().to_string(),
        "session": session,
        "username": "knlp",
        "date": now_iso8601(),
        "msg_type": msg_type,
        "version": PROTOCOL_VERSION,
    })
}

/// UTC now as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn now_iso8601() -> String {
    report::util::iso_utc(report::util::since_epoch(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_round_trip() {
        let s = Signer::new("secret");
        let m = Message {
            ids: vec![Bytes::from_static(b"peer")],
            header: header("sess", "execute_request"),
            parent_header: json!({}),
            metadata: json!({}),
            content: json!({"code": "1 + 1"}),
            buffers: vec![],
        };
        let f = m.frames(&s);
        let back = Message::parse(f.clone(), &s).unwrap();
        assert_eq!(back.content, m.content);
        assert_eq!(back.ids, m.ids);
        assert_eq!(Message::parse(f.clone(), &Signer::new("other")).unwrap_err(), WireError::BadSignature);
        let mut tampered = f;
        tampered[6] = Bytes::from_static(b"{\"code\": \"2\"}");
        assert_eq!(Message::parse(tampered, &s).unwrap_err(), WireError::BadSignature);
    }

    #[test]
    fn matches_a_known_hmac() {
        // RFC 4231 test case 2.
        let s = Signer::new("Jefe");
        assert_eq!(
            s.sign(&[b"what do ya want ", b"for nothing?"]),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn dates_are_iso8601() {
        let d = now_iso8601();
        assert_eq!(d.len(), 27, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z') && &d[10..11] == "T", "{d}");
    }
}
