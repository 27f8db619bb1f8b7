//! The nf_tables tables and chains of the calling thread's network namespace, over
//! `NETLINK_NETFILTER`: the handover's "is this namespace fresh" probe, and the coexistence
//! checks (the nftables backend's tables, iptables-nft's `ISTIO_*` chains).
//!
//! Effects: one `NETLINK_NETFILTER` socket and one dump.

use anyhow::anyhow;
use netlink_packet_core::{DecodeError, Emitable, NetlinkSerializable, Parseable};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, DataAttribute, ExpressionAttribute, Expressions, Immediate,
    ListAttribute, NfTablesMessage, RuleAttribute, RuleMessage, TableAttribute, TableMessage,
    VerdictAttribute,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use nix::libc::NFNETLINK_V0;

use super::{Message, Socket};
use crate::net::Family;

/// One nf_tables table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its family (`ip`, `ip6`, `inet`, …, as nf_tables numbers them).
    pub family: NetfilterProtoFamily,
    pub name: String,
}

/// The nf_tables family that holds a family's iptables-nft tables.
pub fn nfproto(family: Family) -> NetfilterProtoFamily {
    match family {
        Family::V4 => NetfilterProtoFamily::IPv4,
        Family::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// The attributes of a kind of nf_tables object message.
trait Attributes: Parseable<[u8]> {
    type Nla: netlink_packet_core::Nla;
    fn attributes(&self) -> &[Self::Nla];
    fn empty() -> Self;
}

/// [`Attributes`] for message types whose attributes are their `attributes` field.
macro_rules! attributes {
    ($($message:ident: $nla:ident),*) => {$(
        impl Attributes for $message {
            type Nla = $nla;
            fn attributes(&self) -> &[$nla] {
                &self.attributes
            }
            fn empty() -> Self {
                $message {
                    attributes: Vec::new(),
                }
            }
        }
    )*};
}

attributes!(TableMessage: TableAttribute, ChainMessage: ChainAttribute, RuleMessage: RuleAttribute);

/// An object message: the nfnetlink header (family) and the object's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Body<M> {
    header: NetfilterHeader,
    object: M,
}

/// A table message.
type TableBody = Body<TableMessage>;

impl<M: Attributes> Emitable for Body<M> {
    fn buffer_len(&self) -> usize {
        self.header.buffer_len() + self.object.attributes().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.header.emit(buffer);
        let rest = &mut buffer[self.header.buffer_len()..];
        self.object.attributes().emit(rest);
    }
}

impl<M: Attributes> Parseable<[u8]> for Body<M> {
    fn parse(buf: &[u8]) -> Result<Body<M>, DecodeError> {
        let header = NetfilterHeader::parse(buf)?;
        let rest = buf.get(header.buffer_len()..).unwrap_or_default();
        Ok(Body {
            header,
            object: M::parse(rest)?,
        })
    }
}

/// The message type `netlink-packet-netfilter` gives a kind of message.
fn kind<M: Attributes>(variant: fn(M) -> NfTablesMessage) -> u16 {
    let header = NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0);
    NetfilterMessage::new(header, variant(M::empty())).message_type()
}

/// A dump request of a kind of object in `family` (every family: `Unspec`).
fn dump_request<M: Attributes>(
    variant: fn(M) -> NfTablesMessage,
    family: NetfilterProtoFamily,
    object: M,
) -> Message<Body<M>> {
    // NFNETLINK_V0 is a u32 in libc; the header field is its one byte.
    let version = u8::try_from(NFNETLINK_V0).unwrap_or_default();
    Message {
        kind: kind(variant),
        body: Body {
            header: NetfilterHeader::new(family, version, 0),
            object,
        },
    }
}

/// The request that dumps the tables of `family` (every family: `Unspec`).
fn request(family: NetfilterProtoFamily) -> Message<TableBody> {
    dump_request(NfTablesMessage::GetTable, family, TableMessage::empty())
}

/// The table an answer of the dump describes, if it names one.
fn table(body: TableBody) -> Option<Table> {
    let name = body.object.attributes.into_iter().find_map(|a| match a {
        TableAttribute::Name(n) => Some(n),
        _ => None,
    })?;
    Some(Table {
        family: body.header.family,
        name,
    })
}

/// The nf_tables tables of `family` (`None`: of every family) in this thread's namespace.
pub fn list(family: Option<Family>) -> anyhow::Result<Vec<Table>> {
    let proto = family.map_or(NetfilterProtoFamily::Unspec, nfproto);
    let mut nl = Socket::netfilter()?;
    let answers = nl
        .dump(request(proto), kind(NfTablesMessage::NewTable))
        .map_err(|e| anyhow!("listing nf_tables tables: {e}"))?;
    Ok(answers.into_iter().filter_map(table).collect())
}

/// The names of the chains of one table (`family`, `table`) in this thread's namespace.
pub fn chains(family: NetfilterProtoFamily, table: &str) -> anyhow::Result<Vec<String>> {
    let only = ChainMessage {
        attributes: vec![ChainAttribute::Table(table.to_owned())],
    };
    let mut nl = Socket::netfilter()?;
    let answers = nl
        .dump(
            dump_request(NfTablesMessage::GetChain, family, only),
            kind(NfTablesMessage::NewChain),
        )
        .map_err(|e| anyhow!("listing the chains of nf_tables table {table}: {e}"))?;
    Ok(answers
        .into_iter()
        .filter(|b: &Body<ChainMessage>| {
            // The kernel filters by table only on some versions: check the answer's.
            b.object
                .attributes
                .iter()
                .any(|a| matches!(a, ChainAttribute::Table(t) if t == table))
        })
        .filter_map(|b| {
            b.object.attributes.into_iter().find_map(|a| match a {
                ChainAttribute::Name(n) => Some(n),
                _ => None,
            })
        })
        .collect())
}

