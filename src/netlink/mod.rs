//! Netlink: one socket type over `netlink-sys`, and the kernel objects istio-init reads and
//! changes through it — TPROXY routing ([`route`]) and the nf_tables table listing ([`tables`]).
//!
//! Messages are the rust-netlink crates' types (`netlink-packet-route`, `netlink-packet-netfilter`)
//! in a `netlink-packet-core` envelope; nothing here encodes a message by hand. [`Socket`] sends
//! one message or several in one `send` (the kernel then handles all of them within that one
//! system call), and reads the acknowledgements or a dump's answers back.
//!
//! Effects: a `NETLINK_ROUTE` or `NETLINK_NETFILTER` socket in the calling thread's network
//! namespace.

pub mod route;
pub mod tables;

use std::fmt;

use anyhow::Context;
use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_ALIGNTO,
    NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
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

/// A netlink socket bound in the calling thread's network namespace, numbering its requests.
#[derive(Debug)]
pub(crate) struct Socket {
    sock: netlink_sys::Socket,
    seq: u32,
}

/// Appends `msg` to `out` as one netlink message with `flags` and sequence number `seq`, padded
/// to the alignment the next message needs.
pub(crate) fn encode<M: NetlinkSerializable>(out: &mut Vec<u8>, msg: M, flags: u16, seq: u32) {
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

/// Decodes one message of [`split`].
fn decode<M: NetlinkDeserializable>(bytes: &[u8]) -> Result<NetlinkPayload<M>, Error> {
    Ok(NetlinkMessage::<M>::deserialize(bytes)?.payload)
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
    pub(crate) fn send_all<M: NetlinkSerializable>(
        &mut self,
        messages: impl IntoIterator<Item = (M, u16)>,
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
    pub(crate) fn acks<M: NetlinkDeserializable>(&self, seqs: &[u32]) -> Result<Vec<Ack>, Error> {
        let mut out: Vec<Option<Ack>> = vec![None; seqs.len()];
        while out.iter().any(Option::is_none) {
            let buf = self.receive()?;
            for (header, bytes) in split(&buf)? {
                let Some(i) = seqs.iter().position(|&s| s == header.sequence_number) else {
                    continue;
                };
                if let NetlinkPayload::Error(e) = decode::<M>(bytes)? {
                    out[i] = Some(match e.code {
                        None => Ok(()),
                        Some(code) => Err(Errno::from_raw(-code.get())),
                    });
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Sends one request with `flags` (which ask for an acknowledgement) and waits for it.
    pub(crate) fn request<M: NetlinkSerializable + NetlinkDeserializable>(
        &mut self,
        msg: M,
        flags: u16,
    ) -> Result<(), Error> {
        let seqs = self.send_all([(msg, flags)])?;
        let acks = self.acks::<M>(&seqs)?;
        acks.into_iter().next().unwrap_or(Ok(())).map_err(Error::Os)
    }

    /// Sends the dump request `msg` and returns the answers.
    pub(crate) fn dump<M: NetlinkSerializable + NetlinkDeserializable>(
        &mut self,
        msg: M,
    ) -> Result<Vec<M>, Error> {
        let seqs = self.send_all([(msg, DUMP)])?;
        let mut out = Vec::new();
        loop {
            let buf = self.receive()?;
            for (header, bytes) in split(&buf)? {
                if seqs.first() != Some(&header.sequence_number) {
                    continue;
                }
                match decode::<M>(bytes)? {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return Err(Error::Os(Errno::from_raw(-e.raw_code())));
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::route::RouteMessage;
    use netlink_packet_route::rule::RuleMessage;

    use super::*;

    #[test]
    fn messages_split_on_aligned_boundaries() {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            RouteNetlinkMessage::GetRule(RuleMessage::default()),
            DUMP,
            1,
        );
        let first = buf.len();
        encode(
            &mut buf,
            RouteNetlinkMessage::NewRoute(RouteMessage::default()),
            CREATE,
            2,
        );
        assert_eq!(first % usize::from(NLMSG_ALIGNTO), 0);
        let msgs = split(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].0.sequence_number, msgs[0].0.flags), (1, DUMP));
        assert_eq!((msgs[1].0.sequence_number, msgs[1].0.flags), (2, CREATE));
        assert_eq!(msgs[1].1.len(), buf.len() - first);
        assert!(matches!(
            decode::<RouteNetlinkMessage>(msgs[1].1).unwrap(),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(_))
        ));
    }

    #[test]
    fn a_truncated_message_is_an_error_not_a_shorter_answer() {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            RouteNetlinkMessage::GetRule(RuleMessage::default()),
            DUMP,
            1,
        );
        buf.truncate(buf.len() - 4);
        assert!(matches!(split(&buf), Err(Error::Decode(_))));
    }
}
