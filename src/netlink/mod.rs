//! Netlink: one socket type over `netlink-sys`, and the kernel objects istio-init reads and
//! changes through it — TPROXY routing ([`route`]), the nf_tables table and chain listings
//! ([`tables`]) and the nftables backend's batches ([`nftables`]).
//!
//! Messages are the rust-netlink crates' types (`netlink-packet-route`, `netlink-packet-netfilter`)
//! in a `netlink-packet-core` envelope; nothing here encodes a message by hand. [`Socket`] sends
//! one message or several in one `send` (the kernel then handles all of them within that one
//! system call), and reads the acknowledgements or a dump's answers back.
//!
//! Effects: a `NETLINK_ROUTE` or `NETLINK_NETFILTER` socket in the calling thread's network
//! namespace.

pub mod nftables;
pub mod route;
pub mod tables;

use std::fmt;

use anyhow::Context;
use netlink_packet_core::{
    DecodeError, Emitable, ErrorBuffer, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST, NLMSG_ALIGNTO, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, Parseable,
};
use netlink_sys::{SocketAddr, protocols};
use nix::errno::Errno;

/// Header flags of an exclusive creation that the kernel acknowledges (`EEXIST` when the object
/// is already there).
pub(crate) const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
/// Header flags of a change (a removal) that the kernel acknowledges.
pub(crate) const CHANGE: u16 = NLM_F_REQUEST | NLM_F_ACK;
/// Header flags of a dump request.
pub(crate) const DUMP: u16 = NLM_F_REQUEST | NLM_F_DUMP;

/// What a netlink exchange fails with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Error {
    /// The kernel's answer (an `NLMSG_ERROR` code), or a failed socket call.
    Os(Errno),
    /// An answer the crates could not decode.
    Decode(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Os(e) => e.fmt(f),
            Error::Decode(e) => write!(f, "undecodable netlink answer: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Os(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Error {
        Error::Decode(e.to_string())
    }
}

/// The kernel's verdict on one acknowledged request.
pub(crate) type Ack = Result<(), Errno>;

/// One message: a body of one of the crates' types (`RuleMessage`, `TableMessage`, …) and the
/// message type the crate gives that kind of message.
///
/// The crates' all-kinds enums (`RouteNetlinkMessage`, `NetfilterMessage`) would do the same
/// job, but their encoders and decoders cover every message of the protocol (links, traffic
/// control, conntrack, …) and all of that lands in the binary: about 450 KiB. Sending and
/// reading only the bodies istio-init uses keeps just their code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message<B> {
    pub(crate) kind: u16,
    pub(crate) body: B,
}

impl<B: Emitable> NetlinkSerializable for Message<B> {
    fn message_type(&self) -> u16 {
        self.kind
    }

    fn buffer_len(&self) -> usize {
        self.body.buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        self.body.emit(buffer);
    }
}

impl<B: Parseable<[u8]>> NetlinkDeserializable for Message<B> {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        Ok(Message {
            kind: header.message_type,
            body: B::parse(payload)?,
        })
    }
}

/// A netlink socket bound in the calling thread's network namespace, numbering its requests.
#[derive(Debug)]
pub(crate) struct Socket {
    sock: netlink_sys::Socket,
    seq: u32,
}

/// Appends `msg` to `out` as one netlink message with `flags` and sequence number `seq`, padded
/// to the alignment the next message needs.
pub(crate) fn encode<B: Emitable>(out: &mut Vec<u8>, msg: Message<B>, flags: u16, seq: u32) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    msg.finalize();
    let at = out.len();
    out.resize(at + msg.buffer_len(), 0);
    msg.serialize(&mut out[at..]);
    out.resize(out.len().next_multiple_of(usize::from(NLMSG_ALIGNTO)), 0);
}

/// Splits a receive buffer into its messages, as (header, whole message bytes).
pub(crate) fn split(buf: &[u8]) -> Result<Vec<(NetlinkHeader, &[u8])>, Error> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let nb = NetlinkBuffer::new_checked(&buf[off..])?;
        let len = nb.length() as usize;
        let mut header = NetlinkHeader::default();
        header.length = nb.length();
        header.message_type = nb.message_type();
        header.flags = nb.flags();
        header.sequence_number = nb.sequence_number();
        header.port_number = nb.port_number();
        out.push((header, &buf[off..off + len]));
        off += len.next_multiple_of(usize::from(NLMSG_ALIGNTO));
    }
    Ok(out)
}

/// The error code of an `NLMSG_ERROR` message of [`split`] (`Ok` for an acknowledgement).
fn ack(bytes: &[u8]) -> Result<Ack, Error> {
    let payload = NetlinkBuffer::new_checked(bytes)?.payload();
    Ok(match ErrorBuffer::new_checked(&payload)?.code() {
        None => Ok(()),
        Some(code) => Err(Errno::from_raw(-code.get())),
    })
}

/// Decodes one message of [`split`].
pub(crate) fn decode<B: Parseable<[u8]>>(bytes: &[u8]) -> Result<Message<B>, Error> {
    match NetlinkMessage::<Message<B>>::deserialize(bytes)?.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m),
        _ => Err(Error::Decode(
            "a control message where a body was expected".into(),
        )),
    }
}