/// One rule of a chain, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its handle (what `delete rule … handle N` names).
    pub handle: u64,
    /// The chain it jumps or goes to, if its verdict is one.
    pub jump: Option<String>,
}

/// The chain a rule's immediate verdict names (`jump`/`goto` CHAIN), if any.
fn verdict_chain(attributes: &[RuleAttribute]) -> Option<String> {
    let exprs = attributes.iter().find_map(|a| match a {
        RuleAttribute::Expressions(list) => Some(list),
        _ => None,
    })?;
    exprs
        .iter()
        .filter_map(|e| match e {
            ListAttribute::Element(attrs) => Some(attrs),
            _ => None,
        })
        .flatten()
        .find_map(|ea| match ea {
            ExpressionAttribute::Data(Expressions::Immediate(imm)) => {
                imm.iter().find_map(|i| match i {
                    Immediate::Data(DataAttribute::Verdict(v)) => {
                        v.iter().find_map(|va| match va {
                            VerdictAttribute::Chain(c) => Some(c.clone()),
                            _ => None,
                        })
                    }
                    _ => None,
                })
            }
            _ => None,
        })
}

/// The rules of one chain (`family`, `table`, `chain`) in this thread's namespace, in the
/// chain's order (the order the kernel evaluates them, and `iptables-save` prints them).
pub fn rules(family: NetfilterProtoFamily, table: &str, chain: &str) -> anyhow::Result<Vec<Rule>> {
    let only = RuleMessage {
        attributes: vec![
            RuleAttribute::Table(table.to_owned()),
            RuleAttribute::Chain(chain.to_owned()),
        ],
    };
    let mut nl = Socket::netfilter()?;
    let answers = nl
        .dump(
            dump_request(NfTablesMessage::GetRule, family, only),
            kind(NfTablesMessage::NewRule),
        )
        .map_err(|e| {
            anyhow!("listing the rules of chain {chain} of nf_tables table {table}: {e}")
        })?;
    answers
        .into_iter()
        .filter(|b: &Body<RuleMessage>| {
            let attrs = &b.object.attributes;
            attrs.contains(&RuleAttribute::Table(table.to_owned()))
                && attrs.contains(&RuleAttribute::Chain(chain.to_owned()))
        })
        .map(|b| {
            let attrs = &b.object.attributes;
            let handle = attrs
                .iter()
                .find_map(|a| match a {
                    RuleAttribute::Handle(h) => Some(*h),
                    _ => None,
                })
                .ok_or_else(|| anyhow!("a rule of chain {chain} of table {table} has no handle"))?;
            Ok(Rule {
                handle,
                jump: verdict_chain(attrs),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_netfilter::NetfilterMessageInner;

    use super::super::{DUMP, decode, encode, split};
    use super::*;

    #[test]
    fn the_dump_request_names_the_family_and_nothing_else() {
        let mut buf = Vec::new();
        encode(&mut buf, request(nfproto(Family::V6)), DUMP, 5);
        // Header and struct nfgenmsg: no attribute.
        assert_eq!(buf.len(), 16 + 4);
        assert_eq!(buf[16], u8::from(NetfilterProtoFamily::IPv6));
        let parts = split(&buf).unwrap();
        assert_eq!((parts[0].0.sequence_number, parts[0].0.flags), (5, DUMP));
        // The crate's all-kinds decoder reads it as a GETTABLE of that family.
        let back = NetlinkMessage::<NetfilterMessage>::deserialize(parts[0].1).unwrap();
        let NetlinkPayload::InnerMessage(m) = back.payload else {
            panic!("not a netfilter message: {back:?}");
        };
        assert_eq!(m.header.family, NetfilterProtoFamily::IPv6);
        assert!(matches!(
            m.inner,
            NetfilterMessageInner::NfTables(NfTablesMessage::GetTable(_))
        ));
    }

    #[test]
    fn an_answer_gives_the_family_and_name() {
        // The kernel's answer, as the crate's all-kinds encoder writes it.
        let answer = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NfTablesMessage::NewTable(TableMessage {
                attributes: vec![
                    TableAttribute::Use(3),
                    TableAttribute::Name("istio-proxy-nat".into()),
                ],
            }),
        );
        let mut buf = Vec::new();
        let mut m = NetlinkMessage::from(answer);
        m.finalize();
        buf.resize(m.buffer_len(), 0);
        m.serialize(&mut buf);
        let back = decode::<TableBody>(&buf).unwrap();
        assert_eq!(back.kind, kind(NfTablesMessage::NewTable));
        assert_ne!(back.kind, kind(NfTablesMessage::GetTable));
        assert_eq!(
            table(back.body),
            Some(Table {
                family: NetfilterProtoFamily::Inet,
                name: "istio-proxy-nat".into(),
            })
        );
        assert_eq!(table(request(NetfilterProtoFamily::IPv4).body), None);
    }
}