impl Socket {
    /// A `NETLINK_ROUTE` socket (rules, routes, addresses).
    pub(crate) fn route() -> anyhow::Result<Socket> {
        Self::open(protocols::NETLINK_ROUTE)
    }

    /// A `NETLINK_NETFILTER` socket (nf_tables).
    pub(crate) fn netfilter() -> anyhow::Result<Socket> {
        Self::open(protocols::NETLINK_NETFILTER)
    }

    fn open(protocol: isize) -> anyhow::Result<Socket> {
        let mut sock = netlink_sys::Socket::new(protocol).context("opening a netlink socket")?;
        sock.bind(&SocketAddr::new(0, 0))
            .context("binding the netlink socket")?;
        Ok(Socket { sock, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sends every message, each with its header flags, in one `send`, and returns their
    /// sequence numbers in order.
    pub(crate) fn send_all<B: Emitable>(
        &mut self,
        messages: impl IntoIterator<Item = (Message<B>, u16)>,
    ) -> Result<Vec<u32>, Error> {
        let mut buf = Vec::with_capacity(256);
        let mut seqs = Vec::new();
        for (msg, flags) in messages {
            let seq = self.next_seq();
            encode(&mut buf, msg, flags, seq);
            seqs.push(seq);
        }
        self.sock.send(&buf, 0)?;
        Ok(seqs)
    }

    fn receive(&self) -> Result<Vec<u8>, Error> {
        // A dump answer comes in pieces no larger than NLMSG_GOODSIZE (under 8 KiB) unless
        // the reader has shown a larger buffer: 8 KiB holds any of them, in two pages.
        let mut buf = Vec::with_capacity(8 * 1024);
        self.sock.recv(&mut buf, 0)?;
        Ok(buf)
    }

    /// Waits for the acknowledgements of the requests numbered `seqs`, in that order.
    pub(crate) fn acks(&self, seqs: &[u32]) -> Result<Vec<Ack>, Error> {
        let mut out: Vec<Option<Ack>> = vec![None; seqs.len()];
        while out.iter().any(Option::is_none) {
            let buf = self.receive()?;
            for (header, bytes) in split(&buf)? {
                let Some(i) = seqs.iter().position(|&s| s == header.sequence_number) else {
                    continue;
                };
                if header.message_type == NLMSG_ERROR {
                    out[i] = Some(ack(bytes)?);
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Sends one request with `flags` (which ask for an acknowledgement) and waits for it.
    pub(crate) fn request<B: Emitable>(
        &mut self,
        msg: Message<B>,
        flags: u16,
    ) -> Result<(), Error> {
        let seqs = self.send_all([(msg, flags)])?;
        let acks = self.acks(&seqs)?;
        acks.into_iter().next().unwrap_or(Ok(())).map_err(Error::Os)
    }

    /// Sends the dump request `msg` and returns the answers of type `kind`.
    pub(crate) fn dump<B: Emitable + Parseable<[u8]>>(
        &mut self,
        msg: Message<B>,
        kind: u16,
    ) -> Result<Vec<B>, Error> {
        let seqs = self.send_all([(msg, DUMP)])?;
        let mut out = Vec::new();
        loop {
            let buf = self.receive()?;
            for (header, bytes) in split(&buf)? {
                if seqs.first() != Some(&header.sequence_number) {
                    continue;
                }
                match header.message_type {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => return Err(Error::Os(ack(bytes)?.err().unwrap_or(Errno::EIO))),
                    k if k == kind => out.push(decode::<B>(bytes)?.body),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::route::RouteMessage;
    use netlink_packet_route::rule::RuleMessage;

    use super::*;

    /// A rule dump request numbered 1, encoded (any message type: framing ignores it).
    fn one_rule_request() -> Vec<u8> {
        let mut buf = Vec::new();
        let rule = Message {
            kind: 100,
            body: RuleMessage::default(),
        };
        encode(&mut buf, rule, DUMP, 1);
        buf
    }

    #[test]
    fn messages_split_on_aligned_boundaries() {
        let mut buf = one_rule_request();
        let first = buf.len();
        let route = Message {
            kind: 101,
            body: RouteMessage::default(),
        };
        encode(&mut buf, route.clone(), CREATE, 2);
        assert_eq!(first % usize::from(NLMSG_ALIGNTO), 0);
        let msgs = split(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].0.sequence_number, msgs[0].0.flags), (1, DUMP));
        assert_eq!((msgs[1].0.sequence_number, msgs[1].0.flags), (2, CREATE));
        assert_eq!(msgs[1].1.len(), buf.len() - first);
        assert_eq!(decode::<RouteMessage>(msgs[1].1).unwrap(), route);
    }

    #[test]
    fn a_truncated_message_is_an_error_not_a_shorter_answer() {
        let mut buf = one_rule_request();
        buf.truncate(buf.len() - 4);
        assert!(matches!(split(&buf), Err(Error::Decode(_))));
    }
}
